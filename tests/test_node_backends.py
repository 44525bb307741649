"""CFNode's module-level behaviour on every backend available here, against the reference's numbers.

Each test runs the node on the backend of the ``backend`` fixture (``_backends.py``: every
registered backend that runs float32 here, GPU ones skip without CUDA), proves that backend's
op really ran, and compares outputs, states and gradients with the reference (``backend='torch'``,
CPU) on the same float32 data: spikes bit-equal, the rest to float32 tolerance.
"""
import copy

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, surrogate

from _backends import backend  # noqa: F401  (fixture)
from spikingjelly_cf import CFNode, CFRect, TSG
from spikingjelly_cf.monitor import EnergyMonitor, PNBMonitor, SpikeLevelHistogram
from test_neuron import GOLDEN

TOL = dict(rtol=1e-5, atol=1e-6)


def _close(actual, expected, what=''):
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), **TOL,
                               msg=lambda m: f'{what}: {m}')


def _tsg(T, device='cpu'):
    sg = TSG(T)
    with torch.no_grad():  # distinct a_t per step, so a step read at the wrong t shows
        sg.p.copy_(torch.linspace(-1.5, 1.5, T))
    return sg.to(device)


SURROGATES = {'rect': lambda T, d: CFRect(), 'tsg': _tsg, 'atan': lambda T, d: surrogate.ATan()}


@pytest.mark.parametrize('name,kwargs,x,s,h,v', GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_sequences(backend, name, kwargs, x, s, h, v):  # noqa: F811
    node = CFNode(step_mode='m', backend=backend.name, store_v_seq=True, store_h_seq=True, **kwargs)
    xt = backend.tensor(x).reshape(-1, 1)
    with backend.ran():
        out = node(xt)
    assert out.flatten().tolist() == [float(i) for i in s]
    assert node.h_seq.flatten().tolist() == pytest.approx(h, abs=1e-6)
    assert node.v_seq.flatten().tolist() == pytest.approx(v, abs=1e-6)
    ref = CFNode(step_mode='m', backend='torch', store_v_seq=True, store_h_seq=True, **kwargs)
    assert torch.equal(out.cpu(), ref(xt.cpu()))
    _close(node.h_seq, ref.h_seq, 'h_seq')
    _close(node.v_seq, ref.v_seq, 'v_seq')
    _close(node.v, ref.v, 'v')


@pytest.mark.parametrize('detach_reset,expected', [(False, 1.0), (True, 2.0)])
def test_golden_gradient(backend, detach_reset, expected):  # noqa: F811
    # h = 1.2: level 1 in CFRect's window, so ds/dh = 1 and dv/dh = 0 (1 with detach_reset)
    x = backend.tensor([[1.2]]).requires_grad_()
    node = CFNode(step_mode='m', backend=backend.name, detach_reset=detach_reset)
    with backend.ran(backward=True):
        (node(x).sum() + node.v.sum()).backward()
    assert x.grad.item() == pytest.approx(expected)


def _run_modes(case, sg_name, decay_input, detach_reset, mode, x, g):
    """One run of T steps in mode 'm' or 's' on ``case``; returns outputs and gradients."""
    T = x.shape[0]
    sg = SURROGATES[sg_name](T, case.device)
    node = CFNode(step_mode=mode, backend=case.name, surrogate_function=sg,
                  decay_input=decay_input, detach_reset=detach_reset, store_v_seq=True)
    x = x.to(case.device).detach().requires_grad_()
    s = node(x) if mode == 'm' else torch.stack([node(x[t]) for t in range(T)])
    loss = (s * g.to(case.device)).sum() + node.v.sum() + node.v_seq.pow(2).sum()
    grads = torch.autograd.grad(loss, [x] + list(sg.parameters()))
    return s.detach(), node.v.detach(), node.v_seq.detach(), grads, node.step_count


@pytest.mark.parametrize('sg_name', list(SURROGATES))
@pytest.mark.parametrize('decay_input,detach_reset', [(False, False), (True, True)])
def test_single_and_multi_step_match_reference(backend, sg_name, decay_input, detach_reset):  # noqa: F811
    torch.manual_seed(1)
    T = 6
    x = torch.randn(T, 3, 5) * 2
    g = torch.randn(T, 3, 5)
    ref = _run_modes(backend_case_torch(), sg_name, decay_input, detach_reset, 'm', x, g)
    for mode in ('m', 's'):
        with backend.ran(backward=True):
            got = _run_modes(backend, sg_name, decay_input, detach_reset, mode, x, g)
        assert torch.equal(got[0].cpu(), ref[0]), mode
        _close(got[1], ref[1], f'{mode} v')
        _close(got[2], ref[2], f'{mode} v_seq')
        assert got[4] == ref[4] == T
        for a, b, what in zip(got[3], ref[3], ('grad x', 'grad p')):
            _close(a, b, f'{mode} {what}')


def backend_case_torch():
    from _backends import backend_case
    return backend_case('torch')


def test_store_sequences_differentiable(backend):  # noqa: F811
    torch.manual_seed(2)
    x0 = torch.randn(5, 2, 3) * 2
    gh, gv = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    results = []
    for case in (backend, backend_case_torch()):
        x = x0.to(case.device).requires_grad_()
        node = CFNode(step_mode='m', backend=case.name, store_h_seq=True, store_v_seq=True)
        with case.ran(backward=True):
            node(x)
            assert node.h_seq.shape == node.v_seq.shape == (5, 2, 3)
            assert node.h_seq.requires_grad, 'h_seq must stay differentiable (PNB needs it)'
            ((node.h_seq * gh.to(case.device)).sum() + (node.v_seq * gv.to(case.device)).sum()).backward()
        results.append((node.h_seq.detach(), node.v_seq.detach(), x.grad))
    for a, b, what in zip(*results, ('h_seq', 'v_seq', 'grad x')):
        _close(a, b, what)
    assert results[1][2].abs().sum() > 0


def test_tsg_single_step_uses_a_t_of_step_count(backend):  # noqa: F811
    """Single-step mode: step t's spikes reach only a_t (detach_reset), and the same a_t as the
    reference; reset_net restarts at a_0."""
    torch.manual_seed(3)
    T = 4
    x = torch.randn(T, 300) * 1.5
    for t_loss in range(T):
        grads = []
        for case in (backend, backend_case_torch()):
            sg = _tsg(T, case.device)
            node = CFNode(backend=case.name, surrogate_function=sg, detach_reset=True)
            with case.ran(backward=True):
                for t in range(t_loss + 1):
                    s = node(x[t].to(case.device))
                assert node.step_count == t_loss + 1
                s.sum().backward()
            grads.append(sg.p.grad.cpu())
        got, ref = grads
        _close(got, ref, f'grad p, loss at step {t_loss}')
        assert got[t_loss] != 0 and torch.all(got[torch.arange(T) != t_loss] == 0), got
    # after reset_net the count starts again: the first step reads a_0
    sg = _tsg(T, backend.device)
    node = CFNode(backend=backend.name, surrogate_function=sg, detach_reset=True)
    node(x[0].to(backend.device))
    functional.reset_net(node)
    assert node.step_count == 0
    node(x[0].to(backend.device)).sum().backward()
    assert sg.p.grad[0] != 0 and torch.all(sg.p.grad[1:] == 0)


def test_reset_and_detach(backend):  # noqa: F811
    torch.manual_seed(4)
    x = (torch.randn(3, 2, 4) * 2).to(backend.device).requires_grad_()
    node = CFNode(step_mode='m', backend=backend.name, store_h_seq=True, store_v_seq=True)
    with backend.ran():
        node(x)
        assert node.v.requires_grad
        functional.detach_net(node)
        assert not node.v.requires_grad and not node.h_seq.requires_grad
        assert not node.v_seq.requires_grad
        second = node(x)  # continues from the detached state
    ref = CFNode(step_mode='m', backend='torch')
    ref(x.detach().cpu())
    assert torch.equal(second.cpu(), ref(x.detach().cpu()))
    _close(node.v, ref.v, 'v after two calls')
    functional.reset_net(node)
    assert node.v == 0. and node.step_count == 0 and node.h_seq is None and node.v_seq is None
    fresh = CFNode(step_mode='m', backend='torch')
    assert torch.equal(node(x).cpu(), fresh(x.detach().cpu()))


def _toy_net(backend_name, device, conv=False):
    torch.manual_seed(5)
    if conv:
        net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), CFNode(backend=backend_name),
                            layer.Flatten(), layer.Linear(4 * 4 * 4, 3), CFNode(backend=backend_name))
    else:
        net = nn.Sequential(layer.Linear(6, 16), CFNode(backend=backend_name),
                            layer.Linear(16, 16), CFNode(backend=backend_name), layer.Linear(16, 3))
    functional.set_step_mode(net, 'm')
    return net.to(device)


