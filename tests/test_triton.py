"""The Triton backend against the reference, executed by Triton's interpreter on CPU tensors.

Without a GPU, Triton's interpreter (``TRITON_INTERPRET=1``) runs the ``@triton.jit`` kernels
on CPU tensors with NumPy semantics: the kernels' indexing, masks, time loops, per-program
reductions and dtype conversions all run here, in CI. ``@triton.jit`` reads ``TRITON_INTERPRET``
when it decorates a kernel, so instead of setting the variable for the whole pytest process
(which would also turn the Triton kernels of TorchInductor or SpikingJelly 2.0 into interpreted
ones, and break a GPU run of the whole suite) a module fixture reloads *this backend's* kernels
in the interpreter (``triton_backend.use_interpreter(True)``, which sets the variable only while
the kernels' module is imported) and restores the default afterwards.

Triton ships with PyTorch's CUDA wheels, so a missing Triton FAILS these tests; set
``SPIKINGJELLY_CF_ALLOW_NO_TRITON=1`` to skip them instead. Float32 spikes must be bit-equal to
the reference (csrc/cf_step.h's rounding sequence); states and gradients agree to 1e-5.
float16/bfloat16 storage is compared with the float32 reference on the rounded inputs: spikes and
every forward output exactly equal to the reference rounded once, gradients within one rounding.
"""
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based import surrogate as sj_surrogate

from spikingjelly_cf import CFNode
from spikingjelly_cf import backends
from spikingjelly_cf.backends import triton as tb
from spikingjelly_cf.functional.neuron import (cf_multi_step, cf_multi_step_ref, cf_single_step,
                                               resolve_backend)
from spikingjelly_cf.surrogate import TSG, CFRect
from fp_cases import fma_sensitive_cases
from test_kernels_cpu import assert_close, configs, make_surrogate  # the cpp kernel's grid

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

pytestmark = [pytest.mark.filterwarnings(  # NumPy in the interpreter: exp overflow to inf etc.
    'ignore:overflow encountered:RuntimeWarning', 'ignore:invalid value encountered:RuntimeWarning')]


@pytest.fixture(scope='module', autouse=True)
def interpreter():
    if importlib.util.find_spec('triton') is None:
        message = 'Triton is not installed'
        if os.environ.get('SPIKINGJELLY_CF_ALLOW_NO_TRITON', '') not in ('', '0'):
            pytest.skip(message)
        pytest.fail(message + ' (set SPIKINGJELLY_CF_ALLOW_NO_TRITON=1 to skip)')
    block = tb.BLOCK
    assert tb.use_interpreter(True), tb.unavailable_reason()
    assert tb.interpreted()
    yield
    tb.BLOCK = block
    tb.use_interpreter(None)


def run(fn, x, v, sg, kwargs, upstream):
    """Forward, then the shared upstream gradients (float32 products) into every output."""
    x = x.detach().clone().requires_grad_(True)
    v = v.detach().clone().requires_grad_(True)
    for p in sg.parameters():
        p.grad = None
    s, v_last, h, v_seq = fn(x, v, surrogate_function=sg, **kwargs)
    loss = (s.float() * upstream['s']).sum()
    if upstream.get('v_last') is not None:
        loss = loss + (v_last.float() * upstream['v_last']).sum()
    if h is not None and upstream.get('h') is not None:
        loss = loss + (h.float() * upstream['h']).sum()
    if v_seq is not None and upstream.get('v_seq') is not None:
        loss = loss + (v_seq.float() * upstream['v_seq']).sum()
    loss.backward()
    return (s, v_last, h, v_seq), [x.grad, v.grad] + [p.grad for p in sg.parameters()]


