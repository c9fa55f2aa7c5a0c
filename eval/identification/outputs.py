"""What `eval/identify.py search` writes: annotated images and videos, detections.jsonl, report.html.

detections.jsonl, one line per face found:
  {"source": input path, "frame": n or null, "box": [x, y, w, h], "identity": name or "unknown",
   "score": s, "top": [[name, score], ...]}
report.html is one self-contained page (thumbnails inlined as JPEG data URIs): each face beside the
enrolled photo of the person it matched best, up to `report_limit` faces.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from common.cli import UserError
from common.fileio import atomic_write_text
from eval.identification.faces import FoundFace, read_rgb
from eval.identification.gallery import Gallery

THUMB_HEIGHT = 112
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


def _thumb_uri(image_bgr: np.ndarray | None) -> str:
    if image_bgr is None or image_bgr.size == 0:
        return ""
    h, w = image_bgr.shape[:2]
    size = (max(1, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT)
    thumb = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode() if ok else ""


def _face_region(frame_bgr: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x, y, w, h = box
    m = 0.15 * max(w, h)  # a little context around the box
    x1, y1 = max(int(x - m), 0), max(int(y - m), 0)
    x2, y2 = min(int(x + w + m), frame_bgr.shape[1]), min(int(y + h + m), frame_bgr.shape[0])
    return frame_bgr[y1:y2, x1:x2]


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
        self.out, self.gallery, self.report_limit = out, gallery, report_limit
        self.faces = 0
        self._rows: list[str] = []
        self._names: set[str] = set()
        self._photo_thumbs: dict[int, str] = {}
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
        self._record(str(path), None, frame, faces, labels)
        if frame is not None:
            target = self._unique(f"annotated/{path.stem}.jpg")
            target.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(target), draw(frame, faces, labels))

    def add_frame(
        self, source: str, n: int, frame_bgr: np.ndarray, faces: list[FoundFace], labels: list[dict]
    ) -> None:
        self._record(source, n, frame_bgr, faces, labels)

    def video_writer(self, source: str, fps: float) -> _VideoWriter:
        path = None if self.out is None else self._unique(f"{Path(source).stem}.annotated.mp4")
        return _VideoWriter(path, fps)

    def _record(
        self,
        source: str,
        frame: int | None,
        image_bgr: np.ndarray | None,
        faces: list[FoundFace],
        labels: list[dict],
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
            if self.out is not None and len(self._rows) < self.report_limit and image_bgr is not None:
                self._rows.append(self._row(rec, label, _face_region(image_bgr, found.face.box)))

    def _row(self, rec: dict, label: dict, region: np.ndarray) -> str:
        photo = label["photo"]
        if photo not in self._photo_thumbs:
            rgb = read_rgb(self.gallery.photo_path(photo))
            self._photo_thumbs[photo] = _thumb_uri(None if rgb is None else rgb[:, :, ::-1])
        where = rec["source"] if rec["frame"] is None else f"{rec['source']} frame {rec['frame']}"
        top = ", ".join(f"{html.escape(n)} {s:.3f}" for n, s in rec["top"])
        below = " (below threshold)" if label["identity"] == "unknown" else ""
        matched = html.escape(label["nearest"]) + below
        return (
            f"<tr><td><img src='{_thumb_uri(region)}'></td>"
            f"<td><img src='{self._photo_thumbs[photo]}'></td>"
            f"<td><b>{html.escape(rec['identity'])}</b> {rec['score']:.3f}<br>nearest: {matched}"
            f"<br><small>{html.escape(where)}<br>top: {top}</small></td></tr>"
        )

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self.out is None:
            return
        more = self.faces - len(self._rows)
        note = f"<p>{more} more faces are in detections.jsonl.</p>" if more > 0 else ""
        page = (
            "<!doctype html><meta charset='utf-8'><title>identify report</title>"
            "<style>body{font-family:sans-serif}td{padding:4px;vertical-align:top}</style>"
            f"<h1>{self.faces} faces</h1><table><tr><th>face</th><th>matched gallery photo</th>"
            f"<th>result</th></tr>{''.join(self._rows)}</table>{note}"
        )
        atomic_write_text(self.out / "report.html", page, what="report")
        print(f"report: {self.out / 'report.html'}", file=sys.stderr)
