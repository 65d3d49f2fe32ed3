"""Capture of forms real code writes that used to crash or refuse with a raw error: a
size computed from the inputs passed to a block (Swin), train-time draws in Python
(LayerDrop, SpecAugment), a buffer re-assigned in the forward (Meta's llama
``freqs_cis``), and sizes the capture fixes (a batch of 1, a sequence as long as the
table or mask the model slices by it: nanoGPT). docs/rules.md, "Static sizes"."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from tests.tiny_models import graph_nodes
from umup_fx.errors import CallError
from umup_fx.runtime import ops

D, H, V = 32, 2, 64


class WindowBlock(nn.Module):
    """A block told the spatial size it works on, as Swin's layers are (``input_dimensions``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        y = F.layer_norm(x, (D,)).view(x.shape[0], h, w, D)
        y = F.pad(y, (0, 0, 0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4))  # pad to whole windows
        y = self.fc2(F.gelu(self.fc1(y[:, :h, :w]))).reshape(x.shape[0], h * w, D)
        return x + y


class Windows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, D, 4, stride=4)
        self.blocks = nn.ModuleList(WindowBlock() for _ in range(2))
        self.head = nn.Linear(D, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels)
        size = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, size)
        return self.head(F.layer_norm(x, (D,)))


def test_size_passed_to_a_block_captures_at_the_example_size() -> None:
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with pytest.warns(umup_fx.StaticSizeWarning, match="block call"):
        model = umup_fx.transform(Windows(), (pixels,))
    report = umup_fx.check(model, (pixels,))
    assert report.ok, report.lines()
    assert model(torch.randn(5, 3, 24, 24)).shape == (5, 36, 10)  # any batch size
    with pytest.raises(CallError, match=r"pixels of shape \[\*, 3, 24, 24\]"):
        model(torch.randn(2, 3, 32, 32))  # the original runs there; the graph cannot


class LayerDrop(nn.Module):
    """A transformers-style stack that skips a layer when a random draw falls below
    ``config.layerdrop`` (Wav2Vec2, BART), in training mode."""

    def __init__(self, layerdrop: float) -> None:
        super().__init__()
        self.config = SimpleNamespace(layerdrop=layerdrop, mask_time_prob=0.0)
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            if self.training and self.config.layerdrop > 0.0 and (
                    torch.rand([]) < self.config.layerdrop):
                continue
            x = x + layer(F.layer_norm(x, (D,)))
        return self.head(x)


def test_train_time_draws_are_refused_with_the_config_field() -> None:
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(umup_fx.CaptureError, match=r"set config\.layerdrop = 0\.0 before transform"):
        umup_fx.transform(LayerDrop(0.1), (ids,))
    umup_fx.transform(LayerDrop(0.0), (ids,))  # the fix it names works


def _rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis.view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)


