"""A procedural saliency benchmark with exact ground truth: the embedded default for demos and tests.

Every row is drawn with scikit-image from its own random stream (`seed`, `split`, `task`, row index), so row *i*
is the same whatever `num_samples` is, and the three splits never share a stream.

- **SOD**: one object is the odd one out by a stated `rule` -- its colour (the distractors share another
  colour), its shape (the distractors share another shape) or its size (it is large, the distractors small).
  Its expression names colour and shape ("the red circle"; "the large red circle" under the size rule).
- **SIS**: several salient instances, each with its own (colour, shape) pair and expression, among smaller
  clutter whose (colour, shape) pairs differ from every instance's. Ground truth is COCO RLE in `instances`.
- **CoSOD**: a group of images sharing one object of the same colour and shape (pose, size and position vary)
  among varying distractors; no other (colour, shape) pair occurs in every image of the group. A row carries
  the whole group in `images` / `masks` and one shared expression.

Contract with the weight-free `shapes` segmenter (which finds components by colour, classifies their shape by
template matching and returns the best fit to an expression, so a partly wrong expression still earns graded
credit), kept by construction:

- objects are solid, exactly one `vocabulary.COLOURS` RGB value each, with no anti-aliasing;
- objects never overlap or touch each other (a gap of at least `GAP` pixels between their circumscribed
  circles) and never touch the image border (at least `GAP` pixels away);
- a (colour, shape) pair named by an expression occurs once per image, so an exact expression picks one object;
- the background is grey-ish texture: every channel within [60, 200] and channels within about 20 levels of
  each other, far from every vocabulary colour.

Besides the contract columns (`cgpo_trl.data.rows.ROW_FEATURES`) rows carry `expressions` (what the solution
names), `rule` (SOD's odd-one-out rule, else "") and `scene` (per image, every object's colour, shape, radius,
bounding box and whether it is salient), which the template teacher of `cgpo_trl.data.reasoning` narrates.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from datasets import Dataset, Features, List, Value
from PIL import Image
from skimage.transform import resize

from ..saliency.prompts import TASKS, build_prompt
from ..saliency.tags import format_answer
from ..saliency.vocabulary import COLOURS, SHAPES, describe, shape_coordinates
from .rows import ROW_FEATURES, encode_instances

RULES: tuple[str, ...] = ("colour", "shape", "size", "mixed")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
GAP = 2
"""Minimum number of background pixels between two objects and between an object and the border."""

# Radii as a fraction of the image side (before `object_scale`), and per-role size factors.
_BASE_RADIUS = 0.09
_LARGE, _SMALL, _CLUTTER = 1.45, 0.65, 0.6
# Polygons are drawn on a larger circumscribed circle so every shape covers a similar area at one radius.
_SHAPE_SCALE = {"circle": 1.0, "square": 1.15, "triangle": 1.35, "star": 1.25}
_LAYOUT_TRIES = 50
_SYMMETRY = {"circle": 1, "square": 4, "triangle": 3, "star": 5}
_COLOUR_NAMES = tuple(COLOURS)
_RGB = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLOURS.items()}
# For each colour, the other colours ordered from nearest to farthest in RGB.
_NEAREST = {
    c: sorted((o for o in _COLOUR_NAMES if o != c), key=lambda o, c=c: float(np.linalg.norm(_RGB[c] - _RGB[o])))
    for c in _COLOUR_NAMES
}

OBJECT_FEATURES = {
    "colour": Value("string"),
    "shape": Value("string"),
    "radius": Value("float32"),
    "salient": Value("bool"),
    "bbox": List(Value("int32")),
}
SYNTHETIC_FEATURES = Features(
    {
        **ROW_FEATURES,
        "expressions": List(Value("string")),
        "rule": Value("string"),
        "scene": List(List(OBJECT_FEATURES)),
    }
)
"""Contract columns plus `expressions`, `rule` and `scene` (bbox is [x, y, width, height], COCO order)."""


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic benchmark. Ranges are inclusive `(low, high)` pairs drawn uniformly per row."""

    task: str = field(default="sod", metadata={"help": "One of 'sod', 'sis', 'cosod'."})
    num_samples: int = field(default=1000, metadata={"help": "Rows to generate (CoSOD: groups)."})
    split: str = field(default="train", metadata={"help": "One of 'train', 'validation', 'test' (own stream)."})
    seed: int = field(default=0, metadata={"help": "Base seed; rows are deterministic given (seed, split, task)."})
    image_size: int = field(default=56, metadata={"help": "Side of the square images in pixels (>= 24)."})
    rule: str = field(
        default="colour",
        metadata={"help": "SOD odd-one-out rule: 'colour', 'shape', 'size', or 'mixed' (one rule drawn per row)."},
    )
    num_distractors: tuple[int, int] = field(
        default=(2, 3),
        metadata={"help": "Distractors per SOD / CoSOD image; SOD needs >= 2 so the odd one out is defined."},
    )
    colour_similarity: float = field(
        default=0.0,
        metadata={
            "help": "Probability that a distractor colour is one of the two vocabulary colours nearest the "
            "target's (e.g. orange or pink next to red); 0 draws distractor colours uniformly."
        },
    )
    single_object_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Curriculum: fraction of images with no distractors / clutter, only the salient object(s). "
            "The CPU demo needed 0.5 on its training set to leave the chance plateau."
        },
    )
    object_scale: float = field(
        default=1.2, metadata={"help": "Multiplies every object's radius (base radius: 9% of the image side)."}
    )
    texture_strength: float = field(
        default=0.5, metadata={"help": "Amplitude of the grey background texture, 0 (flat) to 2 (strong)."}
    )
    num_instances: tuple[int, int] = field(default=(2, 3), metadata={"help": "Salient instances per SIS image."})
    num_clutter: tuple[int, int] = field(default=(2, 4), metadata={"help": "Small clutter objects per SIS image."})
    group_size: tuple[int, int] = field(default=(3, 6), metadata={"help": "Images per CoSOD group."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"SyntheticConfig.task must be one of {list(TASKS)}, got {self.task!r}")
        if self.split not in SPLITS:
            raise ValueError(f"SyntheticConfig.split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.rule not in RULES:
            raise ValueError(f"SyntheticConfig.rule must be one of {list(RULES)}, got {self.rule!r}")
        if self.num_samples < 0:
            raise ValueError(f"SyntheticConfig.num_samples must be >= 0, got {self.num_samples}")
        if self.image_size < 24:
            raise ValueError(f"SyntheticConfig.image_size must be >= 24 pixels, got {self.image_size}")
        for name in ("num_distractors", "num_instances", "num_clutter", "group_size"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or value[0] < 0 or value[0] > value[1]:
                raise ValueError(
                    f"SyntheticConfig.{name} must be a (low, high) pair with 0 <= low <= high, got {value}"
                )
            setattr(self, name, (int(value[0]), int(value[1])))
        if self.task == "sod" and self.num_distractors[0] < 2:
            raise ValueError(
                f"SyntheticConfig.num_distractors={self.num_distractors}: SOD needs at least 2 distractors so the "
                "odd one out is defined; use single_object_fraction for images with the target alone"
            )
        if self.num_instances[0] < 1:
            raise ValueError(f"SyntheticConfig.num_instances must start at >= 1, got {self.num_instances}")
        if self.num_instances[1] > len(COLOURS) * len(SHAPES):
            raise ValueError(f"SyntheticConfig.num_instances={self.num_instances} exceeds the distinct objects")
        if self.group_size[0] < 2:
            raise ValueError(f"SyntheticConfig.group_size must start at >= 2 images, got {self.group_size}")
        for name, high in (("colour_similarity", 1.0), ("single_object_fraction", 1.0), ("texture_strength", 2.0)):
            if not 0.0 <= getattr(self, name) <= high:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, {high}], got {getattr(self, name)}")
        if self.object_scale <= 0:
            raise ValueError(f"SyntheticConfig.object_scale must be > 0, got {self.object_scale}")


@dataclass
class _Object:
    colour: str
    shape: str
    radius: float  # nominal radius (before the per-shape scale)
    salient: bool


def _outer_radius(obj: _Object) -> float:
    return obj.radius * _SHAPE_SCALE[obj.shape]


def _draw(obj: _Object, centre: tuple[float, float], angle: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (rows, cols) covered by `obj` centred at (row, col)."""
    return shape_coordinates(obj.shape, centre, _outer_radius(obj), angle, (size, size))


def _background(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    grey = rng.uniform(100.0, 160.0)
    coarse = rng.normal(0.0, 1.0, (max(2, size // 8), max(2, size // 8)))
    smooth = resize(coarse, (size, size), order=1, mode="reflect", anti_aliasing=False)
    luminance = grey + strength * (22.0 * smooth + 8.0 * rng.normal(0.0, 1.0, (size, size)))
    tint = rng.uniform(-6.0, 6.0, 3)
    return np.clip(luminance[..., None] + tint, 60.0, 200.0)


def _place(rng, objects: list[_Object], size: int, required: int) -> list[tuple[float, float]]:
    """Centres for `objects` with no two touching and none touching the border.

    The first `required` objects must fit: the whole layout is redrawn up to `_LAYOUT_TRIES` times before a
    ValueError. Later objects that do not fit are dropped (removed from `objects`).
    """
    for obj in objects:
        r = _outer_radius(obj)
        if size - 1 - 2 * (r + GAP) < 0:
            raise ValueError(
                f"an object of radius {r:.1f}px does not fit a {size}px image; lower object_scale or raise image_size"
            )
    for _ in range(_LAYOUT_TRIES):
        centres: list[tuple[float, float]] = []
        radii: list[float] = []
        kept: list[_Object] = []
        for i, obj in enumerate(objects):
            r = _outer_radius(obj)
            candidates = rng.uniform(r + GAP, size - 1 - r - GAP, (32, 2))
            ok = np.ones(len(candidates), dtype=bool)
            for (py, px), pr in zip(centres, radii):
                ok &= np.hypot(candidates[:, 0] - py, candidates[:, 1] - px) >= r + pr + GAP + 1
            hits = np.flatnonzero(ok)
            if len(hits):
                centres.append((float(candidates[hits[0], 0]), float(candidates[hits[0], 1])))
                radii.append(r)
                kept.append(obj)
            elif i < required:
                break
        else:
            objects[:] = kept
            return centres
    raise ValueError(
        f"could not place {required} objects without overlap in a {size}px image; lower object_scale or the "
        "object counts, or raise image_size"
    )


def _render(rng, objects: list[_Object], config: SyntheticConfig, required: int):
    """Draw one image. Returns (RGB uint8 image, one bool mask per kept object, scene records); `objects` may shrink."""
    size = config.image_size
    centres = _place(rng, objects, size, required)
    image = _background(rng, size, config.texture_strength)
    masks, scene = [], []
    for obj, centre in zip(objects, centres):
        angle = rng.uniform(0.0, 2 * np.pi / _SYMMETRY[obj.shape])
        rows, cols = _draw(obj, centre, angle, size)
        image[rows, cols] = _RGB[obj.colour]
        mask = np.zeros((size, size), dtype=bool)
        mask[rows, cols] = True
        masks.append(mask)
        x0, y0 = int(cols.min()), int(rows.min())
        bbox = [x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1]
        scene.append({**asdict(obj), "bbox": bbox})
    return image.round().astype(np.uint8), masks, scene


def _distractor_colour(rng, target: str, similarity: float, exclude: tuple[str, ...] = ()) -> str:
    if rng.random() < similarity:
        pool = [c for c in _NEAREST[target][:2] if c not in exclude] or [
            c for c in _NEAREST[target] if c not in exclude
        ]
    else:
        pool = [c for c in _COLOUR_NAMES if c != target and c not in exclude]
    return pool[rng.integers(len(pool))]


def _choice(rng, items):
    return items[rng.integers(len(items))]


def _count(rng, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _sod_row(rng, config: SyntheticConfig) -> dict:
    radius = config.image_size * _BASE_RADIUS * config.object_scale
    rule = _choice(rng, RULES[:3]) if config.rule == "mixed" else config.rule
    colour, shape = _choice(rng, _COLOUR_NAMES), _choice(rng, SHAPES)
    alone = rng.random() < config.single_object_fraction
    n = 0 if alone else _count(rng, config.num_distractors)
    target = _Object(colour, shape, radius * (_LARGE if rule == "size" else 1.0), True)
    distractors = []
    if rule == "colour":
        shared = _distractor_colour(rng, colour, config.colour_similarity)
        distractors = [_Object(shared, _choice(rng, SHAPES), radius, False) for _ in range(n)]
    elif rule == "shape":
        shared = _choice(rng, [s for s in SHAPES if s != shape])
        # Half the distractors share the target's colour, so only the shape tells it apart.
        colours = [
            colour if rng.random() < 0.5 else _distractor_colour(rng, colour, config.colour_similarity)
            for _ in range(n)
        ]
        distractors = [_Object(c, shared, radius, False) for c in colours]
    else:  # size: small distractors of any (colour, shape) except the target's
        for _ in range(n):
            d_colour = _distractor_colour(rng, colour, config.colour_similarity) if rng.random() < 0.5 else colour
            d_shape = _choice(rng, [s for s in SHAPES if s != shape]) if d_colour == colour else _choice(rng, SHAPES)
            distractors.append(_Object(d_colour, d_shape, radius * _SMALL, False))
    objects = [target, *distractors]
    # The odd one out needs two distractors to be defined: those must fit, further ones may be dropped.
    image, masks, scene = _render(rng, objects, config, required=min(3, len(objects)))
    expression = describe(colour, shape, "large" if rule == "size" else None)
    return {
        "images": [image],
        "masks": [masks[0]],
        "instances": [],
        "group": "",
        "expressions": [expression],
        "solution": format_answer(regions=[expression]),
        "rule": rule,
        "scene": [scene],
    }


def _sis_row(rng, config: SyntheticConfig) -> dict:
    radius = config.image_size * _BASE_RADIUS * config.object_scale
    pairs = [(c, s) for c in _COLOUR_NAMES for s in SHAPES]
    order = rng.permutation(len(pairs))
    n = _count(rng, config.num_instances)
    chosen = [pairs[i] for i in order[:n]]
    free = [pairs[i] for i in order[n:]]
    alone = rng.random() < config.single_object_fraction
    clutter = [] if alone else [free[i] for i in rng.choice(len(free), _count(rng, config.num_clutter))]
    objects = [_Object(c, s, radius, True) for c, s in chosen]
    objects += [_Object(c, s, radius * _CLUTTER, False) for c, s in clutter]
    image, masks, scene = _render(rng, objects, config, required=n)
    expressions = [describe(c, s) for c, s in chosen]
    return {
        "images": [image],
        "masks": [],
        "instances": encode_instances(masks[:n]),
        "group": "",
        "expressions": expressions,
        "solution": format_answer(instances=expressions),
        "rule": "",
        "scene": [scene],
    }


def _cosod_row(rng, config: SyntheticConfig, index: int) -> dict:
    radius = config.image_size * _BASE_RADIUS * config.object_scale
    common = (_choice(rng, _COLOUR_NAMES), _choice(rng, SHAPES))
    others = [(c, s) for c in _COLOUR_NAMES for s in SHAPES if (c, s) != common]
    size = _count(rng, config.group_size)
    plans: list[list[tuple[str, str]]] = []
    for _ in range(size):
        n = 0 if rng.random() < config.single_object_fraction else _count(rng, config.num_distractors)
        plans.append([others[i] for i in rng.choice(len(others), n, replace=False)])
    # No pair but the common one may occur in every image: drop such pairs from the last image.
    shared = set.intersection(*(set(p) for p in plans))
    plans[-1] = [p for p in plans[-1] if p not in shared]
    images, masks, scenes = [], [], []
    for plan in plans:
        objects = [_Object(*common, radius * rng.uniform(0.8, 1.25), True)]
        objects += [_Object(c, s, radius * rng.uniform(0.8, 1.1), False) for c, s in plan]
        image, object_masks, scene = _render(rng, objects, config, required=1)
        images.append(image)
        masks.append(object_masks[0])
        scenes.append(scene)
    expression = describe(*common)
    return {
        "images": images,
        "masks": masks,
        "instances": [],
        "group": f"{config.split}-{index:05d}-{common[0]}-{common[1]}",
        "expressions": [expression],
        "solution": format_answer(regions=[expression]),
        "rule": "",
        "scene": scenes,
    }


_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_TASK_IDS = {name: i for i, name in enumerate(TASKS)}


def generate_rows(config: SyntheticConfig) -> Iterator[dict]:
    """Yield rows with numpy images / bool masks (before Arrow encoding); row i depends only on (config, i)."""
    for index in range(config.num_samples):
        rng = np.random.default_rng([config.seed, _SPLIT_IDS[config.split], _TASK_IDS[config.task], index])
        if config.task == "sod":
            row = _sod_row(rng, config)
        elif config.task == "sis":
            row = _sis_row(rng, config)
        else:
            row = _cosod_row(rng, config, index)
        row["task"] = config.task
        row["prompt"] = build_prompt(config.task, len(row["images"]))
        yield row


def _png(array: np.ndarray, mode: str) -> dict:
    # Encode once, fast (datasets would re-encode PIL images at its default, slower compression).
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _to_arrow_row(row: dict) -> dict:
    row = dict(row)
    row["images"] = [_png(image, "RGB") for image in row["images"]]
    row["masks"] = [_png(mask.astype(np.uint8) * 255, "L") for mask in row["masks"]]
    return row


def generate_synthetic(config: SyntheticConfig | None = None, **overrides) -> Dataset:
    """Generate the synthetic benchmark as a `datasets.Dataset` with `SYNTHETIC_FEATURES`.

    `generate_synthetic(task="cosod", num_samples=50)` is a shorthand for passing a `SyntheticConfig`.
    """
    if config is None:
        config = SyntheticConfig(**overrides)
    elif overrides:
        config = SyntheticConfig(**{**asdict(config), **overrides})
    columns: dict[str, list] = {name: [] for name in SYNTHETIC_FEATURES}
    for row in generate_rows(config):
        for name, value in _to_arrow_row(row).items():
            columns[name].append(value)
    return Dataset.from_dict(columns, features=SYNTHETIC_FEATURES)


__all__ = [
    "GAP",
    "RULES",
    "SPLITS",
    "SYNTHETIC_FEATURES",
    "SyntheticConfig",
    "generate_rows",
    "generate_synthetic",
]
