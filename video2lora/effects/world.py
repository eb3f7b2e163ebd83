"""Procedural "effects" world: simple shapes on simple backgrounds, animated by an effect.

A synthetic stand-in for the paper's effect videos, used to prove the Video2LoRA
mechanism end to end on CPU: the hypernetwork sees a reference clip showing an
effect, and must make the frozen backbone reproduce that effect on a new prompt.

* A :class:`Scene` is the *content* (shape, colour, background, position, size,
  tilt).  :func:`caption` describes only the content, never the effect.
* An *effect* is a function of time (frame index) applied while rendering the
  scene: camera warps (spin, zoom, shake), object motion (slides, melt, burst),
  colour / frame operations (colour cycle, flicker, fade, invert, pixelate, blur).
* A *compound* effect ``"motion+look"`` (``"spin+fade_out"``) applies one motion (camera or object) and one
  look (colour / frame operation) at once; held-out compounds pair parts that training saw only with other
  partners, a test of zero-shot transfer to new effects made of known parts.
* A *family point* ``"family@value"`` (``"slide@45"``, ``"hue@120"``, alone or as ``"motion+look"``) sets an
  effect's continuous parameter; six named effects are such points, rendered bit for bit the same way
  (``spin`` = ``spin@270``; :data:`.labels.FAMILY_POINTS`).
* Clips are ``float32`` arrays of shape ``(3, F, H, W)`` with pixels in ``[-1, 1]``
  (the layout of :mod:`video2lora.video_io`).

Everything is pure numpy, vectorized over frames and pixels, and deterministic
from a seed: ``make_dataset(seed, ...)`` returns identical data for the same seed
and fresh scenes for another seed.  The scenes of one effect do not depend on
which other effects are requested, so ``effects="train"`` and ``effects=None``
produce the same clips for the shared effects. Label names and sets live in :mod:`.labels`.
"""

from __future__ import annotations

import colorsys
import zlib
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from .labels import (  # noqa: F401 - re-exported: `world` is the one name callers need
    ALL_LABELS, COMBO_EVAL_SEEN, COMBO_HELDOUT, COMBO_PARTS, COMBO_TRAIN, COMBO_WORLD, COMBOS, EFFECTS, FAMILY_EVAL_SEEN,
    FAMILY_HELDOUT, FAMILY_TRAIN, FAMILY_WORLD, HELDOUT_EFFECTS, HELDOUT_FAMILIES, LOOKS, LOOK_FAMILIES,
    MOTION_FAMILIES, MOTIONS, NONE, TRAIN_EFFECTS, effect_factors, effect_parts, effect_slug, effect_split,
    family_point, held_out_family, resolve_effects,
)

__all__ = [
    "EFFECTS",
    "TRAIN_EFFECTS",
    "HELDOUT_EFFECTS",
    "NONE",
    "ALL_LABELS",
    "SHAPES",
    "COLOURS",
    "BACKGROUNDS",
    "Scene",
    "sample_scene",
    "render_clip",
    "caption",
    "make_dataset",
    "resolve_effects",
    "effect_split",
    "effect_parts",
    "effect_factors",
    "effect_slug",
    "MOTIONS",
    "LOOKS",
    "COMBOS",
    "COMBO_TRAIN",
    "COMBO_PARTS",
    "COMBO_HELDOUT",
    "COMBO_EVAL_SEEN",
    "COMBO_WORLD",
    "FAMILY_TRAIN",
    "FAMILY_HELDOUT",
    "FAMILY_EVAL_SEEN",
    "FAMILY_WORLD",
    "HELDOUT_FAMILIES",
    "held_out_family",
]

# --------------------------------------------------------------------------- content
SHAPES: list[str] = ["circle", "square", "triangle", "ring", "cross", "star", "diamond"]

#: colour name -> RGB in [0, 1]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.10, 0.90, 0.90),
}

