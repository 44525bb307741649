"""CFRect's height: 1/theta on each side by default, an explicit ``alpha`` on both sides.

docs/method.md, section 2: the rectangle ``g(x) = height * 1[|x| < theta/2]`` with
``height = 1/theta_p`` on positive levels and ``1/|theta_n|`` on negative ones unless ``alpha`` is
given. With a fixed height 1 the reset factor ``1 - theta * height`` is ``1 - theta``, and at
``theta = 4`` the input gradient grows by ~1.5x per step back in time; with ``1/theta`` it is 0 in
a window and the gradient stays bounded, like SpikingJelly's Sigmoid on the same neuron.

Every kernel backend available here (the ``backend`` fixture; the Triton interpreter in
tests/test_triton.py, 'inductor' in tests/test_inductor.py) must compute what the reference
computes: spikes equal, state and gradients to float32 rounding, at theta in {0.5, 1, 4} with
asymmetric thresholds, default and explicit heights, memory-lean mode included.
"""
import pytest
import torch
from spikingjelly.activation_based import surrogate as sj_surrogate

from _backends import backend  # noqa: F401  (fixture)
from spikingjelly_cf import CFNode
from spikingjelly_cf.backends import cpp
from spikingjelly_cf.functional import cf_multi_step, cf_multi_step_ref
from spikingjelly_cf.surrogate import CFRect, surrogate_spec


def test_default_height_is_one_over_theta_per_side():
    x = torch.tensor([-0.3, 0.0, 0.3, 2.5], requires_grad=True)
    sg = CFRect()
    assert sg.alpha is None
    sg(x, theta=4.0).sum().backward()  # window |x| < 2, height 1/4
    assert x.grad.tolist() == [0.25, 0.25, 0.25, 0.0]
    x.grad = None
    sg(x, theta=0.5).sum().backward()  # window |x| < 0.25, height 2
    assert x.grad.tolist() == [0.0, 2.0, 0.0, 0.0]


def test_explicit_alpha_is_the_height_on_both_sides():
    x = torch.tensor([-0.3, 0.3, 1.0], requires_grad=True)
    sg = CFRect(alpha=1.0)
    sg(x, theta=4.0).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    assert 'alpha=1.0' in repr(sg) and 'alpha=None' in repr(CFRect())
    with pytest.raises(ValueError, match='alpha must be > 0'):
        CFRect(alpha=0.0)
    with pytest.raises(TypeError, match='alpha must be a real number'):
        CFRect(alpha='1')


def test_non_spiking_primitive_is_a_unit_step_by_default():
    """spiking=False: the primitive height * clamp(x + theta/2, 0, theta), 0 .. 1 by default."""
    x = torch.tensor([-3.0, -2.0, 0.0, 1.0, 2.0, 3.0])
    assert CFRect(spiking=False)(x, theta=4.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert CFRect(alpha=1.0, spiking=False)(x, theta=4.0).tolist() == [0.0, 0.0, 2.0, 3.0, 4.0,
                                                                       4.0]


def test_paper_setting_is_unchanged():
    """theta = 1 (the paper's setting): the default is the old alpha = 1 exactly."""
    torch.manual_seed(0)
    x = torch.randn(6, 50) * 1.5
    grads = []
    for sg in (CFRect(), CFRect(alpha=1.0)):
        xg = x.clone().requires_grad_(True)
        s, v, _, _ = cf_multi_step_ref(xg, torch.zeros(50), surrogate_function=sg)
        (s.sum() + v.sum()).backward()
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])


def test_surrogate_spec_passes_the_default_on():
    assert surrogate_spec(CFRect(), 0, 3) == ('rect', None)
    assert surrogate_spec(CFRect(alpha=0.5), 0, 3) == ('rect', 0.5)


def _first_last_ratio(fn, theta, sg, device='cpu'):
    """Mean |dL/dx_t| at the first step over the last, L = sum of spikes (T = 32, tau = 2)."""
    gen = torch.Generator().manual_seed(0)
    T, N = 32, 2048
    x = (torch.randn(T, N, generator=gen) * theta).to(device).requires_grad_(True)
    s, _, _, _ = fn(x, torch.zeros(N, device=device), tau=2.0, v_threshold=theta,
                    surrogate_function=sg)
    s.sum().backward()
    g = x.grad.abs().mean(1)
    return (g[0] / g[-1]).item()


