"""Face identification: enrol a gallery of people, then find who is in photos, folders, videos or a camera.

    python eval/identify.py enrol --gallery DIR --model CKPT|M.onnx --out GALLERY.npz
    python eval/identify.py search --gallery GALLERY.npz --model CKPT|M.onnx INPUT... [--out DIR]
    python eval/identify.py search --gallery GALLERY.npz --model ... --camera 0 --max-frames 300 --out DIR

Enrol: DIR holds one folder per person (DIR/<person>/*.jpg, any number of photos each) and/or flat
files named after the person (DIR/<person>.jpg; a trailing _N, -N or " (N)" is dropped, so
alice_1.jpg and alice_2.jpg are both "alice"). Each photo is detected (preprocess/detect.py),
aligned to the template at the model's image size and embedded with its mirror image; a person's
template is the L2-normalized mean of their photos' embeddings. Of several faces in a photo, the
largest one nearest the centre is enrolled (preprocess/face_choice.py, the rule of build_shards.py
--detect); with --single-face-only such a photo is left out instead. The gallery records which.
Photos that cannot be read or show no face are listed and left out.

Search: every face found in the inputs is compared with every template (cosine similarity, one
matrix product; or FAISS with --index faiss) and labelled with the best person, or "unknown" below
the threshold. Threshold: --threshold, else the `threshold` of --metrics (an eval/lfw.py --json file),
else the one the checkpoint's LFW validation stored, else DEFAULT_THRESHOLD (0.3, a cosine
similarity: typical of margin-softmax models on aligned faces; calibrate with eval/lfw.py). Outputs
under --out: annotated images, an annotated .mp4 per video or camera, detections.jsonl (one line per
face: source, frame, box, identity, score, top), and report.html. A model with another
architecture, image size or weights than the gallery's is refused. Photos are read and detected
ahead in --workers processes (one thread each) while the faces of the last ones are embedded and
searched here, 32 or more at a time (eval/identification/matcher.py), on the cores the detectors
leave; the output is the same as photo by photo. --min-face (default 20 pixels) is the smallest face
the detector looks for: larger is faster. Videos and the camera go frame by frame.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from common.cli import CliParser, UserError, cpu_count, progress, run_cli, whole_number
from common.walk import regular_files
from eval.identification.faces import (
    IMAGE_EXTS,
    FaceModel,
    FoundFace,
    PhotoAnalyser,
    analyse_photos,
    embed_crops,
    find_faces,
    load_face_model,
    read_rgb,
    threshold_from_metrics,
)
from eval.identification.gallery import Gallery, TemplateIndex, load_gallery, person_templates, save_gallery
from eval.identification.matcher import Matcher, label_photos
from eval.identification.outputs import Outputs
from eval.verification.metrics import NonFiniteEmbeddings, check_finite
from models.load import add_model_arguments
from preprocess.detect import DEFAULT_MIN_SIZE
from preprocess.face_choice import LARGEST_CENTRAL, SINGLE_FACE_ONLY, choose_face

DEFAULT_THRESHOLD = 0.3
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
_COPY_SUFFIX = re.compile(r"(?:[_-]\d+| \(\d+\))$")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def default_workers() -> int:
    return max(1, min(cpu_count(), 8))


# ----------------------------------------------------------------------------------------- enrol


def gallery_photos(root: Path) -> list[tuple[str, Path]]:
    """(person, photo) for every photo of a gallery folder, sorted; UserError when there are none."""
    if not root.is_dir():
        raise UserError(f"{root}: gallery folder not found")
    tree = regular_files(root)  # common/walk.py: no FIFO, no link loop, no name that is not UTF-8
    for skipped in tree.skipped:
        warn(f"{root / skipped.rel}: {skipped.detail}, not enrolled")
    photos = []
    for entry in tree.paths(root):
        if entry.parent != root and entry.suffix.lower() in IMAGE_EXTS:
            photos.append((entry.relative_to(root).parts[0], entry))
        elif entry.suffix.lower() in IMAGE_EXTS:
            photos.append((_COPY_SUFFIX.sub("", entry.stem) or entry.stem, entry))
    if not photos:
        raise UserError(f"{root}: no photos (.jpg, .png, ...) in the gallery folder or its person folders")
    return photos


def enrol(args: argparse.Namespace) -> int:
    photos = gallery_photos(args.gallery)
    model = load_face_model(args.model, args.device, args.runtime)
    people: dict[str, int] = {}
    crops, person_of, paths, skipped = [], [], [], []
    found = analyse_photos([p for _, p in photos], model.info.image_size, args.workers)
    for (person, path), (_, faces) in zip(photos, found):
        rel = path.relative_to(args.gallery).as_posix()
        face, reason = _enrolled_face(faces, path, args.face_policy)
        if face is None:
            warn(f"{path}: {reason}, not enrolled")
            skipped.append((rel, reason))
            continue
        crops.append(face.crop)
        person_of.append(people.setdefault(person, len(people)))
        paths.append(rel)
    for person in sorted({p for p, _ in photos} - set(people)):
        warn(f"{person}: no usable photo, not in the gallery")
    if not crops:
        raise UserError(f"{args.gallery}: no face could be enrolled from {len(photos)} photos")
    embeddings = embed_crops(model.embed, crops, flip=not args.no_flip)
    try:
        check_finite(embeddings, {path: row for row, path in enumerate(paths)})
    except NonFiniteEmbeddings as err:
        raise UserError(f"{args.model}: {err}; no gallery written") from None
    person = np.asarray(person_of, dtype=np.int64)
    gallery = Gallery(
        list(people),
        person_templates(embeddings, person, len(people)),
        embeddings,
        person,
        paths,
        str(args.gallery.resolve()),
        model.info,
        skipped,
        args.face_policy,
    )
    save_gallery(args.out, gallery)
    summary = {
        "gallery": str(args.out),
        "people": len(people),
        "photos": len(paths),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "face_policy": args.face_policy,
        "model": model.where,
        "image_size": list(model.info.image_size),
    }
    print(json.dumps(summary))
    print(
        f"enrolled {len(people)} people from {len(paths)} photos; {len(skipped)} photos left out",
        file=sys.stderr,
    )
    return 0


def _enrolled_face(faces: list[FoundFace] | None, path: Path, policy: str) -> tuple[FoundFace | None, str]:
    """The face a gallery photo adds under `policy` (preprocess/face_choice.py), or None and why not."""
    if faces is None:
        return None, "unreadable image"
    shape: tuple[int, ...] = (0, 0)
    if len(faces) > 1:  # only then: choosing among several needs the image size
        rgb = read_rgb(path)
        shape = rgb.shape if rgb is not None else shape
    best, reject = choose_face([f.face for f in faces], shape, policy)
    if reject == "no_face":
        return None, "no face found"
    if reject == "multiple_faces":
        return None, f"{len(faces)} faces ({SINGLE_FACE_ONLY})"
    return next(f for f in faces if f.face is best), ""


# ---------------------------------------------------------------------------------------- search


def check_compatible(gallery: Gallery, model: FaceModel, gallery_path: Path) -> None:
    g, m = gallery.model, model.info
    if g.architecture != m.architecture or tuple(g.image_size) != tuple(m.image_size):
        raise UserError(
            f"{gallery_path}: enrolled with a {g.architecture} model at {g.image_size[0]}x"
            f"{g.image_size[1]}; {model.where} is {m.architecture} at {m.image_size[0]}x"
            f"{m.image_size[1]}: enrol again with this model"
        )
    if g.fingerprint != m.fingerprint:
        raise UserError(
            f"{gallery_path}: enrolled with other weights (fingerprint {g.fingerprint[:12]}, "
            f"{model.where} has {m.fingerprint[:12]}): enrol again with this model"
        )


def resolve_threshold(args: argparse.Namespace, model: FaceModel) -> tuple[float, str]:
    if args.threshold is not None:
        return args.threshold, "--threshold"
    if args.metrics is not None:
        return threshold_from_metrics(args.metrics), str(args.metrics)
    if model.threshold is not None:
        return model.threshold, "the checkpoint's LFW validation"
    return DEFAULT_THRESHOLD, "the default"


def search(args: argparse.Namespace) -> int:
    if not args.inputs and args.camera is None:
        raise UserError("search: give INPUT files or folders, or --camera N")
    images, videos = _expand_inputs(args.inputs)
    gallery = load_gallery(args.gallery)
    camera = _open_camera(args.camera) if args.camera is not None else None
    # The detection processes start first: their start-up overlaps the model's loading.
    workers = args.workers if len(images) > 1 else 0
    with PhotoAnalyser(gallery.model.image_size, workers, args.min_face) as analyser:
        matcher = _matcher(args, gallery, analyser.workers)
        outputs = Outputs(args.out, gallery, report_limit=args.report_limit)
        done = 0
        try:
            done += _search_images(images, analyser, matcher, outputs)
            analyser.close()
            for video in videos:
                done += _search_video(video, matcher, outputs, args)
            if camera is not None:
                done += _search_stream(camera, f"camera{args.camera}", matcher, outputs, args)
        finally:
            outputs.close()
    print(
        f"{outputs.faces} faces in {done} images/frames" + (f"; outputs in {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0 if done else 1


def _matcher(args: argparse.Namespace, gallery: Gallery, detectors: int) -> Matcher:
    """The model (checked against the gallery), threshold and index; the embedder takes the cores
    that the `detectors` processes, one busy core each, leave (at least one)."""
    threads = max(1, cpu_count() - detectors) if detectors else None
    model = load_face_model(args.model, args.device, args.runtime, threads)
    check_compatible(gallery, model, args.gallery)
    threshold, origin = resolve_threshold(args, model)
    index = TemplateIndex(gallery.templates, backend=args.index)
    print(
        f"{len(gallery.names)} people in {args.gallery} (faces: {gallery.face_policy_text}); "
        f"threshold {threshold:.3f} ({origin}); {index.backend} search",
        file=sys.stderr,
    )
    return Matcher(gallery, model, index, threshold, args.top_k, not args.no_flip)


def _expand_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    images, videos = [], []
    for path in inputs:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            images += [p for p in files if p.suffix.lower() in IMAGE_EXTS]
            videos += [p for p in files if p.suffix.lower() in VIDEO_EXTS]
        elif not path.is_file():
            warn(f"{path}: no such file or folder, skipped")
        elif path.suffix.lower() in VIDEO_EXTS:
            videos.append(path)
        else:
            images.append(path)  # any other file is tried as an image; unreadable ones are reported
    return images, videos


def _search_images(images: list[Path], analyser: PhotoAnalyser, matcher: Matcher, outputs: Outputs) -> int:
    """Photos are detected ahead in the analyser's processes while the faces of the last ones are
    embedded and searched together here, in batches (eval/identification/matcher.py)."""
    if not images:
        return 0
    done = 0
    with progress("[bold]search", ("faces",), unit="photo") as bar:
        task = bar.add_task("search", total=len(images), faces=0)
        for path, faces, labels in label_photos(analyser.analyse(images), matcher):
            if faces is None:
                warn(f"{path}: unreadable image, skipped")
            else:
                done += 1
                if not faces:
                    warn(f"{path}: no face found")
                outputs.add_image(path, faces, labels)
            bar.update(task, advance=1, faces=outputs.faces)
    return done


def _frames(capture: cv2.VideoCapture, max_frames: int | None) -> Iterator[tuple[int, np.ndarray]]:
    n = 0
    while max_frames is None or n < max_frames:
        ok, frame = capture.read()
        if not ok:
            return
        yield n, frame
        n += 1


def _search_stream(
    capture: cv2.VideoCapture, source: str, matcher: Matcher, outputs: Outputs, args: argparse.Namespace
) -> int:
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    writer = outputs.video_writer(source, fps)
    faces: list[FoundFace] = []
    labels: list[dict] = []
    done = 0
    try:
        for n, frame in _frames(capture, args.max_frames):
            if n % args.every == 0:  # frames in between show the last frame's boxes
                faces = find_faces(
                    np.ascontiguousarray(frame[:, :, ::-1]),
                    matcher.model.info.image_size,
                    f"{source} frame {n}",
                    args.min_face,
                )
                labels = matcher.label(faces)
                outputs.add_frame(source, n, frame, faces, labels)
                done += 1
            writer.write(frame, faces, labels)
    except KeyboardInterrupt:
        print(f"{source}: stopped at Ctrl-C", file=sys.stderr)
    finally:
        writer.close()
        capture.release()
    return done


def _search_video(path: Path, matcher: Matcher, outputs: Outputs, args: argparse.Namespace) -> int:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        warn(f"{path}: cannot be opened as a video, skipped")
        return 0
    return _search_stream(capture, str(path), matcher, outputs, args)


def _open_camera(index: int) -> cv2.VideoCapture:
    """Camera `index`, checked before and after opening: some OpenCV builds crash (a segmentation
    fault, no message) opening a camera that is not there, so on Linux its device file must exist
    first; then it must open and give a picture (the first frame is dropped)."""
    device = Path(f"/dev/video{index}")
    if sys.platform.startswith("linux") and not device.exists():
        raise UserError(f"--camera {index}: no camera {index} here ({device} does not exist)")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # no backend-by-backend warnings
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        raise UserError(f"--camera {index}: no camera {index} can be opened here")
    if not capture.read()[0]:
        capture.release()
        raise UserError(f"--camera {index}: camera {index} opens but gives no picture")
    return capture


# OpenCV's -1, "any camera", crashes some builds when there is none
_camera_number = whole_number(0, "a camera number 0, 1, ...")


# ------------------------------------------------------------------------------------------- CLI


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="identify.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CliParser)
    e = sub.add_parser("enrol", help="build GALLERY.npz from a folder of people's photos")
    e.add_argument(
        "--gallery", type=Path, required=True, help="folder: DIR/<person>/*.jpg or DIR/<person>.jpg"
    )
    e.add_argument("--out", type=Path, required=True, help="the gallery file to write (.npz)")
    several = e.add_mutually_exclusive_group()
    several.add_argument(
        "--single-face-only",
        dest="face_policy",
        action="store_const",
        const=SINGLE_FACE_ONLY,
        help="leave out a photo with several faces (listed with the reason); default: enrol the "
        "largest face nearest the centre, as build_shards.py --detect",
    )
    several.add_argument(
        "--use-largest",
        dest="face_policy",
        action="store_const",
        const=LARGEST_CENTRAL,
        help="the default, kept as an alias: of several faces, enrol the largest nearest the centre",
    )
    e.set_defaults(face_policy=LARGEST_CENTRAL)
    s = sub.add_parser("search", help="label the faces in photos, folders, videos or a camera")
    s.add_argument("inputs", nargs="*", type=Path, help="photos, folders (recursively), video files")
    s.add_argument("--gallery", type=Path, required=True, help="GALLERY.npz from enrol")
    s.add_argument("--camera", type=_camera_number, help="read camera N (stop with Ctrl-C or --max-frames)")
    s.add_argument(
        "--out", type=Path, help="folder for annotated images/videos, detections.jsonl, report.html"
    )
    s.add_argument("--threshold", type=float, help="cosine similarity below which a face is unknown")
    s.add_argument("--metrics", type=Path, help="eval/lfw.py --json file whose threshold to use")
    s.add_argument("--top-k", type=_positive, default=5, help="candidates listed per face (default 5)")
    s.add_argument(
        "--index",
        choices=("numpy", "faiss"),
        default="numpy",
        help="search backend: one numpy matrix product (default) or FAISS (faiss-cpu installed)",
    )
    s.add_argument(
        "--min-face",
        type=_positive,
        default=DEFAULT_MIN_SIZE,
        help=f"smallest face side looked for, in pixels (default {DEFAULT_MIN_SIZE}); larger is faster: "
        "40 detects 250x250 photos about 1.5x faster",
    )
    s.add_argument("--every", type=_positive, default=1, help="video: search every Nth frame (default 1)")
    s.add_argument("--max-frames", type=_positive, help="video/camera: stop after this many frames")
    s.add_argument("--report-limit", type=_positive, default=500, help="faces shown in report.html")
    for p in (e, s):
        add_model_arguments(p)
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument(
            "--workers",
            type=int,
            default=default_workers(),
            help="processes detecting faces in photos (0: in this process)",
        )
        p.add_argument("--no-flip", action="store_true", help="embed without the mirror image")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return enrol(args) if args.command == "enrol" else search(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
