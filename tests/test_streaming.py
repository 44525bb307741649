"""Single-step (streaming) mode: CFNode's lean per-step path (``spikingjelly_cf._step``).

After a full step, an eager CFNode keeps a plan and runs the following steps without
re-validating, re-resolving or dispatching the op. These tests prove that the plan really runs
(``cf_multi_step`` is called once per sequence), that its results equal the full path's and the
reference's (spikes exactly, states and gradients incl. TSG's ``p`` to float32 tolerance), that
every change the full path would react to sends the step back to it (shape, dtype, device,
parameters, surrogate, state replaced, reset, detach, dispatch modes, saved-tensor hooks), that
SpikingJelly's recurrent containers train with a CF layer inside, and that single-step loops
still compile without graph breaks or per-step recompilation.
"""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, surrogate
from torch.utils._python_dispatch import TorchDispatchMode

import spikingjelly_cf.neuron as cf_neuron
from spikingjelly_cf import CFNode, CFRect, TSG, _step
from spikingjelly_cf.backends import cpp, is_available
from spikingjelly_cf.functional.neuron import cf_multi_step_ref

needs_cpp = pytest.mark.skipif(not is_available('cpp'), reason='the cpp extension is not built')
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def full_calls(monkeypatch):
    """How many steps ran the full path (each calls ``neuron.cf_multi_step`` once)."""
    calls = []
    real = cf_neuron.cf_multi_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(cf_neuron, 'cf_multi_step', counting)
    return calls


@pytest.fixture
def no_plans(monkeypatch):
    """Switch the lean path off: every step runs in full (the path the plans must equal)."""
    monkeypatch.setattr(_step, 'build_plan', lambda *a, **k: None)


def _tsg(T):
    sg = TSG(T)
    with torch.no_grad():  # a distinct a_t per step: a step that reads the wrong t shows
        sg.p.copy_(torch.linspace(-1.5, 1.5, T))
    return sg


def _inputs(T=6, shape=(3, 5), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, *shape, generator=g) * scale


def _run_steps(node, xs, grad_out=None, params=()):
    """Drive ``node`` step by step; spikes, last state and gradients (inputs, then params)."""
    xs = [x.clone().requires_grad_(grad_out is not None) for x in xs]
    outs = [node(x) for x in xs]
    v = node.v
    if grad_out is None:
        return torch.stack(outs), v, None
    grads = torch.autograd.grad(outs + [v], xs + list(params),
                                list(grad_out) + [torch.ones_like(v)], allow_unused=True)
    return torch.stack(outs).detach(), v.detach(), grads


def _reference(xs, grad_out, sg=None, **kwargs):
    x = xs.clone().requires_grad_()
    params = list(sg.parameters()) if sg is not None else []
    s, v, _, _ = cf_multi_step_ref(x, torch.zeros_like(xs[0]), surrogate_function=sg, **kwargs)
    grads = torch.autograd.grad([s, v], [x] + params, [grad_out, torch.ones_like(v)],
                                allow_unused=True)
    return s.detach(), v.detach(), (list(grads[0].unbind(0)) + list(grads[1:]))


def _assert_close(got, ref):
    s, v, g = got
    s_ref, v_ref, g_ref = ref
    assert torch.equal(s, s_ref), 'spikes differ'
    torch.testing.assert_close(v, v_ref, **TOL)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL)


# -- the plan runs, and equals the full path and the reference -------------------------------------
@needs_cpp
@pytest.mark.parametrize('sg_name', ['rect', 'tsg', 'atan'])
def test_lean_steps_equal_reference_and_full_path(sg_name, full_calls):
    T = 6
    xs, g = _inputs(T), _inputs(T, seed=1, scale=1.0)
    make_sg = {'rect': CFRect, 'tsg': lambda: _tsg(T), 'atan': surrogate.ATan}[sg_name]
    sg = make_sg()
    node = CFNode(surrogate_function=sg)
    launches = cpp.launch_count
    got = _run_steps(node, xs, g, params=list(sg.parameters()))
    assert len(full_calls) == 1, 'every step after the first must run the plan'
    assert cpp.launch_count - launches == 2 * T, 'the cpp kernel ran forward and backward per step'
    assert node.step_count == T and type(node.step_count) is int
    _assert_close(got, _reference(xs, g, sg=sg))