#: background name -> (top RGB, bottom RGB); plain backgrounds have top == bottom
BACKGROUNDS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "black": ((0.02, 0.02, 0.02), (0.02, 0.02, 0.02)),
    "gray": ((0.45, 0.45, 0.45), (0.45, 0.45, 0.45)),
    "dark blue": ((0.05, 0.08, 0.35), (0.05, 0.08, 0.35)),
    "dark green": ((0.04, 0.25, 0.08), (0.04, 0.25, 0.08)),
    "maroon": ((0.35, 0.04, 0.06), (0.35, 0.04, 0.06)),
    "night gradient": ((0.00, 0.00, 0.06), (0.10, 0.25, 0.55)),
    "dusk gradient": ((0.30, 0.05, 0.30), (0.75, 0.35, 0.12)),
}

_MIN_CONTRAST = 0.5  # Euclidean RGB distance between shape colour and every background stop


@dataclass(frozen=True)
class Scene:
    """The content of a clip.  Coordinates are normalised: the frame spans
    ``[-1, 1]`` in x (right) and y (down); ``radius`` is in the same units."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float
    angle: float  # tilt of the shape, radians
    seed: int  # drives effect-internal randomness (shake path, drip profile, particles)

    def to_dict(self) -> dict:
        return asdict(self)


def _contrast_ok(colour: str, background: str) -> bool:
    c = np.asarray(COLOURS[colour])
    return all(np.linalg.norm(c - np.asarray(stop)) >= _MIN_CONTRAST for stop in BACKGROUNDS[background])


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene.  The shape sits 0.2-0.4 away from the frame centre
    (so a rotation of the view is visible even for a circle)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colours = list(COLOURS)
    backgrounds = list(BACKGROUNDS)
    while True:
        colour = colours[int(rng.integers(len(colours)))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        if _contrast_ok(colour, background):
            break
    dist = float(rng.uniform(0.2, 0.4))
    phi = float(rng.uniform(0.0, 2.0 * np.pi))
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        cx=dist * float(np.cos(phi)),
        cy=dist * float(np.sin(phi)),
        radius=float(rng.uniform(0.3, 0.5)),
        angle=float(rng.uniform(-0.35, 0.35)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def caption(scene: Scene) -> str:
    """Content-only caption, e.g. ``"a red circle on a dark blue background"``."""
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


# --------------------------------------------------------------------------- geometry
def _sdf(shape: str, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Signed distance (approx.) in units of the shape radius; negative inside."""
    if shape == "circle":
        return np.hypot(qx, qy) - 1.0
    if shape == "ring":
        return np.abs(np.hypot(qx, qy) - 0.72) - 0.28
    if shape == "square":
        return np.maximum(np.abs(qx), np.abs(qy)) - 0.82
    if shape == "diamond":
        return (np.abs(qx) + np.abs(qy) - 1.12) * 0.7071
    if shape == "triangle":  # apex up (y points down)
        r = 1.15
        d = np.maximum(qy, np.maximum(0.866 * qx - 0.5 * qy, -0.866 * qx - 0.5 * qy))
        return d - 0.5 * r
    if shape == "cross":
        ax, ay = np.abs(qx), np.abs(qy)
        return np.minimum(np.maximum(ax - 1.0, ay - 0.32), np.maximum(ax - 0.32, ay - 1.0))
    if shape == "star":  # five points, one pointing up
        theta = np.arctan2(qx, -qy)
        tri = np.abs(np.mod(theta * (5.0 / (2.0 * np.pi)), 1.0) - 0.5) * 2.0  # 1 at the tips
        edge = 0.45 + 0.7 * (1.0 - tri)
        return (np.hypot(qx, qy) - edge) * 0.6
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(name: str, y: np.ndarray) -> np.ndarray:
    """Background RGB at (source) y coords -> (..., 3)."""
    top, bottom = (np.asarray(c, np.float32) for c in BACKGROUNDS[name])
    w = np.clip((y + 1.0) * 0.5, 0.0, 1.0)[..., None]
    return top * (1.0 - w) + bottom * w


