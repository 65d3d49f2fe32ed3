"""Command line: ``python -m umup_fx inspect MODULE:FACTORY [--input SPEC ...]``.

FACTORY is a callable (or class) in an importable module. It returns either a model
(then give ``--input`` once per positional input) or a tuple ``(model, example_inputs)``
or ``(model, example_inputs, example_kwargs)``. An input SPEC is
``dtype:shape[:high]``: ``long:2x64:256`` is a [2, 64] tensor of random ints in
[0, 256); ``float:8x32`` a standard-normal [8, 32] tensor.

Examples::

    python -m umup_fx inspect examples.llama:Llama --input long:2x64:256
    python -m umup_fx inspect examples.mlp:MLPClassifier --input float:8x32
    python -m umup_fx inspect examples.llama:Llama --arg d_model=256 --input long:2x64:256
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from typing import Any

import torch

from .errors import UmupError
from .pipeline import analyze

_DTYPES = {"long": torch.long, "int": torch.long, "float": torch.float32, "bf16": torch.bfloat16}


def parse_input(spec: str, generator: torch.Generator) -> torch.Tensor:
    """``long:2x64:256`` -> random ints; ``float:8x32`` -> standard normal."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in _DTYPES:
        raise SystemExit(f"bad --input {spec!r}: expected dtype:shape[:high], dtype in {list(_DTYPES)}")
    shape = [int(s) for s in parts[1].split("x")]
    dtype = _DTYPES[parts[0]]
    if dtype == torch.long:
        high = int(parts[2]) if len(parts) == 3 else 2
        return torch.randint(0, high, shape, generator=generator)
    return torch.randn(shape, generator=generator, dtype=dtype)


def _load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise SystemExit(f"bad target {target!r}: expected MODULE:FACTORY, e.g. examples.llama:Llama")
    sys.path.insert(0, ".")
    return getattr(importlib.import_module(module_name), attr)


def _build(factory: Any, kwargs: dict[str, Any]) -> Any:
    # A config dataclass as first parameter (Llama(LlamaConfig(...))) gets the kwargs.
    params = list(inspect.signature(factory).parameters.values())
    if params and params[0].annotation not in (inspect.Parameter.empty,) and kwargs:
        ann = params[0].annotation
        hints = getattr(factory, "__init__", factory).__globals__
        cfg_type = hints.get(ann) if isinstance(ann, str) else ann
        if isinstance(cfg_type, type) and hasattr(cfg_type, "__dataclass_fields__"):
            return factory(cfg_type(**kwargs))
    return factory(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umup_fx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the u-muP plan of a model (nothing is changed)")
    p.add_argument("target", help="MODULE:FACTORY, e.g. examples.llama:Llama")
    p.add_argument("--input", action="append", default=[], help="dtype:shape[:high], once per input")
    p.add_argument("--arg", action="append", default=[], help="NAME=VALUE passed to the factory")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    factory_kwargs = {}
    for item in args.arg:
        name, _, value = item.partition("=")
        try:
            factory_kwargs[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            factory_kwargs[name] = value
    built = _build(_load(args.target), factory_kwargs)
    example_kwargs: dict[str, Any] = {}
    if isinstance(built, tuple):
        model, example_inputs, *rest = built
        example_kwargs = rest[0] if rest else {}
    else:
        model = built
        if not args.input:
            raise SystemExit("the factory returned a model: give its inputs with --input dtype:shape[:high]")
        example_inputs = tuple(parse_input(s, generator) for s in args.input)
    try:
        print(analyze(model, example_inputs, example_kwargs))
    except UmupError as exc:
        print(f"umup_fx: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
