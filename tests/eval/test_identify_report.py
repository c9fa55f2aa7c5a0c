"""eval/identification/report.py through outputs.Outputs: report.html's summary, its grouping of faces
under their photo, the escaping of untrusted names and file names, and (with Node.js) the name filter."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from eval.identification.faces import FoundFace
from eval.identification.gallery import Gallery, ModelInfo
from eval.identification.outputs import Outputs
from preprocess.detect import Face

EVIL = "<script>alert(1)</script>"  # a person's name is whatever the gallery folder said
QUOTED = 'it\'s "x" & <b>.jpg'  # a photo's file name with quotes, an ampersand, a tag


class _Page(HTMLParser):
    """The sections (data-source, their rows' data-name, their links) and the whole page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.people: list[str] = []
        self.summary: dict[str, str] = {}
        self.scripts = 0
        self._table = ""  # the class of the table being read
        self._th: str | None = None
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append({"source": a["data-source"], "names": [], "links": []})
        elif tag == "tr" and "data-name" in a:
            self.sections[-1]["names"].append(a["data-name"])
        elif tag == "a" and "data-filter" in a:
            self.people.append(a["data-filter"])
        elif tag == "a" and self.sections:
            self.sections[-1]["links"].append(a["href"])
        elif tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._table = a.get("class") or ""
        self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._table = "" if tag == "table" else self._table

    def handle_data(self, data: str) -> None:
        if self._table != "summary":
            return
        if self._in == "th":
            self._th = data
        elif self._in == "td" and self._th is not None:
            self.summary[self._th], self._th = data, None


def _photo(path: Path, shape: tuple[int, int] = (120, 160)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((*shape, 3), 150, np.uint8))
    return path


def _gallery(tmp: Path) -> Gallery:
    names = ["ana", EVIL]
    for name in ("ana.png", "evil.png"):
        _photo(tmp / "people" / name, (80, 60))
    emb = np.eye(2, 4, dtype=np.float32)
    model = ModelInfo("tiny/4", "0" * 64, (112, 112))
    return Gallery(names, emb, emb, np.array([0, 1]), ["ana.png", "evil.png"], str(tmp / "people"), model)


def _face(x: float) -> FoundFace:
    face = Face(box=(x, 20.0, 40.0, 50.0), score=0.99, landmarks=np.zeros((5, 2)))
    return FoundFace(face, np.zeros((112, 112, 3), np.uint8))


def _label(identity: str, nearest: int, score: float) -> dict:
    names = ["ana", EVIL]
    top = [[names[nearest], score], [names[1 - nearest], score / 2]]
    return {"identity": identity, "nearest": names[nearest], "score": score, "photo": nearest, "top": top}


def _search(tmp: Path, limit: int = 500) -> tuple[str, Path]:
    """Three photos: QUOTED with EVIL and an unknown face, two.jpg with ana, empty.jpg with none."""
    out = tmp / "out"
    outputs = Outputs(out, _gallery(tmp), report_limit=limit)
    photos = [_photo(tmp / "in" / name) for name in (QUOTED, "two.jpg", "empty.jpg")]
    outputs.add_image(photos[0], [_face(10), _face(90)], [_label(EVIL, 1, 0.8), _label("unknown", 0, 0.1)])
    outputs.add_image(photos[1], [_face(50)], [_label("ana", 0, 0.7)])
    outputs.add_image(photos[2], [], [])
    outputs.close()
    return (out / "report.html").read_text(encoding="utf-8"), tmp / "in"


def test_report_opens_with_a_summary_and_groups_faces_under_their_photo(tmp_path: Path) -> None:
    page, folder = _search(tmp_path)
    parsed = _Page()
    parsed.feed(page)
    counts = {
        k: parsed.summary[k] for k in ("photos", "photos without a face", "faces", "identified", "unknown")
    }
    assert counts == {
        "photos": "3",
        "photos without a face": "1",
        "faces": "3",
        "identified": "2",
        "unknown": "1",
    }
    assert parsed.people == [EVIL, "ana"]  # every person found, most faces first then by name
    assert "2 people from 2 photos (faces enrolled: not recorded); 2 of them found" in page
    sources = [s["source"] for s in parsed.sections]
    assert sources == [str(folder / QUOTED), str(folder / "two.jpg"), str(folder / "empty.jpg")]
    assert [s["names"] for s in parsed.sections] == [[EVIL, "unknown"], ["ana"], []]
    assert "no face found" in page
    # Each photo links to its annotated image (percent-encoded), which is where the link says.
    first_link = parsed.sections[0]["links"]
    assert first_link == ["annotated/it%27s%20%22x%22%20%26%20%3Cb%3E.jpg"]
    assert (tmp_path / "out" / "annotated" / 'it\'s "x" & <b>.jpg').is_file()
    assert parsed.sections[2]["links"] == ["annotated/empty.jpg"]


def test_report_escapes_names_and_file_names_everywhere(tmp_path: Path) -> None:
    page, _ = _search(tmp_path)
    parsed = _Page()
    parsed.feed(page)
    assert parsed.scripts == 1  # the filter's own script, nothing a name brought in
    assert EVIL not in page and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as text, in the rows and the filter data
    assert "data-name='&lt;script&gt;alert(1)&lt;/script&gt;'" in page
    assert "data-filter='&lt;script&gt;alert(1)&lt;/script&gt;'" in page
    assert QUOTED not in page and "it&#x27;s &quot;x&quot; &amp; &lt;b&gt;.jpg" in page
    assert "<b>.jpg" not in page


def test_report_limit_counts_every_face_and_shows_the_first(tmp_path: Path) -> None:
    page, _ = _search(tmp_path, limit=2)
    parsed = _Page()
    parsed.feed(page)
    assert parsed.summary["faces"] == "3" and parsed.summary["identified"] == "2"
    assert [s["names"] for s in parsed.sections] == [[EVIL, "unknown"], []]  # two.jpg's face is past it
    assert "1 more faces are in detections.jsonl (--report-limit 2)" in page


# The page's filter script run by Node.js against a minimal DOM built from the parsed page.
_DOM = """
const data = JSON.parse(process.argv[1]);
const mk = (o) => ({dataset: o, hidden: false});
const sections = data.sections.map((s) => mk({source: s.source}));
sections.forEach((s, i) => { s.rows = data.sections[i].names.map((n) => mk({name: n})); });
for (const s of sections) s.querySelectorAll = () => s.rows;
const box = {value: "", listeners: {}, addEventListener(t, f) { this.listeners[t] = f; }};
global.document = {
  getElementById: () => box,
  querySelectorAll: () => sections,
  addEventListener(t, f) { this.onclick = f; },
};
eval(data.script);
const names = (rows) => rows.filter((r) => !r.hidden).map((r) => r.dataset.name);
const shown = () => sections.map((s) => (s.hidden ? null : names(s.rows)));
const results = [];
for (const q of data.queries) { box.value = q; box.listeners.input(); results.push(shown()); }
document.onclick({target: {dataset: {filter: data.click}}, preventDefault() {}});
results.push(shown());
console.log(JSON.stringify(results));
"""


@pytest.mark.skipif(
    shutil.which("node") is None, reason="Node.js (node) not found: the filter script is not run"
)
def test_the_filter_keeps_the_faces_and_photos_that_match(tmp_path: Path) -> None:
    page, _ = _search(tmp_path)
    parsed = _Page()
    parsed.feed(page)
    script = page[page.index("<script>") + len("<script>") : page.index("</script>")]
    queries = ["", "ANA", "two.jpg", "alert", "nobody"]
    for section in parsed.sections:  # the file names only: the test's own folder must not match
        section["source"] = Path(section["source"]).name
    data = {"sections": parsed.sections, "script": script, "queries": queries, "click": EVIL}
    run = subprocess.run(["node", "-e", _DOM, json.dumps(data)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    everything = [[EVIL, "unknown"], ["ana"], []]
    assert json.loads(run.stdout) == [
        everything,  # an empty box shows every photo and face
        [None, ["ana"], None],  # a person, whatever the case
        [None, ["ana"], None],  # a file name shows its photo with all its faces
        [[EVIL], None, None],  # the untrusted name is matched as plain text
        [None, None, None],
        [[EVIL], None, None],  # clicking a person in the summary filters by that name
    ]
