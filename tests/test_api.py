"""Public behaviour that had no test (issue 12, items 8 and 9): the functional entry points, the
dispatcher's branches, monitor options and errors, and the bad-input policy of every entry point
(clear TypeError/ValueError naming the argument; NaN/inf handled the same on every backend)."""
import math

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import spikingjelly_cf
from _backends import backend  # noqa: F401  (fixture)
from spikingjelly_cf import CFNode, CFRect, TSG, backends, replace_neurons
from spikingjelly_cf.functional import neuron as fn
from spikingjelly_cf.functional import cf_multi_step, cf_multi_step_ref, cf_single_step
from spikingjelly_cf.monitor import EnergyMonitor, PNBMonitor, SpikeLevelHistogram
from test_energy import brute_force_conv_sops


# -- functional entry points ------------------------------------------------------------------

def test_cf_single_step_equals_multi_step():
    torch.manual_seed(0)
    T = 5
    sg = TSG(T)
    with torch.no_grad():
        sg.p.copy_(torch.linspace(-1, 1, T))
    x = (torch.randn(T, 3, 4, dtype=torch.float64) * 2).requires_grad_()
    s_m, v_m, h_m, _ = cf_multi_step(x, torch.zeros(3, 4, dtype=torch.float64),
                                     surrogate_function=sg, return_h_seq=True, k_pos=3)
    v = torch.zeros(3, 4, dtype=torch.float64)
    steps = []
    for t in range(T):
        s, v, h = cf_single_step(x[t], v, t=t, surrogate_function=sg, k_pos=3)
        assert s.shape == h.shape == v.shape == (3, 4)
        steps.append((s, h))
    assert torch.equal(torch.stack([s for s, _ in steps]), s_m)
    torch.testing.assert_close(torch.stack([h for _, h in steps]), h_m)
    torch.testing.assert_close(v, v_m)
    g_m = torch.autograd.grad(s_m.sum() + v_m.sum(), [x, sg.p])
    g_s = torch.autograd.grad(torch.stack([s for s, _ in steps]).sum() + v.sum(), [x, sg.p])
    for a, b in zip(g_m, g_s):
        torch.testing.assert_close(a, b)


def test_single_step_functional_forward():
    """SpikingJelly 2.0's functional API: explicit state (v, step_count) in and out."""
    torch.manual_seed(1)
    T = 4
    x = torch.randn(T, 2, 5) * 2
    sg = TSG(T)
    with torch.no_grad():
        sg.p.copy_(torch.linspace(-1, 1, T))
    node = CFNode(surrogate_function=sg, backend='torch')
    stateful = CFNode(surrogate_function=sg, backend='torch')
    states = (0., 0)
    for t in range(T):
        (s,), states = node.single_step_functional_forward((x[t],), states)
        assert torch.equal(s, stateful(x[t]))
        torch.testing.assert_close(states[0], stateful.v)
        assert states[1] == t + 1 == stateful.step_count
    assert node.step_count == 0 and node.v == 0., 'the functional step leaves the module alone'
    # the step count selects a_t: step 2 alone, started from step 2's state, reads a_2
    sg.p.grad = None
    v2 = torch.zeros(2, 5)
    (s,), _ = node.single_step_functional_forward((x[2],), (v2, 2))
    s.sum().backward()
    assert sg.p.grad[2] != 0 and sg.p.grad[[0, 1, 3]].abs().sum() == 0


def test_cpp_empty_cache():
    cpp = backends.module('cpp')
    if not cpp.available():
        pytest.skip(cpp.unavailable_reason())
    x = (torch.randn(3, 33) * 2).requires_grad_()
    s, _, _, _ = cf_multi_step(x, torch.zeros(33), backend='cpp')
    s.sum().backward()
    del s
    assert cpp._pool.get((3 * 33, torch.float32)), 'a freed graph returns its h buffer to the pool'
    cpp.empty_cache()
    assert cpp._pool == {}
    s, _, _, _ = cf_multi_step(x, torch.zeros(33), backend='cpp')  # works after emptying
    assert torch.equal(s, cf_multi_step_ref(x.detach(), torch.zeros(33))[0])


# -- resolve_backend: every branch ------------------------------------------------------------

def _quiet_resolve(*args):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a branch that should not warn must not
        return fn.resolve_backend(*args)


