"""report.html of `eval/identify.py search`: one self-contained page that works offline.

It opens with a summary (photos and frames searched, faces, identified, unknown, and the faces and
photos of each person found), then lists each photo or video frame with its faces under it: the face,
the enrolled photo of the person it matched best, the result and the top candidates, and a link to the
annotated image or video. A box filters the page by person or file name (a few lines of inline
script; without script every face shows). Thumbnails are inlined as JPEG data URIs; up to `limit`
faces are shown, all are counted. Names and file names come from the user's folders: every one is
escaped, in text and in attributes alike.
"""

from __future__ import annotations

import base64
import html
from collections import Counter, defaultdict
from pathlib import PurePosixPath
from urllib.parse import quote

import cv2
import numpy as np

from eval.identification.faces import FoundFace, read_rgb
from eval.identification.gallery import Gallery

THUMB_HEIGHT = 112

_STYLE = (
    "body{font-family:sans-serif;margin:1em}td,th{padding:4px;vertical-align:top;text-align:left}"
    "section{border-top:1px solid #ccc;margin-top:1em}h2 small{font-weight:normal}"
    "table.people td:nth-child(n+2){text-align:right}"
)
# Hides the faces (and then the photos) that match neither by person nor by file name.
_FILTER_SCRIPT = """<script>
const box = document.getElementById("filter");
function apply() {
  const q = box.value.trim().toLowerCase();
  for (const s of document.querySelectorAll("section[data-source]")) {
    const bySource = s.dataset.source.toLowerCase().includes(q);
    let any = false;
    for (const r of s.querySelectorAll("tr[data-name]")) {
      r.hidden = !(bySource || r.dataset.name.toLowerCase().includes(q));
      any = any || !r.hidden;
    }
    s.hidden = !(bySource || any);
  }
}
box.addEventListener("input", apply);
document.addEventListener("click", (e) => {
  const name = e.target.dataset && e.target.dataset.filter;
  if (name !== undefined) { e.preventDefault(); box.value = name; apply(); }
});
</script>"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def thumb_uri(image_bgr: np.ndarray | None) -> str:
    """A JPEG data URI of the image scaled to THUMB_HEIGHT; "" when there is no image."""
    if image_bgr is None or image_bgr.size == 0:
        return ""
    h, w = image_bgr.shape[:2]
    size = (max(1, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT)
    thumb = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode() if ok else ""


def face_region(frame_bgr: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x, y, w, h = box
    m = 0.15 * max(w, h)  # a little context around the box
    x1, y1 = max(int(x - m), 0), max(int(y - m), 0)
    x2, y2 = min(int(x + w + m), frame_bgr.shape[1]), min(int(y + h + m), frame_bgr.shape[0])
    return frame_bgr[y1:y2, x1:x2]


class Report:
    """Collects what report.html shows, one photo or frame at a time; `page()` is the HTML."""

    def __init__(self, gallery: Gallery, limit: int = 500) -> None:
        self.gallery, self.limit = gallery, limit
        self.photos = self.frames = self.faceless = self.faces = self.shown = 0
        self.faces_of: Counter[str] = Counter()  # identity ("unknown" too) -> faces
        self.photos_of: dict[str, set[str]] = defaultdict(set)  # identity -> the photos/frames it is in
        self._sections: list[str] = []
        self._gallery_thumbs: dict[int, str] = {}

    def add(
        self,
        source: str,
        frame: int | None,
        link: PurePosixPath | None,
        image_bgr: np.ndarray | None,
        faces: list[FoundFace],
        labels: list[dict],
    ) -> None:
        """One photo (frame None) or video frame; `link`: its annotated image or video, relative to
        the page."""
        where = source if frame is None else f"{source} frame {frame}"
        if frame is None:
            self.photos += 1
            self.faceless += not faces
        else:
            self.frames += 1
        self.faces += len(faces)
        for label in labels:
            self.faces_of[label["identity"]] += 1
            self.photos_of[label["identity"]].add(where)
        rows = []
        for found, label in zip(faces, labels):
            if self.shown == self.limit:
                break
            self.shown += 1
            region = None if image_bgr is None else face_region(image_bgr, found.face.box)
            rows.append(self._row(label, region))
        if (faces and not rows) or (frame is not None and not faces):
            return  # past the limit, or a frame without faces: counted, not listed
        annotated = f" &middot; <a href='{_esc(quote(str(link)))}'>annotated</a>" if link else ""
        found_text = f"{len(faces)} face{'s' * (len(faces) != 1)}" if faces else "no face found"
        self._sections.append(
            f"<section data-source='{_esc(where)}'><h2>{_esc(where)} <small>{found_text}{annotated}"
            f"</small></h2>{'<table>' + ''.join(rows) + '</table>' if rows else ''}</section>"
        )

    def _row(self, label: dict, region: np.ndarray | None) -> str:
        photo = label["photo"]
        if photo not in self._gallery_thumbs:
            rgb = read_rgb(self.gallery.photo_path(photo))
            self._gallery_thumbs[photo] = thumb_uri(None if rgb is None else rgb[:, :, ::-1])
        top = ", ".join(f"{_esc(n)} {s:.3f}" for n, s in label["top"])
        below = " (below threshold)" if label["identity"] == "unknown" else ""
        return (
            f"<tr data-name='{_esc(label['identity'])}'><td><img src='{thumb_uri(region)}'></td>"
            f"<td><img src='{self._gallery_thumbs[photo]}'></td>"
            f"<td><b>{_esc(label['identity'])}</b> {label['score']:.3f}<br>nearest: "
            f"{_esc(label['nearest'])}{below}<br><small>top: {top}</small></td></tr>"
        )

    def _summary(self) -> str:
        unknown = self.faces_of["unknown"]
        counts = [
            ("photos", self.photos),
            ("video frames", self.frames),
            ("photos without a face", self.faceless),
            ("faces", self.faces),
            ("identified", self.faces - unknown),
            ("unknown", unknown),
        ]
        g = self.gallery
        known = sorted((n for n in self.faces_of if n != "unknown"), key=lambda n: (-self.faces_of[n], n))
        people = "".join(
            f"<tr><td><a href='#' data-filter='{_esc(n)}'>{_esc(n)}</a></td><td>{self.faces_of[n]}</td>"
            f"<td>{len(self.photos_of[n])}</td></tr>"
            for n in known
        )
        return (
            "<table class='summary'>"
            + "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in counts)
            + f"</table><p>gallery: {len(g.names)} people from {len(g.photo_paths)} photos (faces enrolled: "
            f"{_esc(g.face_policy_text)}); {len(known)} of them found.</p>"
            "<table class='people'><tr><th>person</th><th>faces</th><th>photos/frames</th></tr>"
            f"{people}</table>"
        )

    def page(self) -> str:
        more = self.faces - self.shown
        note = (
            f"<p>{more} more faces are in detections.jsonl (--report-limit {self.limit}).</p>" if more else ""
        )
        return (
            "<!doctype html><html lang='en'><meta charset='utf-8'><title>identify report</title>"
            f"<style>{_STYLE}</style><h1>identify report: {self.faces} faces</h1>{self._summary()}"
            "<p><label>filter by person or file name: <input id='filter' type='search' autocomplete='off'>"
            f"</label></p>{''.join(self._sections)}{note}{_FILTER_SCRIPT}</html>"
        )
