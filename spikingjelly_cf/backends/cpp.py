r"""Backend ``'cpp'``: the compiled CPU kernel (float32 arithmetic, OpenMP over neurons).

The kernel is ``csrc/cf_cpu.c``, built by ``setup.py`` as the optional extension module
``spikingjelly_cf._cf_cpu``; its per-neuron arithmetic is ``csrc/cf_step.h``, the same header the
CUDA kernels compile. The module itself is empty: the two C functions ``cf_cpu_forward`` and
``cf_cpu_backward`` are called through :mod:`ctypes`, which releases the GIL during the call.
They use ``torch.get_num_threads()`` threads (one in a build without OpenMP).

Storage dtypes: float32, float16 and bfloat16, as on CUDA. A half or bfloat16 call computes in
float32 (each row of the input widened in the kernel, the state carried in float32, the saved
``h`` float32 or memory-lean) and rounds only its outputs to nearest even, so its spikes are
exactly those of a float32 call on the same (rounded) inputs. float64 runs on the reference
(``backend='cpp'`` says so once with a ``RuntimeWarning``).

If the extension is not built (no compiler at install time), :func:`available` is ``False``,
:func:`unavailable_reason` says why, and the dispatcher uses the reference with a one-time
warning. Where the compiler has no OpenMP (macOS clang, MSVC), ``setup.py`` builds the kernel
without it (single-threaded); :func:`build_info` says which build is loaded.

Environment variables:

* ``SPIKINGJELLY_CF_DISABLE_CPP=1`` disables the backend;
* ``SPIKINGJELLY_CF_CPP_LIBRARY=/path/to/lib.so`` loads that shared library instead of the
  package's extension (a build of ``csrc/cf_cpu.c`` with other flags, e.g. without OpenMP; see
  the file's header for the command). A path that does not load makes the backend unavailable
  with the reason, never silently the package's own build.

Build it in a source checkout with ``python setup.py build_ext --inplace``; to see whether a
build of your own computes what the reference computes, load it with
``SPIKINGJELLY_CF_CPP_LIBRARY`` and run ``python -m spikingjelly_cf check --backends cpp``.
"""
import ctypes
import importlib.util
import os
import threading
from typing import Optional

import torch

from ._common import KIND_CODES, grad_view, ptr
from ._ops import define_kernel_ops, lean_shape

__all__ = ['available', 'unavailable_reason', 'cf_multi_step_cpp', 'library_path', 'empty_cache',
           'pooled_bytes', 'build_info', 'DTYPES', 'LIBRARY_ENV']

_ABI_VERSION = 3  # CF_ABI_VERSION in csrc/cf_cpu.c

#: Storage dtypes of the kernel and their codes (``CF_DT_*`` in ``csrc/cf_cpu.c``).
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

#: Environment variable naming a shared library to load instead of the package's extension.
LIBRARY_ENV = 'SPIKINGJELLY_CF_CPP_LIBRARY'

_lock = threading.Lock()
_lib = None
_path: Optional[str] = None
_source: Optional[str] = None
_reason: Optional[str] = None

_p, _i64, _i32, _f32, _f64 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float,
                              ctypes.c_double)


def _locate():
    """``(path, source)`` of the library to load, or ``(None, reason)``."""
    override = os.environ.get(LIBRARY_ENV, '')
    if override:
        if not os.path.isfile(override):
            return None, f'{LIBRARY_ENV}={override} is not a file'
        return override, LIBRARY_ENV
    try:
        spec = importlib.util.find_spec('spikingjelly_cf._cf_cpu')
    except (ImportError, ValueError):  # pragma: no cover - broken package layout
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None, ('the compiled CPU kernel spikingjelly_cf._cf_cpu is not built (install '
                      'with a C compiler, or run `python setup.py build_ext --inplace` in a '
                      'source checkout)')
    return spec.origin, 'package'


def _load():
    """Load the extension once; on failure remember why."""
    global _lib, _path, _source, _reason
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get('SPIKINGJELLY_CF_DISABLE_CPP', '') not in ('', '0'):
            _reason = 'disabled by SPIKINGJELLY_CF_DISABLE_CPP'
            return None
        path, source = _locate()
        if path is None:
            _reason = source
            return None
        try:
            lib = ctypes.CDLL(path)
            version = lib.cf_cpu_abi_version()
        except (OSError, AttributeError) as exc:
            _reason = f'cannot load {path}: {exc}'
            return None
        if version != _ABI_VERSION:
            _reason = (f'{path} has kernel ABI {version}, this Python code needs '
                       f'{_ABI_VERSION}: rebuild it (`python setup.py build_ext --inplace`)')
            return None
        lib.cf_cpu_forward.restype = _i32
        lib.cf_cpu_forward.argtypes = [_p, _p, _p, _p, _p, _p, _p, _p, _i32, _i64, _i64, _f32,
                                       _f32, _f64, _f64, _i32, _i32, _i32]
        lib.cf_cpu_backward.restype = _i32
        lib.cf_cpu_backward.argtypes = [_i32, _p, _p, _p, _i32, _p, _p, _p, _p, _p, _p, _p, _p,
                                        _i64, _i64, _f32, _f32, _f64, _f64, _i32, _i32, _i32,
                                        _i32]
        lib.cf_cpu_openmp.restype = _i32
        lib.cf_cpu_max_threads.restype = _i32
        _lib, _path, _source = lib, path, source
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


