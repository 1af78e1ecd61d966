"""The documentation that is generated from the code stays in sync with it."""

from pathlib import Path

from tvlars_scale.config import reference_markdown

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_generated_from_the_schema():
    documented = (REPO_ROOT / "docs" / "config.md").read_text()
    assert documented.strip() == reference_markdown().strip(), (
        "docs/config.md is stale: python -m tvlars_scale.config > docs/config.md"
    )


def test_readme_links_the_config_reference_and_names_every_launch_file():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "docs/config.md" in readme
    for launch_file in (REPO_ROOT / "launch").glob("accelerate_*.yaml"):
        stem = launch_file.name.replace("zero1", "zero2").replace("zero3", "zero2")
        assert stem in readme, f"README gives no recipe for {launch_file.name}"
