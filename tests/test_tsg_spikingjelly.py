"""TSG inside SpikingJelly's own neurons (docs/method.md, section 2).

SpikingJelly's neurons call their surrogate as ``surrogate_function(h - v_threshold)``, without
the time step. TSG then counts its calls since the last ``functional.reset_net`` (one per time
step) and uses :math:`a_t` of that step, so every :math:`p_t` trains, as in a hand-unrolled loop
that passes ``t``. Also here: sequences longer than ``T``, a TSG shared between neurons,
``torch.no_grad`` / eval passes, ``torch.utils.checkpoint`` re-runs, SpikingJelly 2.0's
``memopt``, ``torch.compile`` (no recompilation per step), SpikingJelly's fused CuPy kernels
(a clear error) and CFNode, which passes ``t`` itself and leaves the counter alone.
"""
import copy

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from spikingjelly_cf import CFNode, TSG
from spikingjelly_cf._compat import CLASSIC

T = 4


def reference_lif(x_seq, tsg, tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
                  detach_reset=False):
    """SpikingJelly's LIF arithmetic unrolled by hand, passing ``t`` to TSG explicitly."""
    vr = 0.0 if v_reset is None else v_reset
    v = torch.full_like(x_seq[0], vr)
    out = []
    for t, x in enumerate(x_seq):
        h = v + (x - (v - vr)) / tau if decay_input else v - (v - vr) / tau + x
        s = tsg(h - v_threshold, t=t)
        sr = s.detach() if detach_reset else s
        v = h - sr * v_threshold if v_reset is None else sr * v_reset + (1.0 - sr) * h
        out.append(s)
    return torch.stack(out)


def reference_if(x_seq, tsg, v_threshold=1.0):
    v = torch.zeros_like(x_seq[0])
    out = []
    for t, x in enumerate(x_seq):
        h = v + x
        s = tsg(h - v_threshold, t=t)
        v = s * 0.0 + (1.0 - s) * h
        out.append(s)
    return torch.stack(out)


def _inputs(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, n, generator=g, dtype=torch.float64) * 1.6


def _run(node, x, step_mode):
    if step_mode == 'm':
        return node(x)
    return torch.stack([node(x_t) for x_t in x])


NEURONS = {
    'LIF hard reset': (lambda sg, mode: neuron.LIFNode(surrogate_function=sg, step_mode=mode),
                       lambda x, sg: reference_lif(x, sg)),
    'LIF soft reset, no input decay, detach_reset': (
        lambda sg, mode: neuron.LIFNode(tau=4 / 3, decay_input=False, v_reset=None, detach_reset=True,
                                        surrogate_function=sg, step_mode=mode),
        lambda x, sg: reference_lif(x, sg, tau=4 / 3, decay_input=False, v_reset=None,
                                    detach_reset=True)),
    'IF': (lambda sg, mode: neuron.IFNode(surrogate_function=sg, step_mode=mode),
           lambda x, sg: reference_if(x, sg)),
}


@pytest.mark.parametrize('step_mode', ['s', 'm'])
@pytest.mark.parametrize('name', list(NEURONS))
def test_every_step_trains_as_in_a_hand_unrolled_loop(name, step_mode):
    make, reference = NEURONS[name]
    sg = TSG(T).double()
    with torch.no_grad():
        sg.p.copy_(torch.tensor([-0.4, 0.3, 0.9, -1.2]))   # a different a_t per step
    ref_sg = copy.deepcopy(sg)
    node = make(sg, step_mode)
    gs = torch.randn(T, 64, dtype=torch.float64)
    for sample in range(2):   # two samples: reset_net restarts the count
        x = _inputs(sample).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        s = _run(node, x, step_mode)
        s_ref = reference(x_ref, ref_sg)
        assert torch.equal(s, s_ref)
        (s * gs).sum().backward()
        (s_ref * gs).sum().backward()
        assert int(sg.step_count) == T
        functional.reset_net(node)
        assert sg.step_count == 0
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sg.p.grad, ref_sg.p.grad, rtol=1e-12, atol=1e-12)
    assert bool((sg.p.grad != 0).all()), f'p.grad = {sg.p.grad.tolist()}: a step did not train'


