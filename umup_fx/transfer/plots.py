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
