r"""A backend against the float64 reference on one input, and the first-use check built on it.

Shared by ``python -m spikingjelly_cf check`` (:mod:`spikingjelly_cf._check`, every case) and the
first-use check of the kernels compiled at run time (:func:`first_use_check`, one small case):

* :func:`make_inputs` draws a ``[T, N]`` input whose float64 reference trajectory stays at least
  :data:`MARGIN` away from every firing level (and, for ``CFRect``, from every window edge
  ``level +- theta/2``), redrawing the neurons that come closer. On such an input float32
  arithmetic cannot flip a spike or a window, so a backend's spikes must equal the float64
  reference's exactly and every other output and gradient must agree to the rounding of its
  dtype (:data:`TOLERANCES`);
* :func:`run` calls a multi-step function (a backend's, or the reference in float64) and takes
  the gradients of every input (``x``, ``v0``, TSG's parameter) for fixed upstream gradients;
* :func:`compare` gives the largest error of each output (scaled by ``max(1, max|reference|)``)
  and a message that names the output, the step and the neuron of the worst difference.

First-use check (docs/guide/gpu_check.md): CuPy (NVRTC) and Triton compile their kernels for
whatever GPU they find, so a wrong result there would be silent. The first time a process uses
such a backend for a key ``(device, dtype, surrogate kind, k_pos, k_neg, detach_reset)``, the
dispatcher (:func:`spikingjelly_cf.functional.neuron.resolve_backend`) calls
:func:`first_use_check`: a forward and backward pass on ``T = 8``, ``N = 4101`` (CUDA) or
``N = 1029`` (CPU tensors, Triton's interpreter), plus a ``no_grad`` forward, against the float64
reference. The verdict is cached per process. It draws its inputs from generators of its own
(the global random state is untouched), and is skipped (not cached) while a CUDA graph is being
captured. It runs outside any traced graph (the dispatcher
reaches it through a ``torch.compiler.assume_constant_result`` function, and the probe itself
leaves fake-tensor and dispatch modes, inference mode, autocast and deterministic mode while it
runs). Setting the environment variable ``SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK=1`` skips it.
"""
import math
import os
import threading
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..surrogate import TSG, CFRect
from .reference import cf_multi_step_ref

__all__ = ['Params', 'DEFAULT_PARAMS', 'VARIANT_PARAMS', 'KINDS', 'KIND_NAMES', 'TOLERANCES',
           'MARGIN', 'make_surrogate', 'make_inputs', 'run', 'compare', 'Comparison',
           'first_use_check', 'first_use_log', 'clear_first_use_cache', 'DISABLE_ENV',
           'isolated']

#: Environment variable that turns the first-use check off (any value but '' and '0').
DISABLE_ENV = 'SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK'

#: Surrogate kinds the kernels run, and their user-facing names.
KINDS = ('rect', 'tsg', 'sigmoid', 'atan')
KIND_NAMES = {'rect': 'CFRect', 'tsg': 'TSG', 'sigmoid': 'Sigmoid', 'atan': 'ATan'}

#: Largest error allowed, per dtype of the backend's tensors, after scaling by
#: ``max(1, max|reference|)``. float32: measured errors are below 5e-7 (rounding of float32
#: arithmetic against float64); float16/bfloat16: the outputs and gradients are rounded once
#: from float32, half an ulp is 2^-11 / 2^-8. Sums over the neurons (TSG's ``grad_p``) get
#: :data:`REDUCTION_FACTOR` times more (float32 sums of thousands of terms in any order).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3,
              torch.bfloat16: 3e-2}
REDUCTION_FACTOR = 10
#: Outputs that are sums over all neurons.
REDUCTIONS = ('grad_p',)

#: How far (in units of the potential) the float64 reference trajectory must stay from every
#: level and CFRect window edge: float32 rounds h by ~1e-7 here, 100 times less.
MARGIN = 2e-5


