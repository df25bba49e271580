"""Pixel analysis of a shapes-world picture: what does it show? numpy and Pillow only.

Contract (`judge(image) -> Verdict`), every rule relative to the image's size:
- background: the palette colour nearest to the median of the outer ring of pixels (a
  shape may touch the border; the median ignores it);
- mask: pixels farther than `MASK_DISTANCE` (RGB) from that median border colour, reduced to
  its largest 4-connected component (stray specks do not move the box or centroid);
- shape colour: the majority vote of nearest palette colours over the mask's "core" (its
  pixels at least 60 % as far from the background as its farthest ones: the blended rim of
  a soft edge, nearest perhaps to a third colour, does not vote);
- position: the anchor (`world.POSITIONS`) nearest to the mask's centroid;
- size: from the area of the mask's bounding box (so a large triangle is as large as a
  large square): its half side against the geometric means between `world.SIZES`;
- shape: the mask's fill ratio of its bounding box (triangle 0.5, circle 0.785, square 1),
  split at the midpoints.
An image with no mask (nothing but background) gets None for every shape attribute.
`score(verdicts, truths)` gives the fraction correct per attribute.
`is_outline(image)` tells the LoRA's outline style from a filled shape: a point inside the
shape's bounding box (middle column, 60 % down) is background-coloured.
On the world's own rendered pictures the judge is right on every attribute (see
`self_check`); that is what makes it a fair measure of a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from serve_app.training.world import COLOURS, PALETTE, POSITIONS, SIZES

ATTRIBUTES = ("background", "colour", "position", "size", "shape")
MASK_DISTANCE = 60.0
CORE_FRACTION = 0.6
_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
_SIZE_NAMES = tuple(SIZES)
_SIZE_CUTS = [float(np.sqrt(SIZES[a] * SIZES[b])) for a, b in itertools.pairwise(_SIZE_NAMES)]
# Fill ratios: triangle 0.5, circle pi/4, square 1; cut halfway.
_FILL_CUTS = ((0.5 + np.pi / 4) / 2, (np.pi / 4 + 1.0) / 2)


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None
    position: str | None
    size: str | None
    shape: str | None
    fill: float | None = None  # measurements, for reports
    half_side: float | None = None
    centroid: tuple[float, float] | None = None

    def attributes(self) -> dict[str, str | None]:
        return {k: v for k, v in asdict(self).items() if k in ATTRIBUTES}


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into `COLOURS` of the palette colour nearest to each row of `rgb` (N x 3)."""
    d = ((rgb[:, None, :].astype(np.float32) - _PALETTE[None]) ** 2).sum(-1)
    return d.argmin(1)


def shape_mask(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB array, median border colour, shape mask) of a picture (see the docstring)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    ring = max(1, round(min(h, w) / 32))
    border = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                             rgb[:, :ring].reshape(-1, 3), rgb[:, -ring:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    mask = largest_component(np.sqrt(((rgb - bg_rgb) ** 2).sum(-1)) > MASK_DISTANCE)
    return rgb, bg_rgb, mask


def bounding_box(image: Image.Image) -> tuple[float, float, float, float] | None:
    """The shape mask's box (x0, y0, x1, y1) in pixels, None if there is no shape."""
    mask = shape_mask(image)[2]
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def judge(image: Image.Image) -> Verdict:
    """See the module docstring."""
    rgb, bg_rgb, mask = shape_mask(image)
    h, w, _ = rgb.shape
    background = COLOURS[int(nearest_colour(bg_rgb[None])[0])]
    if not mask.any():
        return Verdict(background, None, None, None, None)
    distance = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1))
    core = mask & (distance >= CORE_FRACTION * distance[mask].max())
    votes = np.bincount(nearest_colour(rgb[core]), minlength=len(COLOURS))
    colour = COLOURS[int(votes.argmax())]
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2
                   + (POSITIONS[p][1] - cy) ** 2)
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    half_side = float(np.sqrt(bw * bh / (w * h))) / 2
    size = _SIZE_NAMES[int(np.searchsorted(_SIZE_CUTS, half_side))]
    fill = float(mask.sum() / (bw * bh))
    shape = ("triangle" if fill < _FILL_CUTS[0] else
             "circle" if fill < _FILL_CUTS[1] else "square")
    return Verdict(background, colour, position, size, shape, fill=round(fill, 3),
                   half_side=round(half_side, 4), centroid=(round(cx, 3), round(cy, 3)))


def is_outline(image: Image.Image) -> bool:
    """True if the picture's shape is drawn as an outline (see the module docstring)."""
    rgb, bg_rgb, mask = shape_mask(image)
    if not mask.any():
        return False
    ys, xs = np.nonzero(mask)
    # A point inside any filled shape, away from its rim: the box's middle column, 60 %
    # down (for a triangle, where it is wide enough to have an inside).
    x = round((xs.min() + xs.max()) / 2)
    y = round(ys.min() + 0.6 * (ys.max() - ys.min()))
    middle = rgb[max(0, y - 1):y + 1, max(0, x - 1):x + 1].reshape(-1, 3)
    return bool(np.sqrt(((middle - bg_rgb) ** 2).sum(-1)).mean() < MASK_DISTANCE)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (all False if empty).

    Label propagation by repeated neighbour minimum: numpy only, and fast enough for the
    small images judged here (iterations ~ the component's diameter).
    """
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1],
                                        padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[counts.argmax()]


def score(verdicts: Iterable[Verdict], truths: Iterable[Mapping[str, str]]) -> dict[str, float]:
    """Fraction correct per attribute (attributes a truth leaves out are not scored)."""
    right = dict.fromkeys(ATTRIBUTES, 0)
    total = dict.fromkeys(ATTRIBUTES, 0)
    for verdict, truth in zip(verdicts, truths, strict=True):
        seen = verdict.attributes()
        for attribute in ATTRIBUTES:
            if truth.get(attribute) is not None:
                total[attribute] += 1
                right[attribute] += seen[attribute] == truth[attribute]
    return {a: right[a] / total[a] for a in ATTRIBUTES if total[a]}


def self_check(n: int = 500, px: int = 64, seed: int = 0) -> dict[str, float]:
    """The judge's score on `n` rendered random scenes (should be 1.0 everywhere)."""
    from serve_app.training.world import random_scene, render

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return score((judge(render(s, px)) for s in scenes), (s.attributes() for s in scenes))
