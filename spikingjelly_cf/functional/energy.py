r"""Operation counts and energy of synaptic layers (Eq. 26-28 of the paper, docs/method.md, section 4).

A CF neuron emits signed multi-level spikes :math:`s \in \{-K_N, \dots, K_P\}`. A synaptic
layer (``Conv1d/2d/3d``, ``Linear``, and SpikingJelly's ``layer.*`` versions, which subclass
them) fed by such spikes performs, for each input element, :math:`|s|` accumulate operations
per synapse leaving it, so

.. math::

    \text{SOPs} = \sum_{\text{input elements } i} |s_i| \cdot \text{fan-out}(i),

where a spike of magnitude :math:`m` counts :math:`m` operations and negative spikes count by
magnitude (they never cancel). Eq. 26 estimates the same number from the mean firing rate,
:math:`\text{SOPs} \approx f_r \cdot T \cdot \text{FLOPs}`; both agree whenever every input
element has the same fan-out (``Linear``, convolutions without padding) or the spikes are
uniform. SpikingJelly's own op counter treats non-binary spikes as MACs, hence these helpers.

Conventions: ``FLOPs`` are multiply-accumulates (MACs) of one forward pass, bias additions
not counted (as in the paper's Table X and SpikingJelly's counter); counts include the
kernel taps that fall on zero padding.

Average pooling between spikes and a synaptic layer (``AvgPool -> Conv``,
``AvgPool -> Flatten -> Linear``, ``AdaptiveAvgPool``) makes the layer's input non-integer, but
pooling is linear: the layer and the pool before it form one linear map of the pre-pool spikes
(the pool folded into the weights; ``pool -> conv`` is a convolution with a larger kernel and
stride). :func:`pooled_synaptic_operations` counts the layer as spike-driven over the pre-pool
spikes: each spike of magnitude :math:`m` costs :math:`m` operations per output of the folded map
it reaches,

.. math::

    \text{SOPs} = \sum_{\text{pre-pool elements } i} |s_i| \cdot
    \bigl|\{\text{outputs } o : o \text{ depends on } i\}\bigr|,

so for non-overlapping pools a spike costs what one spike at its pooled position would cost
the layer, and for overlapping windows a pre-pool element that lies in several windows still
reaches each output once.
"""
import math
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'E_SOP', 'E_MAC', 'E_FLOP_ANN', 'SYNAPTIC_LAYER_TYPES', 'is_synaptic_layer', 'is_spike_valued',
    'synaptic_flops', 'synaptic_operations', 'firing_rate', 'sops_estimate', 'snn_energy',
    'mac_energy', 'ann_energy', 'AVERAGE_POOL_TYPES', 'pooled_synaptic_operations',
]

#: Energy per synaptic operation, 77 fJ (Eq. 27).
E_SOP = 77e-15
#: Energy per multiply-accumulate of a layer fed with real values (the encoding layer):
#: 4.6 pJ, the 45 nm 32-bit float MAC (3.7 pJ multiply + 0.9 pJ add) used by Spikformer [46],
#: whose accounting the paper follows.
E_MAC = 4.6e-12
#: Energy per FLOP of the ANN reference, 12.5 pJ (Eq. 28).
E_FLOP_ANN = 12.5e-12

#: The synaptic layers counted. SpikingJelly's ``layer.Conv1d/2d/3d`` and ``layer.Linear``
#: subclass these, so they are counted too.
SYNAPTIC_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: Average pooling layers (SpikingJelly's ``layer.AvgPool*`` / ``layer.AdaptiveAvgPool*``
#: subclass them) that :func:`pooled_synaptic_operations` folds into the next synaptic layer.
AVERAGE_POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                      nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)