@dataclass(frozen=True)
class Params:
    """CF parameters of one case (those of :class:`~spikingjelly_cf.CFNode`)."""
    tau: float = 4 / 3
    decay_input: bool = False
    v_threshold: float = 1.0
    v_threshold_neg: float = -1.0
    k_pos: int = 2
    k_neg: int = 2
    detach_reset: bool = False

    def kwargs(self) -> dict:
        """The keyword arguments of a multi-step function (a plain dict: no deep copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: CFNode's defaults.
DEFAULT_PARAMS = Params()
#: Everything else a kernel branches on: decay_input (c = 1/tau), asymmetric thresholds, more
#: positive than negative levels, detach_reset.
VARIANT_PARAMS = Params(tau=2.0, decay_input=True, v_threshold=0.75, v_threshold_neg=-0.5,
                        k_pos=3, k_neg=1, detach_reset=True)


def make_surrogate(kind: str, steps: int = 8, seed: int = 0, device=None) -> torch.nn.Module:
    """A surrogate of ``kind`` (``KINDS``); TSG gets ``steps`` random (distinct) ``a_t``."""
    if kind == 'rect':
        sg = CFRect()
    elif kind == 'tsg':
        sg = TSG(steps)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sg.p.copy_(torch.randn(steps, generator=g))
    elif kind in ('sigmoid', 'atan'):
        from spikingjelly.activation_based import surrogate as sj_surrogate
        sg = getattr(sj_surrogate, KIND_NAMES[kind])()
    else:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    return sg if device is None else sg.to(device)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """One case's input: ``x`` ``[T, N]`` and ``v0`` ``[N]`` in the backend's dtype, and the
    upstream gradients (same dtype) of the outputs named in ``upstream``."""
    x: torch.Tensor
    v0: torch.Tensor
    upstream: Dict[str, torch.Tensor]
    redraws: int = 0


def _edges(p: Params, kind: str) -> List[float]:
    """Levels (and CFRect's window edges) whose neighbourhood the trajectory must avoid."""
    out = []
    for j in range(1, p.k_pos + 1):
        lv = j * p.v_threshold
        out.append(lv)
        if kind == 'rect':
            out += [lv - p.v_threshold / 2, lv + p.v_threshold / 2]
    for j in range(1, p.k_neg + 1):
        lv = j * p.v_threshold_neg
        out.append(lv)
        if kind == 'rect':
            out += [lv + p.v_threshold_neg / 2, lv - p.v_threshold_neg / 2]
    return out


def _near_rounding_boundary(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values whose rounding to ``dtype`` (float16, bfloat16) a float32-vs-float64 difference
    could change; none for float32/float64 (there the two differ by an ulp of float32, far below
    :data:`MARGIN`)."""
    if torch.finfo(dtype).eps < 1e-4:
        return torch.zeros(v.shape, dtype=torch.bool, device=v.device)
    eps = 2e-6
    near = (v * (1 + eps)).to(dtype) != (v * (1 - eps)).to(dtype)
    # A value that float32 holds exactly (often a sum of two half-precision numbers, which may sit
    # exactly halfway between two of them) is computed exactly by a float32 kernel too, and both
    # round it to ``dtype`` the same way (ties to even): no divergence to fear there.
    exact32 = v.float().double() == v
    return near & ~exact32


def _bad_neurons(x: torch.Tensor, v0: torch.Tensor, p: Params, sg, kind: str, t_start: int,
                 chain_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``[N]`` bool: neurons whose float64 reference trajectory comes within ``MARGIN`` of a
    level or window edge. ``chain_dtype``: the trajectory of single steps whose state is rounded
    to that dtype between the calls (a neuron whose state lies near a rounding boundary counts
    as bad too)."""
    kw = p.kwargs()
    with torch.no_grad():
        if chain_dtype is None:
            _, _, h, _ = cf_multi_step_ref(x.double(), v0.double(), surrogate_function=sg,
                                           t_start=t_start, return_h_seq=True, **kw)
            bad_state = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        else:
            hs, bad_state = [], torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
            v = v0.double()
            for t in range(x.shape[0]):
                _, v, h_t, _ = cf_multi_step_ref(x[t:t + 1].double(), v, surrogate_function=sg,
                                                 t_start=t_start + t, return_h_seq=True, **kw)
                bad_state |= _near_rounding_boundary(v, chain_dtype)
                v = v.to(chain_dtype).double()
                hs.append(h_t)
            h = torch.cat(hs)
        dist = torch.full_like(h, math.inf)
        for e in _edges(p, kind):
            dist = torch.minimum(dist, (h - e).abs())
        return (dist < MARGIN).any(0) | bad_state


def make_inputs(T: int, N: int, dtype: torch.dtype, device, p: Params, sg, kind: str,
                t_start: int = 0, upstream: Sequence[str] = ('s',), seed: int = 0,
                chain: bool = False, max_redraws: int = 40) -> Inputs:
    """A well-conditioned input (module docstring): ``x ~ 1.5 N(0, 1)``, ``v0 ~ 0.5 N(0, 1)``
    rounded to ``dtype``, neurons redrawn until the float64 reference trajectory keeps
    :data:`MARGIN` from every level and window edge; upstream gradients ``~ N(0, 1)`` in
    ``dtype`` for the outputs named in ``upstream`` (``'s'``, ``'v_last'``, ``'h'``,
    ``'v_seq'``). ``chain``: the trajectory of ``T`` single-step calls (state rounded to
    ``dtype`` between them). Deterministic for a given ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        return ((torch.randn(T, n, generator=g, dtype=torch.float64) * 1.5).to(dtype),
                (torch.randn(n, generator=g, dtype=torch.float64) * 0.5).to(dtype))

    x, v0 = draw(N)
    x, v0 = x.to(device), v0.to(device)
    chain_dtype = dtype if chain else None
    idx = torch.arange(N, device=device)
    redraws = 0
    while True:  # neurons are independent: only the redrawn ones are simulated again
        bad = _bad_neurons(x[:, idx], v0[idx], p, sg, kind, t_start, chain_dtype)
        idx = idx[bad]
        if idx.numel() == 0:
            break
        if redraws == max_redraws:
            raise RuntimeError(f'could not draw an input of {N} neurons, T={T}, whose reference '
                               f'trajectory avoids the levels by {MARGIN} ({idx.numel()} left)')
        xb, vb = draw(idx.numel())
        x[:, idx], v0[idx] = xb.to(device), vb.to(device)
        redraws += 1
    shapes = {'s': (T, N), 'v_last': (N,), 'h': (T, N), 'v_seq': (T, N)}
    up = {name: torch.randn(*shapes[name], generator=g, dtype=torch.float64).to(dtype).to(device)
          for name in upstream}
    return Inputs(x=x, v0=v0, upstream=up, redraws=redraws)


# ------------------------------------------------------------------------------------------------
# running and comparing
# ------------------------------------------------------------------------------------------------
OUTPUTS = ('s', 'v_last', 'h', 'v_seq')


def run(fn: Callable, x: torch.Tensor, v0: torch.Tensor, sg, p: Params, t_start: int = 0,
        upstream: Optional[Dict[str, torch.Tensor]] = None, dtype: Optional[torch.dtype] = None,
        grad: bool = True) -> Dict[str, torch.Tensor]:
    """Outputs and gradients of ``fn`` (a multi-step function) on ``x``, ``v0`` (cast to
    ``dtype`` when given, e.g. float64 for the reference).

    With ``grad``: the upstream gradients (cast likewise) go into the outputs they name and the
    result also holds ``grad_x``, ``grad_v0`` and, for TSG, ``grad_p``. Outputs keep ``x``'s
    shape; everything is detached.
    """
    upstream = upstream or {}
    if dtype is not None:
        x, v0 = x.to(dtype), v0.to(dtype)
    params = [q for q in sg.parameters() if q.requires_grad]
    with torch.set_grad_enabled(grad):
        x = x.detach().requires_grad_(grad)
        v0 = v0.detach().requires_grad_(grad)
        s, v_last, h, v_seq = fn(x, v0, surrogate_function=sg, t_start=t_start,
                                 return_h_seq='h' in upstream, return_v_seq='v_seq' in upstream,
                                 **p.kwargs())
    out = {'s': s, 'v_last': v_last, 'h': h, 'v_seq': v_seq}
    if grad:
        names = [n for n in OUTPUTS if n in upstream]
        gouts = [upstream[n].to(out[n].dtype).reshape(out[n].shape) for n in names]
        inputs = [x, v0] + params
        grads = torch.autograd.grad([out[n] for n in names], inputs, gouts, allow_unused=True)
        out['grad_x'], out['grad_v0'] = grads[0], grads[1]
        if params:
            out['grad_p'] = grads[2]
    return {k: (None if t is None else t.detach()) for k, t in out.items()}


@dataclass
class Comparison:
    """What :func:`compare` found: ``errors`` (largest scaled error per output, spikes as the
    number of differing entries), ``worst`` (largest error relative to its tolerance) and a
    message naming the first output that failed ('' when everything passed)."""
    passed: bool
    errors: Dict[str, float]
    worst: float
    worst_output: str
    message: str


def _where(diff: torch.Tensor, name: str = '') -> str:
    """``t=3, neuron 17`` of the largest entry of a ``[T, N]`` (or ``[N]``) difference."""
    flat = diff.reshape(-1)
    flat = int(flat.nonzero()[0, 0]) if flat.dtype == torch.bool else int(flat.argmax())
    if name in REDUCTIONS:
        return f'{name.replace("grad_", "")}[{flat}]'
    if diff.dim() >= 2:
        n = diff[0].numel()
        return f't={flat // n}, neuron {flat % n}'
    return f'neuron {flat}'


def compare(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], dtype: torch.dtype,
            exact: Sequence[str] = ('s',), tolerance: Optional[float] = None) -> Comparison:
    """Every output present in both against the reference: the names in ``exact`` must be equal,
    the others within ``tolerance`` (default ``TOLERANCES[dtype]``) after scaling by
    ``max(1, max|reference|)``."""
    tol = TOLERANCES.get(dtype, 1e-5) if tolerance is None else tolerance
    errors, worst, worst_name, message = {}, 0.0, '', ''
    for name, r in ref.items():
        a = got.get(name)
        if r is None or a is None:
            if (r is None) != (a is None) and not message:
                message = f'{name}: {"missing" if a is None else "unexpected"} output'
            continue
        a = a.double().reshape(r.shape)
        r = r.double()
        if name in exact:
            diff = (a != r)
            count = int(diff.sum())
            errors[name] = count
            if count:
                rel = math.inf
                if not message:
                    message = (f'{name} differs at {count} of {r.numel()} entries (first at '
                               f'{_where(diff.reshape(r.shape[0], -1) if r.dim() > 1 else diff, name)})')
            else:
                rel = 0.0
        else:
            tol_n = tol * (REDUCTION_FACTOR if name in REDUCTIONS else 1)
            d = (a - r).abs()
            finite = bool(torch.isfinite(a).all())
            scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
            err = float(d.max()) / scale if d.numel() else 0.0
            if not finite:
                err = math.inf
            errors[name] = err
            rel = err / tol_n
            if (err > tol_n or not finite) and not message:
                message = (f'{name} differs by {err:.3g} (scaled by {scale:.3g}; tolerance '
                           f'{tol_n:.1e}) at '
                           f'{_where(d.reshape(d.shape[0], -1) if d.dim() > 1 else d, name)}')
        if rel > worst or not worst_name:
            worst, worst_name = rel, name
    return Comparison(passed=not message, errors=errors, worst=worst, worst_output=worst_name,
                      message=message)


class isolated:
    """Context of a probe run from anywhere (even while Dynamo or ``torch.export`` traces the
    caller): no fake-tensor or dispatch modes, no inference mode or autocast, grad mode on,
    deterministic algorithms off (restored afterwards)."""

    def __init__(self, device_type: str = 'cpu'):
        self.device_type = device_type

    def __enter__(self):
        self._stack = stack = ExitStack()
        try:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            stack.enter_context(unset_fake_temporarily())
        except ImportError:  # pragma: no cover - very old torch
            pass
        try:
            from torch.utils._python_dispatch import _disable_current_modes
            stack.enter_context(_disable_current_modes())
        except ImportError:  # pragma: no cover
            pass
        disable_functorch = getattr(torch._C, '_DisableFuncTorch', None)
        if disable_functorch is not None:
            stack.enter_context(disable_functorch())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if self.device_type in ('cpu', 'cuda'):
            stack.enter_context(torch.autocast(self.device_type, enabled=False))
        self._det = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
        if self._det[0]:
            torch.use_deterministic_algorithms(False)
        return self

    def __exit__(self, *exc):
        if self._det[0]:
            torch.use_deterministic_algorithms(True, warn_only=self._det[1])
        return self._stack.__exit__(*exc)


# ------------------------------------------------------------------------------------------------
# the first-use check
# ------------------------------------------------------------------------------------------------
_lock = threading.RLock()
_verdicts: Dict[tuple, str] = {}
#: One entry per key checked in this process: key, verdict ('' = passed), seconds it took.
_log: List[dict] = []


def first_use_log() -> List[dict]:
    """The first-use checks this process ran: ``backend``, ``device``, ``dtype``, ``kind``,
    ``k_pos``, ``k_neg``, ``detach_reset``, ``passed``, ``message``, ``seconds``."""
    with _lock:
        return [dict(e) for e in _log]


def clear_first_use_cache() -> None:
    """Forget every verdict (the next use of each key is checked again)."""
    with _lock:
        _verdicts.clear()
        _log.clear()


def _probe(fn: Callable, device: torch.device, dtype: torch.dtype, kind: str, p: Params) -> str:
    """'' when ``fn`` matches the float64 reference on the first-use case, else what differs."""
    T, N = 8, (4101 if device.type == 'cuda' else 1029)
    sg = make_surrogate(kind, T, seed=1, device=device)
    inp = make_inputs(T, N, dtype, device, p, sg, kind, upstream=('s',), seed=1)
    ref = run(cf_multi_step_ref, inp.x, inp.v0, sg, p, upstream=inp.upstream,
              dtype=torch.float64)
    got = run(fn, inp.x, inp.v0, sg, p, upstream=inp.upstream)
    cmp = compare(got, ref, dtype)
    if not cmp.passed:
        return f'forward and backward, T={T}, N={N}: {cmp.message}'
    got = run(fn, inp.x, inp.v0, sg, p, grad=False)
    cmp = compare({k: got[k] for k in ('s', 'v_last')}, {k: ref[k] for k in ('s', 'v_last')},
                  dtype)
    if not cmp.passed:
        return f'no_grad forward, T={T}, N={N}: {cmp.message}'
    return ''


def first_use_check(name: str, fn: Callable, device, dtype: torch.dtype, kind: str, k_pos: int,
                    k_neg: int, detach_reset: bool) -> str:
    """'' when backend ``name`` (multi-step function ``fn``) passed its first-use check for this
    key (now, or earlier in this process), else the message for the user. Never raises."""
    if os.environ.get(DISABLE_ENV, '') not in ('', '0'):
        return ''
    device = torch.device(device)
    if device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
        return ''  # no launches while a CUDA graph is captured: checked at the next eager call
    key = (name, str(device), dtype, kind, int(k_pos), int(k_neg), bool(detach_reset))
    with _lock:
        verdict = _verdicts.get(key)
        if verdict is not None:
            return verdict
        began = time.perf_counter()
        p = Params(k_pos=int(k_pos), k_neg=int(k_neg), detach_reset=bool(detach_reset))
        try:
            with isolated(device.type), warnings.catch_warnings():
                warnings.simplefilter('ignore')
                what = _probe(fn, device, dtype, kind, p)
        except Exception as exc:  # noqa: BLE001 - a compile or launch error is a failed check
            what = f'{type(exc).__name__}: {str(exc).strip()}'.splitlines()[0][:500]
        if device.type == 'cuda':
            try:
                torch.cuda.synchronize(device)
            except Exception as exc:  # noqa: BLE001 - a sticky launch error
                what = what or f'{type(exc).__name__}: {exc}'.splitlines()[0][:500]
        seconds = time.perf_counter() - began
        dtype_name = str(dtype).replace('torch.', '')
        verdict = '' if not what else (
            f"backend {name!r} failed its first-use check on {device} ({dtype_name}, "
            f"{KIND_NAMES.get(kind, kind)}, k_pos={k_pos}, k_neg={k_neg}, "
            f"detach_reset={bool(detach_reset)}): {what}. Its kernels are compiled at run time "
            f"for this device and gave a wrong result or failed; run "
            f"`python -m spikingjelly_cf check` for the full report")
        _verdicts[key] = verdict
        _log.append(dict(backend=name, device=str(device), dtype=dtype_name, kind=kind,
                         k_pos=int(k_pos), k_neg=int(k_neg), detach_reset=bool(detach_reset),
                         passed=not what, message=verdict, seconds=seconds))
        return verdict
