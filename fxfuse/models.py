"""Small LLaMA-style models used by the demo, the tests and the benchmarks.

`Transformer(cfg)` writes every projection as its own ``nn.Linear`` (the
way most model code is written); `Transformer(cfg, hand_fused=True)` writes
q/k/v as one ``wqkv`` and gate/up as one ``w13`` followed by a split, the way
gpt-fast and torchao fuse by hand. `load_hand_fused` copies the weights of the
first into the second so both compute the same function. `quantize_int8`
turns the linears of either into gpt-fast-style weight-only int8 linears.

Decode uses a static KV cache (fixed shapes, so CUDA graphs can replay it).
Weights are random: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LlamaConfig", "Transformer", "load_hand_fused", "Int8Linear", "quantize_int8"]


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int = 2
    dim: int = 64
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: k/v are narrower than q
    hidden: int = 176
    vocab: int = 128
    max_seq: int = 64
    q_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @classmethod
    def llama2_7b(cls, n_layer: int = 32, max_seq: int = 2304) -> "LlamaConfig":
        return cls(n_layer=n_layer, dim=4096, n_head=32, n_kv_head=32,
                   hidden=11008, vocab=32000, max_seq=max_seq)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, S, H, D]; rotate pairs (first half, second half) of D.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, hand_fused: bool) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.sizes = [cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd]
        if hand_fused:
            self.wqkv = nn.Linear(cfg.dim, sum(self.sizes), bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, self.sizes[0], bias=cfg.q_bias)
            self.wk = nn.Linear(cfg.dim, self.sizes[1], bias=False)
            self.wv = nn.Linear(cfg.dim, self.sizes[2], bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.dim, bias=False)
        if hand_fused and cfg.q_bias:
            raise ValueError("hand_fused=True does not support q_bias")
        self.hand_fused = hand_fused
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.hand_fused:
            q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
            return q, k, v
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor | None) -> Tensor:
        cfg = self.cfg
        B, S, _ = x.shape
        q, k, v = self.qkv(x)
        q = rotate(q.view(B, S, cfg.n_head, cfg.head_dim), cos, sin)
        k = rotate(k.view(B, S, cfg.n_kv_head, cfg.head_dim), cos, sin)
        v = v.view(B, S, cfg.n_kv_head, cfg.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if pos is not None and self.k_cache is not None:
            # Static cache: write this step's k/v at `pos`, attend to all of it.
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
            k, v = self.k_cache, self.v_cache
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig, hand_fused: bool) -> None:
        super().__init__()
        self.hand_fused = hand_fused
        self.hidden = cfg.hidden
        if hand_fused:
            self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)
        else:
            self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
            self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.hand_fused:
            gate, up = self.w13(x).split([self.hidden, self.hidden], dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, hand_fused: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg, hand_fused)
        self.feed_forward = FeedForward(cfg, hand_fused)
        self.attention_norm = RMSNorm(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A LLaMA-style decoder: ``forward(tokens, pos=None) -> logits``.

    With ``pos`` (a 1-D tensor of positions) it decodes against the static KV
    cache made by `setup_cache`; without, it runs the whole prompt causally.
    """

    def __init__(self, cfg: LlamaConfig, hand_fused: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, hand_fused) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        hd = cfg.head_dim
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd // 2).float() / (hd // 2)))
        ang = torch.outer(torch.arange(cfg.max_seq).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def setup_cache(self, batch: int) -> None:
        cfg = self.cfg
        p = self.tok_embeddings.weight  # (quantize_dynamic makes output.weight a method)
        shape = (batch, cfg.n_kv_head, cfg.max_seq, cfg.head_dim)
        for layer in self.layers:
            layer.attention.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
            layer.attention.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def forward(self, tokens: Tensor, pos: Tensor | None = None) -> Tensor:
        S = tokens.shape[1]
        idx = pos if pos is not None else torch.arange(S, device=tokens.device)
        # [S, 1, D/2] broadcasts over heads. The embedding's dtype is the model's:
        # quantizers replace the linears (torch.ao's quantize_dynamic makes
        # `output.weight` a method), never the embedding.
        dtype = self.tok_embeddings.weight.dtype
        cos = self.cos[idx].unsqueeze(1).to(dtype)
        sin = self.sin[idx].unsqueeze(1).to(dtype)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, pos)
        return self.output(self.norm(x))


@torch.no_grad()
def load_hand_fused(fused: Transformer, plain: Transformer) -> Transformer:
    """Copy `plain`'s weights into the hand-fused `fused` (same config)."""
    for f, p in zip(fused.layers, plain.layers):
        a, b = f.attention, p.attention
        a.wqkv.weight.copy_(torch.cat([b.wq.weight, b.wk.weight, b.wv.weight]))
        a.wo.weight.copy_(b.wo.weight)
        g, h = f.feed_forward, p.feed_forward
        g.w13.weight.copy_(torch.cat([h.w1.weight, h.w3.weight]))
        g.w2.weight.copy_(h.w2.weight)
        f.attention_norm.weight.copy_(p.attention_norm.weight)
        f.ffn_norm.weight.copy_(p.ffn_norm.weight)
    fused.tok_embeddings.weight.copy_(plain.tok_embeddings.weight)
    fused.norm.weight.copy_(plain.norm.weight)
    fused.output.weight.copy_(plain.output.weight)
    return fused


class Int8Linear(nn.Module):
    """Weight-only int8 linear, as gpt-fast writes it: an int8 weight with one
    scale per output channel, dequantized on the fly."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        super().__init__()
        scales = weight.detach().abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(weight.detach() / scales[:, None]).clamp(-128, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight.to(dtype=x.dtype)) * self.scales
        return y + self.bias if self.bias is not None else y


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ("output",)) -> nn.Module:
    """Replace every nn.Linear (but those named in `skip`) by an `Int8Linear`, in place."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                setattr(mod, child_name, Int8Linear(child.weight, child.bias))
    return model
