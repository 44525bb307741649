"""Energy accounting (docs/method.md, section 4): exact SOPs against hand and brute-force counts, Eq. 26-28."""
import itertools

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer

from spikingjelly_cf.functional.energy import (ann_energy, firing_rate, is_spike_valued, mac_energy,
                                               snn_energy, sops_estimate, synaptic_flops,
                                               synaptic_operations)
from spikingjelly_cf.monitor import EnergyMonitor
from spikingjelly_cf.neuron import CFNode


def brute_force_conv_sops(conv, s):
    """sum over outputs (channel, position) of sum over the taps that land on a real input of |s|."""
    dims = s.dim() - 2
    a = s.abs()
    N, C = s.shape[:2]
    size = s.shape[2:]
    g = conv.groups
    cin_g, cout_g = conv.in_channels // g, conv.out_channels // g
    span = [conv.dilation[d] * (conv.kernel_size[d] - 1) for d in range(dims)]
    if conv.padding == 'same':  # PyTorch pads total // 2 on the left
        pad, out_size = [span[d] // 2 for d in range(dims)], list(size)
    else:
        pad = (0,) * dims if conv.padding == 'valid' else conv.padding
        out_size = [(size[d] + 2 * pad[d] - span[d] - 1) // conv.stride[d] + 1 for d in range(dims)]
    total = 0.
    for n, o in itertools.product(range(N), range(conv.out_channels)):
        group = o // cout_g
        for pos in itertools.product(*[range(L) for L in out_size]):
            for ci in range(group * cin_g, (group + 1) * cin_g):
                for tap in itertools.product(*[range(k) for k in conv.kernel_size]):
                    idx = [pos[d] * conv.stride[d] - pad[d] + tap[d] * conv.dilation[d] for d in range(dims)]
                    if conv.padding_mode == 'circular':
                        idx = [i % size[d] for d, i in enumerate(idx)]
                    elif any(i < 0 or i >= size[d] for d, i in enumerate(idx)):
                        continue  # zero padding: no operation
                    total += float(a[(n, ci, *idx)])
    return total


def test_linear_hand_count():
    s = torch.tensor([[2., 0., -2., 1.],
                      [0., -1., 0., 0.]])
    # |s| sums to 6, every input feeds 3 outputs
    assert float(synaptic_operations(nn.Linear(4, 3), s)) == 18.
    assert float(synaptic_operations(layer.Linear(4, 3), s)) == 18.
    assert synaptic_flops(nn.Linear(4, 3), s) == 2 * 4 * 3


def test_conv2d_hand_count():
    conv = nn.Conv2d(1, 2, kernel_size=2, bias=False)
    s = torch.tensor([[[[2., 0., 0.],
                        [0., -2., 0.],
                        [0., 0., 1.]]]])
    # 2x2 outputs: a corner is touched by 1 output, the centre by 4: (2*1 + 2*4 + 1*1) * 2 channels
    assert float(synaptic_operations(conv, s)) == 22.
    conv = layer.Conv2d(1, 3, kernel_size=3, padding=1)
    s = torch.tensor([[[[2., 0., -2.],
                        [0., 1., 0.],
                        [0., 0., 0.]]]])
    # with padding 1 a corner is touched by 4 outputs, the centre by 9: (2*4 + 2*4 + 1*9) * 3
    assert float(synaptic_operations(conv, s)) == 75.
    assert synaptic_flops(conv, s) == 1 * 3 * 9 * (1 * 9)


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
@pytest.mark.parametrize('kwargs', [
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2),
    dict(in_channels=2, out_channels=2, kernel_size=2, stride=3),              # untouched inputs
    dict(in_channels=2, out_channels=4, kernel_size=3, dilation=2, padding=2, groups=2),
    dict(in_channels=1, out_channels=2, kernel_size=3, padding=1, padding_mode='circular'),
    dict(in_channels=2, out_channels=3, kernel_size=(1, 3), padding='same'),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 4), padding='same', dilation=(1, 2)),
])
def test_conv2d_matches_brute_force(kwargs):
    conv = nn.Conv2d(**kwargs)
    g = torch.Generator().manual_seed(3)
    s = torch.randint(-2, 3, (2, kwargs['in_channels'], 5, 6), generator=g).float()
    assert float(synaptic_operations(conv, s)) == brute_force_conv_sops(conv, s)


