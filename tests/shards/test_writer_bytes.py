"""The shard writer's hand-made tar headers are byte for byte what `tarfile` writes, and fast paths agree."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np

from preprocess import align
from shards.format import encode_label
from shards.writer import ShardWriter, encode_sample, sample_crcs


def _tarfile_bytes(samples: list[tuple[str, bytes, int, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, jpeg, label, record in samples:
            record = {**record, "crc32": sample_crcs(jpeg, encode_label(label))}
            record_bytes = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
            for ext, data in (("jpg", jpeg), ("lbl", encode_label(label)), ("json", record_bytes)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_writer_bytes_equal_tarfile_and_index_points_at_the_data(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i, key in enumerate(["a", "n000001__0001_01", "Zoe~c3~abx__y", "k" * 97, "long" * 40, "e"]):
        size = int(rng.integers(0, 3000)) if i != 5 else 512  # 512: data ending on a block boundary
        samples.append((key, rng.bytes(size), i * 1000, {"identity": key, "n": i}))
    with ShardWriter(tmp_path / "s.tar") as writer:
        for sample in samples:
            writer.add(*sample)
        info = writer.close()
    data = (tmp_path / "s.tar").read_bytes()
    assert data == _tarfile_bytes(samples)
    assert info.bytes == len(data) and info.samples == len(samples)
    lines = (tmp_path / "s.idx").read_text().splitlines()
    assert lines[0] == f"v1.2 {len(samples)}"
    for line, (key, jpeg, label, _) in zip(lines[1:], samples):
        fields = line.split()
        for ext, off, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
            assert name == f"{key}.{ext}"
            chunk = data[int(off) : int(off) + int(size)]
            if ext == "jpg":
                assert chunk == jpeg
            elif ext == "lbl":
                assert chunk == encode_label(label)


def test_encoded_sample_is_whole_blocks():
    blob, members = encode_sample("k", b"x" * 700, 3, {"a": 1})
    assert len(blob) % 512 == 0 and [m[0] for m in members] == ["jpg", "lbl", "json"]
    assert blob[members[0][1] : members[0][1] + 700] == b"x" * 700


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The SVD form of the similarity fit (reflection excluded), as an oracle for the closed form."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    u, s, vt = np.linalg.svd(dc.T @ sc / len(src))
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / ((sc**2).sum() / len(src))
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def test_closed_form_fit_equals_umeyama_and_geometry_matches_svd():
    rng = np.random.default_rng(1)
    tpl = align.template()
    for _ in range(300):
        src = rng.uniform(0, 250, size=(5, 2))
        if rng.uniform() < 0.3:  # mirrored faces: the reflection-excluded branch
            src[:, 0] = 250 - src[:, 0]
        np.testing.assert_allclose(align.similarity_transform(src, tpl), _umeyama(src, tpl), atol=1e-9)
    line = np.stack([np.linspace(0, 100, 5), np.linspace(0, 1, 5)], 1)
    assert align.check_landmarks(line)[0] == "landmarks_collinear"
    spread = np.linalg.svd(line - line.mean(0), compute_uv=False)
    assert spread[1] / spread[0] < 0.02
