"""Small models written the usual way, for tests that need an unusual shape of graph."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FusedQKVGPT(nn.Module):
    """nanoGPT-like: fused QKV, hand-written attention (q @ k^T / sqrt(d), softmax, @ v),
    LayerNorm, GELU MLP, learned positions, LM head tied to the token embedding."""

    def __init__(self, vocab: int = 96, d: int = 32, heads: int = 4, layers: int = 2, seq: int = 16):
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(d),
                    "c_attn": nn.Linear(d, 3 * d),
                    "c_proj": nn.Linear(d, d),
                    "ln_2": nn.LayerNorm(d),
                    "c_fc": nn.Linear(d, 4 * d),
                    "c_out": nn.Linear(4 * d, d),
                }
            )
            self.blocks.append(block)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))

    def attention(self, block: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = block["c_attn"](x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return block["c_proj"](y)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = x + self.attention(block, block["ln_1"](x))
            x = x + block["c_out"](F.gelu(block["c_fc"](block["ln_2"](x))))
        return self.lm_head(self.ln_f(x))


class DataDependent(nn.Module):
    """Branches on a tensor's value: not capturable as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y


class ElementwiseWeight(nn.Module):
    """A 2-D parameter used elementwise: no u-muP rule says what it is."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.mix = nn.Parameter(torch.ones(4, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.mix


class NoParams(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class SinMLP(nn.Module):
    """An MLP with an activation no u-muP rule covers (sin, as in SIREN)."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sin(self.fc1(x)))


class ResidualMLPStack(nn.Module):
    """Embedding -> 3 residual MLP branches -> readout: rules §5's reference LR example."""

    def __init__(self, vocab: int = 256, d: int = 16, depth: int = 3, n_out: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.readout = nn.Linear(d, n_out, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = x + block(torch.nn.functional.layer_norm(x, x.shape[-1:]))
        return self.readout(x)


def hf_llama(vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny Hugging Face ``LlamaForCausalLM`` with grouped-query attention (4 / 2 heads)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def graph_nodes(model: nn.Module) -> list:
    """Every node of every rewritten graph of a transformed model (root and blocks)."""
    return [n for gm in model.region_graphs().values() for n in gm.graph.nodes]
