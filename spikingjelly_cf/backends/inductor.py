r"""Backend ``'inductor'``: the reference CF loop compiled by ``torch.compile`` (CPU and CUDA).

The time loop of :func:`~spikingjelly_cf.functional.neuron.cf_multi_step_ref`, written in
"kernel form" (:func:`kernel_loop`) and handed to ``torch.compile`` (Inductor: C++/OpenMP on the
CPU, Triton on CUDA). Every firing level is

.. math:: n = H(x)\,\text{(detached)} + \bigl(\phi(x) - \phi(x)\,\text{(detached)}\bigr),

where :math:`\phi` is a primitive whose derivative is exactly the surrogate's (the bracket is 0
in the forward pass, so the forward value is exactly :math:`H(x)`):

* ``CFRect``: :math:`\phi(x) = \alpha_\theta\,x\,1[|x| < \theta/2]` with the mask not
  differentiated (height :math:`\alpha_\theta` = ``alpha``, or :math:`1/\theta` of the side),
  so the window is strict, as in docs/method.md, section 2, :math:`\alpha 1[|x| < \theta/2]` (``clamp``'s gradient
  would include the edges);
* ``TSG``: the triangle's antiderivative :math:`\Phi_{a_t}` (``surrogate._triangle_primitive``);
  :math:`a_t` enters the compiled graph as a ``[T]`` float32 tensor, so learning it never
  recompiles;
* SpikingJelly ``Sigmoid``: :math:`\sigma(\alpha x)`; ``ATan``: :math:`\arctan(\pi\alpha x/2)/\pi`.

Compiled functions are kept in a bounded LRU cache (:data:`CACHE_SIZE` entries,
:func:`clear_cache`, :func:`cache_info`) keyed by everything that changes the graph: the neuron's
parameters, the surrogate kind and ``alpha`` (not TSG's :math:`a_t`), ``T``, the ``return_*``
flags, dtype, device, grad mode and which inputs require a gradient. Each entry is compiled
from its own code object, so the entries never share Dynamo's per-function recompile limit. The
neuron dimension ``N`` is marked dynamic (``torch._dynamo.mark_dynamic``) so that a new batch
size does not recompile; ``T`` is static (the loop is unrolled).

Supported dtypes: float32 and float64 on CPU and CUDA. On CUDA the Triton kernels are compiled
with ``emulate_precision_casts=True``, which turns off fused multiply-add contraction
(docs/method.md, section 6: float32 spikes equal the reference's). Surrogates other than the four above, or
in ``spiking=False`` mode, cannot be keyed: ``backend='inductor'`` raises a ``ValueError`` naming
the supported ones, and ``'auto'`` never picks this backend for them (it never picks it at all
today; see docs/benchmarks.md).
"""
import collections
import itertools
import math
import os
import shutil
import sys
import threading
from typing import NamedTuple, Optional

import torch

from ..surrogate import _triangle_primitive
from ._common import prepare

__all__ = ['available', 'unavailable_reason', 'cf_multi_step_inductor', 'clear_cache',
           'cache_info', 'CACHE_SIZE', 'DTYPES', 'kernel_loop']

#: Maximal number of compiled functions kept (least recently used evicted first).
CACHE_SIZE = 64

#: dtypes this backend runs, per device type (``backends.KERNEL_BACKENDS['inductor']``).
DTYPES = {'cpu': (torch.float32, torch.float64), 'cuda': (torch.float32, torch.float64)}

#: Mark the neuron dimension dynamic (one compilation for every batch size). Module-level so
#: the benchmark can compare both settings.
DYNAMIC_N = True


class Key(NamedTuple):
    """Everything that changes the compiled graph (one cache entry per distinct key)."""
    kind: str
    sg_alpha: float          # CFRect/Sigmoid/ATan alpha; 0.0 for TSG (a_t is a tensor input) and
                             # for CFRect's default height (1/theta per side)
    k: float                 # 1 - 1/tau
    c: float                 # 1/tau or 1
    theta_p: float
    theta_n: float
    k_pos: int
    k_neg: int
    detach_reset: bool
    T: int
    return_h: bool
    return_v: bool
    dtype: torch.dtype
    device: str              # device type and index, e.g. 'cpu', 'cuda:0'
    grad: bool               # autograd graph needed (grad mode on and some input requires grad)
    requires_grad: tuple     # (x, v0, alpha) requires_grad, when grad is True


