"""Runnable studies and benchmarks; importable from the repository root.

Run a study as a module from the repository root, e.g.
``python -m experiments.study_map_baseline``. The shared data and models are
``experiments.data`` and ``experiments.models``.
"""
