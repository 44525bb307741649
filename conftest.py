"""Collection of the package's doctests (``--doctest-modules``) on machines without Triton.

``spikingjelly_cf/backends/triton_kernels.py`` imports Triton at module level (``@triton.jit``
decorates the kernels while the module is imported); the backend imports it only on first use,
and without Triton the backend reports itself unavailable. Pytest's doctest collector imports
every module, so skip that one when Triton is not installed.
"""
import importlib.util

collect_ignore = []
if importlib.util.find_spec('triton') is None:
    collect_ignore.append('spikingjelly_cf/backends/triton_kernels.py')
