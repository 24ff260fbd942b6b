"""FineScope's benchmarks, each run from the repository root as `python -m bench.<name>` (`make bench` runs
the CPU ones). Each measures its baseline in the same run and prints the ratio; `--json PATH` also writes
its figures in one shape (`bench.measure.write_json`). `bench.gpu` holds the checks for a GPU machine.

`bench` imports the library; nothing in the library imports `bench` (tests/test_layout.py).
"""
