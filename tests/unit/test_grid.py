"""The paper grid expands to the 216 distinct runs of Table 1; filters, launch lines, bad input."""

import shlex
from pathlib import Path

import pytest

from tvlars_scale.config import load_config
from tvlars_scale.paper.grid import load_grid, main, parse_filters, select
from tvlars_scale.paper.report import RunResult, load_paper_table, optimizer_label, paper_key

REPO = Path(__file__).resolve().parents[2]
PAPER_GRID = REPO / "configs" / "paper_grid.yaml"
# Table 1 of arXiv 2309.14053, written out here independently of the grid file.
PAPER_BATCH_LRS = {
    512: {1, 2, 3},
    1024: {2, 3, 4},
    2048: {5, 6, 7},
    4096: {8, 9, 10},
    8192: {10, 12, 15},
    16384: {15, 17, 19},
}


def overrides_of(run) -> dict[str, str]:
    return dict(item.split("=", 1) for item in run.overrides)


def test_paper_grid_has_216_distinct_runs_covering_table_1():
    runs = load_grid(PAPER_GRID).runs()
    assert len(runs) == 216
    assert len({run.name for run in runs}) == 216
    assert len({run.labels["output_dir"] for run in runs}) == 216
    assert len({(run.config, run.overrides) for run in runs}) == 216
    cells = {
        (r.labels["dataset"], r.labels["task"], r.labels["optimizer"], int(r.labels["batch"]))
        for r in runs
    }
    assert len(cells) == 2 * 2 * 3 * 6
    for run in runs:
        values = overrides_of(run)
        batch = int(values["batch.global_batch_size"])
        assert float(values["optim.lr"]) in PAPER_BATCH_LRS[batch]


def test_paper_grid_optimizer_settings():
    for run in load_grid(PAPER_GRID).runs():
        values, task = overrides_of(run), run.labels["task"]
        assert values["task.name"] == task
        if values["optim.name"] == "tvlars":
            assert float(values["optim.lmbda"]) == (1e-4 if task == "classification" else 1e-5)
            assert float(values["optim.delay_epochs"]) == 10
            assert values["schedule.name"] == "constant"
        else:
            assert values["optim.name"] in ("lars", "lamb")
            assert values["schedule.name"] == "warmup_cosine"
            assert float(values["schedule.warmup_epochs"]) == 20


def test_overrides_are_accepted_by_the_config_schema():
    grid = load_grid(PAPER_GRID)
    base = REPO / "configs" / "digits.yaml"  # any valid base: the grid's own keys are checked
    for run in grid.runs()[::37]:
        config = load_config(base, [o for o in run.overrides if not o.startswith("data.")])
        values = overrides_of(run)
        assert config.optim.lr == float(values["optim.lr"])
        assert config.optim.name == values["optim.name"]
        assert config.schedule.name == values["schedule.name"]
        assert config.task.name == run.labels["task"]


def test_filters_select_and_launch_line_shape(capsys):
    runs = select(
        load_grid(PAPER_GRID).runs(),
        parse_filters(["dataset=cifar10", "batch=512", "lr=2.0", "optimizer=tvlars"]),
    )
    assert [r.labels["task"] for r in runs] == ["classification", "barlow_twins"]
    assert main(["print", "--grid", str(PAPER_GRID), "--filter", "task=barlow_twins",
                 "--filter", "batch=16384", "--set", "batch.micro_batch_size=128"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 3 * 3  # datasets x optimizers x lrs
    words = shlex.split(lines[0])
    assert words[:2] == ["accelerate", "launch"]
    assert words[words.index("-m") + 1] == "tvlars_scale.train"
    assert words[words.index("--config") + 1] == "configs/cifar10_resnet18.yaml"
    assert "batch.micro_batch_size=128" in words and "batch.global_batch_size=16384" in words


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["print", "--filter", "colour=red"], "--filter"),
        (["print", "--filter", "batch=big"], "batch must be a number"),
        (["print", "--grid", "nowhere.yaml"], "cannot read"),
        (["launch"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, problem, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]


def test_bad_grid_file_names_the_key(tmp_path, capsys):
    bad = tmp_path / "grid.yaml"
    bad.write_text(PAPER_GRID.read_text().replace("512: [1, 2, 3]", "512: []"))
    assert main(["count", "--grid", str(bad)]) == 2
    assert "batch_lrs.512" in capsys.readouterr().err


def test_paper_grid_runs_and_table_1_cells_are_the_same_216_keys():
    """Each grid run, resolved as the trainer resolves it and labelled as the report labels its
    config.yaml, fills exactly one cell of the package's table1.tsv, and every cell has its run."""
    paper, _ = load_paper_table()
    keys = []
    for run in load_grid(PAPER_GRID).runs():
        config = load_config(REPO / run.config, list(run.overrides))
        resolved = config.model_dump()
        keys.append(
            paper_key(
                RunResult(
                    task=config.task.name,
                    dataset=config.data.name,
                    model=config.model.name,
                    optimizer=optimizer_label(resolved),
                    batch=config.batch.global_batch_size,
                    lr=config.optim.lr,
                    seed=config.run.seed,
                    top1=0.0,
                )
            )
        )
    assert None not in keys
    assert len(keys) == len(set(keys)) == len(paper) == 216
    assert set(keys) == set(paper)
