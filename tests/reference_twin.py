"""A plain-PyTorch twin of ``unit_scaling.TransformerDecoder`` (unit-scaling 0.3.5).

``PlainDecoder`` has the reference's architecture written the ordinary way: no unit
scaling, no u-muP, no umup_fx. Applying umup_fx to it should reproduce the reference's
loss and AdamW trajectory; ``docs/reference-differences.md`` lists every scale the
reference applies and where it departs from the rules in ``docs/rules.md``.

Architecture (reference ``_modules.py``):

- ``embedding``: token embedding [vocab, hidden]; no positional embedding, no
  embedding dropout (the reference docstring mentions one; the code has none).
- ``layers.{i}`` (pre-norm): ``x = x + mhsa(mhsa_norm(x))``, then
  ``x = x + mlp(mlp_norm(x))``. Branch dropout only when ``dropout_p > 0``.
- norms: RMSNorm over the last dim, eps 1e-5, **no gain** (the reference's
  ``RMSNorm`` defaults to ``elementwise_affine=False``).
- ``mhsa``: fused ``linear_qkv`` [3*hidden, hidden], no bias; the output features are
  laid out ``(z h d)``: q = rows [0, hidden), k = [hidden, 2*hidden), v = the rest,
  each split into heads as (h d). Causal SDPA (PyTorch's default 1/sqrt(d_head)
  logit scale here; the reference uses 1/d_head), then ``linear_o`` [hidden, hidden].
- ``mlp``: SwiGLU with expansion 4: ``linear_2(linear_1(x) * silu(linear_gate(x)))``,
  no biases.
- ``final_norm`` (RMSNorm, no gain), ``projection`` [vocab, hidden], no bias.
- loss (the reference's ``TransformerDecoder.loss``; its ``forward`` returns logits):
  next-token cross-entropy, mean over the ``batch * (seq - 1)`` predicted positions:
  ``cross_entropy(logits[..., :-1, :].flatten(end_dim=-2), input_ids[..., 1:].flatten())``.

``PlainDecoder.forward(input_ids)`` returns that scalar loss, so the loss is inside
the captured graph. Set ``return_logits=True`` (constructor or attribute) to return
the logits [batch, seq, vocab] instead, like the reference's ``forward``.

Parameter names equal the reference's ``named_parameters()`` names, and every
parameter has the same layout, so the name map is the identity and no transposes are
needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RMS_EPS = 1e-5
MLP_EXPANSION = 4


class PlainMHSA(nn.Module):
    def __init__(self, hidden_size: int, heads: int, dropout_p: float = 0.0) -> None:
        super().__init__()
        assert hidden_size % heads == 0
        self.heads = heads
        self.dropout_p = dropout_p
        self.linear_qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.linear_o = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        qkv = self.linear_qkv(x)
        # "b s (z h d) -> z b h s d"
        qkv = qkv.view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout_p if self.training else 0.0, is_causal=True
        )
        # "b h s d -> b s (h d)"
        y = y.transpose(1, 2).reshape(b, s, d)
        return self.linear_o(y)


class PlainMLP(nn.Module):
    def __init__(self, hidden_size: int, expansion_factor: int = MLP_EXPANSION) -> None:
        super().__init__()
        intermediate = hidden_size * expansion_factor
        self.linear_1 = nn.Linear(hidden_size, intermediate, bias=False)
        self.linear_gate = nn.Linear(hidden_size, intermediate, bias=False)
        self.linear_2 = nn.Linear(intermediate, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.linear_1(x) * F.silu(self.linear_gate(x)))


class PlainLayer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        heads: int,
        dropout_p: float = 0.0,
        elementwise_affine: bool = False,
    ) -> None:
        super().__init__()
        self.dropout_p = dropout_p
        self.mhsa_norm = nn.RMSNorm(hidden_size, eps=RMS_EPS, elementwise_affine=elementwise_affine)
        self.mhsa = PlainMHSA(hidden_size, heads, dropout_p=dropout_p)
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=RMS_EPS, elementwise_affine=elementwise_affine)
        self.mlp = PlainMLP(hidden_size)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._drop(self.mhsa(self.mhsa_norm(x)))
        x = x + self._drop(self.mlp(self.mlp_norm(x)))
        return x


class PlainDecoder(nn.Module):
    """Plain twin of ``unit_scaling.TransformerDecoder(hidden_size, vocab_size, layers,
    heads, dropout_p)``.

    ``forward(input_ids: LongTensor[batch, seq]) -> Tensor``: the scalar mean
    next-token cross-entropy (the reference's ``.loss(input_ids)``), or the logits
    [batch, seq, vocab] (the reference's ``forward``) when ``return_logits`` is True.

    ``elementwise_affine=True`` gives the norms a gain of ones (initialised to 1, not
    present in the reference): for testing that umup_fx freezes norm gains by default.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        layers: int,
        heads: int,
        dropout_p: float = 0.0,
        elementwise_affine: bool = False,
        return_logits: bool = False,
    ) -> None:
        super().__init__()
        self.return_logits = return_logits
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            PlainLayer(hidden_size, heads, dropout_p, elementwise_affine) for _ in range(layers)
        )
        self.final_norm = nn.RMSNorm(hidden_size, eps=RMS_EPS, elementwise_affine=elementwise_affine)
        self.projection = nn.Linear(hidden_size, vocab_size, bias=False)

    def logits(self, input_ids: Tensor) -> Tensor:
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.projection(self.final_norm(x))

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.logits(input_ids)
        if self.return_logits:
            return logits
        return F.cross_entropy(
            logits[..., :-1, :].flatten(end_dim=-2), input_ids[..., 1:].flatten()
        )


