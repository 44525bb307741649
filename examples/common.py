r"""Training loop shared by the examples (``dvs_gesture.py``, ``cifar10.py``).

An example supplies a :class:`Task` (model, datasets, how a batch becomes the ``[T, B, ...]``
input) and calls :func:`main`; everything else lives here:

- the paper's recipe: :math:`\mathcal{L} = \mathrm{CE}(O, y) + \lambda \mathcal{L}_{pnb}`
  (Eq. 23) with :math:`O = \frac{1}{T}\sum_t M s_t` (Eq. 24, the model's read-out averaged over
  the time steps) and the PNB term from :class:`spikingjelly_cf.PNBMonitor`; SGD with momentum,
  weight decay and a cosine schedule (stepped per iteration);
- neurons for the ablations: ``--neuron cf|lif``, ``--k-pos``, ``--k-neg``,
  ``--surrogate tsg|rect|atan``, ``--pnb``, ``-T``, ``--backend``;
- ``--amp``; distributed data-parallel when started by ``torchrun`` (gloo on CPU, NCCL on
  GPU, a distributed sampler, metrics summed over ranks, only rank 0 writes);
- tqdm bars, a line per epoch, TensorBoard scalars, ``args.json``, checkpoints ``latest.pt`` and
  ``best.pt``, and ``--resume``: the data order depends only on ``seed + epoch`` and the RNG
  states are saved with each checkpoint, so a resumed run ends, on CPU, with exactly the weights
  of an uninterrupted one;
- at the end ``summary.json`` (accuracies, energy table of :class:`spikingjelly_cf.EnergyMonitor`,
  spike-level histogram of :class:`spikingjelly_cf.SpikeLevelHistogram`) and PNG figures
  (training curves, each layer's TSG :math:`\alpha_t`, per-layer histograms of the pre-reset
  membrane potentials with the thresholds marked);
- ``--eval-only --checkpoint PATH [--noise KIND ... --noise-levels EPS ...]``: test accuracy,
  optionally under input noise (the paper's Fig. 9 protocol), as a table and a plot.
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import spikingjelly_cf
from spikingjelly.activation_based import functional, neuron as sj_neuron, surrogate as sj_surrogate
from spikingjelly_cf import CFNode, CFRect, TSG, EnergyMonitor, PNBMonitor, SpikeLevelHistogram

__all__ = ['Task', 'add_common_arguments', 'main', 'make_neuron', 'LIFNode', 'add_noise',
           'NOISE_KINDS', 'Distributed']

NOISE_KINDS = ('uniform', 'salt_pepper', 'gaussian')
# Arguments that define the model: an evaluation (--eval-only) takes them from the checkpoint.
MODEL_ARGUMENTS = ('arch', 'width', 'T', 'neuron', 'k_pos', 'k_neg', 'tau', 'surrogate',
                   'voting_size', 'input_size', 'zero_init_residual', 'pool', 'lif_reset', 'depth', 'task', 'heads')


# ----------------------------------------------------------------------------------------------
# neurons
# ----------------------------------------------------------------------------------------------
class LIFNode(sj_neuron.LIFNode):
    r"""SpikingJelly's ``LIFNode`` that can also keep its pre-reset potentials for the analysis.

    With ``store_h_seq = True`` a multi-step call runs SpikingJelly's LIF arithmetic in a loop
    of its own that keeps the pre-reset potentials in ``h_seq`` (``[T, N, *]``), which the
    potential histograms and the MNIST-1D diagnostics read; otherwise (training, by default)
    it is SpikingJelly's ``LIFNode`` unchanged. A :class:`~spikingjelly_cf.TSG` surrogate needs
    nothing special in either case: SpikingJelly's neurons call it once per step without the
    step index and TSG counts the steps since the last ``functional.reset_net``.
    """

    store_h_seq = False

    def multi_step_forward(self, x_seq: torch.Tensor):
        self.__dict__['h_seq'] = None
        if not self.store_h_seq:
            return super().multi_step_forward(x_seq)
        v = self.v if isinstance(self.v, torch.Tensor) else torch.full_like(x_seq[0], float(self.v))
        v_reset = 0. if self.v_reset is None else self.v_reset
        spikes, hs = [], []
        for t in range(x_seq.shape[0]):
            if self.decay_input:
                h = v + (x_seq[t] - (v - v_reset)) / self.tau
            else:
                h = v - (v - v_reset) / self.tau + x_seq[t]
            s = self.surrogate_function(h - self.v_threshold)
            s_reset = s.detach() if self.detach_reset else s
            if self.v_reset is None:
                v = h - s_reset * self.v_threshold
            else:
                v = s_reset * self.v_reset + (1. - s_reset) * h
            spikes.append(s)
            hs.append(h)
        self.v = v
        self.__dict__['h_seq'] = torch.stack(hs)
        return torch.stack(spikes)


SURROGATES = ('tsg', 'rect', 'atan', 'sigmoid')


def make_surrogate(name: str, T: int) -> nn.Module:
    """``'tsg'`` -> ``TSG(T)`` (Eq. 15-17), ``'rect'`` -> ``CFRect()`` (Eq. 14), ``'atan'`` ->
    SpikingJelly's ``ATan()``, ``'sigmoid'`` -> SpikingJelly's ``Sigmoid()`` (its LIF default)."""
    if name == 'tsg':
        return TSG(T)
    if name == 'rect':
        return CFRect()
    if name == 'atan':
        return sj_surrogate.ATan()
    if name == 'sigmoid':
        return sj_surrogate.Sigmoid()
    raise ValueError(f'surrogate must be one of {SURROGATES}, got {name!r}')


def neuron_spec(args) -> tuple:
    """``(class, kwargs)`` of the spiking neuron chosen by the arguments, in the model zoo's
    convention (``spiking_neuron(**deepcopy(kwargs))`` per layer, so each layer gets its own
    surrogate and so its own TSG parameters)."""
    surrogate = make_surrogate(args.surrogate, args.T)
    if args.neuron == 'cf':
        # importing spikingjelly_cf registers CFNode in SpikingJelly's neuron module: the drop-in
        return sj_neuron.CFNode, dict(tau=args.tau, decay_input=False, v_threshold=1.0, v_threshold_neg=-1.0,
                            k_pos=args.k_pos, k_neg=args.k_neg, surrogate_function=surrogate,
                            detach_reset=False, step_mode='m', backend=args.backend)
    if args.neuron == 'lif':
        # same charge (decay 1 - 1/tau, no input decay), threshold and soft reset as CF:
        # the only difference is the firing rule (one positive level)
        return LIFNode, dict(tau=args.tau, decay_input=False, v_threshold=1.0, v_reset=None,
                             surrogate_function=surrogate, detach_reset=False, step_mode='m')
    raise ValueError(f"neuron must be 'cf' or 'lif', got {args.neuron!r}")


def make_neuron(args) -> nn.Module:
    """A fresh spiking neuron as chosen by the arguments (multi-step)."""
    cls, kwargs = neuron_spec(args)
    return cls(**copy.deepcopy(kwargs))


def spiking_layers(net: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every spiking neuron of ``net`` (SpikingJelly ``BaseNode``\\ s)."""
    return {name: m for name, m in net.named_modules() if isinstance(m, sj_neuron.BaseNode)}


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Add the arguments every example shares; ``defaults`` override their default values."""
    g = parser.add_argument_group('recipe (defaults: the paper)')
    g.add_argument('-T', '--T', dest='T', type=int, default=10, help='time steps')
    g.add_argument('--epochs', type=int, default=400)
    g.add_argument('-b', '--batch-size', type=int, default=64, help='batch size per process')
    g.add_argument('--optimizer', choices=('sgd', 'adam'), default='sgd',
                   help="'sgd': SGD with --momentum (the paper); 'adam': Adam (betas 0.9, 0.999)")
    g.add_argument('--lr', type=float, default=0.025, help='learning rate (cosine schedule)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=5e-4)
    g.add_argument('--pnb', type=float, default=0.25, metavar='LAMBDA',
                   help='weight of the PNB loss (Eq. 23); 0 disables it')
    g.add_argument('--seed', type=int, default=0)
    n = parser.add_argument_group('neuron (ablations)')
    n.add_argument('--neuron', choices=('cf', 'lif'), default='cf',
                   help="'cf': CFNode; 'lif': SpikingJelly's LIFNode with the same tau, threshold "
                        "and soft reset")
    n.add_argument('--k-pos', type=int, default=2, help='positive levels K_P of CF')
    n.add_argument('--k-neg', type=int, default=2, help='negative levels K_N of CF')
    n.add_argument('--tau', type=float, default=4 / 3, help='membrane time constant (decay 1 - 1/tau)')
    n.add_argument('--surrogate', choices=SURROGATES, default='tsg',
                   help="'tsg': time-step-wise learnable (Eq. 15-17); 'rect': CF rectangle (Eq. 14); "
                        "'atan', 'sigmoid': SpikingJelly's ATan, Sigmoid")
    n.add_argument('--backend', choices=spikingjelly_cf.functional.neuron.BACKENDS, default='auto',
                   help='CF kernel backend')
    r = parser.add_argument_group('running')
    r.add_argument('--out-dir', default=None, help='where everything is written (default: runs/...)')
    r.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                   help='continue an interrupted run (default: OUT_DIR/checkpoints/latest.pt)')
    r.add_argument('--amp', action='store_true',
                   help='automatic mixed precision (float16 + grad scaler on CUDA, bfloat16 on CPU)')
    r.add_argument('--device', default=None, help="default: 'cuda' if available, else 'cpu'")
    r.add_argument('--compile', action='store_true',
                   help='run the whole model through torch.compile (Inductor); the first steps '
                        'of training and of evaluation compile (seconds to minutes)')
    r.add_argument('--threads', type=int, default=None,
                   help='torch CPU threads per process (default: CPU cores / processes)')
    r.add_argument('--workers', type=int, default=0, help='data loader worker processes')
    r.add_argument('--no-progress', action='store_true', help='no tqdm bars')
    r.add_argument('--no-analysis', action='store_true',
                   help='skip the final summary pass (energy, histograms, figures)')
    r.add_argument('--stop-after', type=int, default=None, help=argparse.SUPPRESS)  # tests: "interrupt"
    e = parser.add_argument_group('evaluation')
    e.add_argument('--eval-only', action='store_true',
                   help='evaluate --checkpoint on the test set (model settings from the checkpoint)')
    e.add_argument('--checkpoint', default=None, help='checkpoint for --eval-only')
    e.add_argument('--noise', nargs='+', choices=NOISE_KINDS, default=None,
                   help='input noise kinds for a robustness table (with --eval-only)')
    e.add_argument('--noise-levels', nargs='+', type=float, default=None, metavar='EPS',
                   help='noise intensities (default 0 0.05 0.1 0.2 0.3 0.5)')
    parser.set_defaults(**defaults)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, remembering which arguments were given explicitly
    (``args._explicit``), so that ``--eval-only`` takes the others from the checkpoint."""
    sentinel = object()
    probe = argparse.Namespace(**{a.dest: sentinel for a in parser._actions if a.dest != 'help'})
    parser.parse_args(argv, namespace=probe)
    args = parser.parse_args(argv)
    args._explicit = sorted(k for k, v in vars(probe).items() if v is not sentinel)
    return args


