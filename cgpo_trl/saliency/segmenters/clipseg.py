"""`clipseg`: CLIPSeg (Lüddecke & Ecker, 2022) from transformers, a light text-prompted segmenter.

CLIPSeg predicts one low-resolution (352 px) heat map per (image, text) pair. Region mode returns its sigmoid,
upsampled bilinearly to the image size (a soft mask; set `threshold` to binarise it), and the peak probability as
the score. Instance mode is the base class's split of the thresholded mask into connected components.
"""

from __future__ import annotations

import numpy as np

from .base import ReferringSegmenter, register_segmenter, torch_dtype

DEFAULT_CHECKPOINT = "CIDAS/clipseg-rd64-refined"


@register_segmenter("clipseg")
class CLIPSegSegmenter(ReferringSegmenter):
    """Args:
    checkpoint: Hub id or local directory holding a `CLIPSegForImageSegmentation` and its processor files.
    device: torch device.
    dtype: "float32", "bfloat16" or "float16".
    batch_size: pairs per forward pass.
    threshold: if set, masks are binarised at this probability (CLIPSeg's probabilities are often low-contrast).
    """

    def __init__(
        self,
        checkpoint: str = DEFAULT_CHECKPOINT,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
        threshold: float | None = None,
    ):
        from transformers import AutoTokenizer, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessorPil

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.dtype = torch_dtype(dtype)
        self.device = device
        self.batch_size = batch_size
        self.threshold = threshold
        self.model = CLIPSegForImageSegmentation.from_pretrained(checkpoint, dtype=self.dtype).to(device).eval()
        # The PIL image processor: the default one needs torchvision.
        self.processor = CLIPSegProcessor(
            image_processor=ViTImageProcessorPil.from_pretrained(checkpoint),
            tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        )

    def _segment_regions(self, images, expressions):
        import torch
        import torch.nn.functional as F

        results = []
        for start in range(0, len(images), self.batch_size):
            batch_images = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            batch_texts = expressions[start : start + self.batch_size]
            inputs = self.processor(text=batch_texts, images=batch_images, padding=True, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            logits = logits.reshape(len(batch_images), *logits.shape[-2:]).float()
            for image, heat in zip(batch_images, logits.sigmoid()):
                mask = F.interpolate(heat[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]
                mask = mask.clamp(0, 1).cpu().numpy().astype(np.float32)
                score = float(mask.max())
                if self.threshold is not None:
                    mask = (mask >= self.threshold).astype(np.float32)
                results.append((mask, score))
        return results
