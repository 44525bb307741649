"""The backends under test: a parametrised fixture over every backend the package registers.

``backend`` yields one :class:`BackendCase` per name in ``spikingjelly_cf.backends.KERNEL_BACKENDS``
(but ``'inductor'``, see ``BACKEND_NAMES``) plus the reference ``'torch'``; a backend that cannot run float32 tensors on any of its device
types here (no CUDA, extension not built, ...) is skipped with its reason. Backends added to
``KERNEL_BACKENDS`` later (``'inductor'``, ``'triton'``) join automatically.

:meth:`BackendCase.ran` proves that the requested backend really ran: it records the
``torch.library`` ops dispatched inside the block and requires the backend's forward op
(``spikingjelly_cf::cf_forward_<name>``) among them -- and, when gradients were taken inside the
block, its backward op -- or, for ``'torch'``, no ``spikingjelly_cf`` op at all.

Use it in a test module with ``from _backends import backend  # noqa: F401`` (pytest puts
``tests/`` on ``sys.path``).
"""
import contextlib
from typing import List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spikingjelly_cf import backends

#: Every backend name the package registers, the reference last. 'inductor' is left out: it is
#: no kernel op but the reference loop under torch.compile (one compilation per configuration,
#: minutes for this fixture's grid on 2 cores); tests/test_inductor.py checks it against the
#: reference.
BACKEND_NAMES = tuple(n for n in backends.KERNEL_BACKENDS if n != 'inductor') + ('torch',)


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith('spikingjelly_cf.'):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class BackendCase:
    """One backend with the device and dtype it runs here."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32):
        self.name, self.device, self.dtype = name, device, dtype

    def __repr__(self):
        return f'BackendCase({self.name!r}, {self.device}, {self.dtype})'

    def tensor(self, data, **kwargs) -> torch.Tensor:
        """``torch.as_tensor(data)`` on this backend's device and dtype."""
        return torch.as_tensor(data).to(device=self.device, dtype=self.dtype, **kwargs)

    @contextlib.contextmanager
    def ran(self, backward: bool = False):
        """Require that this backend's op ran inside the block (its backward op too with
        ``backward=True``); for ``'torch'``, that no kernel op ran."""
        before = _launch_count(self.name)
        with _OpRecorder() as rec:
            yield rec
        ops = set(rec.ops)
        if self.name == 'torch':
            assert not ops, f"backend 'torch' must not run kernel ops, ran {sorted(ops)}"
            return
        fwd = f'spikingjelly_cf.cf_forward_{self.name}.default'
        bwd = f'spikingjelly_cf.cf_backward_{self.name}.default'
        assert fwd in ops, f'backend {self.name!r} did not run its forward op; ran {sorted(ops)}'
        if backward:
            assert bwd in ops, f'backend {self.name!r} did not run its backward op; ran {sorted(ops)}'
        after = _launch_count(self.name)
        if before is not None:
            assert after > before, f'{self.name}.launch_count did not increase'


def _launch_count(name: str):
    if name == 'torch':
        return None
    return getattr(backends.module(name), 'launch_count', None)


def backend_case(name: str, dtype: torch.dtype = torch.float32) -> BackendCase:
    """The case of backend ``name`` for ``dtype``, or ``pytest.skip`` when it cannot run here."""
    if name == 'torch':
        return BackendCase('torch', torch.device('cpu'), dtype)
    table = backends.KERNEL_BACKENDS[name]
    reasons = []
    for device_type in table:  # the first device type on which the backend runs dtype here
        if device_type == 'cuda' and not torch.cuda.is_available():
            reasons.append('needs CUDA')
            continue
        if name in backends.available_backends(device_type, dtype):
            return BackendCase(name, torch.device(device_type), dtype)
        reason = backends.module(name).unavailable_reason()
        reasons.append(reason or f'does not run {dtype} on {device_type}')
    pytest.skip(f'backend {name!r} unavailable: {"; ".join(reasons)}')


@pytest.fixture(params=BACKEND_NAMES, scope='session')
def backend(request) -> BackendCase:
    """Every backend available here for float32 (see the module docstring)."""
    return backend_case(request.param)
