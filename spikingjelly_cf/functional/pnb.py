r"""Positive-negative balanced (PNB) loss, Eq. 18-22 of the paper (docs/method.md, section 3).

The loss of one CF layer is a function of a handful of sums over its pre-reset potentials
``h``. :func:`pnb_statistics` computes those sums for one tensor; because they are sums,
statistics of several steps or batches combine by addition, and
:func:`pnb_loss_from_statistics` turns the total into the loss. :func:`pnb_loss` does both
at once. The sums stay in the autograd graph, so the loss is differentiable with respect to
``h`` (through the potentials *and* through the weights :math:`w`, as in the paper's formula).
"""
import math
from numbers import Integral, Real
from typing import Optional

import torch

__all__ = ['PNB_STATISTICS_FIELDS', 'pnb_statistics', 'pnb_loss_from_statistics', 'pnb_loss']

#: Names of the last axis of the tensor returned by :func:`pnb_statistics`.
PNB_STATISTICS_FIELDS = ('sum_hw_pos', 'sum_w_pos', 'count_pos',
                         'sum_hw_neg', 'sum_w_neg', 'count_neg')

_SUM_HW_POS, _SUM_W_POS, _COUNT_POS, _SUM_HW_NEG, _SUM_W_NEG, _COUNT_NEG = range(6)


def _as_float(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f'{name} must be a scalar, got a tensor of shape {tuple(value.shape)}')
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f'{name} must be a real number, got {value!r}')
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f'{name} must be finite, got {value!r}')
    return value


def _check_arguments(v_threshold, v_threshold_neg, K):
    a = _as_float(v_threshold, 'v_threshold')
    theta_n = _as_float(v_threshold_neg, 'v_threshold_neg')
    if a <= 0.:
        raise ValueError(f'v_threshold (theta_p) must be > 0, got {a!r}')
    if theta_n >= 0.:
        raise ValueError(f'v_threshold_neg (theta_n) must be < 0, got {theta_n!r}')
    if isinstance(K, bool) or not isinstance(K, Integral):
        raise TypeError(f'K must be an int >= 1, got {K!r}')
    if K < 1:
        raise ValueError(f'K must be an int >= 1 (the PNB loss needs K = k_pos = k_neg >= 1), got {K!r}')
    return a, -theta_n, int(K)


def _check_eps(eps) -> float:
    eps = _as_float(eps, 'eps')
    if eps < 0.:
        raise ValueError(f'eps must be >= 0, got {eps!r}')
    return eps


def pnb_statistics(h: torch.Tensor, v_threshold: float, v_threshold_neg: float, K: int) -> torch.Tensor:
    r"""Per-level sufficient statistics of the PNB loss (Eq. 18-21) for one tensor of potentials.

    With :math:`a = \theta_P` (``v_threshold``) and :math:`b = |\theta_N|`
    (``-v_threshold_neg``), the intervals of Eq. 18-19 and their weights are

    .. math::

        U^{+}_k = \{h : (k-1)a < h \le ka\}, \qquad w^{+} = e^{-|ka - h|},

        U^{-}_k = \{h : -kb \le h < -(k-1)b\}, \qquad w^{-} = e^{-|-kb - h|},

    and row :math:`k-1` of the result holds, in the order of :data:`PNB_STATISTICS_FIELDS`,

    .. math::

        \Big(\sum_{U^+_k} h w^+,\ \sum_{U^+_k} w^+,\ |U^+_k|,\
             \sum_{U^-_k} h w^-,\ \sum_{U^-_k} w^-,\ |U^-_k|\Big).

    These are sums, so the statistics of several steps, batches or tensors combine by ``+``.
    They stay in the autograd graph (the counts carry no gradient).

    Parameters
    ----------
    h : torch.Tensor
        Pre-reset (charged) membrane potentials of one layer, any shape (e.g. ``h_seq``).
    v_threshold : float
        Positive threshold :math:`\theta_P > 0`.
    v_threshold_neg : float
        Negative threshold :math:`\theta_N < 0`.
    K : int
        Number of levels on each side, :math:`K = K_P = K_N \ge 1`.

    Returns
    -------
    torch.Tensor
        Shape ``[K, 6]``; float32, or float64 when ``h`` is float64.

    Shape
    -----
    ``h``: ``[*]`` (typically ``[T, N, *]``) -> ``[K, 6]``.

    Examples
    --------
    >>> h = torch.tensor([0.5, 1.0, 1.5, -0.5, -2.0, 0.0, 3.0])
    >>> pnb_statistics(h, 1.0, -1.0, 2)[:, [2, 5]]  # counts per level: positive, negative
    tensor([[2., 1.],
            [1., 1.]])
    """
    a, b, K = _check_arguments(v_threshold, v_threshold_neg, K)
    if not isinstance(h, torch.Tensor):
        raise TypeError(f'h must be a torch.Tensor, got {type(h).__name__}')
    if not h.is_floating_point():
        h = h.to(torch.get_default_dtype())
    if h.dtype != torch.float64:
        # half-precision sums over millions of potentials overflow or lose all precision
        h = h.float()
    return _PNBStatistics.apply(h.reshape(-1), a, b, K)


