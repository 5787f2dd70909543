"""The two-stage Saliency-R1 pipeline as library code: script arguments, data mixtures, policy loading, trainer
assembly, checkpoints and the model card.

`recipes/sft_saliency.py` (stage 1) and `recipes/cgpo_saliency.py` (stage 2) are thin `TrlParser` front ends over
this module, and `recipes/demo.py` (`make demo`) calls the same functions in-process, so the commands in the README and the demo
exercise one code path. Everything a run needs comes from three dataclasses, filled from `--config X.yaml` and
overridable on the command line:

- [`SaliencyScriptArguments`]: datasets and their mixing weights, the referring segmenter, the reward functions,
  and which RL trainer (`cgpo` or the `grpo` baseline) stage 2 uses;
- `CGPOConfig` (stage 2) or `trl.SFTConfig` (stage 1);
- `trl.ModelConfig`: the checkpoint (or `tiny-random`, a tiny offline Qwen2.5-VL), dtype and LoRA (`use_peft`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny-random"
"""`model_name_or_path` sentinel: build `cgpo_trl.testing.build_tiny_vlm` offline (seeded by the run's seed)."""

DISK = "disk"
RL_TRAINERS = ("cgpo", "grpo")
INSTRUCTION_STYLES = ("full", "short")
SHORT_INSTRUCTIONS = {
    "sod": "Name the salient object.",
    "sis": "Name each salient instance.",
    "cosod": "Name the object these images share.",
}
"""`instruction: short`: one sentence per task, answer format learnt from the data (tiny models from scratch)."""
SYNTHETIC = "synthetic"


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class DatasetSpec:
    """One component of a training or evaluation mixture.

    In YAML: `datasets: [{name: synthetic, task: sod, num_samples: 8192, weight: 2, options: {rule: colour}}]`.
    """

    name: str = SYNTHETIC
    """`synthetic` (procedural benchmark), `disk` (a dataset written by `Dataset.save_to_disk`, e.g. the SFT data of
    `python -m cgpo_trl.data.reasoning`, at `data_dir`) or a public-benchmark name (`cgpo_trl.data.benchmarks`)."""
    task: str | None = None
    """`sod`, `sis` or `cosod`. Required for `synthetic`; benchmarks know their task."""
    weight: float = 1.0
    """Mixing ratio: share of this component in the interleaved mixture (normalised over the components)."""
    num_samples: int | None = None
    """Synthetic: rows generated (CoSOD: groups; default 1000). Benchmarks: keep at most this many rows."""
    split: str = "train"
    """Synthetic: `train`, `validation` or `test` (each its own random stream). Benchmarks: the loader's split."""
    data_dir: str | None = None
    """Benchmarks: root folder of the benchmark as distributed."""
    options: dict[str, Any] = field(default_factory=dict)
    """Synthetic: `SyntheticConfig` fields (rule, image_size, single_object_fraction, ...). Benchmarks: loader kwargs."""

    @classmethod
    def from_value(cls, value: Any, where: str) -> DatasetSpec:
        if isinstance(value, DatasetSpec):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping like {{name: synthetic, task: sod}}, got {value!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key, item in value.items():
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r}{_suggest(key, known)}; known keys: {known}")
            types, expected = _ENTRY_TYPES[key]
            if isinstance(item, bool) or not isinstance(item, types):
                raise ValueError(f"{where}: {key!r} must be {expected}, got {item!r} ({type(item).__name__})")
        spec = cls(**value)
        if spec.weight <= 0:
            raise ValueError(f"{where}: weight must be > 0, got {spec.weight}")
        if spec.num_samples is not None and spec.num_samples < 1:
            raise ValueError(f"{where}: num_samples must be >= 1, got {spec.num_samples} (an empty dataset)")
        if spec.name not in (SYNTHETIC, DISK):
            from .data.benchmarks import list_benchmarks

            if spec.name.lower() not in list_benchmarks():
                names = [SYNTHETIC, DISK, *list_benchmarks()]
                raise ValueError(
                    f"{where}: unknown benchmark {spec.name!r}{_suggest(spec.name.lower(), names)}; known names: {names}"
                )
        if spec.name == SYNTHETIC and spec.task is None:
            raise ValueError(f"{where}: a synthetic dataset needs `task` (sod, sis or cosod)")
        if spec.name != SYNTHETIC and not spec.data_dir:
            raise ValueError(f"{where}: dataset {spec.name!r} needs `data_dir`")
        return spec


_ENTRY_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "task": ((str, type(None)), "a string (sod, sis or cosod)"),
    "weight": ((int, float), "a number"),
    "num_samples": ((int, type(None)), "an integer"),
    "split": ((str,), "a string"),
    "data_dir": ((str, os.PathLike, type(None)), "a folder path"),
    "options": ((dict,), "a mapping"),
}
"""Expected value types of a `datasets` entry's keys, checked before anything compares or loads them."""


