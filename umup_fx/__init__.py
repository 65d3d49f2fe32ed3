"""umup_fx: u-muP and static-scale FP8 as a compiler pass on unmodified PyTorch models."""

from .backend import prepare, register
from .errors import AlreadyTransformedError, AnalysisError, CaptureError, HParamsError, UmupError
from .hparams import HParams
from .init import init_
from .module import UmupBlock
from .ops import cross_entropy
from .optim import AdamW, param_groups
from .options import Options
from .pipeline import analyze, explain
from .plan import ParamPlan, Plan
from .sweep import sweep
from .transform import (
    OneGraphWarning,
    PostNormWarning,
    UmupModule,
    UncoveredOpWarning,
    transform,
)

__all__ = [
    "AdamW",
    "AlreadyTransformedError",
    "AnalysisError",
    "CaptureError",
    "HParams",
    "HParamsError",
    "OneGraphWarning",
    "PostNormWarning",
    "ParamPlan",
    "Plan",
    "Options",
    "UmupError",
    "UmupBlock",
    "UmupModule",
    "UncoveredOpWarning",
    "sweep",
    "analyze",
    "cross_entropy",
    "explain",
    "init_",
    "param_groups",
    "prepare",
    "transform",
]
__version__ = "0.1.0"

register()  # torch.compile(model, backend="umup")
