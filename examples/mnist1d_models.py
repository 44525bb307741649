r"""Residual, transformer and recurrent spiking networks for MNIST-1D (``examples/mnist1d.py --arch``).

Every network is built from SpikingJelly ``layer`` modules in multi-step mode and takes its
spiking neuron in the model zoo's convention (``spiking_neuron(**deepcopy(kwargs))`` per
position, so each layer owns its surrogate and so its TSG parameters). Static networks map
``[T, B, 1, 40]`` to ``[T, B, classes]``; the recurrent one maps ``[T, B, 1]`` (one sample of
the sequence per step) to ``[T, B, classes]``. The read-out is averaged over the steps by the
training loop (Eq. 24).

Residual blocks (``SpikingResNet1d(kind=...)``), ``SN`` a spiking neuron, ``CB`` a convolution
and batch normalisation:

- ``'spiking'``: the paper's Fig. 1 (spiking ResNet, Zheng et al. 2021):
  ``SN(CB(SN(CB(x))) + shortcut(x))``: the shortcut is added *before* the second neuron, so
  that neuron sees the sum of two batch-normalised branches.
- ``'sew'``: SEW-ResNet (Fang et al. 2021), ``ADD``: ``SN(CB(SN(CB(x)))) + shortcut(x)``:
  added *after* the neuron (the block's output is a spike count).
- ``'ms'``: MS-ResNet (Hu et al. 2021), membrane shortcut: ``x + CB(SN(CB(SN(x))))``: a
  real-valued stream of potentials, each block's first neuron sees the running sum.

``Spikformer1d`` is the Spikformer of SpikingJelly 2.0's model zoo in one dimension: a
convolutional patch stem with a relative position embedding, ``depth`` blocks of
``x + SSA(x)``, ``x + MLP(x)`` with SpikingJelly's spiking self-attention
(``layer.attention.SpikingSelfAttention``; on SpikingJelly 0.0.0.0.14, which has none, the
equivalent :class:`SpikingSelfAttention` below, same parameters and arithmetic), and a
linear head on the mean over tokens.

``RecurrentSNN`` is an explicit recurrence for sequences: per layer
``s_t = SN(BN(W x_t) + R s_{t-1})`` with the neuron in single-step mode.
"""
import copy
from typing import Dict, Optional

import torch
import torch.nn as nn

from spikingjelly.activation_based import functional, layer

NUM_CLASSES = 10
SEQUENCE_LENGTH = 40
RESIDUAL_KINDS = ('spiking', 'sew', 'ms')
#: Positions the residual networks' read-out keeps (as the plain network's: 40 / 2^3).
READOUT_POSITIONS = 5


def _neuron(spiking_neuron, kwargs: dict, **override) -> nn.Module:
    kw = copy.deepcopy(kwargs)
    kw.update(override)
    return spiking_neuron(**kw)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(layer.Conv1d(c_in, c_out, kernel_size=kernel, stride=stride, padding=kernel // 2,
                                      bias=False),
                         layer.BatchNorm1d(c_out))


