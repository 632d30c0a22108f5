"""Hand-written attention models, in the forms transformer code takes: a fused ``qkv`` split
with ``unbind`` into ``F.scaled_dot_product_attention``, the explicit ``softmax(q @ kᵀ) @ v``
with a relative-position bias, parameters applied functionally, Swin's padded and shifted
windows, attention over channels (XCiT), which cannot be pruned, and rotary position embeddings
(both rotations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import make_sensitive
from torch import nn

import fxprune


class FusedViT(nn.Module):
    """Patch embedding, a class token concatenated before the patch tokens, a learned position
    table (``(1, N, C)``: longer along the tokens than along the channels), one timm-style
    attention block (``qkv`` reshaped to ``B, N, 3, H, D``, permuted, unbound; SDPA with its
    default scale) and an MLP, both residual, and a head on the class token."""

    def __init__(self, dim: int = 16, heads: int = 2, side: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        tokens = (side // 2) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        B, N, C = t.shape
        t = torch.cat([self.cls_token.expand(B, -1, -1), t], dim=1) + self.pos_embed
        qkv = self.qkv(t).reshape(B, N + 1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(B, N + 1, C))
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.head(t[:, 0])


class ExplicitAttention(nn.Module):
    """Separate ``q``, ``k``, ``v`` projections, heads split by ``view``, scores as
    ``(q * scale) @ k.transpose(-2, -1)`` plus a relative-position bias table of shape
    ``(H, N, N)``, ``softmax`` over the keys, ``@ v``, heads merged, projected."""

    def __init__(self, dim: int = 12, heads: int = 3, tokens: int = 5) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.embed = nn.Linear(4, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        B, N, C = t.shape
        q = self.q(t).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(t).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(t).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.bias
        out = attn.softmax(dim=-1) @ v
        t = t + self.proj(out.transpose(1, 2).reshape(B, N, C))
        return self.head(t.mean(1))


class FunctionalAttention(nn.Module):
    """Parameters applied with ``F.linear`` and ``torch.matmul`` (the output matrix ``x @ W``,
    square weights elsewhere), SDPA with an explicit scale and a causal mask, on ``(B, N, C)``
    tokens. (A product ``x @ W`` that makes new channels, like a linear, freezes them: a
    parameter's map follows one of its dims.)"""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(dim, 4) * 0.5)
        self.w_q = nn.Parameter(torch.randn(dim, dim) * 0.3)
        self.w_k = nn.Parameter(torch.randn(dim, dim) * 0.3)
        self.w_v = nn.Parameter(torch.randn(dim, dim) * 0.3)
        self.w_out = nn.Parameter(torch.randn(dim, dim) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.linear(x, self.w_in)
        q, k, v = F.linear(t, self.w_q), F.linear(t, self.w_k), F.linear(t, self.w_v)
        a = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True, scale=0.25
        )
        return torch.matmul(t + a.squeeze(1), self.w_out)


class ShiftedWindows(nn.Module):
    """Swin's window steps on channels-last tokens: padding the spatial dims to the window
    size, a cyclic shift (``torch.roll``), attention within windows, the reverse shift, and a
    crop back to the size read off the input (slices with computed bounds)."""

    def __init__(self, dim: int = 8, window: int = 2) -> None:
        super().__init__()
        self.window = window
        self.embed = nn.Conv2d(3, dim, 1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).permute(0, 2, 3, 1)  # B, H, W, C
        B, H, W, C = t.shape
        w = self.window
        p = F.pad(t, (0, 0, 0, (-W) % w, 0, (-H) % w))
        p = torch.roll(p, shifts=(-1, -1), dims=(1, 2))
        Hp, Wp = p.shape[1], p.shape[2]
        win = p.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        q, k, v = self.qkv(win).reshape(win.shape[0], w * w, 3, C).permute(2, 0, 1, 3).unbind(0)
        a = self.proj(F.scaled_dot_product_attention(q, k, v))
        a = a.view(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        a = torch.roll(a, shifts=(1, 1), dims=(1, 2))[:, :H, :W, :]
        return self.head((t + a).mean((1, 2)))


class ChannelAttention(nn.Module):
    """XCiT's cross-covariance attention: ``q.transpose(-2, -1) @ k`` is a channels × channels
    matrix, so the product has channels on both of its dims and must freeze."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, dim), nn.Linear(4, dim), nn.Linear(4, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)  # B, C, C
        return self.head((v @ attn).mean(1))


class UnbindChannels(nn.Module):
    """``unbind`` along the channel dim: each output is one channel alone (freezes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.fc(x).unbind(-1)
        return self.head(x * (a + b * c).unsqueeze(-1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


class RotaryAttention(nn.Module):
    """Rotary position embedding (RoPE) on ``q`` and ``k`` before SDPA, its ``cos`` / ``sin``
    table computed in ``forward`` from the token positions and an inverse-frequency buffer
    of ``D / 2`` entries. ``pairs=False``: LLaMA's and DINOv3's rotate-half (position ``p``
    turns with ``p + D/2``, the table is ``cat([f, f])``); ``pairs=True``: timm's interleaved
    ``rot`` (``p`` turns with its neighbour, the table is ``repeat_interleave(f, 2)``)."""

    def __init__(self, dim: int = 16, heads: int = 2, pairs: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.pairs = heads, dim // heads, pairs
        self.embed = nn.Linear(4, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)
        half = self.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / 100.0 ** (torch.arange(half) / half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        B, N, C = t.shape
        qkv = self.qkv(t).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        freqs = torch.arange(N, dtype=t.dtype)[:, None] * self.inv_freq[None, :]
        if self.pairs:
            emb, turn = freqs.repeat_interleave(2, dim=-1), _rotate_pairs
        else:
            emb, turn = torch.cat([freqs, freqs], dim=-1), _rotate_half
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)  # timm casts to q's dtype
        q = q * cos + turn(q) * sin
        k = k * cos + turn(k) * sin
        a = F.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return self.head(t.mean(1))


class RotaryPairs(RotaryAttention):
    """:class:`RotaryAttention` with timm's interleaved rotation."""

    def __init__(self) -> None:
        super().__init__(pairs=True)


class RotaryProjections(nn.Module):
    """LLaMA's layout: separate ``q`` / ``k`` / ``v`` projections, each split into heads, an
    interleaved rotary embedding on ``q`` and ``k`` only (so ``v``'s head-dim positions could
    prune, ``q``'s and ``k``'s cannot)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Linear(4, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)
        half = self.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / 100.0 ** (torch.arange(half) / half))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        B, N, C = t.shape
        q, k, v = self._split(self.q(t)), self._split(self.k(t)), self._split(self.v(t))
        freqs = torch.arange(N, dtype=t.dtype)[:, None] * self.inv_freq[None, :]
        emb = freqs.repeat_interleave(2, dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = q * cos + _rotate_pairs(q) * sin
        k = k * cos + _rotate_pairs(k) * sin
        a = F.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return self.head(t.mean(1))


#: name -> (model class, example input shape)
CASES = {
    "fused_vit": (FusedViT, (2, 3, 6, 6)),
    "explicit": (ExplicitAttention, (2, 5, 4)),
    "functional": (FunctionalAttention, (2, 6, 4)),
    "shifted_windows": (ShiftedWindows, (2, 3, 5, 5)),
    "channel_attention": (ChannelAttention, (2, 5, 4)),
    "unbind_channels": (UnbindChannels, (2, 5, 4)),
    "rotary": (RotaryAttention, (2, 5, 4)),
    "rotary_pairs": (RotaryPairs, (2, 5, 4)),
    "rotary_projections": (RotaryProjections, (2, 5, 4)),
}


def analysed(name: str, frontend: str = "fx", attention: str = "head_dim"):
    """One of ``CASES``, seeded and made sensitive, its example input and its analysis."""
    cls, shape = CASES[name]
    torch.manual_seed(0)
    model = make_sensitive(cls().eval())
    x = torch.randn(shape)
    return model, x, fxprune.analyze(model, x, frontend=frontend, attention=attention)
