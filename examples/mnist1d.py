r"""Train a small 1-D convolutional SNN on MNIST-1D: CF, its variants and LIF, on real data.

MNIST-1D (Greydanus 2020, the ``mnist1d`` package) is a 1-D analogue of MNIST: ten digit
templates of length 12, padded, scaled, sheared, translated and noised into sequences of length
40, 4000 training and 1000 test samples. It is small enough that a spiking network trains in
about a minute on a 2-core CPU, and hard enough to tell models apart (published baselines:
logistic regression ~32 %, MLP ~68 %, CNN ~94 %, GRU ~91 %).

Data
----
The standard split is generated from the package's templates with its default arguments
(``mnist1d.data.make_dataset(get_dataset_args())``: 5000 samples, seed 42, 80/20 split); nothing
is downloaded. The arrays are cached in ``--data-dir`` (default ``data/mnist1d``) as
``mnist1d_standard.npz``.

Model
-----
Direct encoding (the real-valued sequence is repeated over the ``T`` steps, so the first
convolution sees real values), then three blocks of SpikingJelly ``layer`` modules in
multi-step mode::

    Conv1d(1, w, 5) - BN - neuron - Pool(2)     # 40 -> 20
    Conv1d(w, w, 3) - BN - neuron - Pool(2)     # 20 -> 10
    Conv1d(w, w, 3) - BN - neuron - Pool(2)     # 10 -> 5
    Flatten - Linear(5 w, 10)                   # averaged over T: Eq. 24

``--pool max`` (default: SpikingJelly's usual ``MaxPool1d``) or ``--pool avg``. Max-pooling
keeps only the largest value of each window, so a negative spike of CF survives only where its
whole window is negative; see ``--diagnostics`` and ``benchmarks/accuracy_study.py``.

Other architectures (``--arch``, ``--depth``; ``examples/mnist1d_models.py``):

- ``spiking-resnet``: residual blocks with the shortcut added *before* the second neuron (the
  paper's Fig. 1), ``sew-resnet``: added *after* it (SEW's ADD), ``ms-resnet``: a membrane
  shortcut (MS-ResNet); ``--depth`` blocks of two convolutions each (8: 17 spiking layers, the
  depth of ResNet-18), length averaged before the read-out;
- ``spikformer``: a small Spikformer (spiking self-attention as SpikingJelly 2.0's zoo defines
  it; an equivalent local module on 0.0.0.0.14), ``--depth`` blocks, ``--heads``;
- ``rsnn`` with ``--task sequential``: one sample of the sequence per time step (T = 40) into
  ``--depth`` recurrent spiking layers of ``--width`` neurons; ``--task reversed``: the same
  with a fixed half of the sequences played backwards as ten more classes (order matters).

``--potentials`` (residual networks) measures, after training, the potentials before and after
each residual sum and replays them through LIF hard / soft, SCF and CF (the paper's Fig. 1;
``residual_potentials.json``).

Neurons
-------
- ``--neuron cf --variant ST|DT|SCF|CF --K K``: :class:`spikingjelly_cf.CFNode` with the
  paper's Fig. 6 variants (ST = 1/0 levels, DT = 1/1, SCF = K/0, CF = K/K), thresholds +1/-1,
  decay 0.25 (tau = 4/3), soft reset.
- ``--neuron lif --lif-reset soft|hard``: SpikingJelly's ``LIFNode`` (through the small subclass
  in ``examples/common.py`` that can also keep its pre-reset potentials for the diagnostics;
  TSG runs in SpikingJelly's neurons as it is) with the same charge and threshold; ``soft``
  subtracts the threshold (as CF does), ``hard`` resets to 0 (SpikingJelly's default).
- ``--surrogate tsg|rect|atan|sigmoid``: TSG (Eq. 15-17), the CF rectangle (Eq. 14), or
  SpikingJelly's ATan / Sigmoid; ``--pnb LAMBDA``: the PNB loss weight (Eq. 23; CF with
  ``K_P = K_N`` only).

Defaults
--------
The paper's method (CF, K = 2, TSG, PNB 0.25), T = 4, width 32, max-pooling, trained with Adam
(lr 0.003, cosine schedule, no weight decay, batch 64) for 10 epochs: about a minute on an
idle 2-core CPU. The paper's SGD recipe is ``--optimizer sgd --lr 0.025 --weight-decay 1e-4``.
Outputs (``summary.json``, ``args.json``, figures, checkpoints) as in the other examples, in
``--out-dir`` (default ``runs/mnist1d_...``); ``--diagnostics`` adds ``diagnostics.json`` and
``diagnostics.png`` (see :class:`Diagnostics`).

Examples
--------
::

    python examples/mnist1d.py                                   # CF + TSG + PNB (the paper)
    python examples/mnist1d.py --neuron lif --surrogate rect --pnb 0
    python examples/mnist1d.py --variant SCF --K 2 --surrogate rect --pnb 0 --seed 1
    python examples/mnist1d.py --variant CF --pool avg --diagnostics
    python examples/mnist1d.py --arch spiking-resnet --depth 8 --width 16 --potentials
    python examples/mnist1d.py --arch rsnn --task sequential --depth 1 --width 64
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

from spikingjelly.activation_based import functional, layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402

import spikingjelly_cf  # noqa: E402
from spikingjelly_cf.surrogate import level_spike  # noqa: E402

import mnist1d_models as models  # noqa: E402  (examples/mnist1d_models.py)

NUM_CLASSES = 10
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]
SEQUENCE_LENGTH = 40
CACHE_NAME = 'mnist1d_standard.npz'
#: Defaults sized for about a minute on an idle 2-core CPU (>= 80 % test accuracy).
DEFAULTS = dict(T=4, epochs=10, batch_size=64, lr=0.003, weight_decay=0.0, optimizer='adam', surrogate='tsg',
                pnb=0.25)
VARIANTS = tuple(spikingjelly_cf.VARIANTS)
#: ``--arch`` choices: the plain network above and those of ``examples/mnist1d_models.py``.
ARCHS = ('plain', 'spiking-resnet', 'sew-resnet', 'ms-resnet', 'spikformer', 'rsnn')
#: Default ``--depth`` per architecture (the plain network has a fixed depth of three blocks).
DEFAULT_DEPTH = {'spiking-resnet': 2, 'sew-resnet': 2, 'ms-resnet': 2, 'spikformer': 1, 'rsnn': 2}
#: ``--task`` choices: direct encoding of the whole sequence at every step, or one sample per step.
TASKS = ('static', 'sequential', 'reversed')
#: Seed of which samples ``--task reversed`` plays backwards (fixed: the same for every run).
REVERSAL_SEED = 20261203


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _mnist1d_package():
    """``(get_dataset_args, make_dataset)`` of the ``mnist1d`` package. This file is also called
    ``mnist1d.py`` and its folder is on ``sys.path``, so the package is imported with that folder
    left out (and any module of this file registered as ``mnist1d`` set aside meanwhile)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved_path, saved = sys.path[:], sys.modules.get('mnist1d')
    shadow = saved is not None and os.path.dirname(os.path.abspath(getattr(saved, '__file__', '') or '')) == here
    if shadow:
        del sys.modules['mnist1d']
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise SystemExit('MNIST-1D needs the mnist1d package: pip install mnist1d '
                         '(or pip install spikingjelly-cf[examples])') from e
    finally:
        sys.path[:] = saved_path
        if shadow:
            sys.modules['mnist1d'] = saved
    return get_dataset_args, make_dataset