@pytest.mark.parametrize('step_mode', ['s', 'm'])
def test_monitors_match_reference(backend, step_mode):  # noqa: F811
    torch.manual_seed(6)
    x = torch.randn(3, 4, 2, 4, 4) * 2
    results = []
    for case in (backend, backend_case_torch()):
        net = _toy_net(case.name, case.device, conv=True)
        functional.set_step_mode(net, step_mode)
        with PNBMonitor(net) as pnb, EnergyMonitor(net, T=3) as em, \
                SpikeLevelHistogram(net) as hist, case.ran(backward=True):
            xd = x.to(case.device)
            out = net(xd) if step_mode == 'm' else torch.stack([net(xd[t]) for t in range(3)])
            loss = pnb.loss()
            (loss + out.sum()).backward()
            results.append(dict(loss=loss.detach().cpu(), table=em.table(), hist=hist.counts(),
                                grads=[p.grad.cpu() for p in net.parameters()]))
    got, ref = results
    assert ref['loss'] > 0
    _close(got['loss'], ref['loss'], 'PNB loss')
    assert got['hist'] == ref['hist']
    assert len(got['table']['layers']) == len(ref['table']['layers']) == 2
    for a, b in zip(got['table']['layers'], ref['table']['layers']):
        assert a == {k: (v if isinstance(v, (str, type(None))) else pytest.approx(v, rel=1e-6)) for k, v in b.items()}
    assert len(got['grads']) == len(ref['grads']) == 4
    for a, b in zip(got['grads'], ref['grads']):
        _close(a, b, 'parameter gradient')