@needs_cpp
def test_lean_inference_equals_full_path(full_calls, monkeypatch):
    xs = _inputs(8, shape=(4, 16))
    node = CFNode().eval()
    with torch.no_grad():
        lean = _run_steps(node, xs)
    assert len(full_calls) == 1 and node.__dict__['_step_plan'] is not None
    monkeypatch.setattr(_step, 'build_plan', lambda *a, **k: None)
    functional.reset_net(node)
    with torch.no_grad():
        full = _run_steps(node, xs)
    assert len(full_calls) == 1 + 8
    assert torch.equal(lean[0], full[0]) and torch.equal(lean[1], full[1])


@needs_cpp
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_lean_steps_in_half_precision_equal_full_path(dtype, full_calls, monkeypatch):
    """The cpp kernel's float16/bfloat16 storage: the plan gives the full step's results."""
    xs, g = _inputs(5).to(dtype), _inputs(5, seed=1).to(dtype)
    sg = _tsg(8)
    lean = _run_steps(CFNode(surrogate_function=sg), xs, g, params=[sg.p])
    assert len(full_calls) == 1
    monkeypatch.setattr(_step, 'build_plan', lambda *a, **k: None)
    sg_full = copy.deepcopy(sg)
    full = _run_steps(CFNode(surrogate_function=sg_full), xs, g, params=[sg_full.p])
    assert len(full_calls) == 1 + 5
    assert lean[0].dtype == dtype and torch.equal(lean[0], full[0])
    assert torch.equal(lean[1], full[1])
    for a, b in zip(lean[2], full[2]):
        assert torch.equal(a, b)


@needs_cpp
def test_channels_last_steps_keep_their_layout(full_calls):
    """Non-contiguous inputs (channels_last frames) run the full step, whose outputs keep the
    input's layout; contiguous ones run the plan."""
    node = CFNode()
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    outs = [node(x * (t + 1)) for t in range(3)]
    assert len(full_calls) == 3
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs)
    functional.reset_net(node)
    ref = [node(x.contiguous() * (t + 1)) for t in range(3)]
    assert len(full_calls) == 4
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)


def test_reference_backend_plan_equals_reference(full_calls):
    """Backends without a kernel body (the reference here) keep a plan too: the backend's own
    multi-step function with the validated arguments."""
    xs, g = _inputs(5).double(), _inputs(5, seed=1).double()
    node = CFNode(backend='torch')
    got = _run_steps(node, xs, g)
    assert len(full_calls) == 1
    _assert_close(got, _reference(xs, g))


# -- state after reset, step counting for TSG ------------------------------------------------------
@needs_cpp
def test_reset_restarts_state_count_and_plan(full_calls):
    xs, g = _inputs(5), _inputs(5, seed=1)
    sg = _tsg(8)
    node = CFNode(surrogate_function=sg)
    first = _run_steps(node, xs, g, params=[sg.p])
    functional.reset_net(node)
    assert node.v == 0. and node.step_count == 0 and node.__dict__['_step_plan'] is None
    second = _run_steps(node, xs, g, params=[sg.p])
    assert len(full_calls) == 2, 'one full step per sequence'
    _assert_close(second, first)   # nothing leaks from the first sequence


