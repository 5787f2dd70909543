"""`shapes`: a weight-free referring segmenter that is exact on the synthetic world of `vocabulary.py`.

An expression is read for colour, shape and size words (`vocabulary.parse_description`). Pixels are assigned to
the nearest vocabulary colour within a tolerance, split into connected components (8-connectivity), and each
component's shape is the vocabulary shape whose template, rendered with `skimage.draw` at the component's
centroid and area, overlaps it best (IoU over a grid of rotations). Measured on shapes drawn like the synthetic
world: exact from a circle radius of 3.5 px (about 36 px of area) up, where region-property thresholds (solidity,
Feret ratio, moments) still confuse triangles, squares and stars below ~6 px; smaller blobs are ambiguous for any
method. Size words pick among the matching components by area (see `size_ratio`).

Region mode returns the union of the matching components (score 1.0), instance mode one mask per component
(score 1.0 each); an expression without vocabulary words, or that matches nothing, gives an empty mask and 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from ..vocabulary import COLOURS, SHAPES, STAR_INNER_RATIO, Description, parse_description, shape_coordinates
from .base import ReferringSegmenter, register_segmenter

# Rotational period of each shape, and its area for circumradius 1 (polygons: regular, star: STAR_INNER_RATIO).
_PERIOD = {"circle": 0.0, "square": np.pi / 2, "triangle": 2 * np.pi / 3, "star": 2 * np.pi / 5}
_UNIT_AREA = {
    "circle": np.pi,
    "square": 2.0,
    "triangle": 3 * np.sqrt(3) / 4,
    "star": 5 * STAR_INNER_RATIO * np.sin(np.pi / 5),
}
_MAX_MATCH_AREA = 400  # pixels
_PALETTE = np.array(list(COLOURS.values()), dtype=np.int16)
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE_SPREAD = int((_PALETTE.max(axis=1) - _PALETTE.min(axis=1)).min())


@dataclass
class _Component:
    colour: str
    mask: np.ndarray  # bool, full image size
    local: np.ndarray  # bool, the component's bounding box
    centroid: tuple[float, float]  # in `local` coordinates
    angle_steps: int

    @property
    def area(self) -> int:
        return int(self.local.sum())

    @cached_property
    def shape(self) -> str:
        local, (cy, cx) = self.local, self.centroid
        if local.sum() > _MAX_MATCH_AREA:  # past this size shapes are unambiguous; matching a smaller copy is faster
            from skimage.transform import rescale

            scale = np.sqrt(_MAX_MATCH_AREA / local.sum())
            local = rescale(local.astype(np.float32), scale, order=1, anti_aliasing=False) >= 0.5
            cy, cx = (cy + 0.5) * scale - 0.5, (cx + 0.5) * scale - 0.5
        area = int(local.sum())
        margin = int(np.ceil(np.sqrt(area / min(_UNIT_AREA.values())))) + 2
        cy, cx = cy + margin, cx + margin
        target = np.pad(local, margin)
        best, best_iou = SHAPES[0], -1.0
        for shape in SHAPES:
            radius = np.sqrt(area / _UNIT_AREA[shape])
            steps = 1 if _PERIOD[shape] == 0 else self.angle_steps
            for angle in np.arange(steps) * (_PERIOD[shape] / steps):
                template = np.zeros_like(target)
                template[shape_coordinates(shape, (cy, cx), radius, angle, target.shape)] = True
                union = np.count_nonzero(template | target)
                iou = np.count_nonzero(template & target) / union if union else 0.0
                if iou > best_iou:
                    best, best_iou = shape, iou
        return best


@register_segmenter("shapes")
class ShapesSegmenter(ReferringSegmenter):
    """Colour + shape + size words -> connected components of a flat-coloured synthetic image.

    Args:
        colour_tolerance: largest per-channel difference (0-255) between a pixel and a vocabulary colour for the
            pixel to take that colour; the synthetic background stays far outside it.
        min_area: components with fewer pixels are ignored.
        size_ratio: "large" / "small" split the matching components at the largest gap between consecutive areas
            when that gap is at least this ratio; below it all components count as one size and are all kept.
        angle_steps: rotations tried per shape period when matching templates.
        device, dtype: accepted so a recipe can switch backends by name alone; this backend runs on the CPU.
    """

    def __init__(
        self,
        colour_tolerance: int = 30,
        min_area: int = 4,
        size_ratio: float = 1.5,
        angle_steps: int = 24,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        if not 0 <= colour_tolerance <= 255:
            raise ValueError(f"colour_tolerance must be in [0, 255], got {colour_tolerance}")
        if min_area < 1 or angle_steps < 1 or size_ratio < 1:
            raise ValueError(
                f"need min_area >= 1, angle_steps >= 1 and size_ratio >= 1, got {min_area}, {angle_steps}, "
                f"{size_ratio}"
            )
        self.colour_tolerance = colour_tolerance
        self.min_area = min_area
        self.size_ratio = size_ratio
        self.angle_steps = angle_steps

    def _segment_regions(self, images, expressions):
        results = []
        for image, selected in zip(images, self._select(images, expressions)):
            mask = np.zeros((image.height, image.width), dtype=np.float32)
            for component in selected:
                mask[component.mask] = 1.0
            results.append((mask, 1.0 if selected else 0.0))
        return results

    def _segment_instances(self, images, expressions):
        return [
            [(component.mask.astype(np.float32), 1.0) for component in selected]
            for selected in self._select(images, expressions)
        ]

    def _select(self, images: list[Image.Image], expressions: list[str]) -> list[list[_Component]]:
        scenes: dict[int, list[_Component]] = {}  # one analysis per image object in the batch
        selections = []
        for image, expression in zip(images, expressions):
            description = parse_description(expression)
            if description.empty:
                selections.append([])
                continue
            if id(image) not in scenes:
                scenes[id(image)] = self._components(image)
            selections.append(self._match(scenes[id(image)], description))
        return selections

    def _components(self, image: Image.Image) -> list[_Component]:
        from skimage.measure import label, regionprops

        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        # A pixel within the tolerance of a colour has a channel spread (max - min) of at least that colour's spread
        # minus twice the tolerance, so only such pixels (the objects, not the grey background) need distances.
        spread = pixels.max(axis=-1) - pixels.min(axis=-1)
        candidates = spread >= _PALETTE_SPREAD - 2 * self.colour_tolerance
        distance = np.abs(pixels[candidates][:, None, :] - _PALETTE[None]).max(axis=-1)  # candidates x colours
        colour_map = np.zeros(spread.shape, dtype=np.int64)
        colour_map[candidates] = np.where(distance.min(axis=-1) <= self.colour_tolerance, distance.argmin(-1) + 1, 0)
        labels = label(colour_map, background=0, connectivity=2)
        components = []
        for region in regionprops(labels):
            if region.area < self.min_area:
                continue
            row, col = region.coords[0]
            components.append(
                _Component(
                    colour=_PALETTE_NAMES[colour_map[row, col] - 1],
                    mask=labels == region.label,
                    local=region.image,
                    centroid=tuple(region.centroid_local),
                    angle_steps=self.angle_steps,
                )
            )
        return components

    def _match(self, components: list[_Component], description: Description) -> list[_Component]:
        matches = [
            c
            for c in components
            if (description.colour is None or c.colour == description.colour)
            and (description.shape is None or c.shape == description.shape)
        ]
        if description.size is None or len(matches) < 2:
            return matches
        areas = sorted(c.area for c in matches)
        ratios = [larger / smaller for smaller, larger in zip(areas, areas[1:])]
        gap = int(np.argmax(ratios))
        if ratios[gap] < self.size_ratio:
            return matches
        threshold = areas[gap + 1]
        if description.size == "large":
            return [c for c in matches if c.area >= threshold]
        return [c for c in matches if c.area < threshold]