# ----------------------------------------------------------------------------------------------
# residual networks
# ----------------------------------------------------------------------------------------------
class ResidualBlock1d(nn.Module):
    r"""One basic block (two 3-tap convolutions) of kind ``'spiking'``, ``'sew'`` or ``'ms'``.

    Parameters
    ----------
    kind : {'spiking', 'sew', 'ms'}
        Where the shortcut joins (see the module doc).
    c_in, c_out : int
        Channels; ``stride`` 2 halves the length. The shortcut is the identity when the shape
        is kept, else a 1-tap convolution with batch normalisation (SEW: followed by a neuron).
    spiking_neuron, kwargs
        The neuron, built once per position.
    input_is_sum : bool
        Whether the block's input is itself a sum of branches (MS-ResNet after the first block):
        then its first neuron sees a residual sum (used by :class:`ResidualPotentials`).

    Attributes
    ----------
    sn1, sn2 : nn.Module
        The two neurons. ``neuron_after_add`` / ``neuron_before_add``: the neuron whose input
        holds a residual sum, and one in the same block whose input does not (``None`` where the
        kind has none: SEW adds after its neurons).
    """

    def __init__(self, kind: str, c_in: int, c_out: int, stride: int, spiking_neuron, input_is_sum: bool = False,
                 **kwargs):
        super().__init__()
        if kind not in RESIDUAL_KINDS:
            raise ValueError(f'kind must be one of {RESIDUAL_KINDS}, got {kind!r}')
        self.kind = kind
        self.conv1 = _conv_bn(c_in, c_out, 3, stride)
        self.sn1 = _neuron(spiking_neuron, kwargs)
        self.conv2 = _conv_bn(c_out, c_out, 3)
        self.sn2 = _neuron(spiking_neuron, kwargs)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            parts = [layer.Conv1d(c_in, c_out, kernel_size=1, stride=stride, bias=False), layer.BatchNorm1d(c_out)]
            if kind == 'sew':
                parts.append(_neuron(spiking_neuron, kwargs))
            self.shortcut = nn.Sequential(*parts)
        if kind == 'spiking':
            self.neuron_before_add, self.neuron_after_add = 'sn1', 'sn2'
        elif kind == 'ms':
            self.neuron_before_add, self.neuron_after_add = 'sn2', ('sn1' if input_is_sum else None)
        else:
            self.neuron_before_add, self.neuron_after_add = 'sn1', None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == 'spiking':
            return self.sn2(self.conv2(self.sn1(self.conv1(x))) + self.shortcut(x))
        if self.kind == 'sew':
            return self.sn2(self.conv2(self.sn1(self.conv1(x)))) + self.shortcut(x)
        # ms: the stream x is a membrane potential; the neurons sit before the convolutions
        return self.conv2(self.sn2(self.conv1(self.sn1(x)))) + self.shortcut(x)


class SpikingResNet1d(nn.Module):
    r"""Stem, ``depth`` residual blocks in two stages, average over the length, linear read-out.

    ``Conv1d(1, w, 5) - BN (- SN)``, then ``ceil(depth / 2)`` blocks at length 40 and
    ``floor(depth / 2)`` at length 20 (the first of them with stride 2), all ``w`` channels,
    then (MS-ResNet: a neuron on the membrane stream) the read-out of the plain network:
    averaged down to 5 positions, flattened, ``Linear(5 w, classes)`` (a global average would
    drop where along the sequence a feature sits, which MNIST-1D's classes depend on).
    ``depth = 8`` gives 17 spiking layers (ResNet-18 has 17 convolutions), ``depth = 2`` gives 5.

    Parameters
    ----------
    kind : {'spiking', 'sew', 'ms'}
        Block kind (see the module doc).
    width, depth : int
        Channels and number of blocks (each two convolutions and two neurons).
    spiking_neuron : callable
        Built as ``spiking_neuron(**deepcopy(kwargs))`` per position.

    Examples
    --------
    >>> import torch
    >>> from spikingjelly_cf import CFNode
    >>> net = SpikingResNet1d('spiking', width=4, depth=2, spiking_neuron=CFNode, step_mode='m')
    >>> net(torch.randn(3, 2, 1, 40)).shape
    torch.Size([3, 2, 10])
    """

    def __init__(self, kind: str, width: int, depth: int, spiking_neuron, num_classes: int = NUM_CLASSES, **kwargs):
        super().__init__()
        if kind not in RESIDUAL_KINDS:
            raise ValueError(f'kind must be one of {RESIDUAL_KINDS}, got {kind!r}')
        _check_positive_int('width', width)
        _check_positive_int('depth', depth)
        self.kind = kind
        stem = [layer.Conv1d(1, width, kernel_size=5, padding=2, bias=False), layer.BatchNorm1d(width)]
        if kind != 'ms':
            stem.append(_neuron(spiking_neuron, kwargs))
        self.stem = nn.Sequential(*stem)
        first = (depth + 1) // 2
        self.blocks = nn.Sequential(*[
            ResidualBlock1d(kind, width, width, 2 if i == first else 1, spiking_neuron, input_is_sum=i > 0, **kwargs)
            for i in range(depth)])
        self.head_neuron = _neuron(spiking_neuron, kwargs) if kind == 'ms' else nn.Identity()
        self.pool = layer.AdaptiveAvgPool1d(READOUT_POSITIONS)
        self.classifier = nn.Sequential(layer.Flatten(), layer.Linear(READOUT_POSITIONS * width, num_classes))
        functional.set_step_mode(self, 'm')

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        x = self.head_neuron(self.blocks(self.stem(x_seq)))
        return self.classifier(self.pool(x))


