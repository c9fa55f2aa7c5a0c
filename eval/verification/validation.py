"""Validation during training (the `trainer.validation.Validator` protocol): one or several pair sets,
each scored by the path eval/verify.py and eval/lfw.py take (sets.py: only the faces the pairs use,
the flip rule of eval/embed.py, the k-fold protocol), in fp32 as they run. So the figure the trainer
logs for a checkpoint is the one those commands print for it. `validation.lfw_shards` is the set
named lfw (trainer/main.py).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from common.cli import UserError
from eval.verification.sets import evaluate_set, prepare_set
from models.load import module_embedder
from shards.manifest import load_manifest

# The figures logged per set (eval/verification/metrics.py's verification_metrics).
LOGGED_KEYS = (
    "accuracy_mean",
    "accuracy_std",
    "same_accuracy",
    "diff_accuracy",
    "auc",
    "tar_at_far_1e-3",
    "threshold",
    "num_pairs",
)


class VerificationValidator:
    """Sets opened at start-up, so a bad one fails before training. One set logs its figures as they
    are named (`accuracy_mean`, `auc`, ...: an LFW-only run's metrics.jsonl); several log each as
    `<set>_accuracy_mean`, ... plus `sets_mean_accuracy`. "accuracy_mean", the figure that picks
    best.pt, is the one set's, the mean of the sets' accuracies, or the set named by `best`."""

    name = "verification"

    def __init__(
        self, sets: dict[str, str | Path], best: str = "mean", batch_size: int = 256, flip: bool = True
    ) -> None:
        if best != "mean" and best not in sets:
            raise UserError(f"validation.best: {best!r} is not mean or one of {', '.join(sets)}")
        self.prepared = [prepare_set(n, load_manifest(d)) for n, d in sets.items()]
        self.best, self.batch_size, self.flip = best, batch_size, flip

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            embed = module_embedder(model)
            results = [
                evaluate_set(embed, ps, batch_size=self.batch_size, flip=self.flip, show_progress=False)
                for ps in self.prepared
            ]
        finally:
            model.train(was_training)
        if len(results) == 1:
            return {k: results[0].metrics[k] for k in LOGGED_KEYS}
        out = {f"{r.name}_{k}": r.metrics[k] for r in results for k in LOGGED_KEYS}
        out["sets_mean_accuracy"] = sum(r.metrics["accuracy_mean"] for r in results) / len(results)
        out["accuracy_mean"] = (
            out["sets_mean_accuracy"] if self.best == "mean" else out[f"{self.best}_accuracy_mean"]
        )
        return out