def build_info() -> dict:
    """Which CPU kernel is loaded and how it was built.

    Returns a dict with ``available`` (bool), ``reason`` (why not, or ``''``), ``library`` (the
    file's path or ``None``), ``source`` (``'package'``, or ``'SPIKINGJELLY_CF_CPP_LIBRARY'`` when
    that variable chose it), ``abi_version``, ``openmp`` (bool: built with OpenMP),
    ``openmp_version`` (the ``_OPENMP`` date, e.g. ``201511``, or ``None``), ``max_threads`` (the
    kernel's ``omp_get_max_threads()``, 1 without OpenMP), ``threads`` (how many threads a call
    uses now: ``torch.get_num_threads()``, or 1 without OpenMP) and ``dtypes``.

    >>> info = build_info()
    >>> sorted(info)  # doctest: +NORMALIZE_WHITESPACE
    ['abi_version', 'available', 'dtypes', 'library', 'max_threads', 'openmp', 'openmp_version',
     'reason', 'source', 'threads']
    """
    lib = _load()
    info = dict(available=lib is not None, reason=_reason or '', library=_path, source=_source,
                abi_version=None, openmp=False, openmp_version=None, max_threads=None,
                threads=None, dtypes=tuple(str(d).replace('torch.', '') for d in DTYPES))
    if lib is not None:
        version = int(lib.cf_cpu_openmp())
        info.update(abi_version=int(lib.cf_cpu_abi_version()), openmp=version > 0,
                    openmp_version=version or None, max_threads=int(lib.cf_cpu_max_threads()),
                    threads=torch.get_num_threads() if version > 0 else 1)
    return info


#: Number of kernel launches (forward and backward) since import; tests use it to prove the
#: compiled path ran.
launch_count = 0


_ERRORS = {-2: 'inconsistent saved form or K beyond the memory-lean limit',
           -3: 'unsupported storage dtype'}


def _check(rc: int, what: str) -> None:
    if rc in _ERRORS:  # internal invariants: the Python side checks these first
        raise RuntimeError(f'spikingjelly_cf._cf_cpu: {what}: {_ERRORS[rc]}')
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


