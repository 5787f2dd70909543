"""Key mapping between published EVF-SAM checkpoints (segment_anything / sam2 module names) and this model
(transformers' `SamModel` / `Sam2VideoModel` names under `visual_model.`). BEiT-3 and `text_hidden_fcs` keys are
identical on both sides.

Each rule maps a key prefix; `{}` stands for a layer index. The same table read backwards saves a model in the
published layout, so a round trip is exact (tested on the full key lists). Two differences are not renames:
transformers keeps the prompt encoder's random Fourier matrix twice (tied, also as `shared_image_embedding`), and
SAM-2's four point embeddings are one (4, C) tensor in transformers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_SAM = "visual_model."

_PROMPT_ENCODER = [
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("point_embeddings.{}.", "point_embed.{}."),
    ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."),
]
_MLP3 = [("layers.0.", "proj_in."), ("layers.1.", "layers.0."), ("layers.2.", "proj_out.")]  # 3-layer MLP heads
_MASK_DECODER = [
    *[(f"transformer.layers.{{}}.norm{i}.", f"transformer.layers.{{}}.layer_norm{i}.") for i in (1, 2, 3, 4)],
    ("transformer.norm_final_attn.", "transformer.layer_norm_final_attn."),
    ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    *[(f"output_hypernetworks_mlps.{{}}.{a}", f"output_hypernetworks_mlps.{{}}.{b}") for a, b in _MLP3],
    *[(f"iou_prediction_head.{a}", f"iou_prediction_head.{b}") for a, b in _MLP3],
]


def _under(prefix: str, target: str, rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(prefix + a, target + b) for a, b in rules]


_SAM1_RULES: list[tuple[str, str]] = [
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{}.norm1.", "vision_encoder.layers.{}.layer_norm1."),
    ("image_encoder.blocks.{}.norm2.", "vision_encoder.layers.{}.layer_norm2."),
    ("image_encoder.blocks.{}.", "vision_encoder.layers.{}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    *_under("prompt_encoder.", "prompt_encoder.", _PROMPT_ENCODER),
    *_under("mask_decoder.", "mask_decoder.", _MASK_DECODER),
]

_ATTENTION_OUT = [("out_proj.", "o_proj.")]
_SAM2_RULES: list[tuple[str, str]] = [
    # Hiera trunk and FPN neck
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.blocks.{}.norm1.", "vision_encoder.backbone.blocks.{}.layer_norm1."),
    ("image_encoder.trunk.blocks.{}.norm2.", "vision_encoder.backbone.blocks.{}.layer_norm2."),
    ("image_encoder.trunk.blocks.{}.mlp.layers.0.", "vision_encoder.backbone.blocks.{}.mlp.proj_in."),
    ("image_encoder.trunk.blocks.{}.mlp.layers.1.", "vision_encoder.backbone.blocks.{}.mlp.proj_out."),
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.convs.{}.conv.", "vision_encoder.neck.convs.{}."),
    # prompt encoder and mask decoder
    *_under("sam_prompt_encoder.", "prompt_encoder.", _PROMPT_ENCODER),
    *_under("sam_mask_decoder.", "mask_decoder.", _MASK_DECODER),
    *[
        (
            f"sam_mask_decoder.transformer.layers.{{}}.{attention}.out_proj.",
            f"mask_decoder.transformer.layers.{{}}.{attention}.o_proj.",
        )
        for attention in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    ],
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.",
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.",
    ),
    ("sam_mask_decoder.transformer.layers.{}.mlp.layers.0.", "mask_decoder.transformer.layers.{}.mlp.proj_in."),
    ("sam_mask_decoder.transformer.layers.{}.mlp.layers.1.", "mask_decoder.transformer.layers.{}.mlp.proj_out."),
    *[(f"sam_mask_decoder.pred_obj_score_head.{a}", f"mask_decoder.pred_obj_score_head.{b}") for a, b in _MLP3],
    ("sam_mask_decoder.", "mask_decoder."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    # memory modules (video only; kept so that the checkpoints load whole)
    *[
        (f"memory_attention.layers.{{}}.{attention}.out_proj.", f"memory_attention.layers.{{}}.{attention}.o_proj.")
        for attention in ("self_attn", "cross_attn_image")
    ],
    *[(f"memory_attention.layers.{{}}.norm{i}.", f"memory_attention.layers.{{}}.layer_norm{i}.") for i in (1, 2, 3)],
    ("memory_attention.norm.", "memory_attention.layer_norm."),
    *[
        (f"memory_encoder.mask_downsampler.encoder.{3 * i}.", f"memory_encoder.mask_downsampler.layers.{i}.conv.")
        for i in range(4)
    ],
    *[
        (
            f"memory_encoder.mask_downsampler.encoder.{3 * i + 1}.",
            f"memory_encoder.mask_downsampler.layers.{i}.layer_norm.",
        )
        for i in range(4)
    ],
    ("memory_encoder.mask_downsampler.encoder.12.", "memory_encoder.mask_downsampler.final_conv."),
    ("memory_encoder.pix_feat_proj.", "memory_encoder.feature_projection."),
    # EVF-SAM renamed CXBlock's `gamma` to `weight` (loading through transformers renamed gamma keys)
    ("memory_encoder.fuser.layers.{}.weight", "memory_encoder.memory_fuser.layers.{}.scale"),
    ("memory_encoder.fuser.layers.{}.dwconv.", "memory_encoder.memory_fuser.layers.{}.depthwise_conv."),
    ("memory_encoder.fuser.layers.{}.norm.", "memory_encoder.memory_fuser.layers.{}.layer_norm."),
    ("memory_encoder.fuser.layers.{}.pwconv", "memory_encoder.memory_fuser.layers.{}.pointwise_conv"),
    ("memory_encoder.out_proj.", "memory_encoder.projection."),
    *[(f"obj_ptr_proj.{a}", f"object_pointer_proj.{b}") for a, b in _MLP3],
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_embed", "no_memory_embedding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
]

# transformers keeps the Fourier matrix twice (tied): in the prompt encoder and for the image-wide encoding.
_TIED = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")
_POINTS = "prompt_encoder.point_embed."  # SAM-2 in transformers: one (4, C) `point_embed.weight`


def _compile(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for source, target in pairs:
        pattern = re.escape(_SAM + source).replace(r"\{\}", r"(\d+)")
        compiled.append((re.compile(pattern), _SAM + target.replace("{}", r"\1")))
    return compiled


class KeyMapping:
    """Renames between the published and this model's state-dict keys, for one SAM variant."""

    def __init__(self, rules: list[tuple[str, str]], stacked_points: bool):
        self.to_ours = _compile(rules)
        self.to_published = _compile([(ours, published) for published, ours in rules])
        self.stacked_points = stacked_points

    @staticmethod
    def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
        for pattern, replacement in rules:
            match = pattern.match(key)
            if match:
                return match.expand(replacement) + key[match.end() :]
        return key

    def published_to_ours(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a published checkpoint's keys to this model's (adds the tied Fourier matrix, stacks points)."""
        renamed = {self._rename(key, self.to_ours): value for key, value in state_dict.items()}
        if _SAM + _TIED[0] in renamed:
            renamed[_SAM + _TIED[1]] = renamed[_SAM + _TIED[0]]
        if self.stacked_points:
            points = sorted(k for k in renamed if re.fullmatch(re.escape(_SAM + _POINTS) + r"\d+\.weight", k))
            if points:
                stacked = [renamed.pop(k) for k in sorted(points, key=lambda k: int(k.split(".")[-2]))]
                renamed[_SAM + _POINTS + "weight"] = torch.cat(stacked, dim=0)
        return renamed

    def published_key(self, key: str) -> str:
        """The published name of one of this model's keys (tied duplicate -> source, stacked points -> first)."""
        if key == _SAM + _TIED[1]:
            key = _SAM + _TIED[0]
        if self.stacked_points and key == _SAM + _POINTS + "weight":
            key = _SAM + _POINTS + "0.weight"
        return self._rename(key, self.to_published)

    def ours_to_published(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename this model's keys to the published layout (drops the tied duplicate, splits stacked points)."""
        published = {}
        for key, value in state_dict.items():
            if key == _SAM + _TIED[1]:
                continue
            if self.stacked_points and key == _SAM + _POINTS + "weight":
                for index, row in enumerate(value.split(1, dim=0)):
                    published[self._rename(f"{_SAM}{_POINTS}{index}.weight", self.to_published)] = row
                continue
            published[self._rename(key, self.to_published)] = value
        return published


SAM1_KEYS = KeyMapping(_SAM1_RULES, stacked_points=False)
SAM2_KEYS = KeyMapping(_SAM2_RULES, stacked_points=True)
