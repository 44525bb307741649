"""The first-use check of the run-time-compiled kernels (docs/guide/gpu_check.md), on the CPU.

CuPy and Triton compile their kernels for the GPU they find; the dispatcher runs a small
forward and backward pass of such a kernel against the float64 reference the first time a
process uses it for a key (device, dtype, surrogate kind, k_pos, k_neg, detach_reset). The
run-time-compiled path CI has is Triton's interpreter on CPU tensors: these tests put
``'triton'`` before ``'cpp'`` in ``backends.AUTO_ORDER['cpu']`` (a test-only order; ``'auto'``
never picks Triton on the CPU otherwise), break the Triton backend on purpose and check that
``'auto'`` falls back to ``'cpp'`` with one warning that says what failed and names
``python -m spikingjelly_cf check``, and that an explicit ``backend='triton'`` raises.
"""
import importlib.util
import os
import warnings

import pytest
import torch

from spikingjelly_cf import CFNode, backends
from spikingjelly_cf.backends import _probe
from spikingjelly_cf.backends import cupy as cupy_backend
from spikingjelly_cf.functional import neuron as fn
from spikingjelly_cf.functional.neuron import cf_multi_step, resolve_backend
from spikingjelly_cf.surrogate import TSG, CFRect

pytestmark = [
    pytest.mark.filterwarnings('ignore:overflow encountered:RuntimeWarning',
                               'ignore:invalid value encountered:RuntimeWarning'),
    pytest.mark.skipif(importlib.util.find_spec('triton') is None,
                       reason='Triton is not installed (its interpreter is the run-time-compiled '
                              'path on the CPU)'),
]


@pytest.fixture(scope='module')
def interpreter():
    from spikingjelly_cf.backends import triton as tb
    assert tb.use_interpreter(True), tb.unavailable_reason()
    yield tb
    tb.use_interpreter(None)


@pytest.fixture
def triton_first(interpreter, monkeypatch):
    """'auto' on the CPU tries the interpreted Triton kernels before 'cpp'; fresh verdicts and
    warnings; the first-use check on even if the environment turns it off."""
    monkeypatch.setitem(backends.AUTO_ORDER, 'cpu', ('triton', 'cpp'))
    monkeypatch.delenv(_probe.DISABLE_ENV, raising=False)
    assert backends.is_available('cpp')
    _probe.clear_first_use_cache()
    warned = set(fn._warned)
    yield interpreter
    _probe.clear_first_use_cache()
    fn._warned.clear()
    fn._warned.update(warned)


def _wrong_levels(monkeypatch, tb):
    """Break the Triton backend: every firing level 1 % too high (a wrong constant)."""
    levels = tb.levels
    monkeypatch.setattr(tb, 'levels', lambda theta, count, device: levels(theta * 1.01, count,
                                                                          device))


def test_passing_kernel_is_used_and_checked_once(triton_first):
    x = torch.randn(8, 300)
    assert resolve_backend('auto', x, CFRect()) == 'triton'
    assert resolve_backend('auto', x * 2, CFRect()) == 'triton'
    log = _probe.first_use_log()
    assert len(log) == 1, 'one check per key and process'
    entry = log[0]
    assert entry['passed'] and entry['backend'] == 'triton' and entry['kind'] == 'rect'
    assert entry['seconds'] > 0
    # a new key (another K, detach_reset, dtype or surrogate) is checked again
    resolve_backend('auto', x, CFRect(), k_pos=3, k_neg=1)
    resolve_backend('auto', x, CFRect(), detach_reset=True)
    resolve_backend('auto', x.bfloat16(), TSG(8))
    keys = [(e['k_pos'], e['k_neg'], e['detach_reset'], e['dtype'], e['kind'])
            for e in _probe.first_use_log()]
    assert keys == [(2, 2, False, 'float32', 'rect'), (3, 1, False, 'float32', 'rect'),
                    (2, 2, True, 'float32', 'rect'), (2, 2, False, 'bfloat16', 'tsg')]
    assert all(e['passed'] for e in _probe.first_use_log())


