"""Reward functions for Saliency-R1, with TRL's signature `f(prompts, completions, **columns) -> list[float | None]`.

Every value is in [0, 1]; `None` means "not applicable to this row" (e.g. the `sis` reward on a SOD row), which TRL
leaves out of the weighted sum. Rewards are objects so they can hold a segmenter and options, and are registered by
name so a YAML recipe can list them:

```python
segmenter = load_segmenter("shapes")
reward_funcs = get_reward_funcs(["format", "saliency"], segmenter=segmenter, eos_token_ids=[tokenizer.eos_token_id])
# or, from strings only (a recipe): build_reward_funcs(["format", "saliency"], segmenter="shapes")
```

Task rewards parse the answer first: a malformed answer (see `tags.parse_answer`) scores 0 and never reaches the
segmenter. All (image, expression) pairs of a batch go to the segmenter in one call; if that call fails, the rows
are retried one by one and a row whose segmentation still fails (an error, or a NaN / out-of-range mask, which the
segmenter protocol rejects) scores 0 and is counted in the `<reward>/segmenter_failures` metric (logged through
TRL's `log_metric`), so one bad sample never stops a run. A broken segmenter does: when more than
`max_failure_rate` of the segmented rows fail in `max_failed_calls` consecutive calls, the reward raises.

"Nothing is salient" has one correct answer: an empty `<answer></answer>` (`read_answer`). It is well-formed, and a
task reward gives it 1 on a row whose ground truth is empty (an SIS image without instances, an all-background
mask) and 0 on any other row; any expression on an empty ground truth scores as a false positive.
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from .diagnostics import expression_diagnostics
from .prompts import TASKS
from .segmenters.base import ReferringSegmenter
from .tags import NO_EXPRESSION as NO_EXPRESSION  # re-exported: the problem `read_answer` accepts
from .tags import ParsedAnswer, TagLimits, parse_answer

logger = logging.getLogger(__name__)

REWARDS: dict[str, type[RewardFunction]] = {}

REGION_METRICS: tuple[str, ...] = ("smeasure", "iou", "fbeta")
"""Region quality measures for SOD / CoSOD, computed with pysodmetrics on the predicted mask: S-measure
(alpha 0.5) on the soft mask; IoU and F-beta (beta^2 = 0.3, the SOD convention) on the mask thresholded at 0.5."""


def register_reward(name: str) -> Callable[[type[RewardFunction]], type[RewardFunction]]:
    """Class decorator: make a reward buildable by name with `get_reward_funcs([name], **options)`."""

    def decorator(cls: type[RewardFunction]) -> type[RewardFunction]:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward name {name!r} is already registered by {REWARDS[name].__qualname__}")
        REWARDS[name] = cls
        cls.name = name
        return cls

    return decorator


def list_rewards() -> list[str]:
    return sorted(REWARDS)


def get_reward_funcs(names: Sequence[str], **options) -> list[RewardFunction]:
    """Build the rewards called `names`. Each receives the `options` its constructor accepts (e.g. `segmenter`,
    `metric`, `eos_token_ids`); an option that none of them accepts is an error, so a typo cannot pass silently."""
    if isinstance(names, str):
        names = [names]
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; available: {list_rewards()}")
    factories = [REWARDS[name] for name in names]
    accepted = [set(inspect.signature(factory).parameters) for factory in factories]
    unused = set(options) - set().union(*accepted)
    if unused:
        raise ValueError(f"reward option(s) {sorted(unused)} are not accepted by any of the rewards {list(names)}")
    return [
        factory(**{key: value for key, value in options.items() if key in keys})
        for factory, keys in zip(factories, accepted)
    ]


def build_reward_funcs(
    names: Sequence[str],
    segmenter: str | ReferringSegmenter | None = None,
    segmenter_kwargs: Mapping | None = None,
    **options,
) -> list[RewardFunction]:
    """`get_reward_funcs` for recipes: `segmenter` may be a registered name (loaded once with `segmenter_kwargs`,
    behind one shared cache) or an instance; the segmenter is passed only to the rewards that take one."""
    if isinstance(segmenter, str):
        from .segmenters import load_segmenter

        segmenter = load_segmenter(segmenter, **dict(segmenter_kwargs or {}))
    elif segmenter_kwargs:
        raise ValueError("segmenter_kwargs applies only when segmenter is given by name")
    names = [names] if isinstance(names, str) else list(names)
    takes_segmenter = any("segmenter" in inspect.signature(REWARDS[n]).parameters for n in names if n in REWARDS)
    if segmenter is not None and takes_segmenter:
        options["segmenter"] = segmenter
    return get_reward_funcs(names, **options)


def read_answer(text: str, task: str | None = None, limits: TagLimits | None = None) -> ParsedAnswer:
    """`parse_answer` with `allow_empty=True`: an empty `<answer></answer>` is the well-formed "nothing is salient".

    Rewards and prediction read answers through this one function, so they agree on what is well-formed."""
    return parse_answer(text, task=task, limits=limits, allow_empty=True)


def completion_text(completion) -> str:
    """The text of a completion: a plain string, or a conversation whose assistant turns have string content or
    lists of `{"type": "text", "text": ...}` blocks. Anything else reads as empty (and so as malformed)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if not isinstance(completion, Sequence):
        return ""
    parts = []
    for message in completion:
        if not isinstance(message, Mapping) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, Sequence):
            parts.extend(
                block["text"]
                for block in content
                if isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str)
            )
    return "".join(parts)


