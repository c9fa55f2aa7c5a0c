"""Benchmarks, one per stage. Each runs from the repository root as a module, `python -m bench.X`
(so `bench/heads.py` never shadows the `heads` package), measures its baseline in the same run,
and prints one JSON line last."""
