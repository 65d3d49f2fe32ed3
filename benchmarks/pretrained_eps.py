"""How exact ``transform(..., pretrained=True)`` is, and what its one inexactness costs.

Import divides each weight by the factor export would multiply it by, so the transformed
model's activations are the checkpoint's times constants; a norm forgets its input's
constant except through its ``eps``, which is not rescaled (docs/deploy.md says why). This
script measures the imported model's logits against the original model run by PyTorch
(max |difference| / max |logit|, fp32, batch 3, sequence 24) for checkpoints whose
residual stream is small (embeddings of std 0.02, a fresh Hugging Face init) or of RMS
about 1 (std 1), and the same small-stream model with every norm's eps set to 0 (the
import is then exact: the gap is eps alone). Writes docs/deploy.md's section.

    python benchmarks/pretrained_eps.py          # ~1 minute on a 2-core CPU
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402

VOCAB = 128
DEPLOY = ROOT / "docs" / "deploy.md"


def _models(eps: float | None) -> dict[str, torch.nn.Module]:
    """Fresh models, each norm's eps as its config's default unless ``eps`` is given."""
    import transformers

    llama_eps = {} if eps is None else {"rms_norm_eps": eps}
    gpt2_eps = {} if eps is None else {"layer_norm_epsilon": eps}
    example_eps = {} if eps is None else {"norm_eps": eps}
    return {
        "examples/llama.py": Llama(LlamaConfig(vocab_size=VOCAB, d_model=64, n_layers=4,
                                               n_heads=4, max_seq_len=64, **example_eps)),
        "HF Llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            **llama_eps)),
        "HF GPT-2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0, **gpt2_eps)),
    }


def _eps_of(model: torch.nn.Module) -> float:
    config = getattr(model, "config", None)
    for key in ("rms_norm_eps", "layer_norm_epsilon", "norm_eps"):
        if hasattr(config, key):
            return float(getattr(config, key))
    raise KeyError("no eps in the config")


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[attr-defined]


def _import_error(model: torch.nn.Module, emb_std: float) -> float:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("embed", "wte", "wpe")):
                p.normal_(std=emb_std)
    original = copy.deepcopy(model).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umup_fx.transform(model, (ids,), pretrained=True)
    model.eval()
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = _logits(original(ids)), _logits(model(ids))
    return ((got - want).abs().max() / want.abs().max()).item()


def main() -> None:
    rows = {}
    for label, emb_std, eps in (("std 0.02", 0.02, None), ("std 1", 1.0, None),
                                ("std 0.02, eps 0", 0.02, 0.0)):
        torch.manual_seed(0)
        for name, model in _models(eps).items():
            rows.setdefault(name, {"eps": _eps_of(model)})[label] = _import_error(model, emb_std)
            print(name, label, f"{rows[name][label]:.1e}", flush=True)
    lines = [
        f"Measured on {machine()} by `{command()}`: logits of `transform(..., "
        "pretrained=True)` against the original model's (fp32, 4 layers, d 64, batch 3, "
        "sequence 24, max |difference| / max |logit|), embeddings drawn at the std shown.",
        "",
        "| model | norm eps | embeddings std 0.02 | std 1 | std 0.02, every eps 0 |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['eps']:.0e} | {r['std 0.02']:.1e} | {r['std 1']:.1e} "
                     f"| {r['std 0.02, eps 0']:.1e} |")
    write_section("pretrained-eps", "\n".join(lines), DEPLOY)


if __name__ == "__main__":
    main()
