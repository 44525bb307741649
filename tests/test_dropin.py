"""CFNode as a drop-in neuron for SpikingJelly's model zoo, directly and via replace_neurons."""
import copy

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.model import parametric_lif_net, sew_resnet, spiking_resnet, spiking_vgg

from _backends import backend  # noqa: F401  (fixture)
from spikingjelly_cf import CFNode, CFRect, TSG, replace_neurons
from spikingjelly_cf._compat import CLASSIC

T = 2


def _image_input(size=32):
    return torch.rand(T, 2, 3, size, size)  # batch 2: BatchNorm in training mode


MODELS = {
    'spiking_resnet18': (lambda **kw: spiking_resnet.spiking_resnet18(num_classes=5, **kw), _image_input),
    'sew_resnet18': (lambda **kw: sew_resnet.sew_resnet18(num_classes=5, cnf='ADD', **kw), _image_input),
    'spiking_vgg11_bn': (lambda **kw: spiking_vgg.spiking_vgg11_bn(num_classes=5, **kw), _image_input),
    'DVSGestureNet': (lambda **kw: parametric_lif_net.DVSGestureNet(channels=4, **kw),
                      lambda: (torch.rand(T, 2, 2, 128, 128) > 0.8).float()),
}


def _nodes(net):
    return [m for m in net.modules() if isinstance(m, CFNode)]


def _train_step(net, x):
    """One forward/backward; returns the output, every parameter gradient by name and the
    nodes' step counts."""
    functional.set_step_mode(net, 'm')
    functional.reset_net(net)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in every run
    out = net(x)
    out.sum().backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in net.named_parameters() if p.grad is not None}
    counts = [m.step_count for m in _nodes(net)]
    functional.reset_net(net)
    assert all(m.step_count == 0 for m in _nodes(net))
    return out.detach().cpu(), grads, counts


def _check_against_reference(net, case, x, ref=None):
    """``net`` (CF nodes on ``case``'s backend) against a deep copy whose nodes run the
    reference (or against ``ref``, a model with the same parameters on the reference): the same
    output, the same gradient for every parameter (TSG's included), and every layer owns its
    TSG."""
    nodes = _nodes(net)
    assert nodes, 'the model has no CFNode'
    tsgs = [m.surrogate_function for m in nodes]
    assert all(isinstance(s, TSG) for s in tsgs)
    assert len({id(s.p) for s in tsgs}) == len(nodes), 'every layer must own its TSG parameters'
    if ref is None:
        ref = copy.deepcopy(net)
        for m in _nodes(ref):
            m.backend = 'torch'
    net.to(case.device)
    with case.ran(backward=True):
        out, grads, counts = _train_step(net, x.to(case.device))
    out_r, grads_r, counts_r = _train_step(ref, x)
    assert counts == counts_r == [T] * len(nodes)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(grads_r) == {n for n, _ in ref.named_parameters()}
    tsg_names = [n for n in grads_r if n.endswith('surrogate_function.p')]
    assert len(tsg_names) == len(nodes)
    assert sum(bool(grads_r[n].abs().sum() > 0) for n in tsg_names) >= len(nodes) // 2, \
        'TSG parameters got no gradient'
    for name in grads_r:
        scale = max(1.0, grads_r[name].abs().max().item())
        torch.testing.assert_close(grads[name], grads_r[name], rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda m: f'{name}: {m}')
    return nodes


def _kernel_backend(case):
    if case.name == 'torch':
        pytest.skip('the reference is the oracle of this test')
    return case


# Compared with the reference on every kernel backend: the zoo's spiking ResNet and the DVS
# network (the other two models run their CF layers identically; they are built and trained
# once on the backend of 'auto' below, to keep the suite's time in budget).
@pytest.mark.parametrize('name', ['spiking_resnet18', 'DVSGestureNet'])
def test_model_zoo_with_cfnode_and_tsg(backend, name):  # noqa: F811
    case = _kernel_backend(backend)
    build, make_input = MODELS[name]
    torch.manual_seed(0)
    net = build(spiking_neuron=neuron.CFNode, surrogate_function=TSG(T), detach_reset=True,
                backend=case.name)
    nodes = _check_against_reference(net, case, make_input())
    assert all(m.detach_reset and m.backend == case.name for m in nodes)


@pytest.mark.parametrize('name', ['sew_resnet18', 'spiking_vgg11_bn'])
def test_model_zoo_builds_and_trains(name):
    """Every neuron of the model is a CFNode with its own TSG; one training step reaches them."""
    build, make_input = MODELS[name]
    n_lif = sum(isinstance(m, neuron.LIFNode) for m in build(spiking_neuron=neuron.LIFNode).modules())
    net = build(spiking_neuron=neuron.CFNode, surrogate_function=TSG(T), detach_reset=True)
    nodes = _nodes(net)
    assert len(nodes) == n_lif > 0
    assert len({id(m.surrogate_function.p) for m in nodes}) == len(nodes)
    out, grads, counts = _train_step(net, make_input())
    assert out.shape == (T, 2, 5) and torch.isfinite(out).all()
    assert counts == [T] * len(nodes)
    tsg = [n for n in grads if n.endswith('surrogate_function.p')]
    assert len(tsg) == len(nodes), 'a TSG parameter is not in the graph'
    assert sum(bool(grads[n].abs().sum() > 0) for n in tsg) >= len(nodes) // 2


