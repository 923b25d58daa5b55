"""Evaluation: zero-/few-shot scoring of the LM, baselines on the same splits, metrics, report."""
