r"""Backend ``'cupy'``: fused CUDA kernels compiled by CuPy (NVRTC), float32/float16/bfloat16.

The source is :func:`.source.cuda_source` (``csrc/cf_kernel.cuh`` around ``csrc/cf_step.h``, the
arithmetic shared with the CPU kernel). A module is compiled lazily the first time a
``(device, dtype, surrogate kind)`` is used and kept in the module-level table ``_kernels``;
CuPy also caches the binary on disk. Kernels run on PyTorch's current stream of the tensor's
device, one thread per neuron with the time loop inside, on contiguous ``[T, N]`` views.

All arithmetic is float32: half and bfloat16 tensors are loaded into float32, the state carries
in float32 and the pre-reset potentials the backward pass needs are kept in float32, so under
``torch.autocast`` a half input gives what float32 gives on the same values, rounded once at the
output. The TSG gradient of each :math:`a_t` is reduced per thread block in shared memory and
added with one ``atomicAdd`` per block (so its last bits may vary between runs).

CuPy is imported only when this backend is first used; the package works without it.
"""
import threading
import warnings
from typing import Optional

import torch

from ._common import grad_view, prepare
from .source import NVRTC_OPTIONS, cuda_source, kernel_names

__all__ = ['available', 'unavailable_reason', 'cf_multi_step_cupy', 'launch_count', 'DTYPES']

#: torch dtype -> storage dtype name of the kernels.
DTYPES = {torch.float32: 'float32', torch.float16: 'float16', torch.bfloat16: 'bfloat16'}

THREADS_PER_BLOCK = 256  # a multiple of 32 (the TSG block reduction needs whole warps)

#: Number of kernel launches (forward and backward) since import: tests use it to prove the
#: CuPy path ran.
launch_count = 0

_lock = threading.Lock()
_cupy = None
_reason: Optional[str] = None
_kernels = {}  # (device index, dtype name, kind) -> (forward kernel, backward kernel)
_streams = {}  # (device index, stream pointer) -> cupy stream


def _load():
    """Import CuPy once and check that PyTorch sees a CUDA device; remember why not."""
    global _cupy, _reason
    with _lock:
        if _cupy is not None or _reason is not None:
            return _cupy
        if not torch.cuda.is_available():
            _reason = 'PyTorch sees no CUDA device'
            return None
        try:
            import cupy
            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - ImportError, CUDA driver errors, ...
            _reason = (f'CuPy is not usable ({type(exc).__name__}: {exc}); install the wheel that '
                       f'matches your CUDA, e.g. `pip install cupy-cuda12x` or `cupy-cuda13x`')
            return None
        _cupy = cupy
        return _cupy


def available() -> bool:
    """Whether CuPy imports and a CUDA device is visible."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is ``False`` (empty string when it is ``True``)."""
    _load()
    return _reason or ''


def get_kernels(device_index: int, dtype_name: str, kind: str):
    """``(forward, backward)`` CuPy kernels for one device, storage dtype and surrogate kind,
    compiled on first use."""
    key = (device_index, dtype_name, kind)
    kernels = _kernels.get(key)
    if kernels is None:
        cp = _load()
        if cp is None:
            raise RuntimeError(f"backend 'cupy' is unavailable: {_reason}")
        with cp.cuda.Device(device_index):
            module = cp.RawModule(code=cuda_source(dtype_name, kind), options=NVRTC_OPTIONS)
            kernels = tuple(module.get_function(name) for name in kernel_names(dtype_name, kind))
        _kernels[key] = kernels
    return kernels


