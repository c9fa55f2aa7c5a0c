"""Procedural faces for the synthetic data set: one stable appearance per identity, photographed many ways.

Coordinates: a face is described in "template units", the 112x112 frame of the alignment template,
and drawn on a square canvas at `SCALE` pixels per unit with the face in the middle. A photograph is
that canvas (background clutter included) pushed through one perspective warp: a pose-like tilt of
the face plane followed by a random similarity placement inside a loose crop. The five landmarks
written out are the drawn feature positions moved by the same warp, plus detector-like noise.

The identity carries what must stay recognisable (head and jaw shape, skin tone and a texture of its
own, marks, hair, eye/brow/nose/mouth geometry and colour). Each photograph adds what must not be
(pose, expression, lighting, colour cast, blur, noise, occluders, clutter, JPEG quality). The
nuisance strengths were tuned so a trained network separates unseen identities while raw pixels and
an untrained network do not (see tests/preprocess/test_synthetic.py and the issue notes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from shards.format import TEMPLATE_112

SCALE = 1.25  # canvas pixels per template unit
CANVAS = 304  # canvas side in pixels (~243 units: covers the loosest crop with the face in the middle)
_CENTRE_T = np.array([56.0, 72.0])  # the template point put at the canvas centre
_SHIFT = 4  # fractional bits for cv2 drawing (sub-pixel feature positions)
_ONE = 1 << _SHIFT
TEMPLATE = np.array(TEMPLATE_112, dtype=np.float64)


def to_canvas(pts_t: np.ndarray) -> np.ndarray:
    return (np.asarray(pts_t, dtype=np.float64) - _CENTRE_T) * SCALE + CANVAS / 2


def _fx(p: np.ndarray) -> tuple[int, int]:
    """A canvas point as cv2's fixed-point integer pair."""
    return int(round(p[0] * _ONE)), int(round(p[1] * _ONE))


def _ellipse(
    img: np.ndarray,
    c_t,
    axes_t,
    angle: float,
    colour,
    thickness: int = -1,
    start: float = 0,
    end: float = 360,
) -> None:
    c = to_canvas(c_t)
    axes = (max(1, int(round(axes_t[0] * SCALE * _ONE))), max(1, int(round(axes_t[1] * SCALE * _ONE))))
    cv2.ellipse(img, _fx(c), axes, angle, start, end, colour, thickness, cv2.LINE_AA, _SHIFT)


def _poly(img: np.ndarray, pts_t: np.ndarray, colour, closed: bool = True, thickness: int = -1) -> None:
    pts = np.round(to_canvas(pts_t) * _ONE).astype(np.int32).reshape(-1, 1, 2)
    if thickness < 0:
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, _SHIFT)
    else:
        cv2.polylines(img, [pts], closed, colour, thickness, cv2.LINE_AA, _SHIFT)


def _mix(a, b, t: float) -> tuple[float, float, float]:
    return tuple(float(x) * (1 - t) + float(y) * t for x, y in zip(a, b))


# Skin tones (BGR) from light to dark; an identity picks a point on this line plus a hue jitter.
_SKIN_LIGHT = np.array([178.0, 200.0, 232.0])
_SKIN_DARK = np.array([52.0, 74.0, 110.0])
_HAIR = np.array(
    [
        [25, 25, 30],
        [30, 45, 75],
        [40, 80, 130],
        [90, 150, 200],
        [150, 150, 155],
        [35, 60, 140],
        [20, 20, 20],
        [60, 90, 120],
    ],
    dtype=np.float64,
)
_IRIS = np.array(
    [[30, 50, 80], [140, 110, 60], [90, 120, 70], [120, 120, 120], [20, 30, 40]], dtype=np.float64
)


