"""``umup_fx.export``: the transformed model back to its own class, scales folded in.

The truth is the transformed model's own output (fp32, relative 1e-4) at batch sizes and
sequence lengths other than the transform's, and the exported model run by plain
PyTorch / transformers (a subprocess that never imports umup_fx).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import umup_fx
from examples.llama import Llama, LlamaConfig
from umup_fx.runtime.modules import UmupRegion

SIZES = [(2, 16), (1, 5), (3, 40)]


def _transform(model: torch.nn.Module, vocab: int) -> torch.nn.Module:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return umup_fx.transform(model, (ids,))


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[attr-defined]


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, vocab: int) -> None:
    gen = torch.Generator().manual_seed(2)
    for batch, seq in SIZES:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        with torch.no_grad():
            want, got = _logits(a(ids)), _logits(b(ids))
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, f"batch {batch}, seq {seq}: relative error {err:.2e}"


def _train(model: torch.nn.Module, vocab: int, steps: int = 3) -> None:
    opt = umup_fx.AdamW(model, lr=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 16), generator=gen)
        logits = _logits(model(ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def _norms_as_captured(model: torch.nn.Module, buffers: list[str], norms: int) -> None:
    """Without pretrained=True the import's norm factors cost nothing: no buffers, every
    norm op and hand-written eps as captured (PyTorch's kernel, the float eps)."""
    from umup_fx.runtime import ops

    assert [n for n, _ in model.named_buffers() if "_umup_constant_" not in n] == buffers
    original = {n.name: n for n in model.original_graph.graph.nodes}
    seen = 0
    for gm in model.region_graphs().values():
        for n in gm.graph.nodes:
            assert n.target is not ops.norm_eps and "input_scale" not in n.kwargs
            assert n.op != "placeholder" or not n.name.startswith("umup_norm_scale")
            seen += n.target in (ops.layer_norm, ops.rms_norm) or "rsqrt" in str(n.target)
            if "rsqrt" in str(n.target):  # x * rsqrt(mean(x^2) + eps): eps as captured
                eps = [a for a in n.args[0].args if isinstance(a, float)]
                assert eps == [a for a in original[n.args[0].name].args
                               if isinstance(a, float)] == [1e-6]
    assert seen == norms


def _plain_class(exported: torch.nn.Module, cls: type) -> None:
    assert type(exported) is cls
    assert not any(isinstance(m, UmupRegion) for m in exported.modules())
    assert not any(k.startswith("_umup") for m in exported.modules() for k in m.__dict__)
    assert all(p.requires_grad for p in exported.parameters())


def test_example_llama_exact_after_training() -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=64))
    keys = set(model.state_dict())
    buffers = [n for n, _ in model.named_buffers()]
    _transform(model, 64)
    _norms_as_captured(model, buffers, norms=2 * 3 + 1)  # hand-written RMSNorm
    _train(model, 64)
    model.eval()
    exported = umup_fx.export(model)
    _plain_class(exported, Llama)
    assert set(exported.state_dict()) == keys
    _assert_same(model, exported, 64)
    # The norm gains u-muP froze come back as plain constant gains (a factor of the solve).
    gain = exported.layers[0].norm1.weight
    assert torch.allclose(gain, gain[0].expand_as(gain)) and gain[0] > 0


def test_loading_umup_state_dict_into_the_class_is_not_the_model() -> None:
    # The trap export replaces: a strict load fails on the transform's settings
    # (_extra_state, tests/test_save_contract.py); without them, the same keys compute
    # another function.
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    model = _transform(Llama(cfg), 64).eval()
    naive = Llama(cfg).eval()
    with pytest.raises(RuntimeError, match="_extra_state"):
        naive.load_state_dict(model.state_dict())
    naive.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(naive(ids), model(ids), rtol=1e-2)
        assert torch.allclose(umup_fx.export(model)(ids), model(ids), rtol=1e-4, atol=1e-5)


def test_hf_llama_and_gpt2_tied() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0))
    assert gpt2.config.tie_word_embeddings
    for model, cls in ((llama, transformers.LlamaForCausalLM), (gpt2, transformers.GPT2LMHeadModel)):
        _transform(model, 128).eval()
        exported = umup_fx.export(model)
        _plain_class(exported, cls)
        _assert_same(model, exported, 128)
    # GPT-2's embedding and readout need different factors: untied, and the config says so.
    assert not exported.config.tie_word_embeddings
    assert exported.lm_head.weight is not exported.transformer.wte.weight


def test_refuses_a_model_that_was_not_transformed() -> None:
    with pytest.raises(umup_fx.ExportError, match="not a model transformed"):
        umup_fx.export(Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2)))