def compare(x, v, sg, kwargs, upstream, dtype=torch.float32):
    """The Triton kernel on ``x.to(dtype)`` against the float32 reference on the same values."""
    x, v = x.to(dtype), v.to(dtype)
    upstream = {k: (None if u is None else u.to(dtype).float()) for k, u in upstream.items()}
    before = tb.launch_count
    outs_k, grads_k = run(tb.cf_multi_step_triton, x, v, sg, kwargs, upstream)
    assert tb.launch_count == before + (2 if x.numel() else 0), 'forward + backward kernels ran'
    outs_r, grads_r = run(cf_multi_step_ref, x.float(), v.float(), sg, kwargs, upstream)
    s_k, s_r = outs_k[0], outs_r[0]
    assert s_k.dtype == dtype and s_k.shape == x.shape
    assert torch.equal(s_k.float(), s_r), \
        f'spikes differ at {(s_k.float() != s_r).nonzero()[:5].tolist()}'
    for name, a, b in zip(('v_last', 'h_seq', 'v_seq'), outs_k[1:], outs_r[1:]):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == dtype, name
        if dtype == torch.float32:
            assert_close(a, b, name)
        else:  # float32 arithmetic as in the reference, rounded once at the output
            assert torch.equal(a, b.to(dtype)), f'{name}: not the reference rounded to {dtype}'
    for name, a, b in zip(('grad x_seq', 'grad v', 'grad TSG p'), grads_k, grads_r):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if dtype == torch.float32 or name == 'grad TSG p':  # a_t's gradient is float32 always
            assert_close(a.float(), b, name)
        else:  # float32 in the kernel, rounded once to the storage dtype: one rounding apart
            eps = torch.finfo(dtype).eps
            scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
            torch.testing.assert_close(a.float(), b, rtol=eps, atol=eps * scale,
                                       msg=lambda m: f'{name} ({dtype}): {m}')


def random_case(cfg, dtype=torch.float32):
    gen = torch.Generator().manual_seed(cfg['seed'])
    T, tail = cfg['T'], cfg['tail']
    x = torch.randn((T,) + tail, generator=gen) * cfg['scale']
    v = torch.randn(tail, generator=gen) * cfg['v0_scale']
    upstream = {'s': torch.randn((T,) + tail, generator=gen)}
    for name, shape in (('v_last', tail), ('h', (T,) + tail), ('v_seq', (T,) + tail)):
        upstream[name] = torch.randn(shape, generator=gen) if cfg['grads'][name] else None
    sg = make_surrogate(cfg['sg_name'], cfg['alpha'], cfg['tsg_steps'])
    return x, v, sg, upstream


# The cpp kernel's hypothesis grid (T 1..6, odd/even N, thresholds, K_P 1..4, K_N 0..4, both
# charge modes, detach_reset, every surrogate, TSG t_start, optional outputs and incoming
# gradients), plus the storage dtype and the block size (several programs, ragged last block).
@settings(max_examples=int(os.environ.get('SPIKINGJELLY_CF_TRITON_EXAMPLES', 40)),
          derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.sampled_from(DTYPES), st.sampled_from([16, 32, 1024]))
def test_triton_matches_reference(cfg, dtype, block):
    tb.BLOCK = block
    x, v, sg, upstream = random_case(cfg)
    compare(x, v, sg, cfg['kwargs'], upstream, dtype)


@pytest.mark.parametrize('sg_name', ['rect', 'tsg', 'sigmoid', 'atan'])
@pytest.mark.parametrize('k_pos,k_neg', [(2, 2), (1, 0), (3, 1)])
def test_many_programs_ragged_block(sg_name, k_pos, k_neg):
    """N = 3 blocks + 5: four programs, the last one masked; TSG's partial sums of all four."""
    tb.BLOCK = 16
    T, N = 4, 3 * 16 + 5
    x = torch.randn(T, N) * 2
    upstream = {'s': torch.randn(T, N), 'v_last': torch.randn(N), 'h': torch.randn(T, N),
                'v_seq': torch.randn(T, N)}
    kwargs = dict(tau=2.0, decay_input=True, v_threshold=0.7, v_threshold_neg=-0.9, k_pos=k_pos,
                  k_neg=k_neg, detach_reset=False, t_start=0, return_h_seq=True,
                  return_v_seq=True)
    compare(x, torch.randn(N), make_surrogate(sg_name, None, T), kwargs, upstream)


