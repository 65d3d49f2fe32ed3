"""What ``save_pretrained`` of a transformed HF model costs: writes docs/deploy.md's table.

Per model (HF Llama and GPT-2, fp32 and bf16, trained two u-muP AdamW steps): seconds
to write the folder (transformed: plain model + corrections) against the plain model's
own ``save_pretrained``, the corrections' bytes against the weights', the share of
elements whose ``plain / factor`` needs a last-bit correction, the plain class's logits
against the transformed model's, and whether the folder loads back bit for bit.

    python benchmarks/save_pretrained.py          # ~1-2 minutes on a 2-core CPU
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    if kind == "Llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, use_cache=False))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=8192, n_embd=256, n_layer=4, n_head=8, n_positions=256, use_cache=False))


def _transformed(kind: str, dtype: torch.dtype, seed: int = 0, **options) -> torch.nn.Module:
    ids = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = umup_fx.transform(_model(kind, seed).to(dtype), (),
                                  {"input_ids": ids, "labels": ids}, **options)
    return model


def _seconds(save: object) -> float:
    """The fastest of three saves (the machine is shared: the others wait on it)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        save()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def _row(kind: str, dtype: torch.dtype) -> str:
    import transformers
    from safetensors.torch import load_file

    model = _transformed(kind, dtype)
    opt = umup_fx.AdamW(model, lr=0.05)
    for step in range(2):
        ids = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(step + 1))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain = umup_fx.export(model)
        t_folded = _seconds(lambda: model.save_pretrained(a))
        t_plain = _seconds(lambda: plain.save_pretrained(b))
        state = load_file(str(Path(a) / "model.safetensors"))
        extra = sum(v.numel() * v.element_size() for k, v in state.items()
                    if k.startswith("_umup_fx.") or k == "_extra_state")
        weights = sum(v.numel() * v.element_size() for k, v in state.items()
                      if not (k.startswith("_umup_fx.") or k == "_extra_state"))
        folded = sum(state[k].numel() for k in state if k in dict(model.named_parameters()))
        fixed = state["_umup_fx.delta"].ne(0).sum().item()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=dtype).eval()
        ids = torch.randint(0, 8192, (3, 48), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = loaded(input_ids=ids).logits.float()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        twin = _transformed(kind, dtype, seed=5, reinit=False)
        twin.load_state_dict(state)
        exact = all(torch.equal(x, y) for x, y in zip(model.state_dict().values(),
                                                      twin.state_dict().values(), strict=True))
    return (f"| {kind} | {str(dtype).removeprefix('torch.')} | {weights / 2**20:.1f} | "
            f"{extra / 2**20:.2f} ({extra / weights:.1%}) | {fixed / folded:.1%} | "
            f"{t_folded:.2f} | {t_plain:.2f} | {rel:.1e} | {'yes' if exact else 'NO'} |")


def main() -> None:
    rows = [_row(kind, dtype) for kind in ("Llama", "GPT-2")
            for dtype in (torch.float32, torch.bfloat16)]
    body = (f"Measured on {machine()} by `{command()}`: HF models of width 256, 4 layers, "
            "vocab 8192, two u-muP AdamW steps. Corrections: the settings and last-bit "
            "corrections beside the weights; elements corrected: their share of the "
            "parameters' elements; plain rel.: max |difference| / max |logit| of the plain "
            "class's from_pretrained against the transformed model (batch 3, sequence 48); "
            "exact back: the folder loaded into a model transformed the same way equals the "
            "saved state bit for bit. Seconds: the fastest of three saves.\n\n"
            "| model | dtype | weights MiB | corrections MiB | elements corrected | "
            "save_pretrained s (transformed) | save_pretrained s (plain) | plain rel. | "
            "exact back |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    write_section("save-pretrained", body, ROOT / "docs" / "deploy.md")
    print(body)


if __name__ == "__main__":
    main()
