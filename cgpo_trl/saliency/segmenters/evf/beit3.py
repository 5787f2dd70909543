"""BEiT-3 multiway encoder with torchscale 0.2.0's parameter names, so EVF-SAM's `mm_extractor.beit3.*` weights load.

torchscale itself is not a dependency: it pins timm 0.4.12, which requires torchvision. The computation follows
torchscale's `BEiT3` as EVF-SAM configures it (multiway, sub-LN, pre-norm, output layer norm, no output projection,
no relative positions, no embedding scale, fairseq positions starting at 2). Tokens are [vision CLS, patches, text];
each "multiway" module has an `A` copy for vision tokens and a `B` copy for text tokens, while self-attention is
shared over the whole sequence: that shared attention is EVF-SAM's early vision-language fusion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import Beit3Config


class Multiway(nn.Module):
    """Applies `A` to the first `split` tokens (vision) and `B` to the rest (text)."""

    def __init__(self, vision: nn.Module, text: nn.Module):
        super().__init__()
        self.A = vision
        self.B = text

    @classmethod
    def twin(cls, make: Callable[[], nn.Module]) -> Multiway:
        """Two independent copies of the same module."""
        return cls(make(), make())

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class VisionEmbedding(nn.Module):
    """Patch embedding with a prepended CLS token (`mask_token` is only used in pre-training, kept for the keys)."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.num_patches = (config.img_size // config.patch_size) ** 2
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixel_values).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


class MultiheadAttention(nn.Module):
    def __init__(self, config: Beit3Config):
        super().__init__()
        self.heads = config.heads
        dim = config.embed_dim
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, Multiway.twin(lambda: nn.Linear(dim, dim)))
        self.inner_attn_ln = Multiway.twin(lambda: nn.LayerNorm(dim, eps=config.layernorm_eps))

    def forward(self, x: torch.Tensor, keep: torch.Tensor, split: int) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x, split)), heads(self.k_proj(x, split)), heads(self.v_proj(x, split))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        attended = attended.transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(self.inner_attn_ln(attended, split), split)


class FeedForwardNetwork(nn.Module):
    def __init__(self, config: Beit3Config):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(config.ffn_dim, eps=config.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        hidden = F.gelu(hidden.float()).type_as(hidden)  # torchscale runs GELU in float32
        return self.fc2(self.ffn_layernorm(hidden))


class EncoderLayer(nn.Module):
    def __init__(self, config: Beit3Config):
        super().__init__()
        self.self_attn = MultiheadAttention(config)
        self.self_attn_layer_norm = Multiway.twin(lambda: nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps))
        self.ffn = Multiway.twin(lambda: FeedForwardNetwork(config))
        self.final_layer_norm = Multiway.twin(lambda: nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps))

    def forward(self, x: torch.Tensor, keep: torch.Tensor, split: int) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), keep, split)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class Encoder(nn.Module):
    def __init__(self, config: Beit3Config, num_vision_positions: int):
        super().__init__()
        self.embed_positions = Multiway(
            nn.Embedding(num_vision_positions + 2, config.embed_dim),
            nn.Embedding(config.max_source_positions, config.embed_dim),
        )
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))
        self.layer_norm = Multiway.twin(lambda: nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps))

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_padding: torch.Tensor) -> torch.Tensor:
        # Fairseq convention: position ids start at 2 in both the vision and the text table.
        split, length = vision.shape[1], text.shape[1]
        vision = vision + self.embed_positions.A.weight[2 : 2 + split]
        text = text + self.embed_positions.B.weight[2 : 2 + length]
        x = torch.cat([vision, text], dim=1)
        padding = torch.cat([text_padding.new_zeros(vision.shape[:2]), text_padding], dim=1)
        x = x * (~padding).unsqueeze(-1).to(x.dtype)
        keep = ~padding
        for layer in self.layers:
            x = layer(x, keep, split)
        return self.layer_norm(x, split)


class BEiT3(nn.Module):
    """`mm_extractor.beit3`: text embedding, vision embedding and the multiway encoder."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.config = config
        self.text_embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.vision_embed = VisionEmbedding(config)
        self.encoder = Encoder(config, self.vision_embed.num_patches + 1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, text_padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder output for [CLS, patches, text] tokens; `text_padding` is True at padded text positions."""
        if input_ids.shape[1] > self.config.max_source_positions - 2:
            raise ValueError(
                f"expression has {input_ids.shape[1]} tokens; BEiT-3 accepts at most "
                f"{self.config.max_source_positions - 2}"
            )
        if text_padding is None:
            text_padding = torch.zeros_like(input_ids, dtype=torch.bool)
        return self.encoder(self.vision_embed(pixel_values), self.text_embed(input_ids), text_padding.bool())


class BEiT3Wrapper(nn.Module):
    """`mm_extractor`: the official code wraps BEiT-3 once more, hence the `beit3.` key prefix."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.beit3 = BEiT3(config)