def test_wrong_kernel_auto_falls_back_with_one_warning(triton_first, monkeypatch):
    _wrong_levels(monkeypatch, triton_first)
    x = torch.randn(8, 2, 50)
    v = torch.zeros(2, 50)
    with pytest.warns(RuntimeWarning) as record:
        s, v_last, _, _ = cf_multi_step(x, v)
    messages = [str(w.message) for w in record if 'first-use check' in str(w.message)]
    assert len(messages) == 1, messages
    msg = messages[0]
    assert "backend 'triton' failed its first-use check on cpu" in msg
    assert 'float32, CFRect, k_pos=2, k_neg=2, detach_reset=False' in msg
    assert 's differs at' in msg  # what failed
    assert 'python -m spikingjelly_cf check' in msg
    assert "does not use 'triton'" in msg
    s_cpp, v_cpp, _, _ = cf_multi_step(x, v, backend='cpp')
    assert torch.equal(s, s_cpp) and torch.equal(v_last, v_cpp), "'auto' ran the next backend"
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the warning is given once per key and process
        assert resolve_backend('auto', x, CFRect()) == 'cpp'
    assert len(_probe.first_use_log()) == 1 and not _probe.first_use_log()[0]['passed']


def test_wrong_kernel_explicit_backend_raises(triton_first, monkeypatch):
    _wrong_levels(monkeypatch, triton_first)
    x = torch.randn(8, 50)
    with pytest.raises(RuntimeError) as info:
        cf_multi_step(x, torch.zeros(50), backend='triton', surrogate_function=TSG(8))
    msg = str(info.value)
    assert "backend 'triton' failed its first-use check on cpu (float32, TSG" in msg
    assert 'python -m spikingjelly_cf check' in msg
    assert 'SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK' in msg
    with pytest.raises(RuntimeError, match='first-use check'):  # cached: raises again
        resolve_backend('triton', x, TSG(8))


def test_launch_error_is_a_failed_check(triton_first, monkeypatch):
    def broken_launch(*args, **kwargs):
        raise RuntimeError('CUDA error: too many resources requested for launch')

    monkeypatch.setattr(triton_first, '_launch', broken_launch)
    x = torch.randn(4, 30)
    with pytest.warns(RuntimeWarning, match='too many resources requested for launch'):
        assert resolve_backend('auto', x, CFRect()) == 'cpp'
    with pytest.raises(RuntimeError, match='too many resources requested'):
        resolve_backend('triton', x, CFRect())


def test_wrong_gradient_only_is_caught(triton_first, monkeypatch):
    """A kernel whose forward pass is right but whose TSG a_t gradient is wrong."""
    backward_kernel = triton_first._load().cf_backward_kernel
    launch = triton_first._launch

    def launch_then_scale_partials(kernel, grid, device, *args, **meta):
        launch(kernel, grid, device, *args, **meta)
        if kernel is backward_kernel and meta.get('NEED_GA'):
            args[10].mul_(1.001)  # the [programs, T] partial sums of d loss / d a_t

    monkeypatch.setattr(triton_first, '_launch', launch_then_scale_partials)
    x = torch.randn(8, 40)
    assert resolve_backend('auto', x, CFRect()) == 'triton'  # CFRect has no a_t: passes
    with pytest.warns(RuntimeWarning, match=r'grad_p differs'):
        assert resolve_backend('auto', x, TSG(8)) == 'cpp'


def test_environment_variable_turns_it_off(triton_first, monkeypatch):
    _wrong_levels(monkeypatch, triton_first)
    monkeypatch.setenv(_probe.DISABLE_ENV, '1')
    x = torch.randn(8, 50)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_backend('auto', x, CFRect()) == 'triton'
        assert resolve_backend('triton', x, CFRect()) == 'triton'
    assert _probe.first_use_log() == []


def test_cfnode_falls_back(triton_first, monkeypatch):
    _wrong_levels(monkeypatch, triton_first)
    node = CFNode(step_mode='m', surrogate_function=TSG(8))
    x = torch.randn(8, 3, 20, requires_grad=True)
    with pytest.warns(RuntimeWarning, match='first-use check'):
        s = node(x)
    s.sum().backward()
    ref = CFNode(step_mode='m', surrogate_function=TSG(8), backend='cpp')
    xr = x.detach().clone().requires_grad_(True)
    sr = ref(xr)
    sr.sum().backward()
    assert torch.equal(s, sr) and torch.equal(x.grad, xr.grad)


