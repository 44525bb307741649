"""Exact ties on every backend: h on a firing level (H(0) = 1) and on CFRect's window edges.

Inputs, potentials, thresholds and the decay live on a dyadic grid (inputs multiples of 1/8,
thresholds in {0.5, 1, 2}, tau in {4/3, 2, 4}, i.e. 1 - 1/tau in {0.25, 0.5, 0.75}), so every
backend computes h and v exactly in float32 and the grid's ties are real ties. The expected
numbers come from the rational oracle in ``_oracle.py`` (independent of the package): spikes, h
and v must be equal bit for bit, CFRect's gradients equal to float32 rounding (the window is
strict, docs/method.md, section 2: ``g(x) = alpha * 1[|x| < theta/2]``, so a potential exactly on an edge
gets 0).
"""
import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based import surrogate as sj_surrogate

from _backends import backend  # noqa: F401  (fixture)
from _oracle import cf_exact
from spikingjelly_cf.backends import get as get_backend
from spikingjelly_cf.functional import cf_multi_step, cf_multi_step_ref
from spikingjelly_cf.surrogate import TSG, CFRect

TAUS = (4 / 3, 2.0, 4.0)  # 1 - 1/tau = 0.25, 0.5, 0.75 exactly (in binary, too)
THETAS = (0.5, 1.0, 2.0)


def _grid_value(theta_p, theta_n, k_pos, k_neg):
    """Mostly exact levels and window edges (multiples of theta/2), else any multiple of 1/8."""
    top = max(k_pos * theta_p, k_neg * -theta_n) + 1
    special = sorted({m * t / 2 for t in (theta_p, -theta_n) for m in range(-2 * 4, 2 * 4 + 1)
                      if abs(m * t / 2) <= top})
    return st.one_of(st.sampled_from(special), st.integers(-8 * int(top), 8 * int(top)).map(lambda i: i / 8))


@st.composite
def dyadic_configs(draw):
    T = draw(st.integers(1, 4))
    N = draw(st.integers(1, 6))
    theta_p = draw(st.sampled_from(THETAS))
    theta_n = -draw(st.sampled_from(THETAS))
    k_pos = draw(st.integers(1, 3))
    k_neg = draw(st.integers(0, 3))
    value = _grid_value(theta_p, theta_n, k_pos, k_neg)
    return dict(
        x=draw(st.lists(st.lists(value, min_size=N, max_size=N), min_size=T, max_size=T)),
        v0=draw(st.lists(value, min_size=N, max_size=N)),
        kwargs=dict(tau=draw(st.sampled_from(TAUS)), decay_input=draw(st.booleans()),
                    v_threshold=theta_p, v_threshold_neg=theta_n, k_pos=k_pos, k_neg=k_neg,
                    detach_reset=draw(st.booleans())),
        sg=draw(st.sampled_from(['rect', 'rect', 'tsg', 'atan', 'sigmoid'])),
        alpha=draw(st.sampled_from([0.5, 1.0, 2.0])),
        grad_s=draw(st.lists(st.lists(st.integers(-2, 2), min_size=N, max_size=N),
                             min_size=T, max_size=T)),
        grad_v_last=draw(st.lists(st.integers(-2, 2), min_size=N, max_size=N)),
        grad_v_seq=draw(st.one_of(st.none(), st.lists(st.lists(st.integers(-2, 2), min_size=N,
                                                                 max_size=N), min_size=T, max_size=T))),
    )


def _surrogate(name, alpha, T):
    if name == 'rect':
        return CFRect(alpha=alpha)
    if name == 'tsg':
        return TSG(T)
    if name == 'atan':
        return sj_surrogate.ATan()
    return sj_surrogate.Sigmoid()


def _fractions(rows):
    return [[Fraction(v) for v in row] for row in rows]


def _run(fn, cfg, device, dtype):
    x = torch.tensor(cfg['x'], dtype=dtype, device=device).requires_grad_()
    v0 = torch.tensor(cfg['v0'], dtype=dtype, device=device).requires_grad_()
    sg = _surrogate(cfg['sg'], cfg['alpha'], len(cfg['x']))
    s, v_last, h, v_seq = fn(x, v0, surrogate_function=sg, return_h_seq=True, return_v_seq=True,
                             **cfg['kwargs'])
    loss = (s * torch.tensor(cfg['grad_s'], dtype=dtype, device=device)).sum()
    loss = loss + (v_last * torch.tensor(cfg['grad_v_last'], dtype=dtype, device=device)).sum()
    if cfg['grad_v_seq'] is not None:
        loss = loss + (v_seq * torch.tensor(cfg['grad_v_seq'], dtype=dtype, device=device)).sum()
    gx, gv = torch.autograd.grad(loss, (x, v0))
    return [t.detach().double().cpu() for t in (s, v_last, h, v_seq, gx, gv)]


def _exact(cfg):
    kw = cfg['kwargs']
    return cf_exact(
        _fractions(cfg['x']), [Fraction(v) for v in cfg['v0']], tau=1 / Fraction(1 / kw['tau']),  # 4/3 exactly
        decay_input=kw['decay_input'], theta_p=Fraction(kw['v_threshold']),
        theta_n=Fraction(kw['v_threshold_neg']), k_pos=kw['k_pos'], k_neg=kw['k_neg'],
        alpha=Fraction(cfg['alpha']), detach_reset=kw['detach_reset'],
        grad_s=_fractions(cfg['grad_s']), grad_v_last=[Fraction(v) for v in cfg['grad_v_last']],
        grad_v_seq=None if cfg['grad_v_seq'] is None else _fractions(cfg['grad_v_seq']))