@needs_cpp
def test_tsg_step_counting_on_the_lean_path():
    """Step t reads a_t: with detach_reset the spikes of step t reach only p[t], on every lean
    step; past TSG's T the lean step fails like the full one and changes nothing."""
    T = 4
    x = _inputs(T, shape=(200,), scale=1.5)
    for t_loss in range(T):
        sg = _tsg(T)
        node = CFNode(surrogate_function=sg, detach_reset=True)
        for t in range(t_loss + 1):
            s = node(x[t])
        assert node.step_count == t_loss + 1
        s.sum().backward()
        assert sg.p.grad[t_loss] != 0 and torch.all(sg.p.grad[torch.arange(T) != t_loss] == 0)
    v_before = node.v
    assert node.__dict__['_step_plan'] is not None
    with pytest.raises(ValueError, match='TSG has T=4 learnable time steps'):
        node(x[0])
    assert node.v is v_before and node.step_count == T


@needs_cpp
def test_step_count_is_an_int_in_eager_mode():
    node = CFNode()
    for t in range(3):
        node(torch.randn(2, 3))
        assert node.step_count == t + 1 and type(node.step_count) is int
    node.step_count = torch.tensor(3)   # e.g. left by compiled steps
    node(torch.randn(2, 3))
    assert node.step_count == 4 and type(node.step_count) is int


# -- changes between steps go back to the full path ----------------------------------------------
@needs_cpp
def test_dtype_change_between_steps(full_calls):
    """float32 steps (cpp plan), a float64 step (the full path converts the state, the reference
    runs and keeps a plan of its own), float32 again: all equal to the reference."""
    xs = _inputs(6, shape=(2, 7))
    node = CFNode()
    outs = [node(xs[0]), node(xs[1])]
    outs.append(node(xs[2].double()))
    assert outs[-1].dtype == torch.float64 and node.v.dtype == torch.float64
    outs.append(node(xs[3].double()))
    outs += [node(xs[4]), node(xs[5])]
    assert len(full_calls) == 3, 'full steps at 0, at the switch to float64 and back'
    v = torch.zeros(2, 7)
    for t, out in enumerate(outs):
        dtype = torch.float64 if t in (2, 3) else torch.float32
        s, v, _, _ = cf_multi_step_ref(xs[t:t + 1].to(dtype), v.to(dtype))
        assert torch.equal(out, s[0]), t


