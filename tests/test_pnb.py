"""PNB loss (docs/method.md, section 3) against a direct, loop-based float64 evaluation of Eq. 18-22."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spikingjelly_cf.functional.pnb import (PNB_STATISTICS_FIELDS, pnb_loss, pnb_loss_from_statistics,
                                            pnb_statistics)


def reference_pnb_loss(h, v_threshold, v_threshold_neg, K, eps=1e-6):
    """Eq. 18-22 element by element, with the Decision on empty levels of docs/method.md, section 3.

    Built from scalar torch operations, so autograd gives the reference gradient too.
    """
    a, b = v_threshold, -v_threshold_neg
    flat = h.reshape(-1)
    terms = []
    for k in range(1, K + 1):
        num_p = den_p = num_n = den_n = 0.
        n_p = n_n = 0
        for i in range(flat.numel()):
            u = flat[i]
            x = float(u.detach())
            if (k - 1) * a < x <= k * a:  # Eq. 18
                w = torch.exp(-torch.abs(k * a - u))
                num_p, den_p, n_p = num_p + u * w, den_p + w, n_p + 1
            if -k * b <= x < -(k - 1) * b:  # Eq. 19
                w = torch.exp(-torch.abs(-k * b - u))
                num_n, den_n, n_n = num_n + u * w, den_n + w, n_n + 1
        if n_p == 0 or n_n == 0:  # Decision: a level with an empty side is left out
            continue
        mu_p = num_p / (den_p + eps)  # Eq. 20
        mu_n = num_n / (den_n + eps)  # Eq. 21
        terms.append(torch.abs(torch.log(torch.abs(mu_p) / (torch.abs(mu_n) + eps) + eps)))  # Eq. 22
    if not terms:
        return flat.sum() * 0.
    return sum(terms) / len(terms)


def _check_against_reference(h, a, theta_n, K, eps=1e-6):
    h1 = h.detach().clone().requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    loss = pnb_loss(h1, a, theta_n, K, eps)
    ref = reference_pnb_loss(h2, a, theta_n, K, eps)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.to(torch.float64), rtol=1e-10, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('K', [1, 2, 3])
@pytest.mark.parametrize('thresholds', [(1.0, -1.0), (0.7, -1.3), (1.5, -0.4)])
@pytest.mark.parametrize('scale', [0.4, 1.5, 4.0])
def test_matches_loop_reference(K, thresholds, scale):
    # scale 0.4: upper levels empty; 4.0: many potentials beyond the last level
    g = torch.Generator().manual_seed(K * 100 + int(scale * 10))
    h = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * scale + 0.1
    _check_against_reference(h, *thresholds, K)


@pytest.mark.parametrize('K', [1, 2, 3])
def test_empty_intervals(K):
    # only positive potentials: every level has an empty negative side -> 0 with zero gradient
    h = (torch.rand(50, dtype=torch.float64) * K).requires_grad_(True)
    loss = pnb_loss(h, 1.0, -1.0, K)
    assert loss.item() == 0.
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0
    # level 1 present on both sides, level 2.. empty on the negative side: only level 1 counts
    h = torch.tensor([0.5, 0.8, 1.5, 2.5, -0.25], dtype=torch.float64)
    _check_against_reference(h, 1.0, -1.0, K)
    stats = pnb_statistics(h, 1.0, -1.0, K)
    mu_p = stats[0, 0] / (stats[0, 1] + 1e-6)
    mu_n = stats[0, 3] / (stats[0, 4] + 1e-6)
    expected = abs(math.log(abs(mu_p) / (abs(mu_n) + 1e-6) + 1e-6))
    assert pnb_loss(h, 1.0, -1.0, K).item() == pytest.approx(expected, rel=1e-12)
    # nothing at all
    assert pnb_loss(torch.zeros(7, dtype=torch.float64), 1.0, -1.0, K).item() == 0.
    assert pnb_loss(torch.zeros(0), 1.0, -1.0, K).item() == 0.


def test_interval_boundaries():
    # Eq. 18: (k-1)a < h <= ka ; Eq. 19: -kb <= h < -(k-1)b ; 0 belongs to no interval
    h = torch.tensor([0., 1., 2., 3., -1., -2., -3., 1e-9, -1e-9], dtype=torch.float64)
    stats = pnb_statistics(h, 1.0, -1.0, 2)
    counts = stats[:, [2, 5]]
    assert counts.tolist() == [[2., 2.], [1., 1.]]  # U+_1={1,1e-9}, U-_1={-1,-1e-9}, U+_2={2}, U-_2={-2}
    _check_against_reference(h, 1.0, -1.0, 2)


def test_statistics_are_additive():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, 7, generator=g, dtype=torch.float64) * 2
    total = sum(pnb_statistics(h[t], 0.8, -1.1, 3) for t in range(4))
    torch.testing.assert_close(total, pnb_statistics(h, 0.8, -1.1, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pnb_loss_from_statistics(total), pnb_loss(h, 0.8, -1.1, 3))
    assert pnb_statistics(h, 0.8, -1.1, 3).shape == (3, len(PNB_STATISTICS_FIELDS))


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(40, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pnb_loss(x, 1.0, -0.8, 2), (h,))
    assert torch.autograd.gradcheck(lambda x: pnb_statistics(x, 1.0, -0.8, 2), (h,))


def test_half_and_float32_inputs():
    g = torch.Generator().manual_seed(2)
    h64 = torch.randn(100, generator=g, dtype=torch.float64)
    # away from interval boundaries so that rounding cannot move a potential between levels
    h64 = torch.where((h64 - h64.round()).abs() < 0.01, h64 + 0.05, h64)
    for dtype in (torch.float32, torch.float16):
        h = h64.to(dtype)
        stats = pnb_statistics(h, 1.0, -1.0, 2)
        assert stats.dtype == torch.float32
        torch.testing.assert_close(stats.double(), pnb_statistics(h.double(), 1.0, -1.0, 2),
                                   rtol=1e-5, atol=1e-4)
    assert pnb_statistics(torch.tensor([1, -1, 2]), 1.0, -1.0, 2).dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.floats(-3.5, 3.5, allow_nan=False, width=64), min_size=1, max_size=12),
       K=st.integers(1, 3),
       a=st.sampled_from([0.5, 1.0, 1.25]),
       b=st.sampled_from([0.5, 1.0, 1.5]))
def test_matches_reference_hypothesis(values, K, a, b):
    _check_against_reference(torch.tensor(values, dtype=torch.float64), a, -b, K)


@pytest.mark.parametrize('kwargs, name', [
    (dict(K=0), 'K'), (dict(K=-1), 'K'), (dict(K=1.5), 'K'), (dict(K=True), 'K'),
    (dict(v_threshold=0.), 'v_threshold'), (dict(v_threshold=-1.), 'v_threshold'),
    (dict(v_threshold_neg=0.), 'v_threshold_neg'), (dict(v_threshold_neg=1.), 'v_threshold_neg'),
    (dict(eps=-1.), 'eps'),
])
def test_errors_name_the_parameter(kwargs, name):
    args = dict(v_threshold=1.0, v_threshold_neg=-1.0, K=2, eps=1e-6)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=name):
        pnb_loss(torch.randn(5), **args)


def test_statistics_shape_checked():
    with pytest.raises(ValueError, match='stats'):
        pnb_loss_from_statistics(torch.zeros(2, 5))
