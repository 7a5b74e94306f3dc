"""Benchmarks: `make bench` runs every `bench/bench_*.py`; JSON results go to bench/results/."""
