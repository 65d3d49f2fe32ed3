"""Time and peak memory of `python -m umup_fx export` on a ~1B-parameter u-muP checkpoint.

Makes a u-muP DCP checkpoint of examples/llama.py at ~1.06B parameters (d_model 2048, 18
layers, vocab 32000; fp32, 4.2 GB on disk) in one process, then converts it with the CLI
in a fresh process and reads that process's peak RSS; a third process that only builds
and transforms the model on meta gives the baseline. Writes docs/deploy.md's
"export-checkpoint" section.

    python benchmarks/export_checkpoint.py [--dir /tmp/umup_export_bench]   # ~3-6 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # examples/; umup_fx as installed

from benchmarks._doc import command, machine, write_section  # noqa: E402

CFG = {"vocab_size": 32000, "d_model": 2048, "n_layers": 18, "n_heads": 16, "max_seq_len": 256}
INPUT = "long:1x64:32000"

MAKE = """
import sys, torch, warnings
warnings.simplefilter("ignore")
import torch.distributed.checkpoint as dcp
import umup_fx
from examples.llama import Llama, LlamaConfig
cfg = LlamaConfig(**{cfg})
with torch.device("meta"):
    model = Llama(cfg)
umup_fx.transform(model, (torch.zeros(1, 64, dtype=torch.long, device="meta"),))
model.to_empty(device="cpu")
umup_fx.init_(model, torch.Generator().manual_seed(0))
print(sum(p.numel() for p in model.parameters()),
      max(p.numel() * p.element_size() for p in model.parameters()))
dcp.save(model.state_dict(), checkpoint_id=sys.argv[1])
"""

BASELINE = """
import torch, warnings
warnings.simplefilter("ignore")
import umup_fx
from examples.llama import Llama, LlamaConfig
with torch.device("meta"):
    model = Llama(LlamaConfig(**{cfg}))
    umup_fx.transform(model, (torch.zeros(1, 64, dtype=torch.long),))
"""


def _child(args: list[str]) -> tuple[float, float, str]:
    """Run a fresh Python process; (seconds, its peak RSS in GiB from /usr/bin/time, stdout)."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, *args],
                         capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return took, int(run.stderr.strip().splitlines()[-1]) / 2**20, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/umup_export_bench")
    where = Path(parser.parse_args().dir)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    cfg = repr(CFG)
    base_s, base_gib, _ = _child(["-c", BASELINE.format(cfg=cfg)])
    argv = [f"--arg={k}={v}" for k, v in CFG.items()]
    make_s, make_gib, made = _child(["-c", MAKE.format(cfg=cfg), str(where / "dcp")])
    n_params, largest = map(int, made.split())
    export_s, export_gib, _ = _child(
        ["-m", "umup_fx", "export", "examples.llama:Llama", *argv, "--input", INPUT,
         "--checkpoint", str(where / "dcp"), "--out", str(where / "plain")])
    index = json.loads((where / "plain" / "model.safetensors.index.json").read_text())
    gib = index["metadata"]["total_size"] / 2**30
    rows = [
        "| step | wall s | peak RSS GiB |", "|---|---|---|",
        f"| build + transform on meta only (baseline process) | {base_s:.1f} | {base_gib:.2f} |",
        f"| make the u-muP DCP checkpoint (init + save) | {make_s:.1f} | {make_gib:.2f} |",
        f"| `python -m umup_fx export` (meta build, transform, convert) | {export_s:.1f} | "
        f"{export_gib:.2f} |",
    ]
    body = (f"Measured on {machine()} by `{command()}`: examples/llama.py at "
            f"{n_params / 1e9:.2f}B parameters ({CFG}), fp32, {gib:.2f} GiB written as "
            f"{len(index['weight_map'])} safetensors shards; largest tensor "
            f"{largest / 2**30:.3f} GiB. Export's peak beyond the baseline process: "
            f"{export_gib - base_gib:.2f} GiB.\n\n" + "\n".join(rows))
    write_section("export-checkpoint", body, ROOT / "docs" / "deploy.md")
    shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
