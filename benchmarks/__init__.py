"""Benchmarks of conec_trio against raw aioquic, run with ``python -m benchmarks``.

Kept free of heavy imports: benchmark child processes import this package first.
"""
