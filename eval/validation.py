"""LFW-protocol validation during training (the `trainer.validation.Validator` protocol).

The same computation as `eval/lfw.py`: the manifest's pairs checked against the shards, every face
embedded once by `eval.embed.embed_shards` with the same flip rule (mirror image added), cosine
pair scores and the k-fold protocol of `eval.verification`. So the figure the trainer logs for a
checkpoint is the accuracy `eval/lfw.py` prints for it (the embedding runs in fp32, as there).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from eval.embed import embed_shards, module_embedder
from eval.pairs import manifest_pairs, shard_jpegs
from eval.verification import pair_scores, verification_metrics
from shards.errors import UserError
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
