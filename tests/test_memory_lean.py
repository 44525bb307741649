"""Memory-lean mode (``CFNode(memory='lean')``): at most 2 bytes saved per neuron-step.

CFRect saves one uint8 window code per neuron-step and its gradients must be bit-identical to
the normal mode (and match the reference); TSG / Sigmoid / ATan save ``h`` as float16 and their
gradients must be exactly those of the float32 backward run on ``h`` rounded to float16.
"""
import warnings

import pytest
import torch
from spikingjelly.activation_based import surrogate as sj_surrogate

from spikingjelly_cf import CFNode
from spikingjelly_cf.backends import cpp
from spikingjelly_cf.backends._common import KIND_CODES
from spikingjelly_cf.backends._ops import backward_op, lean_dtype
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
    from spikingjelly_cf.backends._ops import forward_op
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


@pytest.mark.parametrize('kind', ['tsg', 'sigmoid', 'atan'])
@pytest.mark.parametrize('k_pos,k_neg', [(2, 2), (5, 3)])
def test_smooth_lean_is_float16_h(kind, k_pos, k_neg):
    """Lean gradients == the float32 backward op run on h rounded to float16 (bit for bit)."""
    T, N = 6, 257
    x, grad = inputs(T, N, seed=1)
    make = surrogates(T)[kind]
    kw = dict(k_pos=k_pos, k_neg=k_neg)
    lean, bytes_lean = run('lean', make(), x, grad, **kw)
    normal, bytes_normal = run('normal', make(), x, grad, **kw)
    assert torch.equal(lean[0], normal[0]) and torch.equal(lean[1], normal[1])  # forward unchanged
    # expected: h from the forward (float32), rounded to half, through the float32 backward op
    sg = make()
    _, _, h, _ = cf_multi_step(x, torch.zeros(N), surrogate_function=sg, backend='cpp',
                               return_h_seq=True, **kw)
    h16 = h.half().float()
    alpha = (sg.alpha()[:T].detach().float().contiguous() if kind == 'tsg'
             else torch.full((T,), float(sg.alpha), dtype=torch.float32))
    gx, gv0, ga = backward_op('cpp')(h16.contiguous(), alpha, grad, None, None, torch.ones(N),
                                     KIND_CODES[kind], 0.25, 1.0, 1.0, -1.0, k_pos, k_neg, False,
                                     kind == 'tsg', torch.float32)
    assert torch.equal(lean[2], gx) and torch.equal(lean[3], gv0)
    if kind == 'tsg':  # dL/dp = dL/da * da/dp
        a = sg.alpha()[:T]
        gp, = torch.autograd.grad(a, sg.p, ga)
        torch.testing.assert_close(lean[4][0], gp, rtol=0, atol=0)
    # the effect of float16 h on the gradients stays small (measured: ~1e-3 relative)
    rel = ((lean[2] - normal[2]).abs().max() / normal[2].abs().max()).item()
    assert rel < 1e-2
    # float16 h instead of float32 h; the rest ([T]-sized alpha and TSG's own small tensors) equal
    assert bytes_normal - bytes_lean == 2 * T * N
    assert bytes_lean <= 2 * T * N + 16 * T
    assert lean_dtype(kind) == torch.float16


def test_cfnode_lean_network_saves_less():
    """A training step of Linear + CFNode: the saved bytes drop by 3 B (CFRect) / 2 B (TSG) per
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
    assert out['tsg', 'normal'][0] - out['tsg', 'lean'][0] == 2 * T * B * n
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
    # the smooth surrogates have no K limit (float16 h)
    cf_multi_step(x, torch.zeros(8), k_pos=16, surrogate_function=TSG(T=3), backend='cpp',
                  memory='lean')[0].sum().backward()


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
    from spikingjelly_cf.backends._ops import forward_op
    T, N = 3, 16
    x = torch.randn(T, N, requires_grad=True)
    for kind in ('rect', 'tsg'):
        alpha = torch.full((T,), 2.0, requires_grad=kind == 'tsg')
        # schema, fake (the lean h is uint8 / float16 in both) and autograd registration; the
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