def generate_standard_split() -> dict:
    """The standard MNIST-1D arrays, generated from the package's templates (no download).

    Returns ``{'x': [4000, 40] float32, 'y': [4000] int64, 'x_test': [1000, 40], 'y_test': [1000]}``.
    """
    get_dataset_args, make_dataset = _mnist1d_package()
    state = np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())   # seeds numpy and random with 42 itself
    finally:
        np.random.set_state(state)
    return {'x': d['x'].astype(np.float32), 'y': d['y'].astype(np.int64),
            'x_test': d['x_test'].astype(np.float32), 'y_test': d['y_test'].astype(np.int64)}


def load_standard_split(data_dir: str, verbose: bool = True) -> dict:
    """:func:`generate_standard_split`, cached in ``data_dir/mnist1d_standard.npz``."""
    path = os.path.join(data_dir, CACHE_NAME)
    if os.path.isfile(path):
        with np.load(path) as f:
            return {k: f[k] for k in ('x', 'y', 'x_test', 'y_test')}
    tic = time.time()
    d = generate_standard_split()
    os.makedirs(data_dir, exist_ok=True)
    tmp = path + f'.{os.getpid()}.tmp.npz'
    np.savez(tmp, **d)
    os.replace(tmp, path)
    if verbose:
        print(f'[data] generated MNIST-1D ({len(d["y"])} train / {len(d["y_test"])} test) from its templates '
              f'in {time.time() - tic:.1f} s; cached in {path}')
    return d


