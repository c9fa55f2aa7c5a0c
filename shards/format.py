"""The sample format inside a shard: keys, member names and the binary label encoding.

DALI's webdataset reader cannot batch text labels of different lengths, so the label travels as a
fixed-size little-endian int32 (`.lbl`), which both DALI (dtype INT32) and plain `webdataset`
(`np.frombuffer`) read the same way.
"""

from __future__ import annotations

import argparse
import re
import struct
from pathlib import PurePosixPath

FORMAT_NAME = "facetrain-shards"
FORMAT_VERSION = 1
EXTENSIONS = ("jpg", "lbl", "json")

# Files of a shard set: `{prefix}-{index:06d}.tar` with its DALI index `{prefix}-{index:06d}.idx`.
SHARD_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"
INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx: "v1.2 N", then one line per sample
TAR_BLOCK = 512  # tar header and padding unit (tarfile.BLOCKSIZE)
# The per-sample integrity field the writer adds to each `.json` record: CRC32 of the members.
CRC_FIELD = "crc32"
CRC_MEMBERS = ("jpg", "lbl")

# The standard 5-point template for a 112x112 crop (x, y): left eye, right eye, nose tip,
# left mouth corner, right mouth corner, as the image shows them.
TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

_LABEL = struct.Struct("<i")


def sample_key(relative_path: str) -> str:
    """Stable, unique key from a source path relative to the image root.

    The extension is dropped, `/` becomes `__` and any other `.` becomes `_`, because webdataset
    and DALI both split a member name at its first dot after the last slash. Whitespace, `~` and
    anything outside ASCII become `~` and two hex digits per UTF-8 byte (`my photos/a.jpg` ->
    `my~20photos__a`): DALI's index separates its fields by spaces and is ASCII.
    """
    rel = relative_path.replace("\\", "/")
    if _UNUSUAL.search(rel):  # empty, `.` or repeated separators: pathlib's normal form decides
        path = PurePosixPath(rel)
        stem = str(path.with_suffix("")) if path.suffix else str(path)
    else:  # the common case, as pathlib would have it, without its cost (it is per sample)
        name_at, dot = rel.rfind("/") + 1, rel.rfind(".")
        stem = rel[:dot] if name_at < dot < len(rel) - 1 else rel  # pathlib's rule for a suffix
    return _UNSAFE.sub(_escape, stem.replace("/", "__").replace(".", "_"))


_UNUSUAL = re.compile(r"(^|/)\.{0,2}(/|$)|//")  # "", "./", "/../", "a//b", "a/" ...


_UNSAFE = re.compile(r"[^\x21-\x7d]")  # all but printable, non-space ASCII, and `~` (0x7e) itself


def _escape(match: re.Match) -> str:
    return "".join(f"~{b:02x}" for b in match.group().encode("utf-8", "surrogateescape"))


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}{SHARD_SUFFIX}"


def index_name(shard_file: str) -> str:
    """The DALI index beside a shard: `x-000000.tar` -> `x-000000.idx`."""
    stem = shard_file[: -len(SHARD_SUFFIX)] if shard_file.endswith(SHARD_SUFFIX) else shard_file
    return stem + INDEX_SUFFIX


def encode_label(label: int) -> bytes:
    return _LABEL.pack(int(label))


def decode_label(data: bytes) -> int:
    if len(data) != _LABEL.size:
        raise ValueError(f"label field has {len(data)} bytes, expected {_LABEL.size}")
    return _LABEL.unpack(data)[0]


# Sides of a face crop: 16 .. 1024 px. A face recognizer's input is 96 to 224 px; a larger size is a
# typo (112 -> 11200), refused before OpenCV tries to allocate it.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 16, 1024


def parse_image_size(text: str) -> tuple[int, int]:
    """`--image-size` of the commands: N (square) or HxW, sides MIN_IMAGE_SIDE .. MAX_IMAGE_SIDE
    (an argparse type)."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, not {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < MIN_IMAGE_SIDE or max(values) > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(
            f"expected N or HxW with sides {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}, not {text!r}"
        )
    return values[0], values[1]


def scaled_template(image_size: tuple[int, int]) -> list[list[float]]:
    """The template for an (H, W) output: the 112x112 template scaled by H/112, centred across W.

    Scaling both axes alike keeps faces undistorted; a non-square size crops (or pads) the sides,
    so 112x96 gives the familiar SphereFace/CosFace template (the 112x112 one shifted 8 px left).
    """
    height, width = image_size
    scale = height / 112.0
    shift = (width - 112.0 * scale) / 2.0
    return [[x * scale + shift, y * scale] for x, y in TEMPLATE_112]