@dataclass
class Identity:
    """Everything about a face that stays the same from one photograph to the next."""

    eyes: np.ndarray  # 2x2 eye centres (template units)
    nose: np.ndarray  # nose tip
    mouth: np.ndarray  # 2x2 mouth corners
    eye_size: tuple[float, float]
    eye_tilt: float
    iris: tuple[float, float, float]
    iris_r: float
    brow_gap: float
    brow_len: float
    brow_thick: int
    brow_tilt: float
    brow_arch: float
    brow_colour: tuple[float, float, float]
    nose_width: float
    nose_len: float
    lips: tuple[float, float]
    lip_colour: tuple[float, float, float]
    skin: tuple[float, float, float]
    glasses: tuple[int, tuple[float, float, float]] | None  # (shape, colour)
    base: np.ndarray  # CANVAS x CANVAS x 3 uint8: head, hair and skin texture
    mask: np.ndarray  # CANVAS x CANVAS bool: where `base` is drawn
    face_box: np.ndarray  # 4x2 corners of the face box (template units), for the loose bounding box
    box: tuple[int, int, int, int]  # y0, y1, x0, x1: where `mask` is set (copying only that is cheaper)


def make_identity(rng: np.random.Generator) -> Identity:
    u = rng.uniform
    d_spread, d_eye_y = u(-3.5, 3.5), u(-4, 3)
    eyes = TEMPLATE[:2] + np.array([[-d_spread, d_eye_y], [d_spread, d_eye_y]]) + rng.normal(0, 0.6, (2, 2))
    nose = TEMPLATE[2] + np.array([u(-1.5, 1.5), u(-4, 4) + d_eye_y * 0.3])
    m_w, m_y = u(-4.5, 4.5), u(-4, 4)
    mouth = TEMPLATE[3:] + np.array([[-m_w, m_y], [m_w, m_y]]) + rng.normal(0, 0.5, (2, 2))

    tone = u(0, 1) ** 1.2
    skin = np.clip(_SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone + rng.normal(0, 9, 3), 30, 250)
    hair = np.clip(_HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 12, 3), 5, 240)
    male = u() < 0.5

    base = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    mask_img = np.zeros((CANVAS, CANVAS), np.uint8)

    # Head outline: a super-ellipse with its own width, length, jaw taper and chin.
    cx, cy = 56 + u(-1, 1), 70 + u(-3, 3)
    a, b = u(37, 49), u(50, 63)
    power, jaw, chin = u(2.0, 3.2), u(0.62, 0.98), u(-4, 6)
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    cos, sin = np.cos(t), np.sin(t)
    xs = np.sign(cos) * np.abs(cos) ** (2 / power)
    ys = np.sign(sin) * np.abs(sin) ** (2 / power)
    lower = np.clip(ys, 0, 1)
    xs = xs * (1 - (1 - jaw) * lower**1.5)
    head = np.stack([cx + a * xs, cy + b * ys + chin * lower**3], 1)

    long_hair = u() < (0.55 if not male else 0.12)
    if long_hair:  # hair behind the head and down the sides
        # A rounded crown over the head, falling to a length of its own with a soft lower edge.
        wide, length = a + u(4, 12), cy + b * u(0.6, 1.4)
        arc = np.linspace(np.pi, 2 * np.pi, 16)
        crown = np.stack([cx + wide * np.cos(arc), cy - 6 + (b + u(4, 10)) * np.sin(arc)], 1)
        ends = np.array(
            [
                [cx + wide + u(0, 6), length],
                [cx + a * 0.5, length + u(2, 8)],
                [cx - a * 0.5, length + u(2, 8)],
                [cx - wide - u(0, 6), length],
            ]
        )
        back = np.concatenate([crown, ends])
        _poly(base, back, tuple(hair))
        _poly(mask_img, back, 255)
    # Ears, then the face.
    ear_y, ear_s = cy + u(-6, 4), (u(5, 9), u(9, 15))
    for side in (-1, 1):
        _ellipse(base, (cx + side * a * 0.97, ear_y), ear_s, 0, tuple(skin * 0.92))
        _ellipse(mask_img, (cx + side * a * 0.97, ear_y), ear_s, 0, 255)
    _poly(base, head, tuple(skin))
    _poly(mask_img, head, 255)

    # Skin texture of its own: low-frequency shading, marks, freckles, blush, stubble/beard.
    face_mask = np.zeros((CANVAS, CANVAS), np.uint8)
    _poly(face_mask, head, 255)
    grid = rng.normal(0, u(0.05, 0.14), (6, 6, 1)).astype(np.float32)
    shade = cv2.resize(grid, (CANVAS, CANVAS), interpolation=cv2.INTER_CUBIC)[..., None]
    textured = np.clip(base.astype(np.float32) * (1 + shade), 0, 255).astype(np.uint8)
    np.copyto(base, textured, where=face_mask[..., None] > 0)
    for _ in range(int(rng.integers(0, 5))):
        p = (cx + u(-a * 0.7, a * 0.7), cy + u(-b * 0.4, b * 0.7))
        _ellipse(base, p, (u(0.8, 2.2),) * 2, 0, tuple(skin * u(0.35, 0.6)))
    if u() < 0.25:
        for _ in range(int(rng.integers(20, 60))):
            side = rng.choice([-1, 1])
            p = (cx + side * u(8, 26), cy + u(-2, 14))
            _ellipse(base, p, (u(0.5, 1.1),) * 2, 0, tuple(skin * u(0.7, 0.85)))
    if u() < 0.4:
        blush = tuple(_mix(skin, (90, 90, 220), u(0.15, 0.35)))
        for side in (-1, 1):
            _ellipse(base, (cx + side * u(18, 24), cy + u(6, 12)), (u(6, 10), u(4, 7)), 0, blush)
    if male and u() < 0.45:  # beard or stubble, in the hair colour
        beard = tuple(_mix(skin, hair, u(0.35, 0.9)))
        region = np.array(
            [
                [cx - a * jaw * 0.95, cy + b * u(0.1, 0.3)],
                [cx - 12, mouth[0, 1] - u(3, 6)],
                [cx + 12, mouth[0, 1] - u(3, 6)],
                [cx + a * jaw * 0.95, cy + b * u(0.1, 0.3)],
                [cx + a * jaw * 0.5, cy + b + chin],
                [cx - a * jaw * 0.5, cy + b + chin],
            ]
        )
        layer = base.copy()
        _poly(layer, region, beard)
        np.copyto(base, layer, where=face_mask[..., None] > 0)

    # Hair on top: a cap cut by a hairline of its own height, optional fringe and side part.
    style = int(rng.integers(0, 5)) if not male else int(rng.integers(0, 4))
    if style > 0:
        line = cy - b * u(0.35, 0.65)
        crown = np.stack(
            [
                cx + (a + u(1, 5)) * np.cos(np.linspace(np.pi, 2 * np.pi, 24)),
                cy - 2 + (b + u(2, 9)) * np.sin(np.linspace(np.pi, 2 * np.pi, 24)),
            ],
            1,
        )
        part = u(-0.6, 0.6) * a
        cut = np.array(
            [[cx + a + 2, line + u(0, 10)], [cx + part, line - u(0, 8)], [cx - a - 2, line + u(0, 10)]]
        )
        if style == 3:  # fringe: the hairline comes down to the brows
            cut[:, 1] += u(8, 14)
        _poly(base, np.concatenate([crown, cut]), tuple(hair))
        _poly(mask_img, np.concatenate([crown, cut]), 255)

    brow_colour = tuple(np.clip(hair * u(0.6, 1.0), 0, 255)) if u() < 0.8 else tuple(skin * 0.45)
    iris = _IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3)
    lip = _mix(skin, (70, 60, 170), u(0.15, 0.55))
    glasses = None
    if u() < 0.15:
        glasses = (int(rng.integers(0, 2)), tuple(_HAIR[rng.integers(len(_HAIR))] * u(0.3, 1.0)))
    box = np.array([[cx - a, cy - b * 0.75], [cx + a, cy - b * 0.75], [cx + a, cy + b], [cx - a, cy + b]])
    return Identity(
        eyes=eyes,
        nose=nose,
        mouth=mouth,
        eye_size=(u(4.5, 6.8), u(1.8, 3.2)),
        eye_tilt=u(-8, 8),
        iris=tuple(np.clip(iris, 0, 255)),
        iris_r=u(1.4, 2.4),
        brow_gap=u(6.5, 11),
        brow_len=u(11, 17),
        brow_thick=int(rng.integers(2, 6)),
        brow_tilt=u(-12, 12),
        brow_arch=u(0, 3.5),
        brow_colour=brow_colour,
        nose_width=u(5, 9),
        nose_len=u(10, 20),
        lips=(u(1.2, 3.2), u(1.6, 4.2)),
        lip_colour=lip,
        skin=tuple(skin),
        glasses=glasses,
        base=base,
        mask=mask_img > 0,
        face_box=box,
        box=_bounds(mask_img),
    )


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@dataclass
class Shot:
    """One photograph's nuisance parameters."""

    yaw: float  # -1..1
    pitch: float  # -1..1
    smile: float
    mouth_open: float
    blink: bool
    brow_raise: float


