"""Command line: python -m umup_fx inspect MODULE:FACTORY [--arg NAME=VALUE] [--input SPEC].

FACTORY is a callable (or class) in an importable module. It returns either a model
(then give --input once per positional input) or a tuple (model, example_inputs) or
(model, example_inputs, example_kwargs). A factory whose first parameter is a config
dataclass (Llama(config: LlamaConfig)) gets one built from the --arg values (its
defaults when there are none). An input SPEC is dtype:shape[:high]: long:2x64:256 is
a [2, 64] tensor of random ints in [0, 256); float:8x32 a standard-normal [8, 32]
tensor.

python -m umup_fx check MODULE:FACTORY [--arg ...] [--input ...] [--plot PNG] transforms
the model and runs umup_fx.check: per weight op the RMS of its output, output gradient
and weight gradient at init, values outside the unit band flagged with their source
line (exit status 1 when any is); --plot draws the scales per layer (needs matplotlib).

python -m umup_fx coord-check MODULE:FACTORY --width-arg NAME --widths W... [--steps N]
[--parametrization P...] [--lr ETA] [--data FILE] --json OUT [--plot PNG] runs muP's
coordinate check (umup_fx.transfer.coord_check): each weight op's output RMS against width.

python -m umup_fx search MODULE:FACTORY --width-arg NAME --proxy-width W --target-width W
--lrs ETA... --steps N [--mults M...] [--fields F...] --json OUT tunes eta, then each
u-muP multiplier alone, on the proxy, and checks the combination at the target width.

python -m umup_fx export MODULE:FACTORY [--arg ...] [--input ...] --checkpoint DIR --out
DIR turns a u-muP torch.distributed.checkpoint of that model into a plain safetensors
checkpoint (Hugging Face layout: shards + index, and config.json for HF models), one
tensor in memory at a time; the model is built on meta and transformed as the checkpoint
says (its reference sizes, whatever --input's are; its hparams and options), or the
checkpoint is refused (docs/deploy.md).

python -m umup_fx sweep MODULE:FACTORY --width-arg NAME --widths W... --steps N
[--lrs ETA...] [--parametrization P...] [--seeds S...] [--data FILE] --json OUT
[--plot PNG] sweeps the learning rate across widths (umup_fx.sweep): FACTORY(NAME=width)
builds each model; each parametrization gets a grid around its own default eta unless
--lrs gives one; a rerun with the same --json skips finished runs.

examples:
  python -m umup_fx inspect examples.llama:Llama --input long:2x64:256
  python -m umup_fx inspect examples.llama:Llama --arg d_model=256 --input long:2x64:256
  python -m umup_fx inspect examples.mlp:MLPClassifier --input float:8x32
  python -m umup_fx sweep examples.llama:Llama --width-arg d_model --widths 32 64
      --steps 60 --parametrization umup sp --json sweep.json --plot sweep.png

Every mistake is one line on stderr and exit status 2; UMUP_FX_DEBUG=1 shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import sys
from typing import Any

import torch

from umup_fx._version import __version__
from umup_fx.errors import CaptureError, UmupError
from umup_fx.pipeline import analyze

_DTYPES = {"long": torch.long, "int": torch.long, "float": torch.float32, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


def parse_input(spec: str, generator: torch.Generator) -> torch.Tensor:
    """``long:2x64:256`` -> random ints; ``float:8x32`` -> standard normal."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in _DTYPES:
        raise UsageError(
            f"bad --input {spec!r}: expected dtype:shape[:high] with dtype one of "
            f"{', '.join(_DTYPES)}, e.g. long:2x64:256"
        )
    try:
        shape = [int(s) for s in parts[1].split("x")]
        high = int(parts[2]) if len(parts) == 3 else 2
    except ValueError:
        raise UsageError(
            f"bad --input {spec!r}: the shape is sizes joined by x (2x64) and high an int"
        ) from None
    dtype = _DTYPES[parts[0]]
    if dtype == torch.long:
        return torch.randint(0, high, shape, generator=generator)
    return torch.randn(shape, generator=generator, dtype=dtype)


