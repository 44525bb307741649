"""CFNode and its reference path: golden sequences, modes, gradients, errors (docs/method.md, sections 1-2)."""
import math

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import spikingjelly_cf
from spikingjelly_cf import CFNode, CFRect, TSG, variant_kwargs
from spikingjelly_cf._compat import CLASSIC
from spikingjelly_cf.functional import cf_multi_step, cf_multi_step_ref

from _backends import backend  # noqa: F401  (fixture)


def run_node(x, **kwargs):
    node = CFNode(step_mode='m', backend='torch', store_v_seq=True, store_h_seq=True, **kwargs)
    s = node(torch.tensor(x, dtype=torch.float64).reshape(-1, 1))
    return s.flatten().tolist(), node.h_seq.flatten().tolist(), node.v_seq.flatten().tolist()


# Each case: kwargs, inputs, expected spikes, pre-reset h, post-reset v, all worked out by hand.
GOLDEN = [
    ('CF K=2', dict(), [0.5, 2.2, -1.4],
     [0, 2, -1], [0.5, 2.325, -1.31875], [0.5, 0.325, -0.31875]),
    ('ST', variant_kwargs('ST'), [1.5, 1.5, -3.0],
     [1, 1, 0], [1.5, 1.625, -2.84375], [0.5, 0.625, -2.84375]),
    ('DT', variant_kwargs('DT'), [1.5, 1.5, -3.0],
     [1, 1, -1], [1.5, 1.625, -2.84375], [0.5, 0.625, -1.84375]),
    ('SCF K=3', variant_kwargs('SCF', 3), [3.5, 0.0, -0.5],
     [3, 0, 0], [3.5, 0.125, -0.46875], [0.5, 0.125, -0.46875]),
    ('on the levels', dict(), [1.0], [1], [1.0], [0.0]),
    ('on level 2', dict(), [2.0], [2], [2.0], [0.0]),
    ('on level -1', dict(), [-1.0], [-1], [-1.0], [0.0]),
    ('on level -2', dict(), [-2.0], [-2], [-2.0], [0.0]),
    ('above the top level', dict(), [5.0], [2], [5.0], [3.0]),
    ('decay_input tau=2', dict(tau=2.0, decay_input=True), [3.0, 1.0, -4.0],
     [1, 0, -1], [1.5, 0.75, -1.625], [0.5, 0.75, -0.625]),
    ('asymmetric thresholds', dict(v_threshold=0.5, v_threshold_neg=-2.0), [1.2, -4.5],
     [2, -2], [1.2, -4.45], [0.2, -0.45]),
    ('detach_reset same forward', dict(detach_reset=True), [0.5, 2.2, -1.4],
     [0, 2, -1], [0.5, 2.325, -1.31875], [0.5, 0.325, -0.31875]),
]


