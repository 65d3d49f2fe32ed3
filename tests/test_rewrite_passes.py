"""Each rewrite pass on its own: the graph before and after, on small captured graphs."""

from __future__ import annotations

import torch
from torch import nn
from umup_fx.passes.scale_attention import mask_is_causal, scale_manual_attention
from umup_fx.passes.scale_norms import scale_norms
from umup_fx.passes.scale_residuals import scale_residuals
from umup_fx.passes.scale_weights import scale_linears

from examples.gpt import GPT, GPTConfig
from tests.tiny_models import ResidualMLPStack
from umup_fx import meta
from umup_fx.capture.trace import capture
from umup_fx.options import Options
from umup_fx.pipeline import plan_graph
from umup_fx.runtime import fp8, ops


def _planned(model: nn.Module, *inputs: torch.Tensor, **options):
    gm = capture(model, inputs, blocks=False).gm  # one flat graph: passes one by one
    opts = Options.build(**options)
    plan = plan_graph(gm, opts)
    g = meta.graph_meta(gm)
    g[meta.PLAN], g[meta.OPTIONS] = plan, opts
    return gm, plan


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_scale_residuals_splits_each_skip_once() -> None:
    gm, plan = _planned(ResidualMLPStack(), torch.randint(0, 256, (2, 8)))
    n_adds = _targets(gm).count(torch.ops.aten.add.Tensor)
    scale_residuals(gm)
    targets = _targets(gm)
    assert targets.count(ops.residual_split) == len(plan.branches) == 3
    assert targets.count(ops.residual_add) == 3
    assert targets.count(torch.ops.aten.add.Tensor) == n_adds - 3
    for node in gm.graph.nodes:
        if node.target is ops.residual_add:
            branch = meta.get(node, meta.RESIDUAL)
            assert node.args[2] == branch.tau
            assert node.args[1].args[0].target is ops.residual_split  # skip from the split


def test_scale_linears_by_role_and_fp8() -> None:
    torch.manual_seed(0)
    gm, plan = _planned(ResidualMLPStack(d=16, n_out=10), torch.randint(0, 256, (2, 8)), fp8="simulate")
    scale_linears(gm)
    linears = [n for n in gm.graph.nodes if n.target in (ops.linear, fp8.linear)]
    assert len(linears) == 4
    readout = next(n for n in linears if meta.get(n, meta.WEIGHT) == "readout.weight")
    assert readout.kwargs["out_scale"] == 1 / 16 and readout.kwargs["grad_input_scale"] == 10**-0.5
    hidden = next(n for n in linears if meta.get(n, meta.WEIGHT) == "blocks.0.weight")
    assert hidden.kwargs["out_scale"] == hidden.kwargs["grad_input_scale"] == 16**-0.5
    # blocks read a layer_norm output: FP8-eligible, so the fp8 linear in simulate mode
    assert hidden.target is fp8.linear and hidden.kwargs["mode"] == "simulate"
    assert readout.target is ops.linear


def test_scale_norms_drops_gain_by_default() -> None:
    model = GPT(GPTConfig(n_layer=1, n_embd=32))
    x = torch.randint(0, 256, (2, 8))
    gm, _ = _planned(model, x)
    scale_norms(gm)
    norms = [n for n in gm.graph.nodes if n.target is ops.layer_norm]
    assert norms and all(n.args[2] is None and n.args[3] is None for n in norms)
    gm2, _ = _planned(GPT(GPTConfig(n_layer=1, n_embd=32)), x, trainable_norms=True)
    scale_norms(gm2)
    assert all(n.args[2] is not None for n in gm2.graph.nodes if n.target is ops.layer_norm)


def test_manual_attention_gets_the_sdpa_rule() -> None:
    gm, _ = _planned(GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2)), torch.randint(0, 256, (2, 8)))
    scale_manual_attention(gm)
    targets = _targets(gm)
    assert targets.count(ops.attention_output_scale) == 1
    assert targets.count(ops.scale_bwd) == 3  # q, k^T, v
    assert targets.count(ops.scale_fwd) == 1  # the @ v output
    scale = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor
             and any(isinstance(a, float) and abs(a - 1 / 16) < 1e-12 for a in n.args)]
    assert scale, "the 1/sqrt(d_head) logit constant becomes alpha/d_head = 1/16"


def test_mask_is_causal_detects_arange_masks() -> None:
    class Masked(nn.Module):
        def __init__(self, causal: bool) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 24)
            self.causal = causal

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
            i = torch.arange(x.shape[1])
            mask = i[:, None] >= i[None, :] if self.causal else i[:, None] >= 0 * i[None, :]
            return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    for causal in (True, False):
        gm = capture(Masked(causal), (torch.randn(2, 6, 8),), blocks=False).gm
        sdpa = next(n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
        assert mask_is_causal(gm, sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs["attn_mask"]) is causal
