"""Benchmarks: run as ``python -m benchmarks.<name> --json``; each prints what it measured and how."""
