"""The compiled CPU kernel (backend 'cpp') against the reference ``cf_multi_step_ref``.

The kernel is part of what CI builds, so a missing extension FAILS these tests; set
``SPIKINGJELLY_CF_ALLOW_NO_EXT=1`` to skip them instead (e.g. a machine without a C compiler).
Spikes must be bit-equal (both paths round the same float32 operations, see csrc/cf_step.h);
states and gradients agree to float32 tolerance.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based import surrogate as sj_surrogate

from spikingjelly_cf import backends
from spikingjelly_cf.backends import cpp
from spikingjelly_cf.functional.neuron import cf_multi_step, cf_multi_step_ref
from spikingjelly_cf.surrogate import TSG, CFRect

RTOL = ATOL = 1e-5


@pytest.fixture(autouse=True)
def _require_extension():
    if not cpp.available():
        message = f'compiled CPU kernel unavailable: {cpp.unavailable_reason()}'
        if os.environ.get('SPIKINGJELLY_CF_ALLOW_NO_EXT', '') not in ('', '0'):
            pytest.skip(message)
        pytest.fail(message + ' (set SPIKINGJELLY_CF_ALLOW_NO_EXT=1 to skip)')


def make_surrogate(name: str, alpha, tsg_steps: int):
    """``alpha`` None: CFRect's default height (1/theta per side), 1.0 for the other kinds."""
    if name == 'rect':
        return CFRect(alpha=alpha)
    alpha = 1.0 if alpha is None else alpha
    if name == 'tsg':
        sg = TSG(T=tsg_steps)
        with torch.no_grad():  # distinct a_t per step
            sg.p.copy_(torch.linspace(-1.5, 1.5, tsg_steps) * alpha)
        return sg
    if name == 'sigmoid':
        return sj_surrogate.Sigmoid(alpha=4.0 * alpha)
    return sj_surrogate.ATan(alpha=2.0 * alpha)


def run(fn, x, v, sg, kwargs, upstream):
    """Forward, then one shared upstream gradient into every requested output."""
    x = x.detach().clone().requires_grad_(True)
    v = v.detach().clone().requires_grad_(True)
    for p in sg.parameters():
        p.grad = None
    s, v_last, h, v_seq = fn(x, v, surrogate_function=sg, **kwargs)
    loss = (s * upstream['s']).sum()
    if upstream.get('v_last') is not None:
        loss = loss + (v_last * upstream['v_last']).sum()
    if h is not None and upstream.get('h') is not None:
        loss = loss + (h * upstream['h']).sum()
    if v_seq is not None and upstream.get('v_seq') is not None:
        loss = loss + (v_seq * upstream['v_seq']).sum()
    loss.backward()
    grads = [x.grad, v.grad] + [p.grad for p in sg.parameters()]
    return (s, v_last, h, v_seq), grads


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale,
                               msg=lambda m: f'{what}: {m}')


def compare(x, v, sg, kwargs, upstream):
    (outs_r, grads_r) = run(cf_multi_step_ref, x, v, sg, kwargs, upstream)
    (outs_k, grads_k) = run(cpp.cf_multi_step_cpp, x, v, sg, kwargs, upstream)
    s_r, v_r, h_r, vs_r = outs_r
    s_k, v_k, h_k, vs_k = outs_k
    assert s_k.dtype == x.dtype and s_k.shape == x.shape
    assert torch.equal(s_k, s_r), f'spikes differ at {(s_k != s_r).nonzero()[:5].tolist()}'
    assert_close(v_k, v_r, 'v_last')
    for name, a, b in (('h_seq', h_k, h_r), ('v_seq', vs_k, vs_r)):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, name)
    for name, a, b in zip(('grad x_seq', 'grad v', 'grad TSG p'), grads_k, grads_r):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, name)


