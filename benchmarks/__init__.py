"""Benchmark segq against peer disk queues and raw-file limits.

Run ``python -m benchmarks --help`` from the repository root; see README.md.
"""
