"""The closed vocabulary of the synthetic saliency world: colour names, shape names and size words.

The synthetic generator (`cgpo_trl.data.synthetic`) draws with these colours and shapes (`shape_coordinates`), and the
weight-free `shapes` segmenter reads expressions written with these words and matches templates rendered by the same
function, so both import this one definition of the world.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Saturated RGB values far apart from each other and from the (grey, textured) background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 190),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

SIZES: tuple[str, ...] = ("small", "large")

STAR_INNER_RATIO = 0.5
"""Inner / outer radius of the five-pointed star."""

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Description:
    """What an expression names: any field may be None when the expression does not say it."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None

    @property
    def empty(self) -> bool:
        return self.colour is None and self.shape is None and self.size is None


def describe(colour: str | None = None, shape: str | None = None, size: str | None = None) -> str:
    """Write the canonical referring expression, e.g. ``describe("red", "circle") == "the red circle"``."""
    for value, table, field in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"), (size, SIZES, "size")):
        if value is not None and value not in table:
            raise ValueError(f"unknown {field} {value!r}; expected one of {sorted(table)}")
    words = [w for w in (size, colour, shape) if w is not None]
    if not words:
        raise ValueError("an expression needs at least one of colour, shape or size")
    if shape is None:
        words.append("object")
    return "the " + " ".join(words)


def parse_description(expression: str) -> Description:
    """Read colour, shape and size words from free text; the first word of each kind wins, plurals count."""
    colour = shape = size = None
    for word in _WORD.findall(expression.lower()):
        singular = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if colour is None and singular in COLOURS:
            colour = singular
        elif shape is None and singular in SHAPES:
            shape = singular
        elif size is None and singular in SIZES:
            size = singular
    return Description(colour=colour, shape=shape, size=size)


def shape_vertices(shape: str, centre: tuple[float, float], radius: float, angles) -> tuple[np.ndarray, np.ndarray]:
    """Polygon vertices (rows, cols) of a square, triangle or star with circumradius `radius` centred at (row, col),
    one row of vertices per angle in `angles` (radians clockwise from "up" to the first vertex): (angles, vertices)."""
    if shape not in SHAPES or shape == "circle":
        raise ValueError(f"shape_vertices draws polygons {SHAPES[1:]}, got {shape!r}")
    angles = np.atleast_1d(np.asarray(angles, dtype=np.float64))[:, None]
    if shape == "star":
        theta = angles + np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER_RATIO)
    else:
        n = 4 if shape == "square" else 3
        theta = angles + np.arange(n) * (2 * np.pi / n)
        radii = np.full(n, float(radius))
    cy, cx = centre
    return cy - radii * np.cos(theta), cx + radii * np.sin(theta)


def shape_coordinates(
    shape: str, centre: tuple[float, float], radius: float, angle: float, image_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (rows, cols) of `shape` with circumradius `radius` centred at (row, col), the first vertex at `angle`
    radians clockwise from "up"."""
    from skimage.draw import disk, polygon

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if shape == "circle":
        return disk(centre, radius, shape=image_shape)
    rows, cols = shape_vertices(shape, centre, radius, angle)
    return polygon(rows[0], cols[0], shape=image_shape)
