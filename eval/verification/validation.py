"""Validation during training (the `trainer.validation.Validator` protocol): LFW, or several sets.

The same computation as `eval/lfw.py`: the manifest's pairs checked against the shards, every face
embedded once by `eval.embed.embed_shards` with the same flip rule (mirror image added), cosine
pair scores and the k-fold protocol of `eval.verification`. So the figure the trainer logs for a
checkpoint is the accuracy `eval/lfw.py` prints for it (the embedding runs in fp32, as there).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from common.cli import UserError
from eval.embed import embed_shards, module_embedder
from eval.verification.metrics import pair_scores, verification_metrics
from eval.verification.shard_faces import manifest_pairs, shard_jpegs
from shards.manifest import load_manifest


class LfwValidator:
    """Opened at start-up (a missing or pair-less shard folder fails before training)."""

    name = "lfw"

    def __init__(self, shards: str | Path, batch_size: int = 256, flip: bool = True) -> None:
        self.manifest = load_manifest(shards)
        if not self.manifest.pairs:
            raise UserError(f"{self.manifest.root}: validation.lfw_shards has no pairs "
                            "(build it with the lfw command)")
        self.pairs = manifest_pairs(self.manifest, shard_jpegs(self.manifest))
        self.batch_size, self.flip = batch_size, flip

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            embed = module_embedder(model)
            emb, index_of = embed_shards(embed, self.manifest, batch_size=self.batch_size, flip=self.flip,
                                         show_progress=False)
        finally:
            model.train(was_training)
        try:
            scores, same, folds = pair_scores(emb, index_of, self.pairs)
        except KeyError as err:  # the .idx listed it but the reader did not deliver it
            raise UserError(f"{self.manifest.root}: {err.args[0]} (shard and index disagree?)") from None
        try:
            return verification_metrics(scores, same, folds)
        except ValueError as err:
            raise UserError(f"{self.manifest.root}: cannot run the k-fold protocol ({err})") from None


# Per-set figures logged as <set>_<key> (eval/verify.py's table: accuracy, AUC, TAR, threshold).
SET_KEYS = ("accuracy_mean", "accuracy_std", "same_accuracy", "diff_accuracy", "auc", "tar_at_far_1e-3",
            "threshold")


class SetsValidator:
    """`validation.sets`: every set scored as `eval/verify.py` scores it (its prepare_set and
    evaluate_set, the flip rule of eval/embed.py, only the faces the pairs use), each logged as
    `<set>_accuracy_mean`, ...; "accuracy_mean" is the figure that picks best.pt: the mean of the
    sets' accuracies, or the named set's. Sets are opened at start-up, so a bad one fails before
    training."""

    name = "sets"

    def __init__(self, sets: dict[str, str | Path], best: str = "mean", batch_size: int = 256,
                 flip: bool = True) -> None:
        from eval.verify import prepare_set

        if best != "mean" and best not in sets:
            raise UserError(f"validation.best: {best!r} is not mean or one of {', '.join(sets)}")
        self.prepared = [prepare_set(n, load_manifest(d)) for n, d in sets.items()]
        self.best, self.batch_size, self.flip = best, batch_size, flip

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from eval.verify import evaluate_set

        was_training = model.training
        model.eval()
        try:
            embed = module_embedder(model)
            results = [evaluate_set(embed, ps, batch_size=self.batch_size, flip=self.flip,
                                    show_progress=False) for ps in self.prepared]
        finally:
            model.train(was_training)
        out = {f"{r.name}_{k}": r.metrics[k] for r in results for k in SET_KEYS}
        out["sets_mean_accuracy"] = sum(r.metrics["accuracy_mean"] for r in results) / len(results)
        out["accuracy_mean"] = (out["sets_mean_accuracy"] if self.best == "mean"
                                else out[f"{self.best}_accuracy_mean"])
        return out
