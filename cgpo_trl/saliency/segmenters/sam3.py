"""`sam3`: SAM 3 (Segment Anything with Concepts) from transformers: text prompt -> scored instance masks.

SAM 3 detects every instance of the prompted concept. Instance mode returns the instances whose score (query
probability times the presence probability, as transformers' post-processing computes it) exceeds
`score_threshold`, best first, each as its mask probability upsampled to the image size; region mode returns their
pixel-wise max and the best instance score (an empty mask and 0.0 when none passes the threshold).

transformers' `Sam3ImageProcessor` needs torchvision, so this backend resizes and normalises the image itself with
the values of the checkpoint's image-processor config (size, mean, std, rescale factor).
"""

from __future__ import annotations

import numpy as np

from .base import InstanceFirstSegmenter, register_segmenter, torch_dtype

DEFAULT_CHECKPOINT = "facebook/sam3"
TEXT_LENGTH = 32  # Sam3Processor pads every prompt to this many tokens


def _import_sam3():
    try:
        from transformers import Sam3Model
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput
    except ImportError as error:
        import transformers

        raise ImportError(
            "the sam3 segmenter needs a transformers release that ships SAM 3 (`transformers.Sam3Model`, "
            f"transformers 5.x; this project requires >= 5.24), but transformers {transformers.__version__} is "
            "installed: pip install -U 'transformers>=5.24'"
        ) from error
    return Sam3Model, Sam3VisionEncoderOutput


@register_segmenter("sam3")
class Sam3Segmenter(InstanceFirstSegmenter):
    """Args:
    checkpoint: Hub id or local directory with a `Sam3Model`, its tokenizer and image-processor config.
    device: torch device.
    dtype: "float32", "bfloat16" or "float16".
    batch_size: pairs per forward pass; pairs that share an image share its vision features.
    score_threshold: instances scoring at or below this are dropped.
    """

    def __init__(
        self,
        checkpoint: str = DEFAULT_CHECKPOINT,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        score_threshold: float = 0.3,
    ):
        from transformers import AutoTokenizer
        from transformers.image_processing_base import ImageProcessingMixin

        Sam3Model, self._vision_output = _import_sam3()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
        self.dtype = torch_dtype(dtype)
        self.device = device
        self.batch_size = batch_size
        self.score_threshold = score_threshold
        self.model = Sam3Model.from_pretrained(checkpoint, dtype=self.dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        config, _ = ImageProcessingMixin.get_image_processor_dict(checkpoint)
        size = config.get("size") or {"height": 1008, "width": 1008}
        self.input_size = (int(size["width"]), int(size["height"]))
        self.mean = np.asarray(config.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.std = np.asarray(config.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.rescale = float(config.get("rescale_factor", 1 / 255))

    def _pixels(self, image):
        import torch
        from PIL import Image

        resized = image.convert("RGB").resize(self.input_size, Image.BILINEAR)
        array = (np.asarray(resized, dtype=np.float32) * self.rescale - self.mean) / self.std
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def _segment_instances(self, images, expressions):
        import torch
        import torch.nn.functional as F

        results = []
        for start in range(0, len(images), self.batch_size):
            batch_images = images[start : start + self.batch_size]
            unique = list({id(image): image for image in batch_images}.values())
            index = torch.tensor([[id(u) for u in unique].index(id(image)) for image in batch_images])
            pixels = torch.stack([self._pixels(image) for image in unique]).to(self.device, self.dtype)
            text = self.tokenizer(
                list(expressions[start : start + self.batch_size]),
                padding="max_length",
                max_length=TEXT_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                vision = self.model.get_vision_features(pixel_values=pixels)
                vision = self._vision_output(
                    fpn_hidden_states=tuple(t[index.to(t.device)] for t in vision.fpn_hidden_states),
                    fpn_position_encoding=tuple(t[index.to(t.device)] for t in vision.fpn_position_encoding),
                )
                out = self.model(vision_embeds=vision, input_ids=text.input_ids, attention_mask=text.attention_mask)
            scores = out.pred_logits.float().sigmoid()
            if out.presence_logits is not None:
                scores = scores * out.presence_logits.float().sigmoid()
            probabilities = out.pred_masks.float().sigmoid()
            for image, row_scores, row_masks in zip(batch_images, scores, probabilities):
                keep = torch.nonzero(row_scores > self.score_threshold).flatten()
                keep = keep[row_scores[keep].argsort(descending=True)]
                if len(keep) == 0:
                    results.append([])
                    continue
                masks = F.interpolate(row_masks[keep][None], size=(image.height, image.width), mode="bilinear")[0]
                results.append(
                    [
                        (mask.clamp(0, 1).cpu().numpy().astype(np.float32), float(score))
                        for mask, score in zip(masks, row_scores[keep])
                    ]
                )
        return results