def draw_face(canvas: np.ndarray, ident: Identity, shot: Shot) -> np.ndarray:
    """Draw the identity with this shot's pose-like shifts and expression; return the 5 landmarks (units)."""
    y0, y1, x0, x1 = ident.box
    np.copyto(canvas[y0:y1, x0:x1], ident.base[y0:y1, x0:x1], where=ident.mask[y0:y1, x0:x1, None])
    yaw, pitch = shot.yaw, shot.pitch
    # Features nearer the camera move more when the head turns: eyes least, nose tip most.
    eyes = ident.eyes + np.array([3.0 * yaw, 2.0 * pitch])
    nose = ident.nose + np.array([8.0 * yaw, 4.0 * pitch])
    m_shift = np.array([4.5 * yaw, 2.5 * pitch])
    centre = ident.mouth.mean(0)
    half = (ident.mouth[1] - ident.mouth[0]) / 2 * (1 + 0.12 * shot.smile)
    mouth = np.stack([centre - half, centre + half]) + m_shift
    mouth[:, 1] -= 2.5 * shot.smile

    skin = np.array(ident.skin)
    ex, ey = ident.eye_size
    for i, (x, y) in enumerate(eyes):
        tilt = ident.eye_tilt * (1 if i == 0 else -1)
        # The far eye looks narrower.
        squeeze = 1 - 0.35 * max(0.0, yaw if i == 0 else -yaw)
        if shot.blink:
            _ellipse(canvas, (x, y), (ex * squeeze, 0.6), tilt, tuple(skin * 0.4))
        else:
            _ellipse(canvas, (x, y), (ex * squeeze, ey), tilt, (235, 240, 240))
            _ellipse(canvas, (x + 1.5 * yaw, y), (ident.iris_r,) * 2, 0, ident.iris)
            _ellipse(canvas, (x + 1.5 * yaw, y), (ident.iris_r * 0.45,) * 2, 0, (15, 15, 15))
            _ellipse(canvas, (x, y), (ex * squeeze, ey), tilt, tuple(skin * 0.35), 1, 180, 360)
        # Brow: an arc above the eye; tilt mirrored so the face is roughly symmetric.
        side = -1 if i == 0 else 1
        by = y - ident.brow_gap - shot.brow_raise
        bl = ident.brow_len * squeeze
        tilt_b = math.radians(ident.brow_tilt) * side
        xs = np.linspace(-bl / 2, bl / 2, 7)
        ys = -ident.brow_arch * (1 - (2 * xs / bl) ** 2) + xs * math.tan(tilt_b) * side
        _poly(
            canvas,
            np.stack([x + xs + 0.5 * side, by + ys * side * side], 1),
            ident.brow_colour,
            closed=False,
            thickness=ident.brow_thick,
        )
    # Nose: a shaded bridge from between the eyes to the tip, nostrils either side of the tip.
    shade = tuple(skin * 0.72)
    top = eyes.mean(0) + np.array([0.0, ident.nose_len * 0.4])
    _poly(canvas, np.stack([top, nose + np.array([-ident.nose_width * 0.3, -1.0])]), shade, False, 2)
    _ellipse(canvas, nose, (ident.nose_width * 0.55, 3.0), 0, tuple(skin * 0.85))
    for side in (-1, 1):
        _ellipse(
            canvas, nose + np.array([side * ident.nose_width * 0.35, 1.5]), (1.6, 1.0), 0, tuple(skin * 0.3)
        )
    # Mouth: upper and lower lip as curved bands between the corners; open mouth shows dark inside.
    mid = mouth.mean(0)
    up, low = ident.lips
    bend = 2.0 * shot.smile
    upper = np.array(
        [
            mouth[0],
            mid + [-3, -up - 0.5],
            mid + [0, -up + 0.4],
            mid + [3, -up - 0.5],
            mouth[1],
            mid + [0, bend * 0.3],
        ]
    )
    opening = shot.mouth_open
    lower = np.array([mouth[1], mid + [0, bend + opening + low], mouth[0], mid + [0, bend * 0.3 + opening]])
    if opening > 0.5:
        _poly(
            canvas,
            np.array([mouth[0], mid + [0, bend * 0.3], mouth[1], mid + [0, bend * 0.3 + opening]]),
            (40, 30, 60),
        )
        _ellipse(canvas, mid + [0, bend * 0.3 + 0.6], (4.5, min(opening, 1.6) * 0.6), 0, (225, 230, 230))
    _poly(canvas, upper, ident.lip_colour)
    _poly(canvas, lower, tuple(np.array(ident.lip_colour) * 1.05))
    _poly(canvas, np.array([mouth[0], mid + [0, bend * 0.3], mouth[1]]), tuple(skin * 0.35), False, 1)
    if ident.glasses is not None:
        shape, colour = ident.glasses
        for x, y in eyes:
            if shape == 0:
                _ellipse(canvas, (x, y), (ex + 3, ey + 3.5), 0, colour, 2)
            else:
                _poly(
                    canvas,
                    np.array(
                        [
                            [x - ex - 3, y - ey - 3],
                            [x + ex + 3, y - ey - 3],
                            [x + ex + 3, y + ey + 3],
                            [x - ex - 3, y + ey + 3],
                        ]
                    ),
                    colour,
                    True,
                    2,
                )
        _poly(canvas, np.array([eyes[0] + [ex + 3, -1], eyes[1] + [-ex - 3, -1]]), colour, False, 2)
    return np.concatenate([eyes, nose[None], mouth])


