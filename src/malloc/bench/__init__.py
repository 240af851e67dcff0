"""Benchmark: sweeps, the results store, Pareto fronts and reports."""
