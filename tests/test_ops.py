"""The fused kernels as torch.library custom ops: schema, fake implementations, autograd.

``torch.library.opcheck`` checks each op's registration (schema, fake tensor propagation,
autograd registration, AOT dispatch) for every surrogate kind; the remaining tests check the
fake implementation's metadata against the real kernel and that the ops are what a traced graph
calls.
"""
import pytest
import torch

from spikingjelly_cf.backends import _ops, is_available
from spikingjelly_cf.backends._common import KIND_CODES

needs_cpp = pytest.mark.skipif(not is_available("cpp"), reason="the cpp extension is not built")

# kind, k, c, theta_p, theta_n, k_pos, k_neg, detach_reset
CASES = [
    ('rect', 0.25, 1.0, 1.0, -1.0, 2, 2, False),
    ('tsg', 0.5, 0.5, 0.5, -0.75, 3, 1, False),
    ('sigmoid', 0.25, 1.0, 1.0, -1.0, 1, 0, True),
    ('atan', 0.75, 1.0, 2.0, -1.0, 2, 2, False),
]


def _inputs(kind, T=5, N=7, requires_grad=True):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(T, N, generator=gen) * 2).requires_grad_(requires_grad)
    v0 = torch.randn(N, generator=gen).requires_grad_(requires_grad)
    alpha = (torch.rand(T, generator=gen) * 2 + 0.5).requires_grad_(requires_grad and kind == 'tsg')
    return x, v0, alpha


@needs_cpp
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize('return_h, return_v', [(False, False), (True, True)])
def test_opcheck_forward(case, return_h, return_v):
    kind, k, c, tp, tn, kp, kn, dr = case
    x, v0, alpha = _inputs(kind)
    args = (x, v0, alpha, KIND_CODES[kind], k, c, tp, tn, kp, kn, dr, True, return_h, return_v)
    torch.library.opcheck(_ops.forward_op('cpp'), args)


@needs_cpp
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_opcheck_backward(case):
    kind, k, c, tp, tn, kp, kn, dr = case
    x, v0, alpha = _inputs(kind, requires_grad=False)
    h = _ops.forward_op('cpp')(x, v0, alpha, KIND_CODES[kind], k, c, tp, tn, kp, kn, dr, True,
                               False, False)[2]
    T, N = h.shape
    grads = (torch.randn(T, N), None, torch.randn(T, N), torch.randn(N))
    args = (h, alpha, *grads, KIND_CODES[kind], k, c, tp, tn, kp, kn, dr, kind == 'tsg',
            torch.float32)
    torch.library.opcheck(_ops.backward_op('cpp'), args)


@needs_cpp
@pytest.mark.parametrize('save_h, return_h, return_v', [(False, False, False), (True, False, True),
                                                        (False, True, False)])
def test_fake_matches_real(save_h, return_h, return_v):
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, v0, alpha = _inputs('rect', requires_grad=False)
    args = (KIND_CODES['rect'], 0.25, 1.0, 1.0, -1.0, 2, 2, False, save_h, return_h, return_v)
    real = _ops.forward_op('cpp')(x, v0, alpha, *args)
    with FakeTensorMode() as mode:
        fake = _ops.forward_op('cpp')(mode.from_tensor(x), mode.from_tensor(v0),
                                      mode.from_tensor(alpha), *args)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
    assert real[2].numel() == (x.numel() if save_h or return_h else 0)
    assert real[3].numel() == (x.numel() if return_v else 0)


@needs_cpp
def test_traced_graph_calls_the_op():
    """make_fx through the public multi-step function records the forward op, not its body."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from spikingjelly_cf.backends.cpp import cf_multi_step_cpp

    def f(x, v):
        return cf_multi_step_cpp(x, v)[0]

    gm = make_fx(f)(torch.randn(3, 4), torch.zeros(4))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == 'call_function'}
    assert 'spikingjelly_cf.cf_forward_cpp.default' in targets


@pytest.mark.skipif(not is_available('cupy'), reason='needs CUDA and CuPy')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_opcheck_cupy(case, dtype):
    kind, k, c, tp, tn, kp, kn, dr = case
    x, v0, alpha = _inputs(kind, requires_grad=False)
    x, v0, alpha = x.cuda().to(dtype), v0.cuda().to(dtype), alpha.cuda()
    x.requires_grad_(), v0.requires_grad_(), alpha.requires_grad_(kind == 'tsg')
    args = (x, v0, alpha, KIND_CODES[kind], k, c, tp, tn, kp, kn, dr, True, True, True)
    torch.library.opcheck(_ops.forward_op('cupy'), args)
