"""CFNode under torch.utils.checkpoint: a recomputed forward starts from the state the first run
started from, so gradients and state equal the un-checkpointed run (docs/method.md, section 6,
"Recomputation"; issue 9 item 4). Unidentifiable recomputations raise a clear error.
"""
import copy

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron, surrogate
from torch.utils.checkpoint import checkpoint

from spikingjelly_cf import CFNode, CFRect, TSG, _recompute
from spikingjelly_cf._compat import CLASSIC
from spikingjelly_cf.functional.neuron import resolve_backend

T, HALF, N, D_IN, D_HID, D_OUT = 6, 3, 4, 5, 7, 3

SURROGATES = {
    'CFRect': lambda: CFRect(alpha=0.7),
    'TSG': lambda: TSG(T),
    'Sigmoid': lambda: surrogate.Sigmoid(),
    'ATan': lambda: surrogate.ATan(),
    'PiecewiseQuadratic': lambda: surrogate.PiecewiseQuadratic(),  # no kernel: 'torch' only
}
CPU_BACKENDS = ('torch', 'cpp')
COMBOS = [(sg, be) for sg in SURROGATES for be in CPU_BACKENDS]

# Checkpointing patterns; 'layer' and 'sequential' run multi-step nodes on two halves of the
# sequence (so the second half starts from carried state and TSG's steps 3..5), 'step' and
# 'loop' run single-step nodes T times.
CASES = ('layer', 'sequential', 'step', 'loop')


def skip_unless_runs(sg_name, backend):
    x = torch.zeros(1, N)
    try:
        resolve_backend(backend, x, SURROGATES[sg_name]())
    except (ValueError, RuntimeError) as e:
        pytest.skip(f'{backend} cannot run {sg_name} here: {e}')


def make_net(sg_name, backend, step_mode, **node_kwargs):
    torch.manual_seed(1)

    def node():
        return CFNode(surrogate_function=SURROGATES[sg_name](), backend=backend,
                      step_mode=step_mode, **node_kwargs)
    net = nn.Sequential(nn.Linear(D_IN, D_HID), node(), nn.Linear(D_HID, D_HID), node(),
                        nn.Linear(D_HID, D_OUT))
    with torch.no_grad():  # inputs that cross several levels both ways
        net[0].weight.mul_(3.0)
        net[2].weight.mul_(3.0)
    return net


def nodes(net):
    return [m for m in net.modules() if isinstance(m, CFNode)]


def ckpt(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def forward(net, x, case, checkpointed, **ckpt_kwargs):
    """The network on ``x`` ``[T, N, D_IN]``, as ``case`` checkpoints it (or not)."""
    if checkpointed:
        def c(fn, *args):
            return ckpt(fn, *args, **ckpt_kwargs)
    else:
        def c(fn, *args):
            return fn(*args)
    if case == 'layer':  # each CF layer in its own region
        def run(h):
            for m in net:
                h = c(m, h) if isinstance(m, CFNode) else m(h)
            return h
        return torch.cat([run(x[:HALF]), run(x[HALF:])])
    if case == 'sequential':  # several CF layers in one region
        return torch.cat([c(net, x[:HALF]), c(net, x[HALF:])])
    if case == 'step':  # one region per time step
        return torch.stack([c(net, x[t]) for t in range(T)])
    if case == 'loop':  # the whole single-step loop in ONE region: each node called T times
        return c(lambda xs: torch.stack([net(x_t) for x_t in xs.unbind(0)]), x)
    raise ValueError(case)


def step_mode(case):
    return 'm' if case in ('layer', 'sequential') else 's'


def loss_of(net, y, w, with_h_seq=False):
    loss = (y * w).sum()
    if with_h_seq:
        loss = loss + sum((0.3 * m.h_seq).sum() for m in nodes(net))
    return loss


def grads(net, x):
    return [x.grad] + [p.grad for p in net.parameters()]


def assert_grads_equal(net_ref, x_ref, net, x):
    names = ['input'] + [n for n, _ in net.named_parameters()]
    for name, g_ref, g in zip(names, grads(net_ref, x_ref), grads(net, x)):
        assert g is not None and g_ref is not None, name
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-9, msg=lambda m: f'{name}: {m}')


