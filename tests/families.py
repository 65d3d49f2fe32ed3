"""Tiny random-init models of the common families, and the coverage check run on each.

``tests/test_coverage.py`` runs the check on a few of them; ``benchmarks/coverage.py``
runs it on all of them and writes ``docs/coverage.md``. A family whose library is not
importable here is reported as such, never silently skipped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import umup_fx
from examples.moe import EinsumMoE, GroupedMoE, MoELM
from umup_fx.diagnose.unit_check import bands

VOCAB, SEQ, BATCH, D = 128, 16, 2, 64


@dataclass
class Case:
    """A model, the call that trains it, and what kind of output it has."""

    model: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    kind: str  # "lm" (logits over a vocabulary + loss), "loss" (has a loss), "backbone"


def _ids(vocab: int = VOCAB, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(1))


def _hf(cls_name: str, config_name: str, kind: str = "lm", **cfg: Any) -> Callable[[], Case]:
    def build() -> Case:
        import transformers

        base = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, use_cache=False)
        config = getattr(transformers, config_name)(**{**base, **cfg})
        model = getattr(transformers, cls_name)(config)
        ids = _ids(getattr(config, "vocab_size", VOCAB))
        if kind == "backbone":
            return Case(model, (ids,), {}, kind)
        return Case(model, (ids,), {"labels": ids}, kind)

    return build


def _gpt2() -> Case:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=64,
                                  use_cache=False)
    ids = _ids()
    return Case(transformers.GPT2LMHeadModel(cfg), (ids,), {"labels": ids}, "lm")


def _gptj() -> Case:
    import transformers

    cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=64,
                                  rotary_dim=8, use_cache=False)
    ids = _ids()
    return Case(transformers.GPTJForCausalLM(cfg), (ids,), {"labels": ids}, "lm")


def _t5() -> Case:
    import transformers

    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=D, d_kv=16, d_ff=4 * D, num_layers=2,
                                num_heads=4, decoder_start_token_id=0, use_cache=False)
    ids = _ids()
    return Case(transformers.T5ForConditionalGeneration(cfg), (ids,), {"labels": ids}, "lm")


def _vit() -> Case:
    import transformers

    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=4 * D, image_size=32, patch_size=8,
                                 num_labels=10)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 7])
    return Case(transformers.ViTForImageClassification(cfg), (pixels,), {"labels": labels}, "loss")


def _clip_text() -> Case:
    import transformers

    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=4 * D,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=SEQ)
    return Case(transformers.CLIPTextModel(cfg), (_ids(),), {}, "backbone")


def _timm_vit() -> Case:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10, depth=2, embed_dim=D, num_heads=4)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return Case(model, (pixels,), {}, "backbone")


def _resnet18() -> Case:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    return Case(model, (torch.randn(BATCH, 3, 32, 32),), {}, "backbone")


FAMILIES: dict[str, Callable[[], Case]] = {
    "GPT-2": _gpt2,
    "Llama": _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2),
    "Mistral": _hf("MistralForCausalLM", "MistralConfig", num_key_value_heads=2),
    "Qwen2": _hf("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2),
    "Qwen3": _hf("Qwen3ForCausalLM", "Qwen3Config", num_key_value_heads=2, head_dim=16),
    "Gemma": _hf("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=16),
    "Gemma2": _hf("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=16),
    "Phi3": _hf("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, pad_token_id=0),
    "OLMo": _hf("OlmoForCausalLM", "OlmoConfig"),
    "OLMo2": _hf("Olmo2ForCausalLM", "Olmo2Config"),
    "GPT-NeoX": _hf("GPTNeoXForCausalLM", "GPTNeoXConfig"),
    "GPT-J": _gptj,
    "Falcon": _hf("FalconForCausalLM", "FalconConfig", new_decoder_architecture=False),
    "StableLM": _hf("StableLmForCausalLM", "StableLmConfig", num_key_value_heads=4),
    "BERT": _hf("BertForMaskedLM", "BertConfig"),
    "RoBERTa": _hf("RobertaForMaskedLM", "RobertaConfig", pad_token_id=1),
    "T5": _t5,
    "ViT (HF)": _vit,
    "CLIP text": _clip_text,
    "ViT (timm)": _timm_vit,
    "resnet18 (torchvision)": _resnet18,
    "ConvNet (hand-written)": lambda: Case(ConvNet(), (torch.randn(BATCH, 3, 32, 32),),
                                           {"labels": torch.tensor([1, 7])}, "loss"),
    "Mixtral (MoE)": _hf("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2,
                         intermediate_size=2 * D, num_local_experts=4, num_experts_per_tok=2),
    "Qwen2-MoE": _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_key_value_heads=2,
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=D,
                     shared_expert_intermediate_size=2 * D),
    "OLMoE": _hf("OlmoeForCausalLM", "OlmoeConfig", num_key_value_heads=2,
                 intermediate_size=2 * D, num_experts=8, num_experts_per_tok=2, eos_token_id=2),
    "MoE, torch._grouped_mm (hand-written, bf16)": lambda: _moe_lm(
        lambda d: GroupedMoE(d, shared=True), torch.bfloat16),
    "MoE, einsum (hand-written)": lambda: _moe_lm(EinsumMoE, torch.float32),
    "MoE, scattered gates (hand-written)": lambda: _moe_lm(ScatterMoE, torch.float32),
}


def _moe_lm(moe: Callable[[int], nn.Module], dtype: torch.dtype) -> Case:
    return Case(MoELM(vocab=VOCAB, moe=moe).to(dtype), (_ids(),), {}, "lm")


class ScatterMoE(nn.Module):
    """Top-k picked on the router logits, a softmax over the k picked (Mistral's reference
    MoE), scattered into a dense [.., E] gate, every expert on every token, summed over E."""

    def __init__(self, d: int = D, hidden: int = 32, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden, bias=False), nn.GELU(), nn.Linear(hidden, d, bias=False))
            for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top, idx = logits.topk(self.k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
        out = torch.stack([expert(x) for expert in self.experts], dim=-2)
        return (gates.unsqueeze(-1) * out).sum(-2)


def is_qk(name: str) -> bool:
    """A query / key projection (their gradients sit lower at init, as in the reference),
    or what only such projections read: a learned query (SigLIP's probe), DeBERTa's
    relative-position table (read by its position query / key projections)."""
    return any(t in name for t in ("q_proj", "k_proj", "query", "key", ".q.", ".k.", "q_lin",
                                   "k_lin", "head.probe", "rel_embeddings"))


# Warnings that name what is off: a row that carries one is not silently wrong.
NAMED_WARNINGS = ("ScaleWarning", "UncoveredOpWarning", "PostNormWarning")


@dataclass
class Result:
    family: str
    status: str = "ok"  # "ok" | "refused" | "crashed" | "unavailable"
    message: str = ""
    uncovered: list[str] = field(default_factory=list)
    step_finite: bool | None = None
    grad_rms: dict[str, float] = field(default_factory=dict)  # weight -> RMS of its grad
    logits_rms: float | None = None
    readout_fan_in: int | None = None
    warned: list[str] = field(default_factory=list)  # warning classes transform raised
    other_sizes: bool | None = None  # runs at another batch and sequence length
    # weight -> the band umup_fx.check gives its gradient (rules §8: routers, rows that
    # agree); weights it did not measure get [lo, hi]; q / k are allowed lower in both
    bands: dict[str, tuple[float, float]] = field(default_factory=dict)

    def low_grads(self, lo: float = 0.2, hi: float = 5.0) -> list[str]:
        """Weights whose gradient RMS is outside their band."""
        out = []
        for name, v in self.grad_rms.items():
            low, high = self.bands.get(name, (lo, hi))
            low = 0.0 if is_qk(name) else low  # the table shows q / k apart ("q/k from")
            if not low <= v <= high or not math.isfinite(v):
                out.append(name)
        return out

    @property
    def unit_scale(self) -> bool:
        return bool(self.grad_rms) and not self.low_grads()

    @property
    def verdict(self) -> str:
        """right / warned (the warnings) / refused (the error) / **silently wrong**."""
        if self.status != "ok":
            return {"refused": f"refused ({self.message.split(':')[0]})",
                    "crashed": "**crashed**", "unavailable": "not run"}[self.status]
        logits = self.logits_rms is None or not self.readout_fan_in or (
            0.5 <= self.logits_rms * self.readout_fan_in ** 0.5 <= 2)
        named = [w for w in self.warned if w in NAMED_WARNINGS]
        if self.unit_scale and logits and self.step_finite and self.other_sizes and not (
                {"ScaleWarning", "UncoveredOpWarning"} & set(named)):
            return "right"  # (a post-norm model is right at init; its warning is about depth)
        return f"warned ({', '.join(named)})" if named else "**silently wrong**"


def _output(out: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(loss, the main output tensor) of a forward call's result."""
    if isinstance(out, torch.Tensor):
        return None, out
    loss = getattr(out, "loss", None)
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return loss, t
    if isinstance(out, (tuple, list)):
        return None, out[0]
    return loss, None


def check(family: str, build: Callable[[], Case] | None = None) -> Result:
    """Transform one family, take one step, and measure scales at init."""
    result = Result(family)
    torch.manual_seed(0)
    try:
        case = (build or FAMILIES[family])()
    except (ImportError, RuntimeError) as e:  # RuntimeError: torchvision built for another torch
        result.status, result.message = "unavailable", f"not importable here ({e})"
        return result
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = umup_fx.transform(case.model, case.args, case.kwargs)
    except umup_fx.UmupError as e:
        result.status, result.message = "refused", f"{type(e).__name__}: {e}"
        return result
    except Exception as e:  # noqa: BLE001 - a crash is what this check reports
        result.status, result.message = "crashed", f"{type(e).__name__}: {e}"
        return result
    result.uncovered = [op for _, op, _ in model.umup_plan.uncovered]
    result.message = "; ".join(
        str(w.message).split(".")[0] for w in caught
        if not issubclass(w.category, (DeprecationWarning, umup_fx.UncoveredOpWarning))
    )
    result.warned = sorted({w.category.__name__ for w in caught
                            if w.category.__module__.startswith("umup_fx")})
    try:
        _measure(model, case, result)
    except Exception as e:  # noqa: BLE001 - a crash is what this check reports
        result.status, result.message = "crashed", f"after transform: {type(e).__name__}: {e}"
    return result


def _measure(model: nn.Module, case: Case, result: Result) -> None:
    try:  # the check's band of each weight's gradient (it leaves the model as it was)
        for op in umup_fx.check(model, case.args, case.kwargs).ops:
            low, high = bands(op)["weight grad"]
            had = result.bands.get(op.weight, (low, high))
            result.bands[op.weight] = (min(low, had[0]), max(high, had[1]))
    except Exception:  # noqa: BLE001 - then the plain band applies
        result.bands.clear()
    loss, main = _output(model(*case.args, **case.kwargs))
    if loss is None and case.kind == "loss" and main is not None and main.dim() == 0:
        loss = main  # the loss itself returned (a hand-written classifier given labels)
    if loss is None or case.kind == "backbone":
        # A unit-scale gradient arriving at the output, as a unit-scaled loss gives.
        probe = torch.randn(main.shape, generator=torch.Generator().manual_seed(2))
        if case.kind == "lm":  # returned logits expect a mean loss's gradient: their
            # readout multiplies it by rows x V/sqrt(V-1) (rules §3, Cross-entropy)
            v = main.shape[-1]
            probe = probe / (main.numel() // v * umup_fx.runtime.ops.loss_grad_scale(v))
        loss = (main * probe).sum()
    loss.backward()
    plan = model.umup_plan
    names = dict(model.named_parameters())
    for name, p in plan.params.items():
        if p.role in ("input", "hidden", "output", "fixed") and p.trainable:
            grad = names[name].grad
            result.grad_rms[name] = float(grad.pow(2).mean().sqrt()) if grad is not None else 0.0
    if case.kind == "lm":
        readout = [p for p in plan.params.values() if p.role == "output"
                   or any(u.role == "output" for u in p.uses)]
        if readout:
            head = readout[-1]  # a tied embedding's readout use contracts its width axis
            result.readout_fan_in = head.fan_in_value if head.role == "output" else head.fan_out_value
            result.logits_rms = float(main.detach().pow(2).mean().sqrt())
    opt = umup_fx.AdamW(model, lr=1e-2)
    opt.step()
    result.step_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    try:
        args, kwargs = _other_sizes(case.args), _other_sizes(case.kwargs)
        _, main = _output(model(*args, **kwargs))
        result.other_sizes = main is not None and bool(torch.isfinite(main).all())
    except Exception:  # noqa: BLE001 - what this check reports
        result.other_sizes = False


def _other_sizes(tree: Any) -> Any:
    """The same call at batch + 1 and, for token inputs, half the sequence (longer could
    pass a model's own position table, which the original model cannot run either)."""
    gen = torch.Generator().manual_seed(3)

    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = [t.shape[0] + 1, *t.shape[1:]]
        if t.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=t.dtype)
        if t.dim() == 2:
            shape[1] //= 2
        return torch.randint(0, int(t.max()) + 1, shape, generator=gen)

    return torch.utils._pytree.tree_map(resize, tree)


# -- small hand-written models in the styles the families use ---------------------------
class ConvNet(nn.Module):
    """A small ResNet-style net: strided convs, batch norm, ReLU, max / average pooling."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        x = x + F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        logits = self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
        # a classifier's loss, as HF's *ForImageClassification (the coverage row's call):
        # returned logits would expect a mean cross-entropy's gradient (rules §3)
        return logits if labels is None else F.cross_entropy(logits, labels)


# -- families for the forms the rules had to learn (docs/rules.md "Decisions") ----------
def _pixels(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(1))


def _built(cls_name: str, config_name: str, inputs: Callable[[Any], tuple[tuple, dict]],
           kind: str, **cfg: Any) -> Callable[[], Case]:
    """A transformers model from its config's own argument names, called with ``inputs``."""

    def build() -> Case:
        import transformers

        config = getattr(transformers, config_name)(**cfg)
        args, kwargs = inputs(config)
        return Case(getattr(transformers, cls_name)(config), args, kwargs, kind)

    return build


def _lm_inputs(config: Any) -> tuple[tuple, dict]:
    ids = _ids(config.vocab_size)
    return (ids,), {"labels": ids}


def _class_inputs(config: Any) -> tuple[tuple, dict]:
    return (_ids(config.vocab_size),), {"labels": torch.tensor([0, 1])}


def _pixel_inputs(config: Any) -> tuple[tuple, dict]:
    return (_pixels(),), {}


class TorchEncoderLM(nn.Module):
    """torch.nn's own pre-norm encoder (causal) with an embedding and a readout."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.encoder(self.embed(ids), mask=mask, is_causal=True))


class TorchSeq2Seq(nn.Module):
    """nn.Transformer (encoder + decoder with nn.MultiheadAttention cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.transformer = nn.Transformer(D, 4, 2, 2, 4 * D, dropout=0.0, batch_first=True,
                                          norm_first=True)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.transformer(self.embed(src), self.embed(tgt), tgt_mask=mask,
                                          tgt_is_causal=True))


class HandLayerNormLM(nn.Module):
    """A LayerNorm written by hand (mean / var), as older code bases do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up, self.down = nn.Embedding(VOCAB, D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.gain, self.shift = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        mu, var = h.mean(-1, keepdim=True), h.var(-1, keepdim=True, unbiased=False)
        n = (h - mu) / torch.sqrt(var + 1e-5) * self.gain + self.shift
        return self.head(h + self.down(F.gelu(self.up(n))))


_TEXT = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=4 * D, max_position_embeddings=64)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * D,
                decoder_ffn_dim=4 * D, max_position_embeddings=64, decoder_start_token_id=2,
                pad_token_id=1, use_cache=False)

FAMILIES.update({
    "Granite (model multipliers)": _hf("GraniteForCausalLM", "GraniteConfig", num_key_value_heads=2,
                                       embedding_multiplier=12.0, residual_multiplier=0.22,
                                       logits_scaling=8.0, attention_multiplier=0.25),
    "Cohere (logit_scale)": _hf("CohereForCausalLM", "CohereConfig", num_key_value_heads=2,
                                logit_scale=0.0625),
    "Persimmon": _hf("PersimmonForCausalLM", "PersimmonConfig"),
    "Bloom (ALiBi)": _built("BloomForCausalLM", "BloomConfig", _lm_inputs, "lm", vocab_size=VOCAB,
                            hidden_size=D, n_layer=2, n_head=4, use_cache=False),
    "MPT": _built("MptForCausalLM", "MptConfig", _lm_inputs, "lm", vocab_size=VOCAB, d_model=D,
                  n_heads=4, n_layers=2, max_seq_len=64, use_cache=False),
    "DistilBERT classifier": _built("DistilBertForSequenceClassification", "DistilBertConfig",
                                    _class_inputs, "loss", vocab_size=VOCAB, dim=D, n_layers=2,
                                    n_heads=4, hidden_dim=4 * D, max_position_embeddings=64),
    "ELECTRA classifier (cls, dropout, dense)": _built(
        "ElectraForSequenceClassification", "ElectraConfig", _class_inputs, "loss",
        embedding_size=D, **_TEXT),
    "ELECTRA discriminator (BCE)": _built(
        "ElectraForPreTraining", "ElectraConfig",
        lambda c: ((_ids(),), {"labels": _ids(2)}), "loss", embedding_size=D, **_TEXT),
    "DeBERTa-v2 (relative positions through LayerNorm)": _built(
        "DebertaV2ForMaskedLM", "DebertaV2Config", _lm_inputs, "lm", relative_attention=True,
        position_buckets=8, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"],
        max_relative_positions=16, **_TEXT),
    "BART (post-norm encoder-decoder)": _built("BartForConditionalGeneration", "BartConfig",
                                               _lm_inputs, "lm", **_SEQ2SEQ),
    "Whisper (audio encoder-decoder)": _built(
        "WhisperForConditionalGeneration", "WhisperConfig",
        lambda c: ((torch.randn(BATCH, 16, 32, generator=torch.Generator().manual_seed(1)),),
                   {"labels": _ids()}),
        "lm", num_mel_bins=16, max_source_positions=16, max_target_positions=64,
        **{k: v for k, v in _SEQ2SEQ.items() if k != "max_position_embeddings"}),
    "Wav2Vec2 (audio, LayerDrop)": _built(
        "Wav2Vec2Model", "Wav2Vec2Config",
        lambda c: ((torch.randn(BATCH, 1600, generator=torch.Generator().manual_seed(1)),), {}),
        "backbone", hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=4 * D, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        layerdrop=0.0, mask_time_prob=0.0),  # what its CaptureError tells a user to set
    "ConvNeXt (depthwise conv, LayerScale)": _built(
        "ConvNextForImageClassification", "ConvNextConfig",
        lambda c: ((_pixels(),), {"labels": torch.tensor([1, 7])}), "loss", hidden_sizes=[16, 32],
        depths=[1, 1], num_stages=2, num_labels=10, image_size=32),
    "DINOv2 (LayerScale)": _built("Dinov2Model", "Dinov2Config", _pixel_inputs, "backbone",
                                  hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8),
    "Swin (shifted windows)": _built("SwinModel", "SwinConfig", _pixel_inputs, "backbone",
                                     image_size=32, patch_size=4, embed_dim=16, depths=[2],
                                     num_heads=[2], window_size=4),
    "Mamba (state space)": _built("MambaForCausalLM", "MambaConfig", _lm_inputs, "lm",
                                  vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2,
                                  state_size=8, use_cache=False),
    "Bamba (hybrid SSM + attention)": _hf(
        "BambaForCausalLM", "BambaConfig", num_key_value_heads=2, mamba_n_heads=4,
        mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1, attn_layer_indices=[1]),
    "nn.TransformerEncoder (torch.nn)": lambda: Case(TorchEncoderLM(), (_ids(),), {}, "lm"),
    "nn.Transformer encoder-decoder (torch.nn)": lambda: Case(
        TorchSeq2Seq(), (_ids(), _ids()), {}, "lm"),
    "LayerNorm by hand (mean / var)": lambda: Case(HandLayerNormLM(), (_ids(),), {}, "lm"),
})


class SiglipPooled(nn.Module):
    """SigLIP's vision tower with its MAP head (a learned probe repeated over the batch,
    attending through nn.MultiheadAttention to the patches); returns the pooled vector."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.SiglipVisionConfig(
            hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, vision_use_head=True)
        self.vision = transformers.SiglipVisionModel(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixel_values).pooler_output


FAMILIES["SigLIP vision + MAP head (learned-query pooling)"] = lambda: Case(
    SiglipPooled(), (_pixels(),), {}, "backbone")


def _hand_written(name: str) -> Callable[[], Case]:
    """Meta's llama and nanoGPT as their repositories write them (the small models of
    ``tests/test_capture_forms.py``: width 32, vocabulary 64)."""

    def build() -> Case:
        from tests.test_capture_forms import MetaLlama, NanoGPT

        if name == "llama":
            return Case(MetaLlama(buffer=True), (_ids(64), 0), {}, "lm")
        return Case(NanoGPT(block_size=64), (_ids(64),), {}, "lm")

    return build


FAMILIES["Meta llama (freqs_cis, start_pos, mask.type_as)"] = _hand_written("llama")
FAMILIES["nanoGPT (causal-mask buffer)"] = _hand_written("nanogpt")
