r"""Multi-step functions of the circulate-firing neuron (SPEC section 1).

:func:`cf_multi_step_ref` is the pure-PyTorch reference: an explicit time loop, the oracle of
every test. :func:`cf_multi_step` dispatches to the fastest backend that can run a call
(``'cupy'`` on CUDA, the compiled ``'cpp'`` kernel on CPU float32, ``'torch'`` otherwise).
"""
import math
import numbers
import warnings
from typing import Optional, Tuple

import torch

from .. import backends as _backends
from ..surrogate import TSG, CFRect, KERNEL_SURROGATES, kernel_kind, level_spike

__all__ = ['cf_multi_step', 'cf_multi_step_ref', 'cf_single_step', 'BACKENDS', 'resolve_backend',
           'check_cf_parameters']

#: Backend names: ``'auto'`` picks per call; ``'torch'`` is the reference.
BACKENDS = ('auto', 'torch', 'cpp', 'cupy', 'inductor')

Result = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_cf_parameters(tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                        detach_reset) -> dict:
    """Validate the CF parameters; returns them normalised (floats, ints, ``theta_n`` filled in).

    Raises ``TypeError``/``ValueError`` naming the parameter, its value and what is allowed.
    """
    if not _is_real(tau):
        raise TypeError(f'tau must be a real number > 1, got {tau!r}')
    if not (math.isfinite(tau) and tau > 1):
        raise ValueError(f'tau must be > 1 (decay factor 1 - 1/tau in (0, 1)), got {tau}')
    if not isinstance(decay_input, bool):
        raise TypeError(f'decay_input must be a bool, got {decay_input!r}')
    if not _is_real(v_threshold):
        raise TypeError(f'v_threshold must be a float > 0, got {v_threshold!r} '
                        f'({type(v_threshold).__name__})')
    if not (math.isfinite(v_threshold) and v_threshold > 0):
        raise ValueError(f'v_threshold must be a finite float > 0, got {v_threshold}')
    if v_threshold_neg is None:
        v_threshold_neg = -float(v_threshold)
    if not _is_real(v_threshold_neg):
        raise TypeError(f'v_threshold_neg must be a float < 0 or None, got {v_threshold_neg!r} '
                        f'({type(v_threshold_neg).__name__})')
    if not (math.isfinite(v_threshold_neg) and v_threshold_neg < 0):
        raise ValueError(f'v_threshold_neg must be a finite float < 0 (or None for -v_threshold), '
                         f'got {v_threshold_neg}')
    if not _is_int(k_pos):
        raise TypeError(f'k_pos must be an integer >= 1, got {k_pos!r} ({type(k_pos).__name__})')
    if k_pos < 1:
        raise ValueError(f'k_pos must be >= 1, got {k_pos}')
    if not _is_int(k_neg):
        raise TypeError(f'k_neg must be an integer >= 0, got {k_neg!r} ({type(k_neg).__name__})')
    if k_neg < 0:
        raise ValueError(f'k_neg must be >= 0, got {k_neg}')
    if not isinstance(detach_reset, bool):
        raise TypeError(f'detach_reset must be a bool, got {detach_reset!r}')
    return dict(tau=float(tau), decay_input=decay_input, v_threshold=float(v_threshold),
                v_threshold_neg=float(v_threshold_neg), k_pos=int(k_pos), k_neg=int(k_neg),
                detach_reset=detach_reset)


def _check_tensors(x_seq: torch.Tensor, v) -> None:
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f'x_seq must be a torch.Tensor, got {type(x_seq).__name__}')
    if not x_seq.is_floating_point():
        raise TypeError(f'x_seq must be a floating-point tensor (float16/bfloat16/float32/float64), '
                        f'got dtype {x_seq.dtype}')
    if x_seq.dim() < 1 or x_seq.shape[0] < 1:
        raise ValueError(f'x_seq must have shape [T, *] with T >= 1, got {tuple(x_seq.shape)}')
    if not isinstance(v, torch.Tensor):
        raise TypeError(f'v must be a torch.Tensor of shape {tuple(x_seq.shape[1:])}, got {type(v).__name__}')
    if v.shape != x_seq.shape[1:]:
        raise ValueError(f'v must have the shape of one step of x_seq, {tuple(x_seq.shape[1:])}, '
                         f'got {tuple(v.shape)}')


