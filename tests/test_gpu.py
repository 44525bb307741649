"""The CuPy CUDA backend against the reference (skipped without a CUDA device and CuPy).

Half and bfloat16 kernels compute in float32 and round only their outputs, so they are compared
with the float32 reference run on the same (rounded) inputs: spikes exactly equal, values within
the storage dtype's rounding.
"""
import pytest
import torch
from spikingjelly.activation_based import surrogate as sj_surrogate

from spikingjelly_cf.backends import cupy as cupy_backend
from spikingjelly_cf.functional.neuron import cf_multi_step, cf_multi_step_ref, cf_single_step
from spikingjelly_cf.surrogate import TSG, CFRect

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cupy_backend.available()),
    reason=f'needs a CUDA device and CuPy: {cupy_backend.unavailable_reason() or "no CUDA"}')

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: (rtol, atol relative to the largest reference value) per storage dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CONFIGS = [  # k_pos, k_neg, decay_input, detach_reset, theta_p, theta_n
    (2, 2, False, False, 1.0, -1.0),
    (1, 0, True, False, 0.8, -0.8),
    (3, 1, False, True, 0.6, -1.1),
    (5, 5, True, False, 0.5, -0.5),
]


def make_surrogate(name, T):
    if name == 'rect':
        return CFRect(alpha=1.0)
    if name == 'tsg':
        sg = TSG(T=T + 2)
        with torch.no_grad():
            sg.p.copy_(torch.linspace(-1.0, 1.0, T + 2))
        return sg.cuda()
    if name == 'sigmoid':
        return sj_surrogate.Sigmoid(alpha=4.0)
    return sj_surrogate.ATan(alpha=2.0)


def run(fn, x, v, sg, kwargs, upstream):
    x = x.detach().clone().requires_grad_(True)
    v = v.detach().clone().requires_grad_(True)
    for p in sg.parameters():
        p.grad = None
    s, v_last, h, v_seq = fn(x, v, surrogate_function=sg, return_h_seq=True, return_v_seq=True,
                             **kwargs)
    # float32 products: the gradient reaching each output is upstream cast to its dtype
    loss = ((s.float() * upstream['s']).sum() + (v_last.float() * upstream['v']).sum()
            + (h.float() * upstream['h']).sum() + (v_seq.float() * upstream['vs']).sum())
    loss.backward()
    return [s, v_last, h, v_seq], [x.grad, v.grad] + [p.grad for p in sg.parameters()]


def close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f'{what} ({dtype}): {m}')


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('sg_name', ['rect', 'tsg', 'sigmoid', 'atan'])
@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('N', [777, 1024])
def test_cupy_matches_reference(dtype, sg_name, config, N):
    k_pos, k_neg, decay_input, detach_reset, theta_p, theta_n = config
    T = 6
    gen = torch.Generator(device='cuda').manual_seed(1234)
    x = (torch.randn(T, N, 3, device='cuda', generator=gen) * 1.5).to(dtype)
    v = torch.randn(N, 3, device='cuda', generator=gen).to(dtype)
    # incoming gradients rounded to the storage dtype, so both sides see the same values
    upstream = {name: torch.randn(shape, device='cuda', generator=gen).to(dtype).float()
                for name, shape in (('s', x.shape), ('v', v.shape), ('h', x.shape),
                                    ('vs', x.shape))}
    kwargs = dict(tau=1.5, decay_input=decay_input, v_threshold=theta_p,
                  v_threshold_neg=theta_n, k_pos=k_pos, k_neg=k_neg, detach_reset=detach_reset,
                  t_start=1)
    sg = make_surrogate(sg_name, T)
    before = cupy_backend.launch_count
    outs_k, grads_k = run(cupy_backend.cf_multi_step_cupy, x, v, sg, kwargs, upstream)
    assert cupy_backend.launch_count == before + 2  # sentinel: forward + backward kernels ran
    outs_r, grads_r = run(cf_multi_step_ref, x.float(), v.float(), sg, kwargs, upstream)
    for o in outs_k:
        assert o.dtype == dtype
    assert torch.equal(outs_k[0].float(), outs_r[0]), 'spikes differ'
    for name, a, b in zip(('v_last', 'h_seq', 'v_seq'), outs_k[1:], outs_r[1:]):
        close(a, b, dtype, name)
    for name, a, b in zip(('grad x', 'grad v', 'grad TSG p'), grads_k, grads_r):
        close(a, b, dtype, name)


