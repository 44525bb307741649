"""PNBMonitor and SpikeLevelHistogram (docs/method.md, section 3): modes, backends, gradients, training, hooks."""
import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer

from spikingjelly_cf.functional.pnb import pnb_loss
from spikingjelly_cf.monitor import PNBMonitor, SpikeLevelHistogram
from spikingjelly_cf.neuron import CFNode


def _run_node(node, x_seq, step_mode):
    node.step_mode = step_mode
    sj_functional.reset_net(node)
    if step_mode == 'm':
        return node(x_seq)
    return torch.stack([node(x) for x in x_seq])


def _monitored_loss_and_grad(backend, step_mode, x_seq, **node_kwargs):
    node = CFNode(backend=backend, **node_kwargs)
    x = x_seq.detach().clone().requires_grad_(True)
    with PNBMonitor(node) as pnb:
        _run_node(node, x, step_mode)
        loss = pnb.loss()
    loss.backward()
    sj_functional.reset_net(node)
    return loss.detach(), x.grad


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('node_kwargs', [
    dict(), dict(k_pos=3, k_neg=3, v_threshold=0.8, v_threshold_neg=-1.2)])
def test_single_and_multi_step_agree(dtype, node_kwargs):
    x_seq = torch.randn(5, 3, 7, dtype=dtype) * 1.5
    loss_m, grad_m = _monitored_loss_and_grad('torch', 'm', x_seq, **node_kwargs)
    loss_s, grad_s = _monitored_loss_and_grad('torch', 's', x_seq, **node_kwargs)
    assert loss_m > 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_s, loss_m, **tol)
    torch.testing.assert_close(grad_s, grad_m, **tol)
    assert grad_m.abs().sum() > 0  # the loss reaches the CF layer's input


def test_monitor_equals_functional_loss_on_h_seq():
    node = CFNode(step_mode='m', backend='torch', store_h_seq=True)
    x_seq = torch.randn(4, 2, 6, dtype=torch.float64) * 1.5
    node(x_seq)
    expected = pnb_loss(node.h_seq, node.v_threshold, node.v_threshold_neg, node.k_pos)
    sj_functional.reset_net(node)
    with PNBMonitor(node) as pnb:
        node(x_seq)
        torch.testing.assert_close(pnb.loss(), expected)
        assert list(pnb.per_layer()) == ['']
        assert pnb.per_layer()[''] == pytest.approx(float(expected))
    # two forward passes before loss(): the sums of both
    sj_functional.reset_net(node)
    with PNBMonitor(node) as pnb:
        node(x_seq[:2])
        node(x_seq[2:])
        torch.testing.assert_close(pnb.loss(), expected)
        assert pnb.loss().item() == 0.  # cleared


def _kernel_backend_or_skip(name):
    if name == 'cupy' and not torch.cuda.is_available():
        pytest.skip('cupy backend needs CUDA')
    if name not in CFNode().supported_backends:
        pytest.skip(f'CFNode does not list backend {name!r}')
    try:
        module = importlib.import_module(f'spikingjelly_cf.backends.{name}')
    except ImportError as e:
        pytest.skip(f'backend {name!r} not importable: {e}')
    if hasattr(module, 'available') and not module.available():
        reason = module.unavailable_reason() if hasattr(module, 'unavailable_reason') else ''
        pytest.skip(f'backend {name!r} unavailable: {reason}')


@pytest.mark.parametrize('backend', ['cpp', 'cupy'])
@pytest.mark.parametrize('step_mode', ['s', 'm'])
@pytest.mark.parametrize('n', [7, 8])  # odd and even neuron counts
def test_gradient_matches_reference_backend(backend, step_mode, n):
    _kernel_backend_or_skip(backend)
    device = 'cuda' if backend == 'cupy' else 'cpu'
    x_seq = torch.randn(4, 3, n, device=device) * 1.5
    loss_ref, grad_ref = _monitored_loss_and_grad('torch', step_mode, x_seq)
    loss, grad = _monitored_loss_and_grad(backend, step_mode, x_seq)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0