def test_reviewer_case_lifnode_tsg4():
    """``LIFNode(surrogate_function=TSG(4))`` in multi-step mode: every p_t gets a gradient."""
    sg = TSG(4)
    node = neuron.LIFNode(surrogate_function=sg, step_mode='m')
    x = torch.rand(4, 256) * 1.5
    node(x).sum().backward()
    assert bool((sg.p.grad != 0).all()), sg.p.grad.tolist()


@pytest.mark.parametrize('step_mode', ['s', 'm'])
def test_parametric_lif_trains_every_step(step_mode):
    sg = TSG(T)
    node = neuron.ParametricLIFNode(surrogate_function=sg, step_mode=step_mode)
    _run(node, torch.linspace(0., 3., 64).repeat(T, 1), step_mode).sum().backward()
    assert int(sg.step_count) == T and bool((sg.p.grad != 0).all()), sg.p.grad.tolist()


def test_sequence_longer_than_T_is_an_error():
    node = neuron.LIFNode(surrogate_function=TSG(3), step_mode='m')
    with pytest.raises(ValueError, match=r'T=3.*reset_net'):
        node(torch.rand(4, 5))
    functional.reset_net(node)
    node(torch.rand(3, 5))                       # three steps fit
    with pytest.raises(ValueError, match=r'T=3.*reset_net'):
        node(torch.rand(1, 5))                   # a fourth without a reset does not
    functional.reset_net(node)
    single = neuron.LIFNode(surrogate_function=TSG(1))
    for _ in range(10):                          # T=1: one a for every step, nothing counted
        single(torch.rand(5))


def test_tsg_shared_between_neurons_is_an_error():
    sg = TSG(T)
    net = nn.Sequential(layer.Linear(3, 5), neuron.LIFNode(surrogate_function=sg),
                        layer.Linear(5, 2), neuron.LIFNode(surrogate_function=sg))
    with pytest.raises(ValueError, match='shared'):
        net(torch.rand(4, 3))
    # one TSG per neuron (a deep copy each, as SpikingJelly's model zoo does) works
    functional.reset_net(net)
    net[3].surrogate_function = copy.deepcopy(sg)
    for _ in range(T):
        net(torch.rand(4, 3))


def test_cfnode_passes_t_and_leaves_the_counter_alone():
    sg = TSG(T).double()
    node = CFNode(step_mode='m', backend='torch', surrogate_function=sg)
    x = (torch.randn(T, 8, dtype=torch.float64) * 2).requires_grad_()
    node(x).sum().backward()
    assert sg.step_count == 0, 'CFNode must not advance the implicit counter'
    single = CFNode(surrogate_function=TSG(T))
    for t in range(T):
        single(torch.randn(8))
    assert single.surrogate_function.step_count == 0 and int(single.step_count) == T


def test_no_grad_and_eval_passes_do_not_shift_training():
    """A validation pass (eval mode, no_grad; reset afterwards as usual) leaves the next
    training step's gradients unchanged."""
    def train_grad(node, sg, x):
        node.train()
        node(x).sum().backward()
        functional.reset_net(node)
        g = sg.p.grad.clone()
        sg.p.grad = None
        return g

    sg = TSG(T)
    node = neuron.LIFNode(surrogate_function=sg, step_mode='m')
    x = torch.rand(T, 128) * 1.5
    before = train_grad(node, sg, x)
    node.eval()
    with torch.no_grad():
        for _ in range(3):
            node(torch.rand(T, 128))
            functional.reset_net(node)
        node.train()
        node(torch.rand(T, 128))   # no_grad in training mode: the steps are counted
        assert int(sg.step_count) == T
        functional.reset_net(node)
    assert torch.equal(train_grad(node, sg, x), before)


def _region(sg, x_seq, v):
    """A soft-reset LIF loop whose state is explicit (a pure function of its inputs and of
    TSG's counter), calling TSG without ``t`` like a SpikingJelly neuron."""
    out = []
    for x in x_seq:
        h = 0.5 * v + x
        s = sg(h - 1.0)
        v = h - s
        out.append(s)
    return torch.stack(out)


