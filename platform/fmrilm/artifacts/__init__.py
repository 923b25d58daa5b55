"""Trained artifacts as they lie on storage: each layout with its one writer and its one reader.

Above :mod:`fmrilm.models` (pure torch) and below the stages: training writes through these
modules; evaluation, tokenization, benchmarks and the CLI read through them and never import
training code.
"""
