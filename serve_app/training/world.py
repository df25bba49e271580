"""The shapes world: seeded scenes (one filled shape on a flat background), their pictures
and their plain-English captions. numpy and Pillow only: no torch (the service's tests
import this where torch must not load).

Contract:
- A `Scene` is the whole truth about a picture: shape, shape colour, background colour,
  position (one of 5 anchors), size (small/medium/large) and a small jitter of place and
  scale. `render(scene, px)` draws it with Pillow, without anti-aliasing, at any size.
- `random_scene(rng)` draws every attribute uniformly (background != shape colour).
- `caption(scene, rng)` describes a scene in one of many phrasings and word orders. It may
  leave attributes out, but only in ways the world's rules make true, so that a caption
  always means what the picture shows:
    * no background colour named -> any background other than the shape's colour;
    * no shape colour / no shape named -> any;
    * no position named -> the center (the default: a person who names none means "in
      the middle"); no size named -> medium (the issue's default).
  So a scene whose position is "left" always has its position named, and so on.
  Captions sometimes carry words outside the vocabulary ("please draw", made-up words),
  which a model must learn to ignore.
- `full_caption(scene, rng)` names every attribute (what the quality grid asks for).
- Everything is a pure function of its `numpy.random.Generator`: seeded = reproducible.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, far apart in RGB (nearest pair: ~100), so the judge's nearest-palette
# rule is unambiguous and the VAE has slack.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (20, 60, 235),
    "yellow": (250, 225, 20),
    "orange": (250, 125, 10),
    "purple": (130, 30, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Anchor points as fractions of the image (x, y); y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5),
    "top": (0.5, 0.27), "bottom": (0.5, 0.73),
}
# Half the side of the shape's bounding box, as a fraction of the image side. A medium
# shape spans ~5 latent pixels of the f=4 VAE, a small one ~3.5: at the 0.085/0.13/0.19 of
# shapes-1..4 (2.7 and 4 latent pixels) even the VAE's reconstructions kept the shape only
# 67-88 % of the time (small triangles 10-46 %), so no denoiser could reach the 80 % asked.
SIZES: dict[str, float] = {"small": 0.11, "medium": 0.16, "large": 0.23}
DEFAULT_POSITION = "center"
DEFAULT_SIZE = "medium"
# Jitter: the anchor moves by up to this fraction of the image, the size by this factor.
POSITION_JITTER = 0.03
SIZE_JITTER = 0.05


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str = DEFAULT_POSITION
    size: str = DEFAULT_SIZE
    dx: float = 0.0  # jitter, fractions of the image
    dy: float = 0.0
    scale: float = 1.0

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "background": self.background,
                "position": self.position, "size": self.size}


def random_scene(rng: np.random.Generator, jitter: bool = True) -> Scene:
    """Every attribute uniform; the background differs from the shape's colour."""
    colour = COLOURS[rng.integers(len(COLOURS))]
    others = [c for c in COLOURS if c != colour]
    scene = Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colour,
        background=others[rng.integers(len(others))],
        position=tuple(POSITIONS)[rng.integers(len(POSITIONS))],
        size=tuple(SIZES)[rng.integers(len(SIZES))],
    )
    return jittered(scene, rng) if jitter else scene


def jittered(scene: Scene, rng: np.random.Generator) -> Scene:
    j = POSITION_JITTER
    return replace(scene, dx=float(rng.uniform(-j, j)), dy=float(rng.uniform(-j, j)),
                   scale=float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)))


def box(scene: Scene, px: int) -> tuple[float, float, float, float]:
    """The shape's bounding box (x0, y0, x1, y1) in pixels."""
    ax, ay = POSITIONS[scene.position]
    cx, cy = (ax + scene.dx) * px, (ay + scene.dy) * px
    half = SIZES[scene.size] * scene.scale * px
    return cx - half, cy - half, cx + half, cy + half


def wide_scene(rng: np.random.Generator) -> Scene:
    """A scene placed and sized anywhere (not only near the anchors), described by its
    nearest anchor and size: what a ControlNet's edges may ask for."""
    scene = random_scene(rng, jitter=False)
    half = float(rng.uniform(0.09, 0.26))
    cx, cy = (float(rng.uniform(half + 0.03, 0.97 - half)) for _ in range(2))
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2
                   + (POSITIONS[p][1] - cy) ** 2)
    names = tuple(SIZES)
    cuts = [np.sqrt(SIZES[a] * SIZES[b]) for a, b in itertools.pairwise(names)]
    size = names[int(np.searchsorted(cuts, half))]
    ax, ay = POSITIONS[position]
    return replace(scene, position=position, size=size, dx=cx - ax, dy=cy - ay,
                   scale=half / SIZES[size])


def render(scene: Scene, px: int = 64, style: str = "filled") -> Image.Image:
    """The scene as an RGB image of `px` x `px` (no anti-aliasing: colours stay exact).
    `style="outline"`: the shape's outline only (`outline_width(px)` wide), its inside the
    background (the LoRA's style)."""
    image = Image.new("RGB", (px, px), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    if style == "filled":
        draw_shape(draw, scene.shape, box(scene, px), PALETTE[scene.colour])
    elif style == "outline":
        draw_shape(draw, scene.shape, box(scene, px), None, outline=PALETTE[scene.colour],
                   width=outline_width(px))
    else:
        raise ValueError(f"unknown style {style!r}; valid: filled, outline")
    return image


def outline_width(px: int) -> int:
    return max(1, round(px / 32))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[float, float, float, float],
               fill: tuple[int, int, int] | None, outline: tuple[int, int, int] | None = None,
               width: int = 1) -> None:
    """Draw `shape` filling `bbox` (a triangle points up, its base the box's bottom)."""
    x0, y0, x1, y1 = bbox
    # Pillow's boxes are inclusive: shrink by one so a shape covers exactly its box.
    x1, y1 = x1 - 1, y1 - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline,
                     width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