@pytest.mark.parametrize('name,kwargs,x,s,h,v', GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_sequences(name, kwargs, x, s, h, v):
    s_out, h_out, v_out = run_node(x, **kwargs)
    assert s_out == [float(i) for i in s]
    assert h_out == pytest.approx(h, abs=1e-12)
    assert v_out == pytest.approx(v, abs=1e-12)


@pytest.mark.parametrize('detach_reset,expected', [(False, 1.0), (True, 2.0)])
def test_golden_gradient(detach_reset, expected):
    # h = x = 1.2: level 1 is inside CFRect's window (|0.2| < 0.5), level 2 is not, so
    # ds/dh = 1 and dv/dh = 1 - theta_p * 1 = 0 (or 1 with detach_reset): d(s + v)/dx = 1 or 2.
    x = torch.tensor([[1.2]], dtype=torch.float64, requires_grad=True)
    node = CFNode(step_mode='m', backend='torch', detach_reset=detach_reset)
    s = node(x)
    (s.sum() + node.v.sum()).backward()
    assert x.grad.item() == pytest.approx(expected)


@pytest.mark.parametrize('make_sg', [CFRect, lambda: TSG(6), lambda: surrogate.ATan()],
                         ids=['rect', 'tsg', 'atan'])
@pytest.mark.parametrize('decay_input', [False, True])
def test_multi_step_equals_single_steps(make_sg, decay_input):
    torch.manual_seed(1)
    T, shape = 6, (3, 5)
    x = (torch.randn(T, *shape) * 2).requires_grad_()
    g = torch.randn(T, *shape)
    results = []
    for mode in ('m', 's'):
        sg = make_sg()
        node = CFNode(step_mode=mode, backend='torch', surrogate_function=sg,
                      decay_input=decay_input, store_v_seq=True, store_h_seq=True)
        if mode == 'm':
            s = node(x)
        else:
            s = torch.stack([node(x[t]) for t in range(T)])
        loss = (s * g).sum() + node.v.sum() + node.v_seq.pow(2).sum()
        grads = torch.autograd.grad(loss, [x] + list(sg.parameters()))
        results.append((s.detach(), node.v.detach(), node.v_seq.detach(), grads, node.step_count))
    (s_m, v_m, vs_m, g_m, c_m), (s_s, v_s, vs_s, g_s, c_s) = results
    assert torch.equal(s_m, s_s)
    torch.testing.assert_close(v_m, v_s)
    torch.testing.assert_close(vs_m, vs_s)
    assert c_m == c_s == T
    for a, b in zip(g_m, g_s):
        torch.testing.assert_close(a, b)


def _gradcheck_node(sg, decay_input=False, detach_reset=False, k_neg=2):
    torch.manual_seed(2)
    T, N = 4, 7
    x = (torch.randn(T, N, dtype=torch.float64) * 1.5).requires_grad_()
    v0 = (torch.randn(N, dtype=torch.float64) * 0.3).requires_grad_()
    params = {name: p.detach().double().clone().requires_grad_() for name, p in sg.named_parameters()}

    wrapper = _RefWrapper(sg.double())

    def f(x, v0, *ps):
        mapping = {f'sg.{name}': p for name, p in zip(params.keys(), ps)}
        return torch.func.functional_call(
            wrapper, mapping, (x, v0),
            {'decay_input': decay_input, 'detach_reset': detach_reset, 'k_neg': k_neg})

    assert torch.autograd.gradcheck(f, (x, v0, *params.values()), eps=1e-6, atol=1e-5)


class _RefWrapper(nn.Module):
    def __init__(self, sg):
        super().__init__()
        self.sg = sg

    def forward(self, x, v0, **kwargs):
        return cf_multi_step_ref(x, v0, surrogate_function=self.sg, return_h_seq=True,
                                 return_v_seq=True, **kwargs)


@pytest.mark.parametrize('make_sg', [lambda: CFRect(spiking=False), lambda: TSG(4, spiking=False),
                                     lambda: TSG(1, spiking=False),
                                     lambda: surrogate.Sigmoid(spiking=False)],
                         ids=['rect', 'tsg', 'tsg-shared', 'sj-sigmoid'])
# detach_reset cuts a true derivative on purpose, so gradcheck runs without it
@pytest.mark.parametrize('decay_input,detach_reset', [(False, False), (True, False)])
def test_gradcheck_float64(make_sg, decay_input, detach_reset):
    _gradcheck_node(make_sg(), decay_input, detach_reset)


def _tsg_psi(x, a):
    return torch.where(x.abs() < 1 / a, x * (1 - a * x.abs()), torch.zeros_like(x))


def _tsg_g(x, a):
    return torch.clamp(a * (1 - a * x.abs()), min=0)


def test_tsg_straight_through_gradients_match_spec():
    torch.manual_seed(3)
    sg = TSG(1).double()
    a = sg.alpha().item()
    h = (torch.rand(257, dtype=torch.float64) * 6 - 3).requires_grad_()
    node = CFNode(step_mode='m', backend='torch', surrogate_function=sg)
    s = node(h.unsqueeze(0))[0]
    assert torch.equal(s, torch.clamp(torch.floor(h.detach()), -2, 2)
                       .where(h.detach() >= 0, -torch.clamp(torch.floor(-h.detach()), -2, 2)))
    gs = torch.randn(257, dtype=torch.float64)
    (s * gs).sum().backward()
    hd = h.detach()
    xp = [hd - k for k in (1, 2)]
    xn = [-k - hd for k in (1, 2)]
    ds_dh = sum(_tsg_g(x, a) for x in xp + xn)
    torch.testing.assert_close(h.grad, gs * ds_dh)
    ds_da = sum(_tsg_psi(x, a) for x in xp) - sum(_tsg_psi(x, a) for x in xn)
    sig = torch.sigmoid(sg.p.detach())
    da_dp = (sg.alpha_max - sg.alpha_min) * sig * (1 - sig)
    torch.testing.assert_close(sg.p.grad, (gs * ds_da).sum() * da_dp)


@pytest.mark.parametrize('detach_reset', [False, True])
def test_tsg_alpha_t_gets_gradient_only_from_its_step(detach_reset):
    torch.manual_seed(4)
    T = 5
    for t_loss in range(T):
        sg = TSG(T).double()
        x = torch.randn(T, 400, dtype=torch.float64) * 2
        node = CFNode(step_mode='m', backend='torch', surrogate_function=sg, detach_reset=detach_reset)
        node(x)[t_loss].sum().backward()
        grad = sg.p.grad
        assert torch.all(grad[t_loss + 1:] == 0), 'later steps must not receive gradient'
        assert grad[t_loss] != 0
        if detach_reset:
            assert torch.all(grad[:t_loss] == 0), 'without the reset path only a_t is reached'
        elif t_loss > 0:
            assert grad[:t_loss].abs().sum() > 0, 'the reset path carries gradient to earlier a_t'


def test_tsg_sequence_length_rules():
    sg = TSG(4)
    node = CFNode(step_mode='m', surrogate_function=sg, backend='torch')
    node(torch.randn(3, 2))  # shorter: first entries
    with pytest.raises(ValueError, match='T=4.*reset_net'):
        node(torch.randn(2, 2))  # steps 3..4 run past T=4
    functional.reset_net(node)
    with pytest.raises(ValueError, match='T=4'):
        node(torch.randn(5, 2))
    shared = CFNode(step_mode='m', surrogate_function=TSG(1), backend='torch')
    shared(torch.randn(50, 2))  # T=1 shares one a for every step
    assert shared.step_count == 50


def test_single_step_counts_and_reset_net():
    node = CFNode(surrogate_function=TSG(3), backend='torch')
    for _ in range(3):
        node(torch.randn(4))
    assert node.step_count == 3
    with pytest.raises(ValueError, match='TSG'):
        node(torch.randn(4))
    functional.reset_net(node)
    assert node.step_count == 0 and node.v == 0.0
    node(torch.randn(4))


def test_store_sequences_and_detach():
    x = torch.randn(5, 2, 3, requires_grad=True)
    node = CFNode(step_mode='m', backend='torch', store_h_seq=True, store_v_seq=True)
    node(x)
    assert node.h_seq.shape == node.v_seq.shape == (5, 2, 3)
    assert node.h_seq.requires_grad, 'h_seq must stay differentiable (the PNB loss needs it)'
    node.h_seq.sum().backward()
    assert x.grad.abs().sum() > 0
    functional.detach_net(node)
    assert not node.v.requires_grad and not node.h_seq.requires_grad
    single = CFNode(backend='torch', store_h_seq=True, store_v_seq=True)
    for t in range(3):
        single(x[t].detach())
        assert single.h_seq.shape == (1, 2, 3)
    assert single.v_seq.shape == (3, 2, 3)
    functional.reset_net(single)
    assert single.h_seq is None and single.v_seq is None


def test_set_step_mode_state_dict_and_repr():
    net = nn.Sequential(layer.Linear(4, 6), CFNode(surrogate_function=TSG(4)), layer.Linear(6, 2))
    functional.set_step_mode(net, 'm')
    assert net[1].step_mode == 'm'
    out = net(torch.randn(4, 3, 4))
    assert out.shape == (4, 3, 2)
    with torch.no_grad():
        net[1].surrogate_function.p.add_(0.3)
    clone = nn.Sequential(layer.Linear(4, 6), CFNode(surrogate_function=TSG(4)), layer.Linear(6, 2))
    clone.load_state_dict(net.state_dict())
    torch.testing.assert_close(clone[1].surrogate_function.alpha(), net[1].surrogate_function.alpha())
    text = repr(net[1])
    for word in ('tau=', 'v_threshold_neg=-1.0', 'k_pos=2', 'k_neg=2', 'backend=auto', 'TSG(T=4'):
        assert word in text


def test_registered_in_spikingjelly():
    assert neuron.CFNode is CFNode
    assert surrogate.TSG is TSG and surrogate.CFRect is CFRect
    assert isinstance(neuron.CFNode(), neuron.BaseNode)
    a, b = CFNode(), CFNode()
    assert a.surrogate_function is not b.surrogate_function, 'each node owns a fresh CFRect'


@pytest.mark.skipif(not CLASSIC, reason='functional.set_backend exists on SpikingJelly 0.0.0.0.14 only')
def test_set_backend_classic():
    net = nn.Sequential(layer.Linear(3, 3), CFNode(step_mode='m'))
    functional.set_backend(net, 'torch')
    assert net[1].backend == 'torch'
    assert 'cupy' in net[1].supported_backends


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_dtypes_follow_input(dtype):
    # worked by hand (k = 0.25; every value exact in bfloat16):
    # h1 = x1, s1 = [0, 1, -2, 2], v1 = [0.25, 0.5, -0.5, 0.75];
    # h2 = v1 / 4 + x2 = [0.8125, 1.125, -1.125, 1.6875], s2 = [0, 1, -1, 1], v2 = h2 - s2
    x = torch.tensor([[0.25, 1.5, -2.5, 2.75], [0.75, 1.0, -1.0, 1.5]], dtype=dtype)
    node = CFNode(step_mode='m', backend='auto', store_h_seq=True)
    out = node(x)
    assert out.dtype == dtype and node.v.dtype == dtype and node.h_seq.dtype == dtype
    assert out.tolist() == [[0., 1., -2., 2.], [0., 1., -1., 1.]]
    assert node.h_seq.tolist() == [[0.25, 1.5, -2.5, 2.75], [0.8125, 1.125, -1.125, 1.6875]]
    assert node.v.tolist() == [0.8125, 0.125, -0.125, 0.6875]


BAD = [
    (dict(v_threshold=0.0), ValueError, 'v_threshold'),
    (dict(v_threshold=-1.0), ValueError, 'v_threshold'),
    (dict(v_threshold='1'), TypeError, 'v_threshold'),
    (dict(v_threshold=torch.tensor(1.0)), TypeError, 'v_threshold'),
    (dict(v_threshold_neg=0.5), ValueError, 'v_threshold_neg'),
    (dict(v_threshold_neg=0.0), ValueError, 'v_threshold_neg'),
    (dict(k_pos=0), ValueError, 'k_pos'),
    (dict(k_neg=-1), ValueError, 'k_neg'),
    (dict(k_pos=2.0), TypeError, 'k_pos'),
    (dict(k_neg=1.5), TypeError, 'k_neg'),
    (dict(tau=1.0), ValueError, 'tau'),
    (dict(tau=0.5), ValueError, 'tau'),
    (dict(v_reset=0.0), ValueError, 'v_reset'),
    (dict(backend='numba'), ValueError, 'backend'),
    (dict(step_mode='x'), ValueError, 'step_mode'),
    (dict(surrogate_function=3), TypeError, 'surrogate_function'),
]


@pytest.mark.parametrize('kwargs,exc,word', BAD, ids=[str(b[0]) for b in BAD])
def test_bad_parameters(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        CFNode(**kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match='floating-point'):
        CFNode()(torch.ones(3, dtype=torch.int64))
    node = CFNode()
    node(torch.randn(3))
    with pytest.raises(ValueError, match='reset_net'):
        node(torch.randn(4))
    with pytest.raises(ValueError, match='backend'):
        cf_multi_step(torch.randn(2, 3), torch.zeros(3), backend='numba')
    with pytest.raises(ValueError, match='shape'):
        cf_multi_step(torch.randn(2, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="backend='cupy' needs CUDA"):
        cf_multi_step(torch.randn(2, 3), torch.zeros(3), backend='cupy')
    with pytest.raises(ValueError, match='T must be'):
        TSG(0)
    with pytest.raises(ValueError, match='alpha_init'):
        TSG(4, alpha_init=5.0)


def test_variants():
    assert variant_kwargs('st') == {'k_pos': 1, 'k_neg': 0}
    assert variant_kwargs('CF', K=3) == {'k_pos': 3, 'k_neg': 3}
    with pytest.raises(ValueError, match='variant'):
        variant_kwargs('XX')
    x = torch.linspace(-5, 5, 101).unsqueeze(0)
    for name, (lo, hi) in {'ST': (0, 1), 'DT': (-1, 1), 'SCF': (0, 2), 'CF': (-2, 2)}.items():
        s = CFNode.from_variant(name, step_mode='m')(x)
        assert s.min().item() == lo and s.max().item() == hi


def test_explicit_kernel_backend_rejects_unsupported_surrogate():
    sg = surrogate.PiecewiseQuadratic()
    with pytest.raises(ValueError, match='supports the surrogates'):
        cf_multi_step(torch.randn(2, 3), torch.zeros(3), surrogate_function=sg, backend='cpp')
    with pytest.warns(RuntimeWarning, match='reference'):
        # 'auto' falls back to the reference with a one-time warning
        spikingjelly_cf.functional.neuron._warned.discard('sg-PiecewiseQuadratic')
        x = torch.tensor([[0.5, 1.0, -2.5], [1.5, -0.25, 0.0]])
        out = cf_multi_step(x, torch.zeros(3), surrogate_function=sg, return_h_seq=True)
    # by hand: h1 = x1, s1 = [0, 1, -2], v1 = [0.5, 0, -0.5]; h2 = v1 / 4 + x2
    assert out[0].tolist() == [[0., 1., -2.], [1., 0., 0.]]
    assert out[2].tolist() == [[0.5, 1.0, -2.5], [1.625, -0.25, -0.125]]
    ref = cf_multi_step_ref(x, torch.zeros(3), surrogate_function=sg, return_h_seq=True)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_spikingjelly_surrogate_per_level_gradient():
    sg = surrogate.ATan(alpha=2.0)
    h = torch.tensor([[0.7, -1.6]], dtype=torch.float64, requires_grad=True)
    s = CFNode(step_mode='m', backend='torch', surrogate_function=sg)(h)
    s.sum().backward()

    def g(x):
        return 2.0 / 2 / (1 + (math.pi / 2 * 2.0 * x) ** 2)

    expected = [sum(g(hv - k) + g(-k - hv) for k in (1, 2)) for hv in (0.7, -1.6)]
    assert h.grad.flatten().tolist() == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# v_threshold_neg=None follows v_threshold at every call
# ----------------------------------------------------------------------------------------------
def test_v_threshold_neg_none_follows_v_threshold(backend):  # noqa: F811
    """SpikingJelly users set thresholds as attributes: with ``v_threshold_neg=None`` the
    negative threshold is minus the current ``v_threshold``, on every backend."""
    node = CFNode(step_mode='m', backend=backend.name)
    node.v_threshold = 0.5
    assert node.v_threshold_neg == -0.5
    x = backend.tensor([[1.2, -1.2]])
    with backend.ran():
        s = node(x)
    assert s.tolist() == [[2.0, -2.0]]   # 1.2 >= 2 * 0.5 and -1.2 <= 2 * -0.5: two levels each side
    node.v_threshold = 2.0
    functional.reset_net(node)
    assert node(backend.tensor([[4.5, -4.5]])).tolist() == [[2.0, -2.0]]
    assert node(backend.tensor([[0.0, -3.0]])).tolist() == [[0.0, -1.0]]  # h = 0.125, -3.125


def test_v_threshold_neg_live_value_everywhere():
    import copy
    from spikingjelly_cf import PNBMonitor
    node = CFNode(step_mode='m', backend='torch')
    assert node.__dict__.get('_v_threshold_neg', 'missing') is None, 'the stored value stays None'
    node.v_threshold = 0.25
    assert 'v_threshold_neg=-0.25' in repr(node) and '-v_threshold' in repr(node)
    twin = copy.deepcopy(node)
    twin.v_threshold = 0.75
    assert twin.v_threshold_neg == -0.75 and node.v_threshold_neg == -0.25
    clone = CFNode(step_mode='m', backend='torch')
    clone.load_state_dict(node.state_dict())
    assert clone.v_threshold_neg == -clone.v_threshold
    # the PNB statistics use the live negative threshold: h = -0.25 sits on level -1 exactly
    net = nn.Sequential(node)
    with PNBMonitor(net) as pnb:
        net(torch.tensor([[-0.25, 0.25]]))
        stats = pnb.statistics()['0']
    expected = spikingjelly_cf.functional.pnb_statistics(
        torch.tensor([[-0.25, 0.25]]), 0.25, -0.25, 2)
    torch.testing.assert_close(stats, expected)
    # an explicit value stays fixed
    fixed = CFNode(v_threshold_neg=-2.0, step_mode='m', backend='torch')
    fixed.v_threshold = 0.5
    assert fixed.v_threshold_neg == -2.0
    assert fixed(torch.tensor([[-2.5]])).tolist() == [[-1.0]]
    # and can be set back to None or to a new value, checked like the constructor's argument
    fixed.v_threshold_neg = None
    assert fixed.v_threshold_neg == -0.5
    with pytest.raises(ValueError, match='v_threshold_neg'):
        fixed.v_threshold_neg = 0.5
    with pytest.raises(TypeError, match='v_threshold_neg'):
        fixed.v_threshold_neg = '1'


# ----------------------------------------------------------------------------------------------
# TSG's mapping pinned against the formula, computed here (never read back from the module)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('a_init,a_min,a_max', [(2.0, 0.5, 3.5), (1.1, 0.3, 5.0), (0.9, 0.8, 1.0)])
def test_tsg_mapping_and_initial_value_pinned(a_init, a_min, a_max):
    r"""Eq. 17: :math:`a_t = (a_{max} - a_{min})\,\sigma(p_t) + a_{min}` and the initial
    :math:`p = \mathrm{logit}((a_{init} - a_{min}) / (a_{max} - a_{min}))`, in float64 by hand;
    then the gradient a level sees at step ``t`` (Eq. 16's triangle at that ``a_t``) and the
    gradient of ``p_t``."""
    T = 3
    sg = TSG(T, alpha_init=a_init, alpha_min=a_min, alpha_max=a_max).double()
    q = (a_init - a_min) / (a_max - a_min)
    assert sg.p.tolist() == pytest.approx([math.log(q) - math.log(1 - q)] * T, rel=1e-6, abs=1e-6)
    p = [-1.3, 0.0, 2.1]
    with torch.no_grad():
        sg.p.copy_(torch.tensor(p, dtype=torch.float64))

    def a_of(p_t):
        return (a_max - a_min) / (1 + math.exp(-p_t)) + a_min

    assert sg.alpha().tolist() == pytest.approx([a_of(v) for v in p], rel=1e-12)
    assert sg.alpha_steps(1, 2).tolist() == pytest.approx([a_of(v) for v in p[1:]], rel=1e-12)
    for t in range(T):
        a = a_of(p[t])
        x0 = 0.3 / a   # inside the triangle |x| < 1/a
        x = torch.tensor([x0, -x0, 2.0 / a], dtype=torch.float64, requires_grad=True)
        sg.zero_grad()
        sg(x, t=t).sum().backward()
        assert x.grad.tolist() == pytest.approx([a * (1 - a * x0), a * (1 - a * x0), 0.0], rel=1e-12)
        sig = 1 / (1 + math.exp(-p[t]))
        da_dp = (a_max - a_min) * sig * (1 - sig)
        # d H / d a = x (1 - a|x|) per level (straight-through of the primitive)
        expected = (x0 * (1 - a * x0) - x0 * (1 - a * x0)) * da_dp
        assert sg.p.grad[t].item() == pytest.approx(expected, abs=1e-12)
        # a one-sided input makes the gradient of p_t nonzero and pins its value
        sg.zero_grad()
        sg(torch.tensor([x0], dtype=torch.float64), t=t).sum().backward()
        assert sg.p.grad.tolist() == pytest.approx(
            [x0 * (1 - a * x0) * da_dp if i == t else 0.0 for i in range(T)], rel=1e-12, abs=1e-15)