_POOL_DIMS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
              nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_synaptic_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose operations are counted (see :data:`SYNAPTIC_LAYER_TYPES`).

    Examples
    --------
    >>> is_synaptic_layer(nn.Linear(3, 4)), is_synaptic_layer(nn.ReLU())
    (True, False)
    """
    return isinstance(module, SYNAPTIC_LAYER_TYPES)


def _check_layer(module: nn.Module):
    if not is_synaptic_layer(module):
        raise TypeError(f'module must be one of {[t.__name__ for t in SYNAPTIC_LAYER_TYPES]} '
                        f'(or a subclass such as spikingjelly layer.Conv2d), got {type(module).__name__}')


def _conv_dims(module: nn.Module) -> int:
    for cls, dims in _CONV_DIMS.items():
        if isinstance(module, cls):
            return dims
    return 0


def _batched(module: nn.Module, x: torch.Tensor, step_mode: str = None) -> torch.Tensor:
    """``x`` as the batched single-step input its layer's own ``forward`` sees."""
    dims = _conv_dims(module)
    if step_mode is None:
        step_mode = getattr(module, 'step_mode', 's')
    if step_mode not in ('s', 'm'):
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    if dims == 0:  # Linear: any leading dimensions
        if x.dim() < 1 or x.shape[-1] != module.in_features:
            raise ValueError(f'input of {type(module).__name__} must end with in_features='
                             f'{module.in_features}, got shape {tuple(x.shape)}')
        return x
    if step_mode == 'm' and x.dim() == dims + 3:
        return x.flatten(0, 1)
    if x.dim() == dims + 2:
        return x
    if x.dim() == dims + 1:  # unbatched
        return x.unsqueeze(0)
    raise ValueError(f'input of {type(module).__name__} (step_mode={step_mode!r}) has an unexpected '
                     f'shape {tuple(x.shape)}')