def _load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not attr or not module_name:
        raise UsageError(f"bad target {target!r}: expected MODULE:FACTORY, e.g. examples.llama:Llama")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # Last, not first: the directory's own copy of a package (a clone's umup_fx/)
        # must not shadow the installed one for this process and the ones it spawns.
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"cannot import {module_name!r} ({exc}); run from the directory that holds it or "
            "install it"
        ) from None
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UsageError(
            f"{module_name} has no {attr!r}; callables there: {', '.join(public) or 'none'}"
        )
    return getattr(module, attr)


def _config_type(factory: Any) -> type | None:
    """The dataclass type of the factory's first parameter, if it has one."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params or params[0].annotation is inspect.Parameter.empty:
        return None
    ann = params[0].annotation
    hints = getattr(getattr(factory, "__init__", factory), "__globals__", {})
    cfg_type = hints.get(ann) if isinstance(ann, str) else ann
    return cfg_type if isinstance(cfg_type, type) and hasattr(cfg_type, "__dataclass_fields__") else None


def _build(factory: Any, kwargs: dict[str, Any], flag: str = "--arg") -> Any:
    """``factory(**kwargs)`` (through its config dataclass); ``flag`` names the option
    the keywords came from, for the one-line error when they do not fit."""
    cfg_type = _config_type(factory)
    target = cfg_type or factory
    try:
        inspect.signature(target).bind(**kwargs)
    except TypeError as exc:
        try:
            names = ", ".join(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            names = "?"
        raise UsageError(f"{flag} does not fit {target.__name__}({names}): {exc}") from None
    try:
        return factory(cfg_type(**kwargs)) if cfg_type else factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory; one line, not a traceback
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UsageError(
            f"{getattr(factory, '__name__', 'the factory')}({given}) raised "
            f"{type(exc).__name__}: {_one_line(exc)}; check the {flag} values"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (UsageError, UmupError) as exc:
        if os.environ.get("UMUP_FX_DEBUG"):
            raise
        print(f"umup_fx: {_one_line(exc)}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m umup_fx",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"umup_fx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the u-muP plan of a model (nothing is changed)")
    p.add_argument("target", help="MODULE:FACTORY, e.g. examples.llama:Llama")
    p.add_argument("--input", action="append", default=[], help="dtype:shape[:high], once per input")
    p.add_argument("--arg", action="append", default=[], help="NAME=VALUE passed to the factory")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("check", help="transform, then flag ops off unit scale at init")
    p.add_argument("target", help="MODULE:FACTORY, e.g. examples.llama:Llama")
    p.add_argument("--input", action="append", default=[], help="dtype:shape[:high], once per input")
    p.add_argument("--arg", action="append", default=[], help="NAME=VALUE passed to the factory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="scales per layer, forward and backward (needs matplotlib)")
    p = sub.add_parser("sweep", help="sweep the learning rate across widths")
    _width_tool_args(p)
    p.add_argument("--widths", type=int, nargs="+", required=True)
    p.add_argument("--lrs", type=float, nargs="+",
                   help="one eta grid for all (default: 5 points a factor 2 apart around each "
                        "parametrization's default eta, 1 for umup, 2^-9 else)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--parametrization", nargs="+", default=["umup"],
                   choices=["umup", "mup", "sp", "sp_emb_lr"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="two or more, so each eta* is judged against the seeds' spread")
    p.add_argument("--json", required=True, help="results file (resumed if it exists)")
    p.add_argument("--plot", help="loss-vs-lr figure (needs matplotlib: the plot extra)")
    p = sub.add_parser("coord-check", help="muP's coordinate check across widths")
    _width_tool_args(p)
    p.add_argument("--widths", type=int, nargs="+", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--parametrization", nargs="+", default=["umup"],
                   choices=["umup", "mup", "sp", "sp_emb_lr"])
    p.add_argument("--lr", type=float, help="one eta for all (default: 1 for umup, 2^-9 else)")
    p.add_argument("--json", required=True, help="records file")
    p.add_argument("--plot", help="RMS-vs-width figure (needs matplotlib)")
    p = sub.add_parser("search", help="independent search of eta and the u-muP multipliers")
    _width_tool_args(p)
    p.add_argument("--proxy-width", type=int, required=True)
    p.add_argument("--target-width", type=int, required=True)
    p.add_argument("--lrs", type=float, nargs="+", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--mults", type=float, nargs="+", default=[0.25, 0.5, 2.0, 4.0])
    p.add_argument("--fields", nargs="+", help="multipliers to tune (default: all six)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--json", required=True, help="results file (resumed if it exists)")
    p = sub.add_parser("export", help="a u-muP DCP checkpoint to a plain safetensors one")
    p.add_argument("target", help="MODULE:FACTORY of the model the checkpoint was trained as")
    p.add_argument("--input", action="append", default=[], help="dtype:shape[:high], once per input")
    p.add_argument("--arg", action="append", default=[], help="NAME=VALUE passed to the factory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", required=True, help="torch.distributed.checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (safetensors shards + index)")
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args)
    tools = {"search": _search, "sweep": _sweep, "coord-check": _coord_check}
    if args.command in tools:
        try:
            return tools[args.command](args)
        except CaptureError as exc:
            raise UsageError(
                f"{args.command} trains {args.target} on byte tokens (model(idx) or "
                "model(idx, targets), both long [batch, seq] in [0, 256)), which it cannot "
                f"take: {_one_line(exc)}"
            ) from None

    model, example_inputs, example_kwargs = _model_and_inputs(args)
    if args.command == "check":
        return _check(args, model, example_inputs, example_kwargs)
    print(analyze(model, example_inputs, example_kwargs))
    return 0


def _model_and_inputs(args: argparse.Namespace) -> tuple[Any, tuple, dict[str, Any]]:
    """The model and one call's inputs from FACTORY, --arg and --input."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    built = _build(_load(args.target), _factory_kwargs(args.arg))
    example_kwargs: dict[str, Any] = {}
    if isinstance(built, tuple):
        model, example_inputs, *rest = built
        example_kwargs = rest[0] if rest else {}
    else:
        model = built
        if not args.input:
            raise UsageError(
                "the factory returned a model: give its inputs with --input dtype:shape[:high]"
            )
        example_inputs = tuple(parse_input(s, generator) for s in args.input)
    return model, example_inputs, example_kwargs


