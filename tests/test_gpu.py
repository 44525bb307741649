"""The GPU kernel backends ('cupy', 'triton', 'inductor') against the reference.

Each backend's tests skip without a CUDA device or when the backend is unavailable (no CuPy,
no Triton, no 'inductor' backend in this checkout). Half and bfloat16 kernels compute in float32
and round only their outputs, so they are compared with the float32 reference run on the same
(rounded) inputs: spikes exactly equal, values within the storage dtype's rounding. Where a
backend counts its launches, the tests assert that its kernels really ran.
"""
import importlib

import pytest
import torch
from spikingjelly.activation_based import surrogate as sj_surrogate

from spikingjelly_cf.functional.neuron import cf_multi_step, cf_multi_step_ref, cf_single_step
from spikingjelly_cf.surrogate import TSG, CFRect

GPU_BACKENDS = ['cupy', 'triton', 'inductor']


def gpu_backend(name):
    """``(multi-step function, backend module)``, or skip with the reason."""
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    try:
        module = importlib.import_module(f'spikingjelly_cf.backends.{name}')
    except ImportError as exc:
        pytest.skip(f'backend {name!r} is not in this checkout: {exc}')
    try:
        ok = module.available('cuda')
    except TypeError:  # available() without a device type
        ok = module.available()
    if not ok:
        try:
            reason = module.unavailable_reason('cuda')
        except TypeError:
            reason = module.unavailable_reason()
        pytest.skip(f'backend {name!r} unavailable: {reason}')
    if name == 'triton' and module.interpreted():
        module.use_interpreter(False)  # compiled kernels on the GPU
    return getattr(module, f'cf_multi_step_{name}'), module


def launches(module):
    return getattr(module, 'launch_count', None)


def assert_launched(module, before, count):
    """The backend's kernels ran ``count`` times since ``before`` (where it counts them)."""
    if before is not None:
        assert launches(module) == before + count, 'the kernel path did not run'


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


@pytest.mark.parametrize('backend', GPU_BACKENDS)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('sg_name', ['rect', 'tsg', 'sigmoid', 'atan'])
@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('N', [777, 1024])  # x.shape[1:] = (N, 3): several blocks, ragged
def test_matches_reference(backend, dtype, sg_name, config, N):
    if backend == 'inductor' and (N != 777 or config != CONFIGS[0]):
        pytest.skip('inductor: one shape and configuration (each compiles its own graphs)')
    fn, module = gpu_backend(backend)
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
    before = launches(module)
    outs_k, grads_k = run(fn, x, v, sg, kwargs, upstream)
    assert_launched(module, before, 2)  # sentinel: forward + backward kernels ran
    outs_r, grads_r = run(cf_multi_step_ref, x.float(), v.float(), sg, kwargs, upstream)
    for o in outs_k:
        assert o.dtype == dtype
    assert torch.equal(outs_k[0].float(), outs_r[0]), 'spikes differ'
    for name, a, b in zip(('v_last', 'h_seq', 'v_seq'), outs_k[1:], outs_r[1:]):
        close(a, b, dtype, name)
    for name, a, b in zip(('grad x', 'grad v', 'grad TSG p'), grads_k, grads_r):
        close(a, b, dtype, name)


def test_dispatcher_auto_order_on_cuda():
    """'auto' on CUDA: the first available backend of AUTO_ORDER['cuda'] (CuPy, then Triton)."""
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    from spikingjelly_cf import backends
    from spikingjelly_cf.functional.neuron import resolve_backend
    x = torch.randn(4, 100, device='cuda', requires_grad=True)
    expected = next((b for b in backends.AUTO_ORDER['cuda'] if backends.is_available(b)), 'torch')
    assert resolve_backend('auto', x, CFRect()) == expected
    if expected == 'torch':
        pytest.skip('no GPU kernel backend available')
    module = backends.module(expected)
    before = launches(module)
    s, v, _, _ = cf_multi_step(x, torch.zeros(100, device='cuda'))
    s.sum().backward()
    assert_launched(module, before, 2)