def _take(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    with _lock:
        free = _pool.get((numel, dtype))
        if free:
            return free.pop().view(shape)
    return torch.empty(shape, dtype=dtype)


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


def _dtype_code(dtype: torch.dtype, what: str) -> int:
    code = DTYPES.get(dtype)
    if code is None:
        raise TypeError(f"{what}: backend 'cpp' runs float32, float16 and bfloat16, got {dtype}")
    return code


def _forward(x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, save_h, return_h,
             return_v, lean=False):
    """Forward op body: one call of ``cf_cpu_forward`` on ``[T, N]`` tensors of a storage dtype.

    ``s``, ``v_last`` and ``v_seq`` come back in ``x``'s dtype, ``h`` in float32. With ``lean``
    (and ``save_h``, not ``return_h``) the saved tensor is the memory-lean form of
    :func:`._ops.lean_shape` instead of float32 ``h``."""
    global launch_count
    lib = _load()
    if lib is None:
        raise RuntimeError(f"backend 'cpp' is unavailable: {_reason}")
    dt = _dtype_code(x.dtype, 'cf_forward_cpp')
    T, N = x.shape
    x = x.contiguous()
    v0 = v0.to(x.dtype).contiguous()
    s = _output((T, N), x.dtype)
    v_last = _output((N,), x.dtype)
    code = off = None
    if return_h:  # handed to the caller: a tensor of its own
        h = _output((T, N), torch.float32)
    elif save_h and lean:  # memory-lean: read only by the backward pass, pooled
        h = None
        if kind == KIND_CODES['rect']:
            code = _take(lean_shape(kind, T, N), torch.uint8)
        else:
            off = _take(lean_shape(kind, T, N), torch.uint8)
    elif save_h:  # read only by the backward pass: pooled (given back by the autograd node)
        h = _take((T, N))
    else:
        h = None
    v_seq = _output((T, N), x.dtype) if return_v else None
    rc = lib.cf_cpu_forward(x.data_ptr(), v0.data_ptr(), s.data_ptr(), ptr(h), ptr(v_seq),
                            v_last.data_ptr(), ptr(code), ptr(off), dt, T, N, k, c, theta_p,
                            theta_n, k_pos, k_neg, torch.get_num_threads())
    _check(rc, 'forward')
    launch_count += 1
    empty = x.new_empty((0,))
    saved = code if code is not None else (off if off is not None else h)
    return (s, v_last, (empty.float() if saved is None else saved),
            (empty.clone() if v_seq is None else v_seq))


def _step_forward(x, v, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, save_h):
    """One time step for CFNode's lean single-step path (``spikingjelly_cf._step``): the forward
    op body for ``T = 1`` on contiguous ``x`` and ``v`` of one shape and storage dtype, without
    the reshaping and the empty outputs the op needs. Returns ``(s, v_new, h)``, ``s`` and
    ``v_new`` shaped like ``x`` in its dtype, ``h`` the pooled float32 ``[1, N]`` buffer when
    ``save_h``, else ``None``."""
    global launch_count
    n = x.numel()
    s = _output(x.shape, x.dtype)
    v_new = _output(x.shape, x.dtype)
    h = _take((1, n)) if save_h else None
    _check(_lib.cf_cpu_forward(x.data_ptr(), v.data_ptr(), s.data_ptr(), ptr(h), None,
                               v_new.data_ptr(), None, None, DTYPES[x.dtype], 1, n, k, c,
                               theta_p, theta_n, k_pos, k_neg, torch.get_num_threads()),
           'forward')
    launch_count += 1
    return s, v_new, h


def _backward(h, alpha, grad_s, grad_h, grad_v_seq, grad_v_last, kind, k, c, theta_p, theta_n,
              k_pos, k_neg, detach_reset, need_grad_alpha, grad_dtype):
    """Backward op body: one call of ``cf_cpu_backward``; ``h`` is float32 ``[T, N]``, or a
    memory-lean form (``uint8`` window codes ``[T, N]``, CFRect only, or ``uint8`` offsets
    ``[T, 3, N]``). The incoming gradients are read and the outgoing ones written in
    ``grad_dtype`` (float32, float16 or bfloat16)."""
    global launch_count
    lib = _load()
    dt = _dtype_code(grad_dtype, 'cf_backward_cpp')
    T, N = h.shape[0], h.shape[-1]
    h = h.contiguous()
    alpha = alpha.to(torch.float32).contiguous()
    grad_s, grad_h, grad_v_seq, grad_v_last = (grad_view(g, grad_dtype) for g in
                                               (grad_s, grad_h, grad_v_seq, grad_v_last))
    h32 = code = off = None
    if h.dtype == torch.float32 and h.dim() == 2:
        h32 = h
    elif h.dtype == torch.uint8 and h.dim() == 2 and kind == KIND_CODES['rect']:
        code = h
    elif h.dtype == torch.uint8 and h.dim() == 3 and h.shape[1] == 3:
        off = h
    else:
        raise TypeError(f'cf_backward_cpp: the saved h must be float32 [T, N], uint8 window '
                        f'codes [T, N] (CFRect) or uint8 offsets [T, 3, N], got {h.dtype} '
                        f'{tuple(h.shape)} for surrogate kind {kind}')
    grad_x = _output((T, N), grad_dtype)
    grad_v0 = _output((N,), grad_dtype)
    grad_alpha = torch.empty(T if need_grad_alpha else 0, dtype=torch.float32)
    rc = lib.cf_cpu_backward(kind, ptr(h32), ptr(code), ptr(off), dt, ptr(grad_s), ptr(grad_h),
                             ptr(grad_v_seq), ptr(grad_v_last), alpha.data_ptr(),
                             grad_x.data_ptr(), grad_v0.data_ptr(),
                             ptr(grad_alpha if need_grad_alpha else None), T, N, k, c, theta_p,
                             theta_n, k_pos, k_neg, int(detach_reset), torch.get_num_threads())
    _check(rc, 'backward')
    launch_count += 1
    return grad_x, grad_v0, grad_alpha


def _check_call(x_seq) -> None:
    if not isinstance(x_seq, torch.Tensor) or x_seq.device.type != 'cpu' \
            or x_seq.dtype not in DTYPES:
        raise TypeError(f"backend 'cpp' runs CPU tensors of dtype float32, float16 or bfloat16, "
                        f"got {getattr(x_seq, 'dtype', type(x_seq).__name__)} on "
                        f"{getattr(x_seq, 'device', '?')}")


#: Multi-step CF neuron on the compiled CPU kernel (CPU tensors of dtype float32, float16 or
#: bfloat16; ``v`` is cast to ``x_seq``'s dtype); the contract of
#: :func:`spikingjelly_cf.backends.reference.cf_multi_step_ref`. Shape: ``x_seq`` ``[T, *]``,
#: ``v`` ``[*]``; returns ``s_seq`` ``[T, *]``, ``v_last`` ``[*]``, ``h_seq`` / ``v_seq``
#: ``[T, *]`` or ``None`` (``h_seq`` computed in float32, returned in ``x_seq``'s dtype).
#: Gradients flow to ``x_seq``, ``v`` and TSG's parameter.
cf_multi_step_cpp = define_kernel_ops('cpp', 'cpu', _forward, _backward, recycle_h=_give,
                                      check_call=_check_call, supports_lean=True,
                                      step_forward=_step_forward)
