"""Baselines from the same analysis (μP, SP, SP + embedding LR) and the LR sweep tool."""

from __future__ import annotations

import json

import pytest
import torch

import umup_fx
from tests.tiny_models import graph_nodes, hf_llama
from umup_fx.__main__ import main
from umup_fx.transfer.search import search
from umup_fx.transfer.sweep import default_grid, summary, verdict


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_sp_runs_the_model_as_written_with_plain_groups() -> None:
    torch.manual_seed(0)
    model = hf_llama(hidden=64)
    before = model(_ids()).logits
    umup_fx.transform(model, (_ids(),), parametrization="sp")
    assert type(model).__name__ == "LlamaForCausalLM"  # not rewritten
    torch.testing.assert_close(model(_ids()).logits, before)
    opt = umup_fx.AdamW(model, lr=1e-3, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-3, 0.1)]
    assert str(model.umup_plan).startswith("SP (baseline) plan")


def test_sp_emb_lr_scales_the_embedding_lr_with_width() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(hf_llama(hidden=128), (_ids(),), parametrization="sp_emb_lr",
                              base=hf_llama(hidden=32))
    p = model.umup_plan.params
    assert p["model.embed_tokens.weight"].lr_factor == 4.0
    assert {q.lr_factor for n, q in p.items() if "embed" not in n} == {1.0}


def test_mup_groups_init_and_forward() -> None:
    torch.manual_seed(0)
    model = umup_fx.transform(hf_llama(hidden=128), (_ids(),), parametrization="mup",
                              base=hf_llama(hidden=64), sigma_init=0.02)
    p = model.umup_plan.params
    q = p["model.layers.0.self_attn.q_proj.weight"]
    assert q.lr_factor == 0.5 and q.init_std == pytest.approx(0.02 * 0.5**0.5)
    assert model.model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.0141, rel=0.1)
    assert p["lm_head.weight"].lr_factor == 1.0 and p["model.embed_tokens.weight"].lr_factor == 1.0
    assert p["model.norm.weight"].trainable  # norms stay parametric outside u-muP
    nodes = graph_nodes(model)
    assert any(n.target is torch.mul and n.args[1] == 0.5 for n in nodes)  # readout 64/128
    sdpa = [n for n in nodes if "scaled_dot_product_attention" in str(n.target)]
    assert sdpa and all(n.kwargs["scale"] == pytest.approx(16**0.5 / 32) for n in sdpa)


def test_mup_at_the_base_width_is_the_model_as_written() -> None:
    torch.manual_seed(0)
    model = hf_llama(hidden=64)
    before = model(_ids()).logits
    umup_fx.transform(model, (_ids(),), parametrization="mup", base=hf_llama(hidden=64),
                      reinit=False)
    torch.testing.assert_close(model(_ids()).logits, before)


def test_baselines_need_a_base_and_a_known_name() -> None:
    with pytest.raises(umup_fx.UmupError, match="baseline for comparisons"):
        umup_fx.prepare(hf_llama(hidden=64), (_ids(),), parametrization="sp")
    with pytest.raises(umup_fx.UmupError, match="base="):
        umup_fx.transform(hf_llama(hidden=64), (_ids(),), parametrization="mup")
    with pytest.raises(umup_fx.UmupError, match="one of"):
        umup_fx.transform(hf_llama(hidden=64), (_ids(),), parametrization="ntk")