def cf_multi_step_ref(x_seq: torch.Tensor, v: torch.Tensor, tau: float = 4 / 3,
                      decay_input: bool = False, v_threshold: float = 1.0,
                      v_threshold_neg: Optional[float] = None, k_pos: int = 2, k_neg: int = 2,
                      surrogate_function=None, detach_reset: bool = False, t_start: int = 0,
                      return_h_seq: bool = False, return_v_seq: bool = False) -> Result:
    r"""Reference (pure PyTorch, explicit time loop) multi-step CF neuron.

    For each step :math:`t` (SPEC section 1; Eq. 10-13 of the paper), with
    :math:`k_\tau = 1 - 1/\tau`:

    .. math::
        h_t &= k_\tau v_{t-1} + c\,x_t, \quad c = 1/\tau \text{ if decay\_input else } 1 \\
        n^+_t &= \textstyle\sum_{k=1}^{K_P} H(h_t - k\theta_P), \quad
        n^-_t = \textstyle\sum_{k=1}^{K_N} H(k\theta_N - h_t) \\
        s_t &= n^+_t - n^-_t, \qquad v_t = h_t - \theta_P n^+_t - \theta_N n^-_t

    Parameters
    ----------
    x_seq : Tensor
        Input current, shape ``[T, N, *]``.
    v : Tensor
        Post-reset potential before the first step, shape ``[N, *]``.
    tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg, detach_reset
        As :class:`~spikingjelly_cf.CFNode`.
    surrogate_function : nn.Module
        Per-level surrogate (default :class:`~spikingjelly_cf.surrogate.CFRect`).
    t_start : int
        Absolute index of the first step (selects TSG's :math:`a_t`).
    return_h_seq, return_v_seq : bool
        Also return the pre-reset ``h_seq`` / post-reset ``v_seq``, shape ``[T, N, *]``.

    Returns
    -------
    s_seq, v_last, h_seq, v_seq
        Signed spike counts in ``x_seq``'s dtype ``[T, N, *]``, the last potential ``[N, *]``,
        and the sequences or ``None``.

    Examples
    --------
    >>> x = torch.tensor([[1.2], [0.5], [-2.5]], dtype=torch.float64)
    >>> s, v, h, _ = cf_multi_step_ref(x, torch.zeros(1, dtype=torch.float64), return_h_seq=True)
    >>> s.flatten().tolist(), h.flatten().tolist()
    ([1.0, 0.0, -2.0], [1.2, 0.55, -2.3625])
    """
    p = check_cf_parameters(tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                            detach_reset)
    _check_tensors(x_seq, v)
    if surrogate_function is None:
        surrogate_function = CFRect()
    if isinstance(surrogate_function, TSG):  # a sequence too long for TSG's T fails before any work
        surrogate_function.alpha_steps(t_start, x_seq.shape[0])
    k_tau = 1.0 - 1.0 / p['tau']
    c = 1.0 / p['tau'] if p['decay_input'] else 1.0
    th_p, th_n = p['v_threshold'], p['v_threshold_neg']
    s_list, h_list, v_list = [], [], []
    for t in range(x_seq.shape[0]):
        x = x_seq[t]
        h = k_tau * v + (c * x if c != 1.0 else x)
        n_pos = 0
        for k in range(1, p['k_pos'] + 1):
            n_pos = n_pos + level_spike(surrogate_function, h - k * th_p, th_p, t_start + t)
        n_neg = 0
        for k in range(1, p['k_neg'] + 1):
            n_neg = n_neg + level_spike(surrogate_function, k * th_n - h, -th_n, t_start + t)
        s = n_pos - n_neg
        if not isinstance(s, torch.Tensor):  # k_neg == 0 and k_pos >= 1 always gives a tensor
            s = torch.zeros_like(h)
        if p['detach_reset']:
            n_pos_r = n_pos.detach() if isinstance(n_pos, torch.Tensor) else n_pos
            n_neg_r = n_neg.detach() if isinstance(n_neg, torch.Tensor) else n_neg
        else:
            n_pos_r, n_neg_r = n_pos, n_neg
        v = h - th_p * n_pos_r - th_n * n_neg_r
        s_list.append(s.to(x_seq.dtype))
        if return_h_seq:
            h_list.append(h)
        if return_v_seq:
            v_list.append(v)
    s_seq = torch.stack(s_list)
    h_seq = torch.stack(h_list) if return_h_seq else None
    v_seq = torch.stack(v_list) if return_v_seq else None
    return s_seq, v, h_seq, v_seq


