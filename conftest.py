"""Collection of the package's doctests (``--doctest-modules``) on machines without Triton.

``spikingjelly_cf/backends/triton_kernels.py`` imports Triton at module level (``@triton.jit``
decorates the kernels while the module is imported); the backend imports it only on first use,
and without Triton the backend reports itself unavailable. Pytest's doctest collector imports
every module, so skip that one when Triton is not installed.
"""
import importlib.util

collect_ignore = [
    # docs/: the pages' code runs as doctests (--doctest-glob=*.md in setup.cfg); the build
    # scripts and the build's output are not tests. (A docs/conftest.py would be collected by
    # --doctest-modules as a second module named "conftest" beside tests/conftest.py.)
    'docs/conf.py', 'docs/make_figures.py',
]
collect_ignore_glob = ['docs/_build/*', 'docs/_generated/*', 'docs/_templates/*',
                       'docs/_changelog_fragments/*']
if importlib.util.find_spec('triton') is None:
    collect_ignore.append('spikingjelly_cf/backends/triton_kernels.py')
