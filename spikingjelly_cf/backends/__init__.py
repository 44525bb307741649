"""Backends of the CF neuron, one module per backend, imported lazily.

* ``'torch'`` (:mod:`.reference`): the pure-PyTorch reference, every dtype, device and surrogate.
* ``'cpp'`` (:mod:`.cpp`): compiled CPU kernel, float32/float16/bfloat16 (float32 arithmetic),
  OpenMP where the compiler has it (optional extension).
* ``'cupy'`` (:mod:`.cupy`): CUDA kernels compiled by CuPy/NVRTC, float32/float16/bfloat16.
* ``'triton'`` (:mod:`.triton`): Triton kernels, CUDA, float32/float16/bfloat16 (CPU tensors in
  Triton's interpreter with ``TRITON_INTERPRET=1``, a test mode that ``'auto'`` never picks).
* ``'inductor'`` (:mod:`.inductor`): the reference loop compiled by ``torch.compile`` (CPU and
  CUDA, float32/float64), a bounded cache of compiled functions; never picked by ``'auto'``.

The fused kernels are ``torch.library`` custom ops (:mod:`._ops`). Every backend module exposes
``available()``, ``unavailable_reason()`` and ``cf_multi_step_<name>(...)`` with the signature of
the reference. Neither CuPy, Triton nor the compiled extension is loaded until a backend is
asked for.

The kernels of :data:`RUNTIME_COMPILED` (``'cupy'``, ``'triton'``) are compiled at run time for
the GPU they find; :func:`first_use_check` compares each with the reference the first time a
process uses it for a configuration (:mod:`._probe`), and the dispatcher does not use one that
failed.
"""
import importlib
from typing import Callable, Tuple

import torch

from .._compat import assume_constant_result

__all__ = ['KERNEL_BACKENDS', 'AUTO_ORDER', 'RUNTIME_COMPILED', 'get', 'module', 'is_available',
           'unavailable_reason', 'available_backends', 'kernel_dtypes', 'first_use_check',
           'deterministic_ok']

#: Kernel backends and the dtypes each runs, per device type.
KERNEL_BACKENDS = {
    'cpp': {'cpu': (torch.float32, torch.float16, torch.bfloat16)},
    'cupy': {'cuda': (torch.float32, torch.float16, torch.bfloat16)},
    'triton': {'cuda': (torch.float32, torch.float16, torch.bfloat16)},
    'inductor': {'cpu': (torch.float32, torch.float64), 'cuda': (torch.float32, torch.float64)},
}

#: The order in which ``backend='auto'`` tries the kernel backends, per device type (the first
#: that is available and runs the dtype and surrogate wins; the reference is the last resort).
#: CUDA: CuPy when it imports and sees the device, else Triton (it ships with PyTorch's CUDA
#: wheels). No GPU measurement has ranked the two yet: reorder once one exists.
AUTO_ORDER = {
    'cpu': ('cpp',),
    'cuda': ('cupy', 'triton'),
}

#: Backends whose kernels are compiled at run time for the device they run on (CuPy/NVRTC,
#: Triton): checked against the reference on first use (:func:`first_use_check`).
RUNTIME_COMPILED = ('cupy', 'triton')

_MODULES = {'torch': 'reference', 'cpp': 'cpp', 'cupy': 'cupy', 'triton': 'triton',
            'inductor': 'inductor'}

from .reference import cf_multi_step_ref  # noqa: E402  (the reference is always loaded)

_functions = {'torch': cf_multi_step_ref}  # backend name -> multi-step function, once imported


def module(name: str):
    """The backend module of ``name`` (``'torch'`` is :mod:`.reference`)."""
    if name not in _MODULES:
        raise ValueError(f'unknown backend {name!r}; backends are {tuple(_MODULES)}')
    return importlib.import_module(f'{__name__}.{_MODULES[name]}')


def _function(name: str) -> Callable:
    fn = _functions.get(name)
    if fn is None:
        fn = getattr(module(name), f'cf_multi_step_{name}')
        _functions[name] = fn
    return fn


