r"""Backend ``'cpp'``: the compiled CPU kernel (float32, OpenMP over neurons).

The kernel is ``csrc/cf_cpu.c``, built by ``setup.py`` as the optional extension module
``spikingjelly_cf._cf_cpu``; its per-neuron arithmetic is ``csrc/cf_step.h``, the same header the
CUDA kernels compile. The module itself is empty: the two C functions ``cf_cpu_forward`` and
``cf_cpu_backward`` are called through :mod:`ctypes`, which releases the GIL during the call.
They use ``torch.get_num_threads()`` threads.

If the extension is not built (no compiler at install time), :func:`available` is ``False``,
:func:`unavailable_reason` says why, and the dispatcher uses the reference with a one-time
warning. Setting the environment variable ``SPIKINGJELLY_CF_DISABLE_CPP=1`` disables the backend.
Build it in a source checkout with ``python setup.py build_ext --inplace``.
"""
import ctypes
import importlib.util
import os
import threading
from typing import Optional

import torch

from ._common import KIND_CODES, grad_view, ptr
from ._ops import define_kernel_ops, lean_dtype

__all__ = ['available', 'unavailable_reason', 'cf_multi_step_cpp', 'library_path', 'empty_cache',
           'pooled_bytes']

_ABI_VERSION = 2  # CF_ABI_VERSION in csrc/cf_cpu.c

_lock = threading.Lock()
_lib = None
_path: Optional[str] = None
_reason: Optional[str] = None

_p, _i64, _i32, _f32, _f64 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float,
                              ctypes.c_double)


def _load():
    """Load the extension once; on failure remember why."""
    global _lib, _path, _reason
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get('SPIKINGJELLY_CF_DISABLE_CPP', '') not in ('', '0'):
            _reason = 'disabled by SPIKINGJELLY_CF_DISABLE_CPP'
            return None
        try:
            spec = importlib.util.find_spec('spikingjelly_cf._cf_cpu')
        except (ImportError, ValueError):  # pragma: no cover - broken package layout
            spec = None
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            _reason = ('the compiled CPU kernel spikingjelly_cf._cf_cpu is not built (install with '
                       'a C compiler that supports OpenMP, or run '
                       '`python setup.py build_ext --inplace` in a source checkout)')
            return None
        try:
            lib = ctypes.CDLL(spec.origin)
            version = lib.cf_cpu_abi_version()
        except (OSError, AttributeError) as exc:
            _reason = f'cannot load {spec.origin}: {exc}'
            return None
        if version != _ABI_VERSION:
            _reason = (f'{spec.origin} has kernel ABI {version}, this Python code needs '
                       f'{_ABI_VERSION}: rebuild it (`python setup.py build_ext --inplace`)')
            return None
        lib.cf_cpu_forward.restype = _i32
        lib.cf_cpu_forward.argtypes = [_p, _p, _p, _p, _p, _p, _i64, _i64, _f32, _f32, _f64, _f64,
                                       _i32, _i32, _i32]
        lib.cf_cpu_backward.restype = _i32
        lib.cf_cpu_backward.argtypes = [_i32, _p, _p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _f32,
                                        _f32, _f64, _f64, _i32, _i32, _i32, _i32]
        # memory-lean variants: uint8 window codes / binary16 h beside (or instead of) float32 h
        lib.cf_cpu_forward_ex.restype = _i32
        lib.cf_cpu_forward_ex.argtypes = [_p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _f32, _f32,
                                          _f64, _f64, _i32, _i32, _i32]
        lib.cf_cpu_backward_ex.restype = _i32
        lib.cf_cpu_backward_ex.argtypes = [_i32, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _i64,
                                           _i64, _f32, _f32, _f64, _f64, _i32, _i32, _i32, _i32]
        _lib, _path = lib, spec.origin
        return _lib


def available() -> bool:
    """Whether the compiled CPU kernel is built and loadable."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is ``False`` (empty string when it is ``True``)."""
    _load()
    return _reason or ''


def library_path() -> Optional[str]:
    """Path of the loaded extension file, or ``None``."""
    _load()
    return _path


#: Number of kernel launches (forward and backward) since import; tests use it to prove the
#: compiled path ran.
launch_count = 0


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f'spikingjelly_cf._cf_cpu: {what} could not allocate its scratch buffer')


# -- a pool for the h_seq buffers that only the backward pass reads ---------------------------------
# A fresh [T, N] tensor pays first-touch page faults (on the 2-core CI VM ~0.3 ms per MiB, more
# than the kernel itself). The h_seq saved for backward never leaves this module, so it is taken
# from a pool and given back when its autograd node is freed (weakref.finalize on ctx), which is
# safe with retain_graph: the buffer is reused only once no graph can read it. Not pooled while
# saved-tensor hooks are active (torch.utils.checkpoint, save_on_cpu): see _ops._saved_tensors_hooked.
_POOL_PER_SIZE = 32
_pool: dict = {}


