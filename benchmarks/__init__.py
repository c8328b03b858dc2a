"""Benchmark scripts: each prints its figures; `gpu_suite` is the one prepared GPU run."""
