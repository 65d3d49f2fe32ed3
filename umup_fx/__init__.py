"""umup_fx: u-muP and static-scale FP8 as a compiler pass on unmodified PyTorch models."""

import importlib.util as _importlib_util

if _importlib_util.find_spec("umup_fx.passes") is None:
    # passes/ installs as umup_fx.passes; a bare source tree on sys.path has no such folder.
    raise ImportError(
        f"umup_fx was imported from its source folder {__path__[0]} without an install, so "
        "umup_fx.passes (the repository's passes/) cannot be found: run `pip install -e .` in "
        "that clone, or start Python outside it so the installed umup_fx is imported"
    )

from umup_fx._version import __version__  # noqa: E402
from umup_fx.backend import prepare, register
from umup_fx.capture.trace import StaticSizeWarning
from umup_fx.diagnose.unit_check import CheckReport, ScaleWarning, check
from umup_fx.errors import (
    AlreadyTransformedError,
    AnalysisError,
    CaptureError,
    HParamsError,
    UmupError,
)
from umup_fx.export import ExportError, export
from umup_fx.hparams import HParams
from umup_fx.options import Options
from umup_fx.pipeline import analyze, explain
from umup_fx.plan import ParamPlan, Plan
from umup_fx.runtime.clip import AlwaysClippedWarning, SpikeClipper, clip_grad_norm_, max_grad_norm
from umup_fx.runtime.init import init_
from umup_fx.runtime.modules import UmupBlock
from umup_fx.runtime.ops import cross_entropy
from umup_fx.runtime.optim import DEFAULT_LR, AdamW, ForeignOptimizerWarning, param_groups
from umup_fx.transfer.sweep import sweep
from umup_fx.transform import (
    CheckpointWarning,
    InlinedCallWarning,
    OneGraphWarning,
    PostNormWarning,
    ReferenceSizeWarning,
    UmupModule,
    UncoveredOpWarning,
    transform,
)

__all__ = [
    "__version__",
    "AdamW",
    "AlwaysClippedWarning",
    "SpikeClipper",
    "clip_grad_norm_",
    "max_grad_norm",
    "DEFAULT_LR",
    "AlreadyTransformedError",
    "AnalysisError",
    "CheckReport",
    "CaptureError",
    "ExportError",
    "ForeignOptimizerWarning",
    "HParams",
    "HParamsError",
    "CheckpointWarning",
    "InlinedCallWarning",
    "ReferenceSizeWarning",
    "OneGraphWarning",
    "PostNormWarning",
    "ScaleWarning",
    "StaticSizeWarning",
    "ParamPlan",
    "Plan",
    "Options",
    "UmupError",
    "UmupBlock",
    "UmupModule",
    "UncoveredOpWarning",
    "sweep",
    "analyze",
    "check",
    "cross_entropy",
    "explain",
    "export",
    "init_",
    "param_groups",
    "prepare",
    "transform",
]

register()  # torch.compile(model, backend="umup")