@pytest.mark.parametrize('theta_p,theta_n', [(0.5, -0.85), (1.0, -0.6), (4.0, -6.8)])
@pytest.mark.parametrize('alpha', [None, 0.7])
def test_rect_heights_at_several_thresholds(theta_p, theta_n, alpha):
    """CFRect's default height 1/theta per side (docs/method.md, section 2) and an explicit one,
    asymmetric thresholds from 0.5 to 6.8."""
    tb.BLOCK = 32
    T, N = 5, 70
    scale = max(theta_p, -theta_n)
    x = torch.randn(T, N) * 1.5 * scale
    upstream = {'s': torch.randn(T, N), 'v_last': torch.randn(N), 'h': torch.randn(T, N),
                'v_seq': torch.randn(T, N)}
    kwargs = dict(tau=1.7, v_threshold=theta_p, v_threshold_neg=theta_n, k_pos=2, k_neg=2,
                  return_h_seq=True, return_v_seq=True)
    compare(x, torch.randn(N) * 0.3 * scale, CFRect(alpha=alpha), kwargs, upstream)


@pytest.mark.parametrize('dtype', DTYPES)
def test_storage_dtypes_all_outputs(dtype):
    """Every output and incoming gradient in half/bfloat16; TSG with distinct a_t."""
    tb.BLOCK = 32
    T, N = 5, 77
    x = torch.randn(T, N) * 1.5
    upstream = {'s': torch.randn(T, N), 'v_last': torch.randn(N), 'h': torch.randn(T, N),
                'v_seq': torch.randn(T, N)}
    kwargs = dict(tau=1.5, decay_input=False, v_threshold=0.8, v_threshold_neg=-0.6, k_pos=3,
                  k_neg=2, detach_reset=False, t_start=1, return_h_seq=True, return_v_seq=True)
    compare(x, torch.randn(N), make_surrogate('tsg', 1.0, T + 1), kwargs, upstream, dtype)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_storage_rounding_is_pytorchs(dtype):
    """float32 -> half/bfloat16 stores round to nearest even exactly like PyTorch (Triton's
    interpreter casts float32 to bfloat16 by truncation, so the kernel rounds with integer bit
    operations): ties both ways, carries, overflow to infinity, NaN, subnormals, signed zeros."""
    tb.BLOCK = 64
    eps, big = torch.finfo(dtype).eps, torch.finfo(dtype).max
    # h = k v + x with k = 0.5 (tau = 2): pairs (v, x) whose h is a tie, a carry, an overflow...
    pairs = [(eps, 1.0), (eps, 1.0 + eps), (-eps, -1.0), (-eps, -1.0 - eps), (eps, 2 - eps),
             (big, big), (-big, -big), (0.0, float('nan')), (-0.0, -0.0), (0.0, -0.0),
             (2 * torch.finfo(dtype).tiny, 0.0), (3 * torch.finfo(dtype).smallest_normal, -0.0)]
    gen = torch.Generator().manual_seed(5)
    decades = 4 if dtype == torch.float16 else 30  # float16 subnormals below 6e-5
    rand = (torch.randn(2, 300, generator=gen) * torch.logspace(-7, decades, 300)).to(dtype)
    v = torch.cat([torch.tensor([p[0] for p in pairs]).to(dtype), rand[0]])
    x = torch.cat([torch.tensor([p[1] for p in pairs]).to(dtype), rand[1]])
    N = x.numel()
    top = torch.finfo(torch.float32).max  # levels at +-max: v = h for every h, inf included
    s, v_last, h, v_seq = tb.forward_impl(x.view(1, N), v, torch.ones(1), 0, 0.5, 1.0, top, -top,
                                          1, 1, True, True, True)
    assert h.dtype == torch.float32 and v_seq.dtype == dtype
    h_ref = 0.5 * v.float() + x.float()  # float32, exact here (0.5 v is exact)
    assert torch.equal(h[0].isnan(), h_ref.isnan())
    assert torch.equal(h[0].nan_to_num(), h_ref.nan_to_num())
    _, _, _, v_ref = cf_multi_step_ref(x.float().view(1, N), v.float(), tau=2.0, v_threshold=top,
                                       v_threshold_neg=-top, k_pos=1, k_neg=1, return_v_seq=True)
    expected = v_ref[0].to(dtype)  # PyTorch's rounding of the float32 v (= h, signed zeros aside)
    itype = torch.int16
    same = (v_seq[0].view(itype) == expected.view(itype)) | (expected.isnan() & v_seq[0].isnan())
    assert same.all(), (h_ref[~same][:4].tolist(), v_seq[0][~same][:4].tolist(),
                        expected[~same][:4].tolist())
    assert torch.equal(v_last.view(itype), v_seq[0].view(itype))
    if dtype == torch.bfloat16:  # PyTorch's canonical NaN
        assert (v_seq[0][h_ref.isnan()].view(itype) == 0x7FC0).all()


