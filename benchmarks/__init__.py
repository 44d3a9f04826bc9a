"""Benchmark scripts (``python -m benchmarks.<op>``), the shared harness and the plotter.

Results go to ``benchmarks/results/<op>.csv`` (long format, one row per measurement);
``python -m benchmarks.plot benchmarks/results/<op>.csv`` draws them. See BENCHMARKS.md.
"""
