"""`grounded-sam`: Grounding DINO boxes for the expression, then SAM masks inside those boxes, both from transformers.

Grounding DINO keeps the boxes whose score exceeds `box_threshold` (duplicates above `nms_iou` removed, at most
`max_instances`, best first); SAM turns each box into a mask probability at the image size. Instance mode returns
one (mask, box score) per box; region mode their pixel-wise max and the best box score (an empty mask and 0.0
when no box passes). Each distinct image of a batch is encoded by SAM once.
"""

from __future__ import annotations

import numpy as np

from .base import InstanceFirstSegmenter, register_segmenter, torch_dtype

DEFAULT_CHECKPOINT = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM_CHECKPOINT = "facebook/sam-vit-base"


def _dino_text(expression: str) -> str:
    # Grounding DINO was trained on lower-case phrases that end with a period.
    text = expression.strip().lower()
    return text if text.endswith(".") else text + "."


@register_segmenter("grounded-sam")
class GroundedSamSegmenter(InstanceFirstSegmenter):
    """Args:
    checkpoint: Hub id or local directory of a `GroundingDinoForObjectDetection` and its processor.
    sam_checkpoint: Hub id or local directory of a `SamModel` and its processor.
    device: torch device for both models.
    dtype: "float32", "bfloat16" or "float16".
    batch_size: pairs per Grounding DINO forward pass.
    box_threshold: Grounding DINO box score threshold.
    text_threshold: Grounding DINO token score threshold (for its phrase labels).
    nms_iou: boxes overlapping a better one by more than this IoU are dropped.
    max_instances: most boxes kept per pair.
    """

    def __init__(
        self,
        checkpoint: str = DEFAULT_CHECKPOINT,
        sam_checkpoint: str = DEFAULT_SAM_CHECKPOINT,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_iou: float = 0.7,
        max_instances: int = 10,
    ):
        from transformers import (
            AutoTokenizer,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessorPil,
            GroundingDinoProcessor,
            SamImageProcessorPil,
            SamModel,
            SamProcessor,
        )

        if batch_size < 1 or max_instances < 1:
            raise ValueError(f"batch_size and max_instances must be >= 1, got {batch_size} and {max_instances}")
        for name, value in (
            ("box_threshold", box_threshold),
            ("text_threshold", text_threshold),
            ("nms_iou", nms_iou),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.dtype = torch_dtype(dtype)
        self.device = device
        self.batch_size = batch_size
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.nms_iou = nms_iou
        self.max_instances = max_instances
        # PIL image processors: the default ones need torchvision.
        self.detector = GroundingDinoForObjectDetection.from_pretrained(checkpoint, dtype=self.dtype).to(device).eval()
        self.detector_processor = GroundingDinoProcessor(
            image_processor=GroundingDinoImageProcessorPil.from_pretrained(checkpoint),
            tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        )
        self.sam = SamModel.from_pretrained(sam_checkpoint, dtype=self.dtype).to(device).eval()
        self.sam_processor = SamProcessor(image_processor=SamImageProcessorPil.from_pretrained(sam_checkpoint))

    def _boxes(self, images, expressions) -> list[tuple[np.ndarray, np.ndarray]]:
        """(boxes xyxy in pixels, scores) per pair, after thresholding, NMS and the instance cap, best first."""
        import torch
        from pycocotools import mask as mask_utils

        found = []
        for start in range(0, len(images), self.batch_size):
            batch_images = images[start : start + self.batch_size]
            texts = [_dino_text(e) for e in expressions[start : start + self.batch_size]]
            inputs = self.detector_processor(images=batch_images, text=texts, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                outputs = self.detector(**inputs)
            outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
            detections = self.detector_processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[(image.height, image.width) for image in batch_images],
            )
            for detection in detections:
                scores = detection["scores"].cpu().numpy().astype(np.float64)
                boxes = detection["boxes"].cpu().numpy().astype(np.float64)
                order = np.argsort(-scores, kind="stable")
                boxes, scores = boxes[order], scores[order]
                xywh = np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
                overlaps = np.asarray(mask_utils.iou(xywh, xywh, [0] * len(xywh))).reshape(len(xywh), len(xywh))
                kept: list[int] = []
                for k in range(len(boxes)):
                    if len(kept) < self.max_instances and all(overlaps[k, j] <= self.nms_iou for j in kept):
                        kept.append(k)
                found.append((boxes[kept], scores[kept]))
        return found

    def _segment_instances(self, images, expressions):
        import torch

        embeddings: dict[int, object] = {}
        results = []
        for image, (boxes, scores) in zip(images, self._boxes(images, expressions)):
            if len(boxes) == 0:
                results.append([])
                continue
            inputs = self.sam_processor(images=image.convert("RGB"), input_boxes=[boxes.tolist()], return_tensors="pt")
            with torch.inference_mode():
                if id(image) not in embeddings:
                    pixels = inputs["pixel_values"].to(self.device, self.dtype)
                    embeddings[id(image)] = self.sam.get_image_embeddings(pixels)
                outputs = self.sam(
                    image_embeddings=embeddings[id(image)],
                    input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                    multimask_output=False,
                )
            logits = self.sam_processor.post_process_masks(
                outputs.pred_masks.float().cpu(),
                inputs["original_sizes"],
                inputs["reshaped_input_sizes"],
                binarize=False,
            )[0][:, 0]
            masks = logits.sigmoid().numpy().astype(np.float32)
            results.append([(mask, float(score)) for mask, score in zip(masks, scores)])
        return results
