"""Errors umup_fx raises. Each message says what was found, where, and what to do."""

from __future__ import annotations


class UmupError(Exception):
    """Base class of every error umup_fx raises on purpose."""


class CaptureError(UmupError):
    """The model could not be captured as one graph."""


class AnalysisError(UmupError):
    """The analysis could not decide something it must (a parameter's role, say)."""


class AlreadyTransformedError(UmupError):
    """The model already went through `umup_fx.transform`."""


class HParamsError(UmupError, ValueError):
    """An invalid u-muP hyperparameter."""


class GraphRunError(UmupError, RuntimeError):
    """An op of a rewritten graph failed on a call the model as written accepts."""


class CallError(UmupError, TypeError):
    """A transformed model got a call it cannot run: a new call structure that cannot be
    captured or analyses unlike the model's plan, more structures than it keeps, or
    inference state (a KV cache)."""


class AdapterError(UmupError):
    """LoRA / PEFT adapters meet a transformed model (not supported yet)."""


class CheckpointError(UmupError):
    """A checkpoint does not fit the transformed model it is loaded into (other reference
    sizes, hparams or options), or cannot be written so that it loads back exactly."""
