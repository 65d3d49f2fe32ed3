"""The quick-start demo: analyse the example Llama and print its u-muP plan.

    python examples/demo.py [--d-model 128] [--layers 4]

Prints, per parameter, the role, fan-in / fan-out (symbolic and numeric), the LR
factor u-muP gives it and whether its matmul runs in FP8, plus the residual branches.
(Rewriting and training arrive with `umup_fx.transform`.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import umup_fx  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Llama(LlamaConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads))
    idx = torch.randint(0, 256, (2, args.seq))
    print(umup_fx.analyze(model, (idx, idx)))


if __name__ == "__main__":
    main()
