"""Backend 'inductor' (the reference loop compiled by torch.compile) against ``cf_multi_step_ref``.

Three layers, cheapest first:

* the loop in kernel form (``inductor.kernel_loop``) run eagerly against the reference for every
  surrogate and parameter combination: this checks the primitives ``phi`` (their gradients are
  the surrogates' exactly) without paying for any compilation;
* the cache and its keys with the compiler replaced by the eager loop (no compilation);
* five really compiled keys (Inductor, C++ on the CPU), each covering several features at once
  (surrogate, flags, dtype, grad mode), T = 3 and small N: a cold compile costs seconds on a
  2-core machine, so every compiled key is compiled once per session (module-scoped fixtures).

Spikes must be equal; states and gradients (x, v0, TSG's p) agree to 1e-5 relative.
"""
import warnings

import pytest
import torch
from spikingjelly.activation_based import surrogate as sj_surrogate

from spikingjelly_cf import CFNode, backends
from spikingjelly_cf.backends import inductor
from spikingjelly_cf.functional.neuron import cf_multi_step, cf_multi_step_ref, resolve_backend
from spikingjelly_cf.surrogate import TSG, CFRect

pytestmark = [pytest.mark.skipif(not inductor.available(),
                                 reason=f'inductor unavailable: {inductor.unavailable_reason()}')]

RTOL = 1e-5
T = 3


def make_surrogate(name: str, T_sg: int = T):
    if name == 'rect':
        return CFRect(alpha=0.7)
    if name == 'tsg':
        sg = TSG(T=T_sg)
        with torch.no_grad():  # a distinct a_t per step
            sg.p.copy_(torch.linspace(-1.5, 1.5, T_sg))
        return sg
    if name == 'sigmoid':
        return sj_surrogate.Sigmoid(alpha=4.0)
    return sj_surrogate.ATan(alpha=2.0)


