"""A tiny random EVF-SAM checkpoint in the published file layout, built offline (tests, CPU demos).

It exercises the same loading path as `YxZhang/evf-sam`: `config.json` (model_type "evf"), weights under the
published key names, and the tokenizer files with a SentencePiece model trained here on the synthetic vocabulary.
"""

from __future__ import annotations

import itertools
import os

import torch

from ...vocabulary import COLOURS, SHAPES, SIZES, describe
from .config import EvfSamConfig
from .model import EvfSamModel
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


def save_tiny_checkpoint(directory: str | os.PathLike, seed: int = 0, safe_serialization: bool = True) -> str:
    """Write a tiny random EVF-SAM checkpoint to `directory` and return its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    train_tiny_sentencepiece(os.path.join(directory, SENTENCEPIECE_FILE))
    os.remove(os.path.join(directory, SENTENCEPIECE_FILE.removesuffix(".model") + ".vocab"))  # not published
    EvfTokenizer.from_pretrained(directory).save_pretrained(directory)
    torch.manual_seed(seed)
    model = EvfSamModel(EvfSamConfig.from_dict(TINY_CONFIG))
    with torch.no_grad():  # random, not SAM's zero init, so that every parameter influences the output
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    return directory
