r"""Multi-step functions of the circulate-firing neuron (docs/method.md, section 1): backend dispatch.

:func:`cf_multi_step` runs a call on the backend that :func:`resolve_backend` picks (the
fastest that can run it: ``'cupy'``, else ``'triton'`` on CUDA, the compiled ``'cpp'`` kernel on
CPU float32/float16/bfloat16, the reference ``'torch'`` otherwise). The pure-PyTorch reference
:func:`cf_multi_step_ref`, the oracle of every test, lives in
:mod:`spikingjelly_cf.backends.reference` and is re-exported here.
"""
import warnings
from typing import Optional, Tuple

import torch

from .. import backends as _backends
from .._compat import assume_constant_result
from .._validation import check_cf_parameters, check_tensors
from ..backends._ops import MEMORY_MODES
from ..backends.reference import cf_multi_step_ref
from ..surrogate import KERNEL_SURROGATES, CFRect, kernel_kind

__all__ = ['cf_multi_step', 'cf_multi_step_ref', 'cf_single_step', 'BACKENDS', 'resolve_backend',
           'check_cf_parameters']

#: Backend names: ``'auto'`` picks per call; ``'torch'`` is the reference.
BACKENDS = ('auto', 'torch') + tuple(_backends.KERNEL_BACKENDS)

Result = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


_warned = set()