def test_resolve_backend_branches(monkeypatch):
    x32, x64 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    rect = CFRect()
    assert _quiet_resolve('torch', x32, rect) == 'torch'
    assert _quiet_resolve('auto', x64, rect) == 'torch'  # no kernel runs float64: no warning
    cpu_kernels = backends.available_backends('cpu', torch.float32)[:-1]
    assert _quiet_resolve('auto', x32, rect) == (cpu_kernels[0] if cpu_kernels else 'torch')
    assert _quiet_resolve(None, x32, rect) == _quiet_resolve('auto', x32, rect)
    with pytest.raises(ValueError, match="backend must be one of"):
        fn.resolve_backend('numba', x32, rect)
    if backends.is_available('cpp'):
        assert _quiet_resolve('cpp', x32, rect) == 'cpp'
        # a dtype the kernel lacks: the reference, said once
        fn._warned.discard('dtype-cpp-torch.float64')
        with pytest.warns(RuntimeWarning, match="backend='cpp' runs float32, float16, bfloat16 "
                                                "on cpu, not float64; using the reference"):
            assert fn.resolve_backend('cpp', x64, rect) == 'torch'
        assert _quiet_resolve('cpp', x64, rect) == 'torch'
        assert _quiet_resolve('cpp', x32.bfloat16(), rect) == 'cpp'  # half types: the kernel
    # non-spiking surrogates: the reference under 'auto' (one warning), an error when explicit
    fn._warned.discard('sg-CFRect')
    with pytest.warns(RuntimeWarning, match="runs on the reference 'torch' backend"):
        assert fn.resolve_backend('auto', x32, CFRect(spiking=False)) == 'torch'
    assert _quiet_resolve('auto', x32, CFRect(spiking=False)) == 'torch'  # warned once
    with pytest.raises(ValueError, match='supports the surrogates'):
        fn.resolve_backend('cpp', x32, surrogate.Sigmoid(spiking=False))
    # an unavailable kernel: 'auto' warns once and uses the reference; explicit raises
    monkeypatch.setattr(backends, 'is_available', lambda name: False)
    fn._warned.discard('unavailable-cpp')
    with pytest.warns(RuntimeWarning, match="backend 'cpp' is unavailable"):
        assert fn.resolve_backend('auto', x32, rect) == 'torch'
    assert _quiet_resolve('auto', x32, rect) == 'torch'
    with pytest.raises(RuntimeError, match="backend='cpp' is unavailable"):
        fn.resolve_backend('cpp', x32, rect)


@pytest.mark.parametrize('name', list(backends.KERNEL_BACKENDS))
def test_explicit_backend_on_a_device_it_does_not_run(name):
    table = backends.KERNEL_BACKENDS[name]
    device = 'meta' if 'cpu' in table else 'cpu'
    x = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match=f"backend='{name}' needs .*got a tensor on {device}"):
        fn.resolve_backend(name, x, CFRect())
    with pytest.raises(ValueError, match=f"backend='{name}' needs"):
        CFNode(step_mode='m', backend=name)(x)


# -- monitors -----------------------------------------------------------------------------------

def test_pnb_monitor_eps_by_hand():
    # K = 1, thresholds +-1, h = {0.5, -0.5} in one step: both intervals hold one value with
    # weight w = exp(-0.5); mu+ = 0.5 w / (w + eps), mu- = -0.5 w / (w + eps),
    # L = |log(|mu+| / (|mu-| + eps) + eps)|
    h = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    for eps in (1e-6, 0.25):
        node = CFNode(step_mode='m', backend='torch', k_pos=1, k_neg=1)
        with PNBMonitor(node, eps=eps) as pnb:
            assert pnb.eps == eps
            node(h)
            loss = pnb.loss().item()
        w = math.exp(-0.5)
        mu_p, mu_n = 0.5 * w / (w + eps), -0.5 * w / (w + eps)
        assert loss == pytest.approx(abs(math.log(abs(mu_p) / (abs(mu_n) + eps) + eps)), rel=1e-12)
    assert loss > 0.05  # eps = 0.25 unbalances the two sides visibly
    with pytest.raises(ValueError, match='eps'):
        PNBMonitor(CFNode(), eps=-1.)


class _NoHSeq(nn.Module):
    """Has a CF layer's attributes but never stores its potentials."""

    def __init__(self):
        super().__init__()
        self.store_h_seq, self.h_seq = False, None
        self.v_threshold, self.v_threshold_neg, self.k_pos, self.k_neg = 1.0, -1.0, 1, 1

    def forward(self, x):
        return x


def test_pnb_monitor_missing_h_seq_and_one_monitor_per_layer():
    with PNBMonitor(nn.Sequential(_NoHSeq()), instance=_NoHSeq) as pnb:
        with pytest.raises(RuntimeError, match="layer '0' ran with store_h_seq=True but left h_seq=None"):
            pnb._monitored['0'](torch.zeros(2))
    net = nn.Sequential(CFNode(backend='torch'), CFNode(backend='torch'))
    first = PNBMonitor(net, names='0')
    with pytest.raises(ValueError, match="layer '0'.*already has a PNBMonitor"):
        PNBMonitor(net)
    with PNBMonitor(net, names='1'):  # another layer: fine
        pass
    first.disable()
    with pytest.raises(ValueError, match='already has a PNBMonitor'):
        PNBMonitor(net, names='0')  # disabled is not removed
    first.remove()
    with PNBMonitor(net) as pnb:
        assert pnb.monitored_layers == ['0', '1'] and net[0].store_h_seq