def _levels_and_weights(h: torch.Tensor, a: float, b: float, K: int):
    r"""Interval index ``level + K`` of every potential (``K``: in no interval; ``K + k``:
    :math:`U^+_k`; ``K - k``: :math:`U^-_k`) and the weight ``w`` of Eq. 20-21.

    Both sides have the same open/closed ends in :math:`|h|`: :math:`(k-1)\theta < |h| \le k\theta`
    (Eq. 19: :math:`-kb \le h < -(k-1)b`), so :math:`k = \lceil |h| / \theta \rceil`, corrected by
    one where the division rounded across a boundary.
    """
    ha = h.abs()
    pos = h > 0
    theta = torch.where(pos, torch.tensor(a, dtype=h.dtype, device=h.device),
                        torch.tensor(b, dtype=h.dtype, device=h.device))
    k = torch.ceil(ha / theta)
    k -= (ha <= (k - 1) * theta).to(h.dtype)
    k += (ha > k * theta).to(h.dtype)
    k *= (k <= K).to(h.dtype)  # above the top level: in no interval (h = 0 gives k = 0 already)
    w = torch.exp(-(k * theta - ha).abs())  # |k theta_signed - h| = | k theta - |h| |
    level = torch.where(pos, k, -k).to(torch.int64)
    return level.add_(K), w


class _PNBStatistics(torch.autograd.Function):
    r"""The ``[K, 6]`` sums in one pass each way (no ``[K, numel]`` temporaries).

    Backward: with :math:`w = e^{-|c - h|}`, :math:`dw/dh = w\,\mathrm{sign}(c - h)`, so
    :math:`\partial L/\partial h = g_{hw}(w + h\,dw/dh) + g_w\,dw/dh` with the incoming
    gradients of the potential's own interval (counts carry none)."""

    @staticmethod
    def forward(ctx, h, a, b, K):
        idx, w = _levels_and_weights(h, a, b, K)
        n = 2 * K + 1
        sums = torch.stack([h.new_zeros(n).index_add_(0, idx, h * w),
                            h.new_zeros(n).index_add_(0, idx, w),
                            # counts: index_add of int64 ones is exact like bincount and, with
                            # its static size, traceable by torch.compile (no graph break)
                            torch.zeros(n, dtype=torch.int64, device=h.device).index_add_(
                                0, idx, torch.ones_like(idx)).to(h.dtype)], 1)  # [2K+1, 3]
        ctx.save_for_backward(h, idx, w)
        ctx.levels = (a, b, K)
        # rows K+1..2K are U+_1..U+_K; rows K-1..0 are U-_1..U-_K
        return torch.cat([sums[K + 1:], sums[:K].flip(0)], 1)

    @staticmethod
    def backward(ctx, grad):
        h, idx, w = ctx.saved_tensors
        a, b, K = ctx.levels
        level = idx - K
        centre = level.to(h.dtype) * torch.where(level > 0, a, b)
        g = torch.cat([grad[:, [_SUM_HW_NEG, _SUM_W_NEG]].flip(0), grad.new_zeros(1, 2),
                       grad[:, [_SUM_HW_POS, _SUM_W_POS]]])  # [2K+1, 2], indexed like idx
        g = g[idx]
        dw = w * torch.sign(centre - h)
        return g[:, 0] * (w + h * dw) + g[:, 1] * dw, None, None, None