def random_shot(rng: np.random.Generator) -> Shot:
    return Shot(
        yaw=float(np.clip(rng.normal(0, 0.4), -1, 1)),
        pitch=float(np.clip(rng.normal(0, 0.35), -1, 1)),
        smile=float(rng.uniform(-0.4, 1.0)),
        mouth_open=float(rng.uniform(0, 4.0)) if rng.uniform() < 0.3 else 0.0,
        blink=bool(rng.uniform() < 0.08),
        brow_raise=float(rng.normal(0, 1.0)),
    )


def background(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A smooth random backdrop with clutter: rectangles, discs and lines in random colours."""
    corners = rng.integers(20, 236, (2, 2, 3), dtype=np.uint8)
    cv2.resize(corners, (CANVAS, CANVAS), dst=canvas, interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(3, 12))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        kind = rng.integers(0, 3)
        p = rng.uniform(0, CANVAS, 2).astype(int)
        if kind == 0:
            q = p + rng.uniform(-120, 120, 2).astype(int)
            cv2.rectangle(canvas, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, -1)
        elif kind == 1:
            cv2.circle(canvas, tuple(int(v) for v in p), int(rng.uniform(5, 60)), colour, -1, cv2.LINE_AA)
        else:
            q = p + rng.uniform(-200, 200, 2).astype(int)
            cv2.line(
                canvas,
                tuple(int(v) for v in p),
                tuple(int(v) for v in q),
                colour,
                int(rng.integers(1, 8)),
                cv2.LINE_AA,
            )


def body(canvas: np.ndarray, ident: Identity, rng: np.random.Generator) -> None:
    """Neck and shoulders under the head, clothing in a colour of this photograph."""
    cloth = tuple(float(c) for c in rng.uniform(10, 245, 3))
    skin = np.array(ident.skin) * 0.85
    _poly(canvas, np.array([[40, 110], [72, 110], [74, 150], [38, 150]]), tuple(skin))
    w = rng.uniform(55, 80)
    _poly(
        canvas,
        np.array(
            [
                [56 - w, 200],
                [56 - w * 0.8, 148],
                [40, 140],
                [56, 146],
                [72, 140],
                [56 + w * 0.8, 148],
                [56 + w, 200],
            ]
        ),
        cloth,
    )


def occlude(canvas: np.ndarray, rng: np.random.Generator, landmarks_t: np.ndarray) -> None:
    """Things in front of the face now and then: a hand-like blob, a bar, sunglasses, a cap brim."""
    r = rng.uniform()
    colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
    if r < 0.12:  # blob over a random part of the lower face or a cheek
        p = (
            landmarks_t[rng.integers(2, 5)]
            + rng.normal(0, 8, 2)
            + [rng.choice([-1, 1]) * rng.uniform(8, 20), 6]
        )
        _ellipse(canvas, p, (rng.uniform(8, 16), rng.uniform(10, 22)), rng.uniform(0, 180), colour)
    elif r < 0.2:  # a bar across the image (a microphone, a railing)
        p = landmarks_t.mean(0) + rng.normal(0, 15, 2)
        angle = rng.uniform(0, np.pi)
        d = np.array([math.cos(angle), math.sin(angle)]) * 90
        _poly(canvas, np.stack([p - d, p + d]), colour, False, int(rng.integers(4, 12)))
    elif r < 0.27:  # sunglasses
        dark = tuple(float(c) for c in rng.uniform(0, 60, 3))
        for x, y in landmarks_t[:2]:
            _ellipse(canvas, (x, y + 1), (9, 6.5), 0, dark)
        _poly(canvas, landmarks_t[:2] + [[8, 0], [-8, 0]], dark, False, 2)
    elif r < 0.33:  # cap brim over the forehead
        y = landmarks_t[:2, 1].mean() - rng.uniform(10, 18)
        _ellipse(canvas, (56 + rng.normal(0, 4), y), (rng.uniform(40, 55), rng.uniform(5, 12)), 0, colour)


def lighting(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A directional light gradient times a colour cast, with a random exposure and contrast."""
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.0, 1.0)
    ramp = np.linspace(-1, 1, 5, dtype=np.float32)
    gx, gy = np.meshgrid(ramp, ramp)
    light = 1 + strength * 0.5 * (gx * math.cos(angle) + gy * math.sin(angle))
    cast = np.exp(rng.normal(0, 0.2, 3)).astype(np.float32) * np.float32(np.exp(rng.normal(0, 0.3)))
    gain = cv2.resize(
        (light[..., None] * cast).astype(np.float32), (CANVAS, CANVAS), interpolation=cv2.INTER_LINEAR
    )
    contrast = float(rng.uniform(0.7, 1.2))
    out = cv2.convertScaleAbs(canvas, alpha=contrast, beta=128 * (1 - contrast))
    if rng.uniform() < 0.08:  # a black-and-white photograph
        out = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return cv2.multiply(out, gain, dtype=cv2.CV_8U)