@needs_cpp
def test_device_and_shape_changes_fail_like_the_full_path():
    node = CFNode()
    for _ in range(3):
        node(torch.randn(4, 5))
    assert node.__dict__['_step_plan'] is not None
    with pytest.raises(ValueError, match='reset_net'):
        node(torch.randn(3, 5))   # a batch that changes without a reset
    with pytest.raises(ValueError, match='neuron state is on cpu'):
        node(torch.empty(4, 5, device='meta'))
    with pytest.raises(TypeError, match='floating-point'):
        node(torch.ones(4, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match='torch.Tensor'):
        node([[0.0] * 5] * 4)
    out = node(torch.randn(4, 5))   # the right input still works
    assert out.shape == (4, 5)


@needs_cpp
@pytest.mark.filterwarnings('ignore:CFNode. the fused kernels support:RuntimeWarning')
@pytest.mark.parametrize('change', ['v_threshold', 'k_pos', 'tau', 'surrogate', 'spiking',
                                    'alpha', 'backend', 'v_replaced'])
def test_changes_between_steps_take_effect(change, full_calls, monkeypatch):
    """A parameter, surrogate or state changed between two lean steps is used by the next one,
    as the full path would; the step after it is lean again."""
    xs = _inputs(4)
    node = CFNode(surrogate_function=CFRect(alpha=1.0))
    node(xs[0])
    node(xs[1])
    ref = copy.deepcopy(node)
    ref.__dict__['_step_plan'] = None
    for n in (node, ref):
        if change == 'v_threshold':
            n.v_threshold = 0.7
        elif change == 'k_pos':
            n.k_pos = 1
        elif change == 'tau':
            n.tau = 3.0
        elif change == 'surrogate':
            n.surrogate_function = surrogate.ATan()
        elif change == 'spiking':
            n.surrogate_function.set_spiking_mode(False)   # no kernel runs it: the reference does
        elif change == 'alpha':
            n.surrogate_function.alpha = 0.25
        elif change == 'backend':
            n.backend = 'torch'
        elif change == 'v_replaced':
            n.v = n.v * 0.5
    calls_before = len(full_calls)
    xg = [x.clone().requires_grad_() for x in xs[2:]]
    out = [node(xg[0]), node(xg[1])]
    assert len(full_calls) - calls_before == 1, 'the changed step runs in full, the next is lean'
    with monkeypatch.context() as m:
        m.setattr(_step, 'build_plan', lambda *a, **k: None)
        ref_xs = [x.clone().requires_grad_() for x in xs[2:]]
        ref_out = [ref(ref_xs[0]), ref(ref_xs[1])]
    assert torch.equal(out[0], ref_out[0]) and torch.equal(out[1], ref_out[1])
    torch.testing.assert_close(node.v, ref.v, **TOL)
    ga = torch.autograd.grad(out[0].sum() + out[1].sum() + node.v.sum(), xg)
    gb = torch.autograd.grad(ref_out[0].sum() + ref_out[1].sum() + ref.v.sum(), ref_xs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL)


@needs_cpp
def test_detach_drops_the_plan_and_truncates_bptt():
    node = CFNode()
    x0 = torch.randn(2, 3, requires_grad=True)
    node(x0)
    node(torch.randn(2, 3))
    functional.detach_net(node)
    assert node.__dict__['_step_plan'] is None and not node.v.requires_grad
    x2 = torch.randn(2, 3, requires_grad=True)
    out = node(x2)
    g0, g2 = torch.autograd.grad(out.sum() + node.v.sum(), [x0, x2], allow_unused=True)
    assert g0 is None and g2 is not None


# -- what must not take the lean path --------------------------------------------------------------
class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_cpp
def test_dispatch_modes_see_the_op(full_calls):
    """Under a TorchDispatchMode (op counters, fake tensors) the step runs in full, so the mode
    sees the CF op, as before."""
    node = CFNode()
    node(torch.randn(2, 3))
    node(torch.randn(2, 3))
    with _OpNames() as mode:
        node(torch.randn(2, 3))
    assert 'spikingjelly_cf.cf_forward_cpp.default' in mode.names
    assert len(full_calls) == 2


@needs_cpp
def test_saved_tensor_hooks_take_the_full_path(full_calls):
    """Saved-tensor hooks (save_on_cpu, checkpointing) handle what autograd saves: those steps
    run in full, with the same results."""
    xs, g = _inputs(4), _inputs(4, seed=1)
    node = CFNode()
    xg = [x.clone().requires_grad_() for x in xs]
    outs = [node(xg[0])]
    with torch.autograd.graph.save_on_cpu():
        outs += [node(x) for x in xg[1:]]
    assert len(full_calls) == len(xs)
    grads = torch.autograd.grad(outs + [node.v], xg, list(g) + [torch.ones(3, 5)])
    _assert_close((torch.stack(outs).detach(), node.v.detach(), list(grads)), _reference(xs, g))


@needs_cpp
def test_pickle_and_deepcopy_mid_sequence():
    node = CFNode()
    xs = _inputs(4)
    node(xs[0])
    node(xs[1])
    for clone in (copy.deepcopy(node), pickle.loads(pickle.dumps(node))):
        a, b = clone(xs[2]), node(xs[2])
        assert torch.equal(a, b) and torch.equal(clone.v, node.v)
        functional.reset_net(node)
        node(xs[0])
        node(xs[1])


# -- SpikingJelly's recurrent containers train with a CF layer inside ---------------------------
def _recurrent(kind, step_mode='s'):
    torch.manual_seed(0)
    if kind == 'linear':
        return layer.LinearRecurrentContainer(
            nn.Sequential(nn.Linear(6, 8), CFNode(step_mode='s', surrogate_function=_tsg(12))),
            in_features=6, out_features=8, step_mode=step_mode)
    return nn.Sequential(nn.Linear(6, 8), layer.ElementWiseRecurrentContainer(
        CFNode(step_mode='s', surrogate_function=_tsg(12)),
        element_wise_function=lambda y, x: x + 0.5 * y, step_mode=step_mode))


def _task(seed=0, T=12, B=32):
    """Inputs and targets that need the previous step: target_t = [x_t,0 + x_(t-1),0 > 0]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 6, generator=g)
    prev = torch.cat([torch.zeros(1, B), x[:-1, :, 0]])
    return x, (prev + x[..., 0] > 0).float()


def _train(net, head, steps=60, lr=0.03):
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=lr)
    losses = []
    for it in range(steps):
        x, target = _task(seed=it % 4)
        out = torch.stack([head(net(x[t])).squeeze(-1) for t in range(x.shape[0])])
        loss = nn.functional.binary_cross_entropy_with_logits(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        functional.reset_net(net)
        losses.append(loss.item())
    return losses


@needs_cpp
@pytest.mark.parametrize('kind', ['linear', 'elementwise'])
def test_recurrent_container_trains(kind, full_calls):
    net, head = _recurrent(kind), nn.Linear(8, 1)
    losses = _train(net, head)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert len(full_calls) == 60, 'one full step per sequence, the other 11 lean'


@needs_cpp
@pytest.mark.parametrize('kind', ['linear', 'elementwise'])
def test_recurrent_container_gradients_equal_full_path_and_reference(kind, monkeypatch):
    """One sequence through the container: the lean path's gradients (all parameters incl. TSG's
    p) equal the full path's and, with backend='torch', the reference's."""
    x, target = _task()
    results = []
    for mode in ('lean', 'full', 'reference'):
        if mode != 'lean':
            monkeypatch.setattr(_step, 'build_plan', lambda *a, **k: None)
        net, head = _recurrent(kind), nn.Linear(8, 1)
        if mode == 'reference':
            for m in net.modules():
                if isinstance(m, CFNode):
                    m.backend = 'torch'
        out = torch.stack([head(net(x[t])).squeeze(-1) for t in range(x.shape[0])])
        loss = nn.functional.binary_cross_entropy_with_logits(out, target)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        results.append((out.detach(), grads))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0])
        for a, b in zip(results[0][1], other[1]):
            torch.testing.assert_close(a, b, **TOL)
    assert any(g.abs().sum() > 0 for g in results[0][1][-1:]), 'TSG p gets a gradient'


# -- torch.compile: no graph breaks, no recompilation per step ----------------------------------
@needs_cpp
@pytest.mark.parametrize('kind', ['node', 'linear', 'elementwise'])
def test_compiled_single_step_loop(kind):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    try:
        if kind == 'node':
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(6, 8), CFNode(surrogate_function=_tsg(12)))
        else:
            net = _recurrent(kind)
        x, _ = _task()
        functional.reset_net(net)
        explanation = torch._dynamo.explain(net)(x[0])
        assert explanation.graph_break_count == 0, explanation.break_reasons
        functional.reset_net(net)
        eager = torch.stack([net(x[t]) for t in range(8)])
        functional.reset_net(net)
        counter = CompileCounterWithBackend('aot_eager')
        compiled = torch.compile(net, backend=counter, fullgraph=True)
        out = torch.stack([compiled(x[t]) for t in range(8)])
        torch.testing.assert_close(out, eager, **TOL)
        frames = counter.frame_count
        assert frames <= 2, f'{frames} graphs for 8 steps'   # the first step (float state) and the rest
        functional.reset_net(net)
        for t in range(8):
            compiled(x[t])
        assert counter.frame_count == frames, 'a second sequence recompiled'
    finally:
        torch._dynamo.reset()


# -- recycled output buffers of the cpp kernel -----------------------------------------------------
@needs_cpp
def test_outputs_recycled_only_when_nobody_holds_them():
    """Large outputs reuse a buffer only once no tensor, view, graph or NumPy array references
    the previous output; their values are always the new ones."""
    cpp.empty_cache()
    x = torch.randn(2, 1 << 18)   # s is 2 MiB, v_last 1 MiB: both pooled
    expected = CFNode(step_mode='m', backend='torch')(x)
    node = CFNode(step_mode='m')

    def run(inp=x):
        node.reset()
        with torch.no_grad():
            return node(inp)
    out = run()
    ptr = out.data_ptr()
    for hold in (lambda o: o, lambda o: o[1:], lambda o: o.numpy(), lambda o: o.view(-1)):
        holder = hold(out)
        del out
        out = run()
        assert out.data_ptr() != ptr, 'reused while still referenced'
        assert torch.equal(out, expected)
        ptr = out.data_ptr()
        del holder
    del out
    out = run()
    assert out.data_ptr() == ptr, 'a free buffer is recycled'
    assert torch.equal(out, expected)
    # an autograd graph that saved the output keeps it too
    w = torch.ones(1, requires_grad=True)
    node.reset()
    del out
    z = node(x) * w                      # MulBackward saves the output for w's gradient
    ptr = z.grad_fn._saved_self.data_ptr()
    assert run().data_ptr() != ptr
    del z
    assert run().data_ptr() == ptr
    assert cpp.pooled_bytes() >= 3 * (1 << 20)
    cpp.empty_cache()
    assert cpp.pooled_bytes() == 0


def test_eager_then_compiled_steps_compile_once_per_handed_over_count():
    """The documented cost of mixing: a compiled step after k eager ones compiles a graph for
    that count; a compiled sequence from reset_net reuses its two graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    try:
        node = CFNode()
        counter = CompileCounterWithBackend('aot_eager')
        compiled = torch.compile(node, backend=counter)
        x = torch.randn(4, 8)
        for _ in range(4):
            compiled(x)
        assert counter.frame_count == 2
        functional.reset_net(node)
        node(x)
        node(x)
        assert type(node.step_count) is int
        for _ in range(3):
            compiled(x)
        assert counter.frame_count == 3 and int(node.step_count) == 5
        functional.reset_net(node)
        for _ in range(4):
            compiled(x)
        assert counter.frame_count == 3
    finally:
        torch._dynamo.reset()