def _default_datasets() -> list[dict]:
    return [{"name": SYNTHETIC, "task": "sod", "num_samples": 1000}]


@dataclass
class SaliencyScriptArguments:
    """Script arguments shared by the SFT and RL stages of the Saliency-R1 recipe."""

    datasets: list[dict] = field(
        default_factory=_default_datasets,
        metadata={
            "help": "Training mixture: a list of mappings with keys name, task, weight, num_samples, split, data_dir, "
            "options (see cgpo_trl.pipeline.DatasetSpec). JSON on the command line."
        },
    )
    eval_datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "Evaluation mixture, same keys as `datasets` (empty: no evaluation during training)."},
    )
    mixture_stopping: str = field(
        default="first_exhausted",
        metadata={
            "help": "How the weighted mixture ends: `first_exhausted` (never repeats rows) or `all_exhausted` "
            "(oversamples the smaller components).",
            "choices": ["first_exhausted", "all_exhausted"],
        },
    )
    segmenter: str = field(
        default="shapes",
        metadata={"help": "Referring segmenter backend: shapes, clipseg, sam3, grounded-sam, evf-sam."},
    )
    segmenter_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Backend options, e.g. {checkpoint: ..., device: auto, dtype: bfloat16}; device `auto` is this "
            "process's accelerator device. JSON on the CLI."
        },
    )
    segmenter_cache_size: int = field(
        default=4096, metadata={"help": "LRU cache entries in front of the segmenter (0 disables it)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "saliency"],
        metadata={"help": "Reward functions by registry name; weights come from `reward_weights`."},
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options passed to the rewards that accept them, e.g. {metric: smeasure, require_think: false}. "
            "An option no listed reward accepts is an error. JSON on the CLI."
        },
    )
    instruction: str = field(
        default="full",
        metadata={
            "help": "`full`: the task instructions of cgpo_trl.saliency.prompts (format, tags, example). `short`: "
            "one sentence per task, for tiny models trained from scratch (the CPU demo learns several times faster "
            "with ~20 prompt tokens than with ~220).",
            "choices": ["full", "short"],
        },
    )
    trainer: str = field(
        default="cgpo",
        metadata={
            "help": "RL trainer: `cgpo` (CGPOTrainer) or `grpo` (the trl.GRPOTrainer baseline: same data, rewards "
            "and settings, CGPO-only fields ignored).",
            "choices": list(RL_TRAINERS),
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let this run replace another run's model and checkpoints in output_dir (its checkpoint-N "
            "folders are deleted when training starts). Without it such an output_dir is an error, unless "
            "resume_from_checkpoint continues that run."
        },
    )

    def __post_init__(self):
        if self.trainer not in RL_TRAINERS:
            raise ValueError(f"trainer must be one of {list(RL_TRAINERS)}, got {self.trainer!r}")
        if self.mixture_stopping not in ("first_exhausted", "all_exhausted"):
            raise ValueError(
                f"mixture_stopping must be first_exhausted or all_exhausted, got {self.mixture_stopping!r}"
            )
        if isinstance(self.segmenter_kwargs, str):
            self.segmenter_kwargs = _parse_json(self.segmenter_kwargs, "segmenter_kwargs")
        self.segmenter_kwargs = dict(self.segmenter_kwargs or {})
        if isinstance(self.reward_kwargs, str):
            self.reward_kwargs = _parse_json(self.reward_kwargs, "reward_kwargs")
        self.reward_kwargs = dict(self.reward_kwargs or {})
        if self.instruction not in INSTRUCTION_STYLES:
            raise ValueError(f"instruction must be one of {list(INSTRUCTION_STYLES)}, got {self.instruction!r}")
        for name in ("datasets", "eval_datasets"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = _parse_json(value, name)
            if isinstance(value, dict):
                value = [value]
            setattr(self, name, [DatasetSpec.from_value(v, f"{name}[{i}]") for i, v in enumerate(value or [])])
        if not self.datasets:
            raise ValueError("datasets: at least one training dataset is needed")
        if not self.reward_funcs:
            raise ValueError("reward_funcs: at least one reward function is needed")
        # Names are checked here, before any data is generated or a model is loaded.
        from .saliency.rewards import list_rewards
        from .saliency.segmenters import list_segmenters

        unknown = [name for name in self.reward_funcs if name not in list_rewards()]
        if unknown:
            raise ValueError(f"reward_funcs: unknown {unknown}; available: {list_rewards()}")
        if self.segmenter not in list_segmenters():
            raise ValueError(f"segmenter: unknown {self.segmenter!r}; available: {list_segmenters()}")


def _parse_json(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: not valid JSON ({err.msg}): {text!r}") from None


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------------- parsing
def make_parser(dataclass_types: Sequence[type]):
    """A `trl.TrlParser` over `dataclass_types` whose structured fields take JSON on the command line."""
    from trl import TrlParser

    parser = TrlParser(list(dataclass_types))
    for action in parser._actions:
        if action.dest in ("datasets", "eval_datasets"):
            action.type, action.nargs = str, None  # one JSON list (YAML gives the list itself)
    return parser


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parse `--config FILE.yaml` plus command-line overrides into `dataclass_types`.

    An unknown or misspelt key in the YAML file is an error naming the file, the key and the closest known key
    (TrlParser alone reports it only as a leftover `--key value` pair).
    """
    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = make_parser(dataclass_types)
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        check_config_keys(path, parser)
    return parser.parse_args_and_config(argv)


def check_config_keys(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict:
    """Fail with the offending key's name when the YAML file at `path` has a key no dataclass field takes."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path) as handle:
        try:
            config = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping of field: value, got {type(config).__name__}")
    known = sorted({a.dest for a in parser._actions if a.dest != "help"} | {"env"})
    unknown = [key for key in config if key not in known]
    if unknown:
        details = "; ".join(f"{key!r}{_suggest(key, known)}" for key in unknown)
        raise ValueError(f"{path}: unknown key(s) {details}")
    return config


# ----------------------------------------------------------------------------------------------- data
@contextlib.contextmanager
def cache_files_outside_inputs():
    """Keep `datasets` from writing `cache-*.arrow` into the folders a run reads from.

    Every `map` / `filter` of a dataset loaded with `load_from_disk` caches its result next to the dataset's own
    files, i.e. in the user's `data_dir`. With caching off, results go to a temporary folder removed at exit.
    """
    from datasets import disable_caching, enable_caching, is_caching_enabled

    was_enabled = is_caching_enabled()
    disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            enable_caching()


def load_dataset_spec(spec: DatasetSpec):
    """One mixture component as a `datasets.Dataset` in the data contract's columns."""
    if spec.name == SYNTHETIC:
        from .data.synthetic import SyntheticConfig, generate_synthetic

        options = dict(spec.options)
        for key in ("task", "split", "num_samples"):
            if key in options:
                raise ValueError(f"dataset {spec.name!r}: give {key!r} at the top level of the entry, not in options")
        known = [f.name for f in dataclasses.fields(SyntheticConfig)]
        for key in options:
            if key not in known:
                raise ValueError(f"synthetic {spec.task} options: unknown key {key!r}{_suggest(key, known)}")
        config = SyntheticConfig(
            task=spec.task,
            split=spec.split,
            num_samples=1000 if spec.num_samples is None else spec.num_samples,
            **options,
        )
        return generate_synthetic(config)
    if spec.name == DISK:
        from datasets import load_from_disk

        if not Path(spec.data_dir).is_dir():
            raise FileNotFoundError(f"dataset 'disk': data_dir {spec.data_dir} is not a folder")
        dataset = load_from_disk(spec.data_dir, **spec.options)
        if spec.task is not None and "task" in dataset.column_names:
            dataset = dataset.filter(lambda task: task == spec.task, input_columns="task")
        if spec.num_samples is not None:
            dataset = dataset.select(range(min(spec.num_samples, len(dataset))))
        return dataset
    from .data import benchmarks

    dataset = benchmarks.load_benchmark(spec.name, data_dir=spec.data_dir, split=spec.split, **spec.options)
    if spec.task is not None and len(dataset) and dataset[0]["task"] != spec.task:
        raise ValueError(f"dataset {spec.name!r} holds task {dataset[0]['task']!r}, but the entry says {spec.task!r}")
    if spec.num_samples is not None:
        dataset = dataset.select(range(min(spec.num_samples, len(dataset))))
    return dataset


def build_mixture(
    specs: Sequence[DatasetSpec],
    seed: int = 0,
    stopping: str = "first_exhausted",
    instruction: str = "full",
    transform: Callable | None = None,
    field_name: str = "datasets",
):
    """Interleave the components with probabilities proportional to their weights (`datasets.interleave_datasets`).

    `transform` (e.g. `to_sft_rows`) is applied to each component before mixing, so components of different kinds
    (synthetic rows, reasoning conversations) meet in one schema. A component with no rows is an error naming its
    entry (`field_name[i]`): a run must not train zero steps and save an untrained model.
    """
    with cache_files_outside_inputs():
        return _build_mixture(specs, seed, stopping, instruction, transform, field_name)


def _build_mixture(specs, seed, stopping, instruction, transform, field_name):
    from datasets import interleave_datasets

    from .data.rows import ROW_FEATURES

    parts = [load_dataset_spec(spec) for spec in specs]
    for position, (spec, part) in enumerate(zip(specs, parts)):
        if len(part) == 0:
            raise ValueError(
                f"{field_name}[{position}] ({describe_datasets([spec])[0]}) has no rows; check its data_dir, task "
                "and num_samples"
            )
    if instruction == "short":
        parts = [
            part.map(_shorten_instruction, desc="short instructions") if "task" in part.column_names else part
            for part in parts
        ]
    if transform is not None:
        parts = [transform(part) for part in parts]
    if len(parts) == 1:
        return parts[0]
    if len({json.dumps(p.features.to_dict(), sort_keys=True) for p in parts}) > 1:
        parts = [p.select_columns(list(ROW_FEATURES)).cast(ROW_FEATURES) for p in parts]
    total = sum(spec.weight for spec in specs)
    return interleave_datasets(
        parts, probabilities=[spec.weight / total for spec in specs], seed=seed, stopping_strategy=stopping
    )


def task_prompt(task: str, num_images: int = 1, instruction: str = "full") -> list[dict]:
    """The user turn for `task` in the given instruction style; a model answers best in the style it was trained on."""
    from .saliency.prompts import build_prompt

    prompt = build_prompt(task, num_images)
    if instruction == "short":
        for block in prompt[0]["content"]:
            if block["type"] == "text":
                block["text"] = SHORT_INSTRUCTIONS[task]
    elif instruction != "full":
        raise ValueError(f"instruction must be one of {list(INSTRUCTION_STYLES)}, got {instruction!r}")
    return prompt


def _shorten_instruction(row: dict) -> dict:
    """The user turns' text -> the task's short instruction, in `prompt` (contract rows) or `messages` (the
    conversations `python -m cgpo_trl.data.reasoning` writes, whose assistant turn is kept as it is)."""
    column = "prompt" if "prompt" in row else "messages"
    turns = []
    for message in row[column]:
        if message["role"] == "user":
            content = [
                {**block, "text": SHORT_INSTRUCTIONS[row["task"]]} if block["type"] == "text" else block
                for block in message["content"]
            ]
            message = {**message, "content": content}
        turns.append(message)
    return {column: turns}


def load_mixtures(script_args, seed: int, transform: Callable | None = None):
    """(train, eval-or-None) datasets of the script arguments."""
    options = dict(stopping=script_args.mixture_stopping, instruction=script_args.instruction, transform=transform)
    train = build_mixture(script_args.datasets, seed, **options)
    evaluation = None
    if script_args.eval_datasets:
        evaluation = build_mixture(script_args.eval_datasets, seed, field_name="eval_datasets", **options)
    return train, evaluation


def _sft_features():
    from datasets import Features, List

    from .data.rows import MESSAGE, ROW_FEATURES

    return Features({"prompt": List(MESSAGE), "completion": List(MESSAGE), "images": ROW_FEATURES["images"]})


def to_sft_rows(dataset):
    """Rows -> TRL prompt-completion conversations with images (loss on the completion only).

    Contract rows use their reference answer (`solution`) as the completion; datasets of chat `messages` (what the
    output-to-reasoning builder writes) are split into the turns before the last assistant turn and that turn.
    """
    if "messages" in dataset.column_names:

        def split_messages(row):
            messages = row["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError("SFT `messages` must end with an assistant turn")
            return {"prompt": messages[:-1], "completion": messages[-1:]}

        dataset = dataset.map(split_messages, remove_columns=["messages"], desc="SFT conversations")
    else:
        if "solution" not in dataset.column_names:
            raise ValueError("SFT needs a `solution` (reference answer) or a `messages` column in every dataset")
        empty = sum(1 for s in dataset["solution"] if not s)
        if empty:
            raise ValueError(
                f"{empty} of {len(dataset)} SFT rows have an empty `solution` (public benchmarks have no reference "
                "answers: build SFT data with `python -m cgpo_trl.data.reasoning` and load it with name: disk)"
            )

        def convert(row):
            return {"completion": [{"role": "assistant", "content": [{"type": "text", "text": row["solution"]}]}]}

        dataset = dataset.map(convert, desc="SFT conversations")
    dataset = dataset.select_columns(["prompt", "completion", "images"])
    return dataset.cast(_sft_features())


# ----------------------------------------------------------------------------------------------- model
def load_policy(model_args, seed: int = 0):
    """Policy and processor from `ModelConfig`: `tiny-random` builds a tiny Qwen2.5-VL offline, anything else goes
    through `cgpo_trl.models.load_model_and_processor` (Qwen2.5-VL checkpoints load without torchvision)."""
    name = model_args.model_name_or_path
    if not name:
        raise ValueError("model_name_or_path is required (a checkpoint folder, a hub id, or 'tiny-random')")
    if name == TINY_MODEL:
        from .testing import build_tiny_vlm

        model, processor = build_tiny_vlm(seed=seed)
        # TRL builds the KL reference model (beta != 0) from `config._name_or_path`: point it at a saved copy.
        model.config._name_or_path = _saved_tiny_copy(model, processor, seed)
        return model, processor
    from .models import load_model_and_processor

    kwargs: dict[str, Any] = {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_revision not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    try:
        return load_model_and_processor(name, dtype=dtype, **kwargs)
    except OSError as err:
        where = "folder" if Path(name).exists() else "folder (no such path) nor a reachable hub id"
        raise ValueError(f"model_name_or_path={name!r} is neither a checkpoint {where}: {err}") from None


def _saved_tiny_copy(model, processor, seed: int) -> str:
    """A checkpoint folder of the tiny model under `$CGPO_TRL_CACHE` (default `~/.cache/cgpo_trl`), written once per
    seed through a temporary folder and a rename so that concurrent processes never read a half-written copy."""
    import tempfile

    from .testing import save_pretrained

    cache = Path(os.environ.get("CGPO_TRL_CACHE", Path.home() / ".cache" / "cgpo_trl")) / "tiny-random"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: the system's temporary folder will do
        cache = Path(tempfile.gettempdir()) / "cgpo_trl-tiny-random"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"seed{seed}"
    if not (target / "config.json").exists():
        partial = Path(tempfile.mkdtemp(dir=cache, prefix=f".seed{seed}-"))
        save_pretrained(model, processor, partial)
        try:
            partial.rename(target)
        except OSError:  # another process got there first
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def peft_config(model_args):
    from trl import get_peft_config

    return get_peft_config(model_args)


# ----------------------------------------------------------------------------------------------- rewards
def build_reward_funcs(script_args, processor, model=None, max_completion_length: int | None = None) -> list[Callable]:
    """Reward functions by registry name, sharing one cached segmenter; the format reward learns the EOS ids and
    the length cap so a completion cut at the cap does not count as well-formed."""
    import inspect

    from .saliency.rewards import REWARDS, build_reward_funcs, eos_token_ids_of
    from .saliency.segmenters import load_segmenter

    kwargs = dict(script_args.segmenter_kwargs)
    if kwargs.get("device") == "auto":  # this process's accelerator device (one segmenter per GPU under DDP)
        from accelerate import PartialState

        kwargs["device"] = str(PartialState().device)
    segmenter = load_segmenter(script_args.segmenter, cache_size=script_args.segmenter_cache_size, **kwargs)
    options = dict(script_args.reward_kwargs)
    accepted = set()
    for name in script_args.reward_funcs:
        if name in REWARDS:
            accepted |= set(inspect.signature(REWARDS[name]).parameters)
    if "eos_token_ids" in accepted and "eos_token_ids" not in options:
        options["eos_token_ids"] = eos_token_ids_of(processor, getattr(model, "generation_config", None))
    if "max_completion_length" in accepted and "max_completion_length" not in options and max_completion_length:
        options["max_completion_length"] = max_completion_length
    try:
        return build_reward_funcs(script_args.reward_funcs, segmenter=segmenter, **options)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"reward_funcs={script_args.reward_funcs}, reward_kwargs={script_args.reward_kwargs}: {err}"
        ) from None


# ----------------------------------------------------------------------------------------------- trainers
def cgpo_only_fields() -> list[str]:
    from trl import GRPOConfig

    from .config import CGPOConfig

    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    return [f.name for f in dataclasses.fields(CGPOConfig) if f.name not in grpo]


def to_grpo_config(args):
    """The `trl.GRPOConfig` with every GRPO field of a `CGPOConfig` (the CGPO-only fields are dropped).

    GRPO normalises rewards within groups, so it needs `num_generations >= 2` (CGPO's default is 1).
    """
    from trl import GRPOConfig

    from .config import CGPOConfig

    if args.num_generations is None or args.num_generations < 2:
        raise ValueError(
            f"trainer=grpo needs num_generations >= 2 (group-normalised advantages), got {args.num_generations}; "
            "set num_generations in the YAML or on the command line"
        )
    defaults = CGPOConfig.__dataclass_fields__
    changed = [
        name
        for name in cgpo_only_fields()
        if getattr(args, name)
        != (defaults[name].default_factory() if callable(defaults[name].default_factory) else defaults[name].default)
    ]
    if changed:
        logger.warning("trainer=grpo ignores the CGPO-only settings %s", changed)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig) if f.init}
    values["accelerator_config"] = dataclasses.asdict(args.accelerator_config)
    values["generation_batch_size"] = None  # re-derived from steps_per_generation (both may not be set)
    return GRPOConfig(**values)


def build_rl_trainer(script_args, training_args, model_args, model=None, processor=None):
    """`CGPOTrainer` (or the `GRPOTrainer` baseline) on the configured mixture, rewards and policy."""
    from .checkpoints import ResumableGRPOTrainer
    from .trainer import CGPOTrainer

    check_output_dir(script_args, training_args)
    train, evaluation = load_mixtures(script_args, training_args.seed)  # data errors before a model is loaded
    if model is None:
        model, processor = load_policy(model_args, seed=training_args.seed)
    args = training_args if script_args.trainer == "cgpo" else to_grpo_config(training_args)
    if args.reward_weights is not None and len(args.reward_weights) != len(script_args.reward_funcs):
        raise ValueError(
            f"reward_weights has {len(args.reward_weights)} values for {len(script_args.reward_funcs)} reward_funcs "
            f"{script_args.reward_funcs}"
        )
    trainer_cls = CGPOTrainer if script_args.trainer == "cgpo" else ResumableGRPOTrainer
    with cache_files_outside_inputs():
        return trainer_cls(
            model=model,
            reward_funcs=build_reward_funcs(script_args, processor, model, args.max_completion_length),
            args=args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=processor,
            peft_config=peft_config(model_args),
        )


def build_sft_trainer(script_args, training_args, model_args, model=None, processor=None):
    """`trl.SFTTrainer` on the mixture's reference answers (prompt-completion, loss on the completion only)."""
    from .checkpoints import ResumableSFTTrainer

    check_output_dir(script_args, training_args)
    train, evaluation = load_mixtures(script_args, training_args.seed, transform=to_sft_rows)
    if model is None:
        model, processor = load_policy(model_args, seed=training_args.seed)
    with cache_files_outside_inputs():
        return ResumableSFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=processor,
            peft_config=peft_config(model_args),
        )