@pytest.mark.parametrize('name', ['DVSGestureNet'])
def test_replace_neurons_on_lif_model(backend, name):  # noqa: F811
    case = _kernel_backend(backend)
    build, make_input = MODELS[name]
    torch.manual_seed(0)
    net = build(spiking_neuron=neuron.LIFNode, tau=2.0, decay_input=False, detach_reset=True,
                surrogate_function=surrogate.ATan())
    n_lif = sum(isinstance(m, neuron.LIFNode) for m in net.modules())
    functional.set_step_mode(net, 'm')
    functional.reset_net(net)  # SpikingJelly 2.0 caches the module list here
    with pytest.warns(UserWarning, match='soft-resets'):
        replace_neurons(net, surrogate_function=TSG(T), backend=case.name)
    nodes = _nodes(net)
    assert len(nodes) == n_lif and not any(isinstance(m, neuron.LIFNode) for m in net.modules())
    assert all(m.tau == 2.0 and not m.decay_input and m.detach_reset and m.step_mode == 'm'
               for m in nodes)
    # against the same model built with CFNode directly (same weights) on the reference
    direct = build(spiking_neuron=neuron.CFNode, tau=2.0, decay_input=False, detach_reset=True,
                   surrogate_function=TSG(T), backend='torch')
    direct.load_state_dict(net.state_dict())
    _check_against_reference(net, case, make_input(), ref=direct)


def test_replace_neurons_options():
    net = nn.Sequential(layer.Linear(3, 4), neuron.LIFNode(v_reset=None, v_threshold=0.5,
                                                          surrogate_function=surrogate.Sigmoid()),
                        layer.Linear(4, 2), neuron.IFNode(v_reset=None))
    replace_neurons(net, old=(neuron.LIFNode, neuron.IFNode), surrogate_function='keep', k_neg=1)
    assert isinstance(net[1], CFNode) and isinstance(net[3], CFNode)
    assert net[1].v_threshold == 0.5 and net[1].v_threshold_neg == -0.5 and net[1].k_neg == 1
    assert isinstance(net[1].surrogate_function, surrogate.Sigmoid)
    assert net[3].tau == pytest.approx(4 / 3), 'IFNode has no tau: CF default'
    counter = []
    net2 = nn.Sequential(neuron.LIFNode(v_reset=None), neuron.LIFNode(v_reset=None))
    replace_neurons(net2, surrogate_function=lambda: counter.append(1) or CFRect(alpha=0.5))
    assert len(counter) == 2 and net2[0].surrogate_function.alpha == 0.5
    with pytest.raises(ValueError, match='surrogate_function'):
        replace_neurons(nn.Sequential(neuron.LIFNode()), surrogate_function='bogus')


def test_replace_neurons_picks_auto_not_spikingjelly_backend():
    """SpikingJelly's backend names describe SpikingJelly's own implementations ('torch' is
    LIFNode's default on 0.0.0.0.14, 'cupy' its fused GPU path): a converted layer runs our
    'auto' (here the compiled CPU kernel), unless ``backend=`` is given to replace_neurons."""
    from _backends import backend_case
    case = backend_case('cpp')
    # the README's conversion example
    lif_net = parametric_lif_net.DVSGestureNet(channels=8, spiking_neuron=neuron.LIFNode,
                                               v_reset=None, detach_reset=True)
    cf_net = replace_neurons(lif_net, surrogate_function=TSG(T))
    nodes = _nodes(cf_net)
    assert len(nodes) == 7 and {m.backend for m in nodes} == {'auto'}
    functional.set_step_mode(cf_net, 'm')
    x = (torch.rand(T, 1, 2, 128, 128) > 0.9).float()
    with case.ran(backward=True):   # the kernel ran, forward and backward
        cf_net(x).sum().backward()
    functional.reset_net(cf_net)
    for sj_backend in ('torch', 'cupy'):
        # 0.0.0.0.14's backend property (its setter wants CuPy installed for 'cupy', hence the
        # private field); on 2.0 (no backend there) a plain attribute stands for any neuron
        # that carries SpikingJelly's backend names
        lif = neuron.LIFNode(v_reset=None, step_mode='m')
        if CLASSIC:
            lif._backend = sj_backend
        else:
            lif.backend = sj_backend
        assert lif.backend == sj_backend
        net = replace_neurons(nn.Sequential(layer.Linear(3, 4), lif))
        assert net[1].backend == 'auto', sj_backend
    # an explicit keyword still wins
    net = replace_neurons(nn.Sequential(layer.Linear(3, 4), neuron.LIFNode(v_reset=None)),
                          backend='torch')
    assert net[1].backend == 'torch'