def _hsv_shift(rgb: Sequence[float], dh: float, vivid: float = 1.0) -> tuple[float, float, float]:
    """Turn the hue by dh (turns); `vivid` (0-1) lifts saturation and value towards 0.85, so that a white or grey
    shape shows the turn too (colour_cycle: fully)."""
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    if vivid >= 1.0:
        s, v = max(s, 0.85), max(v, 0.85)
    else:
        s, v = s + vivid * (max(s, 0.85) - s), v + vivid * (max(v, 0.85) - v)
    return colorsys.hsv_to_rgb((h + dh) % 1.0, s, v)


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    if sigma < 1e-3:
        return np.eye(n, dtype=np.float32)
    i = np.arange(n, dtype=np.float32)
    g = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2.0 * sigma * sigma))
    return (g / g.sum(1, keepdims=True)).astype(np.float32)


def _block_matrix(n: int, block: int) -> np.ndarray:
    idx = np.arange(n) // max(1, block)
    m = (idx[:, None] == idx[None, :]).astype(np.float32)
    return m / m.sum(1, keepdims=True)


def _smooth_noise(rng: np.random.Generator, n: int, knots: int = 6) -> np.ndarray:
    """Smooth random profile in [0, 1] over ``n`` samples."""
    k = rng.uniform(0.0, 1.0, knots + 1)
    return np.interp(np.linspace(0, knots, n), np.arange(knots + 1), k)