class RewardFunction(abc.ABC):
    """Base of the registered rewards: a callable with TRL's reward signature and a `__name__` for TRL's logs."""

    name: str = "reward"

    def __init__(self):
        self.__name__ = self.name

    @abc.abstractmethod
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float | None]:
        """One value in [0, 1] (or None: not applicable) per completion."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@register_reward("format")
class FormatReward(RewardFunction):
    """1.0 for a well-formed answer that ends cleanly, else 0.0.

    Well-formed: `parse_answer` finds no problem with the row's `task` (right tag type, nothing but whitespace after
    `</answer>`, limits respected) and, with `require_think`, a `<think>` block is present. Ending cleanly: the
    completion stopped on an end-of-sequence token, not at the length cap — without this term a measured RL run
    learned to stop emitting EOS. The check reads TRL's `completion_ids` (which end with the EOS id when generation
    stopped on it): the last id is one of `eos_token_ids`, or the completion is shorter than `max_completion_length`
    (it stopped before the cap); with only `eos_token_ids` the first test decides, with neither only the text is
    checked.

    Args:
        eos_token_ids: id or ids that end a completion (see `eos_token_ids_of`).
        max_completion_length: the generation length cap (TRL's `max_completion_length`).
        require_think: require a `<think>...</think>` block before the answer.
        limits: tag limits (expression count and length).
    """

    def __init__(
        self,
        eos_token_ids: int | Sequence[int] | None = None,
        max_completion_length: int | None = None,
        require_think: bool = True,
        limits: TagLimits | None = None,
    ):
        super().__init__()
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = frozenset(eos_token_ids) if eos_token_ids is not None else None
        if max_completion_length is not None and max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
        self.max_completion_length = max_completion_length
        self.require_think = require_think
        self.limits = limits

    def __call__(self, prompts, completions, completion_ids=None, task=None, **kwargs) -> list[float]:
        tasks = _tasks(task, len(completions), default=None)
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        rewards = []
        for completion, row_task, row_ids in zip(completions, tasks, ids):
            parsed = read_answer(completion_text(completion), row_task, self.limits)
            well_formed = parsed.ok and (parsed.think is not None or not self.require_think)
            rewards.append(float(well_formed and self._terminated(row_ids)))
        return rewards

    def _terminated(self, ids: Sequence[int] | None) -> bool:
        if ids is None:
            return True
        if self.eos_token_ids is not None and len(ids) > 0 and int(ids[-1]) in self.eos_token_ids:
            return True
        if self.max_completion_length is not None:
            return len(ids) < self.max_completion_length
        return self.eos_token_ids is None


def eos_token_ids_of(processing_class, generation_config=None) -> list[int]:
    """The ids that end a generation, collected as TRL's GRPOTrainer does: the model's generation config
    `eos_token_id` (int or list) plus the tokenizer's `eos_token_id`. Accepts a tokenizer or a processor."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{type(processing_class).__name__} defines no eos_token_id")
    return ids


def region_quality(pred: np.ndarray, gt: np.ndarray, metric: str | Mapping[str, float] = "smeasure") -> float:
    """Quality in [0, 1] of a soft mask `pred` (float in [0, 1]) against a binary `gt` of the same shape.

    `metric` is one of `REGION_METRICS` or a weighted mix such as `{"smeasure": 0.5, "iou": 0.5}`.
    """
    import py_sod_metrics as psm

    weights = _metric_weights(metric)
    pred = np.clip(np.asarray(pred, dtype=np.float64), 0.0, 1.0)
    gt = np.asarray(gt, dtype=bool)
    values = {}
    if "smeasure" in weights:
        sm = psm.Smeasure()
        sm.step(pred, gt, normalize=False)
        values["smeasure"] = float(sm.get_results()["sm"])
    handlers = {
        "iou": lambda: psm.IOUHandler(with_dynamic=False, with_adaptive=False, with_binary=True),
        "fbeta": lambda: psm.FmeasureHandler(with_dynamic=False, with_adaptive=False, with_binary=True, beta=0.3),
    }
    binary = [name for name in handlers if name in weights]
    if binary and not gt.any():  # pysodmetrics gives 0 even to an empty prediction; nothing found is right here
        values.update(dict.fromkeys(binary, float(not (pred > 0.5).any())))
        binary = []
    if binary:
        fm = psm.FmeasureV2({name: handlers[name]() for name in binary})
        fm.step(pred, gt, normalize=False)
        results = fm.get_results()
        values.update({name: float(results[name]["binary"]) for name in binary})
    total = sum(weights[name] * values[name] for name in weights) / sum(weights.values())
    return float(np.clip(total, 0.0, 1.0))


def _metric_weights(metric: str | Mapping[str, float]) -> dict[str, float]:
    weights = {metric: 1.0} if isinstance(metric, str) else dict(metric)
    unknown = set(weights) - set(REGION_METRICS)
    if unknown or not weights:
        raise ValueError(f"metric must be one of {REGION_METRICS} or a mix of them, got {metric!r}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"metric weights must be >= 0 with a positive sum, got {weights}")
    return {name: float(w) for name, w in weights.items() if w > 0}


def instance_quality(preds: Sequence[np.ndarray], gt_rles: Sequence[dict]) -> float:
    """Match predicted instance masks to ground-truth instances (COCO RLE dicts) one-to-one by Hungarian matching on
    mask IoU, and return the summed IoU of the matches divided by max(#predicted, #ground truth): each missed and
    each spurious instance costs as much as a perfect match earns. No instance predicted for no instance is 1."""
    from pycocotools import mask as mask_utils
    from scipy.optimize import linear_sum_assignment

    if not preds or not gt_rles:
        return float(not preds and not gt_rles)
    gts = [{"size": list(r["size"]), "counts": _rle_bytes(r["counts"])} for r in gt_rles]
    height, width = gts[0]["size"]
    binary = np.stack([_fit(p, (height, width)) >= 0.5 for p in preds], axis=-1)
    encoded = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    ious = np.asarray(mask_utils.iou(encoded, gts, [0] * len(gts)), dtype=np.float64).reshape(len(preds), len(gts))
    rows, cols = linear_sum_assignment(ious, maximize=True)
    return float(ious[rows, cols].sum() / max(len(preds), len(gts)))


def _rle_bytes(counts):
    return counts.encode("ascii") if isinstance(counts, str) else counts


def _fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a predicted mask to the ground truth's size (bilinear), as evaluation toolkits do."""
    if mask.shape == tuple(shape):
        return mask
    resized = Image.fromarray(mask.astype(np.float32)).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _gt_mask(mask, where: str) -> np.ndarray:
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{where}: ground-truth mask must be 2-D (L image), got shape {mask.shape}")
    return mask > 128 if mask.dtype == np.uint8 else mask > 0.5


def _spread(count: int, cap: int | None) -> list[int]:
    """Indices of `cap` of `count` items, evenly spaced (all of them when they fit)."""
    if cap is None or count <= cap:
        return list(range(count))
    return sorted({int(k) for k in np.linspace(0, count - 1, cap).round()})


def _tasks(task, n: int, default: str | None) -> list[str | None]:
    if task is None:
        return [default] * n
    if isinstance(task, str):
        return [task] * n
    return list(task)


@register_reward("saliency")
class SaliencyReward(RewardFunction):
    """Task reward for every row, dispatched on its `task` column, so one run can mix SOD, SIS and CoSOD.

    - `sod`: the union (pixel-wise max) of the `<rg>` masks against `masks[0]`, scored by `metric`.
    - `cosod`: every `<rg>` expression segmented in every image of the group; mean over images of the quality of
      the union against that image's mask.
    - `sis`: one region mask per `<ins>` expression (region mode, so a plural expression cannot collect several
      instances at once), scored by `instance_quality` against the COCO RLE `instances`. Prediction
      (`cgpo_trl.predict`) turns each `<ins>` into a detection the same way.
    - an empty answer: 1 when the row's ground truth is empty, else 0 (see the module docstring).

    Args:
        segmenter: the referring segmenter (e.g. `load_segmenter("shapes")`).
        metric: region quality for SOD / CoSOD, see `region_quality`.
        limits: tag limits applied before segmentation.
        max_group_size: a CoSOD row with more images is scored on this many of them, evenly spaced (segmenter cost
            grows with every image); None scores every image.
        max_failure_rate, max_failed_calls: raise when more than this share of the segmented rows fails in this many
            consecutive calls: a broken segmenter stops the run instead of training on zero rewards.
    """

    tasks: tuple[str, ...] = TASKS

    def __init__(
        self,
        segmenter: ReferringSegmenter,
        metric: str | Mapping[str, float] = "smeasure",
        limits: TagLimits | None = None,
        max_group_size: int | None = 16,
        max_failure_rate: float = 0.5,
        max_failed_calls: int = 3,
    ):
        super().__init__()
        if max_group_size is not None and (not isinstance(max_group_size, int) or max_group_size < 1):
            raise ValueError(f"max_group_size must be a positive integer or None, got {max_group_size!r}")
        if not 0 <= max_failure_rate < 1:
            raise ValueError(f"max_failure_rate must be in [0, 1), got {max_failure_rate!r}")
        if not isinstance(max_failed_calls, int) or max_failed_calls < 1:
            raise ValueError(f"max_failed_calls must be a positive integer, got {max_failed_calls!r}")
        if not isinstance(segmenter, ReferringSegmenter):
            raise TypeError(
                f"reward {self.name!r} needs segmenter= a ReferringSegmenter (e.g. load_segmenter('shapes')), "
                f"got {type(segmenter).__name__}"
            )
        _metric_weights(metric)
        self.segmenter = segmenter
        self.metric = metric
        self.limits = limits
        self.max_group_size = max_group_size
        self.max_failure_rate = max_failure_rate
        self.max_failed_calls = max_failed_calls
        self._failed_calls = 0  # consecutive calls above max_failure_rate

    def __call__(
        self,
        prompts,
        completions,
        images=None,
        task=None,
        masks=None,
        instances=None,
        log_metric=None,
        **kwargs,
    ) -> list[float | None]:
        n = len(completions)
        if task is None and len(self.tasks) > 1:
            raise ValueError(f"reward {self.name!r} needs the `task` column to tell SOD, SIS and CoSOD rows apart")
        tasks = _tasks(task, n, default=self.tasks[0])
        if images is None and "image" in kwargs:  # TRL's single-image column
            images = [[image] for image in kwargs["image"]]
        rewards: list[float | None] = [None] * n
        jobs: dict[int, tuple[list[Image.Image], list[str]]] = {}  # row -> (its images, its expressions)
        ground_truths: dict[int, list] = {}  # row -> the masks of the images in jobs (SOD, CoSOD)
        malformed = 0
        for i, (completion, row_task) in enumerate(zip(completions, tasks)):
            if row_task not in self.tasks:
                if row_task not in TASKS:
                    raise ValueError(f"row {i}: unknown task {row_task!r}; expected one of {list(TASKS)}")
                continue
            parsed = read_answer(completion_text(completion), row_task, self.limits)
            if not parsed.ok:
                rewards[i] = 0.0
                malformed += 1
                continue
            expressions = parsed.instances if row_task == "sis" else parsed.regions
            row_images = self._row_images(images, i, row_task)
            gts = None if row_task == "sis" else self._row_masks(masks, i, len(row_images))
            if not expressions:  # "nothing is salient": right exactly when the ground truth is empty
                if gts is None:
                    empty_truth = not self._column(instances, "instances", i)
                else:
                    empty_truth = not any(_gt_mask(gt, f"row {i} `masks`").any() for gt in gts)
                rewards[i] = float(empty_truth)
                continue
            kept = _spread(len(row_images), self.max_group_size)
            jobs[i] = ([row_images[k] for k in kept], expressions)
            if gts is not None:
                ground_truths[i] = [gts[k] for k in kept]

        segmented, failures, last_error = self._segment(jobs)
        self._count_failures(failures, len(jobs), last_error)
        for i, masks_per_image in segmented.items():
            if masks_per_image is None:
                rewards[i] = 0.0
            elif tasks[i] == "sis":
                rewards[i] = instance_quality(masks_per_image[0], self._column(instances, "instances", i))
            else:
                rewards[i] = self._region_reward(i, masks_per_image, ground_truths[i])
        if log_metric is not None:
            log_metric(f"{self.name}/segmenter_failures", float(failures))
            log_metric(f"{self.name}/malformed", malformed / max(1, sum(t in self.tasks for t in tasks)))
            written = [expression for _, expressions in jobs.values() for expression in expressions]
            for key, value in expression_diagnostics(written).items():  # collapse diagnosis, see diagnostics.py
                log_metric(f"{self.name}/{key}", value)
        return rewards

    @staticmethod
    def _row_images(images, i: int, task: str) -> list[Image.Image]:
        if images is None:
            raise ValueError("saliency rewards need the `images` column (a list of PIL images per row)")
        row = images[i]
        row = [row] if isinstance(row, Image.Image) else list(row)
        if not row or (task != "cosod" and len(row) != 1):
            raise ValueError(
                f"row {i}: a {task} row needs {'one image' if task != 'cosod' else 'images'}, got {len(row)}"
            )
        for image in row:
            if not isinstance(image, Image.Image):
                raise TypeError(f"row {i}: `images` must hold PIL images (decoded), got {type(image).__name__}")
        return row

    def _row_masks(self, masks, i: int, num_images: int) -> list:
        gts = self._column(masks, "masks", i)
        gts = [gts] if isinstance(gts, Image.Image) else list(gts)
        if len(gts) != num_images:
            raise ValueError(f"row {i}: {num_images} images but {len(gts)} ground-truth masks in `masks`")
        return gts

    def _count_failures(self, failures: int, attempted: int, last_error: str | None) -> None:
        """Stop the run once the segmenter has failed on most rows for `max_failed_calls` calls in a row."""
        if not attempted:
            return
        self._failed_calls = self._failed_calls + 1 if failures / attempted > self.max_failure_rate else 0
        if self._failed_calls >= self.max_failed_calls:
            raise RuntimeError(
                f"reward {self.name!r}: segmenter {self.segmenter.name!r} failed on more than "
                f"{self.max_failure_rate:.0%} of the rows in each of the last {self._failed_calls} calls (last call: "
                f"{failures} of {attempted} rows; last error: {last_error}). Training on these zero rewards would be "
                "meaningless; fix the segmenter (checkpoint, device, memory) or raise max_failure_rate / "
                "max_failed_calls in reward_kwargs."
            )

    def _segment(self, jobs: dict[int, tuple[list, list]]) -> tuple[dict[int, list[list] | None], int, str | None]:
        """Masks per row, per image, per expression: one batched segmenter call for every pair of every row; if it
        fails, one call per row to find the rows that fail (None). Also the failure count and the last error."""
        if not jobs:
            return {}, 0, None
        pairs = {i: [(image, e) for image in images for e in expressions] for i, (images, expressions) in jobs.items()}
        try:
            flat = self.segmenter.segment(
                [image for row in pairs.values() for image, _ in row], [e for row in pairs.values() for _, e in row]
            )
        except Exception as error:  # any backend failure is isolated per row below
            logger.warning("segmenter %r failed on a batch (%s); retrying row by row", self.segmenter.name, error)
            flat = None
        segmented, failures, start, last_error = {}, 0, 0, None
        for i, row in pairs.items():
            if flat is not None:
                results, start = flat[start : start + len(row)], start + len(row)
            else:
                try:
                    results = self.segmenter.segment([image for image, _ in row], [e for _, e in row])
                except Exception as error:
                    logger.warning("segmenter %r failed on row %d: %s", self.segmenter.name, i, error)
                    segmented[i] = None
                    failures += 1
                    last_error = f"{type(error).__name__}: {error}"
                    continue
            width = len(jobs[i][1])
            segmented[i] = [[mask for mask, _ in results[k : k + width]] for k in range(0, len(results), width)]
        return segmented, failures, last_error

    @staticmethod
    def _column(values, name: str, i: int):
        if values is None:
            raise ValueError(f"saliency rewards need the `{name}` column for this task (see the data contract)")
        return values[i]

    def _region_reward(self, i: int, masks_per_image: list[list[np.ndarray]], gts: list) -> float:
        scores = []
        for masks, gt in zip(masks_per_image, gts):
            gt = _gt_mask(gt, f"row {i} `masks`")
            scores.append(region_quality(_fit(np.maximum.reduce(masks), gt.shape), gt, self.metric))
        return float(np.mean(scores))


@register_reward("sod")
class SODReward(SaliencyReward):
    """SOD rows only (None on other rows): the `<rg>` masks' union against the ground-truth mask."""

    tasks = ("sod",)


@register_reward("sis")
class SISReward(SaliencyReward):
    """SIS rows only (None on other rows): `<ins>` masks Hungarian-matched to the ground-truth instances."""

    tasks = ("sis",)


@register_reward("cosod")
class CoSODReward(SaliencyReward):
    """CoSOD rows only (None on other rows): the group expression segmented in every image; mean quality."""

    tasks = ("cosod",)