def assert_state_equal(net_ref, net):
    for a, b in zip(nodes(net_ref), nodes(net)):
        assert b.step_count == a.step_count
        torch.testing.assert_close(torch.as_tensor(b.v), torch.as_tensor(a.v), rtol=0, atol=0)
        for name in ('v_seq', 'h_seq'):
            ra, rb = getattr(a, name, None), getattr(b, name, None)
            assert (ra is None) == (rb is None), name
            if ra is not None:
                torch.testing.assert_close(rb, ra, rtol=0, atol=0)


def inputs(samples=2):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(T, N, D_IN, generator=g), torch.randn(T, N, D_OUT, generator=g))
            for _ in range(samples)]


def train_pair(sg_name, backend, case, samples=2, retain=1, reset_before_backward=False,
               ckpt_kwargs=None, net_ref=None, input_grad=True, **node_kwargs):
    """Run the un-checkpointed and the checkpointed network on the same samples."""
    if net_ref is None:
        net_ref = make_net(sg_name, backend, step_mode(case), **node_kwargs)
    net = copy.deepcopy(net_ref)
    with_h = node_kwargs.get('store_h_seq', False)
    xs = []
    for x0, w in inputs(samples):
        pair = []
        for model, checkpointed in ((net_ref, False), (net, True)):
            x = x0.clone().requires_grad_(input_grad)
            y = forward(model, x, case, checkpointed, **(ckpt_kwargs or {}))
            loss = loss_of(model, y, w, with_h)
            if reset_before_backward:
                functional.reset_net(model)
            for i in range(retain):
                loss.backward(retain_graph=i + 1 < retain)
            pair.append((y, x))
        (y_ref, x_ref), (y, x) = pair
        assert torch.equal(y, y_ref)
        assert_state_equal(net_ref, net)
        functional.reset_net(net_ref)
        functional.reset_net(net)
        xs.append((x_ref, x))
    return net_ref, net, xs


@pytest.mark.parametrize('sg_name,backend', COMBOS)
@pytest.mark.parametrize('case', CASES)
def test_gradients_and_state_equal_uncheckpointed(case, sg_name, backend):
    skip_unless_runs(sg_name, backend)
    held = _recompute.pending_frames()
    net_ref, net, xs = train_pair(sg_name, backend, case)
    for x_ref, x in xs:
        assert_grads_equal(net_ref, x_ref, net, x)
    # the comparison means something: gradients reach the first layer (and TSG's p)
    assert net[0].weight.grad.abs().sum() > 0
    for m in nodes(net):
        for p in m.surrogate_function.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert _recompute.pending_frames() == held  # the records went with the consumed graph


@pytest.mark.parametrize('backend', CPU_BACKENDS)
@pytest.mark.parametrize('case', CASES)
def test_stored_sequences(case, backend):
    # h_seq is part of the loss, v_seq is compared; the re-run must not overwrite either
    net_ref, net, xs = train_pair('TSG', backend, case, samples=1, store_v_seq=True,
                                  store_h_seq=True)
    assert_grads_equal(net_ref, xs[0][0], net, xs[0][1])


@pytest.mark.parametrize('backend', CPU_BACKENDS)
@pytest.mark.parametrize('case', CASES)
def test_cf_layer_on_raw_input(case, backend):
    # A CF layer fed by data that needs no gradient: its state still does (through TSG's p),
    # so the re-run must start from a v that requires a gradient, as the first run did, to
    # save the same tensors.
    torch.manual_seed(1)
    net_ref = nn.Sequential(
        CFNode(surrogate_function=TSG(T), backend=backend, step_mode=step_mode(case)),
        nn.Linear(D_IN, D_OUT))
    net_ref.register_forward_pre_hook(lambda m, args: (3 * args[0],))  # cross several levels
    net_ref, net, _ = train_pair('TSG', backend, case, samples=1, net_ref=net_ref,
                                 input_grad=False)
    for p_ref, p in zip(net_ref.parameters(), net.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-9)
    assert net_ref[0].surrogate_function.p.grad.abs().sum() > 0


