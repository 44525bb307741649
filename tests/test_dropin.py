"""CFNode as a drop-in neuron for SpikingJelly's model zoo, directly and via replace_neurons."""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.model import parametric_lif_net, sew_resnet, spiking_resnet, spiking_vgg

from spikingjelly_cf import CFNode, CFRect, TSG, replace_neurons

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


def _check_trains_with_distinct_tsg(net, make_input):
    functional.set_step_mode(net, 'm')
    nodes = [m for m in net.modules() if isinstance(m, CFNode)]
    assert nodes, 'the model has no CFNode'
    tsgs = [m.surrogate_function for m in nodes]
    assert all(isinstance(s, TSG) for s in tsgs)
    assert len({id(s.p) for s in tsgs}) == len(nodes), 'every layer must own its TSG parameters'
    functional.reset_net(net)
    out = net(make_input())
    assert torch.isfinite(out).all()
    out.sum().backward()
    # Every TSG is in the graph; whether a random untrained net puts potentials inside the
    # triangles' windows is chance, so only require that gradient reaches some of them.
    assert all(s.p.grad is not None for s in tsgs), 'a TSG parameter is not in the graph'
    assert any(s.p.grad.abs().sum().item() > 0 for s in tsgs), 'no TSG parameter got gradient'
    assert all(m.step_count == T for m in nodes)
    functional.reset_net(net)
    assert all(m.step_count == 0 for m in nodes)
    return nodes


@pytest.mark.parametrize('name', list(MODELS))
def test_model_zoo_with_cfnode_and_tsg(name):
    build, make_input = MODELS[name]
    net = build(spiking_neuron=neuron.CFNode, surrogate_function=TSG(T), detach_reset=True,
                backend='torch')
    nodes = _check_trains_with_distinct_tsg(net, make_input)
    assert all(m.detach_reset for m in nodes)


@pytest.mark.parametrize('name', ['spiking_resnet18', 'DVSGestureNet'])
def test_replace_neurons_on_lif_model(name):
    build, make_input = MODELS[name]
    net = build(spiking_neuron=neuron.LIFNode, tau=2.0, decay_input=False, detach_reset=True,
                surrogate_function=surrogate.ATan())
    n_lif = sum(isinstance(m, neuron.LIFNode) for m in net.modules())
    functional.set_step_mode(net, 'm')
    functional.reset_net(net)  # SpikingJelly 2.0 caches the module list here
    with pytest.warns(UserWarning, match='soft-resets'):
        replace_neurons(net, surrogate_function=TSG(T), backend='torch')
    nodes = [m for m in net.modules() if isinstance(m, CFNode)]
    assert len(nodes) == n_lif and not any(isinstance(m, neuron.LIFNode) for m in net.modules())
    assert all(m.tau == 2.0 and not m.decay_input and m.detach_reset and m.step_mode == 'm'
               for m in nodes)
    _check_trains_with_distinct_tsg(net, make_input)


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
