"""Tiny random models, a locally trained tokenizer and a processor, all built offline from configs.

Tests, the CPU demo and the benchmarks reuse these instead of hub checkpoints (no hub is reachable here). Every
builder returns objects that behave like the real ones: the VLM is a `Qwen2_5_VLForConditionalGeneration` with the
Qwen special tokens and chat template, so TRL takes its VLM path, and `save_tiny_vlm` writes a folder that
`cgpo_trl.models.load_model_and_processor` loads exactly like a real Qwen2.5-VL checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .models import ImageOnlyQwen2_5_VLProcessor

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's chat template without the default system prompt: the measured demo learns faster with the shorter
# prompt (shared/notes/demo-and-cgpo-stability.md). `{% generation %}` marks assistant text for SFT's
# `assistant_only_loss`.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ render(message['content']) }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ render(message['content']) }}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "white", "black", "grey"]
_SHAPES = ["circle", "square", "triangle", "star", "object", "objects"]


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: tags, task words, the synthetic vocabulary, digits and common English."""
    lines = [
        "<think>The image shows a few shapes. One of them differs from the others.</think>",
        "<answer><rg>the red circle</rg></answer>",
        "<answer><ins>the blue square</ins><ins>the large green star</ins></answer>",
        "Find the most salient object in the image. Describe it inside <rg></rg> tags.",
        "Find every salient instance in the image. Describe each one inside <ins></ins> tags.",
        "These images share a common salient object. Describe it inside <rg></rg> tags.",
        "Think first inside <think></think>, then answer inside <answer></answer>.",
        "What is 12 + 7? The answer is 19. Reverse the string abc: cba.",
        "the small large odd one out colour shape size differs from the others because it is unique",
    ]
    for colour in _COLOURS:
        for shape in _SHAPES:
            lines.append(f"the {colour} {shape} the small {colour} {shape} the large {colour} {shape}")
    lines.extend(" ".join(str(i) for i in range(start, start + 20)) for start in range(0, 200, 20))
    return lines * 4


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen's special tokens and a Qwen2.5-VL-style chat template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]})
    return tokenizer


def build_tiny_processor(vocab_size: int = 512, image_size: int = 56) -> ImageOnlyQwen2_5_VLProcessor:
    """Processor whose pixel range keeps an `image_size`-px square image at (image_size/14)^2 patches."""
    tokenizer = build_tokenizer(vocab_size)
    side = max(image_size, 56)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": side * side})
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    return ids


def build_tiny_vlm(
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    vision_hidden_size: int = 64,
    vision_depth: int = 2,
    vocab_size: int = 512,
    image_size: int = 56,
    text_config: dict | None = None,
    vision_config: dict | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageOnlyQwen2_5_VLProcessor]:
    """A random Qwen2.5-VL (defaults: 0.66 M parameters, the size the CPU demo was measured with).

    `text_config` / `vision_config` override the derived config fields, e.g. `{"vocab_size": 151936}` for an LM head
    of Qwen2.5-VL's size over the small tokenizer (ids it cannot decode are skipped when decoding).
    """
    processor = build_tiny_processor(vocab_size, image_size)
    tokenizer = processor.tokenizer
    heads = max(hidden_size // 32, 2)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(heads // 2, 1),
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **(text_config or {}),
    }
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    quarter = head_dim // 4
    text.setdefault(
        "rope_parameters",
        {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
        },
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_hidden_size * 2,
            "num_heads": max(vision_hidden_size // 32, 1),
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": list(range(vision_depth)),
            **(vision_config or {}),
        },
        tie_word_embeddings=True,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer)
    return model, processor


