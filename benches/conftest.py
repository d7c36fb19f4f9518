"""Benchmarks run on their own: `python -m pytest benches` (they are not part of the test suite)."""
