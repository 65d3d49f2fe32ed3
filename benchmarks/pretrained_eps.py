"""How exact ``transform(..., pretrained=True)`` and its round trip through ``export`` are.

Import divides each weight by the factor export would multiply it by, so the transformed
model's activations are the checkpoint's times constants; each norm multiplies its input
by its constant back (a buffer of its own), so its ``eps`` acts as the checkpoint's
(docs/deploy.md). This script measures the imported model's logits against the original
model run by PyTorch (max |difference| / max |logit|, fp32, batch 3, sequence 24) for
checkpoints whose residual stream is small (embeddings of std 0.02, a fresh Hugging Face
init, where eps is felt) or of RMS about 1 (std 1), the same small-stream model with every
norm's eps set to 0 (no eps to get wrong: the floor of fp32 rounding), the plain model
``export`` gives back from the std 0.02 import, and, for comparison, the std 0.02 import
with the norms' factors left out (``passes/scale_norms.scale_imported_norms`` patched to
do nothing: what the factors fix). Writes docs/deploy.md's section.

    python benchmarks/pretrained_eps.py          # ~1 minute on a 2-core CPU
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # examples/; umup_fx as installed

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


def _import_error(model: torch.nn.Module, emb_std: float) -> tuple[float, float]:
    """(imported, its export) logits against the original's, relative."""
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
        back = _logits(umup_fx.export(model)(ids))
    scale = want.abs().max()
    return ((got - want).abs().max() / scale).item(), ((back - want).abs().max() / scale).item()


def main() -> None:
    rows = {}
    without = mock.patch("umup_fx.passes.scale_norms.scale_imported_norms", lambda gm: None)
    for label, emb_std, eps in (("std 0.02", 0.02, None), ("std 1", 1.0, None),
                                ("std 0.02, eps 0", 0.02, 0.0), ("no factors", 0.02, None)):
        torch.manual_seed(0)
        for name, model in _models(eps).items():
            row = rows.setdefault(name, {"eps": _eps_of(model)})
            if label == "no factors":
                with without:
                    row[label], row[label + " export"] = _import_error(model, emb_std)
            else:
                row[label], row[label + " export"] = _import_error(model, emb_std)
            print(name, label, f"{row[label]:.1e} (export {row[label + ' export']:.1e})",
                  flush=True)
    lines = [
        f"Measured on {machine()} by `{command()}`: logits of `transform(..., "
        "pretrained=True)` against the original model's (fp32, 4 layers, d 64, batch 3, "
        "sequence 24, max |difference| / max |logit|), embeddings drawn at the std shown, "
        "then `umup_fx.export` of the std 0.02 import against the original, and the std "
        "0.02 import without the norms' input factors (for comparison: the eps error "
        "they remove).",
        "",
        "| model | norm eps | embeddings std 0.02 | std 1 | std 0.02, every eps 0 "
        "| export of the std 0.02 import | std 0.02 without the norm factors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['eps']:.0e} | {r['std 0.02']:.1e} | {r['std 1']:.1e} "
                     f"| {r['std 0.02, eps 0']:.1e} | {r['std 0.02 export']:.1e} "
                     f"| {r['no factors']:.1e} |")
    write_section("pretrained-eps", "\n".join(lines), DEPLOY)


if __name__ == "__main__":
    main()
