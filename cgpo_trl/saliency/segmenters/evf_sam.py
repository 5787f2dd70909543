"""`evf-sam` backend: EVF-SAM, the referring segmenter Saliency-R1 uses, from its published Hugging Face weights.

Both published families load: EVF-SAM (SAM ViT-H) and EVF-SAM2 (SAM-2 Hiera-L), chosen by the checkpoint's
`config.json`. Region mode returns, per pair, the mask the official `inference.py` keeps (`logits > 0`, as a float32
0/1 map; `soft_masks=True` gives `sigmoid(logits)` instead) and the decoder's predicted IoU clipped to [0, 1] as the
score. Instance mode splits that mask into 8-connected components of at least `min_instance_area`
pixels, largest first, each scored `region score * component area / foreground area`: EVF-SAM has no instance
head, and a fragment that covers little of the mask is a weak instance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .base import ReferringSegmenter, RegionResult, image_digest, register_segmenter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_FILES = ("config.json", "sentencepiece.bpe.model")
OPTIONAL_FILES = ("added_tokens.json",)  # the multitask checkpoints' [semantic] token
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_checkpoint(checkpoint: str | os.PathLike, revision: str | None = None) -> str:
    """A local checkpoint directory, or the Hugging Face Hub snapshot directory of a repo id such as `YxZhang/evf-sam`."""
    checkpoint = os.fspath(checkpoint)
    if os.path.isdir(checkpoint):
        return checkpoint
    if os.path.exists(checkpoint):
        raise ValueError(
            f"checkpoint {checkpoint!r} is a file; pass the directory holding config.json and the weights"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        paths = [hf_hub_download(checkpoint, name, revision=revision) for name in CHECKPOINT_FILES]
    except Exception as error:
        raise ValueError(
            f"checkpoint {checkpoint!r} is neither a local directory nor a downloadable Hub repo ({error})"
        ) from error
    for name in OPTIONAL_FILES:
        try:
            hf_hub_download(checkpoint, name, revision=revision)
        except EntryNotFoundError:
            pass
    for name in WEIGHT_FILES:  # the first that exists; evf-sam's main branch only has pytorch_model.bin
        try:
            hf_hub_download(checkpoint, name, revision=revision)
            break
        except EntryNotFoundError:
            continue
    else:
        raise ValueError(f"checkpoint {checkpoint!r} has neither of {WEIGHT_FILES}")
    return os.path.dirname(paths[0])


@register_segmenter("evf-sam")
class EvfSamSegmenter(ReferringSegmenter):
    """EVF-SAM (SAM ViT-H or SAM-2 Hiera-L, with BEiT-3-large) behind the `ReferringSegmenter` protocol.

    Args:
        checkpoint: local directory in the published layout, or a Hub id (`YxZhang/evf-sam`,
            `YxZhang/evf-sam-multitask`, `YxZhang/evf-sam2`, `YxZhang/evf-sam2-multitask`).
        device: torch device for the model.
        dtype: "float32" (CPU), "bfloat16" or "float16" (GPU); the published weights are float16.
        batch_size: pairs per forward pass; pairs that share an image in a batch share one SAM image encoding.
        soft_masks: return `sigmoid(logits)` instead of the official binary `logits > 0` mask.
        min_instance_area: smallest connected component (pixels) kept as an instance.
        revision: Hub revision (branch, tag or commit) when `checkpoint` is a repo id.
        evf_code: which official inference code to reproduce for EVF-SAM2 checkpoints: "current" (commit 9d00853
            and later: best of three masks by predicted IoU, image stretched as uint8), "legacy" (before it, which
            the non-multitask checkpoints were released with: single mask with stability fallback, longest-side
            resize then stretch), or "auto": "current" when the tokenizer has the multitask `[semantic]` token,
            else "legacy". EVF-SAM (SAM-1) inference is the same in both.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 4,
        soft_masks: bool = False,
        min_instance_area: int = 16,
        revision: str | None = None,
        evf_code: str = "auto",
    ):
        if checkpoint is None:
            raise ValueError(
                "segmenter 'evf-sam' needs a checkpoint: segmenter_kwargs {checkpoint: YxZhang/evf-sam2} (or "
                "YxZhang/evf-sam, YxZhang/evf-sam-multitask, YxZhang/evf-sam2-multitask, or a local folder)"
            )
        from .evf import EvfTokenizer, from_pretrained

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if evf_code not in ("auto", "current", "legacy"):
            raise ValueError(f"evf_code must be 'auto', 'current' or 'legacy', got {evf_code!r}")
        directory = resolve_checkpoint(checkpoint, revision)
        self.tokenizer = EvfTokenizer.from_pretrained(directory)
        if evf_code == "auto":
            evf_code = "current" if "[semantic]" in self.tokenizer.added_tokens else "legacy"
        self.legacy = evf_code == "legacy"
        self.model = from_pretrained(directory, dtype=DTYPES[dtype], device=device, multimask=not self.legacy)
        self.is_sam2 = self.model.config.is_sam2
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size
        self.soft_masks = soft_masks
        self.min_instance_area = min_instance_area

    def _segment_regions(self, images: list[Image.Image], expressions: list[str]) -> list[RegionResult]:
        results: list[RegionResult] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            results.extend(self._segment_batch(images[start:stop], expressions[start:stop]))
        return results

    @torch.inference_mode()
    def _segment_batch(self, images: Sequence[Image.Image], expressions: Sequence[str]) -> list[RegionResult]:
        from .evf.processing import beit3_pixels, sam2_pixels, sam_pixels, upsample_logits, upsample_logits_sam2

        model, size = self.model, self.model.sam_image_size
        digests = [image_digest(image) for image in images]
        order = list(dict.fromkeys(digests))  # each distinct image is encoded once
        first = [digests.index(digest) for digest in order]
        if self.is_sam2:
            sam_inputs = [sam2_pixels(images[index], size, legacy=self.legacy) for index in first]
        else:
            sam_inputs, resized = zip(*(sam_pixels(images[index], size) for index in first))
        features = model.image_features(self._to_model(torch.stack(list(sam_inputs))))
        pair_rows = torch.tensor([order.index(digest) for digest in digests], device=self.device)
        features = [feature.index_select(0, pair_rows) for feature in features]

        pixels = self._to_model(torch.stack([beit3_pixels(image, model.beit3_image_size) for image in images]))
        input_ids, padding = self.tokenizer(list(expressions), max_length=model.max_text_tokens)
        prompts = model.prompt_embeddings(pixels, input_ids.to(self.device), padding.to(self.device))
        low_res, iou = model.decode(features, prompts)

        results = []
        for index, image in enumerate(images):
            original = (image.height, image.width)
            if self.is_sam2:
                logits = upsample_logits_sam2(low_res[index], original)
            else:
                logits = upsample_logits(low_res[index], size, resized[order.index(digests[index])], original)
            mask = torch.sigmoid(logits) if self.soft_masks else (logits > 0).float()
            results.append((mask.cpu().numpy().astype(np.float32), float(iou[index].float().clamp(0, 1))))
        return results

    def _to_model(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(device=self.device, dtype=self.dtype)

    def _segment_instances(self, images: list[Image.Image], expressions: list[str]) -> list[list[RegionResult]]:
        from skimage.measure import label

        results = []
        for mask, score in self._segment_regions(images, expressions):
            components = label(mask >= 0.5, connectivity=2)
            sizes = np.bincount(components.ravel())
            foreground = int(sizes[1:].sum())
            kept = sorted(
                (k for k in range(1, len(sizes)) if sizes[k] >= self.min_instance_area), key=lambda k: -sizes[k]
            )
            results.append(
                [
                    (np.where(components == k, mask, 0).astype(np.float32), float(score * sizes[k] / foreground))
                    for k in kept
                ]
            )
        return results