def _toy_net(conv=False):
    if conv:
        net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), CFNode(backend='torch'),
                            layer.Flatten(), layer.Linear(4 * 4 * 4, 3), CFNode(backend='torch'))
    else:
        net = nn.Sequential(layer.Linear(6, 16), CFNode(backend='torch'),
                            layer.Linear(16, 16), CFNode(backend='torch'), layer.Linear(16, 3))
    sj_functional.set_step_mode(net, 'm')
    return net


@pytest.mark.parametrize('conv', [False, True])
def test_gradient_flows_into_layer_weights(conv):
    torch.manual_seed(1)
    net = _toy_net(conv)
    x = torch.randn(3, 4, 2, 4, 4) * 2 if conv else torch.randn(3, 4, 6) * 2
    with PNBMonitor(net) as pnb:
        net(x)
        assert pnb.monitored_layers == (['1', '4'] if conv else ['1', '3'])
        loss = pnb.loss()
    assert loss > 0
    loss.backward()
    for module in net:
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module is not net[-1]:
            assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_training_with_ce_and_pnb_reduces_pnb():
    torch.manual_seed(0)
    net = _toy_net()
    with torch.no_grad():  # start unbalanced: potentials pushed to the positive side
        net[0].bias.add_(0.8)
        net[2].bias.add_(0.8)
    x = torch.randn(4, 32, 6)
    y = torch.randint(0, 3, (32,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    history = []
    with PNBMonitor(net) as pnb:
        for _ in range(8):
            optimizer.zero_grad()
            out = net(x).mean(0)
            l_pnb = pnb.loss()
            loss = F.cross_entropy(out, y) + 0.25 * l_pnb  # Eq. 23
            loss.backward()
            optimizer.step()
            sj_functional.reset_net(net)
            history.append(l_pnb.item())
    assert history[-1] < 0.5 * history[0], history


def test_refuses_unpaired_levels_and_filters():
    net = nn.Sequential(CFNode(k_pos=2, k_neg=1), CFNode(k_pos=1, k_neg=0), CFNode())
    with pytest.raises(ValueError, match="'0'.*k_pos=2, k_neg=1"):
        PNBMonitor(net)
    with pytest.raises(ValueError, match="'1'.*k_neg=0"):
        PNBMonitor(net, names=['1', '2'])
    with PNBMonitor(net, names='2') as pnb:
        assert pnb.monitored_layers == ['2']
        assert net[2].store_h_seq and not net[0].store_h_seq
    with pytest.raises(ValueError, match='names'):
        PNBMonitor(net, names=['7'])
    with pytest.raises(ValueError, match='no CF layer'):
        PNBMonitor(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match='store_h_seq'):
        PNBMonitor(nn.Sequential(nn.Linear(2, 2)), instance=nn.Linear)


def test_disable_enable_remove():
    node = CFNode(step_mode='m', backend='torch')
    x_seq = torch.randn(3, 2, 5) * 1.5
    pnb = PNBMonitor(node)
    assert node.store_h_seq and pnb.is_enabled
    pnb.disable()
    assert not node.store_h_seq and len(node._forward_hooks) == 0  # no hook, no h_seq: no cost
    node(x_seq)
    assert node.h_seq is None
    assert pnb.statistics() == {}
    assert pnb.loss().item() == 0.
    pnb.enable()
    sj_functional.reset_net(node)
    node(x_seq)
    assert set(pnb.statistics()) == {''}
    pnb.reset()
    assert pnb.statistics() == {}
    pnb.remove()
    assert not node.store_h_seq and len(node._forward_hooks) == 0
    with pytest.raises(RuntimeError):
        pnb.enable()
    # remove() restores the layer's own setting
    node.store_h_seq = True
    with PNBMonitor(node) as pnb:
        pass
    assert node.store_h_seq and len(node._forward_hooks) == 0


def test_spike_level_histogram():
    node = CFNode(step_mode='m', backend='torch')  # K_P = K_N = 2, thresholds +-1
    x_seq = torch.tensor([[[0.5, 2.5, -1.2, -3.0, 1.0]]])
    with SpikeLevelHistogram(node) as hist:
        node(x_seq)
        assert hist.counts() == {'': {-2: 1, -1: 1, 0: 1, 1: 1, 2: 1}}
        assert hist.spike_count() == {'': 6}
        hist.reset()
        assert hist.counts() == {}
        hist.disable()
        node(x_seq)
        assert hist.counts() == {}
    assert len(node._forward_hooks) == 0

    net = _toy_net()
    x = torch.randn(3, 4, 6) * 2
    with SpikeLevelHistogram(net) as hist:
        out = net[:2](x)
        multi = hist.counts()
        sj_functional.reset_net(net)
        hist.reset()
        sj_functional.set_step_mode(net, 's')
        for t in range(3):
            net[:2](x[t])
        assert hist.counts() == multi
    assert sum(multi['1'].values()) == out.numel()
    assert multi['1'] == {level: int((out == level).sum()) for level in range(-2, 3)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_monitors_on_cuda_match_cpu():
    from spikingjelly_cf.monitor import EnergyMonitor
    torch.manual_seed(2)
    net = _toy_net(conv=True)
    x = torch.randn(3, 4, 2, 4, 4) * 2
    results = {}
    for device in ('cpu', 'cuda'):
        net.to(device)
        sj_functional.reset_net(net)
        with PNBMonitor(net) as pnb, EnergyMonitor(net) as em, SpikeLevelHistogram(net) as hist:
            net(x.to(device))
            results[device] = (pnb.loss().item(), em.table(), hist.counts())
    assert results['cuda'][0] == pytest.approx(results['cpu'][0], rel=1e-5)
    assert len(results['cpu'][1]['layers']) == len(results['cuda'][1]['layers']) == 2
    for a, b in zip(results['cpu'][1]['layers'], results['cuda'][1]['layers']):
        assert a['sops'] == pytest.approx(b['sops'], rel=1e-6)
    assert results['cuda'][2] == results['cpu'][2]


def test_passes_without_grad_are_not_recorded():
    """Validation passes inside one monitor's lifetime (``torch.no_grad()``,
    ``torch.inference_mode()``) leave the next training loss on the same batch unchanged."""
    torch.manual_seed(0)
    net = _toy_net()
    x, x_val = torch.randn(4, 8, 6), torch.randn(4, 8, 6) * 2

    def train_loss(pnb):
        out = net(x)
        loss = pnb.loss()
        sj_functional.reset_net(net)
        return out, loss

    with PNBMonitor(net) as pnb:
        _, before = train_loss(pnb)
        assert before > 0
        net.eval()
        with torch.no_grad():
            for _ in range(5):
                net(x_val)
                sj_functional.reset_net(net)
        with torch.inference_mode():
            net(x_val)
            sj_functional.reset_net(net)
        assert pnb.statistics() == {}, 'a pass without grad was recorded'
        net.train()
        _, after = train_loss(pnb)
    assert after.item() == before.item()


def test_checkpoint_recomputation_is_not_recorded_twice():
    """A checkpointed region re-runs its forward inside the backward pass; the monitor records
    the first run only, so the loss of the next batch is not changed by the re-run."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    net = _toy_net()
    x = torch.randn(4, 8, 6)
    with PNBMonitor(net) as pnb:
        out = checkpoint(net, x, use_reentrant=False)
        loss = pnb.loss()
        (out.sum() + loss).backward()      # re-runs net's forward
        assert pnb.statistics() == {}, 'the recomputation was recorded'
        sj_functional.reset_net(net)
        net(x)
        again = pnb.loss()
        sj_functional.reset_net(net)
    assert again.item() == loss.item()
    # the same with the network reset between the forward and the backward pass; the gradients
    # are those of the region without checkpointing
    grads = []
    for checkpointed in (True, False):
        model = copy.deepcopy(net)
        with PNBMonitor(model) as pnb:
            out = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
            loss = pnb.loss()
            sj_functional.reset_net(model)
            (out.sum() + loss).backward()
            assert pnb.statistics() == {}
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
