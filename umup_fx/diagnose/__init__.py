"""Diagnostics of a transformed model: the RMS of every op at init (tracking) and the
check that flags values outside the unit-scale band (unit_check, rules §8)."""