def test_dispatcher_uses_cupy_on_cuda():
    x = torch.randn(4, 100, device='cuda', requires_grad=True)
    before = cupy_backend.launch_count
    s, v, _, _ = cf_multi_step(x, torch.zeros(100, device='cuda'))
    s.sum().backward()
    assert cupy_backend.launch_count == before + 2
    assert any(key[1:] == ('float32', 'rect') for key in cupy_backend._kernels)


@pytest.mark.parametrize('dtype', DTYPES)
def test_multi_step_equals_single_steps(dtype):
    T, N = 5, 333
    x = (torch.randn(T, N, device='cuda') * 1.5).to(dtype).requires_grad_(True)
    sg = make_surrogate('tsg', T)
    kwargs = dict(k_pos=2, k_neg=2, surrogate_function=sg)
    s_m, v_m, _, _ = cf_multi_step(x, torch.zeros(N, device='cuda', dtype=dtype),
                                   backend='cupy', **kwargs)
    (s_m.float().sum() + v_m.float().sum()).backward()
    g_multi, p_multi = x.grad.clone(), sg.p.grad.clone()
    x.grad, sg.p.grad = None, None
    v = torch.zeros(N, device='cuda', dtype=dtype)
    spikes = []
    for t in range(T):
        s, v, _ = cf_single_step(x[t], v, t=t, backend='cupy', **kwargs)
        spikes.append(s)
    s_s = torch.stack(spikes)
    (s_s.float().sum() + v.float().sum()).backward()
    # single steps round the carried v to the storage dtype between calls; float32 is exact
    if dtype == torch.float32:
        assert torch.equal(s_m, s_s)
        close(x.grad, g_multi, dtype, 'grad x')
        close(sg.p.grad, p_multi, dtype, 'grad TSG p')
    else:
        assert (s_m != s_s).float().mean().item() < 0.02


def test_autocast():
    T, N = 4, 256
    layer = torch.nn.Linear(32, N).cuda()
    inp = torch.randn(T, 8, 32, device='cuda')
    before = cupy_backend.launch_count
    with torch.autocast('cuda', dtype=torch.float16):
        y = layer(inp)
        assert y.dtype == torch.float16
        s, v, _, _ = cf_multi_step(y, torch.zeros(8, N, device='cuda', dtype=y.dtype))
        loss = s.float().mean() + v.float().pow(2).mean()
    loss.backward()
    assert cupy_backend.launch_count == before + 2
    assert s.dtype == torch.float16 and layer.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()
    s_r, _, _, _ = cf_multi_step_ref(y.detach().float(), torch.zeros(8, N, device='cuda'))
    assert torch.equal(s.float(), s_r)


def test_non_contiguous_input():
    base = torch.randn(6, 40, 30, device='cuda') * 2
    x = base.transpose(1, 2)
    assert not x.is_contiguous()
    outs_k, grads_k = run(cupy_backend.cf_multi_step_cupy, x, torch.zeros(30, 40, device='cuda'),
                          CFRect(), {}, {n: torch.ones_like(x) if n != 'v' else
                                         torch.ones(30, 40, device='cuda')
                                         for n in ('s', 'v', 'h', 'vs')})
    outs_r, grads_r = run(cf_multi_step_ref, x, torch.zeros(30, 40, device='cuda'), CFRect(), {},
                          {n: torch.ones_like(x) if n != 'v' else torch.ones(30, 40, device='cuda')
                           for n in ('s', 'v', 'h', 'vs')})
    assert torch.equal(outs_k[0], outs_r[0])
    close(grads_k[0], grads_r[0], torch.float32, 'grad x')


def test_no_grad_stores_nothing():
    x = torch.randn(3, 50, device='cuda')
    with torch.no_grad():
        s, v, h, vs = cupy_backend.cf_multi_step_cupy(x, torch.zeros(50, device='cuda'))
    assert h is None and vs is None and s.grad_fn is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_second_device():
    x = torch.randn(4, 100, device='cuda:1', requires_grad=True)
    s, v, _, _ = cupy_backend.cf_multi_step_cupy(x, torch.zeros(100, device='cuda:1'))
    s.sum().backward()
    s_r, _, _, _ = cf_multi_step_ref(x.detach(), torch.zeros(100, device='cuda:1'))
    assert s.device == x.grad.device == torch.device('cuda:1')
    assert torch.equal(s, s_r)
