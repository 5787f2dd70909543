"""A tiny random EVF-SAM checkpoint in the published file layout, built offline (tests, CPU demos).

It exercises the same loading path as `YxZhang/evf-sam` (or `YxZhang/evf-sam2`): `config.json` (model_type "evf"), weights under the
published key names, and the tokenizer files with a SentencePiece model trained here on the synthetic vocabulary.
"""

from __future__ import annotations

import itertools
import os

import torch

from ...vocabulary import COLOURS, SHAPES, SIZES, describe
from .config import EvfSamConfig
from .model import build_model
from .processing import SENTENCEPIECE_FILE, EvfTokenizer

TINY_CONFIG = {
    "model_type": "evf",
    "architectures": ["EvfSamModel"],
    "sam_scale": "huge",
    "mm_extractor_scale": "large",
    "hidden_size": 32,
    "out_dim": 32,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "beit3": {"embed_dim": 32, "layers": 2, "heads": 2, "ffn_dim": 64, "img_size": 32, "vocab_size": 72},
    "sam": {
        "vision": {
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "global_attn_indexes": [1],
            "window_size": 2,
            "mlp_dim": 32,
            "image_size": 64,
        },
        "mask_decoder": {"mlp_dim": 32, "num_attention_heads": 2, "iou_head_hidden_dim": 16},
    },
}
TINY_SAM2_CONFIG = {
    **{k: v for k, v in TINY_CONFIG.items() if k != "sam"},
    "architectures": ["EvfSam2Model"],
    "sam_scale": "large",
    "sam": {
        "backbone": {
            "hidden_size": 8,
            "embed_dim_per_stage": [8, 16, 32, 64],
            "num_attention_heads_per_stage": [1, 2, 4, 8],
            "blocks_per_stage": [1, 1, 2, 1],
            "global_attention_blocks": [3],
            "window_positional_embedding_background_size": [2, 2],
            "window_size_per_stage": [2, 2, 2, 2],
            "image_size": [64, 64],
        },
        "vision": {"backbone_channel_list": [64, 32, 16, 8]},
        # the official SAM-2 mask decoder fixes mlp 2048, 8 heads and a 256-wide IoU head at every width
        "model": {
            "memory_attention_num_layers": 1,
            "memory_attention_feed_forward_hidden_size": 32,
            "memory_encoder_output_channels": 64,
            "memory_fuser_intermediate_dim": 128,
            "num_maskmem": 2,
        },
    },
}
TINY_VOCAB_SIZE = 60
"""SentencePiece pieces; with the fairseq offset and <mask> the ids stay below `beit3.vocab_size`."""


def train_tiny_sentencepiece(path: str | os.PathLike) -> None:
    """A small BPE SentencePiece model over the synthetic world's expressions."""
    import sentencepiece

    sentences = [describe(colour, shape, size) for colour, shape, size in itertools.product(COLOURS, SHAPES, SIZES)]
    sentences += ["the salient object", "all the objects on the left", "[semantic] background"]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=os.fspath(path).removesuffix(".model"),
        vocab_size=TINY_VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )


def save_tiny_checkpoint(
    directory: str | os.PathLike, seed: int = 0, safe_serialization: bool = True, sam2: bool = False
) -> str:
    """Write a tiny random EVF-SAM (or, with `sam2`, EVF-SAM2) checkpoint to `directory` and return its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    train_tiny_sentencepiece(os.path.join(directory, SENTENCEPIECE_FILE))
    os.remove(os.path.join(directory, SENTENCEPIECE_FILE.removesuffix(".model") + ".vocab"))  # not published
    EvfTokenizer.from_pretrained(directory).save_pretrained(directory)
    torch.manual_seed(seed)
    model = build_model(EvfSamConfig.from_dict(TINY_SAM2_CONFIG if sam2 else TINY_CONFIG))
    with torch.no_grad():  # random, not SAM's zero init, so that every parameter influences the output
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    return directory
