"""Load policy checkpoints (Qwen2.5-VL and plain causal LMs) the same way for real and tiny local models.

transformers 5 builds `Qwen2_5_VLProcessor` with a video processor that needs torchvision; without torchvision
`AutoProcessor.from_pretrained` silently falls back to the bare tokenizer, and TRL then takes the text-only path.
`ImageOnlyQwen2_5_VLProcessor` leaves the video processor out and uses the PIL image processor, so the VLM path works
on machines with no torchvision (CPU here) and behaves identically elsewhere for image inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# Model types whose checkpoints go through the image-only Qwen2-VL-family processor.
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (which requires torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> ImageOnlyQwen2_5_VLProcessor:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def is_vlm_checkpoint(name_or_path: str | os.PathLike) -> bool:
    return AutoConfig.from_pretrained(name_or_path).model_type in QWEN_VL_TYPES


def load_processor(name_or_path: str | os.PathLike, **kwargs):
    """The processor for a checkpoint: image-only Qwen-VL processor for VLMs, else the tokenizer."""
    if is_vlm_checkpoint(name_or_path):
        return ImageOnlyQwen2_5_VLProcessor.from_pretrained(name_or_path, **kwargs)
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def load_model_and_processor(
    name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu", **model_kwargs
) -> tuple[PreTrainedModel, object]:
    """Load a Qwen2.5-VL (or any causal LM) checkpoint and its processor, by hub id or local folder."""
    if isinstance(name_or_path, Path | str) and Path(name_or_path).suffix == ".json":
        raise ValueError(f"{name_or_path}: pass the checkpoint folder, not a file inside it")
    config = AutoConfig.from_pretrained(name_or_path)
    auto = AutoModelForImageTextToText if config.model_type in QWEN_VL_TYPES else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), **model_kwargs).to(device)
    return model, load_processor(name_or_path)