def _take(T: int, N: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with _lock:
        free = _pool.get((T * N, dtype))
        if free:
            return free.pop().view(T, N)
    return torch.empty(T, N, dtype=dtype)


def _give(buffer: torch.Tensor) -> None:
    with _lock:
        free = _pool.setdefault((buffer.numel(), buffer.dtype), [])
        if len(free) < _POOL_PER_SIZE:
            free.append(buffer)


# -- recycled buffers for the outputs ---------------------------------------------------------------
# The outputs (s, v_last, grad_x, ...) are the caller's, so they cannot go back to the pool above
# when an autograd node dies. But a large fresh output pays the first touch of every page it is
# written to (glibc maps allocations of 32 MiB and more freshly each time; at T=8, N=2^20 that is
# several times the kernel's own time). So outputs of at least _OUT_POOL_MIN_BYTES are aliases
# of buffers kept here (up to _OUT_POOL_PER_SIZE per size), and a buffer is handed out again
# only when no tensor references its storage any more: the pool's own tensor and the temporary
# storage object of the check are then the only references (torch's storage use count), so a
# returned output, any view of it, an autograd graph or a NumPy array that still holds it keeps
# the buffer out of circulation. Without that count (another torch) outputs are plain new tensors.
_OUT_POOL_MIN_BYTES = 1 << 20
_OUT_POOL_PER_SIZE = 4
_out_pool: dict = {}
_storage_use_count = getattr(torch._C, '_storage_Use_Count', None)


def _output(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new contiguous output of ``shape``: a free recycled buffer when it is large (see above)."""
    numel = 1
    for d in shape:
        numel *= d
    if _storage_use_count is None or numel * dtype.itemsize < _OUT_POOL_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        buffers = _out_pool.setdefault((numel, dtype), [])
        for buf in buffers:
            storage = buf.untyped_storage()
            if _storage_use_count(storage._cdata) == 2:  # buf and `storage`: nobody else
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        buf = torch.empty(numel, dtype=dtype)
        if len(buffers) < _OUT_POOL_PER_SIZE:
            buffers.append(buf)
        return torch.empty(0, dtype=dtype).set_(buf.untyped_storage(), 0, shape)


def pooled_bytes() -> int:
    """Bytes held by the CPU kernel's buffer pools (saved ``h`` and recycled outputs)."""
    with _lock:
        return sum(b.untyped_storage().nbytes() for pool in (_pool, _out_pool)
                   for bufs in pool.values() for b in bufs)


def empty_cache() -> None:
    """Release the CPU kernel's pooled buffers: the saved ``h_seq`` pool and the recycled
    output buffers (like ``torch.cuda.empty_cache``; outputs still in use stay valid)."""
    with _lock:
        _pool.clear()
        _out_pool.clear()


def _forward(x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, save_h, return_h,
             return_v, lean=False):
    """Forward op body: one call of ``cf_cpu_forward_ex`` on ``[T, N]`` float32 tensors.

    With ``lean`` (and ``save_h``, not ``return_h``) the saved tensor is the ``uint8`` window
    codes (CFRect) or ``float16`` ``h`` instead of float32 ``h`` (memory-lean mode)."""
    global launch_count
    lib = _load()
    if lib is None:
        raise RuntimeError(f"backend 'cpp' is unavailable: {_reason}")
    T, N = x.shape
    x = x.contiguous()
    v0 = v0.contiguous()
    s = _output((T, N))
    v_last = _output((N,))
    code = h16 = None
    if return_h:  # handed to the caller: a tensor of its own
        h = _output((T, N))
    elif save_h and lean:  # memory-lean: read only by the backward pass, pooled
        h = None
        if lean_dtype(kind) == torch.uint8:
            code = _take(T, N, torch.uint8)
        else:
            h16 = _take(T, N, torch.float16)
    elif save_h:  # read only by the backward pass: pooled (given back by the autograd node)
        h = _take(T, N)
    else:
        h = None
    v_seq = _output((T, N)) if return_v else None
    rc = lib.cf_cpu_forward_ex(x.data_ptr(), v0.data_ptr(), s.data_ptr(), ptr(h), ptr(v_seq),
                               v_last.data_ptr(), ptr(code), ptr(h16), T, N, k, c, theta_p,
                               theta_n, k_pos, k_neg, torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"memory='lean' with CFRect needs k_pos, k_neg <= 15, got {k_pos}, "
                         f"{k_neg}")
    _check(rc, 'forward')
    launch_count += 1
    empty = x.new_empty((0,))
    saved = code if code is not None else (h16 if h16 is not None else h)
    return s, v_last, (empty if saved is None else saved), (empty.clone() if v_seq is None
                                                             else v_seq)


def _step_forward(x, v, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, save_h):
    """One time step for CFNode's lean single-step path (``spikingjelly_cf._step``): the forward
    op body for ``T = 1`` on contiguous float32 ``x`` and ``v`` of one shape, without the
    reshaping and the empty outputs the op needs. Returns ``(s, v_new, h)``, ``s`` and ``v_new``
    shaped like ``x``, ``h`` the pooled ``[1, N]`` buffer when ``save_h``, else ``None``."""
    global launch_count
    n = x.numel()
    s = _output(x.shape)
    v_new = _output(x.shape)
    h = _take(1, n) if save_h else None
    _check(_lib.cf_cpu_forward(x.data_ptr(), v.data_ptr(), s.data_ptr(), ptr(h), None,
                               v_new.data_ptr(), 1, n, k, c, theta_p, theta_n, k_pos, k_neg,
                               torch.get_num_threads()), 'forward')
    launch_count += 1
    return s, v_new, h


def _backward(h, alpha, grad_s, grad_h, grad_v_seq, grad_v_last, kind, k, c, theta_p, theta_n,
              k_pos, k_neg, detach_reset, need_grad_alpha, grad_dtype):
    """Backward op body: one call of ``cf_cpu_backward_ex``; ``h`` is float32, or the
    memory-lean ``uint8`` window codes (CFRect) or ``float16`` ``h``."""
    global launch_count
    lib = _load()
    T, N = h.shape
    f32 = torch.float32
    h = h.contiguous()
    alpha = alpha.contiguous()
    grad_s, grad_h, grad_v_seq, grad_v_last = (grad_view(g, f32) for g in
                                               (grad_s, grad_h, grad_v_seq, grad_v_last))
    h32 = h if h.dtype == f32 else None
    code = h if h.dtype == torch.uint8 else None
    h16 = h if h.dtype == torch.float16 else None
    if h32 is None and code is None and h16 is None:
        raise TypeError(f'cf_backward_cpp: saved h must be float32, uint8 or float16, got '
                        f'{h.dtype}')
    if code is not None and kind != KIND_CODES['rect']:
        raise ValueError('cf_backward_cpp: uint8 window codes are CFRect-only')
    grad_x = _output((T, N))
    grad_v0 = _output((N,))
    grad_alpha = torch.empty(T if need_grad_alpha else 0, dtype=f32)
    rc = lib.cf_cpu_backward_ex(kind, ptr(h32), ptr(code), ptr(h16), ptr(grad_s), ptr(grad_h),
                                ptr(grad_v_seq), ptr(grad_v_last), alpha.data_ptr(),
                                grad_x.data_ptr(), grad_v0.data_ptr(),
                                ptr(grad_alpha if need_grad_alpha else None), T, N, k, c,
                                theta_p, theta_n, k_pos, k_neg, int(detach_reset),
                                torch.get_num_threads())
    if rc == -2:
        raise ValueError('cf_backward_cpp: inconsistent saved form (window codes need CFRect '
                         'and K <= 15)')
    _check(rc, 'backward')
    launch_count += 1
    return grad_x.to(grad_dtype), grad_v0.to(grad_dtype), grad_alpha


def _check_call(x_seq) -> None:
    if not isinstance(x_seq, torch.Tensor) or x_seq.device.type != 'cpu' \
            or x_seq.dtype != torch.float32:
        raise TypeError(f"backend 'cpp' runs float32 CPU tensors, got "
                        f"{getattr(x_seq, 'dtype', type(x_seq).__name__)} on "
                        f"{getattr(x_seq, 'device', '?')}")


#: Multi-step CF neuron on the compiled CPU kernel (float32 CPU tensors); the contract of
#: :func:`spikingjelly_cf.backends.reference.cf_multi_step_ref`. Shape: ``x_seq`` ``[T, *]``,
#: ``v`` ``[*]``; returns ``s_seq`` ``[T, *]``, ``v_last`` ``[*]``, ``h_seq`` / ``v_seq``
#: ``[T, *]`` or ``None``. Gradients flow to ``x_seq``, ``v`` and TSG's parameter.
cf_multi_step_cpp = define_kernel_ops('cpp', 'cpu', _forward, _backward, recycle_h=_give,
                                      check_call=_check_call, supports_lean=True,
                                      step_forward=_step_forward)
