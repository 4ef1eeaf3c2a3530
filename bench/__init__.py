"""Benchmarks: `make bench` runs every module's run() and prints one table."""
