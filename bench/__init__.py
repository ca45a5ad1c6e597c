"""Benchmarks: pytest-benchmark suites, timing scripts (run as `python bench/NAME.py`), their results
(RESULTS.md, figures/), and the memory-cgroup helper that they and the tests share."""