def test_checkpoint_rerun_replays_the_steps():
    from torch.utils.checkpoint import checkpoint
    x = torch.rand(T, 64, dtype=torch.float64) * 1.6
    plain, ckpt = TSG(T).double(), TSG(T).double()
    with torch.no_grad():
        plain.p.copy_(torch.tensor([-0.4, 0.3, 0.9, -1.2]))
        ckpt.p.copy_(plain.p)
    v0 = torch.zeros(64, dtype=torch.float64)
    _region(plain, x, v0).sum().backward()
    out = checkpoint(_region, ckpt, x, v0, use_reentrant=False)
    out.sum().backward()                      # re-runs _region: steps 0..T-1 again
    assert int(ckpt.step_count) == T, 'the re-run advanced the counter'
    torch.testing.assert_close(ckpt.p.grad, plain.p.grad, rtol=1e-12, atol=1e-12)
    assert bool((plain.p.grad != 0).all())
    # reset between the forward and the backward pass: the re-run leaves the counter alone
    ckpt.p.grad = None
    functional.reset_net(ckpt)
    out = checkpoint(_region, ckpt, x, v0, use_reentrant=False)
    functional.reset_net(ckpt)
    out.sum().backward()
    assert ckpt.step_count == 0, 'the re-run wrote the counter'
    torch.testing.assert_close(ckpt.p.grad, plain.p.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match='use_reentrant=False'):
        functional.reset_net(ckpt)
        x_req = x.clone().requires_grad_()
        checkpoint(_region, ckpt, x_req, v0, use_reentrant=True).sum().backward()


@pytest.mark.skipif(CLASSIC, reason='spikingjelly.activation_based.memopt needs SpikingJelly 2.0')
def test_memopt_checkpoint_module_of_lifnode_with_tsg():
    from spikingjelly.activation_based import memopt
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 16), neuron.LIFNode(surrogate_function=TSG(T)))
    functional.set_step_mode(net, 'm')
    ref = copy.deepcopy(net)
    net[1] = memopt.checkpoint_module(net[1])
    x = torch.rand(T, 8, 6) * 2
    for model in (ref, net):
        model(x).sum().backward()
        functional.reset_net(model)
    g_ref = ref[1].surrogate_function.p.grad
    g = net[1]._checkpoint_wrapped_module.surrogate_function.p.grad
    assert bool((g_ref != 0).all())
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(net[0].weight.grad, ref[0].weight.grad)


def test_compile_no_recompilation_per_step():
    """Under ``torch.compile`` the counter is a 0-d tensor: one graph for step 0 (the counter
    is the int 0 after a reset) and one for every later step, no graph break, the same
    gradients as eager."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    sg, eager_sg = TSG(8), TSG(8)
    with torch.no_grad():
        eager_sg.p.copy_(torch.linspace(-1, 1, 8))
        sg.p.copy_(eager_sg.p)

    def step(x, v):
        h = 0.5 * v + x
        s = sg(h - 1.0)
        return s, h - s

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    x = torch.rand(8, 32) * 1.6
    v = torch.zeros(32)
    outs = []
    for t in range(8):
        s, v = compiled(x[t], v)
        outs.append(s)
    torch.stack(outs).sum().backward()
    assert counter.frame_count <= 2, f'{counter.frame_count} compilations for 8 steps'
    assert int(sg.step_count) == 8
    _region(eager_sg, x, torch.zeros(32)).sum().backward()
    torch.testing.assert_close(sg.p.grad, eager_sg.p.grad)


def test_spikingjelly_fused_kernels_refuse_tsg_clearly():
    sg = TSG(T)
    for name in ('cuda_codes', 'cuda_code'):
        with pytest.raises(TypeError, match="TSG.*backend='torch'.*CFNode"):
            getattr(sg, name)
    if CLASSIC:   # 0.0.0.0.14's LIFNode reads cuda_codes on its 'cupy' backend
        node = neuron.LIFNode(surrogate_function=sg, step_mode='m')
        node._backend = 'cupy'   # its setter wants CuPy installed
        with pytest.raises(TypeError, match='TSG'):
            node(torch.rand(T, 4))