def reversal_mask(n: int, split: str) -> np.ndarray:
    """Which of ``n`` samples of ``split`` (``'train'`` or ``'test'``) ``--task reversed`` plays
    backwards: a fixed draw (:data:`REVERSAL_SEED`), half of them on average, the same for every run."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng([REVERSAL_SEED, 0 if split == 'train' else 1])
    return rng.random(n) < 0.5


def make_reversed(x: np.ndarray, y: np.ndarray, split: str) -> tuple:
    r"""The time-reversal task: a fixed half of the sequences reversed, label ``y + 10`` for them.

    Twenty classes (digit x direction). A sequence and its reversal hold the same values, so a
    model that ignores their order (any function of the multiset of values, e.g. a sum over
    time of a per-step feature) cannot tell the two classes of a digit apart; a temporal model
    can. Same samples, same split and same labels for every variant.
    """
    mask = reversal_mask(len(y), split)
    x = x.copy()
    x[mask] = x[mask, ::-1]
    return np.ascontiguousarray(x), (y + NUM_CLASSES * mask).astype(np.int64)


def class_names(task: str) -> list:
    if task == 'reversed':
        return CLASS_NAMES + [f'{c} reversed' for c in CLASS_NAMES]
    return list(CLASS_NAMES)


def build_data(args, dist_):
    d = None
    if dist_.is_main:
        d = load_standard_split(args.data_dir)
    dist_.barrier()
    if d is None:
        d = load_standard_split(args.data_dir, verbose=False)
    x, y, x_test, y_test = d['x'], d['y'], d['x_test'], d['y_test']
    if getattr(args, 'task', 'static') == 'reversed':
        x, y = make_reversed(x, y, 'train')
        x_test, y_test = make_reversed(x_test, y_test, 'test')
    limit = getattr(args, 'limit', None)
    if limit is not None:
        x, y, x_test, y_test = x[:limit], y[:limit], x_test[:limit], y_test[:limit]
    train = torch.utils.data.TensorDataset(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
    test = torch.utils.data.TensorDataset(torch.from_numpy(x_test).unsqueeze(1), torch.from_numpy(y_test))
    return train, test


def to_input(x: torch.Tensor, args) -> torch.Tensor:
    """``[B, 1, 40]`` -> ``[T, B, 1, 40]`` (``--task static``, direct encoding: the same real values
    at every step) or ``[40, B, 1]`` (``sequential``, ``reversed``: one sample per step)."""
    if getattr(args, 'task', 'static') != 'static':
        return x.float().permute(2, 0, 1).contiguous()
    return x.float().unsqueeze(0).expand(args.T, *x.shape).contiguous()


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
class Conv1dSNN(nn.Module):
    r"""Three conv-BN-neuron-pool blocks and a linear read-out, multi-step ``[T, B, 1, 40]``.

    Parameters
    ----------
    width : int
        Channels of every convolution.
    spiking_neuron : callable
        Built as ``spiking_neuron(**deepcopy(kwargs))`` per layer (each layer its own surrogate).
    pool : {'max', 'avg'}
        ``layer.MaxPool1d(2)`` or ``layer.AvgPool1d(2)`` after each neuron.
    """

    def __init__(self, width: int, spiking_neuron, pool: str = 'max', num_classes: int = NUM_CLASSES, **kwargs):
        super().__init__()
        import copy
        if pool not in ('max', 'avg'):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f'width must be a positive int, got {width!r}')
        Pool = layer.MaxPool1d if pool == 'max' else layer.AvgPool1d
        blocks, c, length = [], 1, SEQUENCE_LENGTH
        for kernel in (5, 3, 3):
            blocks += [layer.Conv1d(c, width, kernel_size=kernel, padding=kernel // 2, bias=False),
                       layer.BatchNorm1d(width), spiking_neuron(**copy.deepcopy(kwargs)), Pool(2)]
            c, length = width, length // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(layer.Flatten(), layer.Linear(c * length, num_classes))
        functional.set_step_mode(self, 'm')

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x_seq))


def neuron_spec(args) -> tuple:
    """``(class, kwargs)``: :func:`common.neuron_spec` plus ``--lif-reset hard`` (``v_reset = 0``)."""
    cls, kwargs = common.neuron_spec(args)
    if args.neuron == 'lif' and args.lif_reset == 'hard':
        kwargs['v_reset'] = 0.0
    return cls, kwargs


def build_model(args) -> nn.Module:
    """The network of ``--arch`` (``'conv1d'``, the name in older checkpoints, is ``'plain'``)."""
    cls, kwargs = neuron_spec(args)
    arch = getattr(args, 'arch', 'plain')
    classes = len(class_names(getattr(args, 'task', 'static')))
    if arch in ('plain', 'conv1d'):
        return Conv1dSNN(args.width, cls, pool=args.pool, num_classes=classes, **kwargs)
    if arch.endswith('-resnet'):
        return models.SpikingResNet1d(arch.split('-')[0], args.width, args.depth, cls, num_classes=classes, **kwargs)
    if arch == 'spikformer':
        return models.Spikformer1d(args.width, args.depth, cls, num_heads=args.heads, num_classes=classes, **kwargs)
    if arch == 'rsnn':
        return models.RecurrentSNN(args.width, args.depth, cls, num_classes=classes, **kwargs)
    raise ValueError(f'arch must be one of {ARCHS}, got {arch!r}')


# ----------------------------------------------------------------------------------------------
# diagnostics: why a variant trains as it does
# ----------------------------------------------------------------------------------------------
def _levels(m) -> tuple:
    """``([(level, theta, sign)], k_pos, k_neg)`` of a spiking layer; ``sign`` +1 for the
    positive levels (distance ``h - level``), -1 for the negative ones (``level - h``)."""
    theta_p = float(m.v_threshold)
    k_pos = int(getattr(m, 'k_pos', 1))
    k_neg = int(getattr(m, 'k_neg', 0))
    theta_n = float(getattr(m, 'v_threshold_neg', -theta_p) or -theta_p)
    out = [(k * theta_p, theta_p, 1) for k in range(1, k_pos + 1)]
    out += [(k * theta_n, abs(theta_n), -1) for k in range(1, k_neg + 1)]
    return out, k_pos, k_neg


def surrogate_derivative(m, h_seq: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial s_t / \partial h_t` of spiking layer ``m`` at its pre-reset potentials.

    The sum over the firing levels of the layer's per-level pseudo-derivative (docs/method.md, section 2:
    :math:`\sum_k g(h - k\theta_P) + \sum_k g(k\theta_N - h)`), evaluated with the layer's own
    surrogate module (so TSG uses each step's :math:`a_t`). ``h_seq`` is ``[T, ...]``.
    """
    levels, _, _ = _levels(m)
    out = torch.zeros_like(h_seq, dtype=torch.float32)
    sg = m.surrogate_function
    with torch.enable_grad():
        for t in range(h_seq.shape[0]):
            h = h_seq[t].detach().float().requires_grad_(True)
            total = 0.
            for level, theta, sign in levels:
                x = (h - level) if sign > 0 else (level - h)
                total = total + level_spike(sg, x, theta, t).sum()
            g, = torch.autograd.grad(total, h)
            out[t] = g.abs()   # the negative levels' spikes enter s with a minus sign: d s/d h >= 0
    return out