# ------------------------------------------------------------------------------------------------
# the loop in kernel form
# ------------------------------------------------------------------------------------------------
def _level(x: torch.Tensor, kind: str, sg_alpha: float, theta: float, a_t, grad: bool):
    """One firing level: exact step forward, the surrogate's derivative backward."""
    step = (x >= 0).to(x.dtype)
    if not grad:
        return step
    if kind == 'rect':
        mask = (x.abs() < 0.5 * theta).to(x.dtype)  # not differentiated: a strict window
        height = sg_alpha if sg_alpha != 0.0 else 1.0 / theta  # CFRect.height(theta)
        phi = height * x * mask
    elif kind == 'tsg':
        phi = _triangle_primitive(x, a_t)
    elif kind == 'sigmoid':
        phi = torch.sigmoid(sg_alpha * x)
    else:  # 'atan'
        phi = torch.atan((math.pi / 2 * sg_alpha) * x) * (1.0 / math.pi)
    return step + (phi - phi.detach())


def kernel_loop(x: torch.Tensor, v0: torch.Tensor, alpha: torch.Tensor, key: Key):
    """The CF time loop on ``x [T, N]``, ``v0 [N]``, ``alpha [T]`` (TSG's :math:`a_t`).

    The same arithmetic, in the same order of rounded operations, as the reference
    ``cf_multi_step_ref`` (so float32 spikes are equal). Returns ``(s, v_last, h, v_seq)`` with
    ``h``/``v_seq`` ``None`` unless asked for.
    """
    v = v0
    s_list, h_list, v_list = [], [], []
    for t in range(key.T):
        xt = x[t]
        h = key.k * v + (key.c * xt if key.c != 1.0 else xt)
        a_t = alpha[t].to(x.dtype) if key.kind == 'tsg' else None
        n_pos = _level(h - 1 * key.theta_p, key.kind, key.sg_alpha, key.theta_p, a_t, key.grad)
        for j in range(2, key.k_pos + 1):
            n_pos = n_pos + _level(h - j * key.theta_p, key.kind, key.sg_alpha, key.theta_p, a_t,
                                   key.grad)
        n_neg = None
        for j in range(1, key.k_neg + 1):
            lv = _level(j * key.theta_n - h, key.kind, key.sg_alpha, -key.theta_n, a_t, key.grad)
            n_neg = lv if n_neg is None else n_neg + lv
        if key.detach_reset:
            n_pos_r = n_pos.detach()
            n_neg_r = None if n_neg is None else n_neg.detach()
        else:
            n_pos_r, n_neg_r = n_pos, n_neg
        if n_neg is None:
            s = n_pos
            v = h - key.theta_p * n_pos_r
        else:
            s = n_pos - n_neg
            v = h - key.theta_p * n_pos_r - key.theta_n * n_neg_r
        s_list.append(s)
        if key.return_h:
            h_list.append(h)
        if key.return_v:
            v_list.append(v)
    return (torch.stack(s_list), v, torch.stack(h_list) if key.return_h else None,
            torch.stack(v_list) if key.return_v else None)


# ------------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------------
_reason: Optional[str] = None
_checked = False


def _check() -> None:
    global _reason, _checked
    if _checked:
        return
    _checked = True
    if os.environ.get('SPIKINGJELLY_CF_DISABLE_INDUCTOR', '') not in ('', '0'):
        _reason = 'disabled by SPIKINGJELLY_CF_DISABLE_INDUCTOR'
        return
    try:
        import torch._dynamo  # noqa: F401
        if not torch._dynamo.is_dynamo_supported():
            _reason = f'torch.compile does not support Python {sys.version.split()[0]} here'
            return
    except Exception as exc:  # noqa: BLE001 - reported, never dropped
        _reason = f'torch.compile is unusable: {type(exc).__name__}: {exc}'
        return
    cxx = os.environ.get('CXX') or next((c for c in ('g++', 'c++', 'clang++') if shutil.which(c)),
                                        None)
    if cxx is None or not shutil.which(cxx.split()[0]):
        _reason = 'Inductor needs a C++ compiler on the CPU (none of $CXX, g++, c++, clang++ found)'


def available(device_type: str = 'cpu') -> bool:
    """Whether ``torch.compile`` (Inductor) can compile the loop for ``device_type``."""
    _check()
    if _reason is not None:
        return False
    if torch.device(device_type).type == 'cuda':
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
    return True


def unavailable_reason(device_type: str = 'cpu') -> str:
    """Why :func:`available` is ``False`` (empty string when it is ``True``)."""
    _check()
    if _reason is not None:
        return _reason
    if torch.device(device_type).type == 'cuda' and not available('cuda'):
        return 'Inductor needs Triton for CUDA tensors (pip install triton)'
    return ''


# ------------------------------------------------------------------------------------------------
# the bounded cache of compiled functions
# ------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_cache: 'collections.OrderedDict[Key, object]' = collections.OrderedDict()
_serial = itertools.count()
_stats = {'hits': 0, 'misses': 0, 'evictions': 0}


