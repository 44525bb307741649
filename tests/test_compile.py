"""CF networks under torch.compile and torch.export (issue: compiler-native kernels).

The default backend on CPU float32 is the ``cpp`` kernel, a ``torch.library`` op: Dynamo traces
``CFNode`` (backend resolution, TSG step indexing, state) without a graph break, the compiled
network equals eager, and the step counter does not make Dynamo recompile per step.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, surrogate
from torch._dynamo.testing import CompileCounterWithBackend

from spikingjelly_cf import TSG, CFNode, CFRect
from spikingjelly_cf.backends import cpp, is_available

T, B, D_IN, D_HID = 4, 3, 6, 10

SURROGATES = {
    'rect': lambda: CFRect(),
    'tsg': lambda: TSG(T=T),
    'sigmoid': lambda: surrogate.Sigmoid(),
    'atan': lambda: surrogate.ATan(),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test counts its own compilations: no cache entries or dynamic-shape decisions
    left over from an earlier test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_net(sg: str, step_mode: str = 'm', seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(layer.Linear(D_IN, D_HID, step_mode=step_mode),
                         CFNode(step_mode=step_mode, surrogate_function=SURROGATES[sg]()),
                         layer.Linear(D_HID, 3, step_mode=step_mode))


def inputs(seed=1):
    return torch.randn(T, B, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def run(net, x, step_mode='m'):
    """Output and gradients (parameters incl. TSG's p, and the input) of one sample."""
    functional.reset_net(net)
    x = x.clone().requires_grad_()
    if step_mode == 'm':
        out = net(x)
    else:
        out = torch.stack([net(x[t]) for t in range(x.shape[0])])
    state = getattr(net, '_orig_mod', net)[1].v  # the CF layer's state after the last step
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    params = [p for p in net.parameters()]
    grads = torch.autograd.grad(loss, params + [x])
    return out.detach(), state.detach(), grads


def assert_same(eager, compiled):
    out_e, v_e, g_e = eager
    out_c, v_c, g_c = compiled
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_c, v_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('sg', list(SURROGATES))
def test_no_graph_breaks(sg):
    net = make_net(sg)
    functional.reset_net(net)
    explanation = torch._dynamo.explain(net)(inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.skipif(not is_available('cpp'), reason='the cpp extension is not built')
@pytest.mark.parametrize('sg, compiler', [('rect', 'inductor'), ('tsg', 'inductor'),
                                          ('sigmoid', 'aot_eager'), ('atan', 'aot_eager')])
def test_compiled_equals_eager_and_reset_does_not_recompile(sg, compiler):
    """fullgraph compile of the default backend (the cpp op): forward and backward equal eager,
    spikes exactly; a second sample after reset_net compiles nothing new."""
    net = make_net(sg)
    x = inputs()
    eager = run(net, x)
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    before = cpp.launch_count
    first = run(compiled, x)
    assert cpp.launch_count > before, 'the compiled graph ran the cpp kernel'
    assert_same(eager, first)
    frames = counter.frame_count
    second = run(compiled, inputs(seed=2))
    assert counter.frame_count == frames, 'a second sample after reset_net recompiled'
    assert_same(run(net, inputs(seed=2)), second)


@pytest.mark.skipif(not is_available('cpp'), reason='the cpp extension is not built')
def test_compiled_spikes_equal_exactly():
    torch.manual_seed(0)
    node = CFNode(step_mode='m', surrogate_function=TSG(T=T))
    x = torch.randn(T, 64) * 3
    compiled = torch.compile(node, backend='inductor', fullgraph=True)
    functional.reset_net(node)
    s_eager = node(x)
    functional.reset_net(node)
    s_comp = compiled(x)
    assert torch.equal(s_eager, s_comp)
    assert s_eager.abs().sum() > 0


@pytest.mark.parametrize('sg', ['rect', 'tsg'])
def test_single_step_loop_does_not_recompile_per_step(sg):
    """Step 0 (state still the float 0.) and step 1 (tensor state) compile; later steps and the
    next sample reuse those graphs."""
    net = make_net(sg, step_mode='s')
    x = inputs()
    eager = run(net, x, step_mode='s')
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    first = run(compiled, x, step_mode='s')
    assert_same(eager, first)
    assert counter.frame_count <= 2, f'{counter.frame_count} graphs for {T} steps'
    frames = counter.frame_count
    run(compiled, inputs(seed=2), step_mode='s')
    assert counter.frame_count == frames


def test_compiled_tsg_too_long_sequence_fails_clearly():
    node = CFNode(step_mode='s', surrogate_function=TSG(T=2))
    compiled = torch.compile(node, backend='aot_eager', fullgraph=True)
    x = torch.randn(4)
    compiled(x)
    compiled(x)
    with pytest.raises(RuntimeError, match='TSG has T=2'):
        compiled(x)


@pytest.mark.parametrize('sg', ['rect', 'tsg'])
def test_export(sg):
    """torch.export of an eval-mode CF network: the CF op is a graph node, outputs equal eager."""
    net = make_net(sg).eval()
    x = inputs()
    functional.reset_net(net)
    with torch.no_grad():
        program = torch.export.export(net, (x,))
    assert net[1].step_count == 0 and isinstance(net[1].v, float), 'export left the state alone'
    targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    expected = 'spikingjelly_cf.cf_forward_cpp.default' if is_available('cpp') else None
    if expected:
        assert expected in targets, targets
    functional.reset_net(net)
    with torch.no_grad():
        eager = net(x)
        exported = program.module()(x)
    assert torch.equal(eager, exported)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('sg', ['rect', 'tsg'])
def test_cuda_compiled_equals_eager(sg):
    """The same on CUDA with the default backend (cupy, else the reference)."""
    net = make_net(sg).cuda()
    x = inputs().cuda()
    eager = run(net, x)
    counter = CompileCounterWithBackend('inductor')
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    assert_same(eager, run(compiled, x))
    frames = counter.frame_count
    run(compiled, inputs(seed=2).cuda())
    assert counter.frame_count == frames
    functional.reset_net(net)
    assert torch._dynamo.explain(net)(x).graph_break_count == 0


@pytest.mark.skipif(not is_available('cpp'), reason='the cpp extension is not built')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_channels_last_conv_net_compiles_without_breaks(dtype):
    """A channels_last Conv2d + CFNode (+ conv) network under torch.compile(fullgraph=True): no
    graph break, the CF op in the graph, outputs and the CF layer's state with the layout and
    values of eager (half storage too: the kernel's bfloat16 path)."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(3, 4, 3, padding=1, step_mode='m'),
                        CFNode(step_mode='m', surrogate_function=TSG(T=T)),
                        layer.Conv2d(4, 2, 3, padding=1, step_mode='m'))
    net = net.to(dtype=dtype, memory_format=torch.channels_last)
    x = (torch.randn(T, B, 3, 6, 6) * 2).to(dtype)
    functional.reset_net(net)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    functional.reset_net(net)
    eager = net(x)
    v_eager = net[1].v
    assert v_eager.stride() == v_eager.contiguous(memory_format=torch.channels_last).stride()
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)
    functional.reset_net(net)
    before = cpp.launch_count
    out = compiled(x)
    assert cpp.launch_count == before + 1, 'the compiled graph ran the cpp kernel'
    assert torch.equal(out, eager)
    assert net[1].v.stride() == v_eager.stride() and torch.equal(net[1].v, v_eager)
