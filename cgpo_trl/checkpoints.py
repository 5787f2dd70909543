"""Resume that restores every weight, from the last complete checkpoint only.

transformers 5 saves a model under its *checkpoint* key names (`save_pretrained` reverts the conversion mapping
that `from_pretrained` applies: Qwen2.5-VL's `model.language_model.*` is written as `model.*`, `model.visual.*` as
`visual.*`), but `Trainer._load_from_checkpoint` reloads the file with `load_state_dict(..., strict=False)`: every key
comes back "missing" (a warning only) and training silently continues from the initial weights with the restored
step, optimizer and schedule. [`ResumableTrainerMixin`] loads the weights the way `from_pretrained` reads them (the
model's own conversion mapping), copies them in place, and makes any missing or unexpected key an error.

A run killed while writing `checkpoint-N` leaves an empty or partial folder; `train(resume_from_checkpoint=True)`
resumes from the newest *complete* checkpoint instead (the Trainer writes `trainer_state.json` last) and says which.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer, SFTTrainer

from .fixes import GRPOFixesMixin

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
DEEPSPEED_LATEST = "latest"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from exactly: incomplete, or its weights do not match the model."""


# ----------------------------------------------------------------------------------------------- completeness
def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint, or None when it is.

    The Trainer writes the weights, then optimizer, scheduler and RNG states, and `trainer_state.json` last: a
    readable `trainer_state.json` next to complete weights means the save finished.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save did not finish)"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is cut short (the save did not finish)"
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            try:
                shards = set(json.loads((folder / index_name).read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, TypeError):
                return f"{index_name} is unreadable"
            missing = sorted(name for name in shards if not (folder / name).is_file())
            return f"weight shard(s) {missing} missing" if missing else None
    names = (SAFE_WEIGHTS, BIN_WEIGHTS, *ADAPTER_FILES, DEEPSPEED_LATEST)
    if not any((folder / name).is_file() for name in names):
        return f"no model weights ({', '.join(names[:-1])})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest complete `checkpoint-N` in `output_dir`; newer incomplete ones are skipped with a warning."""
    root = Path(output_dir)
    steps = {path: _CHECKPOINT_RE.match(path.name) for path in (root.iterdir() if root.is_dir() else [])}
    found = sorted(((int(m.group(1)), path) for path, m in steps.items() if m and path.is_dir()), reverse=True)
    if not found:
        raise CheckpointError(
            f"resume_from_checkpoint=True, but {output_dir} holds no {PREFIX_CHECKPOINT_DIR}-N folder"
        )
    skipped = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            for name, reason in skipped:
                logger.warning("Skipping incomplete checkpoint %s: %s.", name, reason)
            logger.warning("Resuming from %s, the newest complete checkpoint in %s.", path, output_dir)
            return str(path)
        skipped.append((path, problem))
    details = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
    raise CheckpointError(f"no complete checkpoint in {output_dir} ({details})")


# ----------------------------------------------------------------------------------------------- weights
def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights a checkpoint folder holds (safetensors or PyTorch, one file or sharded), on the CPU."""
    import safetensors.torch

    folder = Path(folder)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            files = [folder / name for name in shards]
            break
    else:
        files = [folder / name for name in (SAFE_WEIGHTS, BIN_WEIGHTS) if (folder / name).is_file()][:1]
    if not files:
        raise CheckpointError(f"{folder}: no model weights ({SAFE_WEIGHTS}, {BIN_WEIGHTS} or a sharded index)")
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state_dict.update(safetensors.torch.load_file(path, device="cpu"))
        else:
            state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
    return state_dict


def to_model_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> the model's own keys, through the conversion mapping `from_pretrained` applies.

    Renamings (Qwen2.5-VL's legacy prefixes) and tensor conversions (e.g. Mixtral's per-expert weights fused into
    one tensor) are transformers' own (`transformers.conversion_mapping`); a key no rule maps stays as it is.
    """
    if not isinstance(model, PreTrainedModel):
        return dict(state_dict)
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    pending: dict[str, WeightConverter] = {}
    for key in sorted(state_dict, key=dot_natural_key):  # converters stack per-expert tensors in this order
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if target not in expected and key in expected:  # already in the model's own naming
            target, pattern = key, None
        if pattern is None or target not in expected:
            converted[target] = state_dict[key]
        else:
            pending.setdefault(target, deepcopy(by_pattern[pattern])).add_tensor(target, key, pattern, state_dict[key])
    for first_target, converter in pending.items():
        for name, value in converter.convert(first_target, model=model, config=model.config).items():
            converted[name] = value[0] if isinstance(value, list) else value
    return converted


def _aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """State-dict key -> the other keys naming the same tensor (tied weights, e.g. lm_head and the embeddings)."""
    by_tensor: dict[tuple, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault((tensor.data_ptr(), tuple(tensor.shape)), set()).add(name)
    return {name: names - {name} for names in by_tensor.values() for name in names}


def load_model_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy a checkpoint's weights into `model` in place; a missing, unexpected or misshapen key is an error.

    A key the checkpoint leaves out is accepted only when it is tied to one it holds (saved once).
    """
    state_dict = to_model_keys(model, read_state_dict(folder))
    aliases = _aliases(model)
    expected = set(aliases)
    missing = sorted(k for k in expected - set(state_dict) if not aliases[k] & set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: the checkpoint's weights do not match the model: {_keys(missing, unexpected)}"
        )
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{folder}: {err}") from None


def load_adapter_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load the active PEFT adapter saved in `folder` (trainable); an adapter key the model lacks, or an adapter
    parameter the checkpoint lacks, is an error."""
    adapter = model.active_adapters[0] if hasattr(model, "active_adapters") else model.active_adapter
    result = model.load_adapter(str(folder), adapter, is_trainable=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(k for k in result.missing_keys if k in trainable)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{folder}: the adapter does not match the model: {_keys(missing, sorted(result.unexpected_keys))}"
        )


def _keys(missing: list[str], unexpected: list[str], shown: int = 5) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label} key(s) {keys[:shown]}{more}")
    return "; ".join(parts)


def load_checkpoint_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """The weights of a Trainer checkpoint into `model`: the adapter for a PEFT model, every weight otherwise."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        load_adapter_weights(model, folder)
    else:
        load_model_weights(model, folder)


# ----------------------------------------------------------------------------------------------- trainers
class ResumableTrainerMixin:
    """Put before a `transformers.Trainer` subclass: resume restores every weight, from a complete checkpoint.

    DeepSpeed, FSDP and SageMaker model parallelism load through their own checkpoint formats and are left to the
    Trainer.
    """

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, str | os.PathLike):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise CheckpointError(
                    f"cannot resume from {resume_from_checkpoint}: {problem}; resume_from_checkpoint=true picks the "
                    "newest complete checkpoint of output_dir"
                )
            resume_from_checkpoint = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _uses_own_checkpoint_format(self) -> bool:
        from transformers.utils import is_sagemaker_mp_enabled

        return self.is_deepspeed_enabled or self.is_fsdp_enabled or is_sagemaker_mp_enabled()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self._uses_own_checkpoint_format():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading model weights from %s.", resume_from_checkpoint)
        load_checkpoint_weights(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self._uses_own_checkpoint_format():
            return super()._load_best_model()
        logger.info("Loading best model from %s.", self.state.best_model_checkpoint)
        load_checkpoint_weights(self.model, self.state.best_model_checkpoint)


class ResumableSFTTrainer(ResumableTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` whose resume restores every weight (stage 1 of the pipeline)."""


class ResumableGRPOTrainer(ResumableTrainerMixin, GRPOFixesMixin, GRPOTrainer):
    """`trl.GRPOTrainer` whose resume restores every weight (the GRPO baseline of the pipeline), with the reward
    checks and the colocated-vLLM image fix of `cgpo_trl.fixes`."""


def warn_missing_state(checkpoint: str | os.PathLike, file_name: str, consequence: str) -> None:
    """A checkpoint without a trainer's extra state file resumes, but not silently."""
    logger.warning("Checkpoint %s has no %s: %s.", checkpoint, file_name, consequence)