@pytest.mark.parametrize('backend', CPU_BACKENDS)
@pytest.mark.parametrize('case', CASES)
def test_retain_graph_double_backward(case, backend):
    net_ref, net, xs = train_pair('TSG', backend, case, samples=1, retain=2)
    assert_grads_equal(net_ref, xs[0][0], net, xs[0][1])


@pytest.mark.parametrize('case', CASES)
def test_without_early_stop(case):
    # the re-run goes through the whole region (every call of the 'loop' case is replayed)
    net_ref, net, xs = train_pair('TSG', 'cpp', case, samples=1,
                                  ckpt_kwargs=dict(early_stop=False), store_v_seq=True,
                                  store_h_seq=True)
    assert_grads_equal(net_ref, xs[0][0], net, xs[0][1])


@pytest.mark.parametrize('case', CASES)
def test_reset_between_forward_and_backward(case):
    # the records belong to the checkpointed region, not to the module's current state
    net_ref, net, xs = train_pair('TSG', 'cpp', case, reset_before_backward=True)
    for x_ref, x in xs:
        assert_grads_equal(net_ref, x_ref, net, x)


@pytest.mark.parametrize('case', CASES)
def test_no_grad_records_nothing(case):
    net_ref = make_net('TSG', 'torch', step_mode(case))
    net = copy.deepcopy(net_ref)
    x = inputs(1)[0][0]
    held = _recompute.pending_frames()
    with torch.no_grad():
        y_ref = forward(net_ref, x, case, False)
        y = forward(net, x, case, True)
    assert torch.equal(y, y_ref)
    assert_state_equal(net_ref, net)
    assert _recompute.pending_frames() == held


def test_records_only_inside_checkpointed_regions():
    net = make_net('TSG', 'torch', 'm')
    x = inputs(1)[0][0]
    held = _recompute.pending_frames()
    y = net(x)  # plain forward with gradients
    assert _recompute.pending_frames() == held
    functional.reset_net(net)
    y2 = ckpt(net, x)
    assert _recompute.pending_frames() == held + 1
    functional.reset_net(net)  # the state no longer holds the graph
    del y, y2  # dropping the graph frees the records without a backward pass
    assert _recompute.pending_frames() == held


def test_reentrant_checkpoint_raises_clear_error():
    net_ref = make_net('TSG', 'torch', 'm')
    net = copy.deepcopy(net_ref)
    x = inputs(1)[0][0].requires_grad_()
    y_ref = net_ref(x)
    y = checkpoint(net, x, use_reentrant=True)
    assert torch.equal(y, y_ref)
    assert_state_equal(net_ref, net)  # the first run advanced the state once
    with pytest.raises(RuntimeError, match=r'use_reentrant=False.*memopt\.checkpoint_module'):
        y.sum().backward()


def test_nested_checkpoint_raises_clear_error():
    net = make_net('CFRect', 'torch', 'm')

    def outer(h):  # a region holding a CF region and a Linear that saves its output
        return net[2](ckpt(net[1], net[0](h)))
    y = ckpt(outer, inputs(1)[0][0].requires_grad_())
    with pytest.raises(RuntimeError, match='nested inside a checkpointed region'):
        y.sum().backward()