def pnb_loss_from_statistics(stats: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""PNB loss of one layer (Eq. 20-22) from accumulated :func:`pnb_statistics`.

    .. math::

        \mu^{\pm}_k = \frac{\sum_{U^\pm_k} h\, w^\pm}{\sum_{U^\pm_k} w^\pm + \varepsilon},
        \qquad
        \mathcal{L}_{\text{layer}} = \operatorname{mean}_{k \in \mathcal{K}}
        \left| \log\left( \frac{|\mu^{+}_k|}{|\mu^{-}_k| + \varepsilon} + \varepsilon \right) \right|,

    where :math:`\mathcal{K}` holds the levels whose positive *and* negative intervals are
    both non-empty (Decision of docs/method.md, section 3: with the paper's formula an empty interval
    adds the constant :math:`|\log\varepsilon|`, which carries no gradient). The loss is 0
    when no level qualifies (a zero that is still attached to the graph of ``stats``).

    Parameters
    ----------
    stats : torch.Tensor
        ``[K, 6]`` statistics, a sum of :func:`pnb_statistics` results.
    eps : float
        The :math:`\varepsilon` of Eq. 20-22, default ``1e-6``.

    Returns
    -------
    torch.Tensor
        Scalar loss in the dtype of ``stats``.

    Examples
    --------
    >>> s = pnb_statistics(torch.tensor([0.5, -0.5]), 1.0, -1.0, 1)
    >>> round(float(pnb_loss_from_statistics(s)), 4)  # symmetric potentials: balanced
    0.0
    """
    eps = _check_eps(eps)
    if not isinstance(stats, torch.Tensor) or stats.dim() != 2 or stats.shape[1] != 6:
        shape = tuple(stats.shape) if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise ValueError(f'stats must be a [K, 6] tensor from pnb_statistics, got {shape}')
    valid = (stats[:, _COUNT_POS] > 0) & (stats[:, _COUNT_NEG] > 0)
    mu_pos = stats[:, _SUM_HW_POS] / (stats[:, _SUM_W_POS] + eps)
    mu_neg = stats[:, _SUM_HW_NEG] / (stats[:, _SUM_W_NEG] + eps)
    ratio = mu_pos.abs() / (mu_neg.abs() + eps) + eps
    # ratio of an empty level may be 0 (log -> -inf); mask it before the log so that no inf
    # or nan enters the backward pass
    ratio = torch.where(valid, ratio, torch.ones_like(ratio))
    per_level = torch.log(ratio).abs()
    n_valid = valid.sum()
    total = torch.where(valid, per_level, torch.zeros_like(per_level)).sum()
    return total / n_valid.clamp(min=1).to(total.dtype)


def pnb_loss(h: torch.Tensor, v_threshold: float, v_threshold_neg: float, K: int,
             eps: float = 1e-6) -> torch.Tensor:
    r"""Positive-negative balanced loss of one layer (Eq. 18-22, docs/method.md, section 3).

    Shorthand for ``pnb_loss_from_statistics(pnb_statistics(h, ...), eps)``:

    .. math::

        \mathcal{L}_{\text{layer}} = \operatorname{mean}_{k}
        \left| \log\left( \frac{|\mu^{+}_k|}{|\mu^{-}_k| + \varepsilon} + \varepsilon \right) \right|,
        \qquad
        \mu^{\pm}_k = \frac{\sum_{h \in U^\pm_k} h\, e^{-|\pm k\theta_\pm - h|}}
                           {\sum_{h \in U^\pm_k} e^{-|\pm k\theta_\pm - h|} + \varepsilon},

    the mean running over the levels whose positive and negative intervals (Eq. 18-19) are
    both non-empty; 0 if there is none. The training objective of Eq. 23 is
    ``CE + 0.25 * L_pnb`` with ``L_pnb`` the mean of this loss over the CF layers
    (see :class:`spikingjelly_cf.monitor.PNBMonitor`).

    Parameters
    ----------
    h : torch.Tensor
        Pre-reset membrane potentials of one layer over one forward pass, any shape.
    v_threshold : float
        :math:`\theta_P > 0`.
    v_threshold_neg : float
        :math:`\theta_N < 0`.
    K : int
        :math:`K = K_P = K_N \ge 1`.
    eps : float
        :math:`\varepsilon`, default ``1e-6``.

    Returns
    -------
    torch.Tensor
        Scalar, differentiable with respect to ``h``.

    Shape
    -----
    ``h``: ``[*]`` (typically ``[T, N, *]``) -> ``[]``.

    Examples
    --------
    >>> h = torch.tensor([0.9, 1.9, -0.9, -1.9])
    >>> round(float(pnb_loss(h, 1.0, -1.0, 2)), 6)
    0.0
    >>> h = torch.tensor([0.9, -0.45])  # the positive side is twice as large
    >>> round(float(pnb_loss(h, 1.0, -1.0, 1)), 4)
    0.6931
    """
    return pnb_loss_from_statistics(pnb_statistics(h, v_threshold, v_threshold_neg, K), eps)