@pytest.mark.parametrize('sg_name', ['rect', 'tsg'])
def test_zero_neurons(sg_name):
    """N = 0: no launch, empty outputs of the right shapes, zero gradient for TSG's a_t."""
    x = torch.randn(3, 0, 4)
    upstream = {'s': torch.randn(3, 0, 4), 'v_last': torch.randn(0, 4), 'h': None, 'v_seq': None}
    kwargs = dict(return_h_seq=True, return_v_seq=True)
    compare(x, torch.zeros(0, 4), make_surrogate(sg_name, 1.0, 3), kwargs, upstream)


@pytest.mark.parametrize('dtype', DTYPES)
def test_one_step(dtype):
    tb.BLOCK = 16
    x = torch.randn(1, 40) * 2
    upstream = {'s': torch.randn(1, 40), 'v_last': torch.randn(40), 'h': torch.randn(1, 40),
                'v_seq': None}
    compare(x, torch.randn(40), make_surrogate('tsg', 1.0, 1), dict(return_h_seq=True), upstream,
            dtype)


@pytest.mark.parametrize('dtype', DTYPES)
def test_non_contiguous_input_and_incoming_gradients(dtype):
    tb.BLOCK = 32
    base = torch.randn(6, 5, 9) * 2
    x = base.transpose(1, 2)  # [T=6, 9, 5], not contiguous
    assert not x.is_contiguous()
    v = torch.randn(5, 9).t()
    upstream = {'s': torch.randn(6, 5, 9).transpose(1, 2), 'v_last': torch.randn(5, 9).t(),
                'h': torch.randn(9, 5, 6).permute(2, 0, 1), 'v_seq': torch.randn(1, 1, 5)
                .expand(6, 9, 5)}
    assert not any(u.is_contiguous() for u in upstream.values())
    kwargs = dict(return_h_seq=True, return_v_seq=True, k_pos=3, k_neg=1)
    compare(x, v, make_surrogate('tsg', 1.0, 6), kwargs, upstream, dtype)


