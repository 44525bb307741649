"""The CUDA source of the fused CF kernels, exactly as CuPy receives it.

:func:`cuda_source` pastes ``csrc/cf_step.h`` (the per-neuron arithmetic shared with the CPU
kernel) into ``csrc/cf_kernel.cuh`` and appends the ``extern "C"`` entry points of one storage
dtype and one surrogate kind. The string needs no include path: it is compiled unchanged by
NVRTC in :mod:`.cupy` and by ``nvcc`` in ``tests/test_cuda_compile.py``.

>>> src = cuda_source('float16', 'tsg')
>>> kernel_names('float16', 'tsg')
('cf_forward_float16', 'cf_backward_float16_tsg')
>>> '#include "cf_step.h"' in src  # pasted in: NVRTC needs no include path
False
"""
import functools
import os
from typing import Tuple

__all__ = ['DTYPES', 'KINDS', 'NVRTC_OPTIONS', 'cuda_source', 'kernel_names', 'csrc_dir']

#: Storage dtype name -> C type in cf_kernel.cuh.
DTYPES = {'float32': 'float', 'float16': 'cf_half', 'bfloat16': 'cf_bfloat16'}

#: Surrogate kind -> constant in cf_step.h.
KINDS = {'rect': 'CF_RECT', 'tsg': 'CF_TSG', 'sigmoid': 'CF_SIGMOID', 'atan': 'CF_ATAN'}

#: Options CuPy passes to NVRTC (the compile test passes the same standard to nvcc).
NVRTC_OPTIONS = ('--std=c++14',)


def csrc_dir() -> str:
    """Directory of the C/CUDA sources shipped with the package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'csrc')


def _read(name: str) -> str:
    with open(os.path.join(csrc_dir(), name), encoding='utf-8') as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _body() -> str:
    step = _read('cf_step.h')
    kernel = _read('cf_kernel.cuh')
    include = '#include "cf_step.h"'
    if kernel.count(include) != 1:  # internal invariant of the shipped sources
        raise RuntimeError(f'cf_kernel.cuh must contain exactly one line {include!r}')
    return kernel.replace(include, f'/* ---- begin cf_step.h ---- */\n{step}\n'
                                   f'/* ---- end cf_step.h ---- */')


def kernel_names(dtype_name: str, kind: str) -> Tuple[str, str]:
    """``(forward, backward)`` kernel names defined by ``cuda_source(dtype_name, kind)``."""
    _check(dtype_name, kind)
    return f'cf_forward_{dtype_name}', f'cf_backward_{dtype_name}_{kind}'


def _check(dtype_name: str, kind: str) -> None:
    if dtype_name not in DTYPES:
        raise ValueError(f'dtype_name must be one of {tuple(DTYPES)}, got {dtype_name!r}')
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {tuple(KINDS)}, got {kind!r}')


@functools.lru_cache(maxsize=None)
def cuda_source(dtype_name: str, kind: str) -> str:
    """The complete CUDA source of the forward and backward kernels for one storage dtype
    (``'float32'``, ``'float16'``, ``'bfloat16'``) and one surrogate kind (``'rect'``,
    ``'tsg'``, ``'sigmoid'``, ``'atan'``)."""
    _check(dtype_name, kind)
    return (f'{_body()}\n\n/* ---- entry points: {dtype_name}, {kind} ---- */\n'
            f'CF_DEFINE_KERNELS({dtype_name}, {DTYPES[dtype_name]}, {KINDS[kind]}, {kind})\n')