def test_check_runs_outside_compiled_graph(triton_first, monkeypatch):
    """Under torch.compile(fullgraph=True) the check runs while Dynamo traces (outside the
    graph, on real tensors) and the compiled call uses the backend it chose."""
    _wrong_levels(monkeypatch, triton_first)
    torch._dynamo.reset()
    sg = TSG(8)

    def step(x, v):
        return cf_multi_step(x, v, surrogate_function=sg)[0]

    x = torch.randn(8, 64, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend='aot_eager')
    with pytest.warns(RuntimeWarning, match='first-use check'):
        s = compiled(x, torch.zeros(64))
    s_cpp = cf_multi_step(x, torch.zeros(64), surrogate_function=sg, backend='cpp')[0]
    assert torch.equal(s, s_cpp)
    (g,) = torch.autograd.grad(s.sum(), x)
    (g_cpp,) = torch.autograd.grad(s_cpp.sum(), x)
    assert torch.equal(g, g_cpp)
    assert len(_probe.first_use_log()) == 1
    torch._dynamo.reset()


def test_check_leaves_caller_state_alone(triton_first):
    """The probe runs with grad mode on and modes off, whatever the caller has set, restores
    deterministic mode and leaves the global random state alone."""
    x = torch.randn(8, 30)
    state = torch.get_rng_state()
    assert resolve_backend('auto', x, TSG(8)) == 'triton'
    assert len(_probe.first_use_log()) == 1
    assert torch.equal(torch.get_rng_state(), state), 'the check drew from the global generator'
    _probe.clear_first_use_cache()
    with torch.inference_mode():
        assert resolve_backend('auto', x, CFRect()) == 'triton'
    _probe.clear_first_use_cache()
    with torch.no_grad():
        assert resolve_backend('auto', x, CFRect()) == 'triton'
    assert all(e['passed'] for e in _probe.first_use_log())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _probe.clear_first_use_cache()
        assert resolve_backend('auto', x, CFRect()) == 'triton'
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


# -- determinism ---------------------------------------------------------------------------------
@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_ok():
    assert backends.deterministic_ok('cupy', 'tsg')  # determinism not requested
    torch.use_deterministic_algorithms(True)
    try:
        assert not backends.deterministic_ok('cupy', 'tsg')
        for name, kind in (('cupy', 'rect'), ('triton', 'tsg'), ('cpp', 'tsg'),
                           ('inductor', 'tsg')):
            assert backends.deterministic_ok(name, kind), (name, kind)
    finally:
        torch.use_deterministic_algorithms(False)


def _cupy_backward(need_grad_alpha):
    """The CuPy backward op body on an empty problem (N = 0: nothing to launch, no GPU)."""
    h = torch.zeros(3, 0)
    alpha = torch.ones(3)
    return cupy_backward(h, alpha, need_grad_alpha)


def cupy_backward(h, alpha, need_grad_alpha):
    return cupy_backend._backward(h, alpha, torch.zeros_like(h), None, None, None, 1, 0.25, 1.0,
                                  1.0, -1.0, 2, 2, False, need_grad_alpha, torch.float32)


def test_cupy_tsg_gradient_refuses_deterministic_mode(deterministic):
    with pytest.raises(RuntimeError, match=r"atomicAdd.*backend='triton'"):
        _cupy_backward(need_grad_alpha=True)
    grad_x, grad_v0, grad_alpha = _cupy_backward(need_grad_alpha=False)  # no a_t: deterministic
    assert grad_x.shape == (3, 0) and grad_alpha.numel() == 0


def test_cupy_tsg_gradient_warns_in_warn_only_mode():
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match='not deterministic'):
            _cupy_backward(need_grad_alpha=True)
    finally:
        torch.use_deterministic_algorithms(False)


def test_auto_passes_over_a_nondeterministic_kernel(triton_first, monkeypatch, deterministic):
    """'auto' skips a kernel that is not deterministic for the surrogate (as CuPy's TSG
    gradient on CUDA; here the interpreted Triton kernel is declared so)."""
    real = backends.deterministic_ok
    monkeypatch.setattr(backends, 'deterministic_ok',
                        lambda name, kind: real(name, kind) and not (name == 'triton'
                                                                     and kind == 'tsg'))
    x = torch.randn(8, 30)
    assert resolve_backend('auto', x, TSG(8)) == 'cpp'
    assert resolve_backend('auto', x, CFRect()) == 'triton'
    monkeypatch.setitem(backends.AUTO_ORDER, 'cpu', ('triton',))
    with pytest.warns(RuntimeWarning, match="backend 'triton' is not deterministic for TSG"):
        assert resolve_backend('auto', x, TSG(8)) == 'torch'