def reference_to_plain(reference: nn.Module) -> dict[str, str]:
    """Reference ``named_parameters()`` name -> PlainDecoder name (the identity)."""
    return {name: name for name, _ in reference.named_parameters()}


def _reference_names(layers: int) -> list[str]:
    names = ["embedding.weight"]
    for i in range(layers):
        names += [
            f"layers.{i}.mhsa.linear_qkv.weight",
            f"layers.{i}.mhsa.linear_o.weight",
            f"layers.{i}.mlp.linear_1.weight",
            f"layers.{i}.mlp.linear_gate.weight",
            f"layers.{i}.mlp.linear_2.weight",
        ]
    return names + ["projection.weight"]


# For the default make_pair() config (2 layers). Every entry maps a name to itself.
REFERENCE_TO_PLAIN: dict[str, str] = {n: n for n in _reference_names(2)}


@torch.no_grad()
def copy_reference_weights(reference: nn.Module, plain: PlainDecoder) -> None:
    """Copy every reference parameter into ``plain`` (same names, same layouts).

    Every plain parameter that has no reference counterpart must be a norm gain
    (``elementwise_affine=True``); those are reset to 1.
    """
    plain_params = dict(plain.named_parameters())
    mapping = reference_to_plain(reference)
    for ref_name, ref_param in reference.named_parameters():
        target = plain_params[mapping[ref_name]]
        if target.shape != ref_param.shape:
            raise ValueError(f"{ref_name}: reference {tuple(ref_param.shape)} vs plain {tuple(target.shape)}")
        target.copy_(ref_param)
    for name in set(plain_params) - set(mapping.values()):
        if not name.endswith("norm.weight"):
            raise ValueError(f"plain parameter {name} has no reference counterpart")
        plain_params[name].fill_(1.0)


def make_pair(
    hidden: int = 64,
    vocab: int = 256,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    **plain_kwargs: Any,
) -> tuple[nn.Module, PlainDecoder]:
    """Build ``(reference, plain)``: the reference with its own (unit) init under
    ``torch.manual_seed(seed)``, and a PlainDecoder holding a copy of its weights."""
    import unit_scaling

    torch.manual_seed(seed)
    reference = unit_scaling.TransformerDecoder(hidden, vocab, layers, heads)
    plain = PlainDecoder(hidden, vocab, layers, heads, **plain_kwargs)
    copy_reference_weights(reference, plain)
    return reference, plain


def reference_lr_factors(reference: nn.Module) -> dict[str, float]:
    """The per-parameter LR factor the reference's Adam/AdamW applies (``lr = η·f``),
    keyed by PlainDecoder parameter name."""
    from unit_scaling.optim import lr_scale_func_adam

    mapping = reference_to_plain(reference)
    return {mapping[n]: float(lr_scale_func_adam(p)) for n, p in reference.named_parameters()}