@pytest.mark.parametrize('dtype', DTYPES)
def test_h_exactly_on_a_level(dtype):
    """Dyadic inputs put h exactly on levels: H(0) = 1 on both sides (docs/method.md, section 1)."""
    # tau = 2 (k = 0.5), thetas +-0.5: every h below is exact in every storage dtype
    x = torch.tensor([[1.0, 0.5, -0.5, -1.0, 0.25, 1.5, 0.0],
                      [0.0, 0.25, -0.25, 0.0, 0.375, -1.25, -0.5]])
    kwargs = dict(tau=2.0, v_threshold=0.5, v_threshold_neg=-0.5, k_pos=2, k_neg=2,
                  return_h_seq=True, return_v_seq=True)
    s, v_last, h, _ = tb.cf_multi_step_triton(x.to(dtype), torch.zeros(7, dtype=dtype), **kwargs)
    # step 1: h = x; on the levels 1.0 (2 spikes), 0.5 (1), -0.5 (-1), -1.0 (-2)
    assert s[0].float().tolist() == [2.0, 1.0, -1.0, -2.0, 0.0, 2.0, 0.0]
    # step 2: v_1 = [0, 0, 0, 0, 0.25, 0.5, 0] -> h = 0.5 v_1 + x = [0, .25, -.25, 0, .5, -1, -.5]
    assert h[1].float().tolist() == [0.0, 0.25, -0.25, 0.0, 0.5, -1.0, -0.5]
    assert s[1].float().tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, -2.0, -1.0]
    upstream = {'s': torch.randn(2, 7), 'v_last': torch.randn(7), 'h': torch.randn(2, 7),
                'v_seq': torch.randn(2, 7)}
    for sg_name in ('rect', 'tsg', 'sigmoid', 'atan'):  # gradients at the window edges too
        compare(x, torch.zeros(7), make_surrogate(sg_name, 1.0, 2), kwargs, upstream, dtype)


def test_levels_rounded_from_double():
    """Level j is float32(j * theta) with the product in double (cf_level), not the float32
    product j * float32(theta): h placed exactly on the double-rounded level fires it."""
    import numpy as np
    rng = np.random.default_rng(1)
    cases = []
    while len(cases) < 4:
        theta, j = float(rng.uniform(0.25, 2.0)), int(rng.integers(2, 5))
        exact = np.float32(j * theta)
        if np.float32(j * np.float32(theta)) > exact:  # float32 product: level too high
            cases.append((theta, j, float(exact)))
    for theta, j, level in cases:
        x = torch.tensor([[level]])  # v0 = 0: h = x, exactly on level j
        kwargs = dict(v_threshold=theta, k_pos=j, k_neg=0, return_h_seq=True)
        s, _, h, _ = tb.cf_multi_step_triton(x, torch.zeros(1), **kwargs)
        s_r, _, _, _ = cf_multi_step_ref(x, torch.zeros(1), **kwargs)
        assert h.item() == level and s_r.item() == j
        assert s.item() == j, (theta, j, level)


def test_no_fma_contraction():
    """The charge rounds the product before the sum (cf_step.h): inputs for which the fused
    multiply-add would cross a level keep the reference's spike."""
    for v0, x, theta in fma_sensitive_cases():
        xs, v = torch.tensor([[x]]), torch.tensor([v0])
        kwargs = dict(tau=3.0, v_threshold=theta, v_threshold_neg=-theta, k_pos=1, k_neg=1,
                      return_h_seq=True)
        s, _, h, _ = tb.cf_multi_step_triton(xs, v, **kwargs)
        s_r, _, h_r, _ = cf_multi_step_ref(xs, v, **kwargs)
        assert s_r.item() == 0.0 and h_r.item() < theta
        assert s.item() == 0.0 and torch.equal(h, h_r), (v0, x, theta, h.item())


@pytest.mark.parametrize('dtype', DTYPES)
def test_multi_step_equals_single_steps(dtype):
    tb.BLOCK = 32
    T, N = 5, 45
    x = (torch.randn(T, N) * 1.5).to(dtype).requires_grad_(True)
    sg = make_surrogate('tsg', 1.0, T)
    kwargs = dict(k_pos=2, k_neg=2, surrogate_function=sg)
    s_m, v_m, _, _ = cf_multi_step(x, torch.zeros(N, dtype=dtype), backend='triton', **kwargs)
    (s_m.float().sum() + v_m.float().sum()).backward()
    g_multi, p_multi = x.grad.clone(), sg.p.grad.clone()
    x.grad, sg.p.grad = None, None
    v = torch.zeros(N, dtype=dtype)
    spikes = []
    before = tb.launch_count
    for t in range(T):
        s, v, _ = cf_single_step(x[t], v, t=t, backend='triton', **kwargs)
        spikes.append(s)
    s_s = torch.stack(spikes)
    (s_s.float().sum() + v.float().sum()).backward()
    assert tb.launch_count == before + 2 * T
    if dtype == torch.float32:  # exact; half/bfloat16 round the carried v between calls
        assert torch.equal(s_m, s_s)
        assert_close(x.grad, g_multi, 'grad x')
        assert_close(sg.p.grad, p_multi, 'grad TSG p')
    else:
        assert (s_m != s_s).float().mean().item() < 0.05