_PLAIN_PROCESS = textwrap.dedent("""
    import json, sys
    import torch, transformers
    out = {}
    for name, path in json.loads(sys.argv[1]).items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.tensor(json.loads(sys.argv[2]))
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(ids[:1, :4], max_new_tokens=8, do_sample=False,
                                    use_cache=True, pad_token_id=0)
        out[name] = {"logits": logits.tolist(), "tokens": tokens[0].tolist()}
    assert "umup_fx" not in sys.modules
    print(json.dumps(out))
""")


def _greedy(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> list[int]:
    ids = prompt
    with torch.no_grad():
        for _ in range(new):  # the full forward every step: no cache
            ids = torch.cat([ids, _logits(model(ids))[:, -1:].argmax(-1)], dim=1)
    return ids[0].tolist()


@pytest.mark.slow
def test_hf_round_trip_in_a_plain_process(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    models = {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0)),
    }
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    paths = {}
    for name, model in models.items():
        _transform(model, 128)
        _train(model, 128, steps=2)
        model.eval()
        paths[name] = str(tmp_path / name)
        umup_fx.export(model).save_pretrained(paths[name])
    run = subprocess.run([sys.executable, "-c", _PLAIN_PROCESS, json.dumps(paths),
                          json.dumps(ids.tolist())], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    plain = json.loads(run.stdout.strip().splitlines()[-1])
    for name, model in models.items():
        with torch.no_grad():
            want = _logits(model(ids))
        got = torch.tensor(plain[name]["logits"])
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
        assert plain[name]["tokens"] == _greedy(model, ids[:1, :4], 8), name


def test_pretrained_in_keeps_the_function_and_export_brings_it_back() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    models = [
        (Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=64)), 64),
        (transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0)), 128),
    ]
    for model, vocab in models:
        with torch.no_grad():  # a fresh HF init's small embeddings, where eps is felt
            for name, p in model.named_parameters():
                if any(k in name for k in ("embed", "wte", "wpe")):
                    p.normal_(std=0.02)
        original = copy.deepcopy(model).eval()
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        umup_fx.transform(model, (ids,), pretrained=True).eval()
        assert all(p.requires_grad for p in model.parameters())  # gains stay trainable
        _assert_same(original, model, vocab)
        _assert_same(original, umup_fx.export(model), vocab)
        # Then it trains under u-muP, and export still gives the model it trained to.
        model.train()
        _train(model, vocab, steps=2)
        model.eval()
        _assert_same(model, umup_fx.export(model), vocab)


@pytest.mark.parametrize("family", ["Llama", "GPT-2"])
def test_pretrained_is_exact_with_a_small_stream(family: str) -> None:
    # Embeddings of std 0.02 (a fresh Hugging Face init) keep the residual stream small,
    # where a norm's eps is felt: the import divides each norm's input by a factor that
    # grows block by block, and each norm multiplies it back from a buffer of its own
    # (before, the logits were 6e-3 / 3e-3 off). Hand-written RMSNorm (Llama), LayerNorm.
    pytest.importorskip("transformers")
    from tests.families import FAMILIES

    torch.manual_seed(0)
    case = FAMILIES[family]()
    model = case.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("embed", "wte", "wpe")):
                p.normal_(std=0.02)
    original = copy.deepcopy(model).eval()
    umup_fx.transform(model, case.args, pretrained=True).eval()
    # The class's keys, and the transform's settings (tests/test_save_contract.py).
    assert [k for k in model.state_dict() if k != "_extra_state"] == list(original.state_dict())
    scales = [n for n, _ in model.named_buffers() if "_umup_norm_scale_" in n]
    assert len(scales) == 2 * 2 + 1  # two per block, the final norm
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = original(ids, labels=ids)
        got = model(ids, labels=ids)  # a call structure captured after transform
        plain = umup_fx.export(model)
        back = plain(ids, labels=ids)
    _plain_class(plain, type(original))
    assert list(plain.state_dict()) == list(original.state_dict())
    for out in (got, back):
        assert ((out.logits - want.logits).abs().max() / want.logits.abs().max()) < 1e-5
        assert abs(out.loss - want.loss) < 1e-5 * want.loss
    # A factor is the graphs', not trained and not in the state_dict: overwritten (as
    # to_empty would), export says so instead of returning another function.
    with torch.no_grad():
        model.get_buffer(scales[0]).fill_(7.0)
    with pytest.raises(umup_fx.ExportError, match="overwritten"):
        umup_fx.export(model)