class MetaBlock(nn.Module):
    """Meta's llama ``TransformerBlock``: called with ``start_pos``, ``freqs_cis`` and a
    mask, attention by hand (matmul / sqrt(d), mask added, float softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.w1, self.w2, self.w3 = nn.Linear(D, 2 * D, False), nn.Linear(2 * D, D, False), nn.Linear(D, 2 * D, False)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        h = F.rms_norm(x, (D,))
        q, k, v = (w(h).view(b, s, H, D // H) for w in (self.wq, self.wk, self.wv))
        q, k, v = _rope(q, freqs_cis).transpose(1, 2), _rope(k, freqs_cis).transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(D // H)
        if mask is not None:
            scores = scores + mask
        a = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, D))
        h = F.rms_norm(x, (D,))
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class MetaLlama(nn.Module):
    """Meta's llama ``Transformer.forward(tokens, start_pos)``: ``freqs_cis`` (a buffer
    here, a plain attribute there) moved with ``self.freqs_cis = self.freqs_cis.to(...)``
    and sliced per call, the causal mask built from the length."""

    def __init__(self, buffer: bool) -> None:
        super().__init__()
        self.tok_embeddings, self.output = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
        self.layers = nn.ModuleList(MetaBlock() for _ in range(2))
        f = 1.0 / (10000 ** (torch.arange(0, D // H, 2).float() / (D // H)))
        angles = torch.outer(torch.arange(64).float(), f)
        freqs_cis = torch.polar(torch.ones_like(angles), angles)
        if buffer:
            self.register_buffer("freqs_cis", freqs_cis, persistent=False)
        else:
            self.freqs_cis = freqs_cis

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        self.freqs_cis = self.freqs_cis.to(h.device)
        freqs_cis = self.freqs_cis[start_pos:start_pos + seqlen]
        mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu(1)
        mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask])
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask.type_as(h))
        return self.output(F.rms_norm(h, (D,))).float()


def test_meta_llama_style_trains_at_every_length() -> None:
    """``self.freqs_cis = self.freqs_cis.to(device)`` on a buffer captured as an in-place
    copy of the buffer onto itself, which broke the backward (the forward had saved
    slices of it); the copy is dropped, so both forms give the same numbers. The mask's
    ``type_as(h)`` reads h's dtype only: the attention is still the attention rule's,
    and the blocks stay modules of their own."""
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = []
    for buffer in (True, False):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            for category in (umup_fx.UncoveredOpWarning, umup_fx.OneGraphWarning,
                             umup_fx.ScaleWarning):
                warnings.simplefilter("error", category)
            model = umup_fx.transform(MetaLlama(buffer), (ids, 0))
        assert sum(n.target is ops.attention_output_scale for n in graph_nodes(model)) == 2
        for _ in range(2):  # twice: the buffer is not written between steps either
            out = model(ids, 0)
            F.cross_entropy(out.flatten(0, 1), ids.flatten()).backward()
        outs.append(out.detach())
        for length in (1, 9, 40):
            assert model(torch.randint(0, V, (3, length)), 0).shape == (3, length, V)
    torch.testing.assert_close(outs[0], outs[1])


class NanoGPT(nn.Module):
    """nanoGPT's non-flash attention: a causal-mask buffer ``bias[:, :, :T, :T]`` and a
    position table, both ``block_size`` long."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(block_size, D)
        self.c_attn, self.c_proj, self.head = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, V)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(
            1, 1, block_size, block_size))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(0, t, device=idx.device))
        q, k, v = (y.view(b, t, H, D // H).transpose(1, 2)
                   for y in self.c_attn(F.layer_norm(x, (D,))).split(D, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf")), dim=-1)
        x = x + self.c_proj((att @ v).transpose(1, 2).reshape(b, t, D))
        return self.head(F.layer_norm(x, (D,)))


@pytest.mark.parametrize(("block_size", "shape"), [(16, (2, 16)), (32, (1, 16))])
def test_sizes_fixed_by_the_capture_are_a_call_error(block_size: int, shape: tuple) -> None:
    """An example as long as the mask (export then takes the length for the mask's) or a
    batch of 1 (export fixes sizes of 1) fix that axis: another size is a CallError
    naming it, not a failure inside a block blamed on umup_fx."""
    ids = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with pytest.warns(umup_fx.StaticSizeWarning, match="idx"):
        model = umup_fx.transform(NanoGPT(block_size), (ids,))
    assert model(ids).shape == (*shape, V)
    other = (3, 8)
    NanoGPT(block_size)(torch.zeros(other, dtype=torch.long))  # the original runs there
    with pytest.raises(CallError, match="idx of shape"):
        model(torch.zeros(other, dtype=torch.long))
    # the check is no op of the model's: export gives the original class, same numbers
    torch.testing.assert_close(umup_fx.export(model)(ids), model(ids), rtol=1e-4, atol=1e-5)


def test_free_sizes_stay_free() -> None:
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", umup_fx.StaticSizeWarning)
        model = umup_fx.transform(NanoGPT(32), (ids,))
    assert model(torch.zeros(3, 8, dtype=torch.long)).shape == (3, 8, V)
