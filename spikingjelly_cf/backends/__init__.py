"""Fused kernels of the CF neuron, one module per backend, imported lazily.

* ``'cpp'`` (:mod:`.cpp`): compiled CPU kernel, float32, OpenMP (optional extension).
* ``'cupy'`` (:mod:`.cupy`): CUDA kernels compiled by CuPy/NVRTC, float32/float16/bfloat16.
* ``'inductor'`` (:mod:`.inductor`): the reference loop compiled by ``torch.compile`` (CPU and
  CUDA, float32/float64), a bounded cache of compiled functions; never picked by ``'auto'``.
* ``'torch'``: the pure-PyTorch reference, ``functional.neuron.cf_multi_step_ref``.

Every kernel backend module exposes ``available()``, ``unavailable_reason()`` and
``cf_multi_step_<name>(...)`` with the signature of the reference. Neither CuPy nor the compiled
extension is imported until a backend is asked for.
"""
import importlib
from typing import Callable, Tuple

import torch

__all__ = ['KERNEL_BACKENDS', 'get', 'module', 'available_backends']

#: Kernel backends and the dtypes each runs, per device type.
KERNEL_BACKENDS = {
    'cpp': {'cpu': (torch.float32,)},
    'cupy': {'cuda': (torch.float32, torch.float16, torch.bfloat16)},
    'inductor': {'cpu': (torch.float32, torch.float64), 'cuda': (torch.float32, torch.float64)},
}


def module(name: str):
    """The backend module ``spikingjelly_cf.backends.<name>`` (``'cpp'`` or ``'cupy'``)."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f'unknown kernel backend {name!r}; kernel backends are '
                         f'{tuple(KERNEL_BACKENDS)} (the reference is "torch")')
    return importlib.import_module(f'{__name__}.{name}')


def get(name: str) -> Callable:
    """The multi-step function of backend ``name`` (``'torch'``, ``'cpp'`` or ``'cupy'``)."""
    if name == 'torch':
        from ..functional.neuron import cf_multi_step_ref  # imported here: no import cycle
        return cf_multi_step_ref
    return getattr(module(name), f'cf_multi_step_{name}')


def available_backends(device_type='cpu', dtype: torch.dtype = torch.float32) -> Tuple[str, ...]:
    """Backends that can run tensors of ``dtype`` on ``device_type``, fastest first.

    ``'torch'`` is always last. For example ``('cpp', 'inductor', 'torch')`` for CPU float32
    when the extension is built and a C++ compiler is found (for ``torch.compile``),
    ``('inductor', 'torch')`` for CPU float64, ``('cupy', 'inductor', 'torch')`` on CUDA with
    CuPy and Triton.

    >>> available_backends('cpu', torch.float16)
    ('torch',)
    """
    device_type = torch.device(device_type).type
    names = []
    for name, table in KERNEL_BACKENDS.items():
        if dtype in table.get(device_type, ()) and module(name).available():
            names.append(name)
    return tuple(names) + ('torch',)
