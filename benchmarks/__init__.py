"""Latency, accuracy and end-to-end benchmarks (scripts, not tests: nothing here asserts a time)."""
