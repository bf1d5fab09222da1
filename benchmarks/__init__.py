"""Benchmarks of unimoe_kernels against the baselines users would pick instead (`pytest benchmarks/`).

A package so that its modules import as benchmarks.configs / benchmarks.harness without clashing
with tests/ module names.
"""