# -- captions ------------------------------------------------------------------------------

ARTICLES = ("a", "a", "one", "the", "")
SHAPE_NOUN_MISSING = ("shape", "object", "thing", "figure")
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle", "at the center", "in the centre",
               "centered", "in the middle of the image", "center", "middle"),
    "left": ("on the left", "at the left", "to the left", "on the left side", "left",
             "on the left of the picture"),
    "right": ("on the right", "at the right", "to the right", "on the right side", "right",
              "on the right of the picture"),
    "top": ("at the top", "on top", "at the top of the image", "top", "near the top",
            "in the top part"),
    "bottom": ("at the bottom", "on the bottom", "at the bottom of the image", "bottom",
               "near the bottom", "in the bottom part"),
}
# Background phrases: `{}` is the colour.
BACKGROUND_PHRASES = ("on a {} background", "on {} background", "{} background",
                      "with a {} background", "against a {} background", "on {}",
                      "background {}", "the background is {}", "over a {} background",
                      "on a plain {} background")
FILLER_PREFIXES = ("", "", "", "", "", "draw ", "a picture of ", "an image of ", "please draw ",
                   "show me ", "picture of ", "simple drawing of ", "")
# Words outside the vocabulary, to learn to ignore.
# (No size-like words here: "big" or "tiny" must not learn to mean nothing.)
NOISE_WORDS = ("nice", "simple", "flat", "pretty", "very", "cute", "shiny", "lovely", "plain",
               "cool", "digital", "art", "style", "photo", "colorful", "clean", "minimal")
# Synonyms a person uses for the size words, sometimes written instead of them.
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("tiny", "little"),
                                             "large": ("big", "huge"), "medium": ()}


def caption(scene: Scene, rng: np.random.Generator, omit: bool = True) -> str:
    """A caption for `scene` (see the module docstring for what may be left out)."""
    name = {
        "colour": not omit or rng.random() > 0.1,
        "shape": not omit or rng.random() > 0.08,
        "background": not omit or rng.random() > 0.25,
        "position": not omit or scene.position != DEFAULT_POSITION or rng.random() > 0.5,
        "size": not omit or scene.size != DEFAULT_SIZE or rng.random() > 0.6,
    }
    words = _object_phrase(scene, name, rng)
    position = _pick(rng, POSITION_PHRASES[scene.position]) if name["position"] else None
    background = (_pick(rng, BACKGROUND_PHRASES).format(scene.background)
                  if name["background"] else None)
    if background and rng.random() < 0.2:
        # Background first: "blue background, a red circle on the left".
        parts = [background, words, position]
    elif rng.random() < 0.5:
        parts = [words, position, background]
    else:
        parts = [words, background, position]
    text = _join(rng, [p for p in parts if p])
    text = _pick(rng, FILLER_PREFIXES) + text
    if rng.random() < 0.1:
        text = _noise(text, rng)
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)
    if rng.random() < 0.25:
        text += "."
    if rng.random() < 0.2:
        text = text[:1].upper() + text[1:]
    return text


def full_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that names every attribute."""
    return caption(scene, rng, omit=False)


def _object_phrase(scene: Scene, name: dict[str, bool], rng: np.random.Generator) -> str:
    noun = scene.shape if name["shape"] else _pick(rng, SHAPE_NOUN_MISSING)
    adjectives = []
    if name["size"]:
        synonyms = SIZE_SYNONYMS[scene.size]
        adjectives.append(_pick(rng, synonyms) if synonyms and rng.random() < 0.1
                          else scene.size)
    if name["colour"]:
        adjectives.append(scene.colour)
    if len(adjectives) == 2 and rng.random() < 0.15:
        adjectives.reverse()  # "red small circle": unusual, but people write it
    article = _pick(rng, ARTICLES)
    if name["colour"] and rng.random() < 0.12:
        # The colour after the noun: "a small circle in red", "a circle colored red".
        adjectives.remove(scene.colour)
        tail = _pick(rng, ("in {}", "colored {}", "coloured {}", "that is {}", ", {},"))
        phrase = " ".join([*adjectives, noun, tail.format(scene.colour)])
    else:
        phrase = " ".join([*adjectives, noun])
    return f"{article} {phrase}".strip().replace(" ,", ",")


def _join(rng: np.random.Generator, parts: list[str]) -> str:
    out = parts[0]
    for part in parts[1:]:
        out += _pick(rng, (" ", " ", ", ", ", ", " and ", "; ")) + part
    return out.replace(",,", ",").rstrip(",")


def _noise(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    if rng.random() < 0.5:
        extra = _pick(rng, NOISE_WORDS)
    else:  # a made-up word: tokenized byte by byte, meaningless
        letters = "abcdefghijklmnopqrstuvwxyz"
        extra = "".join(letters[i] for i in rng.integers(0, 26, int(rng.integers(3, 8))))
    words.insert(int(rng.integers(0, len(words) + 1)), extra)
    return " ".join(w for w in words if w)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def vocabulary() -> list[str]:
    """Every word the captions use (the tokenizer gives each one token)."""
    texts = [*COLOURS, *SHAPES, *SIZES, *SHAPE_NOUN_MISSING, *NOISE_WORDS, *ARTICLES, "an",
             *(w for ws in SIZE_SYNONYMS.values() for w in ws)]
    for group in (*POSITION_PHRASES.values(), BACKGROUND_PHRASES, FILLER_PREFIXES,
                  ("in {}", "colored {}", "coloured {}", "that is {}", "and")):
        texts.extend(group)
    words = {w for text in texts for w in text.replace("{}", " ").replace(",", " ").split()}
    return sorted(words)
