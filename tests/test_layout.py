"""Memory layout: a CF layer keeps its input's strides, as PyTorch's elementwise operations and
SpikingJelly's ``LIFNode`` do.

A ``channels_last`` input (the frames of ``[T, B, C, H, W]`` stored as ``[T, B, H, W, C]``, what a
``channels_last`` convolution hands on) or any other permutation of the trailing dimensions with
time outermost must come back with the same strides: spikes, ``v`` (the state), ``v_seq`` and
``h_seq``, in multi-step and single-step mode, on every backend of the ``backend`` fixture (the
Triton interpreter in tests/test_triton.py, 'inductor' in tests/test_inductor.py), with the values
of the contiguous input. Otherwise the next convolution gets a contiguous tensor and converts it
back (or runs its slower contiguous kernel).
"""
import pytest
import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based import neuron as sj_neuron

from _backends import backend  # noqa: F401  (fixture)
from spikingjelly_cf import CFNode, TSG
from spikingjelly_cf.backends._common import memory_order
from spikingjelly_cf.functional import cf_multi_step


def channels_last_seq(T=3, B=2, C=5, H=4, W=3, device='cpu', seed=0):
    """``[T, B, C, H, W]`` whose frames are channels_last (a channels_last conv's output, viewed
    back to time and batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T * B, C, H, W, generator=g) * 2
    return x.contiguous(memory_format=torch.channels_last).view(T, B, C, H, W).to(device)


def layouts(device='cpu'):
    cl = channels_last_seq(device=device)
    g = torch.Generator().manual_seed(1)
    perm = (torch.randn(4, 3, 6, 5, generator=g) * 2).to(device).permute(0, 3, 1, 2)  # [T,5,3,6]
    return {'channels_last': cl, 'permuted': perm}


def test_memory_order():
    cl = channels_last_seq()
    assert memory_order(cl) == (0, 1, 3, 4, 2)
    assert memory_order(cl.contiguous()) is None
    assert memory_order(cl[:, :, :2]) is None  # gaps: not dense, copied
    assert memory_order(cl.transpose(0, 1)) is None  # time not outermost: copied


@pytest.mark.parametrize('layout', ['channels_last', 'permuted'])
def test_multi_step_keeps_layout(backend, layout):  # noqa: F811
    if backend.name == 'torch' and layout == 'permuted':
        pytest.skip("the reference stacks its steps (torch.stack keeps channels_last frames, "
                    "not every permutation)")
    x = layouts(backend.device)[layout]
    assert not x.is_contiguous()
    T = x.shape[0]
    sg = TSG(2 * T).to(backend.device)  # two calls
    node = CFNode(step_mode='m', backend=backend.name, surrogate_function=sg, store_v_seq=True,
                  store_h_seq=True)
    xg = x.detach().clone().requires_grad_(True)
    assert xg.stride() == x.stride()
    with backend.ran(backward=True):
        s = node(xg)
        (s * torch.arange(s.numel(), device=s.device).view_as(s).sin()).sum().backward()
    for name, t in (('spikes', s), ('v_seq', node.v_seq), ('h_seq', node.h_seq)):
        assert t.stride() == x.stride(), name
    assert node.v.stride() == x[0].stride(), 'state'
    assert xg.grad.stride() == x.stride() or xg.grad.is_contiguous()  # autograd's choice
    # the values of the contiguous input
    ref = CFNode(step_mode='m', backend='torch', surrogate_function=TSG(2 * T), store_v_seq=True)
    xr = x.detach().cpu().contiguous().requires_grad_(True)
    s_ref = ref(xr)
    (s_ref * torch.arange(s_ref.numel()).view_as(s_ref).sin()).sum().backward()
    assert torch.equal(s.cpu(), s_ref)
    torch.testing.assert_close(node.v.cpu(), ref.v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(node.v_seq.cpu(), ref.v_seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg.grad.cpu(), xr.grad, rtol=1e-5, atol=1e-5)
    # the next call starts from the kept state (no layout mismatch, same values)
    s2 = node(x)
    assert s2.stride() == x.stride()
    assert torch.equal(s2.cpu(), ref(x.detach().cpu().contiguous()))


def test_single_step_keeps_layout(backend):  # noqa: F811
    x = channels_last_seq(device=backend.device)
    node = CFNode(step_mode='s', backend=backend.name)
    ref = CFNode(step_mode='s', backend='torch')
    with backend.ran():
        for t in range(x.shape[0]):
            s = node(x[t])
            assert s.is_contiguous(memory_format=torch.channels_last), t
            assert node.v.is_contiguous(memory_format=torch.channels_last), t
            assert torch.equal(s.cpu(), ref(x[t].cpu().contiguous()))
    torch.testing.assert_close(node.v.cpu(), ref.v, rtol=1e-5, atol=1e-6)


def test_like_lifnode(backend):  # noqa: F811
    """SpikingJelly's LIFNode keeps channels_last; so does CFNode."""
    x = channels_last_seq(device=backend.device)
    lif = sj_neuron.LIFNode(step_mode='m')
    cf = CFNode(step_mode='m', backend=backend.name)
    assert lif(x).stride() == x.stride()
    with backend.ran():
        assert cf(x).stride() == x.stride()
    functional.reset_net(cf)


def test_functional_keeps_layout(backend):  # noqa: F811
    x = layouts(backend.device)['channels_last']
    v = torch.zeros_like(x[0])  # zeros_like keeps the layout too
    with backend.ran():
        s, v_last, h, v_seq = cf_multi_step(x, v, backend=backend.name, return_h_seq=True,
                                            return_v_seq=True)
    assert s.stride() == h.stride() == v_seq.stride() == x.stride()
    assert v_last.stride() == x[0].stride()
    if backend.name == 'torch':  # the reference's k * v + x follows the first operand, v
        return
    # a contiguous state with a channels_last input: a kernel's outputs follow the input
    with backend.ran():
        s2, v2, _, _ = cf_multi_step(x, v.contiguous(), backend=backend.name)
    assert s2.stride() == x.stride() and v2.stride() == x[0].stride()
    assert torch.equal(s2, s)