def test_conv1d_matches_brute_force():
    conv = nn.Conv1d(3, 4, kernel_size=3, stride=2, padding=1)
    s = torch.randint(-2, 3, (2, 3, 9)).float()
    assert float(synaptic_operations(conv, s)) == brute_force_conv_sops(conv, s)
    assert synaptic_flops(conv, s) == 2 * 4 * 5 * 3 * 3
    assert float(synaptic_operations(conv, s[0])) == brute_force_conv_sops(conv, s[:1])  # unbatched


def test_multi_step_layers():
    T, N = 3, 2
    s = torch.randint(-2, 3, (T, N, 2, 5, 5)).float()
    conv = layer.Conv2d(2, 3, 3, padding=1, step_mode='m')
    per_step = sum(float(synaptic_operations(conv, s[t], step_mode='s')) for t in range(T))
    assert float(synaptic_operations(conv, s)) == per_step
    assert synaptic_flops(conv, s) == T * synaptic_flops(conv, s[0], step_mode='s')
    lin = layer.Linear(5, 4, step_mode='m')
    x = torch.randint(-2, 3, (T, N, 5)).float()
    assert float(synaptic_operations(lin, x)) == float(x.abs().sum()) * 4


def test_helpers():
    assert bool(is_spike_valued(torch.tensor([0., 2., -2.])))
    assert not bool(is_spike_valued(torch.tensor([0.1, 2.])))
    assert float(firing_rate(torch.tensor([2., -2., 0., 0.]))) == 1.
    assert sops_estimate(0.5, 4, 100) == 200.
    assert snn_energy(1e9) == pytest.approx(77e-6)
    assert snn_energy(10, e_sop=1.) == 10.
    assert ann_energy(1e9) == pytest.approx(12.5e-3)
    assert mac_energy(2, e_mac=3.) == 6.
    with pytest.raises(TypeError, match='module'):
        synaptic_operations(nn.ReLU(), torch.zeros(3))


@pytest.mark.parametrize('value', [1., 2., -2.])
def test_eq26_equals_exact_count_for_uniform_spikes(value):
    # no padding: every (output, tap) pair lands on a real input, so sum of fan-outs == FLOPs
    T, N = 2, 3
    net = nn.Sequential(layer.Conv2d(2, 4, 3, stride=2, step_mode='m'),
                        layer.Conv2d(4, 3, 2, step_mode='m'),
                        layer.Flatten(step_mode='m'),
                        layer.Linear(3 * 1 * 1, 5, step_mode='m'))
    x = torch.full((T, N, 2, 5, 5), value)
    with torch.no_grad(), EnergyMonitor(net) as em:
        h = net[0](x)
        net[1](torch.full_like(h, value))  # uniform spikes into every layer
        net[3](torch.full((T, N, 3), value))
        table = em.table()
    assert [row['name'] for row in table['layers']] == ['0', '1', '3']
    # MACs per sample-step by hand: 4 x 2x2 outputs x (2 x 3x3) taps; 3 x 1x1 x (4 x 2x2); 3 x 5
    assert [row['flops'] for row in table['layers']] == [4 * 4 * 18, 3 * 16, 15]
    for row in table['layers']:
        assert row['input'] == 'spikes' and row['T'] == T
        assert row['firing_rate'] == abs(value)
        assert row['sops'] == pytest.approx(row['sops_eq26'], rel=1e-12)
        assert row['sops'] == pytest.approx(abs(value) * T * row['flops'], rel=1e-12)


def _small_net(step_mode):
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), CFNode(backend='torch'),
                        layer.Flatten(), layer.Linear(4 * 4 * 4, 6), CFNode(backend='torch'),
                        layer.Linear(6, 3))
    sj_functional.set_step_mode(net, step_mode)
    return net


