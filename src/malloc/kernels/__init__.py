"""Compiled CPU kernels: C sources built with the machine's C compiler on first use and loaded with ctypes.

Each kernel has a PyTorch reference elsewhere in the package, which stays the oracle (the tests compare them)
and the fallback: where no compiler is found or a build fails, :func:`malloc.kernels.build.load` logs why once
and returns None, and the caller takes its PyTorch path.
"""