def test_gradient_through_time_is_bounded_at_large_theta():
    """The regression: at theta = 4 a height of 1 makes the first step's gradient ~40x the
    last's (exponential in T); 1/theta keeps it near SpikingJelly's Sigmoid (measured 1.2-1.3)."""
    sigmoid = _first_last_ratio(cf_multi_step_ref, 4.0, sj_surrogate.Sigmoid())
    default = _first_last_ratio(cf_multi_step_ref, 4.0, CFRect())
    assert sigmoid < 2.0
    assert default < 2.0, default
    # the explicit old height still does what it says (and shows what the default avoids)
    assert _first_last_ratio(cf_multi_step_ref, 4.0, CFRect(alpha=1.0)) > 10.0
    assert _first_last_ratio(cf_multi_step_ref, 1.0, CFRect()) < 2.0


def test_cfnode_default_bounded(backend):  # noqa: F811
    """The same through a CFNode on every backend (its default surrogate)."""
    node = CFNode(step_mode='m', tau=2.0, v_threshold=4.0, backend=backend.name)

    def fn(x, v, **kw):
        node.reset()
        return node(x), None, None, None

    with backend.ran(backward=True):
        ratio = _first_last_ratio(fn, 4.0, None, backend.device)
    assert ratio < 2.0, ratio


def _compare(name, device, theta_p, theta_n, sg_make, memory='normal', k=(2, 2),
             detach_reset=False, seqs=True):
    gen = torch.Generator().manual_seed(int(theta_p * 100) + k[0])
    T, N = 7, 301
    scale = max(theta_p, -theta_n)
    x = torch.randn(T, N, generator=gen) * 1.5 * scale
    # h = x at t = 0: put it on levels, window edges (multiples of theta/2) and next to them
    edges = torch.tensor([m * t / 2 for t in (theta_p, -theta_n) for m in range(-5, 6)])
    special = torch.cat([edges, torch.nextafter(edges, edges + 1),
                         torch.nextafter(edges, edges - 1)])
    x[0, :special.numel()] = special
    v0 = torch.randn(N, generator=gen) * 0.3 * scale
    up = {n: torch.randn(shape, generator=gen) for n, shape in
          (('s', (T, N)), ('v', (N,)), ('h', (T, N)), ('vs', (T, N)))}
    kw = dict(tau=1.7, v_threshold=theta_p, v_threshold_neg=theta_n, k_pos=k[0], k_neg=k[1],
              detach_reset=detach_reset)

    def run(fn, dev, **extra):
        xg = x.clone().to(dev).requires_grad_(True)  # a leaf of its own per run
        vg = v0.clone().to(dev).requires_grad_(True)
        s, v, h, vs = fn(xg, vg, surrogate_function=sg_make(), **kw, **extra)
        loss = (s * up['s'].to(dev)).sum() + (v * up['v'].to(dev)).sum()
        if h is not None:
            loss = loss + (h * up['h'].to(dev)).sum() + (vs * up['vs'].to(dev)).sum()
        loss.backward()
        return [t.detach().cpu() for t in (s, v, xg.grad, vg.grad)]

    with_seq = dict(return_h_seq=seqs, return_v_seq=seqs)
    ref = run(cf_multi_step_ref, 'cpu', **with_seq)
    got = run(lambda *a, **kw2: cf_multi_step(*a, backend=name, memory=memory, **kw2), device,
              **with_seq)
    assert torch.equal(got[0], ref[0]), 'spikes differ'
    for what, a, b in zip(('v_last', 'grad x', 'grad v0'), got[1:], ref[1:]):
        scale_b = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale_b,
                                   msg=lambda m: f'{what}: {m}')
    assert ref[2].abs().max() > 0
    return got


THETAS = [(0.5, -0.85), (1.0, -1.0), (1.0, -0.6), (4.0, -6.8)]


@pytest.mark.parametrize('theta_p,theta_n', THETAS)
@pytest.mark.parametrize('alpha', [None, 0.7])
@pytest.mark.parametrize('k', [(2, 2), (3, 1)])
def test_backends_match_reference(backend, theta_p, theta_n, alpha, k):  # noqa: F811
    with backend.ran(backward=True):
        _compare(backend.name, backend.device, theta_p, theta_n, lambda: CFRect(alpha=alpha), k=k)


@pytest.mark.skipif(not cpp.available(), reason='cpp backend unavailable')
@pytest.mark.parametrize('theta_p,theta_n', THETAS)
@pytest.mark.parametrize('k', [(2, 2), (1, 0), (5, 3)])
@pytest.mark.parametrize('detach_reset', [False, True])
def test_lean_window_codes_with_default_height(theta_p, theta_n, k, detach_reset):
    """memory='lean' (uint8 window codes) gives the normal mode's gradients bit for bit."""
    normal = _compare('cpp', 'cpu', theta_p, theta_n, CFRect, k=k, detach_reset=detach_reset,
                      memory='normal', seqs=False)
    lean = _compare('cpp', 'cpu', theta_p, theta_n, CFRect, k=k, detach_reset=detach_reset,
                    memory='lean', seqs=False)
    for a, b in zip(normal, lean):
        assert torch.equal(a, b)