def _export(args: argparse.Namespace) -> int:
    """Build the model on meta (no weights in memory), transform it as it was trained
    (the checkpoint's reference sizes, hparams and options, whatever --input says), and
    convert the checkpoint tensor by tensor (umup_fx.export_checkpoint)."""
    from umup_fx.export_checkpoint import export_checkpoint, read_settings
    from umup_fx.transform import transform

    saved = read_settings(args.checkpoint)
    with torch.device("meta"):
        model, inputs, kwargs = _model_and_inputs(args)
    options: dict[str, Any] = {"check": False}
    if saved is None:
        print("umup_fx: the checkpoint carries no transform settings (saved by an umup_fx "
              "before they travelled with it): its reference sizes are taken from --input "
              "and its hparams and options are the defaults", file=sys.stderr)
    else:
        inputs, kwargs = _as_trained(saved, model, inputs, kwargs)
        options.update(hparams=saved["hparams"], trainable_norms=saved["trainable_norms"],
                       roles=saved["roles"])
    transform(model, inputs, kwargs, **options)
    index = export_checkpoint(model, args.checkpoint, args.out)
    print(f"wrote {len(index['weight_map'])} tensors "
          f"({index['metadata']['total_size'] / 2**30:.2f} GiB) to {args.out}")
    return 0


