"""What the fused backends share: argument normalisation and the surrogate's kernel form.

Nothing here launches anything; :mod:`.cpp` and :mod:`.cupy` call :func:`prepare` and then run
their own kernels on the ``[T, N]`` views it returns.
"""
from typing import NamedTuple, Optional

import torch

from ..surrogate import KERNEL_SURROGATES, CFRect, surrogate_spec

#: Kernel codes of the surrogate kinds; the same numbers as ``CF_RECT`` ... in ``csrc/cf_step.h``.
KIND_CODES = {'rect': 0, 'tsg': 1, 'sigmoid': 2, 'atan': 3}

#: The ``alpha`` a kernel receives for :class:`~spikingjelly_cf.surrogate.CFRect`'s default height
#: (``1/theta`` per side); ``CF_RECT_DEFAULT_HEIGHT`` in ``csrc/cf_step.h``.
RECT_DEFAULT_HEIGHT = 0.0



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
    return Call(x=x_seq.reshape(T, N).contiguous(), v0=v.reshape(N).contiguous(), alpha=alpha,
                kind=kind, k=1.0 - 1.0 / tau, c=1.0 / tau if decay_input else 1.0,
                theta_p=float(v_threshold), theta_n=float(v_threshold_neg), k_pos=int(k_pos),
                k_neg=int(k_neg), detach_reset=bool(detach_reset), tail=tail)


def ptr(t: Optional[torch.Tensor]):
    """Data pointer of a tensor, or ``None`` (a NULL pointer) for ``None``."""
    return None if t is None else t.data_ptr()


def grad_view(g: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """An incoming gradient as a contiguous tensor of ``dtype`` (``None`` stays ``None``)."""
    if g is None:
        return None
    return g.to(dtype).contiguous()
