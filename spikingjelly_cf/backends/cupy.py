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
added with one ``atomicAdd`` per block (so its last bits may vary between runs): under
``torch.use_deterministic_algorithms(True)`` that backward pass raises ``RuntimeError`` (a
warning with ``warn_only=True``), as PyTorch's own non-deterministic ops do, and names the
deterministic backends; ``backend='auto'`` then uses ``'triton'`` for TSG.

CuPy is imported only when this backend is first used; the package works without it.
"""
import threading
import warnings
from typing import Optional

import torch

from ._common import KIND_CODES, grad_view
from ._ops import define_kernel_ops
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


_KIND_NAMES = {code: name for name, code in KIND_CODES.items()}


def _forward(x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, save_h, return_h,
             return_v):
    """Forward op body: one launch of the forward kernel on ``[T, N]`` CUDA tensors."""
    if _load() is None:
        raise RuntimeError(f"backend 'cupy' is unavailable: {_reason}")
    T, N = x.shape
    device = x.device
    x = x.contiguous()
    v0 = v0.contiguous()
    s = torch.empty_like(x)
    v_last = torch.empty_like(v0)
    h = (torch.empty((T, N), dtype=torch.float32, device=device) if save_h or return_h
         else x.new_empty((0,), dtype=torch.float32))
    v_seq = torch.empty_like(x) if return_v else x.new_empty((0,))
    if N > 0:
        forward_kernel, _ = get_kernels(device.index, DTYPES[x.dtype], _KIND_NAMES[kind])
        _launch(forward_kernel, device, N,
                (x.data_ptr(), v0.data_ptr(), s.data_ptr(), _p(h if h.numel() else None), 0,
                 _p(v_seq if return_v else None), v_last.data_ptr())
                + _scalars(T, N, k, c, theta_p, theta_n, k_pos, k_neg))
    return s, v_last, h, v_seq


NONDETERMINISTIC_MESSAGE = (
    "backend 'cupy': the gradient of TSG's a_t is summed with atomicAdd, which is not "
    "deterministic, and torch.use_deterministic_algorithms(True) is set. Use backend='triton' "
    "(deterministic on CUDA; backend='auto' picks it for TSG in this mode) or the reference "
    "backend='torch', or turn determinism off for this call")


def _alert_nondeterministic() -> None:
    """PyTorch's convention for an op without a deterministic implementation."""
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(NONDETERMINISTIC_MESSAGE, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(NONDETERMINISTIC_MESSAGE)


def _backward(h, alpha, grad_s, grad_h, grad_v_seq, grad_v_last, kind, k, c, theta_p, theta_n,
              k_pos, k_neg, detach_reset, need_grad_alpha, grad_dtype):
    """Backward op body: one launch of the backward kernel."""
    if need_grad_alpha and torch.are_deterministic_algorithms_enabled():
        _alert_nondeterministic()
    T, N = h.shape
    device = h.device
    h = h.contiguous()
    alpha = alpha.contiguous()
    grad_s, grad_h, grad_v_seq, grad_v_last = (grad_view(g, grad_dtype) for g in
                                               (grad_s, grad_h, grad_v_seq, grad_v_last))
    grad_x = torch.empty((T, N), dtype=grad_dtype, device=device)
    grad_v0 = torch.empty(N, dtype=grad_dtype, device=device)
    grad_alpha = torch.zeros(T if need_grad_alpha else 0, dtype=torch.float32, device=device)
    if N > 0:
        _, backward_kernel = get_kernels(device.index, DTYPES[grad_dtype], _KIND_NAMES[kind])
        _launch(backward_kernel, device, N,
                (h.data_ptr(), _p(grad_s), _p(grad_h), _p(grad_v_seq), _p(grad_v_last),
                 alpha.data_ptr(), grad_x.data_ptr(), grad_v0.data_ptr(),
                 _p(grad_alpha if need_grad_alpha else None))
                + _scalars(T, N, k, c, theta_p, theta_n, k_pos, k_neg, int(detach_reset)))
    return grad_x, grad_v0, grad_alpha


@torch.compiler.assume_constant_result
def _is_available() -> bool:
    """``available()`` as a constant for Dynamo (``_load`` takes a lock, which Dynamo cannot
    trace)."""
    return available()


def _check_call(x_seq) -> None:
    if not isinstance(x_seq, torch.Tensor) or not x_seq.is_cuda or x_seq.dtype not in DTYPES:
        raise TypeError(f"backend 'cupy' runs CUDA tensors of dtype float32, float16 or bfloat16, "
                        f"got {getattr(x_seq, 'dtype', type(x_seq).__name__)} on "
                        f"{getattr(x_seq, 'device', '?')}")
    if not _is_available():
        raise RuntimeError(f"backend 'cupy' is unavailable: {_reason}")


#: Multi-step CF neuron on the CuPy CUDA kernels; the contract of
#: :func:`spikingjelly_cf.backends.reference.cf_multi_step_ref` for CUDA tensors of dtype
#: float32, float16 or bfloat16 (``v`` is cast to ``x_seq``'s dtype). ``h_seq`` is computed in
#: float32 and returned in ``x_seq``'s dtype.
cf_multi_step_cupy = define_kernel_ops('cupy', 'cuda', _forward, _backward,
                                       check_call=_check_call)