def test_recompute_with_more_calls_than_recorded_raises():
    node = CFNode(step_mode='m', backend='torch')
    calls = {'n': 1}

    def fn(h):
        for _ in range(calls['n']):
            h = node(h) * 1.5
        return h
    y = checkpoint(fn, torch.randn(2, 3, requires_grad=True), use_reentrant=False,
                   determinism_check='none', early_stop=False)
    calls['n'] = 2  # the re-run calls the node once more than the first run
    with pytest.raises(RuntimeError, match='more often'):
        y.sum().backward()


def test_cpp_pool_leaves_checkpointed_h_alone():
    # The cpp kernel pools the h it saves and takes it back when the autograd node dies. Under a
    # checkpoint that would keep the first run's h alive (the memory checkpointing frees) and
    # return the re-run's h to the pool while the backward pass still reads it: not pooled there.
    skip_unless_runs('CFRect', 'cpp')
    from spikingjelly_cf.backends import cpp
    net = make_net('CFRect', 'cpp', 'm')
    x = inputs(1)[0][0].requires_grad_()

    def pooled(checkpointed):
        cpp.empty_cache()
        y = forward(net, x, 'layer', checkpointed)
        y.sum().backward()
        functional.reset_net(net)
        del y  # the graph (and its nodes) go
        return sum(len(free) for free in cpp._pool.values())
    assert pooled(checkpointed=True) == 0
    assert pooled(checkpointed=False) > 0  # the pool is in use otherwise
    cpp.empty_cache()


@pytest.mark.skipif(CLASSIC, reason='memopt is part of SpikingJelly 2.0')
@pytest.mark.parametrize('sg_name', ['CFRect', 'TSG'])
@pytest.mark.parametrize('chunks', [1, 2])
@pytest.mark.parametrize('buffers', [False, True])
def test_spikingjelly_memopt_checkpoint_module(sg_name, chunks, buffers):
    from spikingjelly.activation_based import memopt
    net_ref = make_net(sg_name, 'auto', 'm')
    if buffers:  # a module with buffers is re-run through its own forward (functional_call)
        net_ref.register_buffer('unused', torch.zeros(1))
    net = copy.deepcopy(net_ref)
    wrapped = memopt.checkpoint_module(net, chunks=chunks)
    for x0, w in inputs(2):
        x_ref, x = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        # memopt runs the chunks one after the other: so does the reference (same sums)
        y_ref = torch.cat([net_ref(part) for part in x_ref.tensor_split(chunks)])
        y = wrapped(x)
        assert torch.equal(y, y_ref)
        (y_ref * w).sum().backward()
        (y * w).sum().backward()
        assert_state_equal(net_ref, net)
        assert_grads_equal(net_ref, x_ref, net, x)
        functional.reset_net(net_ref)
        functional.reset_net(net)


def test_spikingjelly_lifnode_has_the_defect():
    # Documents SpikingJelly's own LIFNode (its issue #629): checkpointing a stateful neuron
    # naively recomputes from the advanced state, so the gradients differ. If this starts to
    # fail, SpikingJelly fixed it. (early_stop=False: with early stopping, 0.0.0.0.14's
    # TorchScript reset turns checkpoint's internal stop signal into a RuntimeError.)
    torch.manual_seed(3)
    net_ref = nn.Sequential(nn.Linear(D_IN, D_HID), neuron.LIFNode(step_mode='m'),
                            nn.Linear(D_HID, D_OUT))
    net = copy.deepcopy(net_ref)
    x0, w = inputs(1)[0]
    x_ref, x = (3 * x0).requires_grad_(), (3 * x0).requires_grad_()

    def run(model, h, checkpointed):
        def c(fn, *args):
            return ckpt(fn, *args, early_stop=False) if checkpointed else fn(*args)
        h = model[0](h)
        h = torch.cat([c(model[1], h[:HALF]), c(model[1], h[HALF:])])
        return model[2](h)
    (run(net_ref, x_ref, False) * w).sum().backward()
    (run(net, x, True) * w).sum().backward()
    assert not torch.allclose(net[0].weight.grad, net_ref[0].weight.grad, rtol=1e-3, atol=1e-6)

