"""Training and evaluation readers: backends agree, exact epoch split, resume, augmentation, bad shards."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from common.cli import UserError
from shards.augment import ERASE_FILL, AugmentConfig, augment_image
from shards.loader import build_train_loader, iter_eval_batches
from shards.manifest import load_manifest
from shards.sample_index import batches_per_epoch, epoch_order
from tests._damage import member_offset
from tests._loader_util import face_like, make_shards

SIZES = [37, 50, 13]  # uneven on purpose: 100 samples
ALL_AUG = AugmentConfig(crop_scale=(0.7, 1.0), color_jitter=0.4, grayscale_p=0.5, blur_p=0.5, erase_p=0.5)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), SIZES)


@pytest.fixture(scope="module")
def manifest(shard_dir):
    return load_manifest(shard_dir)


def _collect(loader):
    xs, ys = zip(*list(loader), strict=True)
    return torch.stack(xs), torch.stack(ys)


def _reference(shard_dir):
    """key -> (label, RGB uint8) read with the plain webdataset library, independent of shards/."""
    out = {}
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    for s in wds.WebDataset(urls, shardshuffle=False):
        img = cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_COLOR_RGB)
        out[s["__key__"]] = (int(np.frombuffer(s["lbl"], "<i4")[0]), img)
    return out


def test_eval_batches_match_the_webdataset_reference(shard_dir, manifest):
    ref = _reference(shard_dir)
    keys = []
    for batch_keys, images, labels in iter_eval_batches(manifest, batch_size=32, workers=2):
        assert (
            images.dtype == torch.float32
            and labels.dtype == torch.int64
            and images.shape[1:] == (3, 112, 112)
        )
        for k, x, y in zip(batch_keys, images, labels, strict=True):
            label, rgb = ref[k]
            assert int(y) == label
            expect = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.allclose(x, expect, atol=1e-6)
        keys += batch_keys
    assert keys == list(ref)  # every sample once, in shard order (the last batch is partial: 100 = 3*32 + 4)


def test_backends_return_the_same_labels_and_pixels(manifest):
    off = AugmentConfig(flip=False)
    common = dict(batch_size=16, seed=5, workers=1, augment=off)
    x_t, y_t = _collect(build_train_loader(manifest, backend="torch", **common))
    x_d, y_d = _collect(build_train_loader(manifest, backend="dali", **common))
    assert torch.equal(y_t, y_d)
    assert (x_t - x_d).abs().max() <= 2 / 127.5  # JPEG decoders may differ by a level or two
    # and the labels are the stored ones for those samples (label == sample number % 7 here)
    loader = build_train_loader(manifest, backend="torch", **common)
    order = np.concatenate([idx for _, idx in loader.tasks()])
    assert torch.equal(y_t.flatten(), torch.from_numpy(order % 7))


@pytest.mark.parametrize(
    ("n", "world", "batch"), [(100, 2, 8), (100, 3, 7), (5, 2, 4), (64, 4, 16), (1, 1, 1)]
)
def test_epoch_order_is_an_exact_padded_split(n, world, batch):
    nb = batches_per_epoch(n, batch, world)
    parts = [
        epoch_order(n, batch_size=batch, rank=r, world_size=world, seed=1, epoch=2) for r in range(world)
    ]
    assert all(len(p) == nb * batch for p in parts)
    flat = np.concatenate(parts)
    assert set(flat.tolist()) == set(range(n))
    assert nb == math.ceil(n / (batch * world))
    assert 0 <= len(flat) - n < batch * world  # the padding never fills a whole global batch
    counts = np.bincount(flat, minlength=n)
    assert counts.max() - counts.min() <= 1 + (nb * batch * world) // n  # padding only adds repeats
    other = epoch_order(n, batch_size=batch, rank=0, world_size=world, seed=1, epoch=3)
    assert n < 4 or not np.array_equal(parts[0], other)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_continues_with_the_following_samples(manifest, backend):
    common = dict(batch_size=8, seed=11, backend=backend, workers=1, augment=ALL_AUG)
    full = build_train_loader(manifest, **common)
    full.set_epoch(4)
    x_full, y_full = _collect(full)
    resumed = build_train_loader(manifest, **common)
    resumed.set_epoch(4, start_batch=5)
    x_res, y_res = _collect(resumed)
    assert len(y_res) == len(full) - 5
    assert torch.equal(y_res, y_full[5:])
    assert torch.equal(x_res, x_full[5:])  # the augmentation draws too, with either backend (issue 18)


def _epochs(loader, plan):
    """(images, labels) of each pass in `plan`, a list of (epoch, start_batch), in one loader."""
    out = []
    for epoch, start in plan:
        loader.set_epoch(epoch, start)
        out.append(_collect(loader))
    loader.close()
    return out


# epochs in a row, then a jump back (a resume in the middle), then the epoch after it
PASSES = [(0, 0), (1, 0), (2, 0), (1, 3), (2, 0)]


@pytest.mark.parametrize("backend, source_workers", [("torch", None), ("dali", 0), ("dali", 2)])
def test_readers_kept_across_epochs_yield_what_fresh_ones_do(manifest, backend, source_workers):
    """Persistent readers (and DALI's source in worker processes) give every epoch's pass, a
    resume included, exactly the batches a loader re-created for each pass gives."""
    common = dict(batch_size=8, seed=3, backend=backend, workers=2, augment=ALL_AUG)
    kept = build_train_loader(manifest, persistent_workers=True, source_workers=source_workers, **common)
    got = _epochs(kept, PASSES)
    for (epoch, start), (x, y) in zip(PASSES, got, strict=True):
        fresh = build_train_loader(manifest, persistent_workers=False, source_workers=0, **common)
        fresh.set_epoch(epoch, start)
        x_ref, y_ref = _collect(fresh)
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref), (epoch, start)
    assert not torch.equal(got[0][1], got[1][1])  # the epochs differ


def test_torch_workers_are_the_same_processes_every_epoch(manifest):
    loader = build_train_loader(manifest, batch_size=8, backend="torch", workers=2)
    pids = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert len(list(loader)) == len(loader)
        pids.append(sorted(w.pid for w in loader._torch.loader._iterator._workers))
    assert pids[0] == pids[1] == pids[2]
    workers = loader._torch.loader._iterator._workers
    loader.close()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)


def test_dali_keeps_its_pipeline_for_the_next_epoch_only(manifest):
    loader = build_train_loader(manifest, batch_size=8, backend="dali", workers=1)
    list(loader)
    pipe = loader._dali.pipe
    loader.set_epoch(1)
    list(loader)
    assert loader._dali.pipe is pipe  # the next epoch: the same pipeline, reset
    loader.set_epoch(1, 2)
    list(loader)
    assert loader._dali.pipe is not pipe  # another position: a new one
    loader.close()


def test_backends_make_the_same_augmentation_choices(manifest):
    """Both draw from shards/augment.py per batch seed: the same flips, crop and erase boxes."""
    common = dict(batch_size=20, seed=2, workers=1)
    flip = AugmentConfig(flip=True)
    x_t, _ = _collect(build_train_loader(manifest, backend="torch", augment=flip, **common))
    x_d, _ = _collect(build_train_loader(manifest, backend="dali", augment=flip, **common))
    assert (x_t - x_d).abs().max() <= 2 / 127.5  # the same images mirrored: decoders differ by a level
    boxes = AugmentConfig(flip=False, crop_scale=(0.5, 0.9), erase_p=0.5)
    x_t, _ = _collect(build_train_loader(manifest, backend="torch", augment=boxes, **common))
    x_d, _ = _collect(build_train_loader(manifest, backend="dali", augment=boxes, **common))
    plain, _ = _collect(
        build_train_loader(manifest, backend="torch", augment=AugmentConfig(flip=False), **common)
    )
    # crops resampled by two implementations differ a little; other crops would differ a lot
    assert (x_t - x_d).abs().mean() < 0.1 * (x_t - plain).abs().mean()
    fill = ERASE_FILL / 127.5 - 1
    erased_t, erased_d = (((x - fill).abs() < 1e-6).all(dim=2) for x in (x_t, x_d))
    assert erased_t.float().mean() > 0.01  # the same boxes (a stray mid-gray pixel may differ)
    assert (erased_t != erased_d).float().mean() < 1e-3


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_augmentation_keeps_shape_dtype_range_and_a_seed_reproduces(manifest, backend, channels_last):
    common = dict(batch_size=16, backend=backend, workers=2, augment=ALL_AUG, channels_last=channels_last)
    x1, y1 = _collect(build_train_loader(manifest, seed=7, **common))
    x2, y2 = _collect(build_train_loader(manifest, seed=7, **common))
    x3, _ = _collect(build_train_loader(manifest, seed=8, **common))
    plain, _ = _collect(
        build_train_loader(manifest, seed=7, **{**common, "augment": AugmentConfig(flip=False)})
    )
    assert x1.shape == (7, 16, 3, 112, 112) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert x1.min() >= -1 and x1.max() <= 1
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert (x1 - plain).abs().mean() > 0.02  # the augmentation did something
    one = next(iter(build_train_loader(manifest, seed=7, **common)))[0]
    assert one.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_flip_is_an_exact_mirror(manifest, backend):
    common = dict(batch_size=20, seed=2, backend=backend, workers=1)
    plain, _ = _collect(build_train_loader(manifest, augment=AugmentConfig(flip=False), **common))
    flipped, _ = _collect(build_train_loader(manifest, augment=AugmentConfig(flip=True), **common))
    plain, flipped = plain.flatten(0, 1), flipped.flatten(0, 1)
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == torch.flip(plain, dims=[3])).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0.2 < mirrored.float().mean() < 0.8  # about half (the pattern is left-right asymmetric)


def test_augment_image_every_step_keeps_uint8_hwc():
    img = face_like(3)
    off = dict(flip=False)
    for cfg in [
        AugmentConfig(crop_scale=(0.5, 0.6), **off),
        AugmentConfig(color_jitter=0.5, **off),
        AugmentConfig(grayscale_p=1.0, **off),
        AugmentConfig(blur_p=1.0, **off),
        AugmentConfig(erase_p=1.0, **off),
    ]:
        out = augment_image(img, cfg, np.random.default_rng(0))
        assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    flips = [augment_image(img, AugmentConfig(), np.random.default_rng(s)) for s in range(8)]
    mirrored = [np.array_equal(f, img[:, ::-1]) for f in flips]
    assert any(mirrored) and all(m or np.array_equal(f, img) for m, f in zip(mirrored, flips, strict=True))
    gray = augment_image(img, AugmentConfig(flip=False, grayscale_p=1.0), np.random.default_rng(0))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_bad_settings_name_the_key(manifest):
    with pytest.raises(UserError, match="loader.backend"):
        build_train_loader(manifest, batch_size=4, backend="pil")
    with pytest.raises(UserError, match="augment.erase_p"):
        build_train_loader(manifest, batch_size=4, augment=AugmentConfig(erase_p=1.5))
    with pytest.raises(UserError, match="augment.crop_scale"):
        build_train_loader(manifest, batch_size=4, augment=AugmentConfig(crop_scale=(0.9, 0.2)))


def _damaged_shards(tmp_path, damage):
    """Three shards whose middle one is damaged at a sample inside it."""
    root = make_shards(tmp_path / "s", [10, 12, 9])
    bad = root / "train-000001.tar"
    name = "id000__img_00014.jpg"  # a sample inside the middle shard
    offset = member_offset(bad, name)
    if damage == "truncated":
        os.truncate(bad, offset + 100)
    else:
        with open(bad, "r+b") as f:  # same size, so the manifest's size check passes
            f.seek(offset if damage == "jpeg_bytes" else offset - 512 + 10)
            f.write(b"\x00" * 64)
    return load_manifest(root, verify="none" if damage == "truncated" else "size")


@pytest.mark.parametrize("backend", ["torch", "dali", "dali-source-workers", "eval"])
@pytest.mark.parametrize("damage", ["truncated", "jpeg_bytes", "tar_header"])
def test_a_damaged_shard_gives_an_error_naming_it(tmp_path, backend, damage):
    manifest = _damaged_shards(tmp_path, damage)
    with pytest.raises(UserError, match="train-000001.tar") as err:
        if backend == "eval":
            list(iter_eval_batches(manifest, batch_size=8, workers=1))
        else:
            kind, _, parallel = backend.partition("-")
            list(
                build_train_loader(
                    manifest, batch_size=4, backend=kind, workers=1, source_workers=2 if parallel else None
                )
            )
    assert "\n" not in str(err.value)


def _grandchildren() -> set[int]:
    """Live processes whose parent is a child of this one: the DataLoader workers (the decode
    forkserver, our child, starts them)."""
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            parent[int(d)] = int(fields[1])
    children = {pid for pid, ppid in parent.items() if ppid == os.getpid()}
    return {pid for pid, ppid in parent.items() if ppid in children}


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_a_damaged_sample_ends_the_passes_torch_workers_before_the_error_arrives(tmp_path):
    """The persistent workers of the pass that met the damaged sample are stopped with the error; left
    to the garbage collector, an abandoned pass took 5 s to shut down."""
    manifest = _damaged_shards(tmp_path, "jpeg_bytes")
    before = _grandchildren()
    with pytest.raises(UserError, match="train-000001.tar"):
        list(build_train_loader(manifest, batch_size=4, backend="torch", workers=1))
    assert not _grandchildren() - before


def test_a_truncated_shard_fails_the_manifest_check_first(tmp_path):
    root = make_shards(tmp_path / "s", [5, 6])
    os.truncate(root / "train-000000.tar", 1024)
    with pytest.raises(UserError, match="train-000000.tar"):
        load_manifest(root)


def test_uneven_sizes_and_more_workers_than_shards(tmp_path):
    root = make_shards(tmp_path / "s", [3])  # one shard, 3 samples, 4 workers
    manifest = load_manifest(root)
    loader = build_train_loader(manifest, batch_size=2, backend="torch", workers=4)
    assert len(loader) == 2 and len(list(loader)) == 2
    assert sum(len(k) for k, _, _ in iter_eval_batches(manifest, batch_size=2, workers=4)) == 3


def test_an_early_break_stops_the_prefetch_thread(manifest):
    import threading

    loader = build_train_loader(manifest, batch_size=4, backend="torch", workers=2)
    it = iter(loader)
    next(it)
    it.close()  # what a `break` in the trainer does, when the generator is collected
    assert not any(t.name == "facetrain-prefetch" and t.is_alive() for t in threading.enumerate())


def test_dali_gets_no_samples_it_cannot_batch(manifest):
    """Labels come back as int64 [B] from the 4-byte .lbl field (DALI cannot batch text labels)."""
    _, y = next(iter(build_train_loader(manifest, batch_size=5, backend="dali", workers=1)))
    assert y.shape == (5,) and y.dtype == torch.int64


def test_decode_is_rgb_with_and_without_opencvs_rgb_flag(monkeypatch):
    import cv2

    from shards import torch_pipeline

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 250  # pure red, as RGB
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    for flag in (torch_pipeline._DECODE_RGB, None):  # None: an OpenCV older than 4.10
        monkeypatch.setattr(torch_pipeline, "_DECODE_RGB", flag)
        out = np.empty_like(rgb)
        torch_pipeline.decode_into(out, jpg.tobytes(), "x")
        assert out[..., 0].mean() > 200 and out[..., 2].mean() < 30
