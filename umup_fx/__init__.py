"""umup_fx: u-muP and static-scale FP8 as a compiler pass on unmodified PyTorch models."""

from .errors import AlreadyTransformedError, AnalysisError, CaptureError, HParamsError, UmupError
from .hparams import HParams
from .pipeline import analyze, explain
from .plan import ParamPlan, Plan

__all__ = [
    "AlreadyTransformedError",
    "AnalysisError",
    "CaptureError",
    "HParams",
    "HParamsError",
    "ParamPlan",
    "Plan",
    "UmupError",
    "analyze",
    "explain",
]
__version__ = "0.1.0"
