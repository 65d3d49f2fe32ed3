"""Transform time vs depth (regional capture), written into docs/benchmarks.md.

    python benchmarks/transform_time.py            # measure, print, update the doc
    python benchmarks/transform_time.py --no-write # measure and print only

Each model is built fresh and transformed once per round in this process (after one
untimed warm-up transform that pays for imports and first-use caches); the figure is
the median over rounds. Rows: Hugging Face ``LlamaForCausalLM`` (d_model 128) at 8,
16, 32 and 96 layers, the example Llama at 32 layers, and a Llama-7B configuration
(d_model 4096, 32 layers, vocab 32000) built on the ``meta`` device, whose transform
never touches a weight.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import machine, write_section  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402


def _hf_llama(layers: int, hidden: int = 128, vocab: int = 256, inter: int = 256,
              heads: int = 4, kv: int = 2, device: str = "cpu") -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=4096, use_cache=False,
    )
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg)


def _time(build, inputs, rounds: int) -> tuple[float, float, float]:
    times = []
    for _ in range(rounds):
        model = build()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            umup_fx.transform(model, *inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    ids = torch.randint(0, 256, (2, 64))
    hf_inputs = ((ids,), {"labels": ids})
    _time(lambda: _hf_llama(2), hf_inputs, 1)  # warm-up: imports, first-use caches
    rows = []
    for layers in (8, 16, 32, 96):
        t = _time(lambda layers=layers: _hf_llama(layers), hf_inputs, args.rounds)
        rows.append((f"HF LlamaForCausalLM, d_model 128, {layers} layers", t))
    rows.append((
        "example Llama, d_model 256, 32 layers",
        _time(lambda: Llama(LlamaConfig(d_model=256, n_layers=32)), ((ids, ids),), args.rounds),
    ))
    meta_ids = torch.randint(0, 32000, (1, 2048)).to("meta")
    rows.append((
        "HF Llama-7B config (d 4096, 32 layers, vocab 32000) on meta",
        _time(
            lambda: _hf_llama(32, hidden=4096, vocab=32000, inter=11008, heads=32, kv=32,
                              device="meta"),
            ((meta_ids,), {"labels": meta_ids}),
            args.rounds,
        ),
    ))
    by_depth = {r[0]: r[1][0] for r in rows}
    ratio = (by_depth["HF LlamaForCausalLM, d_model 128, 32 layers"]
             / by_depth["HF LlamaForCausalLM, d_model 128, 8 layers"])
    lines = [
        "| model | transform time (median) | min - max |",
        "|---|---|---|",
        *[f"| {name} | {t[0]:.2f} s | {t[1]:.2f} - {t[2]:.2f} s |" for name, t in rows],
        "",
        f"32 layers / 8 layers (HF Llama): {ratio:.2f}x.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(
            "transform_time",
            f"{machine()}; {args.rounds} rounds; "
            "`python benchmarks/transform_time.py`\n\n" + text,
        )


if __name__ == "__main__":
    main()
