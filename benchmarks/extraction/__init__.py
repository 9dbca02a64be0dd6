"""The sections of benchmarks/bench_extract.py (run that; this package is not a benchmark of its own):
common (constants, timing, proxies and inputs), kernel (a, b), ray_stage (c), scaling (s), report."""
