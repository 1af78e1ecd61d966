"""Train from a config file: ``accelerate launch -m tvlars_scale.train --config C.yaml [key=value ...]``.

One process without a launcher: ``tvlars-train --config C.yaml`` (or ``python -m tvlars_scale.train``).
``--config`` also takes the name of a config shipped in the package (``--config digits``);
``--list-configs`` lists them.
``--dry-run`` builds everything for the world size it is launched with (the model on the meta
device), prints the batch plan and the resolved config, writes nothing and exits 0.
A bad config or argument prints ONE line, ``config error: <key>: <problem>``, and exits with status 2
before anything is written; so do a run directory in use by another launch and a checkpoint that
cannot be restored (``config error: checkpoint.resume: cannot restore <checkpoint>: <piece>: ...``).
Too many optimizer steps in a row with NaN/Inf gradients print one line,
``training stopped: ...``, and exit with status 3 (the last checkpoint stays intact). A SIGTERM /
SIGUSR1 saves a checkpoint at the next optimizer step and exits with status 0. An image that cannot be
read while streaming under ``data.bad_images: error`` prints one line,
``data error: unreadable image <file>: <reason> ...``, and exits with status 4 (the last checkpoint
stays intact; under several ranks the rank that read it says so; the others end when the launcher
stops them or at the collective timeout).
"""

from __future__ import annotations

import argparse
import os
import sys

from tvlars_scale.config import SHIPPED_CONFIGS, ConfigError, load_config, shipped_configs
from tvlars_scale.nonfinite import NonFiniteError


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message over two lines; we print one
        raise ConfigError("arguments", message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="tvlars-train", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--config", help="experiment YAML, or the name of a shipped one (digits: --list-configs)"
    )
    what.add_argument(
        "--list-configs", action="store_true", help="list the configs shipped in the package"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config against this launch, print the plan and the config, write nothing",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.list_configs:
            print(f"shipped in {SHIPPED_CONFIGS} (--config NAME; the grids: --grid PATH):")
            for name, description in shipped_configs().items():
                print(f"{name:24} {description}")
            return 0
        config = load_config(args.config, args.overrides)
        # Imported after validation: a config error is reported before the trainer and Accelerate
        # are imported (torch and timm are loaded already: tvlars_scale/__init__.py imports the
        # optimizers and registers them with timm).
        from tvlars_scale.data.stream_loader import UnreadableImageError
        from tvlars_scale.trainer import Trainer

        trainer = Trainer(config)
        try:
            if args.dry_run:
                trainer.dry_run()
            else:
                trainer.setup()
                trainer.train()
        except UnreadableImageError as error:
            # Only the rank that read the file knows: it says so, whatever its rank.
            print("data error: " + " ".join(str(error).split()), file=sys.stderr)
            return 4
        finally:
            trainer.close()
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike: say it once
            print(error.line(), file=sys.stderr)
        return 2

    except NonFiniteError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"training stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
