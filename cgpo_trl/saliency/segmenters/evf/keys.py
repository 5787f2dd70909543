"""Key mapping between published EVF-SAM checkpoints (segment_anything module names) and this model (transformers'
`SamModel` names under `visual_model.`). BEiT-3 and `text_hidden_fcs` keys are identical on both sides.

Each rule maps a key prefix; `{}` stands for a layer index. The same table read backwards saves a model in the
published layout, so a round trip is exact (tested on the full key list).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_SAM = "visual_model."
_RULES: list[tuple[str, str]] = [
    # image encoder (ViT)
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{}.norm1.", "vision_encoder.layers.{}.layer_norm1."),
    ("image_encoder.blocks.{}.norm2.", "vision_encoder.layers.{}.layer_norm2."),
    ("image_encoder.blocks.{}.", "vision_encoder.layers.{}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    # prompt encoder (the random Fourier matrix is a buffer in SAM, a tied parameter in transformers; see below)
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.{}.", "prompt_encoder.point_embed.{}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    # mask decoder
    ("mask_decoder.transformer.layers.{}.norm1.", "mask_decoder.transformer.layers.{}.layer_norm1."),
    ("mask_decoder.transformer.layers.{}.norm2.", "mask_decoder.transformer.layers.{}.layer_norm2."),
    ("mask_decoder.transformer.layers.{}.norm3.", "mask_decoder.transformer.layers.{}.layer_norm3."),
    ("mask_decoder.transformer.layers.{}.norm4.", "mask_decoder.transformer.layers.{}.layer_norm4."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.output_hypernetworks_mlps.{}.layers.0.", "mask_decoder.output_hypernetworks_mlps.{}.proj_in."),
    ("mask_decoder.output_hypernetworks_mlps.{}.layers.1.", "mask_decoder.output_hypernetworks_mlps.{}.layers.0."),
    ("mask_decoder.output_hypernetworks_mlps.{}.layers.2.", "mask_decoder.output_hypernetworks_mlps.{}.proj_out."),
    ("mask_decoder.iou_prediction_head.layers.0.", "mask_decoder.iou_prediction_head.proj_in."),
    ("mask_decoder.iou_prediction_head.layers.1.", "mask_decoder.iou_prediction_head.layers.0."),
    ("mask_decoder.iou_prediction_head.layers.2.", "mask_decoder.iou_prediction_head.proj_out."),
]
# transformers keeps the Fourier matrix twice (tied): in the prompt encoder and for the image-wide encoding.
_TIED = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")


def _compile(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for source, target in pairs:
        pattern = re.escape(_SAM + source).replace(r"\{\}", r"(\d+)")
        compiled.append((re.compile(pattern), _SAM + target.replace("{}", r"\1")))
    return compiled


_TO_OURS = _compile(_RULES)
_TO_PUBLISHED = _compile([(ours, published) for published, ours in _RULES])


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        match = pattern.match(key)
        if match:
            return match.expand(replacement) + key[match.end() :]
    return key


def published_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published checkpoint's keys to this model's, adding the tied copy of the Fourier matrix."""
    renamed = {_rename(key, _TO_OURS): value for key, value in state_dict.items()}
    source = _SAM + _TIED[0]
    if source in renamed:
        renamed[_SAM + _TIED[1]] = renamed[source]
    return renamed


def published_key(key: str) -> str:
    """The published name of one of this model's keys (the tied duplicate maps to its source)."""
    return _rename(_SAM + _TIED[0] if key == _SAM + _TIED[1] else key, _TO_PUBLISHED)


def ours_to_published(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename this model's keys to the published layout, dropping the tied duplicate."""
    return {published_key(key): value for key, value in state_dict.items() if key != _SAM + _TIED[1]}
