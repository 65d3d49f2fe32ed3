"""Capture: a model and example inputs in, one ATen FX graph out.

``trace`` exports the model (``torch.export``, non-strict) and explains failures;
``blocks`` finds the block lists and the prefix of them that is captured; ``shadow``
swaps the weights for ``meta`` stand-ins while it runs.
"""