class Diagnostics:
    r"""Measurements taken during training (every ``every``-th training batch) and at the end.

    Per spiking layer and epoch:

    - ``zero_grad_fraction``: fraction of pre-reset potentials :math:`h` at which the surrogate
      derivative :math:`\partial s/\partial h` is exactly 0 (for :class:`~spikingjelly_cf.CFRect`
      the dead zone :math:`|h| < \theta/2` and :math:`|h| > (K + 1/2)\theta`; for TSG outside
      the triangles), ``mean_surrogate``: the mean of :math:`\partial s/\partial h`;
    - ``h_regions``: fractions of :math:`h` below :math:`-\theta/2`, inside
      :math:`(-\theta/2, \theta/2)`, above :math:`\theta/2` (how BatchNorm's output meets
      symmetric thresholds), ``h_mean``, ``h_std``;
    - ``levels``: the firing-level histogram (counts of each spike value);
    - ``grad_norm``: the L2 norm of the gradient of each synaptic layer's weight, averaged over
      the sampled batches.

    Per pooling layer and epoch: the share of the spike magnitude :math:`\sum|s|` carried by
    negative spikes at the pool's input and output (``neg_share_in``, ``neg_share_out``), and
    ``neg_dropped``: the fraction of pooling windows holding a negative spike whose output is
    not negative (max-pooling drops it; averaging can cancel it).
    """

    def __init__(self, net: nn.Module, steps_per_epoch: int, every: int = 4):
        self.net, self.every, self.steps_per_epoch = net, max(int(every), 1), steps_per_epoch
        self.step = -1
        self.layers = common.spiking_layers(net)
        self.synapses = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Linear))}
        self.pools = {n: m for n, m in net.named_modules() if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d))}
        self.records = []   # one dict per sampled batch
        self._current = None
        self._saved = {n: getattr(m, 'store_h_seq', False) for n, m in self.layers.items()}
        for m in self.layers.values():
            m.store_h_seq = True
        self.handles = [net.register_forward_pre_hook(self._pre)]
        self.handles += [m.register_forward_hook(self._spiking_hook(n)) for n, m in self.layers.items()]
        self.handles += [m.register_forward_hook(self._pool_hook(n)) for n, m in self.pools.items()]
        self.handles += [m.weight.register_hook(self._grad_hook(n)) for n, m in self.synapses.items()]

    def _pre(self, module, args):
        if not module.training:
            self._current = None
            return
        self.step += 1
        if self.step % self.every:
            self._current = None
            return
        self._current = {'step': self.step, 'epoch': self.step // self.steps_per_epoch + 1,
                         'spiking': {}, 'pool': {}, 'grad_norm': {}}
        self.records.append(self._current)

    def _spiking_hook(self, name):
        def hook(module, args, output):
            if self._current is None:
                return
            h = module.__dict__.get('h_seq')
            if not isinstance(h, torch.Tensor):
                return
            h = h.detach().float()
            g = surrogate_derivative(module, h)
            half = float(module.v_threshold) / 2
            s = output.detach()
            _, k_pos, k_neg = _levels(module)
            levels = torch.arange(-k_neg, k_pos + 1, device=s.device, dtype=s.dtype)
            counts = (s.reshape(-1, 1) == levels).sum(0)
            self._current['spiking'][name] = {
                'zero_grad_fraction': float((g == 0).float().mean()),
                'mean_surrogate': float(g.mean()),
                'h_regions': [float((h <= -half).float().mean()), float((h.abs() < half).float().mean()),
                              float((h >= half).float().mean())],
                'h_mean': float(h.mean()), 'h_std': float(h.std()),
                'levels': {int(v): int(c) for v, c in zip(levels.tolist(), counts.tolist())},
            }
        return hook

    def _pool_hook(self, name):
        def hook(module, args, output):
            if self._current is None:
                return
            x, y = args[0].detach(), output.detach()
            mag_in, mag_out = x.abs().sum(), y.abs().sum()
            k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
            L = (x.shape[-1] // k) * k
            windows = x[..., :L].reshape(*x.shape[:-1], L // k, k)
            has_neg = (windows < 0).any(-1)
            y_cut = y[..., :L // k]
            n_neg = int(has_neg.sum())
            self._current['pool'][name] = {
                'neg_share_in': float(x.clamp(max=0).abs().sum() / mag_in.clamp(min=1e-12)),
                'neg_share_out': float(y.clamp(max=0).abs().sum() / mag_out.clamp(min=1e-12)),
                'neg_dropped': float((has_neg & (y_cut >= 0)).sum()) / n_neg if n_neg else None,
                'windows_with_neg': n_neg / max(has_neg.numel(), 1),
            }
        return hook

    def _grad_hook(self, name):
        def hook(grad):
            if self._current is not None:
                self._current['grad_norm'][name] = float(grad.detach().norm())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for n, m in self.layers.items():
            m.store_h_seq = self._saved[n]

    def summary(self) -> dict:
        """Per-epoch means of every measurement (JSON-ready)."""
        by_epoch = {}
        for r in self.records:
            by_epoch.setdefault(r['epoch'], []).append(r)
        epochs = []
        for epoch in sorted(by_epoch):
            rs = by_epoch[epoch]
            out = {'epoch': epoch, 'batches': len(rs), 'spiking': {}, 'pool': {}, 'grad_norm': {}}
            for name in self.layers:
                items = [r['spiking'][name] for r in rs if name in r['spiking']]
                if not items:
                    continue
                levels = {}
                for it in items:
                    for v, c in it['levels'].items():
                        levels[v] = levels.get(v, 0) + c
                total = max(sum(levels.values()), 1)
                out['spiking'][name] = {
                    'zero_grad_fraction': float(np.mean([it['zero_grad_fraction'] for it in items])),
                    'mean_surrogate': float(np.mean([it['mean_surrogate'] for it in items])),
                    'h_regions': np.mean([it['h_regions'] for it in items], axis=0).tolist(),
                    'h_mean': float(np.mean([it['h_mean'] for it in items])),
                    'h_std': float(np.mean([it['h_std'] for it in items])),
                    'level_fractions': {str(v): c / total for v, c in sorted(levels.items())},
                }
            for name in self.pools:
                items = [r['pool'][name] for r in rs if name in r['pool']]
                if items:
                    dropped = [it['neg_dropped'] for it in items if it['neg_dropped'] is not None]
                    out['pool'][name] = {k: float(np.mean([it[k] for it in items]))
                                         for k in ('neg_share_in', 'neg_share_out', 'windows_with_neg')}
                    out['pool'][name]['neg_dropped'] = float(np.mean(dropped)) if dropped else None
            for name in self.synapses:
                vals = [r['grad_norm'][name] for r in rs if name in r['grad_norm']]
                if vals:
                    out['grad_norm'][name] = float(np.mean(vals))
            epochs.append(out)
        return {'every': self.every, 'steps_per_epoch': self.steps_per_epoch, 'epochs': epochs}


def plot_diagnostics(diag: dict, path: str, title: str = '') -> None:
    """Four panels over the epochs: zero-surrogate fraction, gradient norms, level fractions
    (last epoch) and the negative share through each pool."""
    plt = common._pyplot()
    epochs = diag['epochs']
    if not epochs:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    xs = [e['epoch'] for e in epochs]
    for name in epochs[-1]['spiking']:
        axes[0].plot(xs, [e['spiking'].get(name, {}).get('zero_grad_fraction', np.nan) for e in epochs],
                     marker='o', ms=3, label=name)
    axes[0].set_ylim(0, 1)
    axes[0].set_title(r'fraction with $\partial s/\partial h = 0$', fontsize=9)
    for name in epochs[-1]['grad_norm']:
        axes[1].plot(xs, [e['grad_norm'].get(name, np.nan) for e in epochs], marker='o', ms=3, label=name)
    axes[1].set_yscale('log')
    axes[1].set_title('weight-gradient norm per layer', fontsize=9)
    last = epochs[-1]['spiking']
    names = list(last)
    width = 0.8 / max(len(names), 1)
    all_levels = sorted({int(v) for n in names for v in last[n]['level_fractions']})
    for i, name in enumerate(names):
        fr = last[name]['level_fractions']
        axes[2].bar(np.arange(len(all_levels)) + i * width, [fr.get(str(v), 0.) for v in all_levels], width,
                    label=name)
    axes[2].set_xticks(np.arange(len(all_levels)) + 0.4 - width / 2)
    axes[2].set_xticklabels([str(v) for v in all_levels])
    axes[2].set_yscale('log')
    axes[2].set_title(f'spike levels, epoch {epochs[-1]["epoch"]}', fontsize=9)
    pools = list(epochs[-1]['pool'])
    if pools:
        axes[3].bar(np.arange(len(pools)) - 0.2, [epochs[-1]['pool'][p]['neg_share_in'] for p in pools], 0.4,
                    label='pool input')
        axes[3].bar(np.arange(len(pools)) + 0.2, [epochs[-1]['pool'][p]['neg_share_out'] for p in pools], 0.4,
                    label='pool output')
        axes[3].set_xticks(np.arange(len(pools)))
        axes[3].set_xticklabels(pools, fontsize=7)
    axes[3].set_title('share of |s| in negative spikes', fontsize=9)
    for ax in axes:
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    for ax in axes[:2]:
        ax.set_xlabel('epoch', fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = parser.add_argument_group('model and data')
    m.add_argument('--arch', choices=ARCHS, default='plain',
                   help='plain: three conv blocks; spiking-resnet (add before the neuron, the paper\'s Fig. 1), '
                        'sew-resnet (add after it), ms-resnet (membrane shortcut), spikformer, rsnn (recurrent, '
                        'with --task sequential|reversed); see examples/mnist1d_models.py')
    m.add_argument('--depth', type=int, default=None,
                   help='residual blocks (resnets), transformer blocks (spikformer) or recurrent layers (rsnn); '
                        'default: ' + ', '.join(f'{d} for {a}' for a, d in DEFAULT_DEPTH.items()))
    m.add_argument('--heads', type=int, default=4, help='attention heads (spikformer)')
    m.add_argument('--task', choices=TASKS, default='static',
                   help='static: the whole sequence at every step (direct encoding, T steps); sequential: one '
                        'sample per step (T = 40); reversed: sequential with a fixed half of the sequences '
                        'played backwards as ten more classes')
    m.add_argument('--width', type=int, default=32, help='channels of every convolution (rsnn: neurons per layer)')
    m.add_argument('--pool', choices=('max', 'avg'), default='max', help='pooling after each spiking layer')
    m.add_argument('--variant', type=str.upper, choices=VARIANTS, default='CF',
                   help='CF variant (Fig. 6): ST = 1/0 levels, DT = 1/1, SCF = K/0, CF = K/K; sets --k-pos/--k-neg')
    m.add_argument('--K', type=int, default=2, help='levels K of SCF and CF')
    m.add_argument('--lif-reset', choices=('soft', 'hard'), default='soft',
                   help="LIF reset (--neuron lif): 'soft' subtracts the threshold, 'hard' resets to 0")
    m.add_argument('--data-dir', default=os.path.join('data', 'mnist1d'), help='cache of the generated arrays')
    m.add_argument('--limit', type=int, default=None, metavar='N',
                   help='use only the first N training and N test sequences (quick checks; default: all)')
    m.add_argument('--diagnostics', action='store_true',
                   help='measure surrogate dead zones, potentials, spike levels, pooling and gradient norms '
                        'during training (diagnostics.json, diagnostics.png)')
    m.add_argument('--diagnostics-every', type=int, default=4, help='sample every N-th training batch')
    m.add_argument('--potentials', action='store_true',
                   help='after training, measure the potentials before and after each residual sum on the test '
                        "set and replay them through LIF hard/soft, SCF and CF (the paper's Fig. 1; residual "
                        'architectures; residual_potentials.json)')
    common.add_common_arguments(parser, **DEFAULTS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = common.parse_arguments(get_parser(), argv)
    explicit = set(args._explicit)
    if args.K < 1:
        raise SystemExit(f'--K must be >= 1, got {args.K}')
    if args.width < 1:
        raise SystemExit(f'--width must be >= 1, got {args.width}')
    if args.diagnostics_every < 1:
        raise SystemExit(f'--diagnostics-every must be >= 1, got {args.diagnostics_every}')
    if explicit & {'k_pos', 'k_neg'}:
        raise SystemExit('mnist1d.py sets the levels with --variant and --K; do not pass --k-pos/--k-neg')
    if args.neuron == 'cf':
        kw = spikingjelly_cf.variant_kwargs(args.variant, args.K)
        args.k_pos, args.k_neg = kw['k_pos'], kw['k_neg']
        if args.pnb > 0 and not (args.k_pos == args.k_neg >= 1):
            if 'pnb' in explicit:
                raise SystemExit(f'--pnb {args.pnb} needs negative levels as many as positive ones (PNB pairs '
                                 f'level k on both sides): variant {args.variant} has {args.k_pos}/{args.k_neg}; '
                                 f'pass --pnb 0 or --variant DT|CF')
            args.pnb = 0.0   # the default 0.25 applies to the variants it is defined for
    else:
        if 'variant' in explicit or 'K' in explicit:
            raise SystemExit('--variant and --K select CF levels: use them with --neuron cf')
        if args.pnb > 0:
            if 'pnb' in explicit:
                raise SystemExit(f'--pnb {args.pnb}: the PNB loss is defined for CF layers only '
                                 f'(LIF has no negative levels); pass --pnb 0')
            args.pnb = 0.0
        args.k_pos, args.k_neg = 1, 0
    if args.neuron == 'cf' and 'lif_reset' in explicit:
        raise SystemExit('--lif-reset is a LIF option (CF always resets softly, Eq. 10)')
    if args.arch == 'plain':
        if args.depth is not None:
            raise SystemExit('--depth applies to the residual, spikformer and rsnn architectures (the plain '
                             'network has three blocks)')
    elif args.depth is None:
        args.depth = DEFAULT_DEPTH[args.arch]
    if args.depth is not None and args.depth < 1:
        raise SystemExit(f'--depth must be >= 1, got {args.depth}')
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f'--limit must be >= 1, got {args.limit}')
    if args.heads < 1:
        raise SystemExit(f'--heads must be >= 1, got {args.heads}')
    if args.arch == 'spikformer' and (args.width % args.heads or args.width % 2):
        raise SystemExit(f'--arch spikformer needs an even --width that --heads divides, got --width {args.width} '
                         f'--heads {args.heads}')
    if 'pool' in explicit and args.arch != 'plain':
        raise SystemExit('--pool is an option of the plain network (--arch plain)')
    if (args.arch == 'rsnn') != (args.task != 'static'):
        raise SystemExit(f'--task {args.task} with --arch {args.arch}: the recurrent network (rsnn) reads one '
                         'sample per step (--task sequential|reversed), the others the whole sequence '
                         '(--task static)')
    if args.task != 'static':
        if 'T' in explicit and args.T != SEQUENCE_LENGTH:
            raise SystemExit(f'--task {args.task} runs one step per sample: T = {SEQUENCE_LENGTH}, got --T {args.T}')
        args.T = SEQUENCE_LENGTH
    if args.potentials and not args.arch.endswith('-resnet'):
        raise SystemExit('--potentials measures residual sums: use it with --arch spiking-resnet|sew-resnet|ms-resnet')
    if args.potentials and args.arch == 'sew-resnet':
        raise SystemExit('--potentials: SEW-ResNet adds after its neurons, no neuron sees a residual sum '
                         '(use spiking-resnet or ms-resnet)')
    common.check_arguments(args)
    return args


def run_name(args) -> str:
    """A short label of the neuron setting, e.g. ``CF-K2+tsg+pnb0.25`` or ``LIF-soft+rect``."""
    if args.neuron == 'lif':
        name = f'LIF-{args.lif_reset}'
    else:
        name = args.variant + (f'-K{args.K}' if args.variant in ('SCF', 'CF') else '')
    name += f'+{args.surrogate}'
    if args.pnb > 0:
        name += f'+pnb{args.pnb:g}'
    return name


def arch_name(args) -> str:
    """``plain``, ``spiking-resnet-d8``, ``rsnn-d2-reversed``, ...: architecture, depth and task."""
    name = 'plain' if args.arch in ('plain', 'conv1d') else f'{args.arch}-d{args.depth}'
    return name + ('' if args.task == 'static' else f'-{args.task}')


def make_task(args) -> common.Task:
    return common.Task(name='mnist1d', build_model=build_model, build_data=build_data, to_input=to_input,
                       class_names=class_names(args.task), data_arguments=('data_dir', 'limit'))


@torch.no_grad()
def measure_potentials(net: nn.Module, args, samples: int = 512) -> dict:
    """:class:`mnist1d_models.ResidualPotentials` of the trained ``net`` on the first ``samples``
    test sequences (evaluation mode)."""
    from spikingjelly.activation_based import functional as sj_functional
    d = load_standard_split(args.data_dir, verbose=False)
    x = torch.from_numpy(d['x_test'][:samples]).unsqueeze(1)
    device = next(net.parameters()).device
    net.eval()
    with models.ResidualPotentials(net) as rec:
        for i in range(0, len(x), args.batch_size):
            net(to_input(x[i:i + args.batch_size].to(device), args))
            sj_functional.reset_net(net)
        out = rec.summary()
    return {'samples': int(len(x)), 'layers': out}


def main(argv=None) -> dict:
    """Parse ``argv``, train and return the summary (with ``'diagnostics'`` when asked)."""
    args = parse_args(argv)
    task = make_task(args)
    if args.out_dir is None:
        arch = '' if args.arch == 'plain' and args.task == 'static' else arch_name(args) + '_'
        args.out_dir = os.path.join('runs', f'mnist1d_{arch}{run_name(args)}_{args.pool}_T{args.T}_seed{args.seed}')
    trained = {}
    if args.potentials and not args.eval_only:
        build_for_potentials = task.build_model

        def build_and_keep(a):
            trained['net'] = build_for_potentials(a)
            return trained['net']
        task.build_model = build_and_keep
    diag = None
    if args.diagnostics and not args.eval_only:
        build = task.build_model

        def build_with_diagnostics(a):
            nonlocal diag
            net = build(a)
            steps = math.ceil((a.limit or 4000) / a.batch_size)
            diag = Diagnostics(net, steps_per_epoch=steps, every=a.diagnostics_every)
            return net
        task.build_model = build_with_diagnostics
    summary = common.main(task, args)
    if diag is not None:
        diag.remove()
        if summary:
            d = diag.summary()
            d['setting'] = {'name': run_name(args), 'pool': args.pool, 'T': args.T, 'seed': args.seed,
                            'test_acc': summary.get('test_acc')}
            common._write_json(d, os.path.join(args.out_dir, 'diagnostics.json'))
            plot_diagnostics(d, os.path.join(args.out_dir, 'diagnostics.png'),
                             title=f'{run_name(args)}, {args.pool} pool, T={args.T}, seed {args.seed}: '
                                   f'test acc {100 * summary["test_acc"]:.1f} %')
            summary['diagnostics'] = d
    if summary and trained:
        summary['residual_potentials'] = measure_potentials(trained['net'], args)
        common._write_json(summary['residual_potentials'], os.path.join(args.out_dir, 'residual_potentials.json'))
    if summary:
        summary['setting'] = {'name': run_name(args), 'arch': args.arch, 'depth': args.depth, 'task': args.task,
                              'heads': args.heads if args.arch == 'spikformer' else None,
                              'neuron': args.neuron, 'variant': args.variant,
                              'K': args.K, 'k_pos': args.k_pos, 'k_neg': args.k_neg, 'surrogate': args.surrogate,
                              'pnb': args.pnb, 'pool': args.pool, 'T': args.T, 'seed': args.seed,
                              'lif_reset': args.lif_reset if args.neuron == 'lif' else None,
                              'optimizer': args.optimizer, 'lr': args.lr, 'epochs': args.epochs,
                              'width': args.width}
        common._write_json(summary, os.path.join(args.out_dir, 'summary.json'))
    return summary


if __name__ == '__main__':
    main()
