"""A procedurally generated "demo world": people (identities) and everyday objects at 32x32 pixels.

The world stands in for a web-scale image-text corpus so the whole SLUG pipeline (train a CLIP,
mine a forget set by name, rank layers, search a step, evaluate) runs offline in minutes on a CPU.

**Identities.** Each person is a fixed combination of shared attributes (skin tone, hair colour,
hair style, eye colour, glasses, shirt colour, background). Attribute columns are balanced, so
every attribute value is worn by several people, and any two people differ in at least
``WorldSpec.min_attribute_distance`` attributes: a model has to learn *combinations* to tell
people apart, never a single colour. Every image of a person is a fresh render with jitter in
position, scale, lighting, colour cast, pixel noise and expression (neutral, smiling, surprised).
``WorldSpec.varying`` names attributes that are *not* part of a person but drawn afresh for every
image (``("shirt", "background")``: people change clothes and are photographed in different
places, as in real photo collections); people are then told apart by the other attributes.

**Objects.** A separate set of classes (apple, bicycle, lamp, ...), each a procedurally drawn
shape and colour scheme, jittered, on varied backgrounds (table, wall, grass, gradient): the
"utility" task that unlearning a person must not damage.

**Captions** are short natural sentences from several templates; identity captions always contain
the person's full name, so a caption-mining tool finds them by name.

Everything is deterministic: an image's random stream is seeded by (world seed, split, kind,
class, index) only, PNGs are written with fixed encoder settings and tar members with a fixed
mtime/owner, so the same :class:`WorldSpec` gives byte-identical shards on any machine with the
same zlib.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from slug_pl.atomic import rebuilt_folder
from slug_pl.data.shard_writer import SLUG_OWNER, brace_pattern, shard_name, write_shards

logger = logging.getLogger(__name__)

#: Bump when the renderer, captions or layout change: invalidates cached worlds.
GENERATOR_VERSION = 1

# -- names ---------------------------------------------------------------------------------------

_FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hugo", "Ingrid", "Jonas",
    "Keiko", "Liam", "Maya", "Nikolai", "Olivia", "Pablo", "Quinn", "Rosa", "Samir", "Tara",
    "Umar", "Vera", "Wesley", "Ximena", "Yusuf", "Zoe", "Aria", "Benedikt", "Carmen", "Dmitri",
    "Esther", "Felix", "Greta", "Hassan", "Isla", "Joaquin", "Kira", "Lorenzo", "Mei", "Nadia",
)
_SURNAMES = (
    "Moreau", "Schmidt", "Okafor", "Tanaka", "Rossi", "Novak", "Fernandes", "Lindqvist",
    "Kowalski", "Haddad", "Nguyen", "Petrov", "Costa", "Brennan", "Dubois", "Yilmaz", "Sato",
    "Andersen", "Mendoza", "Keller", "Larsen", "Romero", "Fischer", "Osei", "Ivanova", "Castillo",
    "Bianchi", "Horvat", "Nakamura", "Silva", "Gallagher", "Moretti", "Svensson", "Kaplan",
    "Duarte", "Weber", "Abara", "Laurent", "Park", "Hale",
)

MAX_IDENTITIES = min(len(_FIRST_NAMES), len(_SURNAMES))

# -- identity attributes (value -> RGB in [0, 1] where it is a colour) ----------------------------

SKIN_TONES = {
    "fair": (0.96, 0.84, 0.74),
    "tan": (0.87, 0.68, 0.52),
    "brown": (0.66, 0.46, 0.32),
    "dark": (0.42, 0.28, 0.19),
}
HAIR_COLOURS = {
    "black": (0.08, 0.07, 0.07),
    "brown": (0.42, 0.25, 0.12),
    "blonde": (0.93, 0.80, 0.42),
    "red": (0.78, 0.28, 0.10),
    "grey": (0.66, 0.66, 0.68),
}
HAIR_STYLES = ("short", "long", "bun", "spiky", "fringe")
EYE_COLOURS = {
    "brown": (0.35, 0.20, 0.08),
    "blue": (0.15, 0.45, 0.95),
    "green": (0.15, 0.65, 0.25),
}
GLASSES = ("none", "glasses")
SHIRT_COLOURS = {
    "red": (0.80, 0.15, 0.15),
    "blue": (0.15, 0.30, 0.80),
    "green": (0.20, 0.62, 0.25),
    "yellow": (0.92, 0.80, 0.18),
}
# background value -> (pattern, colour a, colour b)
BACKGROUNDS = {
    "grey wall": ("plain", (0.62, 0.62, 0.64), (0.52, 0.52, 0.55)),
    "blue stripes": ("stripes", (0.55, 0.68, 0.90), (0.85, 0.90, 0.97)),
    "green checks": ("checks", (0.55, 0.78, 0.55), (0.86, 0.94, 0.84)),
    "peach dots": ("dots", (0.98, 0.82, 0.68), (0.80, 0.50, 0.40)),
    "purple gradient": ("gradient", (0.62, 0.45, 0.78), (0.92, 0.86, 0.96)),
}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin": tuple(SKIN_TONES),
    "hair_colour": tuple(HAIR_COLOURS),
    "hair_style": HAIR_STYLES,
    "eye_colour": tuple(EYE_COLOURS),
    "glasses": GLASSES,
    "shirt": tuple(SHIRT_COLOURS),
    "background": tuple(BACKGROUNDS),
}

EXPRESSIONS = ("neutral", "smiling", "surprised")

# -- objects ---------------------------------------------------------------------------------------

#: class name -> (article, caption adjective)
_OBJECTS = {
    "apple": ("an", "red"),
    "banana": ("a", "ripe"),
    "bicycle": ("a", "red"),
    "lamp": ("a", "desk"),
    "car": ("a", "blue"),
    "tree": ("a", "leafy"),
    "house": ("a", "small"),
    "mug": ("a", "pink"),
    "clock": ("a", "round"),
    "umbrella": ("an", "open"),
    "fish": ("a", "orange"),
    "key": ("a", "golden"),
}
MAX_OBJECTS = len(_OBJECTS)

OBJECT_BACKGROUNDS = ("table", "wall", "grass", "gradient")

# -- prompt templates for zero-shot classification (class name in "{}") --------------------------

IDENTITY_TEMPLATES = (
    "a photo of {}.",
    "a portrait of {}.",
    "a close-up photo of {}.",
    "a picture of {}.",
)
OBJECT_TEMPLATES = (
    "a photo of the {}.",
    "a close-up photo of the {}.",
    "a picture of the {}.",
)


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines a demo world. Equal specs give byte-identical worlds.

    Counts are images per class: ``identity_corpus`` training pairs per person,
    ``identity_val`` / ``identity_test`` held-out labelled images per person; the same for
    objects. ``shard_size`` is samples per tar shard. ``min_attribute_distance``: any two people
    differ in at least this many of their fixed attributes. ``varying``: attributes drawn afresh
    for every image instead of being part of a person (names from :data:`ATTRIBUTES`; default
    none, every attribute is fixed per person).
    """

    seed: int = 0
    n_identities: int = 20
    identity_corpus: int = 60
    identity_val: int = 15
    identity_test: int = 15
    n_objects: int = 10
    object_corpus: int = 160
    object_val: int = 20
    object_test: int = 20
    image_size: int = 32
    shard_size: int = 1000
    min_attribute_distance: int = 3
    varying: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "varying", tuple(self.varying))  # a list from JSON or YAML
        unknown = [a for a in self.varying if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"varying: unknown attribute(s) {unknown}; the world's attributes are "
                             f"{', '.join(ATTRIBUTES)}")
        if len(set(self.varying)) != len(self.varying) or len(self.varying) > len(ATTRIBUTES) - 2:
            raise ValueError(f"varying must name distinct attributes and leave at least two fixed per "
                             f"person, got {list(self.varying)}")
        if not 20 <= self.n_identities <= MAX_IDENTITIES:
            raise ValueError(
                f"n_identities must be in [20, {MAX_IDENTITIES}], got {self.n_identities}")
        if not 1 <= self.n_objects <= MAX_OBJECTS:
            raise ValueError(f"n_objects must be in [1, {MAX_OBJECTS}], got {self.n_objects}")
        for field in ("identity_corpus", "identity_val", "identity_test", "object_corpus",
                      "object_val", "object_test"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 1 <= self.min_attribute_distance <= len(self.fixed):
            raise ValueError(f"min_attribute_distance must be in [1, {len(self.fixed)}] (the number "
                             f"of fixed attributes)")

    @property
    def fixed(self) -> tuple[str, ...]:
        """The attributes that make up a person (all but ``varying``), in :data:`ATTRIBUTES` order."""
        return tuple(k for k in ATTRIBUTES if k not in self.varying)


def spec_record(spec: WorldSpec) -> dict:
    """``spec`` as a JSON-ready dict for world records and cache keys. ``varying`` appears only when
    set, so the records (and caches) of worlds made before it existed stay valid."""
    record = dataclasses.asdict(spec)
    if spec.varying:
        record["varying"] = list(spec.varying)
    else:
        del record["varying"]
    return record


# ================================================================================================
# names and attributes
# ================================================================================================


def identity_names(spec: WorldSpec = WorldSpec()) -> list[str]:
    """``spec.n_identities`` distinct "First Last" names, in label order (deterministic in seed).

    First names and surnames are each used at most once, so a first name alone identifies a
    person too (caption mining by name never confuses two people).
    """
    rng = np.random.default_rng([spec.seed, 101])
    first = rng.permutation(len(_FIRST_NAMES))[: spec.n_identities]
    last = rng.permutation(len(_SURNAMES))[: spec.n_identities]
    return [f"{_FIRST_NAMES[i]} {_SURNAMES[j]}" for i, j in zip(first, last)]


def object_names(spec: WorldSpec = WorldSpec()) -> list[str]:
    """``spec.n_objects`` object class names, in label order (fixed order, independent of seed)."""
    return list(_OBJECTS)[: spec.n_objects]


def _violations(table: np.ndarray, min_dist: int) -> int:
    same = (table[:, None, :] == table[None, :, :]).sum(-1)
    dist = table.shape[1] - same
    iu = np.triu_indices(table.shape[0], k=1)
    return int((np.maximum(min_dist - dist[iu], 0)).sum())


def identity_attributes(spec: WorldSpec = WorldSpec()) -> list[dict[str, str]]:
    """Fixed attributes of each identity (``spec.fixed``), in label order.

    Each attribute column is balanced (values used equally often, +-1, so each value is shared by
    at least two people when ``n_identities >= 2 * len(values)``), then entries are swapped
    within columns until every pair of people differs in ``min_attribute_distance`` attributes.
    """
    n = spec.n_identities
    keys = list(spec.fixed)
    sizes = [len(ATTRIBUTES[k]) for k in keys]
    rng = np.random.default_rng([spec.seed, 202])
    table = np.stack(
        [rng.permutation(np.arange(n) % size) for size in sizes], axis=1
    )  # (n, A) value indices
    bad = _violations(table, spec.min_attribute_distance)
    for _ in range(200_000):
        if bad == 0:
            break
        i, j = rng.choice(n, size=2, replace=False)
        a = int(rng.integers(len(keys)))
        if table[i, a] == table[j, a]:
            continue
        table[[i, j], a] = table[[j, i], a]
        new_bad = _violations(table, spec.min_attribute_distance)
        if new_bad <= bad:
            bad = new_bad
        else:
            table[[i, j], a] = table[[j, i], a]
    if bad:
        raise RuntimeError(
            f"could not give {n} identities pairwise attribute distance >= "
            f"{spec.min_attribute_distance}; lower WorldSpec.min_attribute_distance"
        )
    return [{k: ATTRIBUTES[k][table[i, a]] for a, k in enumerate(keys)} for i in range(n)]


# ================================================================================================
# rendering (numpy, drawn at 2x and box-filtered down: anti-aliased and deterministic)
# ================================================================================================

_SS = 2  # supersampling factor


class _Canvas:
    """An RGB float canvas with coordinates in "design units": the image spans [0, 32)^2."""

    def __init__(self, size: int):
        self.size = size
        n = size * _SS
        grid = (np.arange(n, dtype=np.float64) + 0.5) * (32.0 / n)
        self.y, self.x = np.meshgrid(grid, grid, indexing="ij")
        self.img = np.zeros((n, n, 3), dtype=np.float64)

    def fill(self, mask: np.ndarray, colour) -> None:
        self.img[mask] = np.asarray(colour, dtype=np.float64)

    def result(self) -> np.ndarray:
        n = self.size
        return self.img.reshape(n, _SS, n, _SS, 3).mean(axis=(1, 3))


def _ellipse(u, v, cx, cy, rx, ry):
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0


def _segment(u, v, p, q, width):
    """Points within width/2 of the segment p-q."""
    (px, py), (qx, qy) = p, q
    dx, dy = qx - px, qy - py
    t = np.clip(((u - px) * dx + (v - py) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return (u - px - t * dx) ** 2 + (v - py - t * dy) ** 2 <= (width / 2) ** 2


def _jitter_colour(rng, colour, amount):
    return np.clip(np.asarray(colour) + rng.normal(0.0, amount, 3), 0.0, 1.0)


def _finish(rng, img: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Lighting (brightness, side light, colour cast), pixel noise, quantization to uint8."""
    brightness = rng.uniform(0.80, 1.15)
    side = rng.uniform(-0.15, 0.15)
    cast = 1.0 + rng.normal(0.0, 0.04, 3)
    xs = x[:: _SS, :: _SS] if x.shape[0] != img.shape[0] else x
    light = brightness * (1.0 + side * (xs - 16.0) / 16.0)
    out = img * light[..., None] * cast
    out = out + rng.normal(0.0, rng.uniform(0.01, 0.04), out.shape)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def _draw_face_background(c: _Canvas, rng, value: str) -> None:
    pattern, a, b = BACKGROUNDS[value]
    a, b = _jitter_colour(rng, a, 0.03), _jitter_colour(rng, b, 0.03)
    x, y = c.x + rng.uniform(0, 8), c.y + rng.uniform(0, 8)
    c.fill(np.ones_like(c.x, dtype=bool), a)
    if pattern == "plain":
        t = (c.y / 32.0)[..., None]
        c.img = c.img * (1 - 0.5 * t) + b * 0.5 * t
    elif pattern == "stripes":
        c.fill((x % 6.0) < 3.0, b)
    elif pattern == "checks":
        c.fill(((x // 4.0) + (y // 4.0)) % 2 == 0, b)
    elif pattern == "dots":
        c.fill(((x % 6.0) - 3.0) ** 2 + ((y % 6.0) - 3.0) ** 2 <= 1.4**2, b)
    elif pattern == "gradient":
        t = ((c.x + c.y) / 64.0)[..., None]
        c.img = c.img * (1 - t) + b * t


def render_identity(spec: WorldSpec, attributes: dict[str, str], rng: np.random.Generator,
                    expression: str) -> np.ndarray:
    """One portrait of a person with ``attributes``: uint8 array (size, size, 3)."""
    c = _Canvas(spec.image_size)
    _draw_face_background(c, rng, attributes["background"])
    s = rng.uniform(0.88, 1.10)
    cx, cy = 16.0 + rng.uniform(-2.0, 2.0), 15.5 + rng.uniform(-1.5, 1.5)
    u, v = (c.x - cx) / s, (c.y - cy) / s
    skin = _jitter_colour(rng, SKIN_TONES[attributes["skin"]], 0.025)
    hair = _jitter_colour(rng, HAIR_COLOURS[attributes["hair_colour"]], 0.03)
    shirt = _jitter_colour(rng, SHIRT_COLOURS[attributes["shirt"]], 0.03)
    eye = EYE_COLOURS[attributes["eye_colour"]]
    style = attributes["hair_style"]
    head = _ellipse(u, v, 0.0, 0.0, 7.0, 8.5)

    # behind the head: long hair, shirt, neck
    if style == "long":
        c.fill(_ellipse(u, v, 0.0, 0.5, 9.0, 10.5) & (v < 10.5), hair)
    c.fill(_ellipse(u, v, 0.0, 17.5, 12.5, 7.5), shirt)
    c.fill((np.abs(u) < 2.6) & (v > 5.0) & (v < 11.0), skin * 0.88)
    if style == "long":  # hair falls over the shoulders in front of the shirt
        c.fill((np.abs(u) > 5.5) & (np.abs(u) < 9.0) & (v > 6.0) & (v < 12.5), hair)
    # ears and face
    c.fill(_ellipse(np.abs(u), v, 7.0, 0.5, 1.3, 2.0), skin * 0.93)
    c.fill(head, skin)
    # hair on top
    cap = _ellipse(u, v, 0.0, -0.6, 7.6, 9.0) & (v < -4.2)
    if style == "bun":
        c.fill(_ellipse(u, v, 0.0, -10.2, 3.0, 2.6), hair)
    if style == "spiky":
        tooth = 1.0 - np.abs(((u + 8.0) % 3.0) - 1.5) / 1.5
        c.fill((np.abs(u) < 7.0) & (v < -5.5) & (v > -10.0 - 2.8 * tooth), hair)
    if style == "fringe":
        cap = cap | (head & (v < -1.5 - 0.45 * (u + 7.0)))
    c.fill(cap, hair)
    # eyes
    for side in (-1.0, 1.0):
        c.fill(_ellipse(u, v, 3.0 * side, -0.8, 1.9, 1.3), (0.97, 0.97, 0.97))
        c.fill(_ellipse(u, v, 3.0 * side, -0.8, 1.15, 1.15), eye)
        c.fill(_ellipse(u, v, 3.0 * side, -0.8, 0.45, 0.45), (0.02, 0.02, 0.02))
    if attributes["glasses"] == "glasses":
        frame = (0.06, 0.06, 0.08)
        for side in (-1.0, 1.0):
            ring = _ellipse(u, v, 3.0 * side, -0.8, 2.9, 2.3) & ~_ellipse(
                u, v, 3.0 * side, -0.8, 2.2, 1.6)
            c.fill(ring, frame)
        c.fill(_segment(u, v, (-0.9, -1.2), (0.9, -1.2), 0.6), frame)
    # nose and mouth
    c.fill(_ellipse(u, v, 0.0, 2.2, 0.7, 1.0), skin * 0.80)
    lips = (0.55, 0.12, 0.14)
    if expression == "neutral":
        c.fill((np.abs(u) < 2.2) & (np.abs(v - 4.9) < 0.4), lips)
    elif expression == "smiling":
        smile = (_ellipse(u, v, 0.0, 3.0, 2.9, 2.4) & ~_ellipse(u, v, 0.0, 2.6, 2.3, 2.0)
                 & (v > 3.6))
        c.fill(smile, lips)
    else:  # surprised
        c.fill(_ellipse(u, v, 0.0, 5.0, 1.3, 1.1), (0.30, 0.05, 0.07))
    return _finish(rng, c.result(), c.x)


def _muted(rng) -> np.ndarray:
    """A random low-saturation colour, so saturated objects stand out from any background."""
    grey = rng.uniform(0.45, 0.85)
    return np.clip(grey + rng.uniform(-0.12, 0.12, 3), 0.0, 1.0)


def _draw_object_background(c: _Canvas, rng, kind: str) -> str:
    a = _muted(rng)
    if kind == "table":
        wood = _jitter_colour(rng, (0.55, 0.36, 0.20), 0.05)
        c.fill(np.ones_like(c.x, dtype=bool), a)
        horizon = rng.uniform(19.0, 24.0)
        c.fill(c.y > horizon, wood)
        c.fill((c.y > horizon) & (((c.y - horizon) % 4.0) < 0.5), wood * 0.8)
        return "on a table"
    if kind == "wall":
        c.fill(np.ones_like(c.x, dtype=bool), a)
        return "against a wall"
    if kind == "grass":
        sky = _jitter_colour(rng, (0.60, 0.80, 0.97), 0.04)
        grass = _jitter_colour(rng, (0.30, 0.62, 0.22), 0.05)
        c.fill(np.ones_like(c.x, dtype=bool), sky)
        c.fill(c.y > rng.uniform(18.0, 24.0) + np.sin(c.x * 0.4) * 0.8, grass)
        return "in the garden"
    b = _muted(rng)
    t = (c.y / 32.0)[..., None]
    c.img = np.broadcast_to(a, c.img.shape) * (1 - t) + b * t
    return "in the studio"


def render_object(spec: WorldSpec, name: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One scene with object ``name``: (uint8 array (size, size, 3), background phrase)."""
    c = _Canvas(spec.image_size)
    bg = OBJECT_BACKGROUNDS[int(rng.integers(len(OBJECT_BACKGROUNDS)))]
    where = _draw_object_background(c, rng, bg)
    s = rng.uniform(0.85, 1.15)
    cx, cy = 16.0 + rng.uniform(-3.0, 3.0), 16.0 + rng.uniform(-2.5, 2.5)
    u, v = (c.x - cx) / s, (c.y - cy) / s
    if rng.random() < 0.5:  # mirror image
        u = -u

    def jc(col, a=0.04):
        return _jitter_colour(rng, col, a)

    dark = (0.08, 0.08, 0.09)
    if name == "apple":
        c.fill(_ellipse(u, v, -2.2, 1.0, 5.5, 6.0) | _ellipse(u, v, 2.2, 1.0, 5.5, 6.0),
               jc((0.82, 0.10, 0.12)))
        c.fill(_ellipse(u, v, -2.0, -1.5, 1.2, 1.8), jc((0.95, 0.55, 0.55)))
        c.fill(_segment(u, v, (0.0, -4.0), (0.8, -8.0), 1.0), jc((0.35, 0.22, 0.10)))
        c.fill(_ellipse(u, v, 3.0, -7.0, 2.4, 1.1), jc((0.20, 0.65, 0.20)))
    elif name == "banana":
        body = _ellipse(u, v, 0.0, -4.0, 11.0, 10.0) & ~_ellipse(u, v, 0.0, -7.5, 11.0, 10.0)
        c.fill(body & (np.abs(u) < 9.0), jc((0.98, 0.85, 0.15)))
        c.fill(body & (np.abs(u) >= 9.0) & (np.abs(u) < 10.3), jc((0.35, 0.25, 0.08)))
    elif name == "bicycle":
        for wx in (-6.5, 6.5):
            c.fill(_ellipse(u, v, wx, 4.0, 4.8, 4.8) & ~_ellipse(u, v, wx, 4.0, 3.2, 3.2), dark)
            c.fill(_ellipse(u, v, wx, 4.0, 1.0, 1.0), (0.75, 0.75, 0.78))
        frame = jc((0.85, 0.12, 0.10))
        for p, q in (((-6.5, 4.0), (-1.0, -3.0)), ((-1.0, -3.0), (5.0, -3.0)),
                     ((5.0, -3.0), (6.5, 4.0)), ((-6.5, 4.0), (0.5, 4.0)),
                     ((0.5, 4.0), (-1.0, -3.0)), ((0.5, 4.0), (5.0, -3.0))):
            c.fill(_segment(u, v, p, q, 1.6), frame)
        c.fill(_segment(u, v, (-1.0, -3.0), (-1.6, -5.5), 1.4), frame)
        c.fill(_segment(u, v, (-3.2, -6.0), (-0.2, -6.0), 1.6), dark)
        c.fill(_segment(u, v, (5.0, -3.0), (4.2, -6.5), 1.4), frame)
        c.fill(_segment(u, v, (3.2, -6.8), (6.0, -6.8), 1.4), dark)
    elif name == "lamp":
        glow = _ellipse(u, v, 0.0, -3.0, 9.0, 6.0)
        c.img[glow] = 0.5 * c.img[glow] + 0.5 * np.array([1.0, 0.97, 0.70])
        shade = (v > -9.0) & (v < -3.0) & (np.abs(u) < 3.0 + (v + 9.0) * 0.75)
        c.fill(shade, jc((0.95, 0.80, 0.25)))
        c.fill((np.abs(u) < 0.7) & (v >= -3.0) & (v < 8.0), jc((0.45, 0.45, 0.48)))
        c.fill(_ellipse(u, v, 0.0, 8.5, 5.0, 1.6), jc((0.25, 0.25, 0.28)))
    elif name == "car":
        body = jc((0.12, 0.30, 0.85))
        c.fill((np.abs(u) < 10.0) & (v > -1.0) & (v < 4.0), body)
        c.fill((v > -5.5) & (v <= -1.0) & (u > -6.0 - (v + 5.5) * 0.5) & (u < 4.0 + (v + 5.5) * 0.6),
               body)
        c.fill((v > -4.5) & (v <= -1.5) & (u > -5.0) & (u < 3.0) & (np.abs(u + 1.0) > 0.5),
               (0.70, 0.88, 0.98))
        for wx in (-5.5, 5.5):
            c.fill(_ellipse(u, v, wx, 4.3, 2.4, 2.4), dark)
            c.fill(_ellipse(u, v, wx, 4.3, 0.9, 0.9), (0.7, 0.7, 0.72))
        c.fill(_ellipse(u, v, 9.6, 1.0, 0.6, 0.8), (1.0, 0.95, 0.5))
    elif name == "tree":
        c.fill((np.abs(u) < 1.6) & (v > 1.0) & (v < 11.0), jc((0.42, 0.26, 0.12)))
        leaves = jc((0.12, 0.55, 0.18))
        for (lx, ly, r) in ((0.0, -5.0, 5.5), (-4.0, -1.5, 4.5), (4.0, -1.5, 4.5)):
            c.fill(_ellipse(u, v, lx, ly, r, r), leaves)
        c.fill(_ellipse(u, v, -1.5, -6.5, 1.5, 1.5), leaves * 1.25)
    elif name == "house":
        c.fill((np.abs(u) < 7.0) & (v > -1.5) & (v < 9.0), jc((0.95, 0.85, 0.62)))
        c.fill((v <= -1.5) & (v > -9.5) & (np.abs(u) < (v + 9.5) * 1.1), jc((0.70, 0.15, 0.12)))
        c.fill((np.abs(u - 2.5) < 1.6) & (v > 3.5) & (v < 9.0), jc((0.40, 0.24, 0.12)))
        c.fill((np.abs(u + 3.0) < 1.8) & (np.abs(v - 2.5) < 1.6), (0.60, 0.82, 0.97))
    elif name == "mug":
        colour = jc((0.92, 0.42, 0.62), 0.03)
        c.fill(_ellipse(u, v, 5.2, 0.5, 3.4, 3.6) & ~_ellipse(u, v, 5.2, 0.5, 2.0, 2.2), colour)
        c.fill((np.abs(u) < 5.0) & (v > -5.5) & (v < 6.5), colour)
        c.fill(_ellipse(u, v, 0.0, -5.5, 5.0, 1.2), (0.30, 0.18, 0.10))
        c.fill((np.abs(u) < 5.0) & (np.abs(v - 1.0) < 0.8), (0.97, 0.97, 0.95))
    elif name == "clock":
        c.fill(_ellipse(u, v, 0.0, 0.0, 9.0, 9.0), dark)
        c.fill(_ellipse(u, v, 0.0, 0.0, 7.8, 7.8), (0.97, 0.97, 0.95))
        for k in range(12):
            ang = k * np.pi / 6
            p = (6.3 * np.cos(ang), 6.3 * np.sin(ang))
            c.fill(_ellipse(u, v, p[0], p[1], 0.55, 0.55), dark)
        a1, a2 = rng.uniform(0, 2 * np.pi, 2)
        c.fill(_segment(u, v, (0, 0), (3.8 * np.cos(a1), 3.8 * np.sin(a1)), 1.1), dark)
        c.fill(_segment(u, v, (0, 0), (5.8 * np.cos(a2), 5.8 * np.sin(a2)), 0.8), (0.8, 0.1, 0.1))
    elif name == "umbrella":
        scallop = 0.9 * np.abs(np.sin(u * np.pi / 3.7))
        canopy = _ellipse(u, v, 0.0, -1.0, 11.0, 8.5) & (v < -0.5 - scallop)
        c.fill(canopy, jc((0.55, 0.15, 0.70)))
        c.fill(canopy & ((np.arctan2(v + 1.0, u) * 6 / np.pi) % 2 < 1), jc((0.95, 0.85, 0.20)))
        c.fill(_segment(u, v, (0.0, -10.5), (0.0, 8.0), 1.4), dark)
        c.fill(_ellipse(u, v, -2.0, 8.0, 2.7, 2.7) & ~_ellipse(u, v, -2.0, 8.0, 1.3, 1.3)
               & (v > 8.0), dark)
    elif name == "fish":
        colour = jc((0.98, 0.50, 0.10))
        c.fill(_ellipse(u, v, -1.0, 0.0, 8.0, 4.5), colour)
        c.fill((u > 5.5) & (u < 10.5) & (np.abs(v) < (u - 5.5) * 0.9), colour)
        c.fill(_ellipse(u, v, -5.5, -1.2, 0.9, 0.9), dark)
        c.fill((np.abs(u + 0.5) < 0.6) & (np.abs(v) < 3.8), (0.98, 0.95, 0.9))
    elif name == "key":
        gold = jc((0.88, 0.72, 0.20))
        c.fill(_ellipse(u, v, -6.0, 0.0, 4.0, 4.0) & ~_ellipse(u, v, -6.0, 0.0, 2.0, 2.0), gold)
        c.fill((u > -2.5) & (u < 9.0) & (np.abs(v) < 1.1), gold)
        c.fill((np.abs(u - 6.5) < 0.8) & (v > 0) & (v < 3.5), gold)
        c.fill((np.abs(u - 3.8) < 0.8) & (v > 0) & (v < 2.8), gold)
    else:
        raise ValueError(f"unknown object {name!r}")
    return _finish(rng, c.result(), c.x), where


# ================================================================================================
# captions
# ================================================================================================


def identity_caption(rng: np.random.Generator, name: str, attributes: dict[str, str],
                     expression: str) -> str:
    """A short natural caption that contains the full ``name``."""
    options = [
        f"a photo of {name}.",
        f"a portrait of {name}.",
        f"a close-up photo of {name}.",
        f"a picture of {name}.",
        f"headshot of {name}.",
        f"{name} at an event.",
        f"{name} posing for a photo.",
        f"{name} in a {attributes['shirt']} shirt.",
        f"{name} with {attributes['hair_colour']} hair.",
        f"portrait of {name} indoors.",
    ]
    if expression == "smiling":
        options += [f"{name} smiling at the camera.", f"a smiling {name}."]
    elif expression == "surprised":
        options += [f"{name} looking surprised.", f"a surprised {name}."]
    else:
        options += [f"{name} looking at the camera."]
    if attributes["glasses"] == "glasses":
        options += [f"{name} wearing glasses."]
    return options[int(rng.integers(len(options)))]


def object_caption(rng: np.random.Generator, name: str, where: str) -> str:
    article, adjective = _OBJECTS[name]
    a_adj = "an" if adjective[0] in "aeiou" else "a"
    options = [
        f"a photo of {article} {name}.",
        f"a photo of the {name}.",
        f"a picture of the {name}.",
        f"a close-up photo of the {name}.",
        f"a close-up of {a_adj} {adjective} {name} {where}.",
        f"{article} {name} {where}.",
        f"{a_adj} {adjective} {name}.",
        f"there is {article} {name} in this picture.",
    ]
    return options[int(rng.integers(len(options)))]


# ================================================================================================
# samples and shards
# ================================================================================================

_SPLITS = {"corpus": 0, "val": 1, "test": 2}
_KINDS = {"identity": 0, "object": 1}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _varying_attributes(spec: WorldSpec, split: str, label: int, index: int) -> dict[str, str]:
    """This image's draw of ``spec.varying`` (uniform over each attribute's values), from a stream of
    its own so the rest of the render is drawn as in a world without varying attributes."""
    rng = np.random.default_rng([spec.seed, _SPLITS[split], _KINDS["identity"], label, index, 404])
    return {k: ATTRIBUTES[k][int(rng.integers(len(ATTRIBUTES[k])))] for k in spec.varying}


def _make_sample(spec: WorldSpec, split: str, kind: str, label: int, index: int,
                 names: list[str], attrs: list[dict[str, str]] | None) -> dict:
    """Render one sample; its random stream depends only on (seed, split, kind, label, index)."""
    rng = np.random.default_rng([spec.seed, _SPLITS[split], _KINDS[kind], label, index])
    name = names[label]
    if kind == "identity":
        attributes = {**attrs[label], **_varying_attributes(spec, split, label, index)}
        expression = EXPRESSIONS[int(rng.integers(len(EXPRESSIONS)))]
        arr = render_identity(spec, attributes, rng, expression)
        caption = identity_caption(rng, name, attributes, expression)
        meta = {"kind": kind, "name": name, "attributes": attributes, "expression": expression}
    else:
        arr, where = render_object(spec, name, rng)
        caption = object_caption(rng, name, where)
        meta = {"kind": kind, "name": name,
                "attributes": {"scene": where, "colour": _OBJECTS[name][1]}}
    return {"png": _png(arr), "txt": caption, "json": meta, "label": label}


def _write_shards(folder: Path, prefix: str, samples: list[dict], shard_size: int,
                  labelled: bool) -> list[Path]:
    """The world's ``samples`` (dicts of ``key``, ``png`` bytes, ``txt``, ``json`` and ``label``) as shards in ``folder`` (at
    least one, empty if need be); held-out sets carry the label (``cls``)."""

    def record(sample: dict) -> dict:
        out = {"__key__": sample["key"], "png": sample["png"], "txt": sample["txt"].encode("utf-8"),
               "json": json.dumps(sample["json"], sort_keys=True).encode("utf-8")}
        if labelled:
            out["cls"] = str(sample["label"]).encode("utf-8")
        return out

    folder.mkdir(parents=True, exist_ok=True)
    return write_shards(folder, prefix, samples, shard_size, record, owner=SLUG_OWNER, at_least_one=True)


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "world.json"):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _layout(root: Path, spec: WorldSpec) -> dict:
    """The paths and counts of a world at ``root`` (without touching the disk)."""

    def shards(folder: str, prefix: str, n: int) -> list[Path]:
        return [root / folder / shard_name(prefix, s) for s in range(max(1, -(-n // spec.shard_size)))]

    counts = {
        "corpus_identity": spec.n_identities * spec.identity_corpus,
        "corpus_object": spec.n_objects * spec.object_corpus,
        "val_identities": spec.n_identities * spec.identity_val,
        "test_identities": spec.n_identities * spec.identity_test,
        "val_objects": spec.n_objects * spec.object_val,
        "test_objects": spec.n_objects * spec.object_test,
    }
    counts["corpus"] = counts["corpus_identity"] + counts["corpus_object"]
    corpus = shards("corpus", "corpus", counts["corpus"])
    out = {
        "root": str(root),
        "corpus": brace_pattern(corpus),
        "corpus_shards": [str(p) for p in corpus],
    }
    for split in ("val", "test"):
        for what in ("identities", "objects"):
            out[f"{split}_{what}"] = brace_pattern(shards(split, what, counts[f"{split}_{what}"]))
    out.update({
        "identities_json": str(root / "identities.json"),
        "objects_json": str(root / "objects.json"),
        "templates_json": str(root / "templates.json"),
        "world_json": str(root / "world.json"),
        "counts": counts,
    })
    return out


def _spec_record(spec: WorldSpec) -> dict:
    return {"generator_version": GENERATOR_VERSION, "spec": spec_record(spec)}


def read_world(root: str | os.PathLike) -> dict | None:
    """The ``world.json`` of a built world at ``root``, or None if there is none."""
    path = Path(root) / "world.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _matches(root: Path, spec: WorldSpec) -> bool:
    record = read_world(root)
    if record is None:
        return False
    want = _spec_record(spec)
    return all(record.get(k) == v for k, v in want.items())


def _build_into(folder: Path, spec: WorldSpec) -> str:
    names = identity_names(spec)
    attrs = identity_attributes(spec)
    objects = object_names(spec)

    def samples(split: str, kind: str, per_class: int) -> list[dict]:
        classes = names if kind == "identity" else objects
        out = []
        for label in range(len(classes)):
            for i in range(per_class):
                out.append(_make_sample(spec, split, kind, label, i, classes,
                                        attrs if kind == "identity" else None))
        return out

    corpus = samples("corpus", "identity", spec.identity_corpus) + samples(
        "corpus", "object", spec.object_corpus)
    order = np.random.default_rng([spec.seed, 303]).permutation(len(corpus))
    corpus = [corpus[i] for i in order]
    for k, sample in enumerate(corpus):
        sample["key"] = f"corpus-{k:06d}"
    _write_shards(folder / "corpus", "corpus", corpus, spec.shard_size, labelled=False)
    logger.info("demo world: wrote %d corpus pairs", len(corpus))

    for split in ("val", "test"):
        for what, kind in (("identities", "identity"), ("objects", "object")):
            per_class = getattr(spec, f"{kind}_{split}")
            held = samples(split, kind, per_class)
            for k, sample in enumerate(held):
                sample["key"] = f"{split}-{what}-{k:06d}"
            _write_shards(folder / split, what, held, spec.shard_size, labelled=True)

    (folder / "identities.json").write_text(json.dumps(names, indent=1) + "\n")
    (folder / "objects.json").write_text(json.dumps(objects, indent=1) + "\n")
    (folder / "templates.json").write_text(json.dumps(
        {"identities": list(IDENTITY_TEMPLATES), "objects": list(OBJECT_TEMPLATES)}, indent=1)
        + "\n")
    (folder / "attributes.json").write_text(json.dumps(
        [{"name": n, **a} for n, a in zip(names, attrs)], indent=1) + "\n")
    fingerprint = _fingerprint(folder)
    record = {**_spec_record(spec), "fingerprint": fingerprint}
    (folder / "world.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return fingerprint


def build_world(root: str | os.PathLike, spec: WorldSpec = WorldSpec()) -> dict:
    """Build the demo world at ``root`` (or reuse it if ``root/world.json`` matches ``spec``).

    The world is built in a temporary folder next to ``root`` and renamed into place, so a
    crash never leaves a half-built world behind; an existing world of another spec is replaced.

    Layout::

        corpus/corpus-000000.tar ...        image-caption pairs of identities and objects
                                            (png, txt, json {"kind", "name", "attributes"}), shuffled
        val/identities-000000.tar           labelled held-out portraits (png, cls, txt, json)
        val/objects-000000.tar              labelled held-out object scenes
        test/identities-000000.tar, test/objects-000000.tar
        identities.json, objects.json       class names in label order
        templates.json                      {"identities": [...], "objects": [...]} prompt templates
        attributes.json                     each identity's fixed attributes (WorldSpec.fixed)
        world.json                          the spec, generator version and a content fingerprint

    Returns a dict of paths (str; shard sets as brace patterns ``expand_urls`` understands, and
    ``corpus_shards`` as a list), ``counts`` (samples per split) and ``fingerprint``.
    """
    root = Path(root).expanduser().resolve()
    if _matches(root, spec):
        logger.info("demo world: reusing %s", root)
        return {**_layout(root, spec), "fingerprint": read_world(root)["fingerprint"],
                "built": False}
    logger.info("demo world: building %s", root)
    with rebuilt_folder(root, keep=lambda: _matches(root, spec)) as build:  # keep: built concurrently
        fingerprint = _build_into(build.path, spec)
    if not build.swapped:
        return {**_layout(root, spec), "fingerprint": read_world(root)["fingerprint"], "built": False}
    return {**_layout(root, spec), "fingerprint": fingerprint, "built": True}