def _compile(key: Key):
    """A fresh compiled function for ``key``, with a code object of its own."""
    def cf_inductor(x, v0, alpha):
        return kernel_loop(x, v0, alpha, key)
    # Dynamo caches compiled frames per code object, with a recompile limit (8) per code object:
    # a code object per entry keeps every key's graph apart, and freeing the entry frees it.
    cf_inductor.__code__ = cf_inductor.__code__.replace(co_name=f'cf_inductor_{next(_serial)}')
    options = {'emulate_precision_casts': True} if key.device.startswith('cuda') else None
    return torch.compile(cf_inductor, backend='inductor', fullgraph=True,
                         dynamic=None if DYNAMIC_N else False, options=options)


def _get(key: Key):
    with _lock:
        fn = _cache.get(key)
        if fn is not None:
            _cache.move_to_end(key)
            _stats['hits'] += 1
            return fn
        _stats['misses'] += 1
        fn = _compile(key)
        _cache[key] = fn
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
            _stats['evictions'] += 1
        return fn


def clear_cache() -> None:
    """Drop every compiled function (and reset :func:`cache_info`'s counters)."""
    with _lock:
        _cache.clear()
        for k in _stats:
            _stats[k] = 0


def cache_info() -> dict:
    """``{'size', 'maxsize', 'hits', 'misses', 'evictions', 'keys'}`` of the compiled-function
    cache (a miss compiles a new entry)."""
    with _lock:
        return dict(size=len(_cache), maxsize=CACHE_SIZE, keys=list(_cache), **_stats)


# ------------------------------------------------------------------------------------------------
# the multi-step function
# ------------------------------------------------------------------------------------------------
def cf_multi_step_inductor(x_seq: torch.Tensor, v: torch.Tensor, tau: float = 4 / 3,
                           decay_input: bool = False, v_threshold: float = 1.0,
                           v_threshold_neg: Optional[float] = None, k_pos: int = 2, k_neg: int = 2,
                           surrogate_function=None, detach_reset: bool = False, t_start: int = 0,
                           return_h_seq: bool = False, return_v_seq: bool = False):
    r"""Multi-step CF neuron compiled by ``torch.compile``; the contract of
    :func:`spikingjelly_cf.functional.neuron.cf_multi_step_ref` (float32/float64, CPU or CUDA).

    The first call of a new key (parameters, surrogate kind and alpha, ``T``, flags, dtype,
    device, grad mode) compiles, which takes seconds; later calls reuse the compiled function
    from the cache (any batch size). Raises ``ValueError`` for a surrogate it cannot key.
    """
    if not isinstance(x_seq, torch.Tensor) or x_seq.dtype not in DTYPES.get(x_seq.device.type, ()):
        raise TypeError(f"backend 'inductor' runs {[str(d) for d in DTYPES['cpu']]} tensors on "
                        f"{tuple(DTYPES)}, got {getattr(x_seq, 'dtype', type(x_seq).__name__)} "
                        f"on {getattr(x_seq, 'device', '?')}")
    if not available(x_seq.device.type):
        raise RuntimeError(f"backend 'inductor' is unavailable: "
                           f"{unavailable_reason(x_seq.device.type)}")
    call = prepare('inductor', x_seq, v, tau, decay_input, v_threshold, v_threshold_neg, k_pos,
                   k_neg, surrogate_function, detach_reset, t_start)
    T, N = call.x.shape
    x, v0, alpha = call.x, call.v0, call.alpha
    req = (x.requires_grad, v0.requires_grad, call.kind == 'tsg' and alpha.requires_grad)
    grad = torch.is_grad_enabled() and any(req)
    sg_alpha = getattr(surrogate_function, 'alpha', None)  # None: CFRect's default (or no sg)
    sg_alpha = 0.0 if call.kind == 'tsg' or sg_alpha is None else float(sg_alpha)
    key = Key(kind=call.kind, sg_alpha=sg_alpha, k=call.k, c=call.c, theta_p=call.theta_p,
              theta_n=call.theta_n, k_pos=call.k_pos, k_neg=call.k_neg,
              detach_reset=call.detach_reset, T=T, return_h=bool(return_h_seq),
              return_v=bool(return_v_seq), dtype=x.dtype, device=str(x.device), grad=grad,
              requires_grad=req if grad else ())
    fn = _get(key)
    if DYNAMIC_N and N >= 2:  # N = 0/1 is specialised by Dynamo anyway
        torch._dynamo.mark_dynamic(x, 1)
        torch._dynamo.mark_dynamic(v0, 0)
    s, v_last, h, v_seq = fn(x, v0, alpha)
    return (call.restore(s, T), call.restore(v_last, None),
            None if h is None else call.restore(h, T),
            None if v_seq is None else call.restore(v_seq, T))
