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
    "ConvNet (hand-written)": lambda: Case(ConvNet(), (torch.randn(BATCH, 3, 32, 32),), {}, "backbone"),
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
}


def _moe_lm(moe: Callable[[int], nn.Module], dtype: torch.dtype) -> Case:
    return Case(MoELM(vocab=VOCAB, moe=moe).to(dtype), (_ids(),), {}, "lm")


def is_qk(name: str) -> bool:
    """A query / key projection (their gradients sit lower at init, as in the reference)."""
    return any(t in name for t in ("q_proj", "k_proj", "query", "key", ".q.", ".k."))


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

    def low_grads(self, lo: float = 0.2, hi: float = 5.0) -> list[str]:
        """Weights whose gradient RMS is outside [lo, hi] (q/k projections allowed lower)."""
        out = []
        for name, v in self.grad_rms.items():
            if v > hi or (v < lo and not is_qk(name)) or not math.isfinite(v):
                out.append(name)
        return out

    @property
    def unit_scale(self) -> bool:
        return bool(self.grad_rms) and not self.low_grads()


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
    try:
        _measure(model, case, result)
    except Exception as e:  # noqa: BLE001 - a crash is what this check reports
        result.status, result.message = "crashed", f"after transform: {type(e).__name__}: {e}"
    return result


def _measure(model: nn.Module, case: Case, result: Result) -> None:
    loss, main = _output(model(*case.args, **case.kwargs))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        x = x + F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