def _t(rows):
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


def _check(got, exact, cfg, what):
    s, v_last, h, v_seq, gx, gv = got
    assert torch.equal(s, _t(exact['s'])), f'{what}: spikes differ'
    assert torch.equal(h, _t(exact['h'])), f'{what}: h differs'
    assert torch.equal(v_seq, _t(exact['v_seq'])), f'{what}: v_seq differs'
    assert torch.equal(v_last, torch.tensor([float(v) for v in exact['v_last']],
                                            dtype=torch.float64)), f'{what}: v_last differs'
    if cfg['sg'] == 'rect':  # float32 rounding of long products only; an edge error is >= alpha/4
        torch.testing.assert_close(gx, _t(exact['grad_x']), rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f'{what}: grad x: {m}')
        torch.testing.assert_close(gv, torch.tensor([float(v) for v in exact['grad_v0']],
                                                    dtype=torch.float64), rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f'{what}: grad v0: {m}')


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=dyadic_configs())
def test_dyadic_ties_equal_exact_oracle(backend, cfg):  # noqa: F811
    exact = _exact(cfg)
    fn = get_backend(backend.name)
    with backend.ran(backward=True):
        got = _run(fn, cfg, backend.device, backend.dtype)
    _check(got, exact, cfg, f'{backend.name} {backend.dtype}')
    if cfg['sg'] != 'rect':  # other surrogates: gradients as the float64 reference's
        ref = _run(cf_multi_step_ref, cfg, 'cpu', torch.float64)
        for a, b, name in zip(got[4:], ref[4:], ('grad x', 'grad v0')):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f'{name}: {m}')
    if backend.name == 'torch':  # the reference in float64 too
        _check(_run(cf_multi_step_ref, cfg, 'cpu', torch.float64), exact, cfg, 'torch float64')


# h exactly on a window edge (|h - level| = theta/2) and one float32 ulp inside/outside:
# (h, expected ds/dh) for theta_p = 1, theta_n = -2, K_P = K_N = 2, CFRect() (default heights
# 1/theta per side: 1 on the positive levels, 1/2 on the negative ones).
def _edges():
    f32 = torch.float32
    up = lambda v: torch.nextafter(torch.tensor(v, dtype=f32), torch.tensor(100., dtype=f32)).item()  # noqa: E731
    down = lambda v: torch.nextafter(torch.tensor(v, dtype=f32), torch.tensor(-100., dtype=f32)).item()  # noqa: E731
    cases = []
    for level, half in ((1.0, 0.5), (2.0, 0.5), (-2.0, 1.0), (-4.0, 1.0)):
        for edge in (level - half, level + half):
            inner = up(edge) if edge < level else down(edge)
            outer = down(edge) if edge < level else up(edge)
            cases += [(edge, None), (inner, None), (outer, None)]
    return [h for h, _ in cases]


EDGE_H = _edges()


def _expected_ds_dh(h):
    levels = [(1.0, 0.5), (2.0, 0.5), (-2.0, 1.0), (-4.0, 1.0)]  # (level, theta/2)
    return float(sum(1 / (2 * half) for level, half in levels
                     if abs(Fraction(h) - Fraction(level)) < Fraction(half)))


def test_window_edges_are_one_sided(backend):  # noqa: F811
    """On the edge g = 0, one ulp inside g = 1/theta, one ulp outside 0; spikes with H(0) = 1."""
    h = torch.tensor(EDGE_H, dtype=torch.float32)
    expected = torch.tensor([_expected_ds_dh(v) for v in EDGE_H], dtype=torch.float32)
    assert expected.sum() > 0 and (expected == 0).sum() > len(EDGE_H) // 3
    kwargs = dict(tau=2.0, v_threshold=1.0, v_threshold_neg=-2.0, k_pos=2, k_neg=2)
    x = h.to(backend.device).unsqueeze(0).requires_grad_()
    with backend.ran(backward=True):
        s, _, _, _ = cf_multi_step(x, torch.zeros_like(x[0]), backend=backend.name, **kwargs)
        s.sum().backward()
    torch.testing.assert_close(x.grad[0].cpu(), expected, rtol=0, atol=0)
    exact_s = [sum(1 for k in (1, 2) if v >= k) - sum(1 for k in (1, 2) if v <= -2 * k) for v in EDGE_H]
    assert s[0].cpu().tolist() == [float(v) for v in exact_s]


def test_levels_fire_at_equality(backend):  # noqa: F811
    """h exactly on +-k theta fires level k (H(0) = 1), the float just short of it does not."""
    for tp, tn in itertools.product(THETAS, THETAS):
        h, expected = [], []
        for k in (1, 2, 3):
            for level, sign in ((k * tp, 1), (-k * tn, -1)):
                short = torch.nextafter(torch.tensor(level), torch.tensor(0.)).item()
                h += [level, short]
                expected += [float(sign * k), float(sign * (k - 1))]
        x = torch.tensor([h], dtype=torch.float32, device=backend.device)
        with backend.ran():
            s, _, _, _ = cf_multi_step(x, torch.zeros(len(h), device=backend.device),
                                       v_threshold=tp, v_threshold_neg=-tn, k_pos=3, k_neg=3,
                                       backend=backend.name)
        assert s[0].cpu().tolist() == expected, (tp, tn)
