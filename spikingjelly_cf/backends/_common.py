"""What the fused backends share: argument normalisation and the surrogate's kernel form.

Nothing here launches anything; the kernel backends call :func:`prepare` and then run their own
kernels on the ``[T, N]`` views it returns, and :meth:`Call.restore` gives their outputs the
input's shape and memory layout.

Layout: a kernel walks ``[T, N]`` time-major, each step one contiguous row of neurons, and the
per-neuron arithmetic does not care in which order the neurons lie. So an input whose steps are
dense but not contiguous (``channels_last`` frames of ``[T, B, C, H, W]``, or any permutation
of the trailing dimensions with time outermost) is handed to the kernel as it lies in memory,
without a copy, and every output (spikes, ``v_last``, ``h_seq``, ``v_seq``) comes back with the
input's strides, as PyTorch's elementwise operations (and SpikingJelly's ``LIFNode``) keep them.
Other layouts are copied to contiguous ones (outputs contiguous).
"""
from typing import NamedTuple, Optional, Tuple

import torch

from ..surrogate import KERNEL_SURROGATES, CFRect, surrogate_spec

#: Kernel codes of the surrogate kinds; the same numbers as ``CF_RECT`` ... in ``csrc/cf_step.h``.
KIND_CODES = {'rect': 0, 'tsg': 1, 'sigmoid': 2, 'atan': 3}

#: The ``alpha`` a kernel receives for :class:`~spikingjelly_cf.surrogate.CFRect`'s default height
#: (``1/theta`` per side); ``CF_RECT_DEFAULT_HEIGHT`` in ``csrc/cf_step.h``.
RECT_DEFAULT_HEIGHT = 0.0


def memory_order(x: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """The permutation ``(0, d1, d2, ...)`` that makes a dense, time-outermost but not contiguous
    ``x`` contiguous (trailing dimensions from the largest stride to the smallest), or ``None``
    when ``x`` is contiguous or has no such order (then it is copied).

    >>> x = torch.zeros(2, 3, 4, 5).permute(0, 2, 3, 1)  # [T, 4, 5, 3] stored as [T, 3, 4, 5]
    >>> memory_order(x), memory_order(x.contiguous())
    ((0, 3, 1, 2), None)
    """
    if x.dim() < 3 or x.is_contiguous():
        return None
    order = []
    for d in range(1, x.dim()):  # insertion sort by stride, largest first (stable: ties keep order)
        i = len(order)
        while i > 0 and x.stride(order[i - 1]) < x.stride(d):
            i -= 1
        order.insert(i, d)
    perm = (0,) + tuple(order)
    if not x.permute(perm).is_contiguous():
        return None
    return perm


class Call(NamedTuple):
    """One multi-step call, normalised for a kernel (all ``[T, N]`` tensors contiguous)."""
    x: torch.Tensor          # [T, N] contiguous, differentiable view/copy of x_seq
    v0: torch.Tensor         # [N] contiguous, x's dtype (float32 on the CPU)
    alpha: torch.Tensor      # [T] float32: a_t for TSG (differentiable), else the constant alpha
                             # (RECT_DEFAULT_HEIGHT for CFRect's default height 1/theta)
    kind: str                # 'rect', 'tsg', 'sigmoid', 'atan'
    k: float                 # 1 - 1/tau
    c: float                 # 1/tau if decay_input else 1
    theta_p: float
    theta_n: float
    k_pos: int
    k_neg: int
    detach_reset: bool
    tail: torch.Size         # trailing shape [*] of x_seq
    perm: Optional[Tuple[int, ...]] = None  # memory_order(x_seq): the [T, N] rows in that order

    def restore(self, t: torch.Tensor, steps: Optional[int]) -> torch.Tensor:
        """A kernel output (``[steps, N]``, or ``[N]`` for ``steps=None``) in ``x_seq``'s shape
        ``[steps, *]`` / ``[*]`` and memory layout."""
        lead = () if steps is None else (steps,)
        if self.perm is None:
            return t.view(*lead, *self.tail)
        perm = self.perm if steps is not None else tuple(d - 1 for d in self.perm[1:])
        stored = t.view(*lead, *(self.tail[d - 1] for d in self.perm[1:]))
        inverse = [0] * len(perm)
        for i, d in enumerate(perm):
            inverse[d] = i
        return stored.permute(inverse)


def prepare(backend: str, x_seq: torch.Tensor, v, tau: float, decay_input: bool,
            v_threshold: float, v_threshold_neg: Optional[float], k_pos: int, k_neg: int,
            surrogate_function, detach_reset: bool, t_start: int,
            v_dtype: Optional[torch.dtype] = None) -> Call:
    """Flatten ``x_seq`` to ``[T, N]`` and ``v`` to ``[N]`` and read the surrogate's kernel form.

    Parameters are assumed valid (``_validation.check_cf_parameters`` checks them in the
    dispatcher); a surrogate that no kernel runs raises ``ValueError`` naming the supported ones.
    """
    if surrogate_function is None:
        surrogate_function = CFRect()
    T = x_seq.shape[0]
    tail = x_seq.shape[1:]
    N = 1
    for d in tail:
        N *= d
    spec = surrogate_spec(surrogate_function, t_start, T, x_seq.device)
    if spec is None:
        raise ValueError(f'backend={backend!r} supports the surrogates {KERNEL_SURROGATES} in '
                         f'spiking mode, got {surrogate_function!r}; use backend="torch" or "auto"')
    kind, alpha = spec
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(device=x_seq.device, dtype=torch.float32).reshape(T).contiguous()
    else:
        alpha = torch.full((T,), RECT_DEFAULT_HEIGHT if alpha is None else float(alpha),
                           dtype=torch.float32, device=x_seq.device)
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v, dtype=x_seq.dtype, device=x_seq.device)
    v = v.to(device=x_seq.device, dtype=v_dtype or x_seq.dtype)
    if v.shape != tail:
        v = v.expand(tail)
    tau = float(tau)
    if v_threshold_neg is None:
        v_threshold_neg = -float(v_threshold)
    perm = memory_order(x_seq)
    if perm is None:
        x, v0 = x_seq.reshape(T, N).contiguous(), v.reshape(N).contiguous()
    else:  # the neurons in x's memory order: x without a copy, v as x's steps lie
        x = x_seq.permute(perm).reshape(T, N)
        v0 = v.permute(tuple(d - 1 for d in perm[1:])).reshape(N).contiguous()
    return Call(x=x, v0=v0, alpha=alpha, kind=kind, k=1.0 - 1.0 / tau,
                c=1.0 / tau if decay_input else 1.0, theta_p=float(v_threshold),
                theta_n=float(v_threshold_neg), k_pos=int(k_pos), k_neg=int(k_neg),
                detach_reset=bool(detach_reset), tail=tail, perm=perm)


def ptr(t: Optional[torch.Tensor]):
    """Data pointer of a tensor, or ``None`` (a NULL pointer) for ``None``."""
    return None if t is None else t.data_ptr()


def grad_view(g: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """An incoming gradient as a contiguous tensor of ``dtype`` (``None`` stays ``None``)."""
    if g is None:
        return None
    return g.to(dtype).contiguous()
