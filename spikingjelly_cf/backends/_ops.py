r"""The fused kernels as ``torch.library`` custom ops (docs/method.md, section 6).

Every kernel backend (``'cpp'``, ``'cupy'``, ``'triton'``) registers two ops in the namespace
``spikingjelly_cf`` through :func:`define_kernel_ops`:

``cf_forward_<backend>(x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset,
save_h, return_h, return_v, lean=False) -> (s, v_last, h, v_seq)``
    ``x`` ``[T, N]`` contiguous, ``v0`` ``[N]``, ``alpha`` ``[T]`` float32 (TSG's :math:`a_t`,
    else the constant :math:`\alpha`), ``kind`` the surrogate code of
    :data:`._common.KIND_CODES`. ``h`` is the float32 pre-reset potential ``[T, N]`` when
    ``save_h`` (kept for the backward pass) or ``return_h``, else an empty ``[0]`` tensor;
    ``v_seq`` is ``[T, N]`` in ``x``'s dtype when ``return_v``, else empty. With ``lean``
    (memory-lean mode; only when ``save_h`` and not ``return_h``, and only for backends
    registered with ``supports_lean``) the saved ``h`` is smaller (:func:`lean_shape`): ``uint8``
    window codes ``[T, N]`` for CFRect (``kind`` 0), ``uint8`` ``[T, 3, N]`` nearest-level
    offsets for the other surrogates; the backward op reads the form from the dtype and shape
    of the ``h`` it receives.

``cf_backward_<backend>(h, alpha, grad_s, grad_h, grad_v_seq, grad_v_last, kind, k, c, theta_p,
theta_n, k_pos, k_neg, detach_reset, need_grad_alpha, grad_dtype) -> (grad_x, grad_v0,
grad_alpha)``
    The incoming gradients are optional (``None`` reads as zero); ``grad_alpha`` is ``[T]``
    float32 when ``need_grad_alpha``, else empty.

Each op has a fake implementation (shapes, dtypes and strides only, never a data pointer), so
``torch.compile(fullgraph=True)`` and ``torch.export`` see the kernel as one graph node, and the
forward op's autograd formula (``register_autograd``) calls the backward op. No op mutates its
inputs: the neuron's state goes in as ``v0`` and comes out as ``v_last``.

The backend supplies two plain functions with the same arguments (the forward one without
``detach_reset``, which only the backward pass reads); :func:`define_kernel_ops` returns the
multi-step function of the contract in ``docs/architecture.md``.
"""
import weakref
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._common import KIND_CODES, prepare