# ----------------------------------------------------------------------------------------------
# Spikformer
# ----------------------------------------------------------------------------------------------
class SpikingSelfAttention(nn.Module):
    r"""Spiking self-attention of Spikformer, as SpikingJelly 2.0 defines it
    (``spikingjelly.activation_based.layer.attention.SpikingSelfAttention``), for SpikingJelly
    releases without it.

    Same parameters (names included) and arithmetic: ``qkv = SN(BN(Conv1x1(x)))`` split into
    ``q, k, v`` per head, ``SN_attn((v k^T) q * 0.125)``, then ``SN(BN(Conv1x1(.)))``; each
    neuron built as ``spiking_neuron(**kwargs)`` in multi-step mode. Input and output
    ``[T, N, C, L]``.
    """

    def __init__(self, dim: int, num_heads: int = 8, spiking_neuron=None, **kwargs):
        super().__init__()
        if spiking_neuron is None:
            raise TypeError('spiking_neuron is required (the local spiking self-attention has no default neuron)')
        if dim % num_heads != 0:
            raise ValueError(f'dim {dim} should be divided by num_heads {num_heads}.')
        self.dim, self.num_heads, self.head_dim, self.scale = dim, num_heads, dim // num_heads, 0.125
        kw = dict(kwargs, step_mode='m')
        self.qkv_conv_bn = layer.SeqToANNContainer(nn.Conv1d(dim, dim * 3, kernel_size=1, stride=1, bias=False),
                                                   nn.BatchNorm1d(dim * 3))
        self.qkv_lif = _neuron(spiking_neuron, kw)
        self.attn_lif = _neuron(spiking_neuron, kw)
        self.proj_conv_bn = layer.SeqToANNContainer(nn.Conv1d(dim, dim, kernel_size=1, stride=1, bias=False),
                                                    nn.BatchNorm1d(dim))
        self.proj_lif = _neuron(spiking_neuron, kw)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.ndim != 4:
            raise ValueError(f'expected 4D input with shape [T, N, C, L], but got input with shape {x_seq.shape}')
        T, N, C, L = x_seq.shape
        qkv = self.qkv_lif(self.qkv_conv_bn(x_seq))
        qkv = qkv.reshape(T, N, 3, self.num_heads, C // self.num_heads, L)
        q, k, v = qkv.flatten(2, 3).chunk(3, dim=2)
        x = ((v @ k.transpose(-2, -1)) @ q) * self.scale
        x = self.attn_lif(x).reshape(T, N, C, L)
        return self.proj_lif(self.proj_conv_bn(x))


def spiking_self_attention_class():
    """SpikingJelly's ``SpikingSelfAttention`` where it exists (2.0), else the local equivalent."""
    try:
        from spikingjelly.activation_based.layer.attention import SpikingSelfAttention as SJ
        return SJ
    except ImportError:
        return SpikingSelfAttention


class SpikformerMLP1d(nn.Module):
    """``SN(BN(Conv1x1(SN(BN(Conv1x1(x))))))`` (SpikingJelly 2.0's ``SpikformerMLP``)."""

    def __init__(self, dim: int, hidden: int, spiking_neuron, **kwargs):
        super().__init__()
        self.fc1 = layer.SeqToANNContainer(nn.Conv1d(dim, hidden, kernel_size=1, bias=False), nn.BatchNorm1d(hidden))
        self.neuron1 = _neuron(spiking_neuron, kwargs)
        self.fc2 = layer.SeqToANNContainer(nn.Conv1d(hidden, dim, kernel_size=1, bias=False), nn.BatchNorm1d(dim))
        self.neuron2 = _neuron(spiking_neuron, kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neuron2(self.fc2(self.neuron1(self.fc1(x))))


class SpikformerBlock1d(nn.Module):
    """``x + SSA(x)``, then ``x + MLP(x)`` on tokens ``[T, N, C, L]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, spiking_neuron, **kwargs):
        super().__init__()
        self.attn = spiking_self_attention_class()(dim=dim, num_heads=num_heads, spiking_neuron=spiking_neuron,
                                                   **kwargs)
        self.mlp = SpikformerMLP1d(dim, int(dim * mlp_ratio), spiking_neuron, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Spikformer1d(nn.Module):
    r"""A small Spikformer for ``[T, B, 1, 40]`` sequences.

    Patch stem as in SpikingJelly 2.0's zoo, in 1-D: ``SN(BN(Conv(1, w/2, 5)))``,
    ``SN(MaxPool2(BN(Conv(w/2, w, 3))))`` (20 tokens of ``w`` channels), relative position
    embedding ``x + SN(BN(Conv(w, w, 3)))``; ``depth`` :class:`SpikformerBlock1d`; mean over
    the tokens; ``Linear(w, classes)``. Weights initialised as the zoo does (truncated normal,
    std 0.02).

    Parameters
    ----------
    width : int
        Embedding dimension ``w`` (a multiple of ``num_heads``, and even).
    depth : int
        Number of transformer blocks.
    num_heads : int
        Attention heads.
    mlp_ratio : float
        Hidden width of the MLP over ``w``.

    Examples
    --------
    >>> import torch
    >>> from spikingjelly_cf import CFNode
    >>> net = Spikformer1d(width=8, depth=1, num_heads=2, spiking_neuron=CFNode, step_mode='m')
    >>> net(torch.randn(2, 3, 1, 40)).shape
    torch.Size([2, 3, 10])
    """

    def __init__(self, width: int, depth: int, spiking_neuron, num_heads: int = 4, mlp_ratio: float = 4.0,
                 num_classes: int = NUM_CLASSES, **kwargs):
        super().__init__()
        _check_positive_int('width', width)
        _check_positive_int('depth', depth)
        _check_positive_int('num_heads', num_heads)
        if width % num_heads or width % 2:
            raise ValueError(f'width must be even and a multiple of num_heads={num_heads}, got {width}')
        half = width // 2
        self.stem = nn.Sequential(
            layer.SeqToANNContainer(nn.Conv1d(1, half, kernel_size=5, padding=2, bias=False), nn.BatchNorm1d(half)),
            _neuron(spiking_neuron, kwargs),
            layer.SeqToANNContainer(nn.Conv1d(half, width, kernel_size=3, padding=1, bias=False),
                                    nn.BatchNorm1d(width), nn.MaxPool1d(2)),
            _neuron(spiking_neuron, kwargs))
        self.rpe = nn.Sequential(
            layer.SeqToANNContainer(nn.Conv1d(width, width, kernel_size=3, padding=1, bias=False),
                                    nn.BatchNorm1d(width)),
            _neuron(spiking_neuron, kwargs))
        self.blocks = nn.Sequential(*[SpikformerBlock1d(width, num_heads, mlp_ratio, spiking_neuron, **kwargs)
                                      for _ in range(depth)])
        self.head = layer.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        functional.set_step_mode(self, 'm')

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        x = self.stem(x_seq)
        x = x + self.rpe(x)
        x = self.blocks(x)
        return self.head(x.mean(-1))


# ----------------------------------------------------------------------------------------------
# recurrent network for sequences
# ----------------------------------------------------------------------------------------------
class RecurrentSNN(nn.Module):
    r"""Stacked recurrent spiking layers, one input sample per time step.

    Layer :math:`l`: :math:`s^l_t = SN(BN(W^l s^{l-1}_t) + R^l s^l_{t-1})`, :math:`s^0_t = x_t`,
    :math:`s^l_{-1} = 0`; the feed-forward part runs for all steps at once, the recurrence
    step by step with the neuron in single-step mode (its state carries over the steps; reset
    the network between sequences). Read-out ``Linear(hidden, classes)`` of the last layer's
    spikes at every step.

    Parameters
    ----------
    hidden, depth : int
        Neurons per layer and number of recurrent layers.
    in_features : int
        Input values per step (1 for a scalar sequence).

    Shape
    -----
    ``[T, B, in_features] -> [T, B, classes]``.

    Examples
    --------
    >>> import torch
    >>> from spikingjelly_cf import CFNode
    >>> net = RecurrentSNN(hidden=8, depth=2, spiking_neuron=CFNode, step_mode='m')
    >>> net(torch.randn(40, 3, 1)).shape
    torch.Size([40, 3, 10])
    """

    def __init__(self, hidden: int, depth: int, spiking_neuron, in_features: int = 1,
                 num_classes: int = NUM_CLASSES, **kwargs):
        super().__init__()
        _check_positive_int('hidden', hidden)
        _check_positive_int('depth', depth)
        self.fc = nn.ModuleList()
        self.rec = nn.ModuleList()
        self.neurons = nn.ModuleList()
        for i in range(depth):
            self.fc.append(layer.SeqToANNContainer(nn.Linear(in_features if i == 0 else hidden, hidden, bias=False),
                                                   nn.BatchNorm1d(hidden)))
            self.rec.append(nn.Linear(hidden, hidden, bias=False))
            self.neurons.append(_neuron(spiking_neuron, kwargs))
        self.classifier = layer.Linear(hidden, num_classes)
        functional.set_step_mode(self, 'm')
        for m in self.neurons:
            m.step_mode = 's'

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        for fc, rec, sn in zip(self.fc, self.rec, self.neurons):
            u = fc(x_seq)
            s = torch.zeros_like(u[0])
            out = []
            for t in range(u.shape[0]):
                s = sn(u[t] + rec(s))
                out.append(s)
            x_seq = torch.stack(out)
        return self.classifier(x_seq)


# ----------------------------------------------------------------------------------------------
# the paper's motivating measurement (its Fig. 1): potentials before and after a residual sum
# ----------------------------------------------------------------------------------------------
#: Neuron rules replayed on recorded inputs: (name, positive levels, negative levels, reset).
REPLAY_RULES = (('LIF hard', 1, 0, 'hard'), ('LIF soft', 1, 0, 'soft'), ('SCF', 2, 0, 'soft'), ('CF', 2, 2, 'soft'))
HIST_RANGE = 4.0
HIST_BINS = 80


def replay(x_seq: torch.Tensor, k_pos: int, k_neg: int, reset: str, tau: float = 4 / 3,
           theta: float = 1.0) -> Dict[str, torch.Tensor]:
    r"""Run a neuron rule on input currents ``x_seq`` ``[T, ...]`` and account for the potential.

    Charge :math:`h_t = (1 - 1/\tau) v_{t-1} + x_t` (``decay_input=False``, :math:`v_0 = 0`);
    fire :math:`s_t = \sum_{j \le K_P} H(h_t - j\theta) - \sum_{j \le K_N} H(-j\theta - h_t)`;
    reset ``'soft'`` :math:`v_t = h_t - \theta s_t` (docs/method.md, section 1) or ``'hard'``
    (LIF, one level): :math:`v_t = 0` after a spike, else :math:`h_t`.

    Returns per step ``[T, ...]``, signed: ``h`` (pre-spike potential), ``s``, ``sent``
    (:math:`\theta s_t`), ``discarded`` (what the reset removes without sending it:
    :math:`h_t - \theta` after a hard-reset spike, 0 for a soft reset), ``leaked``
    (:math:`v_{t-1}/\tau`, the potential the decay removes while it waits to be sent) and ``left``
    (:math:`v_t`). Over the window the potential is accounted for exactly:
    :math:`\sum_t x_t = \sum_t (\mathrm{sent}_t + \mathrm{discarded}_t + \mathrm{leaked}_t) + v_T`.
    """
    if reset not in ('soft', 'hard'):
        raise ValueError(f"reset must be 'soft' or 'hard', got {reset!r}")
    if reset == 'hard' and (k_pos, k_neg) != (1, 0):
        raise ValueError('a hard reset is defined here for one positive level only (LIF)')
    k = 1. - 1. / tau
    v = torch.zeros_like(x_seq[0])
    out = {key: [] for key in ('h', 's', 'sent', 'discarded', 'leaked', 'left')}
    for t in range(x_seq.shape[0]):
        out['leaked'].append(v / tau)
        h = k * v + x_seq[t]
        s = torch.zeros_like(h)
        for j in range(1, k_pos + 1):
            s = s + (h >= j * theta).to(h.dtype)
        for j in range(1, k_neg + 1):
            s = s - (h <= -j * theta).to(h.dtype)
        if reset == 'soft':
            v_new = h - theta * s
            discarded = torch.zeros_like(h)
        else:
            v_new = torch.where(s > 0, torch.zeros_like(h), h)
            discarded = torch.where(s > 0, h - theta, torch.zeros_like(h))
        out['h'].append(h)
        out['s'].append(s)
        out['sent'].append(theta * s)
        out['discarded'].append(discarded)
        out['left'].append(v_new)
        v = v_new
    return {key: torch.stack(vals) for key, vals in out.items()}


def _histogram(h: torch.Tensor) -> list:
    return torch.histc(h.float().clamp(-HIST_RANGE, HIST_RANGE), HIST_BINS, -HIST_RANGE, HIST_RANGE).tolist()


def _fractions(h: torch.Tensor, theta: float) -> dict:
    h = h.float()
    return {'above_theta': float((h >= theta).float().mean()), 'above_2theta': float((h >= 2 * theta).float().mean()),
            'below_minus_theta': float((h <= -theta).float().mean()),
            'below_minus_2theta': float((h <= -2 * theta).float().mean()),
            'mean': float(h.mean()), 'std': float(h.std())}


class ResidualPotentials:
    r"""The paper's Fig. 1 measurement on a residual network, over batches passed through it.

    For every residual block, records the input currents of the neuron whose input holds the
    shortcut sum (``after``) and of the block's neuron without it (``before``), and reports:

    - ``histogram``: the pre-spike potentials :math:`h` of the network's own neurons over
      ``[-4, 4]`` (80 bins), and the fractions at or above :math:`\theta` and :math:`2\theta` (and
      at or below :math:`-\theta`, :math:`-2\theta`);
    - ``replay``: the same input currents run through every rule of :data:`REPLAY_RULES`
      (LIF hard / soft, SCF, CF, thresholds :math:`\pm\theta`, same decay), per step the mean
      magnitude of ``sent``, ``discarded``, ``leaked`` and ``left`` (see :func:`replay`), in units
      of :math:`\theta`: how much potential each rule passes on, how much its reset throws away and
      how much decays before it is sent, on identical input.

    Use as a context manager (hooks removed on exit) or call :meth:`remove`.
    """

    def __init__(self, net: nn.Module):
        self.handles, self.neurons, self.inputs = [], {}, {}
        for name, m in net.named_modules():
            if not isinstance(m, ResidualBlock1d):
                continue
            for where, attr in (('before', m.neuron_before_add), ('after', m.neuron_after_add)):
                if attr is None:
                    continue
                key = f'{name}.{attr}'
                self.neurons[key] = (where, getattr(m, attr))
                self.inputs[key] = []
                self.handles.append(getattr(m, attr).register_forward_pre_hook(self._hook(key)))
        if not any(where == 'after' for where, _ in self.neurons.values()):
            self.remove()
            raise ValueError('the network has no residual block with a neuron before and after a residual sum')

    def _hook(self, key):
        def hook(module, args):
            self.inputs[key].append(args[0].detach().float().cpu())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def summary(self) -> dict:
        """JSON-ready results per measured neuron (``'where'``: ``'before'`` or ``'after'``)."""
        out = {}
        for key, (where, m) in self.neurons.items():
            if not self.inputs[key]:
                continue
            x = torch.cat(self.inputs[key], dim=1)    # [T, samples, C, L]
            theta = float(m.v_threshold)
            tau = float(m.tau)
            k_pos, k_neg = int(getattr(m, 'k_pos', 1)), int(getattr(m, 'k_neg', 0))
            own_reset = 'hard' if getattr(m, 'v_reset', None) is not None else 'soft'
            own = replay(x, k_pos, k_neg, own_reset, tau, theta)
            rules = {}
            for name, kp, kn, reset in REPLAY_RULES:
                r = replay(x, kp, kn, reset, tau, theta)
                rules[name] = {q: [float(v) / theta for v in r[q].abs().flatten(1).mean(1)]
                               for q in ('sent', 'discarded', 'leaked', 'left')}
                rules[name]['fractions'] = _fractions(r['h'], theta)
            out[key] = {'where': where, 'neuron': type(m).__name__, 'k_pos': k_pos, 'k_neg': k_neg,
                        'reset': own_reset, 'theta': theta, 'tau': tau, 'T': int(x.shape[0]),
                        'fractions': _fractions(own['h'], theta), 'histogram': _histogram(own['h']),
                        'range': [-HIST_RANGE, HIST_RANGE], 'input_fractions': _fractions(x, theta),
                        'replay': rules}
        return out
