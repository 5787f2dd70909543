"""EVF-SAM pre- and post-processing, as in the official `inference.py`, without torchvision.

- Text: the checkpoint's `XLMRobertaTokenizer` (slow, SentencePiece) ids: `<s> pieces </s>`, no lowercasing.
- BEiT-3 view: [0, 1] float image, bicubic resize (no antialias) to a square, normalise with mean = std = 0.5.
- SAM view (EVF-SAM, model type "ori"): PIL bilinear resize of the longest side to 1024, normalise with ImageNet
  mean/std on the 0-255 scale, zero-pad bottom/right to 1024x1024. Masks: upsample the 256x256 logits to the SAM
  input, crop the padding, upsample to the image's size (bilinear).
- SAM-2 view (EVF-SAM2, model type "sam2"): stretch to 1024x1024 (bilinear on the uint8 image; code before commit
  9d00853: longest-side PIL resize, normalise, then bilinear stretch of the float image), normalise. Masks: upsample
  the 256x256 logits straight to the image's size.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SENTENCEPIECE_FILE = "sentencepiece.bpe.model"


class EvfTokenizer:
    """The ids of transformers' slow `XLMRobertaTokenizer` over the checkpoint's SentencePiece model.

    transformers 5 only has the converted (`tokenizers`) XLM-R tokenizer, whose conversion of a SentencePiece model can
    split words differently from SentencePiece itself; EVF-SAM was trained with the slow one, so its rules are kept
    here: fairseq ids `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, piece id + 1 for other pieces, `<mask>` after the
    pieces, then the checkpoint's `added_tokens.json` (e.g. `[semantic]` in the multitask checkpoints). Special and
    added tokens written in the text are kept whole, as the slow tokenizer does.
    """

    SPECIAL = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}

    def __init__(self, vocab_file: str | os.PathLike, added_tokens: dict[str, int] | None = None):
        import sentencepiece

        self.vocab_file = str(vocab_file)
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=self.vocab_file)
        self.mask_token_id = self.sp_model.get_piece_size() + 1
        self.added_tokens = {**self.SPECIAL, "<mask>": self.mask_token_id, **(added_tokens or {})}
        self._split = re.compile(
            "(" + "|".join(map(re.escape, sorted(self.added_tokens, key=len, reverse=True))) + ")"
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> EvfTokenizer:
        vocab_file = os.path.join(directory, SENTENCEPIECE_FILE)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"{directory}: no {SENTENCEPIECE_FILE} (the checkpoint's SentencePiece model)")
        added_file = os.path.join(directory, "added_tokens.json")
        added = None
        if os.path.isfile(added_file):
            with open(added_file, encoding="utf-8") as handle:
                added = json.load(handle)
        return cls(vocab_file, added)

    @property
    def pad_token_id(self) -> int:
        return self.SPECIAL["<pad>"]

    def __len__(self) -> int:
        return max(self.added_tokens.values()) + 1

    def encode(self, text: str) -> list[int]:
        ids = [self.SPECIAL["<s>"]]
        for chunk in self._split.split(text):
            if chunk in self.added_tokens:
                ids.append(self.added_tokens[chunk])
            elif chunk:
                ids.extend(piece + 1 if piece else self.SPECIAL["<unk>"] for piece in self.sp_model.encode(chunk))
        ids.append(self.SPECIAL["</s>"])
        return ids

    def __call__(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `input_ids` and a boolean `padding` mask (True at pad positions) for a batch of texts.

        Texts longer than `max_length` tokens keep their first `max_length - 1` tokens and `</s>`.
        """
        encoded = [self.encode(text) for text in texts]
        if max_length is not None:
            encoded = [ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:] for ids in encoded]
        length = max(map(len, encoded))
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)
        padding = torch.ones((len(encoded), length), dtype=torch.bool)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            padding[row, : len(ids)] = False
        return input_ids, padding

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the published tokenizer files (SentencePiece model, configs, added tokens)."""
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, SENTENCEPIECE_FILE)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        special = {
            "bos_token": "<s>",
            "cls_token": "<s>",
            "eos_token": "</s>",
            "mask_token": "<mask>",
            "pad_token": "<pad>",
            "sep_token": "</s>",
            "unk_token": "<unk>",
        }
        with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as handle:
            json.dump(special, handle, indent=2)
        config = {**special, "tokenizer_class": "XLMRobertaTokenizer", "padding_side": "right", "use_fast": False}
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        extra = {k: v for k, v in self.added_tokens.items() if k not in self.SPECIAL and k != "<mask>"}
        if extra:
            with open(os.path.join(directory, "added_tokens.json"), "w", encoding="utf-8") as handle:
                json.dump(extra, handle, indent=2)


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.array(image.convert("RGB"), dtype=np.uint8)


def beit3_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) BEiT-3 input: ToTensor, bicubic resize without antialias, Normalize(0.5, 0.5)."""
    pixels = torch.from_numpy(_rgb_array(image)).permute(2, 0, 1).float().div(255)
    pixels = F.interpolate(pixels[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    return (pixels - 0.5) / 0.5


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """SAM's `ResizeLongestSide.get_preprocess_shape`: scale the longest side to `long_side`, round half up."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_pixels(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, size, size) SAM input and the (h, w) of the resized image inside the zero padding."""
    rgb = image.convert("RGB")
    height, width = resized_shape(rgb.height, rgb.width, size)
    resized = np.array(rgb.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    pixels = torch.from_numpy(resized).permute(2, 0, 1).float()
    pixels = (pixels - torch.tensor(SAM_PIXEL_MEAN)[:, None, None]) / torch.tensor(SAM_PIXEL_STD)[:, None, None]
    return F.pad(pixels, (0, size - width, 0, size - height)), (height, width)


def sam2_pixels(image: Image.Image, size: int, legacy: bool = False) -> torch.Tensor:
    """(3, size, size) SAM-2 input: the image stretched to a square (see the module docstring for `legacy`)."""
    mean, std = torch.tensor(SAM_PIXEL_MEAN)[:, None, None], torch.tensor(SAM_PIXEL_STD)[:, None, None]
    if legacy:
        pixels, (height, width) = sam_pixels(image, size)
        pixels = pixels[:, :height, :width]
        return F.interpolate(pixels[None], (size, size), mode="bilinear", align_corners=False)[0]
    pixels = torch.from_numpy(_rgb_array(image)).permute(2, 0, 1)[None]
    pixels = F.interpolate(pixels, (size, size), mode="bilinear", align_corners=False)[0]  # uint8 in, uint8 out
    return (pixels.float() - mean) / std


def upsample_logits_sam2(low_res: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
    """`EvfSam2Model.postprocess_masks` for one logit map: bilinear straight to (H, W), float32."""
    return F.interpolate(low_res.float()[None, None], original, mode="bilinear", align_corners=False)[0, 0]


def upsample_logits(
    low_res: torch.Tensor, input_size: int, resized: tuple[int, int], original: tuple[int, int]
) -> torch.Tensor:
    """SAM's `postprocess_masks` for one (low_h, low_w) logit map: returns (H, W) float32 logits."""
    logits = low_res.float()[None, None]
    logits = F.interpolate(logits, (input_size, input_size), mode="bilinear", align_corners=False)
    logits = logits[..., : resized[0], : resized[1]]
    return F.interpolate(logits, original, mode="bilinear", align_corners=False)[0, 0]