@pytest.mark.parametrize('backend', GPU_BACKENDS)
@pytest.mark.parametrize('dtype', DTYPES)
def test_multi_step_equals_single_steps(backend, dtype):
    gpu_backend(backend)
    T, N = 5, 333
    x = (torch.randn(T, N, device='cuda') * 1.5).to(dtype).requires_grad_(True)
    sg = make_surrogate('tsg', T)
    kwargs = dict(k_pos=2, k_neg=2, surrogate_function=sg)
    s_m, v_m, _, _ = cf_multi_step(x, torch.zeros(N, device='cuda', dtype=dtype),
                                   backend=backend, **kwargs)
    (s_m.float().sum() + v_m.float().sum()).backward()
    g_multi, p_multi = x.grad.clone(), sg.p.grad.clone()
    x.grad, sg.p.grad = None, None
    v = torch.zeros(N, device='cuda', dtype=dtype)
    spikes = []
    for t in range(T):
        s, v, _ = cf_single_step(x[t], v, t=t, backend=backend, **kwargs)
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


@pytest.mark.parametrize('backend', GPU_BACKENDS)
def test_autocast(backend):
    _, module = gpu_backend(backend)
    T, N = 4, 256
    layer = torch.nn.Linear(32, N).cuda()
    inp = torch.randn(T, 8, 32, device='cuda')
    before = launches(module)
    with torch.autocast('cuda', dtype=torch.float16):
        y = layer(inp)
        assert y.dtype == torch.float16
        s, v, _, _ = cf_multi_step(y, torch.zeros(8, N, device='cuda', dtype=y.dtype),
                                   backend=backend)
        loss = s.float().mean() + v.float().pow(2).mean()
    loss.backward()
    assert_launched(module, before, 2)
    assert s.dtype == torch.float16 and layer.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()
    s_r, _, _, _ = cf_multi_step_ref(y.detach().float(), torch.zeros(8, N, device='cuda'))
    assert torch.equal(s.float(), s_r)


@pytest.mark.parametrize('backend', GPU_BACKENDS)
def test_non_contiguous_input(backend):
    fn, _ = gpu_backend(backend)
    base = torch.randn(6, 40, 30, device='cuda') * 2
    x = base.transpose(1, 2)
    assert not x.is_contiguous()
    ones = {n: torch.ones_like(x).transpose(1, 2).contiguous().transpose(1, 2) if n != 'v'
            else torch.ones(30, 40, device='cuda') for n in ('s', 'v', 'h', 'vs')}
    outs_k, grads_k = run(fn, x, torch.zeros(30, 40, device='cuda'), CFRect(), {}, ones)
    outs_r, grads_r = run(cf_multi_step_ref, x, torch.zeros(30, 40, device='cuda'), CFRect(), {},
                          ones)
    assert torch.equal(outs_k[0], outs_r[0])
    close(grads_k[0], grads_r[0], torch.float32, 'grad x')


@pytest.mark.parametrize('backend', GPU_BACKENDS)
def test_no_fma_contraction(backend):
    """Inputs where a fused multiply-add in the charge would cross a level (csrc/cf_step.h's
    contract; for Triton this checks enable_fp_fusion=False on the real compiler)."""
    fn, _ = gpu_backend(backend)
    from fp_cases import fma_sensitive_cases
    for v0, x, theta in fma_sensitive_cases(count=16):
        xs, v = torch.tensor([[x]], device='cuda'), torch.tensor([v0], device='cuda')
        kwargs = dict(tau=3.0, v_threshold=theta, v_threshold_neg=-theta, k_pos=1, k_neg=1,
                      return_h_seq=True)
        s, _, h, _ = fn(xs, v, **kwargs)
        s_r, _, h_r, _ = cf_multi_step_ref(xs.cpu(), v.cpu(), **kwargs)
        assert s_r.item() == 0.0
        assert s.item() == 0.0 and h.item() == h_r.item(), (v0, x, theta, h.item(), h_r.item())


@pytest.mark.parametrize('backend', GPU_BACKENDS)
def test_tsg_gradient_deterministic(backend):
    fn, _ = gpu_backend(backend)
    x = (torch.randn(8, 3 * 1024 + 17, device='cuda') * 2).requires_grad_(True)
    sg = make_surrogate('tsg', 8)
    grads = []
    for _ in range(3):
        sg.p.grad = None
        s, v_last, _, _ = fn(x, torch.zeros(x.shape[1], device='cuda'), surrogate_function=sg)
        (s.sum() + v_last.sum()).backward()
        grads.append(sg.p.grad.clone())
    if backend == 'cupy':  # one atomicAdd per block: the last bits may vary
        for g in grads[1:]:
            close(g, grads[0], torch.float32, 'grad TSG p')
    else:
        assert all(torch.equal(g, grads[0]) for g in grads[1:])