def pose_homography(rng: np.random.Generator, shot: Shot, centre: np.ndarray) -> np.ndarray:
    """3x3 homography that tilts the canvas plane about the face centre (yaw/pitch foreshortening)."""
    yaw, pitch = math.radians(22 * shot.yaw), math.radians(14 * shot.pitch)
    d = 2.2 * CANVAS  # camera distance = focal length, so the untilted plane maps to itself
    ry = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]])
    r = ry @ rx
    k = np.array([[d, 0, centre[0]], [0, d, centre[1]], [0, 0, 1]])
    plane = np.column_stack([r[:, 0], r[:, 1], [0, 0, d]])
    to_plane = np.array([[1, 0, -centre[0]], [0, 1, -centre[1]], [0, 0, 1]])
    h = k @ plane @ to_plane
    return h / h[2, 2]


def apply_h(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:3]


def placement(
    rng: np.random.Generator,
    face_c: np.ndarray,
    out_size: tuple[int, int],
    eye_px: float,
    angle_sd: float,
    shift_sd: tuple[float, float],
    centre_frac: tuple[float, float],
) -> np.ndarray:
    """3x3 similarity mapping canvas pixels to output pixels: the face centre lands near a chosen point."""
    w, h = out_size
    scale = eye_px / (35.2 * SCALE)
    angle = math.radians(float(np.clip(rng.normal(0, angle_sd), -30, 30)))
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    target = np.array(
        [w * centre_frac[0] + rng.normal(0, shift_sd[0]), h * centre_frac[1] + rng.normal(0, shift_sd[1])]
    )
    m = np.eye(3)
    m[:2, :2] = rot
    m[:2, 2] = target - rot @ face_c
    return m


