"""Hyperparameter-transfer tools built on ``transform``: the learning-rate ``sweep``,
the paper's independent ``search``, μP's ``coord_check``, per-op scale ``tracking``,
the byte-level ``corpus`` they train on, and their ``plots`` (matplotlib, optional).
"""
