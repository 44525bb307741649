"""Build script: metadata lives in setup.cfg; this file adds the optional compiled CPU kernel.

The extension ``spikingjelly_cf._cf_cpu`` is optional: if it fails to build, installation still
succeeds and ``CFNode`` uses the pure-PyTorch reference on the CPU (with a one-time warning).

OpenMP is optional too: the kernel is first built with the compiler's OpenMP flag, and where that
fails (Apple clang without libomp, MSVC's OpenMP 2.0) it is built again without OpenMP, as a
single-threaded kernel (``spikingjelly_cf.backends.cpp.build_info()['openmp']`` is then
``False``). Set ``SPIKINGJELLY_CF_NO_OPENMP=1`` to build without OpenMP on purpose.
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: Environment variable: build the CPU kernel without OpenMP (single-threaded).
NO_OPENMP_ENV = 'SPIKINGJELLY_CF_NO_OPENMP'

# -ffp-contract=off: no FMA contraction, so spikes match the PyTorch reference bit for bit;
# -fno-trapping-math: lets gcc vectorise the TSG backward's selects (10x faster).
GCC_FLAGS = ['-O3', '-ffp-contract=off', '-fno-trapping-math', '-std=c99']
# MSVC (untested here): precise floating point (cf_cpu.c turns contraction off with a pragma),
# C11 for restrict; its /openmp is OpenMP 2.0, too old for the kernel: /openmp:llvm or none.
MSVC_FLAGS = ['/O2', '/fp:precise', '/std:c11']
OPENMP_FLAGS = {'msvc': (['/openmp:llvm'], [])}
DEFAULT_OPENMP_FLAGS = (['-fopenmp'], ['-fopenmp'])


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the installation because of them; build the CPU kernel
    without OpenMP where the compiler has none."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._warn(exc)

    def build_extension(self, ext):
        compiler = getattr(self.compiler, 'compiler_type', 'unix')
        base = MSVC_FLAGS if compiler == 'msvc' else GCC_FLAGS
        omp_compile, omp_link = OPENMP_FLAGS.get(compiler, DEFAULT_OPENMP_FLAGS)
        attempts = [('without OpenMP', [], [])]
        if os.environ.get(NO_OPENMP_ENV, '') in ('', '0'):
            attempts.insert(0, ('with OpenMP', omp_compile, omp_link))
        failure = None
        target = self.get_ext_fullpath(ext.name)
        for what, compile_flags, link_flags in attempts:
            ext.extra_compile_args = base + compile_flags
            ext.extra_link_args = list(link_flags)
            before = os.path.getmtime(target) if os.path.exists(target) else None
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: try the next
                failure = exc
                self.force = True  # rebuild every object without the failed flags
                continue
            built = os.path.exists(target) and os.path.getmtime(target) != before
            if built and what == 'without OpenMP':
                sys.stderr.write('NOTE: spikingjelly_cf._cf_cpu was built without OpenMP (a '
                                 'single-threaded CPU kernel)'
                                 + (f'; with OpenMP the build failed: {failure}'
                                    if failure is not None else f' ({NO_OPENMP_ENV} is set)')
                                 + '\n')
            return
        self._warn(failure)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(f'WARNING: the optional CPU kernel spikingjelly_cf._cf_cpu was not built '
                         f'({exc}); CFNode will use the PyTorch reference on the CPU.\n')


cpu_kernel = Extension(
    'spikingjelly_cf._cf_cpu',
    sources=['spikingjelly_cf/csrc/cf_cpu.c'],
    include_dirs=['spikingjelly_cf/csrc'],
    depends=['spikingjelly_cf/csrc/cf_step.h'],
    libraries=['m'] if sys.platform != 'win32' else [],
)

setup(ext_modules=[cpu_kernel], cmdclass={'build_ext': OptionalBuildExt})
