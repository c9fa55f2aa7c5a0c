"""Where the tests find real LFW (../shared/data/lfw, beside the checkout) and the reference
MobileFaceNet next to it; the tests that use them are skipped when they are absent."""

from pathlib import Path

LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"
REFERENCE = LFW.parent / "reference" / "mobilefacenet_112x96_casia.ckpt"