_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, x_seq: torch.Tensor, surrogate_function, t_start: int = 0) -> str:
    """The backend that will run this call: ``'torch'``, ``'cpp'`` or ``'cupy'``.

    ``'auto'`` (or ``None``) picks ``'cupy'`` for CUDA tensors, ``'cpp'`` for CPU float32 tensors
    when the extension is built, and the reference ``'torch'`` otherwise (with a one-time warning
    when a kernel was expected but cannot run). An explicit kernel backend that cannot run the
    call raises a clear error, except for dtypes the kernel does not cover, which use the
    reference.
    """
    if backend is None:
        backend = 'auto'
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if backend == 'torch':
        return 'torch'
    supported_sg = kernel_kind(surrogate_function) is not None
    on_cuda = x_seq.is_cuda
    device_type = 'cuda' if on_cuda else 'cpu'
    if backend == 'auto':
        name = 'cupy' if on_cuda else 'cpp'
        if x_seq.dtype not in _backends.KERNEL_BACKENDS[name][device_type]:
            return 'torch'
        if not supported_sg:
            _warn_once(f'sg-{type(surrogate_function).__name__}',
                       f'CFNode: the fused kernels support the surrogates {KERNEL_SURROGATES} in '
                       f'spiking mode; {type(surrogate_function).__name__} runs on the reference '
                       f"'torch' backend (slower).")
            return 'torch'
        module = _backends.module(name)
        if not module.available():
            _warn_once(f'unavailable-{name}',
                       f"CFNode: backend '{name}' is unavailable ({module.unavailable_reason()}); "
                       f"using the reference 'torch' backend (slower).")
            return 'torch'
        return name
    # explicit kernel backend
    if backend == 'cupy' and not on_cuda:
        raise ValueError(f"backend='cupy' needs CUDA tensors, got a tensor on {x_seq.device}; "
                         f"use backend='auto' or 'cpp' on the CPU")
    if backend == 'cpp' and on_cuda:
        raise ValueError(f"backend='cpp' runs on CPU tensors, got a tensor on {x_seq.device}; "
                         f"use backend='auto' or 'cupy' on CUDA")
    if not supported_sg:
        raise ValueError(f"backend={backend!r} supports the surrogates {KERNEL_SURROGATES} in "
                         f"spiking mode, got {surrogate_function!r}; use backend='torch' or 'auto'")
    module = _backends.module(backend)
    if not module.available():
        raise RuntimeError(f'backend={backend!r} is unavailable: {module.unavailable_reason()}')
    if x_seq.dtype not in _backends.KERNEL_BACKENDS[backend][device_type]:
        return 'torch'  # dtypes the kernel does not cover use the reference
    return backend


def cf_multi_step(x_seq: torch.Tensor, v: torch.Tensor, tau: float = 4 / 3,
                  decay_input: bool = False, v_threshold: float = 1.0,
                  v_threshold_neg: Optional[float] = None, k_pos: int = 2, k_neg: int = 2,
                  surrogate_function=None, detach_reset: bool = False, t_start: int = 0,
                  return_h_seq: bool = False, return_v_seq: bool = False,
                  backend: str = 'auto') -> Result:
    r"""Multi-step CF neuron on the chosen backend; same arguments and results as
    :func:`cf_multi_step_ref` plus ``backend`` (``'auto'``, ``'torch'``, ``'cpp'``, ``'cupy'``).

    Examples
    --------
    >>> x = torch.randn(8, 3, 5)
    >>> s, v, _, _ = cf_multi_step(x, torch.zeros(3, 5))
    >>> s.shape, v.shape
    (torch.Size([8, 3, 5]), torch.Size([3, 5]))
    """
    p = check_cf_parameters(tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                            detach_reset)
    _check_tensors(x_seq, v)
    if surrogate_function is None:
        surrogate_function = CFRect()
    name = resolve_backend(backend, x_seq, surrogate_function, t_start)
    fn = cf_multi_step_ref if name == 'torch' else _backends.get(name)
    return fn(x_seq, v, surrogate_function=surrogate_function, t_start=t_start,
              return_h_seq=return_h_seq, return_v_seq=return_v_seq, **p)


def cf_single_step(x: torch.Tensor, v: torch.Tensor, t: int = 0, backend: str = 'auto', **kwargs):
    """One step: ``(s, v, h)`` for input ``x`` of shape ``[N, *]``; keywords as :func:`cf_multi_step`."""
    s, v, h, _ = cf_multi_step(x.unsqueeze(0), v, t_start=t, return_h_seq=True, backend=backend,
                               **kwargs)
    return s[0], v, h[0]