__all__ = ['NAMESPACE', 'MEMORY_MODES', 'define_kernel_ops', 'forward_op', 'backward_op',
           'lean_dtype', 'lean_shape']


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks (torch.utils.checkpoint, save_on_cpu, ...) are active.

    They take over what happens to the saved ``h``: a checkpoint drops it after the first run
    and re-creates it in the backward pass, ``save_on_cpu`` copies it. A pooled buffer kept by
    ``weakref.finalize`` would then hold the first run's ``h`` (the memory the checkpoint was
    meant to free), and a checkpoint re-run's buffer would go back to the pool while the
    checkpoint still hands it to the backward pass.
    """
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except TypeError:  # older signature without ignore_is_tracing
        return torch._C._autograd._top_saved_tensors_default_hooks() is not None

NAMESPACE = 'spikingjelly_cf'

_ops = {}  # backend -> (forward op, backward op)
_impls = {}  # backend -> (forward body, backward body, recycle_h, supports_lean, step_forward)


def forward_op(backend: str):
    """The registered forward op of ``backend`` (``torch.ops.spikingjelly_cf.cf_forward_<backend>``)."""
    return _ops[backend][0]


def backward_op(backend: str):
    """The registered backward op of ``backend``."""
    return _ops[backend][1]


def kernel_impls(backend: str):
    """``(forward body, backward body, recycle_h, supports_lean, step_forward)`` of a kernel
    backend whose module has been imported (the op bodies themselves, for CFNode's lean
    single-step path in eager mode, ``spikingjelly_cf._step``), or ``None`` for any other
    backend."""
    return _impls.get(backend)


#: ``memory`` of the multi-step functions: ``'normal'`` saves float32 ``h`` for the backward
#: pass (4 bytes per neuron-step), ``'lean'`` 1 byte for CFRect and 3 for the other surrogates
#: (see :func:`lean_shape`).
MEMORY_MODES = ('normal', 'lean')

#: Largest K_P / K_N of memory-lean CFRect (window counts in 4 bits; ``CF_LEAN_MAX_K``).
LEAN_MAX_K = 15

#: Largest K_P / K_N of memory-lean TSG/Sigmoid/ATan (level index in a signed byte;
#: ``CF_LEAN_MAX_K_OFFSET``).
LEAN_MAX_K_OFFSET = 127


def lean_dtype(kind: int) -> torch.dtype:
    """The dtype memory-lean mode saves: ``uint8`` for every surrogate (see :func:`lean_shape`)."""
    return torch.uint8


def lean_shape(kind: int, T: int, N: int) -> Tuple[int, ...]:
    """What memory-lean mode saves for a ``[T, N]`` call (``uint8``, docs/architecture.md):

    * CFRect, ``[T, N]``: how many level windows contain ``h`` on each side (4 bits each), all its
      backward pass needs (gradients bit-identical to the normal mode);
    * TSG, Sigmoid, ATan, ``[T, 3, N]``: per neuron-step the index of the level nearest to ``h``
      (a signed byte) and the offset ``d = h - level`` as IEEE binary16 (low and high byte
      planes), from which the backward pass forms every distance ``h - level_j`` to a relative
      ``2^-11`` (plus float32 rounding), whatever the threshold.

    >>> lean_shape('rect', 5, 7), lean_shape('tsg', 5, 7)
    ((5, 7), (5, 3, 7))
    """
    if isinstance(kind, str):
        kind = KIND_CODES[kind]
    return (T, N) if kind == KIND_CODES['rect'] else (T, 3, N)


def check_lean(kind: str, k_pos: int, k_neg: int) -> None:
    """``ValueError`` when memory-lean mode cannot encode ``K`` levels (CFRect: K > 15, the
    other surrogates: K > 127)."""
    if kind == 'rect' and (k_pos > LEAN_MAX_K or k_neg > LEAN_MAX_K):
        raise ValueError(f"memory='lean' with CFRect stores the window counts in 4 bits: k_pos "
                         f"and k_neg must be <= {LEAN_MAX_K}, got k_pos={k_pos}, k_neg={k_neg}; "
                         f"use memory='normal'")
    if kind != 'rect' and (k_pos > LEAN_MAX_K_OFFSET or k_neg > LEAN_MAX_K_OFFSET):
        raise ValueError(f"memory='lean' stores the index of the nearest level in a signed byte: "
                         f"k_pos and k_neg must be <= {LEAN_MAX_K_OFFSET}, got k_pos={k_pos}, "
                         f"k_neg={k_neg}; use memory='normal'")


def _empty_like_none(t: Optional[Tensor]) -> Optional[Tensor]:
    """Autograd hands a zero-size gradient (or ``None``) for the outputs we returned empty."""
    return None if t is None or t.numel() == 0 else t


def define_kernel_ops(backend: str, device_types: Union[str, Sequence[str]],
                      forward_impl: Callable, backward_impl: Callable,
                      recycle_h: Optional[Callable[[Tensor], None]] = None,
                      check_call: Optional[Callable[[Tensor], None]] = None,
                      supports_lean: bool = False,
                      step_forward: Optional[Callable] = None) -> Callable:
    """Register ``cf_forward_<backend>`` / ``cf_backward_<backend>`` and return the backend's
    multi-step function.

    Parameters
    ----------
    backend : str
        Backend name, part of the op names.
    device_types : str or sequence of str
        Device types the implementations run on (``'cpu'``, ``'cuda'``).
    forward_impl, backward_impl : callable
        The kernels, with the op arguments described in the module docstring
        (``forward_impl`` without ``detach_reset``).
    recycle_h : callable, optional
        Called with the saved ``h`` once the autograd node that saved it is freed, in eager
        mode only and only when ``h`` was not handed to the caller (the CPU backend pools it).
    check_call : callable, optional
        Called with ``x_seq`` before anything else; raises ``TypeError`` for tensors the
        backend cannot run.
    supports_lean : bool
        The backend implements memory-lean saving: ``forward_impl`` takes the keyword ``lean``
        and ``backward_impl`` accepts ``h`` in the forms of :func:`lean_shape`.
        Without it, ``memory='lean'`` runs in normal mode (the dispatcher warns).
    step_forward : callable, optional
        The forward body for one time step on tensors of any one shape, ``(x, v, alpha, kind,
        k, c, theta_p, theta_n, k_pos, k_neg, save_h) -> (s, v_new, h or None)``, used by
        CFNode's lean single-step path in eager mode (``spikingjelly_cf._step``); without it
        that path calls ``forward_impl`` on ``[1, N]`` views.
    """
    ns = f'{NAMESPACE}::'

    @torch.library.custom_op(f'{ns}cf_forward_{backend}', mutates_args=(),
                             device_types=device_types)
    def cf_forward(x: Tensor, v0: Tensor, alpha: Tensor, kind: int, k: float, c: float,
                   theta_p: float, theta_n: float, k_pos: int, k_neg: int, detach_reset: bool,
                   save_h: bool, return_h: bool, return_v: bool, lean: bool = False
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        if supports_lean:
            return forward_impl(x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, save_h,
                                return_h, return_v, lean=lean)
        return forward_impl(x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, save_h,
                            return_h, return_v)

    @cf_forward.register_fake
    def _(x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset, save_h,
          return_h, return_v, lean=False):
        T, N = x.shape
        if lean and supports_lean and save_h and not return_h:
            h = x.new_empty(lean_shape(kind, T, N), dtype=lean_dtype(kind))
        else:
            h = (x.new_empty((T, N), dtype=torch.float32) if save_h or return_h
                 else x.new_empty((0,), dtype=torch.float32))
        v_seq = x.new_empty((T, N)) if return_v else x.new_empty((0,))
        return x.new_empty((T, N)), x.new_empty((N,)), h, v_seq

    @torch.library.custom_op(f'{ns}cf_backward_{backend}', mutates_args=(),
                             device_types=device_types)
    def cf_backward(h: Tensor, alpha: Tensor, grad_s: Optional[Tensor],
                    grad_h: Optional[Tensor], grad_v_seq: Optional[Tensor],
                    grad_v_last: Optional[Tensor], kind: int, k: float, c: float,
                    theta_p: float, theta_n: float, k_pos: int, k_neg: int, detach_reset: bool,
                    need_grad_alpha: bool, grad_dtype: torch.dtype
                    ) -> Tuple[Tensor, Tensor, Tensor]:
        return backward_impl(h, alpha, grad_s, grad_h, grad_v_seq, grad_v_last, kind, k, c,
                             theta_p, theta_n, k_pos, k_neg, detach_reset, need_grad_alpha,
                             grad_dtype)

    @cf_backward.register_fake
    def _(h, alpha, grad_s, grad_h, grad_v_seq, grad_v_last, kind, k, c, theta_p, theta_n,
          k_pos, k_neg, detach_reset, need_grad_alpha, grad_dtype):
        T, N = h.shape[0], h.shape[-1]  # [T, N], or [T, 3, N] (memory-lean offsets)
        grad_alpha = (alpha.new_empty((T,), dtype=torch.float32) if need_grad_alpha
                      else alpha.new_empty((0,), dtype=torch.float32))
        return (h.new_empty((T, N), dtype=grad_dtype), h.new_empty((N,), dtype=grad_dtype),
                grad_alpha)

    def setup_context(ctx, inputs, output):
        (x, v0, alpha, kind, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset, save_h,
         return_h, return_v) = inputs[:14]
        h = output[2]
        ctx.save_for_backward(h, alpha)
        ctx.params = (kind, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset, x.dtype)
        ctx.set_materialize_grads(False)
        # Pooled buffers go back only in eager mode: under tracing h is a fake tensor.
        if (recycle_h is not None and save_h and not return_h and type(h) is Tensor
                and not torch.compiler.is_compiling() and not _saved_tensors_hooked()):
            weakref.finalize(ctx, recycle_h, h.detach())  # no grad_fn: no cycle via ctx

    def backward(ctx, grad_s, grad_v_last, grad_h, grad_v_seq):
        h, alpha = ctx.saved_tensors
        kind, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset, dtype = ctx.params
        if h.numel() == 0 and h.dim() == 1:
            raise RuntimeError(f'spikingjelly_cf::cf_forward_{backend}: backward through a call '
                               f'that saved nothing (it ran with save_h=False)')
        need_grad_alpha = kind == KIND_CODES['tsg'] and ctx.needs_input_grad[2]
        grad_x, grad_v0, grad_alpha = cf_backward(
            h, alpha, _empty_like_none(grad_s), _empty_like_none(grad_h),
            _empty_like_none(grad_v_seq), _empty_like_none(grad_v_last), kind, k, c, theta_p,
            theta_n, k_pos, k_neg, detach_reset, need_grad_alpha, dtype)
        return ((grad_x if ctx.needs_input_grad[0] else None),
                (grad_v0 if ctx.needs_input_grad[1] else None),
                (grad_alpha if need_grad_alpha else None)) + (None,) * 12

    cf_forward.register_autograd(backward, setup_context=setup_context)
    _ops[backend] = (cf_forward, cf_backward)
    _impls[backend] = (forward_impl, backward_impl, recycle_h, supports_lean, step_forward)

    def cf_multi_step(x_seq: Tensor, v: Tensor, tau: float = 4 / 3, decay_input: bool = False,
                      v_threshold: float = 1.0, v_threshold_neg: Optional[float] = None,
                      k_pos: int = 2, k_neg: int = 2, surrogate_function=None,
                      detach_reset: bool = False, t_start: int = 0, return_h_seq: bool = False,
                      return_v_seq: bool = False, memory: str = 'normal'):
        if check_call is not None:
            check_call(x_seq)
        if memory not in MEMORY_MODES:
            raise ValueError(f'memory must be one of {MEMORY_MODES}, got {memory!r}')
        if memory == 'lean' and not supports_lean:
            raise ValueError(f"backend {backend!r} has no memory-lean mode (memory='lean')")
        call = prepare(backend, x_seq, v, tau, decay_input, v_threshold, v_threshold_neg, k_pos,
                       k_neg, surrogate_function, detach_reset, t_start)
        save_h = torch.is_grad_enabled() and (call.x.requires_grad or call.v0.requires_grad
                                              or call.alpha.requires_grad)
        lean = memory == 'lean' and save_h and not return_h_seq
        if lean:
            check_lean(call.kind, call.k_pos, call.k_neg)
        s, v_last, h, v_seq = cf_forward(
            call.x, call.v0, call.alpha, KIND_CODES[call.kind], call.k, call.c, call.theta_p,
            call.theta_n, call.k_pos, call.k_neg, call.detach_reset, save_h,
            bool(return_h_seq), bool(return_v_seq), lean)
        T = x_seq.shape[0]
        h_seq = v_seq_out = None
        if return_h_seq:
            h_seq = call.restore(h if h.dtype == x_seq.dtype else h.to(x_seq.dtype), T)
        if return_v_seq:
            v_seq_out = call.restore(v_seq, T)
        return call.restore(s, T), call.restore(v_last, None), h_seq, v_seq_out

    cf_multi_step.supports_memory_lean = supports_lean
    cf_multi_step.__name__ = cf_multi_step.__qualname__ = f'cf_multi_step_{backend}'
    cf_multi_step.__doc__ = (
        f'Multi-step CF neuron on the ``{backend!r}`` kernel ops '
        f'(``torch.ops.{NAMESPACE}.cf_forward_{backend}`` / ``cf_backward_{backend}``); the '
        f'contract of :func:`spikingjelly_cf.backends.reference.cf_multi_step_ref`.')
    return cf_multi_step
