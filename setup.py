"""Build script: metadata lives in setup.cfg; this file adds the optional compiled CPU kernel.

The extension ``spikingjelly_cf._cf_cpu`` (OpenMP, float32) is optional: if it fails to build,
installation still succeeds and ``CFNode`` uses the pure-PyTorch reference on the CPU (with a
one-time warning).
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the installation because of them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(f'WARNING: the optional CPU kernel spikingjelly_cf._cf_cpu was not built '
                         f'({exc}); CFNode will use the PyTorch reference on the CPU.\n')


cpu_kernel = Extension(
    'spikingjelly_cf._cf_cpu',
    sources=['spikingjelly_cf/csrc/cf_cpu.c'],
    include_dirs=['spikingjelly_cf/csrc'],
    depends=['spikingjelly_cf/csrc/cf_step.h'],
    libraries=['m'],
    # -ffp-contract=off: no FMA contraction, so spikes match the PyTorch reference bit for bit;
    # -fno-trapping-math: lets gcc vectorise the TSG backward's selects (10x faster).
    extra_compile_args=['-O3', '-fopenmp', '-ffp-contract=off', '-fno-trapping-math', '-std=c99'],
    extra_link_args=['-fopenmp'],
)

setup(ext_modules=[cpu_kernel], cmdclass={'build_ext': OptionalBuildExt})
