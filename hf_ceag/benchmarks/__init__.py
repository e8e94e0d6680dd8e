"""The benchmark behind BENCHMARKS.md, importable: settings, timed runs, and the markdown of each part.

`scripts/benchmark.py` only parses flags and writes the file.
"""
