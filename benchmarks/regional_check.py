"""Regional capture equals one-graph capture on real architectures; table into docs/.

    python benchmarks/regional_check.py            # check, print, update docs/benchmarks.md
    python benchmarks/regional_check.py --no-write

For each tiny Hugging Face config (4 layers, width 64, vocab 128, seeded): transform it
once as usual (a 2-block prefix captured, blocks kept as modules) and once with block
detection off (the whole model as one graph), with the same seed for unit init; then
compare the loss and every parameter gradient of one forward + backward.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # examples/; umup_fx as installed

import umup_fx  # noqa: E402
from benchmarks._doc import machine, write_section  # noqa: E402
from umup_fx.capture import blocks as discovery  # noqa: E402

VOCAB = 128


def _configs() -> dict:
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=64, use_cache=False)
    gqa = dict(common, num_key_value_heads=2)
    return {
        "Llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**gqa)),
        "Mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**gqa)),
        "Qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**gqa)),
        "Qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **gqa)),
        "Phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, **gqa)),
        "OLMo": lambda: T.OlmoForCausalLM(T.OlmoConfig(pad_token_id=0, **gqa)),
        "OLMo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(pad_token_id=0, **gqa)),
        "GPT-NeoX": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common)),
        "StableLM": lambda: T.StableLmForCausalLM(T.StableLmConfig(**gqa)),
        "GPT-2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4,
                                                        n_head=4, n_positions=64,
                                                        use_cache=False)),
    }


def _run(make, one_graph: bool) -> tuple[float, dict, float, int]:
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, VOCAB, (2, 16))
    find = discovery.find_blocks
    if one_graph:
        discovery.find_blocks = lambda m: []
    try:
        torch.manual_seed(1)
        start = time.perf_counter()
        umup_fx.transform(model, (ids,), {"labels": ids})
        seconds = time.perf_counter() - start
    finally:
        discovery.find_blocks = find
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    blocks = sum(isinstance(m, umup_fx.UmupBlock) for m in model.modules())
    return out.loss.item(), grads, seconds, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = ["| model | blocks kept | loss (regional) | loss (one graph) | max grad diff |",
            "|---|---|---|---|---|"]
    for name, make in _configs().items():
        try:
            loss, grads, _, blocks = _run(make, one_graph=False)
            flat_loss, flat_grads, _, _ = _run(make, one_graph=True)
        except Exception as exc:  # noqa: BLE001 - a row that says what failed
            rows.append(f"| {name} | error: {type(exc).__name__} | | | |")
            continue
        same_keys = grads.keys() == flat_grads.keys()
        diff = max((grads[k] - flat_grads[k]).abs().max().item() for k in grads) if same_keys else float("nan")
        rows.append(f"| {name} | {blocks} of 4 | {loss:.6f} | {flat_loss:.6f} | {diff:.1e} |")
    text = "\n".join(rows)
    print(text)
    if not args.no_write:
        write_section("regional_check", f"{machine()}; `python benchmarks/regional_check.py`\n\n{text}")


if __name__ == "__main__":
    main()
