"""Benchmarks for Ferry (commands, not tests): ``make bench`` runs :mod:`bench.copy_bench`."""
