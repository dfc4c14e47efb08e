"""kubellm benchmarks (not part of the test suite): `python -m bench.run_all` writes BENCHMARKS.md."""