def public_arguments(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith('_')}


def check_arguments(args) -> None:
    for name in ('T', 'epochs', 'batch_size'):
        if getattr(args, name) < 1:
            raise SystemExit(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.neuron == 'cf' and args.pnb > 0 and not (args.k_pos == args.k_neg >= 1):
        raise SystemExit(f'--pnb {args.pnb} needs --k-pos == --k-neg >= 1 (the PNB loss pairs level k on '
                         f'both sides), got --k-pos {args.k_pos} --k-neg {args.k_neg}; pass --pnb 0')
    if args.noise and not args.eval_only:
        raise SystemExit('--noise is an evaluation option: use it with --eval-only --checkpoint PATH')
    if args.eval_only and not args.checkpoint:
        raise SystemExit('--eval-only needs --checkpoint PATH')


# ----------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------
class Distributed:
    """Process group set up from ``torchrun``'s environment (a no-op for a single process)."""

    def __init__(self, device: Optional[str] = None):
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        self.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        self.local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', str(self.world_size)))
        if device is None:
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', self.local_rank % max(torch.cuda.device_count(), 1))
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        self.device = device
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo',
                                    timeout=datetime.timedelta(minutes=60))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> List[float]:
        """Sum of ``values`` over the ranks."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.device.type == 'cuda' else 'cpu')
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def gather_object(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: each test sample is seen by exactly one rank."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------------------------
# reproducibility
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------------------------
# the task an example supplies
# ----------------------------------------------------------------------------------------------
@dataclass
class Task:
    """What an example supplies to :func:`main`.

    Attributes
    ----------
    name : str
        Short name, used in the default output folder.
    build_model : callable
        ``build_model(args) -> nn.Module`` in multi-step mode: ``[T, B, ...] -> [T, B, classes]``.
    build_data : callable
        ``build_data(args, dist) -> (train_set, test_set)``; each item is ``(x, label)`` with ``x``
        in data space (frames or ``[0, 1]`` images), where noise is added.
    to_input : callable
        ``to_input(x, args) -> [T, B, ...]`` float tensor on ``x``'s device: the batch as the
        model sees it (e.g. repeat a static image ``T`` times, or move time first).
    augment : callable, optional
        ``augment(x) -> x`` on a training batch (torch's global RNG only, so runs resume exactly).
    class_names : list of str
        Names of the targets, in target order.
    data_arguments : sequence of str
        Arguments that select the data: like the model's, ``--eval-only`` takes them from the
        checkpoint unless they are given on the command line.
    """
    name: str
    build_model: Callable
    build_data: Callable
    to_input: Callable
    augment: Optional[Callable] = None
    class_names: List[str] = field(default_factory=list)
    data_arguments: Sequence[str] = ()


# ----------------------------------------------------------------------------------------------
# noise (the paper's Fig. 9 protocol, applied to the input in data space)
# ----------------------------------------------------------------------------------------------
def add_noise(x: torch.Tensor, kind: str, level: float, generator: torch.Generator) -> torch.Tensor:
    r"""Corrupt a batch ``x`` (``[B, ...]``, non-negative) with noise of intensity ``level``.

    With :math:`m` the maximum of each sample (1 for ``[0, 1]`` images; the largest count for
    event frames) and results clipped to :math:`[0, m]`:

    - ``'uniform'``: :math:`x + \epsilon m u`, :math:`u \sim U(-1, 1)` per element;
    - ``'gaussian'``: :math:`x + \epsilon m z`, :math:`z \sim N(0, 1)`;
    - ``'salt_pepper'``: each element, with probability :math:`\epsilon`, becomes 0 or
      :math:`m` (equally likely).
    """
    if level == 0:
        return x
    x = x.float()
    m = x.reshape(x.shape[0], -1).amax(dim=1).clamp(min=1e-12).reshape(-1, *([1] * (x.dim() - 1)))
    if kind == 'uniform':
        u = torch.rand(x.shape, generator=generator, device='cpu').to(x.device) * 2 - 1
        out = x + level * m * u
    elif kind == 'gaussian':
        z = torch.randn(x.shape, generator=generator, device='cpu').to(x.device)
        out = x + level * m * z
    elif kind == 'salt_pepper':
        r = torch.rand(x.shape, generator=generator, device='cpu').to(x.device)
        out = torch.where(r < level / 2, torch.zeros_like(x), x)
        out = torch.where((r >= level / 2) & (r < level), m.expand_as(x), out)
    else:
        raise ValueError(f'noise must be one of {NOISE_KINDS}, got {kind!r}')
    return torch.minimum(out.clamp(min=0.), m)


# ----------------------------------------------------------------------------------------------
# spike counting during training
# ----------------------------------------------------------------------------------------------
class SpikeRate:
    """Mean :math:`|s|` per neuron and time step over every spiking layer (forward hooks)."""

    def __init__(self, net: nn.Module):
        self.handles = [m.register_forward_hook(self._hook) for m in spiking_layers(net).values()]
        self.device = next((p.device for p in net.parameters()), torch.device('cpu'))
        self.reset()

    def _hook(self, module, args, output):
        if isinstance(output, torch.Tensor):
            # sum |s| and the element count in one tensor, no Python number that changes per
            # step (under --compile it would be a guard, and so a recompilation per step)
            s = output.detach().abs().sum(dtype=torch.float64)
            self.sums = self.sums.to(s.device) + torch.stack([s, s.new_tensor(float(output.numel()))])

    def reset(self):
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # no sync per batch

    @property
    def total(self) -> float:
        return float(self.sums[0])

    @property
    def count(self) -> float:
        return float(self.sums[1])

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------
def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` of the whole model (``--compile``), with static shapes.

    A new input shape (the evaluation batch, a smaller last batch) compiles once more instead
    of switching to symbolic sizes: with automatic dynamic shapes, Inductor (torch 2.14) failed
    to lower these networks ("cannot determine truth value of Relational").
    """
    return torch.compile(model, dynamic=False)


def _autocast(args, device):
    if not args.amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(task, model, net, loader, optimizer, scheduler, scaler, pnb, args, dist_, epoch):
    model.train()
    device = dist_.device
    rate = SpikeRate(net)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, pnb (all x samples), correct, samples
    first_loss = None
    bar = _progress(loader, dist_.is_main and not args.no_progress, desc=f'train {epoch + 1}/{args.epochs}')
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if task.augment is not None:
            x = task.augment(x)
        with _autocast(args, device):
            out = model(task.to_input(x, args))
            logits = out.float().mean(0)                       # Eq. 24: O = (1/T) sum_t M s_t
            ce = F.cross_entropy(logits, y)
            l_pnb = pnb.loss().to(device).float() if pnb is not None else torch.zeros((), device=device)
            loss = ce + args.pnb * l_pnb                           # Eq. 23
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        functional.reset_net(net)
        n = y.shape[0]
        if first_loss is None:
            first_loss = loss.item()
        sums += torch.tensor([loss.item() * n, ce.item() * n, l_pnb.item() * n,
                              (logits.argmax(1) == y).sum().item(), n], dtype=torch.float64)
        if bar is not loader:
            bar.set_postfix(loss=f'{loss.item():.3f}', acc=f'{sums[3] / sums[4]:.3f}')
    total = dist_.sum(sums.tolist() + [rate.total, float(rate.count)])
    rate.remove()
    n = max(total[4], 1.)
    return {'loss': total[0] / n, 'ce': total[1] / n, 'pnb': total[2] / n, 'acc': total[3] / n,
            'spikes_per_neuron_step': total[5] / max(total[6], 1.), 'first_loss': first_loss}


@torch.no_grad()
def evaluate(task, model, net, loader, args, dist_, noise=None, desc='test'):
    """Accuracy and CE on ``loader`` (summed over ranks); ``noise = (kind, level, generator)``."""
    model.eval()
    device = dist_.device
    sums = torch.zeros(3, dtype=torch.float64)
    bar = _progress(loader, dist_.is_main and not args.no_progress, desc=desc)
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        if noise is not None:
            x = add_noise(x, *noise)
        with _autocast(args, device):
            logits = model(task.to_input(x, args)).float().mean(0)
        functional.reset_net(net)
        sums += torch.tensor([F.cross_entropy(logits, y, reduction='sum').item(),
                              (logits.argmax(1) == y).sum().item(), y.shape[0]], dtype=torch.float64)
    total = dist_.sum(sums.tolist())
    n = max(total[2], 1.)
    return {'loss': total[0] / n, 'acc': total[1] / n, 'samples': int(total[2])}


# ----------------------------------------------------------------------------------------------
# the final analysis pass: energy, spike levels, potentials
# ----------------------------------------------------------------------------------------------
POTENTIAL_RANGE = 4.0   # histogram of h over [-4, 4] x theta_p
POTENTIAL_BINS = 160


@torch.no_grad()
def analyse(task, net, loader, args, device) -> dict:
    """One pass over the test set (rank 0, unwrapped model) with the monitors attached."""
    net.eval()
    layers = spiking_layers(net)
    saved = {name: getattr(m, 'store_h_seq', False) for name, m in layers.items()}
    hists = {name: torch.zeros(POTENTIAL_BINS, dtype=torch.float64) for name in layers}
    for m in layers.values():
        m.store_h_seq = True
    energy = EnergyMonitor(net, T=args.T)
    levels = SpikeLevelHistogram(net, instance=sj_neuron.BaseNode)
    try:
        for x, _ in loader:
            net(task.to_input(x.to(device), args))
            for name, m in layers.items():
                h = m.__dict__.get('h_seq')
                if isinstance(h, torch.Tensor):
                    hists[name] += torch.histc(h.detach().float().clamp(-POTENTIAL_RANGE, POTENTIAL_RANGE),
                                               POTENTIAL_BINS, -POTENTIAL_RANGE, POTENTIAL_RANGE).double().cpu()
            functional.reset_net(net)
        table = energy.table()
        counts = levels.counts()
    finally:
        energy.remove()
        levels.remove()
        for name, m in layers.items():
            m.store_h_seq = saved[name]
        functional.reset_net(net)
    potentials = {}
    for name, m in layers.items():
        theta_p = float(m.v_threshold)
        ks = int(getattr(m, 'k_pos', 1))
        theta_n = getattr(m, 'v_threshold_neg', None)
        kn = int(getattr(m, 'k_neg', 0))
        potentials[name] = {
            'type': type(m).__name__, 'counts': hists[name].tolist(),
            'range': [-POTENTIAL_RANGE, POTENTIAL_RANGE],
            'levels': [k * theta_p for k in range(1, ks + 1)] + ([k * float(theta_n) for k in range(1, kn + 1)]
                                                                 if theta_n is not None else []),
        }
    alphas = {name: [round(float(a), 6) for a in m.surrogate_function.alpha()]
              for name, m in layers.items() if isinstance(m.surrogate_function, TSG)}
    return {'energy': table, 'spike_levels': counts, 'potentials': potentials, 'tsg_alpha': alphas}


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history: List[dict], path: str) -> None:
    plt = _pyplot()
    epochs = [h['epoch'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [h['train_loss'] for h in history], label='train loss (CE + λ PNB)')
    ax1.plot(epochs, [h['train_ce'] for h in history], label='train CE')
    ax1.plot(epochs, [h['train_pnb'] for h in history], label='train PNB')
    ax1.plot(epochs, [h['test_loss'] for h in history], label='test CE')
    ax1.set_xlabel('epoch')
    ax1.set_ylabel('loss')
    ax1.legend(fontsize=8)
    ax2.plot(epochs, [100 * h['train_acc'] for h in history], label='train')
    ax2.plot(epochs, [100 * h['test_acc'] for h in history], label='test')
    ax2.set_xlabel('epoch')
    ax2.set_ylabel('accuracy (%)')
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alpha(alphas: Dict[str, List[float]], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, a in alphas.items():
        ax.plot(range(1, len(a) + 1), a, marker='o', ms=3, label=name)
    ax.set_xlabel('time step t')
    ax.set_ylabel(r'TSG sharpness $\alpha_t$')
    ax.set_title(r'learned $\alpha_t$ per layer (Eq. 17)')
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_potentials(potentials: dict, path: str) -> None:
    plt = _pyplot()
    names = list(potentials)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis('off')
    for ax, name in zip(axes.flat, names):
        p = potentials[name]
        counts = np.asarray(p['counts'])
        lo, hi = p['range']
        edges = np.linspace(lo, hi, len(counts) + 1)
        total = counts.sum()
        ax.bar(edges[:-1], counts / max(total, 1), width=edges[1] - edges[0], align='edge', color='tab:blue')
        for level in p['levels']:
            ax.axvline(level, color='tab:red' if level > 0 else 'tab:green', lw=0.8, ls='--')
        ax.set_yscale('log')
        ax.set_title(f"{name} ({p['type']})", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle('pre-reset membrane potentials (dashed: firing levels k·θ)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(results: Dict[str, List[dict]], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, rows in results.items():
        ax.plot([r['level'] for r in rows], [100 * r['acc'] for r in rows], marker='o', label=kind)
    ax.set_xlabel(r'noise intensity $\epsilon$')
    ax.set_ylabel('test accuracy (%)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def _atomic_save(obj, path: str) -> None:
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _write_json(obj, path: str) -> None:
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _default_out_dir(task: Task, args) -> str:
    """``runs/<task>_<arch>_<neuron>_T<T>_seed<seed>``, plus ``_sj<version>`` on SpikingJelly 2.x,
    so runs on the two release lines never overwrite (or ``--resume``) each other."""
    name = f'{task.name}_{args.arch}_{args.neuron}_T{args.T}_seed{args.seed}'
    if not spikingjelly_cf._compat.CLASSIC:
        name += f'_sj{spikingjelly_cf.SPIKINGJELLY_VERSION}'
    return os.path.join('runs', name)


def _set_threads(args, dist_) -> None:
    if dist_.device.type != 'cpu' and args.threads is None:
        return
    n = args.threads or max(1, (os.cpu_count() or 1) // max(dist_.local_world_size, 1))
    torch.set_num_threads(n)


def _loaders(train_set, test_set, args, dist_, train_batch: int):
    pin = dist_.device.type == 'cuda'
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist_.world_size, rank=dist_.rank,
                                                  shuffle=True, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=train_batch, sampler=sampler,
                                               num_workers=args.workers, pin_memory=pin)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch_size,
                                              sampler=ShardSampler(len(test_set), dist_.rank, dist_.world_size),
                                              num_workers=args.workers, pin_memory=pin)
    return sampler, train_loader, test_loader


def main(task: Task, args) -> dict:
    """Run ``task`` as the arguments say; returns the summary (rank 0) or ``{}``."""
    check_arguments(args)
    dist_ = Distributed(args.device)
    try:
        _set_threads(args, dist_)
        if args.eval_only:
            result = _evaluate_checkpoint(task, args, dist_)
        else:
            result = _train(task, args, dist_)
        # Leave together: rank 0 writes the outputs last, and a gloo rank whose peer has already
        # torn down its process group can abort at exit ('terminate called ...').
        dist_.barrier()
        return result
    finally:
        dist_.close()


def _log(dist_, *msg):
    if dist_.is_main:
        print(*msg, flush=True)


def _train(task: Task, args, dist_: Distributed) -> dict:
    tic = time.time()
    device = dist_.device
    if args.out_dir is None:
        args.out_dir = _default_out_dir(task, args)
    out_dir = args.out_dir
    ckpt_dir = os.path.join(out_dir, 'checkpoints')
    if dist_.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        _write_json(public_arguments(args), os.path.join(out_dir, 'args.json'))

    seed_everything(args.seed)
    train_set, test_set = task.build_data(args, dist_)
    t_data = time.time() - tic
    seed_everything(args.seed)
    net = task.build_model(args).to(device)
    model = net
    if dist_.enabled:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:  # the whole model (DDP included); state, checkpoints and hooks stay on net
        model = compile_model(model)
    seed_everything(args.seed + dist_.rank)

    sampler, train_loader, test_loader = _loaders(train_set, test_set, args, dist_, args.batch_size)
    if getattr(args, 'optimizer', 'sgd') == 'adam':
        optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    steps = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == 'cuda')

    pnb = None
    if args.pnb > 0 and any(isinstance(m, CFNode) for m in net.modules()):
        pnb = PNBMonitor(net)
    elif args.pnb > 0:
        _log(dist_, f'note: --pnb {args.pnb} ignored: the network has no CF layers (--neuron {args.neuron})')

    start_epoch, best_acc, best_epoch, history = 0, -1., -1, []
    resume = args.resume
    if resume == 'auto':
        resume = os.path.join(ckpt_dir, 'latest.pt')
    if resume is not None:
        if not os.path.isfile(resume):
            if args.resume != 'auto':
                raise SystemExit(f'--resume: no checkpoint at {resume}')
            _log(dist_, f'--resume: no checkpoint at {resume} yet, starting from scratch')
        else:
            ckpt = torch.load(resume, map_location=device, weights_only=False)
            net.load_state_dict(ckpt['model'])
            optimizer.load_state_dict(ckpt['optimizer'])
            scheduler.load_state_dict(ckpt['scheduler'])
            scaler.load_state_dict(ckpt['scaler'])
            start_epoch, best_acc, best_epoch = ckpt['epoch'], ckpt['best_acc'], ckpt['best_epoch']
            history = ckpt['history']
            rngs = ckpt['rng']
            if len(rngs) != dist_.world_size:
                _log(dist_, f'note: checkpoint written by {len(rngs)} process(es), resuming with '
                            f'{dist_.world_size}: the run will not repeat an uninterrupted one exactly')
            set_rng_state(rngs[dist_.rank % len(rngs)])
            _log(dist_, f'resumed from {resume} after epoch {start_epoch} (best test acc {best_acc:.4f})')

    writer = None
    if dist_.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(out_dir, 'tensorboard'))
        except ImportError:  # pragma: no cover
            _log(dist_, 'note: tensorboard is not installed; no TensorBoard scalars')
    n_params = sum(p.numel() for p in net.parameters())
    _log(dist_, f'{task.name}: {args.arch} with {args.neuron.upper()} neurons, T={args.T}, '
                f'{n_params / 1e6:.3f} M parameters, {len(train_set)} train / {len(test_set)} test samples, '
                f'{dist_.world_size} process(es) on {device} ({torch.get_num_threads()} threads each); '
                f'data ready in {t_data:.1f} s')
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        t0 = time.time()
        sampler.set_epoch(epoch)
        tr = train_one_epoch(task, model, net, train_loader, optimizer, scheduler, scaler, pnb, args, dist_, epoch)
        # evaluate() runs under torch.no_grad(): the PNB monitor records nothing there
        te = evaluate(task, model, net, test_loader, args, dist_)
        seconds = time.time() - t0
        record = {'epoch': epoch + 1, 'train_loss': tr['loss'], 'train_ce': tr['ce'], 'train_pnb': tr['pnb'],
                  'train_acc': tr['acc'], 'test_loss': te['loss'], 'test_acc': te['acc'],
                  'spikes_per_neuron_step': tr['spikes_per_neuron_step'],
                  'train_first_step_loss': tr['first_loss'],  # rank 0's first batch
                  'lr': optimizer.param_groups[0]['lr'], 'seconds': seconds}
        history.append(record)
        is_best = te['acc'] > best_acc
        if is_best:
            best_acc, best_epoch = te['acc'], epoch + 1
        _log(dist_, f"epoch {epoch + 1:3d}/{args.epochs}  loss {tr['loss']:.4f}  CE {tr['ce']:.4f}  "
                    f"PNB {tr['pnb']:.4f}  train acc {100 * tr['acc']:6.2f}%  test acc {100 * te['acc']:6.2f}%  "
                    f"spikes/neuron/step {tr['spikes_per_neuron_step']:.4f}  {seconds:.1f} s")
        rngs = dist_.gather_object(rng_state())
        if dist_.is_main:
            if writer is not None:
                for key in ('train_loss', 'train_ce', 'train_pnb', 'train_acc', 'test_loss', 'test_acc',
                            'spikes_per_neuron_step', 'lr', 'seconds'):
                    writer.add_scalar(key.replace('_', '/', 1) if key.startswith(('train', 'test')) else key,
                                      record[key], epoch + 1)
                writer.flush()
            ckpt = {'model': net.state_dict(), 'optimizer': optimizer.state_dict(),
                    'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch + 1,
                    'best_acc': best_acc, 'best_epoch': best_epoch, 'history': history, 'rng': rngs,
                    'args': public_arguments(args), 'class_names': task.class_names,
                    'versions': {'torch': torch.__version__, 'spikingjelly': spikingjelly_cf.SPIKINGJELLY_VERSION,
                                 'spikingjelly_cf': spikingjelly_cf.__version__}}
            _atomic_save(ckpt, os.path.join(ckpt_dir, 'latest.pt'))
            if is_best:
                _atomic_save(ckpt, os.path.join(ckpt_dir, 'best.pt'))
        dist_.barrier()
    if pnb is not None:
        pnb.remove()
    if writer is not None:
        writer.close()
    if end_epoch < args.epochs:
        _log(dist_, f'stopped after epoch {end_epoch} (--stop-after); continue with --resume')
        return {}

    summary = {}
    if dist_.is_main:
        last = history[-1] if history else {}
        summary = {
            'task': task.name, 'arch': args.arch, 'neuron': args.neuron, 'T': args.T,
            'test_acc': last.get('test_acc'), 'best_test_acc': best_acc, 'best_epoch': best_epoch,
            'train_acc': last.get('train_acc'), 'epochs': args.epochs,
            'train_samples': len(train_set), 'test_samples': len(test_set), 'parameters': n_params,
            'processes': dist_.world_size, 'seconds_total': None,
            'versions': {'torch': torch.__version__, 'spikingjelly': spikingjelly_cf.SPIKINGJELLY_VERSION,
                         'spikingjelly_cf': spikingjelly_cf.__version__},
            'history': history, 'class_names': task.class_names,
        }
        figures = {'curves': os.path.join(out_dir, 'curves.png')}
        plot_curves(history, figures['curves'])
        if not args.no_analysis:
            analysis_loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch_size,
                                                          num_workers=args.workers)
            analysis = analyse(task, net, analysis_loader, args, device)
            summary.update(analysis)
            if analysis['tsg_alpha']:
                figures['tsg_alpha'] = os.path.join(out_dir, 'tsg_alpha.png')
                plot_alpha(analysis['tsg_alpha'], figures['tsg_alpha'])
            figures['potentials'] = os.path.join(out_dir, 'potentials.png')
            plot_potentials(analysis['potentials'], figures['potentials'])
        summary['figures'] = figures
        summary['checkpoints'] = {'latest': os.path.join(ckpt_dir, 'latest.pt'),
                                  'best': os.path.join(ckpt_dir, 'best.pt')}
        summary['seconds_total'] = time.time() - tic
        cpu = os.times()
        summary['cpu_seconds_process'] = cpu.user + cpu.system  # rank 0's process (all its threads)
        _write_json(summary, os.path.join(out_dir, 'summary.json'))
        if 'energy' in summary:
            t = summary['energy']['total']
            print(f"energy per sample: SNN {t['energy_j'] * 1e3:.4g} mJ ({t['sops'] / 1e6:.4g} M SOPs), "
                  f"ANN reference {t['ann_energy_j'] * 1e3:.4g} mJ")
        print(f"final test accuracy {100 * summary['test_acc']:.2f}% (best {100 * best_acc:.2f}% at epoch "
              f"{best_epoch}); {summary['seconds_total']:.0f} s in all "
              f"({summary['cpu_seconds_process']:.0f} s of CPU time)")
        print(f'outputs in {os.path.abspath(out_dir)}: summary.json, args.json, '
              f"{', '.join(os.path.basename(p) for p in figures.values())}, checkpoints/, tensorboard/")
    dist_.barrier()
    return summary


def _evaluate_checkpoint(task: Task, args, dist_: Distributed) -> dict:
    device = dist_.device
    ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
    saved = ckpt.get('args', {})
    explicit = set(getattr(args, '_explicit', ()))
    for name in MODEL_ARGUMENTS:        # the model is the checkpoint's
        if name in saved:
            setattr(args, name, saved[name])
    for name in task.data_arguments:    # the data too, unless given here
        if name in saved and name not in explicit:
            setattr(args, name, saved[name])
    out_dir = args.out_dir or os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint)))
    if dist_.is_main:
        os.makedirs(out_dir, exist_ok=True)
    seed_everything(args.seed)
    _, test_set = task.build_data(args, dist_)
    net = task.build_model(args).to(device)
    net.load_state_dict(ckpt['model'])
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch_size,
                                              sampler=ShardSampler(len(test_set), dist_.rank, dist_.world_size),
                                              num_workers=args.workers)
    kinds = args.noise or []
    levels = args.noise_levels or [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    model = compile_model(net) if args.compile else net
    clean = evaluate(task, model, net, test_loader, args, dist_)
    _log(dist_, f"checkpoint {args.checkpoint} (epoch {ckpt.get('epoch')}): test accuracy "
                f"{100 * clean['acc']:.2f}% on {clean['samples']} samples")
    results = {}
    for kind in kinds:
        rows = []
        for level in levels:
            generator = torch.Generator().manual_seed(args.seed * 1000 + dist_.rank)
            r = evaluate(task, model, net, test_loader, args, dist_, noise=(kind, level, generator),
                         desc=f'{kind} {level:g}')
            rows.append({'level': level, 'acc': r['acc'], 'loss': r['loss']})
        results[kind] = rows
    report = {'checkpoint': os.path.abspath(args.checkpoint), 'epoch': ckpt.get('epoch'),
              'test_acc': clean['acc'], 'samples': clean['samples'], 'robustness': results}
    if dist_.is_main and results:
        header = 'noise'.ljust(12) + ''.join(f'{level:>9g}' for level in levels)
        lines = [header, '-' * len(header)]
        for kind, rows in results.items():
            lines.append(kind.ljust(12) + ''.join(f"{100 * r['acc']:8.2f}%" for r in rows))
        print('test accuracy under input noise (intensity eps):')
        print('\n'.join(lines))
        report['table'] = lines
        report['figure'] = os.path.join(out_dir, 'robustness.png')
        plot_robustness(results, report['figure'])
    if dist_.is_main:
        path = os.path.join(out_dir, 'robustness.json' if results else 'evaluation.json')
        _write_json(report, path)
        print(f'outputs in {out_dir}: {os.path.basename(path)}' + (', robustness.png' if results else ''))
    dist_.barrier()
    return report if dist_.is_main else {}