def test_energy_monitor_table_single_and_multi_step():
    T, N = 3, 2
    x = torch.rand(T, N, 2, 4, 4) * 3
    net = _small_net('m')
    with torch.no_grad(), EnergyMonitor(net, e_mac=4.6e-12) as em:
        s1 = []
        net[1].register_forward_hook(lambda m, i, o: s1.append(o))
        net(x)
        multi = em.table()
        text = str(em)
    rows = {row['name']: row for row in multi['layers']}
    assert list(rows) == ['0', '3', '5']
    assert rows['0']['input'] == 'real' and rows['0']['sops'] == 0.
    assert rows['0']['macs'] == T * rows['0']['flops'] == T * 4 * 16 * 2 * 9
    assert rows['0']['energy_j'] == pytest.approx(4.6e-12 * rows['0']['macs'])
    # the Linear after the first CF layer: every spike (magnitude-weighted) feeds 6 outputs
    assert rows['3']['input'] == 'spikes' and rows['3']['T'] == T
    assert rows['3']['sops'] == pytest.approx(float(s1[0].abs().sum()) * 6 / N)
    assert rows['3']['sops'] == pytest.approx(rows['3']['sops_eq26'])  # Linear: uniform fan-out
    assert rows['3']['energy_j'] == pytest.approx(77e-15 * rows['3']['sops'])
    total = multi['total']
    assert total['energy_j'] == pytest.approx(sum(r['energy_j'] for r in rows.values()))
    assert total['ann_energy_j'] == pytest.approx(12.5e-12 * sum(r['flops'] for r in rows.values()))
    for name in ('0', '3', '5', 'ANN reference', 'total'):
        assert name in text

    # the same data in single-step mode, T given: the same table
    net = _small_net('s')
    with torch.no_grad(), EnergyMonitor(net, T=T, e_mac=4.6e-12) as em:
        for t in range(T):
            net(x[t])
        single = em.table()
    assert [r['name'] for r in single['layers']] == [r['name'] for r in multi['layers']] == ['0', '3', '5']
    for a, b in zip(multi['layers'], single['layers']):
        for key, value in a.items():
            assert b[key] == (value if isinstance(value, (str, type(None))) else pytest.approx(value, rel=1e-6)), key


def test_energy_monitor_disable_reset_remove():
    net = _small_net('m')
    x = torch.rand(2, 1, 2, 4, 4)
    em = EnergyMonitor(net)
    em.disable()
    assert not em.is_enabled
    assert all(len(net[i]._forward_hooks) == 0 for i in (0, 3, 5))
    with torch.no_grad():
        net(x)
    assert em.table()['layers'] == []
    em.enable()
    sj_functional.reset_net(net)
    with torch.no_grad():
        net(x)
    assert len(em.table()['layers']) == 3
    em.reset()
    assert em.table()['layers'] == []
    em.remove()
    assert all(len(net[i]._forward_hooks) == 0 for i in (0, 3, 5))
    with pytest.raises(RuntimeError):
        em.enable()


def test_energy_monitor_errors_and_filters():
    net = _small_net('m')
    with pytest.raises(ValueError, match='T'):
        EnergyMonitor(net, T=0)
    with pytest.raises(ValueError, match='e_sop'):
        EnergyMonitor(net, e_sop=-1.)
    with pytest.raises(ValueError, match='not'):
        EnergyMonitor(net, names=['1'])  # a CFNode is not a synaptic layer
    with pytest.raises(ValueError, match='names'):
        EnergyMonitor(net, names=['nope'])
    with EnergyMonitor(net, instance=nn.Linear) as em:
        assert em.monitored_layers == ['3', '5']
    with EnergyMonitor(net, names='3') as em:
        assert em.monitored_layers == ['3']


# ----------------------------------------------------------------------------------------------
# average pooling folded into the next synaptic layer
# ----------------------------------------------------------------------------------------------
def brute_force_pooled_sops(pool, module, s, flatten=False):
    """Fan-out of each pre-pool element read off the Jacobian of ``module(pool(x))`` with all
    weights 1 (every structural connection is a positive entry), times |s|, summed."""
    import copy
    m = copy.deepcopy(module).double()
    with torch.no_grad():
        m.weight.fill_(1.)
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
    n = next((d for cls, d in dims.items() if isinstance(module, cls)), None)
    sample = s.shape[-(n + 1):] if n is not None else s.shape[1:]

    def f(x):
        y = pool(x.unsqueeze(0))
        return m(y.flatten(1) if flatten else y)

    jac = torch.autograd.functional.jacobian(f, torch.ones(sample, dtype=torch.float64))
    fan_out = (jac.reshape(-1, int(torch.tensor(sample).prod())) != 0).sum(0).double()
    return float((s.double().abs().reshape(-1, fan_out.numel()) * fan_out).sum()), fan_out