@assume_constant_result
def is_available(name: str) -> bool:
    """Whether backend ``name`` can run here. A constant for ``torch.compile``: it runs once,
    outside the traced graph, and also imports the backend so that :func:`get` finds it."""
    ok = bool(module(name).available())
    if ok:
        _function(name)
    return ok


@assume_constant_result
def unavailable_reason(name: str) -> str:
    """Why backend ``name`` cannot run here ('' when it can); a constant for ``torch.compile``."""
    return str(module(name).unavailable_reason())


def get(name: str) -> Callable:
    """The multi-step function of backend ``name`` (a dictionary lookup once the backend has
    been imported, e.g. by :func:`is_available`, so ``torch.compile`` traces it)."""
    fn = _functions.get(name)
    return fn if fn is not None else _function(name)


def kernel_dtypes(name: str, device_type: str) -> Tuple[torch.dtype, ...]:
    """Dtypes kernel backend ``name`` runs on ``device_type`` (empty when none).

    Triton's interpreter (test mode, ``TRITON_INTERPRET=1``) runs the CUDA dtypes on CPU tensors.
    """
    table = KERNEL_BACKENDS[name]
    if device_type in table:
        return table[device_type]
    if name == 'triton' and device_type == 'cpu' and _triton_interpreted():
        return table['cuda']
    return ()


@assume_constant_result
def _triton_interpreted() -> bool:
    return 'cpu' in module('triton').device_types()


def available_backends(device_type='cpu', dtype: torch.dtype = torch.float32) -> Tuple[str, ...]:
    """Backends that can run tensors of ``dtype`` on ``device_type``, in ``'auto'``'s order.

    ``'torch'`` is always last. For example ``('cpp', 'inductor', 'torch')`` for CPU float32
    when the extension is built and a C++ compiler is found (for ``torch.compile``),
    ``('cpp', 'torch')`` for CPU float16 and bfloat16, ``('inductor', 'torch')`` for CPU float64,
    ``('cupy', 'triton', 'inductor', 'torch')`` on CUDA with CuPy and Triton.

    >>> available_backends('cpu', torch.bfloat16) == (
    ...     ('cpp', 'torch') if is_available('cpp') else ('torch',))
    True
    """
    device_type = torch.device(device_type).type
    names = [name for name in KERNEL_BACKENDS
             if dtype in KERNEL_BACKENDS[name].get(device_type, ()) and is_available(name)]
    order = AUTO_ORDER.get(device_type, ())
    names.sort(key=lambda n: order.index(n) if n in order else len(order))
    return tuple(names) + ('torch',)


@assume_constant_result
def first_use_check(name: str, device: torch.device, dtype: torch.dtype, kind: str, k_pos: int,
                    k_neg: int, detach_reset: bool) -> str:
    """'' when run-time-compiled backend ``name`` gave the reference's results on ``device`` for
    this ``(dtype, surrogate kind, k_pos, k_neg, detach_reset)``, else what went wrong.

    The first call per key and process runs a small forward and backward pass against the
    float64 reference (:func:`._probe.first_use_check`); later calls return the cached verdict.
    A constant for ``torch.compile``: it runs once, outside the traced graph. Always '' for the
    backends not in :data:`RUNTIME_COMPILED`, and when the environment variable
    ``SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK`` is set to anything but '' or '0'.

    >>> first_use_check('cpp', torch.device('cpu'), torch.float32, 'rect', 2, 2, False)
    ''
    """
    if name not in RUNTIME_COMPILED:
        return ''
    from . import _probe
    return _probe.first_use_check(name, get(name), device, dtype, kind, k_pos, k_neg,
                                  detach_reset)


def deterministic_ok(name: str, kind: str) -> bool:
    """Whether backend ``name`` is deterministic for surrogate ``kind`` when
    ``torch.use_deterministic_algorithms(True)`` is set (``True`` when it is not set).

    Only ``'cupy'`` with TSG is not: it sums the gradient of each :math:`a_t` with one
    ``atomicAdd`` per thread block, whose order varies between runs.

    >>> deterministic_ok('cupy', 'tsg')  # torch.use_deterministic_algorithms is not set
    True
    """
    if not torch.are_deterministic_algorithms_enabled():
        return True
    return not (name == 'cupy' and kind == 'tsg')