def test_tsg_gradient_deterministic():
    tb.BLOCK = 16
    x = (torch.randn(4, 100) * 2).requires_grad_(True)
    sg = make_surrogate('tsg', 1.0, 4)
    grads = []
    for _ in range(2):
        sg.p.grad = None
        s, v_last, _, _ = tb.cf_multi_step_triton(x, torch.zeros(100), surrogate_function=sg)
        (s.sum() + v_last.sum()).backward()
        grads.append(sg.p.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_no_grad_saves_nothing():
    x = torch.randn(3, 10)
    with torch.no_grad():
        s, v_last, h, v_seq = tb.cf_multi_step_triton(x, torch.zeros(10))
    assert h is None and v_seq is None and s.grad_fn is None
    assert torch.equal(s, cf_multi_step_ref(x, torch.zeros(10))[0])


def test_rejects_what_it_cannot_run():
    with pytest.raises(TypeError, match='float32, float16 or bfloat16'):
        tb.cf_multi_step_triton(torch.randn(2, 3, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(ValueError, match='supports the surrogates'):
        tb.cf_multi_step_triton(torch.randn(2, 3), torch.zeros(3),
                                surrogate_function=sj_surrogate.PiecewiseQuadratic())


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only, compiled mode')
def test_compiled_mode_needs_cuda():
    """Outside the interpreter the backend takes CUDA tensors only."""
    try:
        assert not tb.use_interpreter(False)
        assert 'CUDA' in tb.unavailable_reason()
        with pytest.raises(TypeError, match="CUDA tensors"):
            tb.cf_multi_step_triton(torch.randn(2, 3), torch.zeros(3))
        with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
            cf_multi_step(torch.randn(2, 3), torch.zeros(3), backend='triton')
        assert 'triton' not in backends.available_backends('cuda', torch.float32)
    finally:
        assert tb.use_interpreter(True)


def test_dispatch():
    x = torch.randn(3, 8)
    # the interpreter is a test mode: 'auto' on the CPU never picks it
    assert resolve_backend('auto', x, CFRect()) in ('cpp', 'torch')
    assert 'triton' not in backends.available_backends('cpu', torch.float32)
    assert resolve_backend('triton', x, CFRect()) == 'triton'
    assert resolve_backend('triton', x.double(), CFRect()) == 'torch'  # float64: the reference
    assert backends.get('triton') is tb.cf_multi_step_triton
    assert backends.AUTO_ORDER['cuda'][:2] == ('cupy', 'triton')
    before = tb.launch_count
    node = CFNode(step_mode='m', backend='triton')
    node(x.requires_grad_(True)).sum().backward()
    assert tb.launch_count == before + 2
    assert 'triton' in node.supported_backends


def test_set_backend():
    """functional.set_backend(net, 'triton') on SpikingJelly 0.0.0.0.14, like 'cupy'."""
    from spikingjelly.activation_based import functional, layer
    if not hasattr(functional, 'set_backend'):
        pytest.skip('functional.set_backend exists on SpikingJelly 0.0.0.0.14 only')
    net = torch.nn.Sequential(layer.Linear(3, 3), CFNode(step_mode='m'), layer.Linear(3, 2),
                              CFNode(step_mode='m'))
    functional.set_backend(net, 'triton')
    assert net[1].backend == net[3].backend == 'triton'
    before = tb.launch_count
    net(torch.randn(4, 2, 3)).sum().backward()
    assert tb.launch_count == before + 4


def _op_args(T=3, N=5, kind=1, dtype=torch.float32, return_h=True, return_v=True):
    x = (torch.randn(T, N) * 2).to(dtype)
    v0 = torch.randn(N).to(dtype)
    alpha = torch.linspace(0.5, 2.0, T)
    return (x, v0, alpha, kind, 0.25, 1.0, 1.0, -0.8, 2, 1, False, True, return_h, return_v)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kind', [0, 1])
def test_opcheck(dtype, kind):
    """torch.library.opcheck on both ops: schema, fake implementation, autograd registration."""
    tb.BLOCK = 16
    fwd = torch.ops.spikingjelly_cf.cf_forward_triton.default
    bwd = torch.ops.spikingjelly_cf.cf_backward_triton.default
    args = _op_args(kind=kind, dtype=dtype)
    x, v0, alpha = args[:3]
    # forward: with x, v0 and TSG's alpha requiring gradients (the autograd registration is
    # checked too)
    fwd_args = (x.requires_grad_(True), v0.requires_grad_(True),
                alpha.requires_grad_(kind == 1)) + args[3:]
    torch.library.opcheck(fwd, fwd_args)
    h = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args))[2]
    grads = [torch.randn(3, 5).to(dtype), torch.randn(3, 5).to(dtype), None,
             torch.randn(5).to(dtype)]
    torch.library.opcheck(bwd, (h, alpha.detach(), *grads, kind, 0.25, 1.0, 1.0, -0.8, 2, 1,
                                False, kind == 1, dtype))


def test_torch_compile_fullgraph():
    """The kernels are graph nodes: no graph break, compiled == eager (aot_eager: no C++ build)."""
    tb.BLOCK = 16
    node = CFNode(step_mode='m', backend='triton', surrogate_function=TSG(T=4))
    x = torch.randn(4, 2, 9) * 2

    def step(x):
        node.reset()
        return node(x)

    explain = torch._dynamo.explain(step)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(step, backend='aot_eager', fullgraph=True)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    before = tb.launch_count
    sc = compiled(xc)
    sc.sum().backward()
    assert tb.launch_count == before + 2, 'the compiled graph ran the Triton ops'
    gp = node.surrogate_function.p.grad.clone()
    node.surrogate_function.p.grad = None
    se = step(xe)
    se.sum().backward()
    assert torch.equal(sc, se)
    assert torch.equal(xc.grad, xe.grad)
    assert torch.equal(gp, node.surrogate_function.p.grad)


@pytest.mark.parametrize('dtype', DTYPES)
def test_keeps_channels_last_layout(dtype):
    """A channels_last [T, B, C, H, W] input: every output with the input's strides (no copy to
    contiguous and back), the values of the contiguous input (tests/test_layout.py)."""
    tb.BLOCK = 32
    T, B, C, H, W = 3, 2, 5, 4, 3
    x = (torch.randn(T * B, C, H, W) * 2).contiguous(memory_format=torch.channels_last)
    x = x.view(T, B, C, H, W).to(dtype)
    v = torch.zeros_like(x[0])
    before = tb.launch_count
    s, v_last, h, v_seq = tb.cf_multi_step_triton(x, v, return_h_seq=True, return_v_seq=True)
    assert tb.launch_count == before + 1
    assert s.stride() == h.stride() == v_seq.stride() == x.stride()
    assert v_last.stride() == x[0].stride()
    ref = cf_multi_step_ref(x.float().contiguous(), v.float().contiguous(), return_h_seq=True,
                            return_v_seq=True)
    assert torch.equal(s.float(), ref[0])
    assert torch.equal(v_last, ref[1].to(dtype)) and torch.equal(v_seq, ref[3].to(dtype))
    # single-step mode: each step's spikes and the state stay channels_last
    node = CFNode(step_mode='s', backend='triton')
    for t in range(T):
        s_t = node(x[t])
        assert s_t.stride() == x[t].stride() and node.v.stride() == x[t].stride()
        if dtype == torch.float32:  # half types round the carried v between single steps
            assert torch.equal(s_t, s[t])