@assume_constant_result
def _warn_once(key: str, message: str) -> bool:
    """Warn once per key. A constant for ``torch.compile``: Dynamo runs it once while tracing
    (so the warning is still shown) instead of breaking the graph on ``warnings.warn``."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return True


def resolve_backend(backend: str, x_seq: torch.Tensor, surrogate_function, t_start: int = 0,
                    *, k_pos: int = 2, k_neg: int = 2, detach_reset: bool = False) -> str:
    """The backend that will run this call (a name of :data:`BACKENDS` other than ``'auto'``).

    ``'auto'`` (or ``None``) tries the kernel backends of ``backends.AUTO_ORDER`` for the
    tensor's device type (CPU: ``'cpp'``; CUDA: ``'cupy'``, then ``'triton'``) and takes the first
    that is available and runs the dtype and the surrogate; otherwise the reference ``'torch'``,
    with a one-time warning when a kernel was expected (float32/float16/bfloat16) but cannot run.
    float64 runs on the reference without a word under ``'auto'``: no kernel computes in float64,
    and float64 is what the reference is for (``gradcheck``, numerical checks). An explicit
    kernel backend that cannot run the call raises a clear error, except for dtypes the kernel
    does not cover (float64), which use the reference with a one-time ``RuntimeWarning``.

    Kernels compiled at run time (``backends.RUNTIME_COMPILED``: ``'cupy'``, ``'triton'``) must
    first pass their first-use check for the key ``(device, dtype, surrogate kind, k_pos, k_neg,
    detach_reset)`` (``backends.first_use_check``: once per key and process, against the
    reference; ``SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK=1`` skips it). ``'auto'`` passes over a
    kernel that failed it, with a one-time warning, and an explicit ``backend=`` raises
    ``RuntimeError`` with the same message. Under ``torch.use_deterministic_algorithms(True)``
    ``'auto'`` also passes over a kernel that is not deterministic for the surrogate
    (``backends.deterministic_ok``: CuPy's TSG gradient).
    """
    if backend is None:
        backend = 'auto'
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if backend == 'torch':
        return 'torch'
    kind = kernel_kind(surrogate_function)
    supported_sg = kind is not None
    device_type = x_seq.device.type
    if backend == 'auto':
        candidates = [name for name in _backends.AUTO_ORDER.get(device_type, ())
                      if x_seq.dtype in _backends.kernel_dtypes(name, device_type)]
        if not candidates:
            return 'torch'
        if not supported_sg:
            _warn_once(f'sg-{type(surrogate_function).__name__}',
                       f'CFNode: the fused kernels support the surrogates {KERNEL_SURROGATES} in '
                       f'spiking mode; {type(surrogate_function).__name__} runs on the reference '
                       f"'torch' backend (slower).")
            return 'torch'
        nondeterministic = None
        for name in candidates:
            if not _backends.is_available(name):
                continue
            if not _backends.deterministic_ok(name, kind):
                nondeterministic = name
                continue
            failure = _backends.first_use_check(name, x_seq.device, x_seq.dtype, kind, k_pos,
                                                k_neg, detach_reset)
            if failure:
                _warn_once(f'first-use-{failure}',
                           f"CFNode: {failure}. backend='auto' does not use {name!r} for this "
                           f"configuration in this process.")
                continue
            return name
        name = candidates[0]
        if not _backends.is_available(name):
            _warn_once(f'unavailable-{name}',
                       f"CFNode: backend '{name}' is unavailable "
                       f"({_backends.unavailable_reason(name)}); "
                       f"using the reference 'torch' backend (slower).")
        elif nondeterministic is not None:
            _warn_once(f'nondeterministic-{nondeterministic}-{kind}',
                       f"CFNode: backend {nondeterministic!r} is not deterministic for "
                       f"{type(surrogate_function).__name__} and torch.use_deterministic_algorithms"
                       f"(True) is set; using the reference 'torch' backend (slower).")
        return 'torch'
    # explicit kernel backend
    table = _backends.KERNEL_BACKENDS[backend]
    dtypes = _backends.kernel_dtypes(backend, device_type)
    if not dtypes:
        raise ValueError(f"backend={backend!r} needs {' or '.join(t.upper() for t in table)} "
                         f"tensors, got a tensor on {x_seq.device}; use backend='auto'")
    if not supported_sg:
        raise ValueError(f"backend={backend!r} supports the surrogates {KERNEL_SURROGATES} in "
                         f"spiking mode, got {surrogate_function!r}; use backend='torch' or 'auto'")
    if not _backends.is_available(backend):
        raise RuntimeError(f'backend={backend!r} is unavailable: '
                           f'{_backends.unavailable_reason(backend)}')
    if x_seq.dtype not in dtypes:  # dtypes the kernel does not cover use the reference
        _warn_once(f'dtype-{backend}-{x_seq.dtype}',
                   f"CFNode: backend={backend!r} runs {', '.join(_dtype_names(dtypes))} on "
                   f"{device_type}, not {_dtype_names((x_seq.dtype,))[0]}; using the reference "
                   f"'torch' backend (slower).")
        return 'torch'
    failure = _backends.first_use_check(backend, x_seq.device, x_seq.dtype, kind, k_pos, k_neg,
                                        detach_reset)
    if failure:
        raise RuntimeError(f'{failure}. Use another backend (or backend=\'auto\', which passes '
                           f'over it), or set SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK=1 to use it '
                           f'anyway.')
    return backend


def _dtype_names(dtypes) -> Tuple[str, ...]:
    return tuple(str(d).replace('torch.', '') for d in dtypes)


def cf_multi_step(x_seq: torch.Tensor, v: torch.Tensor, tau: float = 4 / 3,
                  decay_input: bool = False, v_threshold: float = 1.0,
                  v_threshold_neg: Optional[float] = None, k_pos: int = 2, k_neg: int = 2,
                  surrogate_function=None, detach_reset: bool = False, t_start: int = 0,
                  return_h_seq: bool = False, return_v_seq: bool = False,
                  backend: str = 'auto', memory: str = 'normal') -> Result:
    r"""Multi-step CF neuron on the chosen backend; same arguments and results as
    :func:`cf_multi_step_ref` plus ``backend`` (one of :data:`BACKENDS`) and ``memory``.

    ``memory='lean'`` saves less for the backward pass than the float32 ``h`` (4 bytes per
    neuron-step): CFRect 1 byte (which level windows ``h`` fell in; gradients bit-identical to
    ``'normal'``), TSG, Sigmoid and ATan 3 bytes (the nearest level's index and the float16
    offset of ``h`` from it; every distance to a level within a relative ``2^-11`` of the normal
    mode's, whatever the threshold). Implemented by the ``'cpp'`` backend; other backends run in
    normal mode with a one-time warning. With ``return_h_seq`` the float32 ``h`` is kept anyway
    and nothing changes.

    Examples
    --------
    >>> x = torch.randn(8, 3, 5)
    >>> s, v, _, _ = cf_multi_step(x, torch.zeros(3, 5))
    >>> s.shape, v.shape
    (torch.Size([8, 3, 5]), torch.Size([3, 5]))
    """
    p = check_cf_parameters(tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                            detach_reset)
    check_tensors(x_seq, v)
    if surrogate_function is None:
        surrogate_function = CFRect()
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    name = resolve_backend(backend, x_seq, surrogate_function, t_start, k_pos=p['k_pos'],
                           k_neg=p['k_neg'], detach_reset=p['detach_reset'])
    fn = _backends.get(name)
    extra = {}
    if memory == 'lean':
        if getattr(fn, 'supports_memory_lean', False):
            extra['memory'] = 'lean'
        else:
            _warn_once(f'lean-{name}',
                       f"CFNode: memory='lean' is implemented by the 'cpp' backend; backend "
                       f"{name!r} runs in normal mode (it saves float32 h, or for the reference "
                       f"whatever autograd saves).")
    return fn(x_seq, v, surrogate_function=surrogate_function, t_start=t_start,
              return_h_seq=return_h_seq, return_v_seq=return_v_seq, **p, **extra)


def cf_single_step(x: torch.Tensor, v: torch.Tensor, t: int = 0, backend: str = 'auto', **kwargs):
    """One step: ``(s, v, h)`` for input ``x`` of shape ``[N, *]``; keywords as :func:`cf_multi_step`."""
    s, v, h, _ = cf_multi_step(x.unsqueeze(0), v, t_start=t, return_h_seq=True, backend=backend,
                               **kwargs)
    return s[0], v, h[0]