POOL_CASES = {
    'avg2 conv3 pad1': (lambda: nn.AvgPool2d(2), lambda: nn.Conv2d(2, 3, 3, padding=1), (3, 2, 8, 8), False),
    'overlapping, padded, ceil; conv stride dilation groups': (
        lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
        lambda: nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2, groups=2), (2, 2, 9, 9), False),
    'adaptive 7 -> 3 (overlapping windows)': (lambda: nn.AdaptiveAvgPool2d((3, 3)),
                                              lambda: nn.Conv2d(2, 2, 2), (2, 2, 7, 7), False),
    'adaptive (2, None), circular conv': (
        lambda: nn.AdaptiveAvgPool2d((2, None)),
        lambda: nn.Conv2d(2, 2, (1, 3), padding=(0, 1), padding_mode='circular'), (2, 2, 5, 6), False),
    'reflect conv': (lambda: nn.AvgPool2d(2), lambda: nn.Conv2d(1, 2, 3, padding=1, padding_mode='reflect'),
                     (2, 1, 8, 8), False),
    'avg2 flatten linear (odd size: a row and a column dropped)': (
        lambda: nn.AvgPool2d(2), lambda: nn.Linear(2 * 3 * 3, 5), (3, 2, 7, 7), True),
    'global average, flatten, linear': (lambda: nn.AdaptiveAvgPool2d(1), lambda: nn.Linear(2, 4),
                                        (3, 2, 5, 5), True),
    'avgpool1d, conv1d same': (lambda: nn.AvgPool1d(3, stride=2), lambda: nn.Conv1d(2, 3, 3, padding='same'),
                               (2, 2, 11), False),
    'avgpool3d, conv3d': (lambda: nn.AvgPool3d(2), lambda: nn.Conv3d(2, 2, 2, padding=1), (1, 2, 4, 4, 4), False),
}


@pytest.mark.parametrize('name', list(POOL_CASES))
def test_pooled_operations_match_brute_force(name):
    from spikingjelly_cf.functional.energy import pooled_synaptic_operations
    make_pool, make_layer, shape, flatten = POOL_CASES[name]
    pool, module = make_pool(), make_layer()
    s = torch.randint(-2, 3, shape).float()
    expected, fan_out = brute_force_pooled_sops(pool, module, s, flatten)
    sops, macs = pooled_synaptic_operations(pool, module, s)
    assert float(sops) == expected
    assert macs == int(fan_out.sum())


