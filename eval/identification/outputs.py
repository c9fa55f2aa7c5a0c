"""What `eval/identify.py search` writes: annotated images and videos, detections.jsonl, report.html.

detections.jsonl, one line per face found:
  {"source": input path, "frame": n or null, "box": [x, y, w, h], "identity": name or "unknown",
   "score": s, "top": [[name, score], ...]}
report.html: a summary, then each photo's faces beside the enrolled photo of the person each matched
best, with a filter by name (eval/identification/report.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from common.cli import UserError
from common.fileio import atomic_write_text
from eval.identification.faces import FoundFace, read_rgb
from eval.identification.gallery import Gallery
from eval.identification.report import Report

_KNOWN, _UNKNOWN = (60, 200, 60), (40, 40, 230)  # BGR box colours


def draw(frame_bgr: np.ndarray, faces: list[FoundFace], labels: list[dict]) -> np.ndarray:
    """Boxes, names and scores drawn onto the frame (in place; returned for convenience)."""
    scale = max(frame_bgr.shape[0] / 480, 0.4)
    for found, label in zip(faces, labels):
        x, y, w, h = (int(round(v)) for v in found.face.box)
        colour = _UNKNOWN if label["identity"] == "unknown" else _KNOWN
        cv2.rectangle(frame_bgr, (x, y), (x + w, y + h), colour, max(1, int(2 * scale)))
        text = f"{label['identity']} {label['score']:.2f}"
        cv2.putText(
            frame_bgr,
            text,
            (x, max(y - 4, 12)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5 * scale,
            colour,
            max(1, int(scale)),
            cv2.LINE_AA,
        )
    return frame_bgr


class _VideoWriter:
    def __init__(self, path: Path | None, fps: float) -> None:
        self.path, self.fps, self._writer = path, fps, None

    def write(self, frame_bgr: np.ndarray, faces: list[FoundFace], labels: list[dict]) -> None:
        if self.path is None:
            return
        if self._writer is None:
            h, w = frame_bgr.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                raise UserError(f"{self.path}: OpenCV cannot write an mp4v video here")
        self._writer.write(draw(frame_bgr.copy(), faces, labels))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


class Outputs:
    """Collects every face found; writes the files under `out` (nothing but stdout lines without it)."""

    def __init__(self, out: Path | None, gallery: Gallery, report_limit: int = 500) -> None:
        self.out, self.gallery = out, gallery
        self.faces = 0
        self.report = Report(gallery, report_limit)
        self._names: set[str] = set()
        self._videos: dict[str, Path] = {}  # source -> its annotated video
        self._jsonl = None
        if out is not None:
            try:
                out.mkdir(parents=True, exist_ok=True)
                self._jsonl = (out / "detections.jsonl").open("w", encoding="utf-8")
            except OSError as err:
                raise UserError(f"{out}: cannot write the outputs there ({err.strerror})") from None

    def _unique(self, name: str) -> Path:
        stem, suffix, n = Path(name).stem, Path(name).suffix, 1
        while name in self._names:
            n += 1
            name = f"{stem}_{n}{suffix}"
        self._names.add(name)
        return self.out / name  # type: ignore[operator]

    def add_image(self, path: Path, faces: list[FoundFace], labels: list[dict]) -> None:
        frame = None
        if self.out is not None:
            rgb = read_rgb(path)
            frame = np.ascontiguousarray(rgb[:, :, ::-1]) if rgb is not None else None
        target = None if frame is None else self._unique(f"annotated/{path.stem}.jpg")
        self._record(str(path), None, frame, faces, labels, target)
        if target is not None:
            target.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(target), draw(frame, faces, labels))

    def add_frame(
        self, source: str, n: int, frame_bgr: np.ndarray, faces: list[FoundFace], labels: list[dict]
    ) -> None:
        self._record(source, n, frame_bgr, faces, labels, self._videos.get(source))

    def video_writer(self, source: str, fps: float) -> _VideoWriter:
        path = None if self.out is None else self._unique(f"{Path(source).stem}.annotated.mp4")
        if path is not None:
            self._videos[source] = path
        return _VideoWriter(path, fps)

    def _record(
        self,
        source: str,
        frame: int | None,
        image_bgr: np.ndarray | None,
        faces: list[FoundFace],
        labels: list[dict],
        annotated: Path | None,
    ) -> None:
        for found, label in zip(faces, labels):
            self.faces += 1
            box = [round(float(v), 1) for v in found.face.box]
            rec = {
                "source": source,
                "frame": frame,
                "box": box,
                "identity": label["identity"],
                "score": label["score"],
                "top": label["top"],
            }
            where = source if frame is None else f"{source}#{frame}"
            print(f"{where}\t{label['identity']}\t{label['score']:.3f}", flush=True)
            if self._jsonl is not None:
                self._jsonl.write(json.dumps(rec) + "\n")
        if self.out is not None:
            link = None if annotated is None else PurePosixPath(annotated.relative_to(self.out).as_posix())
            self.report.add(source, frame, link, image_bgr, faces, labels)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self.out is None:
            return
        atomic_write_text(self.out / "report.html", self.report.page(), what="report")
        print(f"report: {self.out / 'report.html'}", file=sys.stderr)
