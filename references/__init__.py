"""The PyTorch references that parity tests and benchmarks compare magnet_jax against, built with given weights.

audiocraft 1.3.0 is installed without its dependencies (`tests/run.sh`); `audiocraft_stubs.install()` makes it
importable on a CPU-only machine. Not part of the installed package: tests and benchmarks run from the repository.
"""