def test_energy_monitor_e_flop_ann_conv3d_and_mixed_T():
    torch.manual_seed(2)
    conv = nn.Conv3d(2, 3, kernel_size=(2, 3, 3), padding=(0, 1, 1))
    net = nn.Sequential(conv)
    s = torch.randint(-2, 3, (2, 2, 3, 4, 4)).float()  # [N, C, D, H, W] spikes
    with torch.no_grad(), EnergyMonitor(net, T=1, e_sop=2.0, e_flop_ann=3.0) as em:
        net(s)
        table = em.table()
    (row,) = table['layers']
    assert row['type'] == 'Conv3d' and row['input'] == 'spikes'
    assert row['flops'] == 3 * (2 * 4 * 4) * (2 * 2 * 3 * 3)  # outputs x taps, per sample
    assert row['sops'] == brute_force_conv_sops(conv, s) / 2  # per sample
    assert row['energy_j'] == 2.0 * row['sops']
    assert table['total']['ann_energy_j'] == 3.0 * row['flops']
    assert table['total']['ann_to_snn'] == pytest.approx(3.0 * row['flops'] / (2.0 * row['sops']))
    # multi-step inputs of two lengths and no T: per sample-step numbers (T = 1)
    lin = layer.Linear(4, 3, step_mode='m')
    a, b = torch.full((2, 1, 4), 1.), torch.full((3, 1, 4), 2.)
    with torch.no_grad(), EnergyMonitor(nn.Sequential(lin)) as em:
        lin(a)
        lin(b)
        (row,) = em.table()['layers']
    assert row['T'] == 1
    assert row['sops'] == pytest.approx((2 * 4 * 1 + 3 * 4 * 2) * 3 / 5)
    with torch.no_grad(), EnergyMonitor(nn.Sequential(lin), T=5) as em:  # T given: per sample
        lin(a)
        lin(b)
        (row,) = em.table()['layers']
    assert row['T'] == 5 and row['sops'] == pytest.approx((2 * 4 * 1 + 3 * 4 * 2) * 3)
    with pytest.raises(ValueError, match='e_flop_ann'):
        EnergyMonitor(net, e_flop_ann=-1.)


def test_spike_level_histogram_filters_and_asymmetric_levels():
    net = nn.Sequential(CFNode(step_mode='m', backend='torch', k_pos=3, k_neg=1),
                        CFNode(step_mode='m', backend='torch'),
                        neuron.IFNode(step_mode='m'))
    x = torch.tensor([[[3.5, 2.0, 1.0, 0.5, -0.5, -1.0, -7.0]]])
    with SpikeLevelHistogram(net, names='0') as hist:
        assert hist.monitored_layers == ['0']
        net[0](x)
        net[1](x)
        assert hist.counts() == {'0': {-1: 2, 0: 2, 1: 1, 2: 1, 3: 1}}
        assert hist.spike_count() == {'0': 2 + 1 + 2 + 3}
    with SpikeLevelHistogram(net, instance=neuron.IFNode) as hist:
        assert hist.monitored_layers == ['2']
        out = net[2](x)
        assert hist.counts() == {'2': {0: int((out == 0).sum()), 1: int((out == 1).sum())}}
        assert sum(hist.counts()['2'].values()) == 7
    with pytest.raises(ValueError, match='names'):
        SpikeLevelHistogram(net, names=['9'])
    with pytest.raises(ValueError, match='no CF layer'):
        SpikeLevelHistogram(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match='instance'):
        SpikeLevelHistogram(net, instance=3)


def test_replace_neurons_errors():
    with pytest.raises(ValueError, match='net itself is a neuron'):
        replace_neurons(neuron.LIFNode())
    with pytest.raises(TypeError, match='surrogate_function'):
        replace_neurons(nn.Sequential(neuron.LIFNode(v_reset=None)), surrogate_function=3)
    with pytest.raises(ValueError, match="surrogate_function must be None, 'keep'"):
        replace_neurons(nn.Sequential(neuron.LIFNode(v_reset=None)), surrogate_function='bogus')
    with pytest.raises(ValueError, match='k_pos'):
        replace_neurons(nn.Sequential(neuron.LIFNode(v_reset=None)), k_pos=0)
    with pytest.raises(TypeError, match='v_threshold_neg'):
        replace_neurons(nn.Sequential(neuron.LIFNode(v_reset=None)), v_threshold_neg='-1')


# -- bad input ----------------------------------------------------------------------------------