@needs_cpp
def test_plan_honours_the_backend_resolution(monkeypatch, full_calls):
    """The plan runs the backend the full step resolved, with the node's own key: a kernel that
    failed its first-use check (simulated here for cpp) stays unused on the lean steps too."""
    from spikingjelly_cf import backends
    keys = []

    def failing(name, device, dtype, kind, k_pos, k_neg, detach_reset):
        keys.append((name, kind, k_pos, k_neg, detach_reset))
        return 'simulated first-use failure' if name == 'cpp' else None
    monkeypatch.setattr(backends, 'first_use_check', failing)
    node = CFNode(k_pos=3, k_neg=1, detach_reset=True)
    xs = _inputs(5)
    launches = cpp.launch_count
    with pytest.warns(RuntimeWarning, match='simulated first-use failure'):
        outs = [node(x) for x in xs]
    assert cpp.launch_count == launches, 'cpp ran although its first-use check failed'
    assert len(full_calls) == 1, 'the reference plan ran the other steps'
    assert keys and set(keys) == {('cpp', 'rect', 3, 1, True)}
    s, _, _, _ = cf_multi_step_ref(xs, torch.zeros(3, 5), k_pos=3, k_neg=1, detach_reset=True)
    assert torch.equal(torch.stack(outs), s)


@needs_cpp
def test_deterministic_mode_change_reruns_the_full_step(full_calls):
    node = CFNode()
    xs = _inputs(4)
    node(xs[0])
    node(xs[1])
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        node(xs[2])
        node(xs[3])
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(full_calls) == 2
