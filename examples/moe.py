"""Mixture-of-experts layers as people write them, and a small LM to put them in.

- ``GroupedMoE``: routed experts as torchtitan writes them (tokens sorted by expert,
  ``torch._grouped_mm``, gates, ``index_add`` back), optionally with a shared expert;
- ``EinsumMoE``: dense dispatch (every expert on every token through einsum, the top-k
  gates scattered into a [B, S, E] weight): the same function, on any dtype and device;
- ``MoELM``: a pre-norm LM whose MLPs are any of these, or a dense MLP.

``tests/families.py`` checks them in the coverage table; ``benchmarks/moe_transfer.py``
trains the dense / MoE pairs of ``docs/moe.md``. ``torch._grouped_mm`` traces in
bfloat16 only (torch's rule), so ``GroupedMoE`` models are transformed in bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GroupedMoE(nn.Module):
    """A routed MoE as torchtitan writes it: softmax router, top-k (renormalised or not),
    tokens sorted by expert through ``torch._grouped_mm``, gates on the outputs,
    ``index_add`` back to the tokens; optionally a shared expert beside the routed ones."""

    def __init__(self, d: int = 64, hidden: int = 32, experts: int = 4, k: int = 2,
                 normalize: bool = True, shared: bool = False) -> None:
        super().__init__()
        self.k, self.normalize = k, normalize
        self.router = nn.Linear(d, experts, bias=False)
        self.w_gate = nn.Parameter(torch.randn(experts, hidden, d) * 0.02)
        self.w_up = nn.Parameter(torch.randn(experts, hidden, d) * 0.02)
        self.w_down = nn.Parameter(torch.randn(experts, d, hidden) * 0.02)
        self.shared = SwiGLU(d, hidden) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, experts = x.shape, self.w_up.shape[0]
        x = x.reshape(-1, shape[-1])
        top, idx = self.router(x).softmax(-1).topk(self.k, dim=-1)
        if self.normalize:
            top = top / top.sum(-1, keepdim=True)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        offs = F.one_hot(flat, experts).sum(0).cumsum(0).to(torch.int32)
        rows = order // self.k
        xs = x[rows]
        h = F.silu(torch._grouped_mm(xs, self.w_gate.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(xs, self.w_up.transpose(-2, -1), offs=offs)
        out = torch._grouped_mm(h, self.w_down.transpose(-2, -1), offs=offs)
        out = out * top.reshape(-1)[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add(0, rows, out)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape)


class EinsumMoE(nn.Module):
    """A dense-dispatch MoE: every expert on every token through einsum, the top-k gates
    scattered into a [B, S, E] weight (zero elsewhere), combined by einsum."""

    def __init__(self, d: int = 64, hidden: int = 32, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, d, hidden) * 0.02)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, d) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).softmax(-1)
        top, idx = probs.topk(self.k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        h = F.gelu(torch.einsum("bsd,edh->bseh", x, self.w_in))
        y = torch.einsum("bseh,ehd->bsed", h, self.w_out)
        return torch.einsum("bsed,bse->bsd", y, gates)


class GeluMLP(nn.Module):
    """The dense counterpart of one ``EinsumMoE`` expert."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoELM(nn.Module):
    """A pre-norm LM whose MLPs are ``moe(width)`` blocks (``SwiGLU`` when ``moe`` is None):
    the hand-written MoE family, and the dense / MoE pair of docs/moe.md."""

    def __init__(self, width: int = 64, layers: int = 2, vocab: int = 256, heads: int = 4,
                 moe: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_Block(width, heads, moe) for _ in range(layers))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, moe: Callable[[int], nn.Module] | None) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = moe(width) if moe else SwiGLU(width, 2 * width)
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).transpose(1, 3).unbind(2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))
