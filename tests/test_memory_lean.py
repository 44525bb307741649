"""Memory-lean mode (``CFNode(memory='lean')``): 1 byte (CFRect) or 3 bytes saved per neuron-step.

CFRect saves one uint8 window code per neuron-step and its gradients must be bit-identical to
the normal mode (and match the reference). TSG / Sigmoid / ATan save the index of the level
nearest to ``h`` and the float16 offset of ``h`` from it ([T, 3, N] uint8); their gradients must
stay within a tolerance of the normal mode's that does not depend on the threshold (float16 ``h``
itself, the former form, was off by 26 % at theta = 100 and by orders of magnitude at 1e4).
"""
import warnings

import pytest
import torch
from spikingjelly.activation_based import surrogate as sj_surrogate

from spikingjelly_cf import CFNode
from spikingjelly_cf.backends import cpp
from spikingjelly_cf.backends._common import KIND_CODES
from spikingjelly_cf.backends._ops import forward_op, lean_dtype, lean_shape
from spikingjelly_cf.functional import cf_multi_step, cf_multi_step_ref
from spikingjelly_cf.surrogate import TSG, CFRect

pytestmark = pytest.mark.skipif(not cpp.available(),
                                reason=f'cpp backend unavailable: {cpp.unavailable_reason()}')


class SavedBytes:
    """Bytes of the unique storages autograd saves while active (each storage counted once)."""

    def __init__(self):
        self.storages = {}

    def _pack(self, t):
        st = t.untyped_storage()
        self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self):
        return sum(self.storages.values())


def inputs(T, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, generator=g) * 1.5
    # h = x exactly at t = 0 (v0 = 0): put h on the levels, on the window edges theta/2 and next
    # to them (one ulp either side), where a wrong window test or code would show
    edges = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1.0, 2.0, -1.0, -2.0, 0.0, 3.0])
    special = torch.cat([edges, torch.nextafter(edges, edges + 1),
                         torch.nextafter(edges, edges - 1)])
    x[0, :special.numel()] = special[:N]
    return x, torch.randn(T, N, generator=g)


def surrogates(T):
    return {'rect': CFRect, 'tsg': lambda: TSG(T=T), 'sigmoid': sj_surrogate.Sigmoid,
            'atan': sj_surrogate.ATan}


def run(memory, sg, x, grad, backend='cpp', **kw):
    """Spikes, v_last, grad x, grad v0 and the surrogate's parameter gradients; saved bytes."""
    xg = x.clone().requires_grad_(True)
    v0 = torch.zeros(x.shape[1], requires_grad=True)
    with SavedBytes() as sb:
        s, v, _, _ = cf_multi_step(xg, v0, surrogate_function=sg, backend=backend,
                                   memory=memory, **kw)
    torch.autograd.backward([s, v], [grad, torch.ones_like(v)])
    params = [p.grad.clone() for p in sg.parameters()]
    return (s.detach(), v.detach(), xg.grad, v0.grad, params), sb.bytes


KS = [(2, 2), (1, 0), (5, 3), (15, 15)]  # fixed-K kernels and the any-K path, up to the 4-bit limit


