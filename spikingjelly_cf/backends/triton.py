r"""Backend ``'triton'``: fused multi-step CF kernels written in Triton, float32/float16/bfloat16.

The kernels (:mod:`.triton_kernels`) follow ``csrc/cf_step.h`` operation by operation: one
program per block of ``BLOCK`` neurons, the loop over time inside, float32 arithmetic and state
(the pre-reset potentials saved for the backward pass are float32), outputs rounded once to the
storage dtype. Every launch passes ``enable_fp_fusion=False``, so no multiply-add is contracted
into an FMA and float32 spikes equal those of the reference ``cf_multi_step_ref`` bit for bit.
The TSG gradient of each :math:`a_t` is summed per program into a ``[programs, T]`` buffer that
is reduced afterwards, so it is deterministic (no atomics).

The kernels are the ops ``spikingjelly_cf::cf_forward_triton`` / ``cf_backward_triton``
(:mod:`._ops`: fake implementations and autograd registered, so ``torch.compile(fullgraph=True)``
keeps them as graph nodes).

Test mode: with the environment variable ``TRITON_INTERPRET=1`` set before this backend is
first used, the kernels run in Triton's interpreter on **CPU tensors** (NumPy semantics, slow:
for tests only; ``backend='auto'`` never picks it). Without it the backend runs CUDA tensors
only. Only this backend's kernels follow the variable when they are first loaded (it is read
while ``@triton.jit`` decorates them), and the kernels call no ``@jit`` function of Triton's own
library, so they run interpreted whether or not Triton itself was imported in interpreter mode.
:func:`use_interpreter` switches at run time (the tests use it).

The interpreter cannot show FMA contraction (it never fuses), so ``enable_fp_fusion=False`` is
checked only by the GPU test ``tests/test_gpu.py::test_no_fma_contraction``.

Triton is imported only when the backend is first used; the package works without it. Triton
ships with PyTorch's CUDA wheels (``pip install triton`` otherwise).
"""
import importlib
import os
import sys
import threading
from typing import Optional, Tuple

import torch

from ._common import KIND_CODES
from ._ops import define_kernel_ops

__all__ = ['available', 'unavailable_reason', 'interpreted', 'device_types', 'use_interpreter',
           'cf_multi_step_triton', 'forward_impl', 'backward_impl', 'levels', 'launch_count',
           'DTYPES', 'BLOCK', 'NUM_WARPS']

#: Storage dtypes the kernels run.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Neurons per program (a power of two) and warps per program of the compiled kernels. Tests set
#: a smaller BLOCK to get several programs and a ragged last block on small inputs.
BLOCK = 1024
NUM_WARPS = 4

#: Number of kernel launches (forward and backward) since import: tests use it to prove the
#: Triton path ran.
launch_count = 0

_lock = threading.Lock()
_kernels = None  # the module .triton_kernels once imported
_reason: Optional[str] = None
_interpreted = False
_force_interpret: Optional[bool] = None  # use_interpreter()
_levels_cache = {}


def _load():
    """Import Triton and the kernels once; remember why not."""
    global _kernels, _reason, _interpreted
    with _lock:
        if _kernels is not None or _reason is not None:
            return _kernels
        if _force_interpret is None:
            interpret = os.environ.get('TRITON_INTERPRET', '0') == '1'
        else:
            interpret = _force_interpret
        if not interpret and not torch.cuda.is_available():
            _reason = ('PyTorch sees no CUDA device (set TRITON_INTERPRET=1 before the first use '
                       'to run the kernels in Triton\'s interpreter on CPU tensors, for tests)')
            return None
        try:  # Triton itself (and its own @jit library) as the environment says, ...
            import triton
            import triton.language  # noqa: F401
            from triton.runtime.interpreter import InterpretedFunction
        except Exception as exc:  # noqa: BLE001 - ImportError, broken installs, ...
            _reason = (f'Triton is not usable ({type(exc).__name__}: {exc}); it ships with '
                       f'PyTorch\'s CUDA wheels, or `pip install triton`')
            return None
        # ... and @triton.jit reads TRITON_INTERPRET while decorating: set it just while our
        # kernels are imported, so that only they are interpreted (or compiled)
        previous = os.environ.get('TRITON_INTERPRET')
        os.environ['TRITON_INTERPRET'] = '1' if interpret else '0'
        try:
            name = f'{__package__}.triton_kernels'
            if name in sys.modules:
                triton_kernels = importlib.reload(sys.modules[name])
            else:
                triton_kernels = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, broken installs, ...
            _reason = (f'Triton is not usable ({type(exc).__name__}: {exc}); it ships with '
                       f'PyTorch\'s CUDA wheels, or `pip install triton`')
            return None
        finally:
            if previous is None:
                del os.environ['TRITON_INTERPRET']
            else:
                os.environ['TRITON_INTERPRET'] = previous
        # the truth is what @triton.jit made of the kernels
        _interpreted = isinstance(triton_kernels.cf_forward_kernel, InterpretedFunction)
        _kernels = triton_kernels
        return _kernels