def _as_trained(saved: dict[str, Any], model: Any, inputs: tuple,
                kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The example call at the checkpoint's reference sizes (rules §3), or a refusal."""
    from umup_fx.capture.reference import at_reference_sizes, reference_shapes
    from umup_fx.errors import CheckpointError
    from umup_fx.runtime.saved_state import reference_inputs_note

    if saved["parametrization"] != "umup" or saved["pretrained"]:
        how = ("transform(..., pretrained=True): its norms' factors come from the original "
               "weights, which a model on meta does not hold" if saved["pretrained"] else
               f"parametrization={saved['parametrization']!r}")
        raise CheckpointError(
            f"the checkpoint comes from a model transformed with {how}; export it in "
            "Python: transform the model as it was, load this checkpoint into it and call "
            "umup_fx.export (docs/deploy.md).")
    reference = {k: tuple(v) for k, v in saved["reference"].items()}
    resized = at_reference_sizes(model.forward, reference, inputs, kwargs)
    if resized is None:
        raise CheckpointError(
            f"the checkpoint was trained with example inputs {reference_inputs_note(reference)}"
            ", and the --input / factory call shares none of them (or maps one size to two): "
            "give --input of that call (these sizes).")
    given = reference_shapes(model.forward, tuple(inputs), dict(kwargs))
    if any(given.get(k, v) != v for k, v in reference.items()):
        print(f"umup_fx: exporting at the checkpoint's reference sizes "
              f"({reference_inputs_note(reference)}), not --input's", file=sys.stderr)
    return resized


def _check(args: argparse.Namespace, model: Any, inputs: tuple, kwargs: dict[str, Any]) -> int:
    from umup_fx.diagnose.unit_check import check
    from umup_fx.transform import transform

    model = transform(model, inputs, kwargs, check=False)
    report = check(model, inputs, kwargs)
    print(report)
    if args.plot:
        from umup_fx.transfer.plots import check_figure

        print(f"wrote {check_figure(report, args.plot)}")
    return 0 if report.ok else 1


def _width_tool_args(p: argparse.ArgumentParser) -> None:
    """The arguments sweep, coord-check and search share."""
    p.add_argument("target", help="MODULE:FACTORY, called as FACTORY(NAME=width)")
    p.add_argument("--width-arg", required=True, help="the factory's width argument NAME")
    p.add_argument("--arg", action="append", default=[],
                   help="NAME=VALUE passed to the factory at every width (e.g. n_layers=2)")
    p.add_argument("--data", help="a text file, read as bytes (default: the stdlib corpus)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)


def _factory_kwargs(items: list[str]) -> dict[str, Any]:
    """``--arg NAME=VALUE`` items; values are Python literals, else strings."""
    kwargs: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            kwargs[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[name] = value
    return kwargs


def _width_factory(target: str, fixed: list[str]) -> Any:
    factory, given = _load(target), _factory_kwargs(fixed)

    def build(**kwargs: Any) -> Any:
        built = _build(factory, {**given, **kwargs}, "--width-arg / --arg")
        return built[0] if isinstance(built, tuple) else built

    return build


def _coord_check(args: argparse.Namespace) -> int:
    from umup_fx.transfer.coord_check import coord_check

    result = coord_check(_width_factory(args.target, args.arg), width_arg=args.width_arg,
                         widths=args.widths, steps=args.steps,
                         parametrizations=args.parametrization, lr=args.lr, data=args.data,
                         json_path=args.json, plot=args.plot, batch=args.batch, seq=args.seq)
    for par, kinds in result["slopes"].items():
        worst = max(kinds.items(), key=lambda kv: abs(kv[1]))
        print(f"{par}: log-log slope of output RMS against width, largest {worst[1]:+.2f} "
              f"({worst[0]}); all: " + ", ".join(f"{k} {v:+.2f}" for k, v in sorted(kinds.items())))
    return 0


def _search(args: argparse.Namespace) -> int:
    from umup_fx.transfer.search import FIELDS, search

    result = search(_width_factory(args.target, args.arg), width_arg=args.width_arg,
                    proxy_width=args.proxy_width, target_width=args.target_width,
                    lrs=args.lrs, steps=args.steps, multipliers=args.mults,
                    fields=args.fields or FIELDS, seeds=args.seeds, data=args.data,
                    json_path=args.json, batch=args.batch, seq=args.seq)
    target = result["target"]
    print(f"eta* {result['lr']:g}; multipliers {result['best'] or 'all 1'}; at width "
          f"{target['width']}: {target['default']:.3f} with defaults, {target['combined']:.3f} "
          f"combined (gain {target['gain']:+.3f})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from umup_fx.transfer.sweep import sweep, verdict

    build = _width_factory(args.target, args.arg)

    result = sweep(build, width_arg=args.width_arg, widths=args.widths, lrs=args.lrs,
                   steps=args.steps, parametrizations=args.parametrization, seeds=args.seeds,
                   data=args.data, json_path=args.json, plot=args.plot, batch=args.batch,
                   seq=args.seq)
    for par in result["best"]:
        print(verdict(result, par))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