def _shape_and_out(module, input_shape):
    dims = _conv_dims(module)
    if dims == 0:
        return None
    # output spatial size by the usual formula (padding may be a string: 'same' / 'valid')
    spatial = list(input_shape[2:])
    if isinstance(module.padding, str):
        if module.padding == 'same':
            return spatial
        padding = (0,) * dims
    else:
        padding = module.padding
    out = []
    for i in range(dims):
        eff = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        out.append((spatial[i] + 2 * padding[i] - eff) // module.stride[i] + 1)
    return out


def synaptic_flops(module: nn.Module, x: Union[torch.Tensor, Sequence[int]], step_mode: str = None) -> int:
    r"""Multiply-accumulates (the paper's FLOPs) of ``module`` on input ``x``, whole batch.

    .. math::

        \text{FLOPs}_{\text{Conv}} = N \cdot C_{out} \cdot \prod_d L^{out}_d \cdot
        \frac{C_{in}}{\text{groups}} \prod_d k_d, \qquad
        \text{FLOPs}_{\text{Linear}} = N \cdot F_{in} \cdot F_{out}.

    Parameters
    ----------
    module : nn.Module
        A synaptic layer (:data:`SYNAPTIC_LAYER_TYPES` or a subclass).
    x : torch.Tensor or sequence of int
        The input (or its shape) as passed to the layer: ``[N, C, *]`` (or unbatched), or
        ``[T, N, C, *]`` for a SpikingJelly layer in multi-step mode.
    step_mode : str, optional
        ``'s'`` or ``'m'``; default: the layer's ``step_mode`` attribute, else ``'s'``.

    Returns
    -------
    int
        MACs of this forward call (all steps and samples in ``x``).

    Examples
    --------
    >>> synaptic_flops(nn.Conv2d(2, 3, 3), (4, 2, 5, 5))  # 4 samples * 3*3*3 outputs * 2*3*3 taps
    1944
    >>> synaptic_flops(nn.Linear(10, 5), (2, 10))
    100
    """
    _check_layer(module)
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(int(v) for v in x)
    shape = tuple(_batched(module, torch.empty(shape, device='meta'), step_mode).shape)
    if _conv_dims(module) == 0:
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    out = _shape_and_out(module, shape)
    taps = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return shape[0] * module.out_channels * math.prod(out) * taps


def synaptic_operations(module: nn.Module, s: torch.Tensor, step_mode: str = None) -> torch.Tensor:
    r"""Exact synaptic operations of ``module`` fed with spikes ``s`` (docs/method.md, section 4).

    .. math::

        \text{SOPs} = \sum_i |s_i| \cdot \text{fan-out}(i).

    For ``Linear`` the fan-out is ``out_features``. For a convolution, the fan-out of an
    input element is the number of (output channel, output position) pairs whose receptive
    field contains it. Summing a convolution of :math:`|s|` with an all-ones kernel over all
    outputs counts every input element once per such pair, so
    ``SOPs = conv(|s|, ones).sum()``; the ones kernel needs only one output channel per
    group (then times ``out_channels / groups``). Stride, dilation, groups and padding modes
    are those of the layer; taps on zero padding count nothing.

    Parameters
    ----------
    module : nn.Module
        A synaptic layer.
    s : torch.Tensor
        Its input, ``[N, C, *]``, or ``[T, N, C, *]`` for a SpikingJelly layer in multi-step mode.
    step_mode : str, optional
        ``'s'`` or ``'m'``; default: the layer's ``step_mode`` attribute, else ``'s'``.

    Returns
    -------
    torch.Tensor
        Scalar float64 tensor on ``s``'s device (no gradient): the SOPs of this call.

    Examples
    --------
    >>> s = torch.tensor([[2., 0., -1.]])
    >>> float(synaptic_operations(nn.Linear(3, 4), s))  # (2 + 1) * 4
    12.0
    >>> s = torch.zeros(1, 1, 3, 3); s[0, 0, 1, 1] = -2.  # centre pixel, touched by all 9 outputs
    >>> float(synaptic_operations(nn.Conv2d(1, 5, 3, padding=1), s))  # 2 * 5 * 9
    90.0
    """
    _check_layer(module)
    with torch.no_grad():
        a = _batched(module, s, step_mode).detach().abs()
        if not a.is_floating_point() or a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()  # integer and half sums would overflow or round
        dims = _conv_dims(module)
        if dims == 0:
            return a.sum(dtype=torch.float64) * module.out_features
        groups = module.groups
        ones = torch.ones(groups, module.in_channels // groups, *module.kernel_size,
                          dtype=a.dtype, device=a.device)
        padding = module.padding
        if module.padding_mode != 'zeros':  # 'reflect' / 'replicate' / 'circular' copy real inputs
            a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        # every output of conv(|s|, ones) is a small integer (for integer spikes): exact in
        # float32; the total is summed in float64
        out = _CONV_FUNCTIONS[dims](a, ones, None, module.stride, padding, module.dilation, groups)
        return out.sum(dtype=torch.float64) * (module.out_channels // groups)


def is_spike_valued(x: torch.Tensor) -> torch.Tensor:
    """Whether every element of ``x`` is an integer (a signed spike count), as a bool tensor.

    Returned as a tensor so that callers can accumulate it without a device synchronisation.

    Examples
    --------
    >>> bool(is_spike_valued(torch.tensor([0., -2., 1.]))), bool(is_spike_valued(torch.tensor([0.5])))
    (True, False)
    """
    if not x.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=x.device)
    return torch.eq(x, torch.round(x)).all()


def firing_rate(s: torch.Tensor) -> torch.Tensor:
    r"""Mean spike magnitude per input neuron and step, :math:`f_r = \operatorname{mean} |s|`.

    Examples
    --------
    >>> float(firing_rate(torch.tensor([2., -2., 0., 0.])))
    1.0
    """
    return s.detach().abs().mean(dtype=torch.float64)


def sops_estimate(firing_rate: float, T: int, flops: float) -> float:
    r"""Eq. 26: :math:`\text{SOPs}(l) = f_r \times T \times \text{FLOPs}(l)`.

    ``flops`` are the MACs of one step (per sample, or for a whole batch, matching the
    normalisation wanted), ``firing_rate`` the mean :math:`|s|` per input neuron and step.

    Examples
    --------
    >>> sops_estimate(0.25, 4, 1000)
    1000.0
    """
    return float(firing_rate) * T * flops


def snn_energy(sops: float, e_sop: float = E_SOP) -> float:
    r"""Eq. 27: :math:`E = 77\,\text{fJ} \times \text{SOPs}` (joules).

    Examples
    --------
    >>> snn_energy(1e9)  # 1 G SOPs -> 77 uJ
    7.7e-05
    """
    return float(sops) * e_sop


def mac_energy(macs: float, e_mac: float = E_MAC) -> float:
    r"""Energy of a layer fed with real values: :math:`E = e_{MAC} \times \text{MACs}` (joules).

    Examples
    --------
    >>> mac_energy(1e6, e_mac=4.6e-12)
    4.6e-06
    """
    return float(macs) * e_mac


def ann_energy(flops: float, e_flop: float = E_FLOP_ANN) -> float:
    r"""Eq. 28, the ANN reference: :math:`E = 12.5\,\text{pJ} \times \text{FLOPs}` (joules).

    Examples
    --------
    >>> ann_energy(1e9)
    0.0125
    """
    return float(flops) * e_flop


# ----------------------------------------------------------------------------------------------
# average pooling folded into the next synaptic layer
# ----------------------------------------------------------------------------------------------
def _pool_dims(pool: nn.Module) -> int:
    for cls, dims in _POOL_DIMS.items():
        if isinstance(pool, cls):
            return dims
    raise TypeError(f'pool must be one of {[t.__name__ for t in AVERAGE_POOL_TYPES]} (or a '
                    f'subclass such as spikingjelly layer.AvgPool2d), got {type(pool).__name__}')


def _per_dim(value, dims: int, d: int):
    if isinstance(value, (tuple, list)):
        return value[d] if len(value) == dims else value[0]
    return value


def _connections(pool_or_conv, eye: torch.Tensor, d: int, dims: int) -> torch.Tensor:
    """Which outputs of dimension ``d`` of a pool or convolution depend on which inputs: a bool
    ``[L_out, L_in]`` from the 1-D version of the layer applied to the identity."""
    m = pool_or_conv
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        size = _per_dim(m.output_size, dims, d)
        out = F.adaptive_avg_pool1d(eye, eye.shape[-1] if size is None else int(size))
    elif isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        stride = m.stride if m.stride is not None else m.kernel_size
        out = F.avg_pool1d(eye, int(_per_dim(m.kernel_size, dims, d)), int(_per_dim(stride, dims, d)),
                           int(_per_dim(m.padding, dims, d)), bool(m.ceil_mode), True)
    else:  # a convolution: its taps as a ones kernel
        padding = m.padding
        if m.padding_mode != 'zeros':
            pads = m._reversed_padding_repeated_twice
            i = 2 * (dims - 1 - d)
            eye = F.pad(eye, (pads[i], pads[i + 1]), mode=m.padding_mode)
            padding = 0
        elif not isinstance(padding, str):
            padding = int(padding[d])
        ones = torch.ones(1, 1, m.kernel_size[d], dtype=eye.dtype, device=eye.device)
        out = F.conv1d(eye, ones, None, m.stride[d], padding, m.dilation[d])
    return out[:, 0, :].t() > 0


def _fold(pool: nn.Module, module: nn.Module, in_shape) -> torch.Tensor:
    """Fan-out of every pre-pool position through ``module`` after ``pool``: a float64 tensor of
    the pooled dimensions' shape (the same for every channel). ``in_shape`` is the pre-pool
    shape ``[..., C, *spatial]``. Raises ``ValueError`` when the pair cannot be folded."""
    dims = _pool_dims(pool)
    _check_layer(module)
    if len(in_shape) < dims + 1:
        raise ValueError(f'{type(pool).__name__} input {tuple(in_shape)} has no channel dimension')
    channels, spatial = int(in_shape[-dims - 1]), [int(v) for v in in_shape[-dims:]]
    counts, pooled = [], []
    for d, length in enumerate(spatial):
        eye = torch.eye(length, dtype=torch.float64).unsqueeze(1)
        p = _connections(pool, eye, d, dims)                      # [L_pooled, L]
        pooled.append(p.shape[0])
        counts.append(p)
    conv_dims = _conv_dims(module)
    if conv_dims == 0:  # Linear over the flattened pooled sample
        if module.in_features != channels * math.prod(pooled):
            raise ValueError(f'{type(module).__name__}(in_features={module.in_features}) does not read '
                             f'the whole flattened output of {type(pool).__name__} ({channels} '
                             f'channels x {pooled})')
        per_dim = [p.any(0).to(torch.float64) for p in counts]
        mult = module.out_features
    else:
        if conv_dims != dims:
            raise ValueError(f'{type(module).__name__} after {type(pool).__name__}: different '
                             f'numbers of spatial dimensions')
        if module.in_channels != channels:
            raise ValueError(f'{type(module).__name__}(in_channels={module.in_channels}) after '
                             f'{type(pool).__name__} with {channels} channels')
        per_dim = []
        for d, p in enumerate(counts):
            eye = torch.eye(p.shape[0], dtype=torch.float64).unsqueeze(1)
            c = _connections(module, eye, d, dims)                # [L_out, L_pooled]
            per_dim.append(((c.to(torch.float64) @ p.to(torch.float64)) > 0).sum(0).to(torch.float64))
        mult = module.out_channels // module.groups
    weight = per_dim[0]
    for w in per_dim[1:]:
        weight = weight.unsqueeze(-1) * w
    return weight * mult


def pooled_synaptic_operations(pool: nn.Module, module: nn.Module, s: torch.Tensor):
    r"""Exact synaptic operations of ``module`` fed with ``pool(s)``, counted over the pre-pool
    spikes ``s`` with the pool folded into the layer's weights (docs/method.md, section 4).

    .. math::

        \text{SOPs} = \sum_i |s_i| \cdot \text{fan-out}_{\text{module} \circ \text{pool}}(i)

    where the fan-out of a pre-pool element is the number of the layer's outputs that depend on
    it (a spike reaches each output of the folded map once, even when overlapping windows
    contain it several times).

    Parameters
    ----------
    pool : nn.Module
        An average pooling layer (:data:`AVERAGE_POOL_TYPES` or a subclass), pooling the last
        1, 2 or 3 dimensions.
    module : nn.Module
        The synaptic layer that reads the pool's output: a convolution with as many spatial
        dimensions, or a ``Linear`` over the flattened pooled sample (``Flatten`` in between).
    s : torch.Tensor
        The pool's input, ``[..., C, *spatial]`` (any leading dimensions: batch, time).

    Returns
    -------
    (torch.Tensor, int)
        The SOPs of this call (scalar float64 tensor on ``s``'s device), and the MACs of the
        folded map per leading index (sample-step): its synapses, for Eq. 26's estimate.

    Raises
    ------
    ValueError
        When the layer does not read the pool's output as a whole (channels, dimensions or
        ``in_features`` that do not match).

    Examples
    --------
    >>> s = torch.zeros(1, 1, 4, 4); s[0, 0, 0, 0] = 2.; s[0, 0, 3, 3] = -1.
    >>> pool, fc = nn.AvgPool2d(2), nn.Linear(4, 5)   # after Flatten: 1 channel x 2 x 2
    >>> sops, macs = pooled_synaptic_operations(pool, fc, s)
    >>> float(sops), macs    # (2 + 1) spikes x 5 outputs; 16 inputs x 5 outputs
    (15.0, 80)
    """
    with torch.no_grad():
        fan_out = _fold(pool, module, tuple(s.shape))
        dims = _pool_dims(pool)
        a = s.detach().abs()
        if not a.is_floating_point() or a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()
        per_position = a.sum(dim=tuple(range(a.dim() - dims)), dtype=torch.float64)
        sops = (per_position * fan_out.to(per_position.device)).sum()
        macs = int(s.shape[-dims - 1]) * int(round(float(fan_out.sum())))
    return sops, macs