def build_tiny_lm(
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    config_overrides: dict | None = None,
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A random Qwen2 text LM with the same tokenizer; `config_overrides` replace `Qwen2Config` fields (e.g. a
    Qwen2.5-0.5B shape with `{"vocab_size": 151936}`: the LM head's size, whatever the small tokenizer holds)."""
    tokenizer = build_tokenizer(vocab_size)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=max(hidden_size // 32, 2),
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Qwen2Config(**{**fields, **(config_overrides or {})})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    _set_generation_ids(model, tokenizer)
    return model, tokenizer


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id


def length_reward(completions, **kwargs) -> list[float]:
    """A toy reward in [0, 1] that prefers longer completions: enough signal to see parameters move in a few steps."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [min(len(t) / 30.0, 1.0) for t in texts]


def resume_tiny_lm_run(args, checkpoint: str | os.PathLike, reward=length_reward):
    """Resume a fresh `CGPOTrainer` on the tiny LM from `checkpoint` through `train(resume_from_checkpoint=...)`, and
    return it with its CGPO state (`_cgpo_state_dict`) as it stood when training began: after the trainer's own
    restore, before the first resumed step."""
    from transformers import TrainerCallback

    from .trainer import CGPOTrainer

    class StateAtStart(TrainerCallback):
        state: dict | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            StateAtStart.state = json.loads(json.dumps(trainer._cgpo_state_dict()))

    model, tokenizer = build_tiny_lm()
    trainer = CGPOTrainer(
        model,
        [reward],
        args=args,
        train_dataset=text_prompt_dataset(),
        processing_class=tokenizer,
        callbacks=[StateAtStart()],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, StateAtStart.state


def text_prompt_dataset(n: int = 16) -> Dataset:
    """`n` plain-text prompts (TRL's standard format)."""
    return Dataset.from_dict({"prompt": [f"What is {i} + {i}?" for i in range(n)]})


def image_prompt_dataset(n: int = 8, image_size: int = 56, seed: int = 0) -> Dataset:
    """`n` conversational prompts, each with one random RGB image in an `images` column (TRL's VLM format)."""
    rng = np.random.default_rng(seed)
    images = [[Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))] for _ in range(n)]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the salient object."}]}]
    return Dataset.from_dict({"prompt": [prompt] * n, "images": images})


def tiny_run_settings(output_dir: str | os.PathLike, **overrides) -> dict:
    """Trainer fields for a few fast CPU steps of the tiny models (a high lr so parameters visibly move)."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    settings.update(overrides)
    return settings


def save_tiny_vlm(path: str | os.PathLike, seed: int = 0, **kwargs) -> str:
    """Write a tiny VLM checkpoint folder (model + processor), loadable by `load_model_and_processor`."""
    model, processor = build_tiny_vlm(seed=seed, **kwargs)
    return save_pretrained(model, processor, path)


def save_tiny_lm(path: str | os.PathLike, seed: int = 0, **kwargs) -> str:
    model, tokenizer = build_tiny_lm(seed=seed, **kwargs)
    return save_pretrained(model, tokenizer, path)


def save_pretrained(model, processor, path: str | os.PathLike) -> str:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------ tiny segmenters
def _clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_clipseg(path: Path) -> dict:
    """A tiny random CLIPSeg checkpoint at `path`; returns the `load_segmenter("clipseg", **options)` options."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessorPil

    tokenizer = _clip_tokenizer()
    config = CLIPSegConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        projection_dim=16,
        reduce_dim=16,
        extract_layers=[1],
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).save_pretrained(path)
    CLIPSegProcessor(
        image_processor=ViTImageProcessorPil(size={"height": 64, "width": 64}), tokenizer=tokenizer
    ).save_pretrained(path)
    return {"checkpoint": str(path)}


def save_tiny_sam3(path: Path) -> dict:
    """A tiny random SAM 3 checkpoint (score threshold 0 so random weights still yield instances)."""
    from transformers import Sam3Config, Sam3Model

    tokenizer = _clip_tokenizer()
    config = Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=112,
                patch_size=14,
                window_size=4,
                global_attn_indexes=[1],
                pretrain_image_size=112,
            ),
            fpn_hidden_size=32,
            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(
            hidden_size=32, num_layers=1, num_queries=8, num_attention_heads=2, intermediate_size=64
        ),
        mask_decoder_config=dict(hidden_size=32, num_upsampling_stages=3, num_attention_heads=2),
    )
    torch.manual_seed(0)
    Sam3Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Sam3ImageProcessor needs torchvision; the backend reads only this JSON.
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Sam3ImageProcessor",
                "size": {"height": 112, "width": 112},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "rescale_factor": 1 / 255,
            }
        )
    )
    return {"checkpoint": str(path), "score_threshold": 0.0}


def save_tiny_grounded_sam(path: Path) -> dict:
    """Tiny random Grounding DINO + SAM checkpoints (thresholds 0 so random weights still yield boxes)."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessorPil,
        SamModel,
        SamProcessor,
    )

    # Inputs of 128 px at least: at 64 px a square image's extra DINO level is 1x1, which its GroupNorm rejects.
    dino, sam = path / "grounding-dino", path / "sam"
    dino.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "the", "a", "on"]
    words += list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    (dino / "vocab.txt").write_text("\n".join(words))
    tokenizer = BertTokenizer(str(dino / "vocab.txt"))
    config = GroundingDinoConfig(
        backbone_config=dict(
            model_type="swin",
            image_size=64,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=2,
            out_features=["stage2", "stage3", "stage4"],
            out_indices=[2, 3, 4],
        ),
        text_config=dict(
            model_type="bert",
            vocab_size=len(words),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=32,
        max_text_len=32,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(dino)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 192}),
        tokenizer=tokenizer,
    ).save_pretrained(dino)
    config = SamConfig(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            output_channels=16,
            window_size=2,
            global_attn_indexes=[0],
            mlp_dim=32,
            num_pos_feats=8,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
        ),
    )
    SamModel(config).save_pretrained(sam)
    SamProcessor(
        image_processor=SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    ).save_pretrained(sam)
    return {
        "checkpoint": str(dino),
        "sam_checkpoint": str(sam),
        "box_threshold": 0.0,
        "text_threshold": 0.0,
        "max_instances": 3,
    }


def save_tiny_evf_sam(path: Path) -> dict:
    """A tiny random EVF-SAM checkpoint in the published file layout."""
    from cgpo_trl.saliency.segmenters.evf.tiny import save_tiny_checkpoint

    return {"checkpoint": save_tiny_checkpoint(path)}


TINY_SEGMENTERS = {
    "clipseg": save_tiny_clipseg,
    "sam3": save_tiny_sam3,
    "grounded-sam": save_tiny_grounded_sam,
    "evf-sam": save_tiny_evf_sam,
}
"""Backend name -> builder of a tiny random checkpoint; each returns the options `load_segmenter` needs."""
