"""The GPU suite's numerics script at toy size on the CPU, so it is known to run before
a GPU session spends its time on it (benchmarks/gpu_suite.sh, docs/benchmarks.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fp8_numerics_smoke_runs_on_cpu() -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/fp8_numerics.py", "--device", "cpu", "--smoke", "--no-write"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "failed" not in out.stdout, out.stdout
    assert "| u-μP bf16 |" in out.stdout and "| u-μP FP8 |" in out.stdout
    # Simulated FP8 training tracks bf16 closely even for a few steps.
    assert out.stdout.count("(within 1%)") == 2, out.stdout


def test_gpu_suite_script_parses() -> None:
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_suite.sh"], cwd=ROOT).returncode == 0


def test_gpu_suite_without_cuda_says_so_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("the message is for machines without a CUDA GPU")
    out = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "numerics"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("gpu_suite.sh: no CUDA GPU on this machine")
