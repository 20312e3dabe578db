"""Throughput benchmarks: they report numbers (CSV and a table), they never pass or fail."""
