"""EVF-SAM checkpoint configuration: the published `config.json` (model_type "evf") and the sizes it implies.

Published configs name sizes by scale only (`sam_scale: "huge"` for EVF-SAM, `"large"` for EVF-SAM2;
`mm_extractor_scale: "large"`); the numbers behind each scale are fixed by the official code (`build_sam_vit_h`,
`sam2_hiera_l.yaml`, BEiT-3 `_get_large_config`). Two optional fields that published configs never carry, `beit3`
and `sam`, override those numbers so tests can build tiny models offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class Beit3Config:
    """Sizes of the BEiT-3 multiway encoder (torchscale `EncoderConfig` fields that change the weights)."""

    embed_dim: int = 1024
    layers: int = 24
    heads: int = 16
    ffn_dim: int = 4096
    img_size: int = 224
    """Side of the square low-resolution view of the image that BEiT-3 fuses with the text."""
    patch_size: int = 16
    vocab_size: int = 64010
    max_source_positions: int = 1024
    """Rows of the text position table: the longest tokenized expression (with <s> and </s>) is this minus 2."""
    layernorm_eps: float = 1e-5


BEIT3_SCALES = {
    "base": Beit3Config(embed_dim=768, layers=12, heads=12, ffn_dim=3072),
    "large": Beit3Config(),
}

# SAM-1 image encoders by `sam_scale` (segment_anything.build_sam); only ViT-H is published with EVF-SAM.
SAM_SCALES: dict[str, dict[str, Any]] = {
    "huge": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}

# SAM-2 image encoders by `sam_scale` (EvfSam2Model: `sam2_hiera_l.yaml`; the official code also names "tiny" but no
# checkpoint uses it), as transformers `Sam2HieraDetConfig` / `Sam2VisionConfig` fields.
SAM2_SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "large": {
        "backbone": {
            "hidden_size": 144,
            "embed_dim_per_stage": [144, 288, 576, 1152],
            "num_attention_heads_per_stage": [2, 4, 8, 16],
            "blocks_per_stage": [2, 6, 36, 4],
            "global_attention_blocks": [23, 33, 43],
            "window_positional_embedding_background_size": [7, 7],
            "window_size_per_stage": [8, 4, 16, 8],
        },
        "vision": {"backbone_channel_list": [1152, 576, 288, 144]},
    },
}


@dataclass
class EvfSamConfig:
    """What `config.json` of an EVF-SAM checkpoint says, validated; unknown published fields are kept for saving."""

    sam_scale: str = "huge"
    mm_extractor_scale: str = "large"
    hidden_size: int = 1024
    """Width of the fused BEiT-3 feature fed to `text_hidden_fcs`; must equal the BEiT-3 width."""
    out_dim: int = 256
    """Width of the prompt embedding, i.e. SAM's prompt/mask-decoder width."""
    beit3: dict[str, Any] | None = None
    """Overrides of `Beit3Config` fields (tiny test models only; absent from published configs)."""
    sam: dict[str, Any] | None = None
    """Overrides of SAM sizes (tiny test models only; absent from published configs), as transformers config fields:
    SAM-1 keys `vision` (`SamVisionConfig`) and `mask_decoder` (`SamMaskDecoderConfig`); SAM-2 keys `backbone`
    (`Sam2HieraDetConfig`), `vision` (`Sam2VisionConfig`), `mask_decoder` and `model` (`Sam2VideoConfig`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The other fields of the published config (token ids, dtype, architectures), written back unchanged."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> EvfSamConfig:
        if data.get("model_type") != "evf":
            raise ValueError(
                f"{source}: model_type must be 'evf' (an EVF-SAM checkpoint), got {data.get('model_type')!r}"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        for name in ("sam_scale", "mm_extractor_scale"):
            if name not in data:
                raise ValueError(f"{source}: field {name!r} is missing; EVF-SAM configs must name it")
        config = cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known and k != "model_type"},
        )
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EvfSamConfig:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = {"model_type": "evf", **self.extra}
        data.update({k: v for k, v in asdict(self).items() if k != "extra" and v is not None})
        return data

    @property
    def is_sam2(self) -> bool:
        """EVF-SAM2 (SAM-2 Hiera image encoder) rather than EVF-SAM (SAM ViT)."""
        return self.sam_scale in SAM2_SCALES

    def validate(self, source: str = "config") -> None:
        scales = sorted(SAM_SCALES) + sorted(SAM2_SCALES)
        if self.sam_scale not in scales:
            raise ValueError(f"{source}: sam_scale must be one of {scales}, got {self.sam_scale!r}")
        if self.mm_extractor_scale not in BEIT3_SCALES:
            raise ValueError(
                f"{source}: mm_extractor_scale must be one of {sorted(BEIT3_SCALES)}, got {self.mm_extractor_scale!r}"
            )
        unknown = set(self.beit3 or {}) - {f.name for f in fields(Beit3Config)}
        if unknown:
            raise ValueError(f"{source}: unknown beit3 fields {sorted(unknown)}")
        allowed = {"backbone", "vision", "mask_decoder", "model"} if self.is_sam2 else {"vision", "mask_decoder"}
        unknown = set(self.sam or {}) - allowed
        if unknown:
            raise ValueError(f"{source}: unknown sam fields {sorted(unknown)}; expected some of {sorted(allowed)}")
        if self.hidden_size != self.beit3_config().embed_dim:
            raise ValueError(
                f"{source}: hidden_size={self.hidden_size} must equal the BEiT-3 width {self.beit3_config().embed_dim}"
            )

    def beit3_config(self) -> Beit3Config:
        return replace(BEIT3_SCALES[self.mm_extractor_scale], **(self.beit3 or {}))

    def sam_config(self):
        """transformers config of the SAM part: `SamConfig` (SAM-1) or `Sam2VideoConfig` (SAM-2)."""
        return self._sam2_config() if self.is_sam2 else self._sam1_config()

    def _sam1_config(self):
        from transformers import SamConfig

        overrides = self.sam or {}
        vision = {**SAM_SCALES[self.sam_scale], **overrides.get("vision", {})}
        vision.update(output_channels=self.out_dim, num_pos_feats=self.out_dim // 2)
        image_size, patch_size = vision.get("image_size", 1024), vision.get("patch_size", 16)
        prompt = {
            "hidden_size": self.out_dim,
            "image_size": image_size,
            "patch_size": patch_size,
            "image_embedding_size": image_size // patch_size,
        }
        # The original TwoWayTransformer uses nn.LayerNorm's default eps (1e-5); transformers defaults to 1e-6.
        decoder = {"layer_norm_eps": 1e-5, **overrides.get("mask_decoder", {}), "hidden_size": self.out_dim}
        return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)

    def _sam2_config(self):
        """`Sam2VideoConfig`: the video model because the checkpoints hold SAM-2's memory modules too; SAM 2.1-only
        parts (object-pointer temporal projection, occlusion embedding) are off, as in `sam2_hiera_*.yaml`."""
        from transformers import Sam2HieraDetConfig, Sam2VideoConfig, Sam2VisionConfig
        from transformers.models.sam2_video.configuration_sam2_video import Sam2VideoMaskDecoderConfig

        scale, overrides = SAM2_SCALES[self.sam_scale], self.sam or {}
        backbone = Sam2HieraDetConfig(**{**scale["backbone"], **overrides.get("backbone", {})})
        image_size = backbone.image_size[0]
        vision = {
            "backbone_feature_sizes": [
                [image_size // 4, image_size // 4],
                [image_size // 8] * 2,
                [image_size // 16] * 2,
            ],
            **scale["vision"],
            **overrides.get("vision", {}),
            "fpn_hidden_size": self.out_dim,
        }
        width = self.out_dim
        return Sam2VideoConfig(
            vision_config=Sam2VisionConfig(backbone_config=backbone, **vision),
            prompt_encoder_config={"hidden_size": width, "image_size": image_size, "patch_size": 16},
            # a config object, not a dict: transformers 5.17 builds the dict into the wrong class
            mask_decoder_config=Sam2VideoMaskDecoderConfig(
                **{**overrides.get("mask_decoder", {}), "hidden_size": width}
            ),
            image_size=image_size,
            enable_temporal_pos_encoding_for_object_pointers=False,
            enable_occlusion_spatial_embedding=False,
            **{
                "memory_attention_hidden_size": width,
                "memory_encoder_hidden_size": width,
                "mask_downsampler_embed_dim": width,
                "memory_fuser_embed_dim": width,
                **overrides.get("model", {}),
            },
        )
