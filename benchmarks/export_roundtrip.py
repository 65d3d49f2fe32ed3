"""Export round trip on the example models and HF families: writes docs/deploy.md's table.

For each model: transform (u-muP, unit init), take two AdamW steps, then
``umup_fx.export`` and compare the exported plain model's logits with the transformed
model's at three sequence lengths (batch 3, not the transform's 2), fp32; also how long
the export took. A model export refuses is listed with the start of its error.

    python benchmarks/export_roundtrip.py          # ~2-4 minutes on a 2-core CPU
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import command, machine, write_section  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from tests.families import FAMILIES, Case  # noqa: E402

SEQS = (8, 24, 48)
HF = {  # what each family stands for
    "Llama": "dense, GQA, RoPE",
    "GPT-2": "tied embeddings, biases, LayerNorm",
    "Gemma": "constants: sqrt(d) embedding scale, 1 + w gains",
    "Mixtral (MoE)": "MoE experts and router",
    "BERT": "encoder (post-norm)",
    "T5": "encoder-decoder",
}


def _examples() -> dict[str, Case]:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    llama = Llama(LlamaConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64))
    gpt = GPT(GPTConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, block_size=64))
    return {"examples/llama.py": Case(llama, (ids,), {}, "lm"),
            "examples/gpt.py": Case(gpt, (ids,), {}, "lm")}


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]  # type: ignore[index]


def _at(tree: object, seq: int) -> object:
    gen = torch.Generator().manual_seed(seq)

    def resize(t: object) -> object:
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2:
            return torch.randint(0, int(t.max()) + 1, (3, seq), generator=gen)
        return t

    return torch.utils._pytree.tree_map(resize, tree)


def _train(model: torch.nn.Module, case: Case) -> None:
    opt = umup_fx.AdamW(model, lr=0.05)
    for _ in range(2):
        out = model(*case.args, **case.kwargs)
        loss = getattr(out, "loss", None)
        if loss is None:
            loss = _logits(out).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def run(name: str, case: Case) -> tuple[str, ...]:
    torch.manual_seed(0)
    model = case.model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            umup_fx.transform(model, case.args, case.kwargs)
        _train(model, case)
        model.eval()
        start = time.perf_counter()
        plain = umup_fx.export(model)
        took = time.perf_counter() - start
    except umup_fx.UmupError as exc:
        reason = str(exc).split(". ")[0].replace("|", "/")[:160]
        return ("refused: " + reason,) + ("",) * len(SEQS) + ("",)
    errors = []
    for seq in SEQS:
        args, kwargs = _at((case.args, case.kwargs), seq)
        with torch.no_grad():
            want, got = _logits(model(*args, **kwargs)), _logits(plain(*args, **kwargs))
        errors.append(f"{((got - want).abs().max() / want.abs().max()).item():.1e}")
    plain_class = not isinstance(plain, umup_fx.UmupModule)
    return ("exact" if all(float(e) < 1e-4 for e in errors) and plain_class else "differs",
            *errors, f"{took:.2f}")


def main() -> None:
    rows = []
    cases = {**_examples(), **{n: FAMILIES[n]() for n in HF}}
    for name, case in cases.items():
        result = run(name, case)
        what = HF.get(name, "hand-written example")
        rows.append(f"| {name} | {what} | " + " | ".join(result) + " |")
        print(rows[-1], flush=True)
    head = ("| model | stands for | export | " + " | ".join(f"rel. err. S={s}" for s in SEQS)
            + " | export s |\n|---|---|---|" + "---|" * len(SEQS) + "---|")
    body = (f"Measured on {machine()} by `{command()}`: logits of the exported plain model "
            "against the transformed model's (fp32, batch 3, max |difference| / max |logit|), "
            "after two u-muP AdamW steps.\n\n" + head + "\n" + "\n".join(rows))
    write_section("export-roundtrip", body, ROOT / "docs" / "deploy.md")


if __name__ == "__main__":
    main()