def inputs(T_, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T_, N, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    v0 = (torch.randn(N, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    up = {name: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
          for name, shape in (('s', (T_, N)), ('v_last', (N,)), ('h', (T_, N)), ('v_seq', (T_, N)))}
    return x, v0, up


def run(fn, x, v0, sg, kwargs, up, grad=True):
    """Outputs and gradients (x, v0, TSG's p) of one call with one shared upstream gradient."""
    x = x.detach().clone().requires_grad_(grad)
    v0 = v0.detach().clone().requires_grad_(grad)
    for p in sg.parameters():
        p.grad = None
    out = fn(x, v0, surrogate_function=sg, **kwargs)
    if not grad:
        return out, None
    s, v_last, h, v_seq = out
    loss = (s * up['s']).sum() + (v_last * up['v_last']).sum()
    if h is not None:
        loss = loss + (h * up['h']).sum()
    if v_seq is not None:
        loss = loss + (v_seq * up['v_seq']).sum()
    loss.backward()
    grads = [x.grad, v0.grad] + [p.grad.clone() for p in sg.parameters()]
    return out, grads


def assert_close(a, b, what):
    scale = b.abs().max().item() or 1.0
    err = (a - b).abs().max().item() / scale
    assert err <= RTOL, f'{what}: max error {err:.3g} relative to {scale:.3g}'


def compare(fn, x, v0, sg, kwargs, up, grad=True):
    out, grads = run(fn, x, v0, sg, kwargs, up, grad)
    ref, ref_grads = run(cf_multi_step_ref, x, v0, sg, kwargs, up, grad)
    assert out[0].dtype == x.dtype
    assert torch.equal(out[0], ref[0]), 'spikes differ'
    assert (out[0] != 0).any() and (out[0] < 0).any() == (kwargs.get('k_neg', 2) > 0)
    for name, a, b in zip(('v_last', 'h_seq', 'v_seq'), out[1:], ref[1:]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert_close(a.detach(), b.detach(), name)
    if grad:
        assert len(grads) == len(ref_grads)
        for name, a, b in zip(('grad x', 'grad v0', 'grad p'), grads, ref_grads):
            assert b.abs().max() > 0, f'{name} of the reference is 0: the test checks nothing'
            assert_close(a, b, name)
    return out


def eager_loop_fn(x_seq, v, surrogate_function=None, **kw):
    """``kernel_loop`` without compilation, behind the backend's own argument handling."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inductor, '_compile', lambda key: (lambda x, v0, a: inductor.kernel_loop(x, v0, a, key)))
        mp.setattr(inductor, '_cache', type(inductor._cache)())
        return inductor.cf_multi_step_inductor(x_seq, v, surrogate_function=surrogate_function, **kw)


# ------------------------------------------------------------------------------------------------
# 1. the kernel form, eagerly: every surrogate and parameter combination (no compilation)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('sg_name', ['rect', 'tsg', 'sigmoid', 'atan'])
@pytest.mark.parametrize('params', [
    dict(),
    dict(detach_reset=True, return_h_seq=True),
    dict(decay_input=True, tau=2.0, return_v_seq=True),
    dict(k_neg=0, k_pos=3, v_threshold=0.8, return_h_seq=True, return_v_seq=True),
    dict(v_threshold=1.2, v_threshold_neg=-0.7, k_pos=1, k_neg=3, t_start=1),
    dict(v_threshold=4.0, v_threshold_neg=-0.5, default_height=True),  # CFRect: 1/4 and 2
    dict(v_threshold=0.5, v_threshold_neg=-0.85, default_height=True),  # CFRect: 2 and 1/0.85
])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_kernel_form_matches_reference(sg_name, params, dtype):
    params = dict(params)
    t_start = params.get('t_start', 0)
    sg = make_surrogate(sg_name, T_sg=T + t_start)
    if params.pop('default_height', False):
        if sg_name != 'rect':
            pytest.skip('the default height is CFRect\'s')
        sg = CFRect()
    x, v0, up = inputs(T, 300, dtype)
    compare(eager_loop_fn, x, v0, sg, params, up)


def test_keeps_channels_last_layout():
    """A channels_last [T, B, C, H, W] input: outputs with the input's strides (tests/test_layout.py)."""
    x = (torch.randn(3 * 2, 5, 4, 3) * 2).contiguous(memory_format=torch.channels_last)
    x = x.view(3, 2, 5, 4, 3)
    v = torch.zeros_like(x[0])
    s, v_last, h, v_seq = eager_loop_fn(x, v, return_h_seq=True, return_v_seq=True)
    assert s.stride() == h.stride() == v_seq.stride() == x.stride()
    assert v_last.stride() == x[0].stride()
    ref = cf_multi_step_ref(x.contiguous(), v.contiguous(), return_v_seq=True)
    assert torch.equal(s, ref[0]) and torch.equal(v_seq, ref[3])


def test_rect_window_is_strict():
    """On |x| = theta/2 exactly the CFRect window is closed (docs/method.md, section 2: 1[|x| < theta/2]); a
    clamp-based primitive would count the edges."""
    # T = 1: h = x. 1.5 and 0.5 put levels exactly on window edges, 1.4 is inside level 1's
    x = torch.tensor([[1.5, 0.5, 1.4, -1.5]], dtype=torch.float64, requires_grad=True)
    s, _, _, _ = eager_loop_fn(x, torch.zeros(4, dtype=torch.float64), CFRect(alpha=0.7))
    s.sum().backward()
    assert x.grad.tolist() == [[0.0, 0.0, 0.7, 0.0]]
    xr = x.detach().clone().requires_grad_(True)
    sr, _, _, _ = cf_multi_step_ref(xr, torch.zeros(4, dtype=torch.float64),
                                    surrogate_function=CFRect(alpha=0.7))
    sr.sum().backward()
    assert torch.equal(x.grad, xr.grad) and torch.equal(s, sr)


# ------------------------------------------------------------------------------------------------
# 2. the cache and its keys (compiler replaced by the eager loop)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_compile(monkeypatch):
    compiled = []

    def fake(key):
        compiled.append(key)
        return lambda x, v0, a: inductor.kernel_loop(x, v0, a, key)
    monkeypatch.setattr(inductor, '_compile', fake)
    monkeypatch.setattr(inductor, '_cache', type(inductor._cache)())
    inductor.clear_cache()
    yield compiled
    inductor.clear_cache()


def test_cache_keys(fake_compile):
    x = torch.randn(4, 10, requires_grad=True)
    v0 = torch.zeros(10)

    def call(**kw):
        return inductor.cf_multi_step_inductor(x, v0, **kw)
    call()
    call()
    assert len(fake_compile) == 1 and inductor.cache_info()['hits'] == 1
    # a new N (or trailing shape) is the same key: N is dynamic
    inductor.cf_multi_step_inductor(torch.randn(4, 3, 7, requires_grad=True), torch.zeros(3, 7))
    assert len(fake_compile) == 1
    variants = [dict(tau=2.0), dict(decay_input=True), dict(v_threshold=0.5),
                dict(v_threshold_neg=-0.5), dict(k_pos=3), dict(k_neg=0), dict(detach_reset=True),
                dict(surrogate_function=CFRect(alpha=0.5)),
                dict(surrogate_function=sj_surrogate.Sigmoid()),
                dict(surrogate_function=sj_surrogate.ATan()), dict(return_h_seq=True),
                dict(return_v_seq=True)]
    for n, kw in enumerate(variants, start=2):
        call(**kw)
        assert len(fake_compile) == n, f'{kw} did not make a new entry'
        call(**kw)
        assert len(fake_compile) == n, f'{kw} compiled twice'
    keys = set(fake_compile)
    assert len(keys) == len(fake_compile)
    # T, dtype and grad mode are keys too
    inductor.cf_multi_step_inductor(torch.randn(5, 10, requires_grad=True), v0)
    inductor.cf_multi_step_inductor(x.double(), v0.double())
    with torch.no_grad():
        inductor.cf_multi_step_inductor(x, v0)
    assert len(fake_compile) == len(variants) + 4
    assert [k.grad for k in fake_compile[-3:]] == [True, True, False]
    assert fake_compile[-3].T == 5 and fake_compile[-2].dtype == torch.float64
    # nothing requires grad: the same forward-only graph as under no_grad
    inductor.cf_multi_step_inductor(x.detach(), v0)
    assert len(fake_compile) == len(variants) + 4
    # which inputs require grad changes the backward graph
    inductor.cf_multi_step_inductor(x, v0.requires_grad_(True))
    assert len(fake_compile) == len(variants) + 5 and fake_compile[-1].requires_grad == (True, True, False)


def test_tsg_alpha_is_an_input_not_a_key(fake_compile):
    sg = TSG(T=4)
    x = torch.randn(4, 10, requires_grad=True)
    inductor.cf_multi_step_inductor(x, torch.zeros(10), surrogate_function=sg)
    with torch.no_grad():
        sg.p.add_(0.3)
    inductor.cf_multi_step_inductor(x, torch.zeros(10), surrogate_function=sg)
    # a shorter sequence of the same TSG: t_start selects other a_t, same graph per T
    inductor.cf_multi_step_inductor(x[:2], torch.zeros(10), surrogate_function=sg, t_start=2)
    assert len(fake_compile) == 2 and fake_compile[0].sg_alpha == 0.0


def test_cache_is_bounded_lru(fake_compile, monkeypatch):
    monkeypatch.setattr(inductor, 'CACHE_SIZE', 3)
    x, v0 = torch.randn(2, 5), torch.zeros(5)
    for tau in (2.0, 3.0, 4.0):
        inductor.cf_multi_step_inductor(x, v0, tau=tau)
    inductor.cf_multi_step_inductor(x, v0, tau=2.0)  # hit: 2.0 becomes the most recent
    inductor.cf_multi_step_inductor(x, v0, tau=5.0)  # evicts 3.0, the least recently used
    info = inductor.cache_info()
    assert info['size'] == 3 and info['maxsize'] == 3 and info['evictions'] == 1
    assert sorted(1 / (1 - k.k) for k in info['keys']) == pytest.approx([2.0, 4.0, 5.0])
    inductor.cf_multi_step_inductor(x, v0, tau=3.0)  # compiled again
    assert len(fake_compile) == 5
    inductor.clear_cache()
    assert inductor.cache_info()['size'] == 0


def test_unsupported_surrogate_is_a_clear_error():
    x = torch.randn(2, 4)
    for sg in (sj_surrogate.PiecewiseQuadratic(), CFRect(spiking=False)):
        with pytest.raises(ValueError, match="inductor.*CFRect.*TSG.*Sigmoid.*ATan"):
            cf_multi_step(x, torch.zeros(4), surrogate_function=sg, backend='inductor')
        with pytest.raises(ValueError, match="inductor.*CFRect"):
            inductor.cf_multi_step_inductor(x, torch.zeros(4), surrogate_function=sg)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            assert resolve_backend('auto', x, sg) == 'torch'
    with pytest.raises(TypeError, match='inductor'):
        inductor.cf_multi_step_inductor(x.half(), torch.zeros(4).half())


def test_registered_but_never_auto():
    assert 'inductor' in backends.KERNEL_BACKENDS
    assert backends.get('inductor') is inductor.cf_multi_step_inductor
    assert 'inductor' in backends.available_backends('cpu', torch.float64)
    for dtype in (torch.float32, torch.float64, torch.float16):
        assert resolve_backend('auto', torch.zeros(2, 3, dtype=dtype), CFRect()) != 'inductor'
    assert resolve_backend('inductor', torch.zeros(2, 3), TSG(T=2)) == 'inductor'
    assert resolve_backend('inductor', torch.zeros(2, 3, dtype=torch.float16), CFRect()) == 'torch'
    assert CFNode(backend='inductor').backend == 'inductor'


# ------------------------------------------------------------------------------------------------
# 3. really compiled (Inductor): five keys, each compiled once
# ------------------------------------------------------------------------------------------------
def frames_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']


@pytest.fixture(scope='module', autouse=False)
def fresh_cache():
    inductor.clear_cache()
    yield
    inductor.clear_cache()


COMPILED_CASES = {
    # surrogate, neuron parameters and flags, dtype, grad mode
    'rect-float32-flags': ('rect', dict(return_h_seq=True, return_v_seq=True), torch.float32, True),
    'tsg-decay-detach': ('tsg', dict(decay_input=True, tau=2.0, detach_reset=True,
                                     return_h_seq=True), torch.float32, True),
    'atan-float64-kneg0': ('atan', dict(k_neg=0, k_pos=3, v_threshold=0.8, return_v_seq=True),
                           torch.float64, True),
    'sigmoid-thresholds': ('sigmoid', dict(v_threshold=1.2, v_threshold_neg=-0.7, k_pos=1, k_neg=3),
                           torch.float32, True),
    'rect-inference': ('rect', dict(tau=3.0, return_v_seq=True), torch.float32, False),
}


@pytest.mark.parametrize('case', list(COMPILED_CASES))
def test_compiled_matches_reference(case, fresh_cache):
    sg_name, params, dtype, grad = COMPILED_CASES[case]
    sg = make_surrogate(sg_name)

    def check(x, v0, up):   # against the reference: with gradients, or outputs under no_grad
        if grad:
            compare(inductor.cf_multi_step_inductor, x, v0, sg, params, up)
            return
        with torch.no_grad():
            out, _ = run(inductor.cf_multi_step_inductor, x, v0, sg, params, up, grad=False)
            ref, _ = run(cf_multi_step_ref, x, v0, sg, params, up, grad=False)
        assert torch.equal(out[0], ref[0])
        assert_close(out[1], ref[1], 'v_last')
        assert_close(out[3], ref[3], 'v_seq')
        assert inductor.cache_info()['keys'][-1].grad is False

    x, v0, up = inputs(T, 257, dtype, seed=1)
    before = inductor.cache_info()['misses']
    check(x, v0, up)
    assert inductor.cache_info()['misses'] == before + 1
    # same key, another batch size and trailing shape: no new entry and no recompilation
    graphs = frames_compiled()
    x2, v2, up2 = inputs(T, 96, dtype, seed=2)
    x2, v2 = x2.view(T, 8, 12), v2.view(8, 12)
    up2 = {k: v.view(*v.shape[:-1], 8, 12) for k, v in up2.items()}
    check(x2, v2, up2)
    if sg_name == 'tsg':  # learning a_t changes an input, not the graph
        with torch.no_grad():
            sg.p.mul_(-0.5).add_(0.2)
        compare(inductor.cf_multi_step_inductor, x2, v2, sg, params, up2)
    assert inductor.cache_info()['misses'] == before + 1
    assert frames_compiled() == graphs, 'a call with the same key recompiled'


def test_cfnode_routes_to_inductor(fake_compile):
    """CFNode(backend='inductor') runs this backend (its cache records the call) and agrees
    with backend='torch'."""
    x = inputs(T, 40, seed=4)[0].view(T, 4, 10)
    s_ind = CFNode(step_mode='m', backend='inductor')(x)
    assert len(fake_compile) == 1 and fake_compile[0].T == T
    s_ref = CFNode(step_mode='m', backend='torch')(x)
    assert torch.equal(s_ind, s_ref)