def test_sweep_cli_writes_json_resumes_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "sweep.json"
    argv = ["sweep", "examples.llama:Llama", "--width-arg", "d_model", "--arg", "n_layers=2",
            "--widths", "32", "64",
            "--lrs", "0.5", "--steps", "3", "--parametrization", "umup", "sp", "--seeds", "0",
            "--batch", "2", "--seq", "16", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 4
    assert {r["parametrization"] for r in result["runs"]} == {"umup", "sp"}
    assert all(r["val_loss"] > 0 for r in result["runs"])
    assert set(result["best"]["umup"]) == {"32", "64"} and result["log2_lr_drift"]["umup"] == 0
    assert "umup: η* by width 32: 0.5 (" in capsys.readouterr().out
    first = out.read_text()
    assert main(argv) == 0  # every run is there: nothing reruns, nothing changes
    assert json.loads(out.read_text())["runs"] == json.loads(first)["runs"]


@pytest.mark.slow
def test_sweep_function_on_a_logits_model(tmp_path) -> None:
    pytest.importorskip("matplotlib")

    def factory(hidden: int) -> torch.nn.Module:
        return hf_llama(hidden=hidden)  # forward(idx) -> .logits: the sweep applies the loss

    result = umup_fx.sweep(factory, width_arg="hidden", widths=[32], lrs=[0.1, 1.0],
                                 steps=2, batch=2, seq=16, plot=tmp_path / "s.png",
                                 progress=False)
    assert len(result["runs"]) == 2 and (tmp_path / "s.png").stat().st_size > 0
    assert result["best"]["umup"]["32"]["lr"] in (0.1, 1.0)


def test_summary_transfer_quality() -> None:
    """Drift of log2 eta*, the loss lost at the widest width with the proxy's eta*, and
    the seeds' spread, on hand-made runs with known answers."""
    runs = [{"parametrization": "p", "width": w, "lr": lr, "seed": s, "val_loss": loss + s * 0.1}
            for w, lr, loss in [(64, 0.5, 2.0), (64, 1.0, 2.2), (256, 0.5, 1.9), (256, 1.0, 1.7)]
            for s in (0, 1)]
    out = summary(runs)
    assert out["best"]["p"]["64"]["lr"] == 0.5 and out["best"]["p"]["256"]["lr"] == 1.0
    assert out["log2_lr_drift"]["p"] == 1.0
    assert out["transfer_loss"]["p"] == pytest.approx(0.2)  # 1.95 at 0.5 vs 1.75 at 1.0
    assert out["best"]["p"]["256"]["seed_spread"] == pytest.approx(0.1)
    # each eta* wins by 0.2 against a seed spread of 0.1; 0.5 is the grid's lower edge
    assert out["best"]["p"]["64"]["margin"] == pytest.approx(0.2)
    assert out["best"]["p"]["64"]["decided"] and out["best"]["p"]["64"]["edge"]
    assert out["drift_within_noise"]["p"] is False  # 0.2 lost at 256 > spread 0.1
    assert "log2 drift 1, beyond the seeds' spread" in verdict(out, "p")


def test_summary_says_when_a_drift_is_noise() -> None:
    """Width 256 prefers 1.0 by 0.05 nats while its seeds spread by 0.3: a drift of 1
    that is within noise, an eta* that is not decided."""
    runs = [{"parametrization": "p", "width": w, "lr": lr, "seed": s, "val_loss": loss + s * 0.3}
            for w, lr, loss in [(64, 0.5, 2.0), (64, 1.0, 2.4), (64, 2.0, 2.5),
                                (256, 0.5, 1.80), (256, 1.0, 1.75), (256, 2.0, 2.2)]
            for s in (0, 1)]
    out = summary(runs)
    e = out["best"]["p"]["256"]
    assert e["lr"] == 1.0 and e["margin"] == pytest.approx(0.05) and e["decided"] is False
    assert not e["edge"] and out["drift_within_noise"]["p"] is True
    assert "log2 drift 1, within noise" in verdict(out, "p")
    one_seed = summary([r for r in runs if r["seed"] == 0])
    assert one_seed["best"]["p"]["256"]["decided"] is None
    assert "one seed" in verdict(one_seed, "p")


def test_default_grids_are_centred_on_each_default() -> None:
    assert default_grid("umup") == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert default_grid("sp") == [2.0**k for k in range(-11, -6)]


@pytest.mark.slow
def test_coord_check_cli_umup_flat_sp_grows(tmp_path, capsys) -> None:
    """μP's coordinate check through the CLI: after a few steps at the same eta per
    parametrization, u-muP's and μP's output RMS do not trend with width; SP's grows.
    μP runs ATen's own linears, and its readout's multiplier is part of the output."""
    out = tmp_path / "cc.json"
    argv = ["coord-check", "examples.llama:Llama", "--width-arg", "d_model", "--widths", "32",
            "128", "--steps", "3", "--parametrization", "umup", "mup", "sp", "--batch", "2",
            "--seq", "16", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    record = result["records"][0]
    assert set(record) == {"parametrization", "width", "step", "layer", "rms"}
    assert {r["step"] for r in result["records"]} == {0, 1, 2, 3}
    umup = result["slopes"]["umup"]
    sp = result["slopes"]["sp"]
    assert max(abs(v) for v in umup.values()) < 0.3
    mup = result["slopes"]["mup"]
    assert set(mup) == set(umup) and max(abs(v) for v in mup.values()) < 0.3
    assert sp["layers.*.mlp.down_proj.weight"] > 0.8 > umup["layers.*.mlp.down_proj.weight"]
    assert "umup: log-log slope" in capsys.readouterr().out


@pytest.mark.slow
def test_search_cli_tunes_eta_then_one_multiplier_and_checks_the_target(tmp_path, capsys) -> None:
    out = tmp_path / "search.json"
    argv = ["search", "examples.llama:Llama", "--width-arg", "d_model", "--arg", "n_layers=2",
            "--proxy-width", "32",
            "--target-width", "64", "--lrs", "0.25", "1", "--steps", "2", "--mults", "2",
            "--fields", "output_mult", "--batch", "2", "--seq", "16", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    stages = [r["stage"] for r in result["runs"]]
    assert stages.count("lr") == 2 and stages.count("output_mult") == 1
    assert stages.count("target") == (2 if result["best"] else 1)
    assert result["lr"] in (0.25, 1.0) and set(result["best"]) <= {"output_mult"}
    assert result["target"]["gain"] == pytest.approx(
        result["target"]["default"] - result["target"]["combined"])
    assert "eta*" in capsys.readouterr().out
    n = len(result["runs"])
    assert main(argv) == 0 and len(json.loads(out.read_text())["runs"]) == n  # resumed


def test_search_rejects_unknown_multipliers() -> None:
    with pytest.raises(umup_fx.UmupError, match="unknown u-muP multipliers"):
        search(lambda d_model: None, width_arg="d_model", proxy_width=32,
                              target_width=64, lrs=[1.0], steps=1, fields=["warmup"])