# --------------------------------------------------------------------------- rendering
def render_clip(scene: Scene, effect: str | None, num_frames: int = 9, size: int = 32) -> np.ndarray:
    """Render ``scene`` animated by ``effect`` (``None``/"none" = static).

    Returns float32 ``(3, num_frames, size, size)`` in ``[-1, 1]``.  Frame 0 shows
    the plain scene for most effects; the effect's strength grows with time.
    """
    effect = NONE if effect is None else effect
    parts = effect_parts(effect)
    family = dict(p for p in map(family_point, parts) if p is not None)  # {"slide": 45.0, "hue": 90.0}
    F, H = int(num_frames), int(size)
    W = H
    if F < 2 or H < 8:
        raise ValueError("need num_frames >= 2 and size >= 8")
    rng = np.random.default_rng(scene.seed)
    t = np.arange(F, dtype=np.float32)
    p = t / (F - 1)  # progress 0 -> 1

    # pixel-centre grid in normalised coords
    g = (np.arange(H, dtype=np.float32) + 0.5) / H * 2.0 - 1.0
    gy, gx = np.meshgrid(g, g, indexing="ij")  # (H, W)
    c = np.array([scene.cx, scene.cy], np.float32)

    # ---- camera: source = M_t @ (pixel - pivot_t) + pivot_t + shift_t (shape and background)
    M = np.tile(np.eye(2, dtype=np.float32), (F, 1, 1))
    pivot = np.zeros((F, 2), np.float32)
    shift = np.zeros((F, 2), np.float32)
    if "spin" in family:  # counter-clockwise on screen (spin = 270 degrees)
        th = p * float(np.deg2rad(family["spin"]))
        cs, sn = np.cos(th), np.sin(th)
        M = np.stack([np.stack([cs, -sn], -1), np.stack([sn, cs], -1)], -2).astype(np.float32)
    elif "zoom" in family:  # magnification 1 -> m about the shape: zoom_in 1 + 1.2 p, zoom_out 1 / (1 + 2 p)
        m = family["zoom"]
        mag = 1.0 + (round(m, 12) - 1.0) * p if m >= 1 else 1.0 / (1.0 + (round(1.0 / m, 12) - 1.0) * p)
        M = M / mag[:, None, None]
        pivot[:] = c
    elif "shake" in parts:
        amp = 0.25
        jx = rng.uniform(0.6, 1.0, F) * np.where(np.arange(F) % 2 == 0, 1.0, -1.0)  # alternating x
        jy = rng.uniform(-1.0, 1.0, F)
        jit = np.stack([jx, jy], -1)
        jit[0] = 0.0
        shift = (amp * jit).astype(np.float32)
    rel_x = gx[None] - pivot[:, 0, None, None]
    rel_y = gy[None] - pivot[:, 1, None, None]
    sx = M[:, 0, 0, None, None] * rel_x + M[:, 0, 1, None, None] * rel_y + pivot[:, 0, None, None] + shift[:, 0, None, None]
    sy = M[:, 1, 0, None, None] * rel_x + M[:, 1, 1, None, None] * rel_y + pivot[:, 1, None, None] + shift[:, 1, None, None]
    px = (2.0 / H) * np.sqrt(np.abs(np.linalg.det(M)))  # (F,) pixel footprint in source units
    if "wave" in family:  # rows of the view ripple sideways, more and more (the footprint barely changes)
        sx = sx + (family["wave"] * p)[:, None, None] * np.sin(3.0 * np.pi * gy + 2.0 * np.pi * p[:, None, None])

    # ---- object: position / scale of the shape in source coords
    obj_dx = np.zeros(F, np.float32)
    obj_dy = np.zeros(F, np.float32)
    obj_scale = np.ones(F, np.float32)
    obj_alpha = np.ones(F, np.float32)
    if "slide" in family:  # 1.1 along the direction, centred on the scene's position (slide_left = 180 degrees)
        a = np.deg2rad(family["slide"])
        ux, uy = round(float(np.cos(a)), 12), -round(float(np.sin(a)), 12)  # y points down; exact at right angles
        travel = -0.55 + 1.1 * p
        obj_dx, obj_dy = ux * travel, uy * travel
    elif "burst" in parts:
        obj_scale = 1.0 + 0.7 * p
        obj_alpha = 1.0 - p
    ox = sx - (c[0] + obj_dx)[:, None, None]
    oy = sy - (c[1] + obj_dy)[:, None, None]
    ca, sa = np.cos(scene.angle), np.sin(scene.angle)
    rad = scene.radius * obj_scale[:, None, None]
    qx = (ca * ox + sa * oy) / rad
    qy = (-sa * ox + ca * oy) / rad
    sdf = _sdf(scene.shape, qx, qy) * rad  # source units
    alpha = np.clip(0.5 - sdf / px[:, None, None], 0.0, 1.0) * obj_alpha[:, None, None]

    if "burst" in parts:  # particles radiating from the shape centre
        k = 8
        phi = rng.uniform(0, 2 * np.pi) + np.arange(k) * (2 * np.pi / k)
        dist = scene.radius * (0.4 + 2.4 * p)  # (F,)
        prad = scene.radius * 0.3 * (1.0 - 0.3 * p)
        pxs = c[0] + dist[:, None] * np.cos(phi)[None]  # (F, k)
        pys = c[1] + dist[:, None] * np.sin(phi)[None]
        d = np.hypot(sx[:, None] - pxs[..., None, None], sy[:, None] - pys[..., None, None]).min(1)
        pa = np.clip(0.5 - (d - prad[:, None, None]) / px[:, None, None], 0.0, 1.0)
        pa[0] = 0.0
        alpha = np.maximum(alpha, pa)

    if "melt_down" in parts:  # each column drips down by its own length
        profile = 0.35 + 0.65 * _smooth_noise(rng, W) * rng.uniform(0.7, 1.0, W)
        drip = np.rint(p[:, None] * 0.55 * H * profile[None]).astype(np.int64)  # (F, W) px
        sag = np.rint(0.3 * drip).astype(np.int64)
        src = alpha
        alpha = np.zeros_like(src)
        for s in range(int(drip.max()) + 1):
            sh = np.zeros_like(src)
            sh[:, s:, :] = src[:, : H - s, :]
            m = ((s >= sag) & (s <= drip))[:, None, :]
            alpha = np.maximum(alpha, sh * m)

    # ---- shape colour per frame
    base = np.asarray(COLOURS[scene.colour], np.float32)
    col = np.tile(base, (F, 1))
    if "colour_cycle" in parts:
        for i in range(1, F):
            col[i] = _hsv_shift(base, i / F)
    elif "hue" in family:  # the hue turns by the value over the clip (colour_cycle: 360 (F - 1) / F degrees)
        vivid = min(1.0, abs(family["hue"]) / 90.0)  # continuous in the value: hue@0 is no effect
        for i in range(1, F):
            col[i] = _hsv_shift(base, family["hue"] / 360.0 * float(p[i]), vivid)

    # ---- composite (F, H, W, 3) in [0, 1]
    bg = _background(scene.background, sy)
    img = bg * (1.0 - alpha[..., None]) + col[:, None, None, :] * alpha[..., None]
    img = np.ascontiguousarray(img.transpose(0, 3, 1, 2))  # (F, 3, H, W)

    # ---- frame operations
    if "flicker" in parts:
        img[1::2] *= 0.22
    elif "fade" in family:  # fade_out = fade@1: black at the end
        img *= (1.0 - family["fade"] * p)[:, None, None, None]
    elif "invert" in parts:
        img[F // 2 :] = 1.0 - img[F // 2 :]
    elif "pixelate" in parts:
        bmax = max(2, H // 4)
        B = np.stack([_block_matrix(H, int(round(1 + pi * (bmax - 1)))) for pi in p])[:, None]
        img = B @ img @ B.transpose(0, 1, 3, 2)  # separable block average, (F, 3, H, W)
    elif "blur_in" in parts or "blur" in family:  # blur_in: from sigma H/8 to sharp; blur@s: from sharp to s
        sigma = (1.0 - p) * (H / 8.0) if "blur_in" in parts else p * family["blur"] * H / 32.0
        G = np.stack([_gauss_matrix(H, float(si)) for si in sigma])[:, None]
        img = G @ img @ G.transpose(0, 1, 3, 2)  # separable Gaussian blur

    out = np.clip(img, 0.0, 1.0) * 2.0 - 1.0
    return np.ascontiguousarray(out.transpose(1, 0, 2, 3), dtype=np.float32)  # (3, F, H, W)


# --------------------------------------------------------------------------- datasets
def _effect_rng(seed: int, effect: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(effect.encode())])


def make_dataset(
    seed: int,
    clips_per_effect: int,
    effects: str | Iterable[str] | None = None,
    num_frames: int = 9,
    size: int = 32,
    train_labels: str | Iterable[str] = (),
) -> list[dict]:
    """``clips_per_effect`` fresh scenes per effect, each rendered with that effect. ``train_labels``: labels
    written with split "train" where `effect_split` holds them out (the compound world's parts alone).

    Each record: ``clip_id, effect, split, prompt, video`` (float32 ``(3,F,H,W)`` in
    [-1, 1]) plus the scene parameters (``shape, colour, background, cx, cy, radius,
    angle, scene_seed``).  Deterministic in ``seed``; the scenes of an effect do not
    depend on the other requested effects.
    """
    records: list[dict] = []
    names = resolve_effects(effects)
    train_labels = set(resolve_effects(train_labels)) if train_labels else set()
    if stray := sorted(train_labels - set(names)):
        raise ValueError(f"train_labels {stray} are not among the effects rendered ({len(names)} labels)")
    for effect in names:
        rng = _effect_rng(seed, effect)
        for i in range(int(clips_per_effect)):
            scene = sample_scene(rng)
            params = scene.to_dict()
            params["scene_seed"] = params.pop("seed")
            records.append(
                {
                    "clip_id": f"fx{int(seed)}-{effect}-{i:05d}",
                    "effect": effect,
                    "split": "train" if effect in train_labels else effect_split(effect),
                    "prompt": caption(scene),
                    "video": render_clip(scene, effect, num_frames=num_frames, size=size),
                    **params,
                }
            )
    return records