@pytest.mark.parametrize('k_pos,k_neg', KS)
@pytest.mark.parametrize('detach_reset', [False, True])
@pytest.mark.parametrize('theta_n', [None, -0.7])  # asymmetric: positive and negative sides differ
def test_rect_lean_bit_identical(k_pos, k_neg, detach_reset, theta_n):
    T, N = 7, 301  # odd N: a ragged last block
    x, grad = inputs(T, N)
    kw = dict(k_pos=k_pos, k_neg=k_neg, detach_reset=detach_reset, v_threshold_neg=theta_n)
    normal, bytes_normal = run('normal', CFRect(), x, grad, **kw)
    lean, bytes_lean = run('lean', CFRect(), x, grad, **kw)
    for a, b in zip(normal[:4], lean[:4]):
        assert torch.equal(a, b)
    # and the reference agrees (float32 tolerance: summation order of the reference differs)
    ref, _ = run('normal', CFRect(), x, grad, backend='torch', **kw)
    assert torch.equal(ref[0], lean[0])
    torch.testing.assert_close(lean[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[3], ref[3], rtol=1e-5, atol=1e-6)
    assert bytes_normal == 4 * T * N + 4 * T        # float32 h + the [T] alpha
    assert bytes_lean == 1 * T * N + 4 * T          # uint8 window codes + alpha


def _windows(h, k_pos, k_neg, theta_p=1.0, theta_n=-1.0):
    """Window counts of CFRect computed in PyTorch (same float32 arithmetic as the kernel)."""
    cp = sum(((h - float(torch.tensor(j * theta_p, dtype=torch.float64).float())).abs()
              < 0.5 * theta_p).to(torch.uint8) for j in range(1, k_pos + 1))
    cn = sum(((float(torch.tensor(j * theta_n, dtype=torch.float64).float()) - h).abs()
              < -0.5 * theta_n).to(torch.uint8) for j in range(1, k_neg + 1))
    return cp | (cn << 4)


def test_rect_window_codes_are_what_is_saved():
    """The op's saved tensor is the uint8 code (low nibble positive windows, high negative)."""
    T, N = 5, 64
    x, _ = inputs(T, N)
    v0 = torch.zeros(N)
    alpha = torch.ones(T)
    args = (x, v0, alpha, KIND_CODES['rect'], 0.25, 1.0, 1.0, -1.0, 2, 2, False)
    _, _, h, _ = forward_op('cpp')(*args, True, True, False)  # float32 h returned
    _, _, code, _ = forward_op('cpp')(*args, True, False, False, True)  # lean: codes
    assert code.dtype == torch.uint8 and code.shape == (T, N)
    assert torch.equal(code, _windows(h, 2, 2))
    assert int(code.max()) > 0 and int((code >> 4).max()) > 0  # both sides occur


def near_levels(T, N, theta_p, theta_n, k_pos, k_neg, seed=0):
    """Inputs that put h within a few units of the levels (and of 0) at every step, where the
    smooth surrogates matter; with tau = 4/3 the carried v moves h by a quarter of v only."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0] + [j * theta_p for j in range(1, k_pos + 1)]
                          + [j * theta_n for j in range(1, k_neg + 1)])
    x = levels[torch.randint(len(levels), (T, N), generator=g)] + torch.randn(T, N, generator=g)
    return x, torch.randn(T, N, generator=g)


#: Tolerance of the smooth surrogates' lean gradients, relative to the largest normal-mode value.
#: Each distance h - level_j the backward pass forms is within 2^-11 |h - level_j| of the normal
#: mode's (the float16 rounding of the offset from the nearest level, which is never farther than
#: level_j; float32 rounding aside), so each surrogate value is within 2 * 2^-11 of its peak
#: (ATan's relative change is at most twice the relative change of x; TSG's and Sigmoid's less).
#: K_P + K_N = 4 such values enter a step's gradient, and the carry through time multiplies the
#: errors by the same factors as the gradient itself: 4 * 2 * 2^-11 = 3.9e-3. Measured: at most
#: 8e-4 at theta = 1 and 100, 1e-5 at 1e4 (float16 h, the former form: 0.26 at 100, 3e6 at 1e4).
LEAN_RTOL = 8 * 2.0 ** -11


@pytest.mark.parametrize('kind', ['tsg', 'sigmoid', 'atan'])
@pytest.mark.parametrize('theta_p,theta_n', [(1.0, -1.0), (100.0, -60.0), (1e4, -6e3),
                                             (1e4, -2.5e4)])
def test_smooth_lean_error_does_not_grow_with_theta(kind, theta_p, theta_n):
    T, N = 6, 1001
    x, grad = near_levels(T, N, theta_p, theta_n, 2, 2)
    make = surrogates(T)[kind]
    kw = dict(v_threshold=theta_p, v_threshold_neg=theta_n)
    normal, bytes_normal = run('normal', make(), x, grad, **kw)
    lean, bytes_lean = run('lean', make(), x, grad, **kw)
    assert torch.equal(lean[0], normal[0]) and torch.equal(lean[1], normal[1])  # forward unchanged
    names = ['grad x', 'grad v0'] + ['grad p'] * len(normal[4])
    for name, a, b in zip(names, list(lean[2:4]) + lean[4], list(normal[2:4]) + normal[4]):
        scale = b.abs().max().item()
        assert scale > 0, f'{name}: the normal mode gives 0, the test checks nothing'
        err = (a - b).abs().max().item() / scale
        assert err <= LEAN_RTOL, f'{name}: lean off by {err:.3g} of its scale at theta={theta_p}'
    # 3 bytes per neuron-step instead of 4: the rest ([T] alpha, TSG's small tensors) equal
    assert bytes_normal - bytes_lean == 1 * T * N


def test_smooth_lean_surrogates_see_the_levels():
    """The inputs of the test above reach the surrogates' windows at large thresholds: the
    normal-mode input gradient differs from the one without surrogate terms (detach_reset,
    no spike gradient), so a lean form that lost h near the levels would show."""
    T, N = 6, 1001
    x, grad = near_levels(T, N, 1e4, -6e3, 2, 2)
    sg = TSG(T=T)
    (_, _, gx, _, _), _ = run('normal', sg, x, grad, v_threshold=1e4, v_threshold_neg=-6e3)
    assert (gx.abs() > 1.5).float().mean() > 0.1  # TSG's peak slope a = 2 per level


@pytest.mark.parametrize('kind', ['tsg', 'atan'])
@pytest.mark.parametrize('k_pos,k_neg', [(2, 2), (5, 3), (1, 0)])
def test_smooth_lean_saves_nearest_level_and_offset(kind, k_pos, k_neg):
    """The saved [T, 3, N] uint8: float16 offset bits (low, high byte planes) and the signed
    index of the nearest level (0: the rest point); level + offset gives h back to float16's
    relative precision of the offset."""
    T, N = 5, 203
    theta_p, theta_n = 3.0, -1.7
    x, _ = near_levels(T, N, theta_p, theta_n, k_pos, k_neg, seed=2)
    v0 = torch.zeros(N)
    alpha = torch.full((T,), 2.0)
    args = (x, v0, alpha, KIND_CODES[kind], 0.25, 1.0, theta_p, theta_n, k_pos, k_neg, False)
    _, _, h, _ = forward_op('cpp')(*args, True, True, False)  # float32 h returned
    _, _, saved, _ = forward_op('cpp')(*args, True, False, False, True)  # lean
    assert saved.dtype == torch.uint8 and tuple(saved.shape) == lean_shape(kind, T, N) == (T, 3, N)
    bits = saved[:, 0].to(torch.int32) | (saved[:, 1].to(torch.int32) << 8)
    d = bits.to(torch.int16).view(torch.float16).float()
    m = saved[:, 2].view(torch.int8).long()
    assert int(m.min()) >= -k_neg and int(m.max()) <= k_pos
    assert int(m.min()) < 0 < int(m.max()) or k_neg == 0
    levels = torch.where(m > 0, m * theta_p, torch.where(m < 0, -m * theta_n, 0.0)).float()
    # nearest: no other level (or 0) is closer than the saved one
    for j in list(range(-k_neg, k_pos + 1)):
        other = j * theta_p if j > 0 else (-j * theta_n if j < 0 else 0.0)
        assert ((h - other).abs() >= (h - levels).abs() - 1e-5).all(), j
    torch.testing.assert_close(d, (h - levels).half().float(), rtol=0, atol=0)
    torch.testing.assert_close(levels + d, h, rtol=2.0 ** -11, atol=1e-6)


def test_cfnode_lean_network_saves_less():
    """A training step of Linear + CFNode: the saved bytes drop by 3 B (CFRect) / 1 B (TSG) per
    neuron-step, the rest of the graph unchanged."""
    T, B, n = 6, 4, 32
    x = torch.randn(T, B, n)
    out = {}
    for sg_name in ('rect', 'tsg'):
        for memory in ('normal', 'lean'):
            torch.manual_seed(0)
            net = torch.nn.Sequential(
                torch.nn.Linear(n, n),
                CFNode(step_mode='m', memory=memory,
                       surrogate_function=CFRect() if sg_name == 'rect' else TSG(T=T)))
            with SavedBytes() as sb:
                y = net(x)
            y.sum().backward()
            out[sg_name, memory] = (sb.bytes, net[0].weight.grad.clone())
    assert out['rect', 'normal'][0] - out['rect', 'lean'][0] == 3 * T * B * n
    assert out['tsg', 'normal'][0] - out['tsg', 'lean'][0] == 1 * T * B * n
    assert torch.equal(out['rect', 'normal'][1], out['rect', 'lean'][1])


def test_lean_options_and_errors():
    node = CFNode(step_mode='m', memory='lean')
    assert "memory='lean'" in repr(node)
    with pytest.raises(ValueError, match="memory must be one of"):
        CFNode(memory='small')
    with pytest.raises(ValueError, match='memory must be one of'):
        cf_multi_step(torch.zeros(1, 2), torch.zeros(2), memory=None)
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match='k_pos and k_neg must be <= 15'):
        cf_multi_step(x, torch.zeros(8), k_pos=16, backend='cpp', memory='lean')
    # the smooth surrogates keep the nearest level's index in a signed byte: K <= 127
    cf_multi_step(x, torch.zeros(8), k_pos=127, k_neg=127, surrogate_function=TSG(T=3),
                  backend='cpp', memory='lean')[0].sum().backward()
    with pytest.raises(ValueError, match='k_pos and k_neg must be <= 127'):
        cf_multi_step(x, torch.zeros(8), k_neg=128, surrogate_function=TSG(T=3), backend='cpp',
                      memory='lean')
    assert lean_dtype('tsg') == lean_dtype('rect') == torch.uint8


def test_lean_without_grad_or_with_h_seq_saves_float32_or_nothing():
    x = torch.randn(4, 10, requires_grad=True)
    with SavedBytes() as sb:
        s, _, h, _ = cf_multi_step(x, torch.zeros(10), backend='cpp', memory='lean',
                                   return_h_seq=True)
    assert h.dtype == torch.float32
    assert sb.bytes == 4 * 4 * 10 + 4 * 4  # h is kept for the caller anyway: saved as is
    with torch.no_grad():
        s2, _, _, _ = cf_multi_step(x, torch.zeros(10), backend='cpp', memory='lean')
    assert torch.equal(s.detach(), s2)


def test_reference_backend_runs_normal_mode_with_a_warning():
    from spikingjelly_cf.functional import neuron as fn
    fn._warned.discard('lean-torch')
    x, grad = inputs(4, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ref_lean, _ = run('lean', CFRect(), x, grad, backend='torch')
    assert any("memory='lean'" in str(w.message) for w in caught)
    ref, _ = run('normal', CFRect(), x, grad, backend='torch')
    for a, b in zip(ref[:4], ref_lean[:4]):
        assert torch.equal(a, b)


def test_lean_under_opcheck():
    T, N = 3, 16
    x = torch.randn(T, N, requires_grad=True)
    for kind in ('rect', 'tsg'):
        alpha = torch.full((T,), 2.0, requires_grad=kind == 'tsg')
        # schema, fake (the lean h is uint8 [T, N] / [T, 3, N] in both) and autograd registration; the
        # slow aot_dispatch_dynamic check runs in tests/test_ops.py for the normal mode
        torch.library.opcheck(forward_op('cpp'),
                              (x, torch.zeros(N), alpha, KIND_CODES[kind], 0.25, 1.0, 1.0, -1.0,
                               2, 2, False, True, False, False, True),
                              test_utils=('test_schema', 'test_autograd_registration',
                                          'test_faketensor'))


def test_reference_matches_lean_rect_single_step_node():
    """Single-step CFNode in lean mode over several steps equals the multi-step reference."""
    T, N = 5, 33
    x, grad = inputs(T, N, seed=3)
    node = CFNode(step_mode='s', memory='lean')
    xg = x.clone().requires_grad_(True)
    s = torch.stack([node(xg[t]) for t in range(T)])
    s.backward(grad)
    xr = x.clone().requires_grad_(True)
    s_ref, _, _, _ = cf_multi_step_ref(xr, torch.zeros(N))
    s_ref.backward(grad)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
