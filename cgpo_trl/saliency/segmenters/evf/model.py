"""The EVF-SAM models: BEiT-3 early fusion -> one prompt token -> SAM (EVF-SAM) or SAM-2 (EVF-SAM2) mask decoder.

Module names follow the official `EvfSamModel` / `EvfSam2Model` (`visual_model`, `mm_extractor.beit3`,
`text_hidden_fcs`). SAM is transformers' `SamModel` / `Sam2VideoModel`, whose parameter names differ from
segment_anything's / sam2's; `keys.py` maps them, and loading is strict: every published tensor must find its
parameter, with the same shape, and every parameter must be filled.
"""

from __future__ import annotations

import abc
import json
import os

import torch
from torch import nn

from .beit3 import BEiT3Wrapper
from .config import EvfSamConfig
from .keys import SAM1_KEYS, SAM2_KEYS, KeyMapping

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"


class EvfModel(nn.Module, abc.ABC):
    """What both variants share: the BEiT-3 fusion encoder, the prompt projection and checkpoint I/O.

    Subclasses build `visual_model` and implement `image_features` (a list of per-image tensors, batch first) and
    `decode` (low-resolution mask logits and predicted IoU for one prompt per image).
    """

    keys: KeyMapping

    def __init__(self, config: EvfSamConfig):
        super().__init__()
        self.config = config
        self.mm_extractor = BEiT3Wrapper(config.beit3_config())
        self.text_hidden_fcs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(config.hidden_size, config.hidden_size),
                    nn.ReLU(),
                    nn.Linear(config.hidden_size, config.out_dim),
                )
            ]
        )

    @property
    @abc.abstractmethod
    def sam_image_size(self) -> int:
        """Side of the square SAM input."""

    @property
    def beit3_image_size(self) -> int:
        return self.mm_extractor.beit3.config.img_size

    @property
    def max_text_tokens(self) -> int:
        return self.mm_extractor.beit3.config.max_source_positions - 2

    @abc.abstractmethod
    def image_features(self, sam_pixels: torch.Tensor) -> list[torch.Tensor]:
        """SAM image features for (B, 3, S, S) normalised pixels, each tensor batch first."""

    @abc.abstractmethod
    def decode(self, features: list[torch.Tensor], prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (B, h, w) and predicted IoU (B,) for one prompt embedding per image."""

    def prompt_embeddings(
        self, beit3_pixels: torch.Tensor, input_ids: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Early fusion: the BEiT-3 output at the vision CLS position, projected to SAM's prompt width (B, C)."""
        fused = self.mm_extractor.beit3(beit3_pixels, input_ids, padding)
        return self.text_hidden_fcs[0](fused[:, 0])

    def forward(
        self,
        sam_pixels: torch.Tensor,
        beit3_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image per expression: low-resolution mask logits (B, h, w) and predicted IoU (B,)."""
        return self.decode(self.image_features(sam_pixels), self.prompt_embeddings(beit3_pixels, input_ids, padding))

    # --- checkpoints in the published layout -------------------------------------------------------------------

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the published checkpoint's key names."""
        return self.keys.ours_to_published(self.state_dict())

    def load_published_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Strictly load published weights (cast to this model's dtype); errors name the offending keys."""
        mapped = self.keys.published_to_ours(state_dict)
        expected = self.state_dict()
        missing = sorted({self.keys.published_key(key) for key in expected.keys() - mapped.keys()})
        unexpected = sorted(mapped.keys() - expected.keys())
        mismatched = [
            f"{self.keys.published_key(key)}: checkpoint {tuple(mapped[key].shape)}, model {tuple(expected[key].shape)}"
            for key in sorted(expected.keys() & mapped.keys())
            if mapped[key].shape != expected[key].shape
        ]
        if missing or unexpected or mismatched:
            scales = f"sam_scale={self.config.sam_scale!r}, mm_extractor_scale={self.config.mm_extractor_scale!r}"
            problems = [
                f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if keys
            ]
            raise ValueError(f"{source} does not match an EVF-SAM model with {scales}: " + "; ".join(problems))
        dtypes = {key: value.dtype for key, value in expected.items()}
        self.load_state_dict({key: value.to(dtypes[key]) for key, value in mapped.items()}, strict=True, assign=True)

    def save_pretrained(self, directory: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write `config.json` and the weights under the published key names (as `YxZhang/evf-sam*` ship them)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.config.to_dict(), handle, indent=2)
        state_dict = {key: value.detach().cpu().contiguous() for key, value in self.published_state_dict().items()}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state_dict, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
        else:
            torch.save(state_dict, os.path.join(directory, PYTORCH_FILE))


class EvfSamModel(EvfModel):
    """EVF-SAM: SAM-1 (ViT) image encoder and mask decoder, single-mask output (`YxZhang/evf-sam*`)."""

    keys = SAM1_KEYS

    def __init__(self, config: EvfSamConfig):
        from transformers import SamModel

        super().__init__(config)
        self.visual_model = SamModel(config.sam_config())

    @property
    def sam_image_size(self) -> int:
        return self.visual_model.config.vision_config.image_size

    def image_features(self, sam_pixels: torch.Tensor) -> list[torch.Tensor]:
        """SAM image encoder: (B, 3, S, S) normalised pixels -> [(B, C, S/16, S/16)]."""
        return [self.visual_model.vision_encoder(sam_pixels).last_hidden_state]

    def decode(self, features: list[torch.Tensor], prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM mask decoder with the text embedding as the single sparse prompt and no mask prompt.

        Returns the logits of mask token 0 (B, 4h, 4w) and its predicted IoU (B,): EVF-SAM's `inference` with
        `multimask_output=False`.
        """
        (embeddings,) = features
        sam = self.visual_model
        batch, _, height, width = embeddings.shape
        positional = sam.get_image_wide_positional_embeddings().to(embeddings.dtype).repeat(batch, 1, 1, 1)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        masks, iou = sam.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=prompts[:, None, None, :].to(embeddings.dtype),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks[:, 0, 0], iou[:, 0, 0]


class EvfSam2Model(EvfModel):
    """EVF-SAM2: SAM-2 (Hiera) image encoder and mask decoder (`YxZhang/evf-sam2*`).

    `multimask=True` is the official code from commit 9d00853 on (needed by the multitask checkpoints): the best of
    the three multimask outputs by predicted IoU. `multimask=False` is the code before it, which `YxZhang/evf-sam2`
    was released with: mask token 0, replaced by the best multimask output when its stability score is below 0.98.
    The SAM-2 memory modules are built (the checkpoints hold them) but image segmentation does not use them.
    """

    keys = SAM2_KEYS

    def __init__(self, config: EvfSamConfig, multimask: bool = True):
        from transformers import Sam2VideoModel

        super().__init__(config)
        self.visual_model = Sam2VideoModel(config.sam_config())
        self.multimask = multimask

    @property
    def sam_image_size(self) -> int:
        return self.visual_model.config.image_size

    def image_features(self, sam_pixels: torch.Tensor) -> list[torch.Tensor]:
        """[level-0 (B, C/8, S/4, S/4), level-1 (B, C/4, S/8, S/8), image embedding + no-memory embedding
        (B, C, S/16, S/16)], as `EvfSam2Model.inference` prepares them."""
        return self.visual_model.get_image_embeddings(sam_pixels)

    def decode(self, features: list[torch.Tensor], prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *high_resolution, embeddings = features
        sam = self.visual_model
        batch, _, height, width = embeddings.shape
        positional = sam.get_image_wide_positional_embeddings().to(embeddings.dtype).repeat(batch, 1, 1, 1)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        masks, iou, _, _ = sam.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=prompts[:, None, None, :].to(embeddings.dtype),
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask,
            high_resolution_features=high_resolution,
        )
        masks, iou = masks[:, 0], iou[:, 0]  # one prompt per image: (B, K, h, w), (B, K)
        best = iou.argmax(dim=1)
        rows = torch.arange(batch, device=best.device)
        return masks[rows, best], iou[rows, best]


def build_model(config: EvfSamConfig, multimask: bool = True) -> EvfModel:
    """The model class that `config.sam_scale` names (`multimask` only applies to EVF-SAM2)."""
    return EvfSam2Model(config, multimask=multimask) if config.is_sam2 else EvfSamModel(config)


def from_pretrained(
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    multimask: bool = True,
) -> EvfModel:
    """Build from `config.json` with parameters on the meta device, then strictly load the weights (no init pass)."""
    from accelerate import init_empty_weights

    directory = os.fspath(directory)
    config_file = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; expected an EVF-SAM checkpoint directory")
    config = EvfSamConfig.from_json_file(config_file)
    with init_empty_weights():  # buffers (e.g. rotary frequencies, not in checkpoints) are still computed
        model = build_model(config, multimask=multimask).to(dtype)
    weights_file, state_dict = load_weights(directory)
    model.load_published_state_dict(state_dict, source=weights_file)
    return model.to(device).eval()


def load_weights(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensors: `model.safetensors` if present, else `pytorch_model.bin` (memory-mapped)."""
    safetensors_file = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        return safetensors_file, load_file(safetensors_file)
    pytorch_file = os.path.join(directory, PYTORCH_FILE)
    if os.path.isfile(pytorch_file):
        try:
            return pytorch_file, torch.load(pytorch_file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            return pytorch_file, torch.load(pytorch_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no {SAFETENSORS_FILE} or {PYTORCH_FILE}")
