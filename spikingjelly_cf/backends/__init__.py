"""Fused kernels of the CF neuron, one module per backend, imported lazily.

* ``'cpp'`` (:mod:`.cpp`): compiled CPU kernel, float32, OpenMP (optional extension).
* ``'cupy'`` (:mod:`.cupy`): CUDA kernels compiled by CuPy/NVRTC, float32/float16/bfloat16.
* ``'triton'`` (:mod:`.triton`): Triton kernels, CUDA, float32/float16/bfloat16 (CPU tensors in
  Triton's interpreter with ``TRITON_INTERPRET=1``, for tests).
* ``'torch'``: the pure-PyTorch reference, ``functional.neuron.cf_multi_step_ref``.

Every kernel backend module exposes ``available()``, ``unavailable_reason()`` and
``cf_multi_step_<name>(...)`` with the signature of the reference. Neither CuPy nor the compiled
extension is imported until a backend is asked for.

``backend='auto'`` tries the kernel backends of :data:`AUTO_ORDER` for the tensor's device type in
that order and takes the first that runs the dtype and is available, else the reference.
"""
import importlib
from typing import Callable, Tuple

import torch

__all__ = ['KERNEL_BACKENDS', 'AUTO_ORDER', 'get', 'module', 'available_backends',
           'kernel_dtypes']

#: Kernel backends and the dtypes each runs, per device type.
KERNEL_BACKENDS = {
    'cpp': {'cpu': (torch.float32,)},
    'cupy': {'cuda': (torch.float32, torch.float16, torch.bfloat16)},
    'triton': {'cuda': (torch.float32, torch.float16, torch.bfloat16)},
}

#: What ``backend='auto'`` tries, per device type, first available first. On CUDA: CuPy (when it
#: imports and sees the device), else Triton (ships with PyTorch's CUDA wheels), else the
#: reference. No GPU measurement has ranked CuPy against Triton yet: reorder once one exists.
AUTO_ORDER = {
    'cuda': ('cupy', 'triton'),
    'cpu': ('cpp',),
}


def module(name: str):
    """The backend module ``spikingjelly_cf.backends.<name>`` (``'cpp'``, ``'cupy'``, ...)."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f'unknown kernel backend {name!r}; kernel backends are '
                         f'{tuple(KERNEL_BACKENDS)} (the reference is "torch")')
    return importlib.import_module(f'{__name__}.{name}')


def get(name: str) -> Callable:
    """The multi-step function of backend ``name`` (``'torch'`` or a kernel backend)."""
    if name == 'torch':
        from ..functional.neuron import cf_multi_step_ref  # imported here: no import cycle
        return cf_multi_step_ref
    return getattr(module(name), f'cf_multi_step_{name}')


def kernel_dtypes(name: str, device_type: str) -> Tuple[torch.dtype, ...]:
    """Dtypes kernel backend ``name`` runs on ``device_type`` (empty when none).

    Triton's interpreter (test mode, ``TRITON_INTERPRET=1``) runs the CUDA dtypes on CPU tensors.
    """
    table = KERNEL_BACKENDS[name]
    if device_type in table:
        return table[device_type]
    if name == 'triton' and device_type == 'cpu' and 'cpu' in module(name).device_types():
        return table['cuda']
    return ()


def available_backends(device_type='cpu', dtype: torch.dtype = torch.float32) -> Tuple[str, ...]:
    """Backends that can run tensors of ``dtype`` on ``device_type``, fastest first.

    ``'torch'`` is always last. For example ``('cpp', 'torch')`` for CPU float32 when the
    extension is built, ``('torch',)`` for CPU float64, ``('cupy', 'torch')`` on CUDA with CuPy.

    >>> available_backends('cpu', torch.float64)
    ('torch',)
    """
    device_type = torch.device(device_type).type
    names = []
    for name, table in KERNEL_BACKENDS.items():
        if dtype in table.get(device_type, ()) and module(name).available():
            names.append(name)
    return tuple(names) + ('torch',)