def _pooled_net(step_mode):
    """VGG-like: encoding conv, CF, avg pool, conv, CF, avg pool, flatten, linear (the DVS
    example's structure)."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), CFNode(backend='torch'), layer.AvgPool2d(2),
                        layer.Conv2d(4, 4, 3, padding=1), CFNode(backend='torch'), layer.AvgPool2d(2),
                        layer.Flatten(), layer.Linear(4 * 2 * 2, 3))
    with torch.no_grad():
        net[3].weight.mul_(4.)   # so that the second CF layer fires
    sj_functional.set_step_mode(net, step_mode)
    return net


def test_energy_monitor_folds_average_pools():
    T, N = 3, 2
    x = torch.rand(T, N, 2, 8, 8) * 3
    net = _pooled_net('m')
    pre_pool = []
    for i in (1, 4):
        net[i].register_forward_hook(lambda m, a, o: pre_pool.append(o.detach()))
    with torch.no_grad(), EnergyMonitor(net) as em:
        net(x)
        data = em.table()
        text = em.format_table()
    rows = {row['name']: row for row in data['layers']}
    assert [rows[n]['input'] for n in ('0', '3', '7')] == ['real', 'pooled spikes', 'pooled spikes']
    assert 'not spikes' in rows['0']['mac_reason'] and rows['3']['mac_reason'] is None
    s1, s2 = pre_pool
    assert s1.abs().sum() > 0 and s2.abs().sum() > 0 and (s2 < 0).any()
    conv_expected, _ = brute_force_pooled_sops(nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                                               s1.flatten(0, 1))
    lin_expected, lin_fan = brute_force_pooled_sops(nn.AvgPool2d(2), nn.Linear(16, 3),
                                                    s2.flatten(0, 1), flatten=True)
    assert rows['3']['sops'] == pytest.approx(conv_expected / N, rel=1e-12)
    assert rows['7']['sops'] == pytest.approx(lin_expected / N, rel=1e-12)
    # f_r is that of the pre-pool spikes; Eq. 26 uses the folded map's MACs
    assert rows['3']['firing_rate'] == pytest.approx(float(s1.abs().mean()))
    assert rows['7']['sops_eq26'] == pytest.approx(float(s2.abs().mean()) * T * float(lin_fan.sum()))
    assert rows['3']['flops'] == 4 * 4 * 4 * 4 * 9, 'the layer keeps its own FLOPs (ANN reference)'
    assert rows['7']['energy_j'] == pytest.approx(77e-15 * rows['7']['sops'])
    assert 'pooled spikes' in text and 'MACs for 0:' in text and 'MACs for 3' not in text

    # the same network in single-step mode (T given), and with SpikingJelly's pool in a
    # SeqToANNContainer around a plain nn.AvgPool2d: the same table
    single = _pooled_net('s')
    with torch.no_grad(), EnergyMonitor(single, T=T) as em:
        for t in range(T):
            single(x[t])
        single_rows = {row['name']: row for row in em.table()['layers']}
    wrapped = _pooled_net('m')
    wrapped[2] = layer.SeqToANNContainer(nn.AvgPool2d(2))
    sj_functional.set_step_mode(wrapped, 'm')
    with torch.no_grad(), EnergyMonitor(wrapped) as em:
        wrapped(x)
        wrapped_rows = {row['name']: row for row in em.table()['layers']}
    for other in (single_rows, wrapped_rows):
        for name in ('0', '3', '7'):
            for key, value in rows[name].items():
                expected = value if isinstance(value, (str, type(None))) else pytest.approx(value, rel=1e-9)
                assert other[name][key] == expected, (name, key)


def test_energy_monitor_says_why_a_layer_is_counted_as_macs():
    # a pool of real values (the data) is no spike input
    torch.manual_seed(0)
    net = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(2, 3, 3))
    with torch.no_grad(), EnergyMonitor(net, T=1) as em:
        net(torch.rand(2, 2, 8, 8))
        row = em.table()['layers'][0]
    assert row['input'] == 'real' and 'average pool of non-integer values' in row['mac_reason']
    # pooled spikes that a Linear reads only in part (no Flatten: it mixes the last dimension)
    net = nn.Sequential(nn.AvgPool2d(2), nn.Linear(4, 3))
    spikes = torch.randint(-2, 3, (2, 2, 8, 8)).float()
    with torch.no_grad(), EnergyMonitor(net, T=1) as em:
        net(spikes)
        row = em.table()['layers'][0]
    assert row['input'] == 'real' and 'cannot be folded' in row['mac_reason']
    assert 'in_features=4' in row['mac_reason']
    # pooled spikes read in another shape (a [.., 4, 2] pool output viewed as [.., 2, 4])
    class Swap(nn.Module):
        def forward(self, x):
            return x.view(*x.shape[:-2], x.shape[-1], x.shape[-2])

    net = nn.Sequential(nn.AvgPool2d(2), Swap(), nn.Conv2d(2, 3, 1))
    with torch.no_grad(), EnergyMonitor(net, T=1) as em:
        net(torch.randint(-2, 3, (2, 2, 8, 4)).float())
        row = em.table()['layers'][0]
    assert row['input'] == 'real' and 'reads the pooled' in row['mac_reason']
    # pooled spikes through something else (a ReLU): a new tensor, not the pool's output
    net = nn.Sequential(nn.AvgPool2d(2), nn.ReLU(), nn.Conv2d(2, 3, 3))
    with torch.no_grad(), EnergyMonitor(net, T=1) as em:
        net(spikes)
        row = em.table()['layers'][0]
    assert row['input'] == 'real' and 'non-integer' in row['mac_reason']