def use_interpreter(on: Optional[bool] = True) -> bool:
    """Test hook: (re)load the kernels in Triton's interpreter (``on=True``: CPU tensors), compiled
    (``False``: CUDA only), or as ``TRITON_INTERPRET`` says (``None``, the default behaviour).

    Only this backend's kernels are affected (the environment variable is set just while they are
    imported), so other Triton users of the process (TorchInductor, SpikingJelly 2.0) keep
    compiling. Returns :func:`available`.
    """
    global _kernels, _reason, _interpreted, _force_interpret
    with _lock:
        _force_interpret = on
        _kernels, _reason, _interpreted = None, None, False
    return available()


def available() -> bool:
    """Whether Triton imports and a CUDA device is visible (or the interpreter is on)."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is ``False`` (empty string when it is ``True``)."""
    _load()
    return _reason or ''


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at first use)."""
    _load()
    return _interpreted


def device_types() -> Tuple[str, ...]:
    """Device types the backend accepts: ``('cuda',)``, plus ``'cpu'`` in interpreter mode."""
    if _load() is None:
        return ()
    return ('cuda', 'cpu') if _interpreted else ('cuda',)


def levels(theta: float, count: int, device: torch.device) -> torch.Tensor:
    """The levels ``float32(j * theta)``, ``j = 1..count``, products in double (``cf_level``).

    Cached per ``(theta, count, device)``; at least one element (a dummy when ``count == 0``).
    """
    key = (float(theta), int(count), device)
    lv = _levels_cache.get(key)
    if lv is None:
        values = [j * float(theta) for j in range(1, count + 1)] or [0.0]
        lv = torch.tensor(values, dtype=torch.float64).to(torch.float32).to(device)
        _levels_cache[key] = lv
    return lv


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _bits(t: torch.Tensor) -> torch.Tensor:
    """What the kernels receive for a storage tensor: bfloat16 as its int16 bits."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch(kernel, grid, device: torch.device, *args, **meta) -> None:
    global launch_count
    if device.type == 'cuda':
        with torch.cuda.device(device):
            kernel[grid](*args, num_warps=NUM_WARPS, enable_fp_fusion=False, **meta)
    else:
        kernel[grid](*args, num_warps=NUM_WARPS, enable_fp_fusion=False, **meta)
    launch_count += 1


@torch.compiler.assume_constant_result
def _runs_on(device_type: str) -> bool:
    """Whether the kernels take tensors of ``device_type`` (a constant for ``torch.compile``)."""
    return device_type in (device_types() or ('cuda',))


@torch.compiler.assume_constant_result
def _is_available() -> bool:
    return available()


def _check_device(t: torch.Tensor) -> None:
    if not _runs_on(t.device.type):
        raise TypeError(f"backend 'triton' runs CUDA tensors (CPU tensors only in Triton's "
                        f"interpreter, TRITON_INTERPRET=1), got a tensor on {t.device}")
    if not _is_available():
        raise RuntimeError(f"backend 'triton' is unavailable: {unavailable_reason()}")


def forward_impl(x: torch.Tensor, v0: torch.Tensor, alpha: torch.Tensor, kind: int, k: float,
                 c: float, theta_p: float, theta_n: float, k_pos: int, k_neg: int, save_h: bool,
                 return_h: bool, return_v: bool):
    """Forward kernel on ``x`` ``[T, N]`` and ``v0`` ``[N]`` (the op layer's contract).

    Returns ``(s [T, N], v_last [N], h, v_seq)`` with ``s``, ``v_last``, ``v_seq`` in ``x``'s
    dtype, ``h`` float32 ``[T, N]`` when ``save_h or return_h`` else an empty ``[0]`` tensor, and
    ``v_seq`` empty ``[0]`` unless ``return_v``. ``alpha`` and ``kind`` are not read (the forward
    pass is the exact step for every surrogate).
    """
    _check_device(x)
    kern = _load()
    x = x.contiguous()
    T, N = x.shape
    device = x.device
    v0 = v0.to(x.dtype).contiguous()
    s = torch.empty_like(x)
    v_last = torch.empty_like(v0)
    want_h = bool(save_h or return_h)
    h = torch.empty((T, N), dtype=torch.float32, device=device) if want_h else \
        torch.empty(0, dtype=torch.float32, device=device)
    v_seq = torch.empty_like(x) if return_v else torch.empty(0, dtype=x.dtype, device=device)
    if N == 0:
        return s, v_last, h, v_seq
    block = BLOCK
    grid = (_cdiv(N, block),)
    _launch(kern.cf_forward_kernel, grid, device,
            _bits(x), _bits(v0), levels(theta_p, k_pos, device), levels(theta_n, k_neg, device),
            _bits(s), h if want_h else s, _bits(v_seq) if return_v else _bits(s), _bits(v_last),
            T, N, float(k), float(c), float(theta_p), float(theta_n),
            K_POS=int(k_pos), K_NEG=int(k_neg), SAVE_H=want_h, SAVE_V=bool(return_v),
            BF16=x.dtype == torch.bfloat16, BLOCK=block)
    return s, v_last, h, v_seq


