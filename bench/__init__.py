"""Benchmark of macvtapdp against the targets in DESIGN.md (run ``bench/benchmark.py``)."""
