"""The few lines every figure of the transfer tools shares (matplotlib is optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from umup_fx.errors import UmupError


def panels(n: int) -> tuple[Any, Any]:
    """A figure with ``n`` panels side by side: (figure, list of axes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UmupError("--plot needs matplotlib: pip install 'umup_fx[plot]'.") from exc
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    return fig, list(axes[0])


def save(fig: Any, path: str | Path, ylabel: str, legend_size: int) -> Path:
    """Label, lay out, write and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.axes[0].set_ylabel(ylabel)
    fig.axes[-1].legend(fontsize=legend_size)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_figure(report: Any, path: str | Path) -> Path:
    """The scales per weight op of a ``umup_fx.check`` report, forward and backward,
    drawn as the reference library's visualiser does: one row per op in forward order,
    log2 RMS across, the unit band shaded (a readout's and q / k's own bands are in the
    report's lines), flagged values in red."""
    fig, (fwd, bwd) = panels(2)
    fig.set_size_inches(10, 1.5 + 0.22 * len(report.ops))
    rows = list(range(len(report.ops)))[::-1]  # the first op on top
    flagged = {(id(f.op), f.what) for f in report.flags}
    series = ((fwd, "output", "out_rms", "o"), (bwd, "output grad", "grad_rms", "o"),
              (bwd, "weight grad", "weight_grad_rms", "s"))
    for ax, what, attr, marker in series:
        points = [(y, getattr(r, attr), (id(r), what) in flagged) for y, r in zip(rows, report.ops, strict=True)
                  if getattr(r, attr)]
        for bad in (False, True):
            sel = [(y, v) for y, v, b in points if b is bad]
            if sel:
                ax.scatter([v for _, v in sel], [y for y, _ in sel], marker=marker, s=18,
                           color="tab:red" if bad else ("tab:blue" if marker == "o" else "tab:green"),
                           label=f"{what}{' (outside band)' if bad else ''}")
    for ax, title in ((fwd, "forward: op output RMS"), (bwd, "backward: gradient RMS")):
        ax.set_xscale("log", base=2)
        ax.axvspan(*report.band, color="0.9", zorder=0)
        ax.axvline(1.0, color="0.6", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(rows)
        ax.set_yticklabels([])
    fwd.set_yticks(rows)
    fwd.set_yticklabels([(r.weight or r.node)[-40:] + ("" if r.role != "output" else " (readout)")
                         for r in report.ops], fontsize=6)
    return save(fig, path, "", 6)