def test_empty_and_misshapen_inputs():
    node = CFNode(step_mode='m')
    for bad in (torch.zeros(0, 3), torch.zeros(0), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r'x_seq must be a tensor of shape \[T, N, \*\] with T >= 1'):
            node(bad)
    with pytest.raises(ValueError, match='T >= 1'):
        cf_multi_step(torch.zeros(0, 3), torch.zeros(3))
    with pytest.raises(ValueError, match='T >= 1'):
        cf_multi_step_ref(torch.zeros(0, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r'v must have the shape of one step of x_seq, \(3,\)'):
        cf_multi_step(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match='x_seq must be a torch.Tensor'):
        cf_multi_step([[1.0]], torch.zeros(1))
    with pytest.raises(TypeError, match='v must be a torch.Tensor'):
        cf_multi_step(torch.zeros(2, 3), 0.0)
    node = CFNode(step_mode='m')
    node(torch.zeros(2, 3))
    with pytest.raises(ValueError, match='reset_net'):
        node(torch.zeros(2, 4))  # a new shape needs a reset


def test_bad_dtypes():
    with pytest.raises(TypeError, match='floating-point'):
        CFNode(step_mode='m')(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match='floating-point'):
        cf_multi_step(torch.ones(2, 3, dtype=torch.int64), torch.zeros(3))
    with pytest.raises(TypeError, match=r'v must have the dtype of x_seq \(torch.float32\), got torch.float64'):
        cf_multi_step(torch.ones(2, 3), torch.zeros(3, dtype=torch.float64))
    # the module casts its own state to the input's dtype (e.g. after net.double())
    node = CFNode(step_mode='m', backend='torch')
    x = torch.tensor([[1.5], [0.75]])
    node(x[:1])
    out = node(x[1:].double())
    # by hand: s1 = 1, v1 = 0.5; h2 = 0.5 / 4 + 0.75 = 0.875, no spike
    assert out.dtype == node.v.dtype == torch.float64
    assert out.item() == 0.0 and node.v.item() == 0.875


def test_device_mix():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match='v and x_seq must be on one device, got v on meta and x_seq on cpu'):
        cf_multi_step(x, torch.zeros(3, device='meta'))
    with pytest.raises(ValueError, match='one device'):
        cf_multi_step_ref(x, torch.zeros(3, device='meta'))
    node = CFNode(step_mode='m', backend='torch')
    node(x)
    node.v = torch.zeros(3, device='meta')  # state left on another device
    with pytest.raises(ValueError, match="x_seq\\[t\\] is on cpu but the neuron state is on meta"):
        node(x)


@pytest.mark.parametrize('kwargs,exc,word', [
    (dict(tau=float('nan')), ValueError, 'tau'),
    (dict(tau=float('inf')), ValueError, 'tau'),
    (dict(tau=True), TypeError, 'tau'),
    (dict(v_threshold=float('inf')), ValueError, 'v_threshold'),
    (dict(v_threshold=float('nan')), ValueError, 'v_threshold'),
    (dict(v_threshold_neg=float('-inf')), ValueError, 'v_threshold_neg'),
    (dict(k_pos=True), TypeError, 'k_pos'),
    (dict(k_neg=None), TypeError, 'k_neg'),
    (dict(decay_input=1), TypeError, 'decay_input'),
    (dict(detach_reset='no'), TypeError, 'detach_reset'),
])
def test_out_of_range_parameters(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        CFNode(**kwargs)
    with pytest.raises(exc, match=word):
        cf_multi_step(torch.zeros(1, 2), torch.zeros(2), **kwargs)
    with pytest.raises(exc, match=word):
        cf_multi_step_ref(torch.zeros(1, 2), torch.zeros(2), **kwargs)


def test_non_finite_inputs_same_on_every_backend(backend):  # noqa: F811
    """The policy of ``spikingjelly_cf._validation``: NaN fires nothing and stays NaN; +-inf fire
    every level of their side and stay infinite."""
    nan, inf = float('nan'), float('inf')
    x = backend.tensor([[nan, inf, -inf, 0.5], [1.0, -1.0, 1.0, 1.5]])
    node = CFNode(step_mode='m', backend=backend.name, store_h_seq=True, store_v_seq=True)
    with backend.ran():
        s = node(x)
    assert s.cpu().tolist() == [[0., 2., -2., 0.], [0., 2., -2., 1.]]
    h, v = node.h_seq.cpu(), node.v_seq.cpu()
    assert torch.isnan(h[:, 0]).all() and torch.isnan(v[:, 0]).all()
    assert h[:, 1].tolist() == v[:, 1].tolist() == [inf, inf]
    assert h[:, 2].tolist() == v[:, 2].tolist() == [-inf, -inf]
    assert h[:, 3].tolist() == [0.5, 1.625] and v[:, 3].tolist() == [0.5, 0.625]