_NOISE_SIGMAS = (2.0, 4.0, 7.0, 10.0)


class Photographer:
    """Renders photographs; holds a noise bank so per-image noise costs a crop, not a draw."""

    def __init__(self, seed: int) -> None:
        bank_rng = np.random.default_rng([seed, 7])
        unit = bank_rng.standard_normal((560, 560, 3)).astype(np.float32)
        self.noise = [np.round(unit * s).astype(np.int16) for s in _NOISE_SIGMAS]
        self.canvas = np.empty((CANVAS, CANVAS, 3), np.uint8)

    def photo(
        self,
        ident: Identity,
        rng: np.random.Generator,
        out_size: tuple[int, int],
        eye_px: float,
        angle_sd: float,
        shift_sd: tuple[float, float],
        centre_frac: tuple[float, float],
    ) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(JPEG bytes, 5x2 landmarks in output pixels, face box x,y,w,h)."""
        canvas = self.canvas
        background(canvas, rng)
        body(canvas, ident, rng)
        shot = random_shot(rng)
        lm_t = draw_face(canvas, ident, shot)
        occlude(canvas, rng, lm_t)
        lit = lighting(canvas, rng)
        face_c = to_canvas(lm_t.mean(0, keepdims=True))[0]
        pose = pose_homography(rng, shot, face_c)
        m = placement(rng, face_c, out_size, eye_px, angle_sd, shift_sd, centre_frac) @ pose
        w, h = out_size
        img = cv2.warpPerspective(lit, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        r = rng.uniform()
        if r < 0.35:
            sigma = rng.uniform(0.4, 1.6) * eye_px / 40
            img = cv2.GaussianBlur(img, (0, 0), sigma)
        elif r < 0.55:  # a low-resolution source, scaled up
            f = rng.uniform(0.3, 0.6)
            small = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
            img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        level = int(rng.integers(0, len(_NOISE_SIGMAS) + 1))
        if level < len(_NOISE_SIGMAS):  # the last level means no added noise
            y0, x0 = rng.integers(0, 560 - h + 1), rng.integers(0, 560 - w + 1)
            img = cv2.add(img, self.noise[level][y0 : y0 + h, x0 : x0 + w], dtype=cv2.CV_8U)
        quality = int(rng.integers(35, 96))
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # cv2 only fails here on an empty image, which would be a bug above
            raise RuntimeError("JPEG encoding failed")
        landmarks = apply_h(m, to_canvas(lm_t)) + rng.normal(0, 0.8, (5, 2))
        corners = apply_h(m, to_canvas(ident.face_box))
        x0, y0 = np.maximum(corners.min(0), 0)
        x1, y1 = np.minimum(corners.max(0), [w - 1, h - 1])
        return jpg.tobytes(), landmarks, np.array([x0, y0, x1 - x0, y1 - y0])