def _stream(cp, device: torch.device):
    """CuPy handle of PyTorch's current stream on ``device``."""
    ts = torch.cuda.current_stream(device)
    key = (device.index, ts.cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        from_external = getattr(cp.cuda.Stream, 'from_external', None)  # CuPy >= 14
        if from_external is not None and hasattr(ts, '__cuda_stream__'):
            try:
                stream = from_external(ts)
            except (TypeError, ValueError):
                stream = None
        if stream is None:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                stream = cp.cuda.ExternalStream(ts.cuda_stream, device.index)
        _streams[key] = stream
    return stream


def _launch(kernel, device: torch.device, N: int, args) -> None:
    global launch_count
    cp = _load()
    blocks = (N + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    with cp.cuda.Device(device.index), _stream(cp, device):
        kernel((blocks,), (THREADS_PER_BLOCK,), args)
    launch_count += 1


def _p(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _scalars(T, N, k, c, theta_p, theta_n, k_pos, k_neg, *rest):
    """The scalar kernel arguments with the exact C types of cf_kernel.cuh."""
    import numpy as np
    return (np.int32(T), np.int64(N), np.float32(k), np.float32(c), np.float64(theta_p),
            np.float64(theta_n), np.int32(k_pos), np.int32(k_neg)) + tuple(map(np.int32, rest))


class CFMultiStepCuPy(torch.autograd.Function):
    """Fused multi-step CF neuron on contiguous ``[T, N]`` CUDA tensors (see
    :func:`cf_multi_step_cupy`). Saves only the float32 ``h`` (and TSG's ``alpha``), and nothing
    when no input requires a gradient."""

    @staticmethod
    def forward(ctx, x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset,
                return_h_seq, return_v_seq, grad_enabled):
        T, N = x.shape
        dtype_name = DTYPES[x.dtype]
        device = x.device
        is_f32 = x.dtype == torch.float32
        # needs_input_grad is True under torch.no_grad() too: ask the caller's grad mode as well
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        s = torch.empty_like(x)
        v_last = torch.empty_like(v0)
        h_save = (torch.empty((T, N), dtype=torch.float32, device=device)
                  if needs_grad or (return_h_seq and is_f32) else None)
        h_out = torch.empty_like(x) if return_h_seq and not is_f32 else None
        v_seq = torch.empty_like(x) if return_v_seq else None
        if N > 0:
            forward_kernel, _ = get_kernels(device.index, dtype_name, kind)
            _launch(forward_kernel, device, N,
                    (x.data_ptr(), v0.data_ptr(), s.data_ptr(), _p(h_save), _p(h_out), _p(v_seq),
                     v_last.data_ptr()) + _scalars(T, N, k, c, theta_p, theta_n, k_pos, k_neg))
        elif T == 0:
            v_last.copy_(v0)
        if needs_grad:
            ctx.save_for_backward(h_save, alpha)
            ctx.params = (dtype_name, kind, x.dtype, k, c, theta_p, theta_n, k_pos, k_neg,
                          int(detach_reset))
        ctx.set_materialize_grads(False)
        h_ret = (h_save if is_f32 else h_out) if return_h_seq else None
        return s, v_last, h_ret, v_seq

    @staticmethod
    def backward(ctx, grad_s, grad_v_last, grad_h, grad_v_seq):
        h_save, alpha = ctx.saved_tensors
        dtype_name, kind, dtype, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset = ctx.params
        T, N = h_save.shape
        device = h_save.device
        grad_s, grad_h, grad_v_seq, grad_v_last = (grad_view(g, dtype) for g in
                                                   (grad_s, grad_h, grad_v_seq, grad_v_last))
        grad_x = torch.empty((T, N), dtype=dtype, device=device)
        grad_v0 = torch.empty(N, dtype=dtype, device=device)
        grad_alpha = (torch.zeros(T, dtype=torch.float32, device=device)
                      if kind == 'tsg' and ctx.needs_input_grad[2] else None)
        if N > 0:
            _, backward_kernel = get_kernels(device.index, dtype_name, kind)
            _launch(backward_kernel, device, N,
                    (h_save.data_ptr(), _p(grad_s), _p(grad_h), _p(grad_v_seq), _p(grad_v_last),
                     alpha.data_ptr(), grad_x.data_ptr(), grad_v0.data_ptr(), _p(grad_alpha))
                    + _scalars(T, N, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset))
        elif T == 0:
            grad_v0 = (grad_v_last if grad_v_last is not None
                       else torch.zeros(N, dtype=dtype, device=device))
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_v0 if ctx.needs_input_grad[1] else None,
                grad_alpha) + (None,) * 11


def cf_multi_step_cupy(x_seq: torch.Tensor, v: torch.Tensor, tau: float = 4 / 3,
                       decay_input: bool = False, v_threshold: float = 1.0,
                       v_threshold_neg: Optional[float] = None, k_pos: int = 2, k_neg: int = 2,
                       surrogate_function=None, detach_reset: bool = False, t_start: int = 0,
                       return_h_seq: bool = False, return_v_seq: bool = False):
    r"""Multi-step CF neuron on the CuPy CUDA kernels; the contract of
    :func:`spikingjelly_cf.functional.neuron.cf_multi_step_ref` for CUDA tensors of dtype
    float32, float16 or bfloat16 (``v`` is cast to ``x_seq``'s dtype).

    Shape: ``x_seq`` ``[T, *]``, ``v`` ``[*]``; returns ``s_seq`` ``[T, *]``, ``v_last`` ``[*]``,
    ``h_seq`` / ``v_seq`` ``[T, *]`` or ``None``, all in ``x_seq``'s dtype.
    """
    if not isinstance(x_seq, torch.Tensor) or not x_seq.is_cuda or x_seq.dtype not in DTYPES:
        raise TypeError(f"backend 'cupy' runs CUDA tensors of dtype float32, float16 or bfloat16, "
                        f"got {getattr(x_seq, 'dtype', type(x_seq).__name__)} on "
                        f"{getattr(x_seq, 'device', '?')}")
    if _load() is None:
        raise RuntimeError(f"backend 'cupy' is unavailable: {_reason}")
    call = prepare('cupy', x_seq, v, tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                   surrogate_function, detach_reset, t_start)
    s, v_last, h, v_seq = CFMultiStepCuPy.apply(
        call.x, call.v0, call.alpha, call.kind, call.k, call.c, call.theta_p, call.theta_n,
        call.k_pos, call.k_neg, call.detach_reset, bool(return_h_seq), bool(return_v_seq),
        torch.is_grad_enabled())
    T, tail = x_seq.shape[0], call.tail
    return (s.view(T, *tail), v_last.view(tail), None if h is None else h.view(T, *tail),
            None if v_seq is None else v_seq.view(T, *tail))

