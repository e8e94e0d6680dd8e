"""Audit of a sparse model against its dense one: `report` (per-group accuracy changes, intervals,
verdicts, plot), `model_card` (the Hub card), `metrics/` (the same figures as an `evaluate` metric).
"""
