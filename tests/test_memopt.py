"""SpikingJelly 2.0's memopt (checkpointing + spike compression) on CF networks.

Gradients with checkpointing must equal those without (the recomputation restores ``v`` and
TSG's step count); SpikingJelly's binary compressors corrupt signed CF spikes, so ours refuses
them and offers a lossless int8 compressor.
"""
import pytest
import torch
import torch.nn as nn

from spikingjelly_cf import CFNode, _compat
from spikingjelly_cf.memopt import (GuardedCompressor, SignedInt8SpikeCompressor,
                                    guard_compressor)
from spikingjelly_cf.surrogate import TSG

sj_memopt = pytest.importorskip('spikingjelly.activation_based.memopt',
                                reason='memopt needs SpikingJelly >= 2.0')
if _compat.CLASSIC:  # pragma: no cover - importorskip already skipped
    pytest.skip('memopt needs SpikingJelly >= 2.0', allow_module_level=True)

from spikingjelly.activation_based import functional  # noqa: E402

from spikingjelly_cf import memopt as cf_memopt  # noqa: E402

T, B, N = 8, 3, 12


def make_net(seed=0):
    """Linear -> CF(TSG) -> [Linear -> CF] -> Linear: the bracket is what gets checkpointed; its
    first input is the signed spikes of the first CF layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N, N),
        CFNode(step_mode='m', surrogate_function=TSG(T=T)),
        nn.Sequential(nn.Linear(N, N), CFNode(step_mode='m', surrogate_function=TSG(T=T))),
        nn.Linear(N, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, B, N, generator=g) * 2.0


def run(net, x, steps=1):
    """Output and parameter gradients (in module order, names without the wrapper prefix)."""
    for p in net.parameters():
        p.grad = None
    out = []
    functional.reset_net(net)
    for _ in range(steps):  # several calls without reset: v and step_count carry over
        out.append(net(x[: T // steps] if steps > 1 else x))
    torch.stack(out).square().sum().backward()
    grads = {name.replace('_checkpoint_wrapped_module.', ''): p.grad.clone()
             for name, p in net.named_parameters()}
    return torch.stack(out).detach(), grads


def assert_same(a, b, exact=True):
    (out_a, g_a), (out_b, g_b) = a, b
    assert torch.equal(out_a, out_b)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        if exact:  # the recomputation runs the same ops on the same inputs: bit-identical
            assert torch.equal(g_a[k], g_b[k]), k
        else:  # temporal chunks sum the weight gradient in another order: float32 rounding
            torch.testing.assert_close(g_a[k], g_b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_cf_spikes_are_signed_multilevel():
    net = make_net()
    functional.reset_net(net)
    s = net[1](net[0](data()))
    values = set(torch.unique(s).tolist())
    assert {-2.0, -1.0, 1.0, 2.0} <= values  # what the binary compressors cannot hold


@pytest.mark.parametrize('chunks', [1, 2])
@pytest.mark.parametrize('compressor', [None, 'int8'])
def test_checkpoint_module_same_gradients(chunks, compressor):
    x = data()
    ref = run(make_net(), x)
    net = make_net()
    comp = SignedInt8SpikeCompressor() if compressor == 'int8' else None
    net[2] = cf_memopt.checkpoint_module(net[2], compressor=comp, chunks=chunks)
    assert_same(run(net, x), ref, exact=chunks == 1)
    # SpikingJelly's own checkpoint_module with our compressor plugged in: same
    net = make_net()
    net[2] = sj_memopt.checkpoint_module(net[2], compressor=comp, chunks=chunks)
    assert_same(run(net, x), ref, exact=chunks == 1)


def test_checkpoint_restores_state_across_calls():
    """Two calls without reset: the second starts from v and step_count of the first, also in
    the recomputation (TSG uses a_t at the continued step index)."""
    x = data()
    ref = run(make_net(), x, steps=2)
    net = make_net()
    net[2] = cf_memopt.checkpoint_module(net[2], compressor=SignedInt8SpikeCompressor())
    assert_same(run(net, x, steps=2), ref)


@pytest.mark.parametrize('name', ['BitSpikeCompressor', 'BooleanSpikeCompressor',
                                  'Uint8SpikeCompressor', 'SparseSpikeCompressor'])
def test_binary_compressors_corrupt_cf_spikes_and_are_refused(name):
    x = data()
    ref = run(make_net(), x)
    # unguarded: SpikingJelly's compressor silently changes the result (why the guard exists)
    net = make_net()
    net[2] = sj_memopt.checkpoint_module(net[2], compressor=getattr(sj_memopt, name)())
    out, grads = run(net, x)
    assert not (torch.equal(out, ref[0]) and all(torch.equal(grads[k], ref[1][k]) for k in grads))
    # guarded: a clear error naming the signed alternative
    net = make_net()
    net[2] = cf_memopt.checkpoint_module(net[2], compressor=getattr(sj_memopt, name)())
    with pytest.raises(ValueError, match=f'{name}.*SignedInt8SpikeCompressor'):
        run(net, x)


def test_guard_passes_binary_spikes_unchanged():
    """On binary spikes the guarded binary compressors stay lossless and usable."""
    x = (torch.rand(T, B, N) > 0.5).float()
    for name in ('BitSpikeCompressor', 'BooleanSpikeCompressor', 'Uint8SpikeCompressor'):
        c = guard_compressor(getattr(sj_memopt, name)())
        assert isinstance(c, GuardedCompressor)
        assert torch.equal(c.decompress(c.compress(x)), x)


def test_optimize_memory_guards_its_bit_compressor():
    """optimize_memory picks BitSpikeCompressor when the example input is binary; CF spikes that
    are signed later must raise, not corrupt."""
    class Block(nn.Sequential):  # the target type (the root itself must not be one)
        pass

    net = nn.Sequential(nn.Linear(N, N), CFNode(step_mode='m'),
                        Block(nn.Linear(N, N), CFNode(step_mode='m')), nn.Linear(N, 3))
    quiet = torch.full((T, B, N), 0.1)  # first layer input ~0: spikes 0 only -> "binary"
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(1.2)  # every first-layer neuron fires exactly +1: binary
    net = cf_memopt.optimize_memory(net, (Block,), lambda m: m(quiet), level=1)
    wrapper = net[2]
    comp = wrapper.checkpoint_fn.keywords['compressor']
    assert isinstance(comp, GuardedCompressor)
    assert isinstance(comp.compressor, sj_memopt.BitSpikeCompressor)
    functional.reset_net(net)
    net(quiet).sum().backward()  # binary spikes still work
    with torch.no_grad():
        net[0].bias.fill_(-1.2)  # now -1 spikes
    functional.reset_net(net)
    with pytest.raises(ValueError, match='SignedInt8SpikeCompressor'):
        net(quiet).sum().backward()


def test_signed_int8_compressor():
    c = SignedInt8SpikeCompressor()
    assert isinstance(c, sj_memopt.SpikeCompressor)
    x = torch.tensor([[-128., -2., 0.], [1., 2., 127.]], dtype=torch.float16)
    packed = c.compress(x)
    assert packed[0].dtype == torch.int8 and packed[0].element_size() == 1
    y = c.decompress(packed)
    assert y.dtype == x.dtype and y.shape == x.shape and torch.equal(y, x)
    for bad in (torch.tensor([0.5]), torch.tensor([128.]), torch.tensor([-129.])):
        with pytest.raises(ValueError, match='integer spikes in \\[-128, 127\\]'):
            c.compress(bad)
    assert SignedInt8SpikeCompressor(check=False).compress(torch.tensor([0.5]))[0].item() == 0
    with pytest.raises(TypeError, match='check'):
        SignedInt8SpikeCompressor(check=1)
    with pytest.raises(TypeError, match='compressor'):
        GuardedCompressor(object())