@pytest.mark.parametrize('backend', ['cupy', 'triton'])
def test_torch_compile_fullgraph(backend):
    """The kernel ops are graph nodes under torch.compile(fullgraph=True) on CUDA."""
    _, module = gpu_backend(backend)
    from spikingjelly_cf import CFNode
    node = CFNode(step_mode='m', backend=backend, surrogate_function=make_surrogate('tsg', 4))
    x = torch.randn(4, 8, 100, device='cuda') * 2

    def step(x):
        node.reset()
        return node(x)

    explain = torch._dynamo.explain(step)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    before = launches(module)
    sc = compiled(xc)
    sc.sum().backward()
    assert_launched(module, before, 2)
    se = step(xe)
    se.sum().backward()
    assert torch.equal(sc, se)
    close(xc.grad, xe.grad, torch.float32, 'grad x')


@pytest.mark.parametrize('backend', GPU_BACKENDS)
def test_no_grad_stores_nothing(backend):
    fn, _ = gpu_backend(backend)
    x = torch.randn(3, 50, device='cuda')
    with torch.no_grad():
        s, v, h, vs = fn(x, torch.zeros(50, device='cuda'))
    assert h is None and vs is None and s.grad_fn is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
@pytest.mark.parametrize('backend', GPU_BACKENDS)
def test_second_device(backend):
    fn, _ = gpu_backend(backend)
    x = torch.randn(4, 100, device='cuda:1', requires_grad=True)
    s, v, _, _ = fn(x, torch.zeros(100, device='cuda:1'))
    s.sum().backward()
    s_r, _, _, _ = cf_multi_step_ref(x.detach(), torch.zeros(100, device='cuda:1'))
    assert s.device == x.grad.device == torch.device('cuda:1')
    assert torch.equal(s, s_r)


# -- the first-use check and deterministic mode on a real GPU (docs/guide/gpu_check.md) ----------
@pytest.mark.parametrize('backend', ['cupy', 'triton'])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kind', ['rect', 'tsg', 'sigmoid', 'atan'])
def test_first_use_check_passes(backend, dtype, kind):
    """The run-time-compiled kernels pass their own first-use check on this GPU (else 'auto'
    would never use them); the probe's time is printed (the one-time cost)."""
    gpu_backend(backend)
    from spikingjelly_cf import backends
    from spikingjelly_cf.backends import _probe
    device = torch.device('cuda', torch.cuda.current_device())
    verdict = backends.first_use_check(backend, device, dtype, kind, 2, 2, False)
    assert verdict == '', verdict
    entry = next(e for e in reversed(_probe.first_use_log()) if e['backend'] == backend
                 and e['dtype'] == str(dtype).replace('torch.', '') and e['kind'] == kind)
    print(f'first-use check {backend} {dtype} {kind}: {entry["seconds"]:.3f} s')


def test_cupy_tsg_under_deterministic_mode():
    """CuPy's TSG gradient (atomicAdd) raises under torch.use_deterministic_algorithms(True);
    'auto' uses Triton (deterministic) for TSG then, and CuPy still for the other surrogates."""
    gpu_backend('cupy')
    from spikingjelly_cf import backends
    from spikingjelly_cf.functional.neuron import resolve_backend
    x = torch.randn(8, 300, device='cuda', requires_grad=True)
    sg = make_surrogate('tsg', 8).cuda()
    torch.use_deterministic_algorithms(True)
    try:
        s, _, _, _ = cf_multi_step(x, torch.zeros(300, device='cuda'), surrogate_function=sg,
                                   backend='cupy')
        with pytest.raises(RuntimeError, match="backend='triton'"):
            s.sum().backward()
        expected = 'triton' if backends.is_available('triton') else 'torch'
        with pytest.warns() if expected == 'torch' else _nullcontext():
            assert resolve_backend('auto', x, sg) == expected
        if backends.AUTO_ORDER['cuda'][0] == 'cupy':
            assert resolve_backend('auto', x, CFRect()) == 'cupy'
    finally:
        torch.use_deterministic_algorithms(False)


def _nullcontext():
    import contextlib
    return contextlib.nullcontext()