def test_pretrained_refuses_frozen_norms() -> None:
    model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2))
    with pytest.raises(umup_fx.UmupError, match="pretrained=True keeps"):
        umup_fx.transform(model, (torch.zeros(1, 4, dtype=torch.long),), pretrained=True,
                          trainable_norms=False)


def test_pretrained_refuses_meta_weights_before_changing_the_model() -> None:
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2))
    with pytest.raises(umup_fx.ExportError, match="on meta: load the checkpoint first"):
        umup_fx.transform(model, (torch.zeros(1, 4, dtype=torch.long),), pretrained=True)
    assert type(model) is Llama and not hasattr(model, "umup_plan")  # left as it was


@pytest.mark.parametrize("family", ["Gemma", "Mixtral (MoE)"])
def test_hf_constants_and_moe(family: str) -> None:
    # Gemma: sqrt(d) embedding buffer and 1 + w gains u-muP dropped; Mixtral: experts,
    # router (a readout), the top-k combine.
    pytest.importorskip("transformers")
    from tests.families import FAMILIES

    torch.manual_seed(0)
    case = FAMILIES[family]()
    cls = type(case.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umup_fx.transform(case.model, case.args)
    case.model.eval()
    exported = umup_fx.export(case.model)
    _plain_class(exported, cls)
    _assert_same(case.model, exported, 128)


def test_example_gpt_hand_written_attention() -> None:
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_embd=64, n_layer=2, n_head=4, block_size=64))
    buffers = [n for n, _ in model.named_buffers()]
    _transform(model, 64).eval()
    _norms_as_captured(model, buffers, norms=2 * 2 + 1)  # nn.LayerNorm
    exported = umup_fx.export(model)
    _plain_class(exported, GPT)
    _assert_same(model, exported, 64)


def test_cli_exports_a_dcp_checkpoint_tensor_by_tensor(tmp_path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    safetensors = pytest.importorskip("safetensors.torch")
    cfg = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**cfg))
    _transform(model, 256)
    _train(model, 256, steps=2)
    model.eval()
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "ck"))
    args = [f"--arg={k}={v}" for k, v in cfg.items()]
    run = subprocess.run(
        [sys.executable, "-m", "umup_fx", "export", "examples.llama:Llama", *args,
         "--input", "long:2x16:256", "--checkpoint", str(tmp_path / "ck"),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(index["weight_map"])  # one per file
    state = {}
    for shard in set(index["weight_map"].values()):
        state.update(safetensors.load_file(str(tmp_path / "out" / shard)))
    plain = Llama(LlamaConfig(**cfg)).eval()
    plain.load_state_dict(state)  # strict: every key, nothing extra
    _assert_same(model, plain, 256)


def test_t5_encoder_decoder() -> None:
    # u-muP's dropout scale before the encoder output lands in the final norm's gain.
    pytest.importorskip("transformers")
    from tests.families import FAMILIES

    torch.manual_seed(0)
    case = FAMILIES["T5"]()
    cls = type(case.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umup_fx.transform(case.model, case.args, case.kwargs)
    case.model.eval()
    exported = umup_fx.export(case.model)
    _plain_class(exported, cls)
    for seq in (8, 24):
        ids = torch.randint(0, 128, (3, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = case.model(ids, labels=ids).logits
            got = exported(ids, labels=ids).logits
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_fp8_model_exports_in_its_dtype_as_without_fp8() -> None:
    # FP8 casts are numerics only: the FP8 model exports to the weights its twin without
    # FP8 exports to (same init), and the export tracks the FP8 model to FP8's precision.
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    exported = []
    for fp8 in (True, False):
        torch.manual_seed(0)
        model = Llama(cfg)
        torch.manual_seed(0)
        umup_fx.transform(model, (ids,), fp8=fp8)
        exported.append((model.eval(), umup_fx.export(model)))
    (fp8_model, from_fp8), (_, from_plain) = exported
    for (name, a), (_, b) in zip(from_fp8.state_dict().items(), from_plain.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with torch.no_grad():
        got, want = from_fp8(ids), fp8_model(ids)
    assert float((got - want).norm() / want.norm()) < 0.1


def test_convnet_pools_relu_branch_and_batch_norm() -> None:
    """A ReLU (positively homogeneous) carries any factor, max / average pooling too
    (their u-muP scales are backward-only): a ReLU residual branch exports."""
    from tests.families import ConvNet

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    model = umup_fx.transform(ConvNet(), (x, y), check=False)
    opt = umup_fx.AdamW(model, lr=0.01)
    for _ in range(2):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    plain = umup_fx.export(model).eval()
    model.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)
