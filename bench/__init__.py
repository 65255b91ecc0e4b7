"""Benchmarks against the tools users would use instead; run with `python -m bench NAME`.

Each module here (`bench_<name>.py`, or any other module with a `main()`) is one benchmark;
`python -m bench` lists them. Not part of the test suite: timings live here, as ratios.
"""
