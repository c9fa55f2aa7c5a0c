"""Make fixture.pt from InsightFace's own arcface_torch code (run once by hand, never in CI: it needs
their code, which this project does not copy). See README.md here for the exact run.

    PYTHONPATH=. python tests/data/insightface/make_fixture.py \
        --arcface-torch /tmp/insightface/recognition/arcface_torch --commit <their commit>
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch

from tests._insightface_util import FIXTURE, fixed_input, their_state

# our --arch name -> their get_model name (their vit_l exists only as the WebFace42M variant; the
# drop-path and mask variants of one size share one state-dict layout)
ARCHS = {"r18": "r18", "r34": "r34", "r50": "r50", "r100": "r100", "r200": "r200", "mbf": "mbf",
         "vit_t": "vit_t", "vit_s": "vit_s", "vit_b": "vit_b", "vit_l": "vit_l_dp005_mask_005"}
EMBEDDING = 512  # their configs' num_features


def timm_stand_in() -> None:
    """Their vit.py imports DropPath, to_2tuple and trunc_normal_ from timm. Without timm: our own
    stand-ins, exact in eval (timm's DropPath is the identity there; every weight is loaded over the
    initializer)."""
    if importlib.util.find_spec("timm") is not None:
        return
    import torch.nn as nn

    class DropPath(nn.Identity):
        def __init__(self, rate: float = 0.0) -> None:
            super().__init__()

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    for name in ("timm", "timm.models"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["timm.models.layers"] = layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arcface-torch", type=Path, required=True, help="their recognition/arcface_torch")
    ap.add_argument("--commit", required=True, help="the insightface commit the code is from")
    args = ap.parse_args()
    sys.path.insert(0, str(args.arcface_torch))
    timm_stand_in()
    from backbones import get_model  # their code

    torch.set_grad_enabled(False)
    archs = {}
    for i, (arch, theirs) in enumerate(ARCHS.items()):
        model = get_model(theirs, num_features=EMBEDDING, fp16=False)
        layout = [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
        seed = 1000 + i
        model.load_state_dict(their_state(layout, seed))
        embeddings = model.eval()(fixed_input(seed)).float()
        archs[arch] = {"layout": layout, "seed": seed, "embeddings": embeddings.clone()}
        print(arch, f"{sum(v.numel() for v in model.state_dict().values()):,} numbers",
              "embedding norms", [round(float(n), 3) for n in embeddings.norm(dim=1)])
    torch.save({"insightface_commit": args.commit, "torch": str(torch.__version__), "archs": archs}, FIXTURE)
    print("wrote", FIXTURE)


if __name__ == "__main__":
    main()