@st.composite
def configs(draw):
    T = draw(st.integers(1, 6))
    n = draw(st.integers(1, 41))  # odd and even neuron counts
    tail = draw(st.sampled_from([(n,), (n, 2), (2, n, 1)]))
    theta_p = draw(st.floats(0.25, 4.0))
    theta_n = -theta_p * draw(st.sampled_from([1.0, 0.5, 1.7]))
    sg_name = draw(st.sampled_from(['rect', 'tsg', 'sigmoid', 'atan']))
    t_start = draw(st.integers(0, 2)) if sg_name == 'tsg' else 0
    tsg_steps = draw(st.sampled_from([1, T + t_start, T + t_start + 3]))
    kwargs = dict(
        tau=draw(st.floats(1.05, 5.0)),
        decay_input=draw(st.booleans()),
        v_threshold=theta_p,
        v_threshold_neg=theta_n,
        k_pos=draw(st.integers(1, 4)),
        k_neg=draw(st.integers(0, 4)),
        detach_reset=draw(st.booleans()),
        t_start=t_start,
        return_h_seq=draw(st.booleans()),
        return_v_seq=draw(st.booleans()),
    )
    return dict(T=T, tail=tail, kwargs=kwargs, sg_name=sg_name, tsg_steps=tsg_steps,
                alpha=draw(st.sampled_from([None, 0.5, 1.0, 2.0])),
                scale=draw(st.sampled_from([0.5, 1.5, 3.0])),
                v0_scale=draw(st.sampled_from([0.0, 1.0])),
                grads=draw(st.fixed_dictionaries({k: st.booleans()
                                                  for k in ('v_last', 'h', 'v_seq')})),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_cpp_matches_reference(cfg):
    gen = torch.Generator().manual_seed(cfg['seed'])
    T, tail = cfg['T'], cfg['tail']
    x = torch.randn((T,) + tail, generator=gen) * cfg['scale']
    v = torch.randn(tail, generator=gen) * cfg['v0_scale']
    upstream = {'s': torch.randn((T,) + tail, generator=gen)}
    for name, shape in (('v_last', tail), ('h', (T,) + tail), ('v_seq', (T,) + tail)):
        upstream[name] = torch.randn(shape, generator=gen) if cfg['grads'][name] else None
    sg = make_surrogate(cfg['sg_name'], cfg['alpha'], cfg['tsg_steps'])
    compare(x, v, sg, cfg['kwargs'], upstream)


@pytest.mark.parametrize('sg_name', ['rect', 'tsg', 'sigmoid', 'atan'])
@pytest.mark.parametrize('k_pos,k_neg', [(2, 2), (1, 0), (3, 1), (5, 5)])
@pytest.mark.parametrize('N', [3 * 512 + 7, 70001])
def test_cpp_many_blocks(sg_name, k_pos, k_neg, N):
    """Several neuron blocks (512 to 8192 neurons each, by N) and a ragged last block;
    fixed-K specialisations (2,2), (1,0) and the any-K path (3,1), (5,5)."""
    T = 4
    x = torch.randn(T, N) * 2
    v = torch.randn(N)
    upstream = {'s': torch.randn(T, N), 'v_last': torch.randn(N), 'h': torch.randn(T, N),
                'v_seq': torch.randn(T, N)}
    kwargs = dict(tau=2.0, decay_input=True, v_threshold=0.7, v_threshold_neg=-0.9, k_pos=k_pos,
                  k_neg=k_neg, detach_reset=False, t_start=0, return_h_seq=True,
                  return_v_seq=True)
    compare(x, v, make_surrogate(sg_name, None, T), kwargs, upstream)  # CFRect: 1/0.7, 1/0.9


def test_tsg_gradient_deterministic_across_thread_counts():
    T, N = 5, 4 * 512 + 3
    x = torch.randn(T, N, requires_grad=True)
    sg = make_surrogate('tsg', 1.0, T)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sg.p.grad = None
            s, v_last, _, _ = cpp.cf_multi_step_cpp(x, torch.zeros(N), surrogate_function=sg)
            (s.sum() + v_last.sum()).backward()
            grads.append(sg.p.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_no_grad_saves_nothing_and_skips_h():
    x = torch.randn(3, 10)
    before = cpp.launch_count
    with torch.no_grad():
        s, v_last, h, v_seq = cpp.cf_multi_step_cpp(x, torch.zeros(10))
    assert cpp.launch_count == before + 1
    assert h is None and v_seq is None and s.grad_fn is None
    s_r, v_r, _, _ = cf_multi_step_ref(x, torch.zeros(10))
    assert torch.equal(s, s_r)
    torch.testing.assert_close(v_last, v_r, rtol=RTOL, atol=ATOL)


def test_non_contiguous_input_and_trailing_shape():
    base = torch.randn(6, 5, 4)
    x = base.transpose(1, 2)  # [T=6, 4, 5], not contiguous
    assert not x.is_contiguous()
    upstream = {'s': torch.randn(6, 4, 5), 'v_last': torch.randn(4, 5)}
    compare(x, torch.randn(4, 5), CFRect(), dict(return_h_seq=False, return_v_seq=False), upstream)


def test_dispatcher_picks_cpp_for_cpu_float32():
    # 'inductor' (torch.compile of the reference loop) is listed but never picked by 'auto'
    assert backends.available_backends('cpu', torch.float32) in (('cpp', 'torch'),
                                                                 ('cpp', 'inductor', 'torch'))
    assert backends.available_backends('cpu', torch.float64) in (('torch',), ('inductor', 'torch'))
    assert backends.get('cpp') is cpp.cf_multi_step_cpp
    before = cpp.launch_count
    x = torch.randn(4, 7, requires_grad=True)
    s, _, _, _ = cf_multi_step(x, torch.zeros(7))
    s.sum().backward()
    assert cpp.launch_count == before + 2  # forward and backward ran in the kernel
    before = cpp.launch_count
    cf_multi_step(x.double(), torch.zeros(7, dtype=torch.float64))
    assert cpp.launch_count == before  # float64 runs on the reference


def test_cpp_rejects_what_it_cannot_run():
    with pytest.raises(TypeError, match='float32'):
        cpp.cf_multi_step_cpp(torch.randn(2, 3, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(ValueError, match='supports the surrogates'):
        cpp.cf_multi_step_cpp(torch.randn(2, 3), torch.zeros(3),
                              surrogate_function=sj_surrogate.PiecewiseQuadratic())


def test_pooled_h_buffer_is_safe_with_retain_graph():
    """The saved h_seq comes from a pool; a retained graph must keep its own buffer."""
    from spikingjelly_cf.backends import cpp
    from spikingjelly_cf.functional import cf_multi_step
    torch.manual_seed(0)
    x = (torch.randn(4, 101) * 2).requires_grad_()
    upstream = torch.randn(4, 101)
    s, _, _, _ = cf_multi_step(x, torch.zeros(101), backend='cpp')
    g1 = torch.autograd.grad((s * upstream).sum(), x, retain_graph=True)[0]
    for _ in range(4):  # other calls of the same size take and return pooled buffers meanwhile
        s2, _, _, _ = cf_multi_step((torch.randn(4, 101) * 2).requires_grad_(), torch.zeros(101),
                                    backend='cpp')
        s2.sum().backward()
        del s2
    assert cpp._pool.get((4 * 101, torch.float32)), \
        'freed graphs give their h buffer back to the pool'
    g2 = torch.autograd.grad((s * upstream).sum(), x)[0]
    assert g1.abs().sum() > 0
    assert torch.equal(g1, g2)


# -- float16 / bfloat16 storage ----------------------------------------------------------------
# The kernel stores half/bfloat16 and computes in float32 (csrc/cf_cpu.c, as the CUDA kernels):
# compared with the float32 reference run on the same rounded inputs and incoming gradients,
# spikes and every forward output must equal the reference's float32 values rounded once to the
# storage dtype (round to nearest even, PyTorch's .to(dtype)); the gradients are the float32
# kernel's rounded once, so within one rounding (eps of the dtype) of the reference's.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compare_storage(x, v, sg, kwargs, upstream, dtype):
    x, v = x.to(dtype), v.to(dtype)
    upstream = {k: (None if u is None else u.to(dtype).float()) for k, u in upstream.items()}
    before = cpp.launch_count

    def run_float(fn, xx, vv):
        xx = xx.detach().clone().requires_grad_(True)
        vv = vv.detach().clone().requires_grad_(True)
        for p in sg.parameters():
            p.grad = None
        outs = fn(xx, vv, surrogate_function=sg, **kwargs)
        loss = (outs[0].float() * upstream['s']).sum()
        for out, name in zip(outs[1:], ('v_last', 'h', 'v_seq')):
            if out is not None and upstream.get(name) is not None:
                loss = loss + (out.float() * upstream[name]).sum()
        loss.backward()
        return outs, [xx.grad, vv.grad] + [p.grad for p in sg.parameters()]

    outs_k, grads_k = run_float(cpp.cf_multi_step_cpp, x, v)
    assert cpp.launch_count == before + 2, 'forward and backward ran in the kernel'
    outs_r, grads_r = run_float(cf_multi_step_ref, x.float(), v.float())
    assert outs_k[0].dtype == dtype and torch.equal(outs_k[0].float(), outs_r[0]), 'spikes'
    for name, a, b in zip(('v_last', 'h_seq', 'v_seq'), outs_k[1:], outs_r[1:]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == dtype, name
            assert torch.equal(a, b.to(dtype)), f'{name}: not the reference rounded to {dtype}'
    for name, a, b in zip(('grad x_seq', 'grad v', 'grad TSG p'), grads_k, grads_r):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if name == 'grad TSG p':  # float32 always (a_t is a float32 parameter)
            assert a.dtype == torch.float32
            assert_close(a, b, name)
            continue
        assert a.dtype == dtype, name
        eps = torch.finfo(dtype).eps
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a.float(), b, rtol=eps, atol=eps * scale,
                                   msg=lambda m: f'{name} ({dtype}): {m}')


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.sampled_from(HALF_DTYPES))
def test_cpp_half_storage_matches_reference(cfg, dtype):
    gen = torch.Generator().manual_seed(cfg['seed'])
    T, tail = cfg['T'], cfg['tail']
    x = torch.randn((T,) + tail, generator=gen) * cfg['scale']
    v = torch.randn(tail, generator=gen) * cfg['v0_scale']
    upstream = {'s': torch.randn((T,) + tail, generator=gen)}
    for name, shape in (('v_last', tail), ('h', (T,) + tail), ('v_seq', (T,) + tail)):
        upstream[name] = torch.randn(shape, generator=gen) if cfg['grads'][name] else None
    sg = make_surrogate(cfg['sg_name'], cfg['alpha'], cfg['tsg_steps'])
    compare_storage(x, v, sg, cfg['kwargs'], upstream, dtype)


@pytest.mark.parametrize('dtype', HALF_DTYPES)
@pytest.mark.parametrize('sg_name', ['rect', 'tsg'])
@pytest.mark.parametrize('k_pos,k_neg', [(2, 2), (3, 1)])
def test_cpp_half_storage_many_blocks(dtype, sg_name, k_pos, k_neg):
    """Several neuron blocks and a ragged last one; fixed-K and any-K paths; all outputs."""
    T, N = 4, 3 * 512 + 7
    x = torch.randn(T, N) * 2
    upstream = {'s': torch.randn(T, N), 'v_last': torch.randn(N), 'h': torch.randn(T, N),
                'v_seq': torch.randn(T, N)}
    kwargs = dict(tau=2.0, decay_input=True, v_threshold=0.7, v_threshold_neg=-0.9, k_pos=k_pos,
                  k_neg=k_neg, return_h_seq=True, return_v_seq=True)
    compare_storage(x, torch.randn(N), make_surrogate(sg_name, None, T), kwargs, upstream, dtype)


@pytest.mark.parametrize('dtype', HALF_DTYPES)
def test_cpp_half_memory_lean(dtype):
    """memory='lean' with half storage: the same gradients as the normal mode (CFRect) / within
    the lean tolerance (TSG), spikes equal."""
    T, N = 5, 300
    x = (torch.randn(T, N) * 2).to(dtype)
    for sg_make in (CFRect, lambda: TSG(T=T)):
        outs = []
        for memory in ('normal', 'lean'):
            xg = x.clone().requires_grad_(True)
            s, v, _, _ = cf_multi_step(xg, torch.zeros(N, dtype=dtype), backend='cpp',
                                       surrogate_function=sg_make(), memory=memory)
            (s.float().sum() + v.float().pow(2).sum()).backward()
            outs.append((s, xg.grad))
        assert torch.equal(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize('dtype', HALF_DTYPES)
def test_cpp_storage_rounding_is_pytorchs(dtype):
    """float32 -> half/bfloat16 stores round to nearest even exactly like PyTorch: ties both ways,
    carries, overflow to infinity, NaN, subnormals, signed zeros."""
    from spikingjelly_cf.backends._ops import forward_op
    eps, big = torch.finfo(dtype).eps, torch.finfo(dtype).max
    pairs = [(eps, 1.0), (eps, 1.0 + eps), (-eps, -1.0), (-eps, -1.0 - eps), (eps, 2 - eps),
             (big, big), (-big, -big), (0.0, float('nan')), (-0.0, -0.0), (0.0, -0.0),
             (2 * torch.finfo(dtype).tiny, 0.0), (3 * torch.finfo(dtype).smallest_normal, -0.0)]
    gen = torch.Generator().manual_seed(5)
    decades = 4 if dtype == torch.float16 else 30
    rand = (torch.randn(2, 3000, generator=gen) * torch.logspace(-9, decades, 3000)).to(dtype)
    v = torch.cat([torch.tensor([p[0] for p in pairs]).to(dtype), rand[0]])
    x = torch.cat([torch.tensor([p[1] for p in pairs]).to(dtype), rand[1]])
    N = x.numel()
    top = torch.finfo(torch.float32).max  # levels at +-max: v = h for every h, inf included
    s, v_last, h, v_seq = forward_op('cpp')(x.view(1, N), v, torch.ones(1), 0, 0.5, 1.0, top,
                                            -top, 1, 1, False, True, True, True)
    assert h.dtype == torch.float32 and v_seq.dtype == dtype and s.dtype == dtype
    h_ref = 0.5 * v.float() + x.float()  # float32, exact here (0.5 v is exact)
    assert torch.equal(h[0].isnan(), h_ref.isnan())
    assert torch.equal(h[0].nan_to_num(), h_ref.nan_to_num())  # the widening is exact
    _, _, _, v_ref = cf_multi_step_ref(x.float().view(1, N), v.float(), tau=2.0, v_threshold=top,
                                       v_threshold_neg=-top, k_pos=1, k_neg=1, return_v_seq=True)
    expected = v_ref[0].to(dtype)  # PyTorch's rounding of the float32 v (= h, signed zeros aside)
    itype = torch.int16
    same = (v_seq[0].view(itype) == expected.view(itype)) | (expected.isnan() & v_seq[0].isnan())
    assert same.all(), (h_ref[~same][:4].tolist(), v_seq[0][~same][:4].tolist())
    assert torch.equal(v_last.view(itype), v_seq[0].view(itype))
    # NaN stays NaN (its bits differ between PyTorch's own scalar and vectorised conversions)
    assert h_ref.isnan().any() and v_seq[0][h_ref.isnan()].isnan().all()


def test_auto_runs_half_and_bfloat16_on_the_kernel():
    """'auto' on CPU float16/bfloat16 (e.g. the DVS example's --amp) runs the kernel, silently."""
    import warnings
    from spikingjelly_cf.functional.neuron import resolve_backend
    for dtype in HALF_DTYPES:
        x = torch.randn(4, 7, dtype=dtype, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert resolve_backend('auto', x, CFRect()) == 'cpp'
            before = cpp.launch_count
            s, _, _, _ = cf_multi_step(x, torch.zeros(7, dtype=dtype))
            s.float().sum().backward()
        assert cpp.launch_count == before + 2
        assert backends.available_backends('cpu', dtype) == ('cpp', 'torch')


def test_explicit_cpp_warns_once_for_float64():
    """float64 has no kernel: backend='cpp' runs the reference and says so once; 'auto' runs the
    reference silently (float64 is the reference's dtype: gradcheck, numerical checks)."""
    import warnings
    from spikingjelly_cf.functional import neuron as fn
    fn._warned.discard('dtype-cpp-torch.float64')
    x = torch.randn(3, 5, dtype=torch.float64)
    before = cpp.launch_count
    with pytest.warns(RuntimeWarning, match=r"backend='cpp' runs float32, float16, bfloat16 on "
                                            r"cpu, not float64; using the reference"):
        s, _, _, _ = cf_multi_step(x, torch.zeros(5, dtype=torch.float64), backend='cpp')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once only; and 'auto' never warns for float64
        s2, _, _, _ = cf_multi_step(x, torch.zeros(5, dtype=torch.float64), backend='cpp')
        s3, _, _, _ = cf_multi_step(x, torch.zeros(5, dtype=torch.float64))
    assert cpp.launch_count == before
    ref = cf_multi_step_ref(x, torch.zeros(5, dtype=torch.float64))[0]
    assert torch.equal(s, ref) and torch.equal(s2, ref) and torch.equal(s3, ref)


def test_cpu_autocast_conv_cfnode():
    """torch.autocast('cpu', bfloat16) around Conv2d + CFNode: the conv gives bfloat16, the node
    runs it on the kernel (no float32 round trip, no reference), the spikes equal the float32
    reference on the conv's bfloat16 output, gradients reach the float32 weights and stay close
    to the float32 run's, and channels_last frames stay channels_last."""
    from spikingjelly.activation_based import functional, layer
    from spikingjelly_cf import CFNode
    torch.manual_seed(0)
    T, B = 4, 2
    conv = layer.SeqToANNContainer(torch.nn.Conv2d(3, 8, 3, padding=1))
    node = CFNode(step_mode='m', backend='auto')
    net = torch.nn.Sequential(conv, node).to(memory_format=torch.channels_last)
    x = torch.randn(T, B, 3, 10, 10) * 2
    grads = {}
    for amp in (False, True):
        functional.reset_net(net)
        net.zero_grad()
        before = cpp.launch_count
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            y = conv(x)
            s = node(y)
            loss = s.float().mean() + node.v.float().pow(2).mean()
        loss.backward()
        assert cpp.launch_count == before + 2, 'the kernel ran forward and backward'
        assert s.dtype == y.dtype == (torch.bfloat16 if amp else torch.float32)
        assert s.stride() == y.stride(), 'the conv output layout (channels_last frames) is kept'
        assert node.v.stride() == y[0].stride()
        s_ref = cf_multi_step_ref(y.detach().float(), torch.zeros(y.shape[1:]))[0]
        assert torch.equal(s.float(), s_ref)
        w = conv[0].weight.grad
        assert w.dtype == torch.float32 and torch.isfinite(w).all() and w.abs().sum() > 0
        grads[amp] = w.clone()
    # bfloat16 activations: the weight gradient of the same step, to bfloat16's precision
    cos = torch.nn.functional.cosine_similarity(grads[True].flatten(), grads[False].flatten(), 0)
    assert cos > 0.95, cos
