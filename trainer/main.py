"""Train a face-embedding network.

    torchrun --standalone --nproc_per_node=N trainer/main.py --config configs/X.yaml [key.sub=value ...]
    python trainer/main.py --config configs/X.yaml [key.sub=value ...]      (one process)
    python trainer/main.py --help-config      (every key: type, default, range, help)

Overrides are YAML scalars (`optim.lr=0.05`, `run.devices=[0,1]`). The summary is printed to stdout
as one JSON line; progress and logs go to stderr; the run folder gets config.yaml, metrics.jsonl and
checkpoints/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.cli import CliParser, run_cli

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.hooks import TrainerHooks
    from trainer.validation import Validator


def build_validators(cfg: TrainConfig) -> list[Validator]:
    """The evaluators the run validates with (this command module is the one place that joins the
    trainer to eval/: the engine only knows the trainer.validation.Validator protocol). Imports stay
    inside the functions so that --help answers without loading torch."""
    val = cfg.validation
    # validation.lfw_shards is shorthand for validation.sets.lfw (config.py refuses two different folders)
    sets = {"lfw": val.lfw_shards, **val.sets} if val.lfw_shards else dict(val.sets)
    if not sets:
        return []
    from eval.verification.validation import VerificationValidator

    return [VerificationValidator(sets, best=val.best, batch_size=val.batch_size)]


def run_folder_lock(run_dir: str) -> contextlib.AbstractContextManager:
    """One training per run folder: two would interleave checkpoints and metrics records. Under
    torchrun only rank 0 takes it (it alone writes there); the others wait for it in the rendezvous."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    from common.folder_lock import folder_lock

    return folder_lock(
        run_dir, "another training is using this run folder; wait for it to end or choose another run.dir"
    )


def _main(argv: Sequence[str] | None = None, hooks: TrainerHooks | None = None) -> int:
    parser = CliParser(
        prog="trainer/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="print every config key (type, default, range, help) and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.help_config:
        from trainer.config import describe_config

        print(describe_config())
        return 0

    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)  # before torch loads: a mistake answers at once
    from trainer.distributed import PeerLost
    from trainer.engine import TrainingDiverged, train

    validators = build_validators(cfg)  # opened now: a bad LFW folder fails before training
    try:
        with run_folder_lock(cfg.run.dir):
            summary = train(cfg, validators, hooks)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except PeerLost as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None, hooks: TrainerHooks | None = None) -> int:
    """`hooks`: a trainer.hooks.TrainerHooks (the tests' fault injection); None for none."""
    return run_cli(lambda a: _main(a, hooks), argv)


if __name__ == "__main__":
    raise SystemExit(main())