def backward_impl(h: torch.Tensor, alpha: torch.Tensor, grad_s: Optional[torch.Tensor],
                  grad_h: Optional[torch.Tensor], grad_v_seq: Optional[torch.Tensor],
                  grad_v_last: Optional[torch.Tensor], kind: int, k: float, c: float,
                  theta_p: float, theta_n: float, k_pos: int, k_neg: int, detach_reset: bool,
                  need_grad_alpha: bool, grad_dtype: torch.dtype):
    """Backward kernel (the op layer's contract): ``(grad_x [T, N], grad_v0 [N], grad_alpha)``.

    ``h`` is the float32 ``[T, N]`` the forward pass saved; the incoming gradients are tensors or
    ``None`` (zero) and are cast to ``grad_dtype``, the dtype of ``grad_x`` and ``grad_v0``.
    ``grad_alpha`` is float32 ``[T]`` when ``need_grad_alpha`` (TSG's :math:`a_t`; zero for the
    other surrogates), else an empty ``[0]`` tensor.
    """
    _check_device(h)
    kern = _load()
    T, N = h.shape
    device = h.device
    h = h.contiguous()
    dtype = grad_dtype if grad_dtype in DTYPES else torch.float32

    def view(g):
        return None if g is None else g.to(device=device, dtype=dtype).contiguous()

    grad_s, grad_h, grad_v_seq, grad_v_last = map(view, (grad_s, grad_h, grad_v_seq, grad_v_last))
    grad_x = torch.empty((T, N), dtype=dtype, device=device)
    grad_v0 = torch.empty(N, dtype=dtype, device=device)
    tsg = int(kind) == KIND_CODES['tsg'] and bool(need_grad_alpha)
    if N == 0 or (need_grad_alpha and not tsg):
        grad_alpha = torch.zeros(T if need_grad_alpha else 0, dtype=torch.float32, device=device)
        if N == 0:
            return grad_x, grad_v0, grad_alpha
    block = BLOCK
    programs = _cdiv(N, block)
    partial = torch.empty((programs, T) if tsg else (1,), dtype=torch.float32, device=device)
    alpha = alpha.to(device=device, dtype=torch.float32).contiguous()
    dummy = _bits(grad_x)
    _launch(kern.cf_backward_kernel, (programs,), device,
            h, *(dummy if g is None else _bits(g) for g in (grad_s, grad_h, grad_v_seq,
                                                             grad_v_last)),
            alpha, levels(theta_p, k_pos, device), levels(theta_n, k_neg, device),
            _bits(grad_x), _bits(grad_v0), partial,
            T, N, float(k), float(c), float(theta_p), float(theta_n),
            _half_width(theta_p), _half_width(-theta_n),
            _f32(1.0 / theta_p), _f32(-1.0 / theta_n),  # CFRect's default heights
            KIND=int(kind), K_POS=int(k_pos), K_NEG=int(k_neg), HAS_GS=grad_s is not None,
            HAS_GH=grad_h is not None, HAS_GVS=grad_v_seq is not None,
            HAS_GVL=grad_v_last is not None, DETACH=bool(detach_reset), NEED_GA=tsg,
            BF16=dtype == torch.bfloat16, BLOCK=block)
    if tsg:
        grad_alpha = partial.sum(0)
    elif not need_grad_alpha:
        grad_alpha = torch.empty(0, dtype=torch.float32, device=device)
    return grad_x, grad_v0, grad_alpha


def _f32(value: float) -> float:
    """``value`` (a double) rounded to float32, as a Python float."""
    return float(torch.tensor(value, dtype=torch.float64).to(torch.float32))


def _half_width(theta: float) -> float:
    """CFRect's window half width 0.5f * float32(theta) (exact: a power-of-two product)."""
    return 0.5 * float(torch.tensor(theta, dtype=torch.float32))


def _check_call(x_seq) -> None:
    if not isinstance(x_seq, torch.Tensor) or x_seq.dtype not in DTYPES:
        raise TypeError(f"backend 'triton' runs tensors of dtype float32, float16 or bfloat16, "
                        f"got {getattr(x_seq, 'dtype', type(x_seq).__name__)}")
    _check_device(x_seq)


#: Multi-step CF neuron on the Triton kernels; the contract of
#: :func:`spikingjelly_cf.backends.reference.cf_multi_step_ref` for CUDA tensors of dtype
#: float32, float16 or bfloat16 (``v`` is cast to ``x_seq``'s dtype; ``h_seq`` is computed in
#: float32 and returned in ``x_seq``'s dtype), and for CPU tensors in Triton's interpreter
#: (``TRITON_INTERPRET=1``, tests). The ops ``spikingjelly_cf::cf_forward_triton`` /
#: ``cf_backward_triton`` are registered for CUDA and CPU; the CPU implementation refuses to run
#: unless the interpreter is on.
cf_multi_step_triton = define_kernel_ops('triton', ('cpu', 'cuda'), forward_impl, backward_impl,
                                         check_call=_check_call)
