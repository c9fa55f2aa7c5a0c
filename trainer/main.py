"""Train a face-embedding network.

    torchrun --standalone --nproc_per_node=N trainer/main.py --config configs/X.yaml [key.sub=value ...]
    python trainer/main.py --config configs/X.yaml [key.sub=value ...]      (one process)

Overrides are YAML scalars (`optim.lr=0.05`, `run.devices=[0,1]`). The summary is printed to stdout
as one JSON line; progress and logs go to stderr; the run folder gets config.yaml, metrics.jsonl and
checkpoints/.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from shards.errors import CliParser, run_cli


def _main(argv: Sequence[str] | None = None) -> int:
    parser = CliParser(prog="trainer/main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(list(argv) if argv is not None else None)

    from trainer.config import load_config
    from trainer.engine import TrainingDiverged, train

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg)
    except TrainingDiverged as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        return 3
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
