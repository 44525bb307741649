r"""Backend ``'torch'``: the pure-PyTorch reference, an explicit time loop (docs/method.md, section 1).

:func:`cf_multi_step_ref` is the oracle of every test: each fused backend must reproduce its
outputs, state and gradients. It runs every dtype, every device and every surrogate (the
surrogate module itself is called per level, see :func:`~spikingjelly_cf.surrogate.level_spike`).
"""
from typing import Optional, Tuple

import torch

from .._validation import check_cf_parameters, check_tensors
from ..surrogate import TSG, CFRect, level_spike

__all__ = ['cf_multi_step_ref', 'available', 'unavailable_reason']

Result = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def available() -> bool:
    """The reference runs everywhere."""
    return True


def unavailable_reason() -> str:
    return ''


def cf_multi_step_ref(x_seq: torch.Tensor, v: torch.Tensor, tau: float = 4 / 3,
                      decay_input: bool = False, v_threshold: float = 1.0,
                      v_threshold_neg: Optional[float] = None, k_pos: int = 2, k_neg: int = 2,
                      surrogate_function=None, detach_reset: bool = False, t_start: int = 0,
                      return_h_seq: bool = False, return_v_seq: bool = False) -> Result:
    r"""Reference (pure PyTorch, explicit time loop) multi-step CF neuron.

    For each step :math:`t` (docs/method.md, section 1; Eq. 10-13 of the paper), with
    :math:`k_\tau = 1 - 1/\tau`:

    .. math::
        h_t &= k_\tau v_{t-1} + c\,x_t, \quad c = 1/\tau \text{ if decay\_input else } 1 \\
        n^+_t &= \textstyle\sum_{k=1}^{K_P} H(h_t - k\theta_P), \quad
        n^-_t = \textstyle\sum_{k=1}^{K_N} H(k\theta_N - h_t) \\
        s_t &= n^+_t - n^-_t, \qquad v_t = h_t - \theta_P n^+_t - \theta_N n^-_t

    Parameters
    ----------
    x_seq : Tensor
        Input current, shape ``[T, N, *]``.
    v : Tensor
        Post-reset potential before the first step, shape ``[N, *]``.
    tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg, detach_reset
        As :class:`~spikingjelly_cf.CFNode`.
    surrogate_function : nn.Module
        Per-level surrogate (default :class:`~spikingjelly_cf.surrogate.CFRect`).
    t_start : int
        Absolute index of the first step (selects TSG's :math:`a_t`).
    return_h_seq, return_v_seq : bool
        Also return the pre-reset ``h_seq`` / post-reset ``v_seq``, shape ``[T, N, *]``.

    Returns
    -------
    s_seq, v_last, h_seq, v_seq
        Signed spike counts in ``x_seq``'s dtype ``[T, N, *]``, the last potential ``[N, *]``,
        and the sequences or ``None``.

    Examples
    --------
    >>> x = torch.tensor([[1.2], [0.5], [-2.5]], dtype=torch.float64)
    >>> s, v, h, _ = cf_multi_step_ref(x, torch.zeros(1, dtype=torch.float64), return_h_seq=True)
    >>> s.flatten().tolist(), h.flatten().tolist()
    ([1.0, 0.0, -2.0], [1.2, 0.55, -2.3625])
    """
    p = check_cf_parameters(tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                            detach_reset)
    check_tensors(x_seq, v)
    if surrogate_function is None:
        surrogate_function = CFRect()
    if isinstance(surrogate_function, TSG):  # a sequence too long for TSG's T fails before any work
        surrogate_function.alpha_steps(t_start, x_seq.shape[0])
    k_tau = 1.0 - 1.0 / p['tau']
    c = 1.0 / p['tau'] if p['decay_input'] else 1.0
    th_p, th_n = p['v_threshold'], p['v_threshold_neg']
    s_list, h_list, v_list = [], [], []
    # unbind, not x_seq[t]: the backward of T selections builds T full-size gradients of x_seq
    # (quadratic in T; a minute per call at T = 500), unbind's backward stacks them once
    for t, x in enumerate(x_seq.unbind(0)):
        h = k_tau * v + (c * x if c != 1.0 else x)
        n_pos = 0
        for k in range(1, p['k_pos'] + 1):
            n_pos = n_pos + level_spike(surrogate_function, h - k * th_p, th_p, t_start + t)
        n_neg = 0
        for k in range(1, p['k_neg'] + 1):
            n_neg = n_neg + level_spike(surrogate_function, k * th_n - h, -th_n, t_start + t)
        s = n_pos - n_neg
        if not isinstance(s, torch.Tensor):  # k_neg == 0 and k_pos >= 1 always gives a tensor
            s = torch.zeros_like(h)
        if p['detach_reset']:
            n_pos_r = n_pos.detach() if isinstance(n_pos, torch.Tensor) else n_pos
            n_neg_r = n_neg.detach() if isinstance(n_neg, torch.Tensor) else n_neg
        else:
            n_pos_r, n_neg_r = n_pos, n_neg
        v = h - th_p * n_pos_r - th_n * n_neg_r
        s_list.append(s.to(x_seq.dtype))
        if return_h_seq:
            h_list.append(h)
        if return_v_seq:
            v_list.append(v)
    s_seq = torch.stack(s_list)
    h_seq = torch.stack(h_list) if return_h_seq else None
    v_seq = torch.stack(v_list) if return_v_seq else None
    return s_seq, v, h_seq, v_seq
