"""Scenes of two coloured shapes with their captions, and a checker that reads a picture back into
colours, shapes and their arrangement: text-to-image prompt adherence measured without a person.

A scene: two objects of different colours from `COLOURS`, each a circle, square or triangle, one above the
other or side by side, on a light background; the caption names them in either order ("a red circle above a
blue square" and "a blue square below a red circle" are the same picture). Shapes are drawn without
anti-aliasing, so a rendered picture is read back exactly.

The checker (`check`) classifies each pixel by its nearest reference colour, keeps the largest connected
region of each named colour, and tells the shapes apart by how much of its bounding box the region fills
(square 1, circle pi/4, triangle 1/2). A caption is followed when: both named colours are there and no other
(`colour`), each named colour has the named shape (`shape`), and the first-named object is on the named side
of the other (`position`). `all` needs the three.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
BACKGROUND = (240, 240, 236)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
ASPECTS = ("colour", "shape", "position", "all")
# kinds of scene: a pair of colours, a shape for each, and where the first is of the second (216)
SCENE_KINDS = math.comb(len(COLOURS), 2) * len(SHAPES) ** 2 * len(RELATIONS)

# Fill of the bounding box between the shapes' ideal values (triangle 0.5, circle 0.785, square 1).
FILL_TRIANGLE_CIRCLE, FILL_CIRCLE_SQUARE = 0.64, 0.89
MAX_COLOUR_DISTANCE = 100.0  # RGB distance beyond which a pixel is no reference colour at all
MIN_AREA = 0.004  # of the picture: a smaller region is not an object (the smallest drawn is ~0.05)


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str

    def words(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """`first` is `relation` of `second` (first above second, ...)."""

    first: Thing
    relation: str
    second: Thing

    def caption(self) -> str:
        return f"a {self.first.words()} {self.relation} a {self.second.words()}"

    def canonical(self) -> Scene:
        """The same picture described with "above" or "left of" (either caption of a scene gives the same)."""
        if self.relation in ("above", "left of"):
            return self
        return Scene(self.second, OPPOSITE[self.relation], self.first)


def parse(caption: str) -> Scene:
    """The scene a caption of `Scene.caption` describes (ValueError for anything else)."""
    words = caption.strip().lower().split()
    if len(words) < 7 or words[0] != "a":
        raise ValueError(f"not a shapes caption: {caption!r}")
    rel_len = 2 if words[3] in ("left", "right") else 1
    relation = " ".join(words[3 : 3 + rel_len])
    rest = words[3 + rel_len :]
    if relation not in RELATIONS or len(rest) != 3 or rest[0] != "a":
        raise ValueError(f"not a shapes caption: {caption!r}")
    first, second = Thing(words[1], words[2]), Thing(rest[1], rest[2])
    for t in (first, second):
        if t.colour not in COLOURS or t.shape not in SHAPES:
            raise ValueError(f"not a shapes caption: {caption!r}")
    return Scene(first, relation, second)


def random_scene(rng: random.Random) -> Scene:
    c1, c2 = rng.sample(list(COLOURS), 2)
    return Scene(Thing(c1, rng.choice(SHAPES)), rng.choice(RELATIONS), Thing(c2, rng.choice(SHAPES)))


# ----------------------------------------------------------------------------- drawing
def _shape_mask(shape: str, size: int, cy: float, cx: float, half: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= half**2
    if shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # an upright isosceles triangle filling its 2h x 2h box: apex at the top centre, base at the bottom
    inside_rows = (dy >= -half) & (dy <= half)
    return inside_rows & (np.abs(dx) <= (dy + half) / 2)


def render(scene: Scene, size: int, rng: random.Random) -> np.ndarray:
    """(size, size, 3) uint8: the two objects in their halves of the picture, sizes and positions jittered."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    near, far = rng.uniform(0.2, 0.3) * size, rng.uniform(0.7, 0.8) * size  # along the relation's axis
    across = [rng.uniform(0.3, 0.7) * size for _ in range(2)]
    # first at the near end for above / left of, at the far end for below / right of
    a, b = (near, far) if scene.relation in ("above", "left of") else (far, near)
    vertical = scene.relation in ("above", "below")
    for thing, along, other in ((scene.first, a, across[0]), (scene.second, b, across[1])):
        cy, cx = (along, other) if vertical else (other, along)
        half = rng.uniform(0.11, 0.17) * size
        img[_shape_mask(thing.shape, size, cy, cx, half)] = COLOURS[thing.colour]
    return img


def make_set(n: int, size: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """n (picture, caption) pairs; each caption names its two objects in a random order."""
    rng = random.Random(seed)
    return [(render(s := random_scene(rng), size, rng), s.caption()) for _ in range(n)]


# ----------------------------------------------------------------------------- reading back
def _regions(img: np.ndarray) -> dict[str, np.ndarray]:
    """Per colour name: the mask of its largest connected region (nearest reference colour per pixel)."""
    from scipy import ndimage

    refs = np.array([BACKGROUND, *COLOURS.values()], np.float64)
    dist = np.linalg.norm(img[:, :, None, :].astype(np.float64) - refs[None, None], axis=-1)
    label = dist.argmin(-1)
    label[dist.min(-1) > MAX_COLOUR_DISTANCE] = -1
    out = {}
    for k, name in enumerate(COLOURS, start=1):
        parts, n = ndimage.label(label == k)
        if n == 0:
            out[name] = np.zeros(label.shape, bool)
            continue
        sizes = ndimage.sum_labels(np.ones_like(parts), parts, range(1, n + 1))
        out[name] = parts == (1 + int(np.argmax(sizes)))
    return out


def fill_ratio(mask: np.ndarray) -> float:
    """The share of its bounding box a region fills."""
    ys, xs = np.nonzero(mask)
    return len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def shape_of(mask: np.ndarray) -> str:
    """circle, square or triangle from the region's `fill_ratio`."""
    fill = fill_ratio(mask)
    return "triangle" if fill < FILL_TRIANGLE_CIRCLE else "circle" if fill < FILL_CIRCLE_SQUARE else "square"


def check(img: np.ndarray, caption: str) -> dict[str, bool]:
    """Does the picture (H, W, 3 uint8) show what the caption says? One bool per aspect of `ASPECTS`."""
    scene = parse(caption)
    regions = _regions(img)
    min_area = MIN_AREA * img.shape[0] * img.shape[1]
    present = {name for name, m in regions.items() if m.sum() >= min_area}
    named = {scene.first.colour, scene.second.colour}
    colour = present == named
    shape = all(t.colour in present and shape_of(regions[t.colour]) == t.shape for t in (scene.first, scene.second))
    position = False
    if named <= present:
        (y1, x1), (y2, x2) = (np.argwhere(regions[t.colour]).mean(0) for t in (scene.first, scene.second))
        position = {"above": y1 < y2, "below": y1 > y2, "left of": x1 < x2, "right of": x1 > x2}[scene.relation]
    return {"colour": colour, "shape": shape, "position": bool(position), "all": colour and shape and bool(position)}


def adherence(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """The share of pictures that follow their caption, per aspect."""
    rows = [check(i, c) for i, c in zip(images, captions)]
    return {a: float(np.mean([r[a] for r in rows])) for a in ASPECTS}


def chance(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Adherence of true pictures to the wrong captions (each picture scored against the next one's caption):
    what a model that ignores the prompt but draws perfect scenes would reach."""
    return adherence(images, captions[1:] + captions[:1])