# ----------------------------------------------------------------------------------------------- run
def resolve_checkpoint(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint true|last` resumes from the newest checkpoint in output_dir; a path, from it."""
    if isinstance(value, str) and value.lower() in ("true", "last"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "none", ""):
        return None
    return value


_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")
RUN_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "trainer_state.json",
)
"""Files whose presence in output_dir means another run saved its model or state there."""


def previous_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Names in `output_dir` that a previous run wrote: its final model, trainer state and `checkpoint-N` folders."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.name in RUN_FILES or (_CHECKPOINT_DIR.match(p.name) and p.is_dir())
    )


def check_output_dir(script_args, training_args) -> list[str]:
    """Refuse an output_dir holding another run's model or checkpoints unless told to overwrite it or to resume.

    Returns that run's `checkpoint-N` folders when overwriting (for `train_and_save` to delete), else [].
    """
    found = previous_run_files(training_args.output_dir)
    if not found or resolve_checkpoint(training_args.resume_from_checkpoint) is not None:
        return []
    if not script_args.overwrite_output_dir:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise FileExistsError(
            f"output_dir {training_args.output_dir} already holds another run's model or checkpoints ({shown}); "
            "pass --overwrite_output_dir true to replace them, --resume_from_checkpoint true to continue that run, "
            "or choose another output_dir"
        )
    return [name for name in found if _CHECKPOINT_DIR.match(name)]


def train_and_save(trainer, script_args, model_args, stage: str, metrics: dict | None = None) -> dict:
    """Train (resuming if asked), save the final model with its processor, and write the model card.

    With `overwrite_output_dir`, the previous run's checkpoints are deleted first, so a later
    `--resume_from_checkpoint true` cannot pick up one of them.
    """
    args = trainer.args
    stale = check_output_dir(script_args, args)
    if stale and trainer.is_world_process_zero():
        logger.warning("overwrite_output_dir: deleting the previous run's %s in %s", stale, args.output_dir)
        for name in stale:
            shutil.rmtree(Path(args.output_dir) / name)
    trainer.accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=resolve_checkpoint(args.resume_from_checkpoint))
    train_metrics = dict(result.metrics)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    last_logged = {}  # the last logged value of every training metric (reward, cgpo/confidence, loss, ...)
    for entry in trainer.state.log_history:
        last_logged.update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
    all_metrics = {**last_logged, **train_metrics, **(metrics or {})}
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        all_metrics.update(eval_metrics)
    if trainer.is_world_process_zero():
        write_model_card(trainer, script_args, model_args, stage, all_metrics)
        if model_args.use_peft:
            save_merged(trainer, Path(args.output_dir) / MERGED_DIR)
    return all_metrics


def end_run(trainer) -> None:
    """Leave the process group together, then tear it down.

    Rank 0 still writes the model card (and the merged LoRA model) when the other ranks are done; a rank that
    destroys its gloo group and exits while a peer still holds the group can abort at exit ("terminate called
    without an active exception", exit code -6), which fails the whole launch after the model was saved. So every
    rank waits at a barrier, drops its references to the wrapped model and optimizer (their DDP reducer holds the
    group), and only then destroys the group.
    """
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model = trainer.optimizer = trainer.lr_scheduler = None
    accelerator.free_memory()
    accelerator.end_training()


MERGED_DIR = "merged"
"""With LoRA, `output_dir/merged` holds the base model with the adapter merged in (a full checkpoint that the next
stage, `predict` and `eval` load like any other); `output_dir` itself holds the adapter."""


def save_merged(trainer, path: Path) -> Path:
    """Merge the trained LoRA adapter into a copy of the base weights and save it with the processor."""
    import copy

    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path)
    trainer.processing_class.save_pretrained(path)
    return path


def describe_datasets(specs: Sequence[DatasetSpec]) -> list[str]:
    lines = []
    for spec in specs:
        what = f"{spec.name} ({spec.task})" if spec.task else spec.name
        size = f", {spec.num_samples} samples" if spec.num_samples is not None else ""
        where = f", data_dir {spec.data_dir}" if spec.data_dir else ""
        options = f", options {json.dumps(spec.options, sort_keys=True)}" if spec.options else ""
        lines.append(f"{what}: split {spec.split}, weight {spec.weight:g}{size}{where}{options}")
    return lines


CARD_METRIC_PREFIXES = (
    "reward",
    "cgpo/",
    "saliency/",
    "eval_",
    "test_",
    "train_loss",
    "train_runtime",
    "completions/mean_length",
    "mean_token_accuracy",
)


def write_model_card(trainer, script_args, model_args, stage: str, metrics: dict) -> Path:
    """TRL's model card, followed by the recipe: data, segmenter, rewards, trainer settings and final metrics."""
    from . import __version__

    trainer.create_model_card(model_name=Path(trainer.args.output_dir).name, tags=["saliency-r1", "cgpo_trl", stage])
    path = Path(trainer.args.output_dir) / "README.md"
    args = trainer.args
    lines = [
        "",
        f"## Saliency-R1 recipe ({stage}, cgpo_trl {__version__})",
        "",
        f"- Base model: `{model_args.model_name_or_path}`" + (" with LoRA" if model_args.use_peft else ""),
        "- Training data:",
        *[f"  - {line}" for line in describe_datasets(script_args.datasets)],
    ]
    if script_args.eval_datasets:
        lines += ["- Evaluation data:", *[f"  - {line}" for line in describe_datasets(script_args.eval_datasets)]]
    state = trainer.accelerator.state
    kind = state.distributed_type.value
    setup = "1 process" if kind == "NO" else f"{state.num_processes} process(es), {kind}"
    if getattr(state, "deepspeed_plugin", None) is not None:
        setup += f" ZeRO stage {state.deepspeed_plugin.zero_stage}"
    lines.append(f"- Launch: {setup}")
    if stage == "rl":
        weights = args.reward_weights or [1.0] * len(script_args.reward_funcs)
        lines += [
            f"- Trainer: `{type(trainer).__name__}`, {args.num_generations} completion(s) per prompt",
            f"- Segmenter: `{script_args.segmenter}` {json.dumps(script_args.segmenter_kwargs, sort_keys=True)}",
            "- Rewards: " + ", ".join(f"`{n}` × {w:g}" for n, w in zip(script_args.reward_funcs, weights)),
        ]
        if hasattr(args, "confidence"):
            lines.append(
                f"- Confidence: level `{args.confidence_level}`, estimator `{args.confidence}`, calibration "
                f"`{args.confidence_calibration}`"
            )
    else:
        lines.append("- Trainer: `SFTTrainer`, loss on the reference answer (completion) tokens")
    lines.append(
        f"- Optimisation: lr {args.learning_rate:g}, {args.max_steps if args.max_steps > 0 else args.num_train_epochs} "
        f"{'steps' if args.max_steps > 0 else 'epochs'}, per-device batch {args.per_device_train_batch_size}, "
        f"seed {args.seed}"
    )
    shown = {k: v for k, v in metrics.items() if k.startswith(CARD_METRIC_PREFIXES)}
    if shown:
        lines += ["", "### Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(shown.items())]
    with open(path, "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return path
