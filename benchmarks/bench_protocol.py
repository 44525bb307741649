"""The open-neuromorphic "SNN library benchmarks" protocol: ``Linear(n, n)`` + a spiking layer.

One training step (forward + backward of a fixed random upstream gradient, weight gradients
included) of ``Linear(n, n)`` followed by a multi-step neuron layer on an input of shape
``[T, batch, n]``: batch 16, T = 500, n = 512 and 4096 on the CPU (up to 16384 on CUDA). The
candidates:

* ``CFNode`` on each of its backends for the device (``cpp`` and the ``torch`` reference on the
  CPU; ``cupy`` on CUDA), with ``CFRect`` (the default surrogate) and ``TSG(T=500)``, and, where
  ``CFNode`` has it, the memory-lean mode (``memory='lean'``);
* SpikingJelly's ``LIFNode`` of the installed line (run the script once per line, chosen by
  ``PYTHONPATH``): 0.0.0.0.14 on each of its backends for the device, 2.0 with its default
  dispatch;
* the optional peers, when installed (``pip install .[benchmarks]``): snnTorch ``Leaky`` and
  Norse ``LIFBoxCell`` (stepped in a Python loop, as their docs do) and Norse ``LIF`` (its
  sequence module). The run says which peers it found.

Equivalent LIF parameters (all the same membrane dynamics as SpikingJelly's default ``LIFNode``,
``tau = 2``, ``decay_input=True``, threshold 1, hard reset to 0; see ``LIF_PARAMETERS``).

Memory, per candidate and size, from one extra call: the bytes the autograd graph saves for the
backward pass (unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``, each storage
counted once, parameters included), the peak RSS increase of the process during the call
(``/proc/self/status`` ``VmHWM`` after resetting it through ``/proc/self/clear_refs``) and, on
CUDA, ``torch.cuda.max_memory_allocated``. "Saved bytes per neuron-step" is measured on the neuron
layer alone (input ``[T, batch, n]`` requiring a gradient, no Linear; T = 64, it does not depend
on T) and divided by ``T*batch*n``.

Long sequences: T = 8, 64, 500 with ``TSG(T=T)`` and ``TSG(T=1)`` on every CF backend of the
device (time and saved bytes; both grow linearly in T), n = 512 on the kernels and n = 64 on the
pure-PyTorch reference (a Python loop over T and the levels; at n = 512, T = 500 one call takes
about a minute on the shared 2-core machine). A case whose first call takes longer than
``--slow-s`` is timed with one call (noted).

Before timing, every CF candidate is checked against the pure-PyTorch reference on the same
network: spikes, input gradient, weight gradient and TSG's parameter gradient.

Results: ``<out>/<YYYY-MM-DD>_<device>/protocol_<tag>.{json,md,png}``. ``--quick`` runs a tiny
sweep (seconds; ``tests/test_benchmarks.py`` runs it) without the ``inductor`` backend, whose
compiles would take minutes with a cold cache (name it in ``--only`` to include it).
"""
import argparse
import inspect
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

#: Targets of the protocol benchmark (CPU, T = 500, n = 512 and 4096, CF default backend with TSG).
TARGET_VS_LIF = 0.3
TARGET_VS_PEERS = 0.5
# memory='lean' saves 1 B (CFRect window codes) or 3 B (TSG/Sigmoid/ATan: the nearest level's
# index and the float16 offset from it) per neuron-step; the former 2 B (float16 h) lost the
# surrogate windows at large thresholds (docs/architecture.md, "Memory-lean mode")
TARGET_LEAN_BYTES = 3.0
TARGET_T = 500
TARGET_NS = (512, 4096)

LIF_PARAMETERS = {
    'SpikingJelly LIFNode': 'defaults: tau=2, decay_input=True (h = v + (x - v)/2), v_threshold=1, '
                            'v_reset=0 (hard reset), surrogate Sigmoid(alpha=4)',
    'snnTorch Leaky': 'beta=0.5 (= 1 - 1/tau), threshold=1, reset_mechanism="zero", '
                      'spike_grad=surrogate.sigmoid(slope=4) (the derivative of SpikingJelly\'s '
                      'Sigmoid(alpha=4)); input not scaled by 1/tau (absorbed by the Linear), '
                      'reset applied one step later (snnTorch\'s reset_delay=True)',
    'Norse LIFBoxCell': 'LIFBoxParameters(tau_mem_inv=500, v_th=1, v_reset=0, v_leak=0), dt=1e-3: '
                        'v + dt*tau_mem_inv*(x - v) = v + (x - v)/2, SpikingJelly\'s charge '
                        'exactly; '
                        'surrogate method="super" (SuperSpike, alpha=100, Norse\'s default; Norse '
                        'has no sigmoid surrogate)',
    'Norse LIF': 'LIFParameters(tau_mem_inv=500, tau_syn_inv=1000, v_th=1, v_reset=0), dt=1e-3: '
                 'the synaptic current decays fully every step, so it is the same LIF with the '
                 'input entering one step later; surrogate "super" (alpha=100)',
    'CFNode': 'defaults (the paper\'s setting): tau=4/3, decay_input=False, thresholds +-1, '
              'K_P=K_N=2, soft reset; surrogate CFRect (default) or TSG(T=500)',
}

NOTES: List[str] = []


def note(text: str) -> None:
    if text not in NOTES:
        NOTES.append(text)
        print(f'NOTE: {text}', flush=True)


# ---------------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------------
class SavedBytes:
    """Bytes of the unique storages the autograd graph saves while active (each counted once).

    >>> import torch
    >>> x = torch.randn(4, requires_grad=True)
    >>> with SavedBytes() as sb:
    ...     y = (x * x).sum()
    >>> sb.bytes  # x is saved twice by mul, one storage of 4 floats
    16
    """

    def __init__(self):
        self.storages: Dict[int, int] = {}
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key != 0:
                self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
            pass
        return t

    @staticmethod
    def _unpack(t):
        return t

    @property
    def bytes(self) -> int:
        return int(sum(self.storages.values()))

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            m = re.search(rf'^{key}:\s+(\d+) kB', f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:  # pragma: no cover - not Linux
        return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; ``False`` where impossible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False


def measure_memory(step: Callable[[], object], device: torch.device) -> dict:
    """One call of ``step`` (forward inside, backward included): saved bytes, peak RSS, CUDA peak.

    ``step`` must return a callable that runs the backward pass, so that the saved tensors are
    counted between forward and backward.
    """
    import gc
    gc.collect()
    out: dict = {}
    rss_ok = reset_peak_rss()
    rss0 = _proc_status_kib('VmRSS')
    if device.type == 'cuda':
        common.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with SavedBytes() as sb:
        backward = step()
    backward()
    if device.type == 'cuda':
        common.synchronize(device)
        out['cuda_peak_bytes'] = int(torch.cuda.max_memory_allocated(device) - base)
    out['saved_bytes'] = sb.bytes
    out['saved_storages'] = len(sb.storages)
    hwm = _proc_status_kib('VmHWM')
    if rss_ok and hwm is not None and rss0 is not None:
        out['peak_rss_increase_bytes'] = (hwm - rss0) * 1024
        out['peak_rss_bytes'] = hwm * 1024
    return out


# ---------------------------------------------------------------------------------------------
# candidates: a neuron layer factory; the network is Linear(n, n) + that layer
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    family: str                     # 'CF', 'LIF', 'peer', 'linear'
    factory: Optional[Callable[[int], nn.Module]] = None   # T -> layer on [T, B, n]
    backend: str = ''
    surrogate: str = ''
    memory_mode: str = 'normal'
    default: bool = False
    unavailable: Optional[str] = None
    info: Dict[str, object] = field(default_factory=dict)


class Looped(nn.Module):
    """Steps a single-step cell over ``[T, ...]`` in Python (snnTorch's and Norse's usage)."""

    def __init__(self, cell: nn.Module, kind: str):
        super().__init__()
        self.cell, self.kind = cell, kind

    def forward(self, x):
        # x.unbind(0), not x[t]: the backward of T selections would build T full-size
        # gradients of x (O(T^2) memory traffic, about 10x the whole step at T = 500)
        out = []
        if self.kind == 'snntorch':
            mem = self.cell.init_leaky()
            for xt in x.unbind(0):
                spk, mem = self.cell(xt, mem)
                out.append(spk)
        else:  # norse cell: (input, state) -> (z, state)
            state = None
            for xt in x.unbind(0):
                z, state = self.cell(xt, state)
                out.append(z)
        return torch.stack(out)


class NorseSequence(nn.Module):
    """Norse's sequence module returns ``(z, state)``; keep ``z``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0]


def reset_layer(layer: nn.Module) -> None:
    """Reset SpikingJelly memory modules only: 0.0.0.0.14's ``reset_net`` calls ``m.reset()`` on
    any module with a ``reset`` attribute, which in snnTorch's ``Leaky`` is a tensor."""
    from spikingjelly.activation_based import base
    for m in layer.modules():
        if isinstance(m, base.MemoryModule):
            m.reset()


def cf_supports_memory(backend: Optional[str] = None) -> bool:
    """Whether CFNode has ``memory='lean'`` and (given ``backend``) that backend implements it."""
    from spikingjelly_cf import CFNode
    if 'memory' not in inspect.signature(CFNode.__init__).parameters:
        return False
    if backend is None:
        return True
    from spikingjelly_cf import backends
    return bool(getattr(backends.get(backend), 'supports_memory_lean', False))


def cf_backends(device: torch.device):
    from spikingjelly_cf.backends import available_backends
    from spikingjelly_cf.functional.neuron import resolve_backend
    from spikingjelly_cf.surrogate import CFRect
    probe = torch.zeros(1, 2, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        default = resolve_backend('auto', probe, CFRect())
    return list(available_backends(device.type, torch.float32)), default


def cf_candidate(backend: str, surrogate: str, default: bool, memory: str = 'normal',
                 tsg_T: Optional[int] = None) -> Candidate:
    from spikingjelly_cf import CFNode
    from spikingjelly_cf.surrogate import TSG, CFRect

    def factory(T: int, backend=backend, surrogate=surrogate, memory=memory, tsg_T=tsg_T):
        sg = CFRect() if surrogate == 'CFRect' else TSG(T=tsg_T if tsg_T is not None else T)
        kw = dict(memory=memory) if memory != 'normal' else {}
        return CFNode(step_mode='m', backend=backend, surrogate_function=sg, **kw)
    label = surrogate if surrogate == 'CFRect' else f'TSG(T={tsg_T if tsg_T else "T"})'
    name = f'CFNode[{backend}] {label}' + (f' {memory}' if memory != 'normal' else '')
    return Candidate(name, 'CF', factory, backend=backend, surrogate=surrogate,
                     memory_mode=memory, default=default)


def build_candidates(device: torch.device, only: Optional[List[str]] = None,
                     skip: Sequence[str] = ()) -> List[Candidate]:
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly_cf import _compat
    version = _compat.SPIKINGJELLY_VERSION
    out: List[Candidate] = [Candidate('Linear only (no neuron)', 'linear',
                                      lambda T: nn.Identity())]
    backends, default = cf_backends(device)
    lean = cf_supports_memory()
    for b in backends:
        if b in skip:
            continue
        for sg in ('CFRect', 'TSG'):
            out.append(cf_candidate(b, sg, default=(b == default)))
            if lean and cf_supports_memory(b):
                out.append(cf_candidate(b, sg, default=(b == default), memory='lean'))
    if not lean:
        note("CFNode has no memory='lean' option in this checkout: no lean-mode rows")

    if _compat.CLASSIC:
        for b in sj_neuron.LIFNode(step_mode='m').supported_backends:
            cand = Candidate(f'LIFNode[{b}] (SJ {version})', 'LIF',
                             lambda T, b=b: sj_neuron.LIFNode(step_mode='m', backend=b), backend=b)
            if b == 'cupy':
                if device.type != 'cuda':
                    cand.unavailable = 'CuPy backend needs CUDA tensors'
                else:
                    try:
                        import cupy  # noqa: F401
                        import numpy
                        if 'int' not in numpy.__dict__:
                            numpy.int = int
                            note('applied `numpy.int = int` for SpikingJelly 0.0.0.0.14\'s CuPy '
                                 'LIFNode (np.int was removed in NumPy 1.24)')
                    except Exception as exc:  # noqa: BLE001
                        cand.unavailable = f'cupy not importable: {exc}'.splitlines()[0]
            out.append(cand)
    else:
        out.append(Candidate(f'LIFNode[default] (SJ {version})', 'LIF',
                             lambda T: sj_neuron.LIFNode(step_mode='m'), backend='default'))

    found = []
    try:
        import snntorch
        from snntorch import surrogate as snn_surrogate

        def snn_factory(T):
            cell = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism='zero',
                                  spike_grad=snn_surrogate.sigmoid(slope=4))
            return Looped(cell, 'snntorch')
        out.append(Candidate(f'snnTorch Leaky ({snntorch.__version__})', 'peer', snn_factory,
                             backend='python loop'))
        found.append(f'snntorch {snntorch.__version__}')
    except Exception as exc:  # noqa: BLE001
        out.append(Candidate('snnTorch Leaky', 'peer', unavailable=f'not installed: {exc}'))
    try:
        import norse
        import norse.torch as nt
        nv = getattr(norse, '__version__', '?')

        def box_factory(T):
            p = nt.LIFBoxParameters(tau_mem_inv=torch.tensor(500.0), v_th=torch.tensor(1.0),
                                    v_reset=torch.tensor(0.0), v_leak=torch.tensor(0.0))
            return Looped(nt.LIFBoxCell(p, dt=1e-3), 'norse')

        def lif_factory(T):
            p = nt.LIFParameters(tau_mem_inv=torch.tensor(500.0), tau_syn_inv=torch.tensor(1000.0),
                                 v_th=torch.tensor(1.0), v_reset=torch.tensor(0.0),
                                 v_leak=torch.tensor(0.0))
            return NorseSequence(nt.LIF(p, dt=1e-3))
        out.append(Candidate(f'Norse LIFBoxCell ({nv})', 'peer', box_factory,
                             backend='python loop'))
        out.append(Candidate(f'Norse LIF ({nv})', 'peer', lif_factory, backend='norse.torch.LIF'))
        found.append(f'norse {nv}')
    except Exception as exc:  # noqa: BLE001
        out.append(Candidate('Norse LIFBoxCell / LIF', 'peer', unavailable=f'not installed: {exc}'))
    note('peers found: ' + (', '.join(found) if found else 'none') +
         ' (install them with `pip install .[benchmarks]`)')
    if only:
        out = [c for c in out if c.family == 'linear' or any(o in c.name for o in only)]
    return out


# ---------------------------------------------------------------------------------------------
# one training step of Linear(n, n) + layer
# ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, n: int, layer: nn.Module):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.layer = layer

    def forward(self, x):  # x [T, B, n]
        return self.layer(self.fc(x))


def make_net(cand: Candidate, n: int, T: int, device, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(n, cand.factory(T)).to(device)


def make_data(T: int, B: int, n: int, device, seed: int):
    g = torch.Generator(device='cpu').manual_seed(seed)
    x = (torch.randn(T, B, n, generator=g) * 3.0).to(device)
    grad = torch.randn(T, B, n, generator=g).to(device)
    return x, grad


def step_fn(net: Net, x, grad, rate: Optional[list] = None) -> Callable[[], Callable[[], None]]:
    """Forward inside; returns the backward (so the memory probe can sit between the two).
    ``rate``, if given, receives the mean ``|spike|`` of the call."""
    def step():
        net.zero_grad(set_to_none=True)
        reset_layer(net.layer)
        out = net(x)
        if rate is not None:
            rate.append(out.detach().abs().mean().item())
        return lambda: out.backward(grad)
    return step


def train_call(net: Net, x, grad) -> Callable[[], None]:
    step = step_fn(net, x, grad)
    return lambda: step()()


def check_cf(cand: Candidate, device) -> dict:
    """The CF network against the same network on the reference backend: spikes, grad x, grad W,
    grad of TSG's parameter. Float32; the reference's arithmetic is the kernels' contract, so
    spikes must be equal and gradients equal up to summation order."""
    from spikingjelly_cf import CFNode
    T, B, n = 16, 2, 64
    x, grad = make_data(T, B, n, device, seed=11)
    results = []
    for c in (cand, None):
        torch.manual_seed(0)
        layer = cand.factory(T)
        if c is None:  # the reference: same layer on backend 'torch', normal memory
            ref = CFNode(step_mode='m', backend='torch',
                         surrogate_function=type(layer.surrogate_function)(T=T)
                         if cand.surrogate == 'TSG' else None)
            layer = ref
        torch.manual_seed(0)
        net = Net(n, layer).to(device)
        xg = x.clone().requires_grad_(True)
        reset_layer(net.layer)
        s = net(xg)
        s.backward(grad)
        gp = [p.grad.clone() for p in net.layer.parameters()]
        results.append((s.detach(), xg.grad.clone(), net.fc.weight.grad.clone(), gp))
    (s, gx, gw, gp), (s0, gx0, gw0, gp0) = results
    err = lambda a, b: ((a - b).abs().max() / (b.abs().max() + 1e-12)).item()  # noqa: E731
    r = dict(candidate=cand.name, T=T, batch=B, n=n, spikes_equal=bool(torch.equal(s, s0)),
             grad_x_rel_err=err(gx, gx0), grad_w_rel_err=err(gw, gw0),
             grad_tsg_rel_err=max([err(a, b) for a, b in zip(gp, gp0)], default=0.0))
    tol = 1e-4
    r['tolerance'] = tol
    r['passed'] = bool(r['spikes_equal'] and r['grad_x_rel_err'] <= tol
                       and r['grad_w_rel_err'] <= tol
                       and (cand.memory_mode == 'lean' or r['grad_tsg_rel_err'] <= tol))
    if cand.memory_mode == 'lean' and cand.surrogate == 'TSG':
        # lean TSG saves h's offset from the nearest level in float16: its gradients differ from
        # float32's by that rounding (a relative 2^-11 per distance; tests/test_memory_lean.py
        # bounds a 6-step call by 4e-3), here summed over T steps (reported)
        r['passed'] = bool(r['spikes_equal'] and r['grad_x_rel_err'] <= 5e-2
                           and r['grad_w_rel_err'] <= 5e-2 and r['grad_tsg_rel_err'] <= 5e-2)
        r['tolerance'] = 5e-2
    return r


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    device: torch.device
    ns: List[int]
    T: int
    batch: int
    long_Ts: List[int]
    long_n: int
    long_n_reference: int
    per_step_T: int
    slow_s: float
    long_backends: Optional[List[str]]
    warmup: int
    repeats: int
    max_call_s: float
    quick: bool
    only: Optional[List[str]]


def timing(call, cfg: Config, warmup: Optional[int] = None,
           first_call_s: Optional[float] = None) -> common.Timing:
    """Median of ``cfg.repeats`` calls; a single call when the first (memory) call took longer
    than ``cfg.slow_s`` (the pure-PyTorch loops at T = 500 on a shared 2-core machine)."""
    repeats = cfg.repeats
    if first_call_s is not None and first_call_s > cfg.slow_s:
        repeats = 1
    return common.measure(call, cfg.device, warmup=cfg.warmup if warmup is None else warmup,
                          min_repeats=repeats, max_repeats=repeats, budget_s=0.0)


def memory_and_timing(net, x, grad, cfg: Config, rate: Optional[list] = None):
    """The memory call (which is also the first warm-up call), then the timed calls."""
    began = time.perf_counter()
    mem = measure_memory(step_fn(net, x, grad, rate), cfg.device)
    first = time.perf_counter() - began
    t = timing(train_call(net, x, grad), cfg, warmup=max(0, cfg.warmup - 1), first_call_s=first)
    return mem, t, first


def run_protocol(cfg: Config, cands: List[Candidate]) -> List[dict]:
    rows = []
    estimate: Dict[str, float] = {}
    for n in cfg.ns:
        x, grad = make_data(cfg.T, cfg.batch, n, cfg.device, seed=3)
        for c in cands:
            row = dict(candidate=c.name, family=c.family, backend=c.backend, surrogate=c.surrogate,
                       memory_mode=c.memory_mode, default=c.default, T=cfg.T, batch=cfg.batch,
                       n=n, neurons=cfg.batch * n)
            if c.unavailable:
                row.update(status='unavailable', reason=c.unavailable)
                rows.append(row)
                continue
            prev = estimate.get(c.name)
            if prev is not None and prev * n / cfg.ns[0] > cfg.max_call_s:
                row.update(status='skipped', reason=f'estimated {prev * n / cfg.ns[0]:.0f} s per '
                           f'call > --max-call-s {cfg.max_call_s:g}')
                note(f'{c.name} n={n}: {row["reason"]}')
                rows.append(row)
                continue
            try:
                net = make_net(c, n, cfg.T, cfg.device)
                # the memory call is the first warm-up call (and gives the firing rate)
                rate = []
                mem, t, first = memory_and_timing(net, x, grad, cfg, rate)
                rate = rate[0]
                row.update(status='ok', time_s=t.to_dict(), first_call_s=first,
                           firing_rate=rate, **mem)
                if t.repeats == 1:
                    note(f'{c.name} n={n}: one timed call (the first call took {first:.0f} s > '
                         f'--slow-s {cfg.slow_s:g})')
                if n == cfg.ns[0]:
                    estimate[c.name] = t.median
                print(f'[protocol T={cfg.T} B={cfg.batch} n={n}] {c.name:<42} '
                      f'{common.fmt_time(t.median):>9} (IQR {common.fmt_time(t.q25)}..'
                      f'{common.fmt_time(t.q75)}, n={t.repeats})  saved '
                      f'{common.fmt_bytes(mem["saved_bytes"])}  peak RSS +'
                      f'{common.fmt_bytes(mem.get("peak_rss_increase_bytes"))}  rate {rate:.3f}',
                      flush=True)
                del net
            except Exception as exc:  # noqa: BLE001 - reported, never dropped
                traceback.print_exc()
                row.update(status='error',
                           reason=f'{type(exc).__name__}: {exc}'.splitlines()[0][:300])
            rows.append(row)
    return rows


def neuron_saved_bytes(cands: List[Candidate], cfg: Config, T: int, n: int) -> List[dict]:
    """Saved bytes per neuron-step of each neuron layer alone (input [T, B*n] needs a gradient)."""
    rows = []
    N = cfg.batch * n
    for c in cands:
        if c.unavailable or c.family == 'linear':
            continue
        try:
            layer = c.factory(T).to(cfg.device)
            reset_layer(layer)
            x, grad = make_data(T, cfg.batch, n, cfg.device, seed=5)
            xg = x.requires_grad_(True)
            with SavedBytes() as sb:
                out = layer(xg)
            out.backward(grad)
            reset_layer(layer)
            # storages of at least N bytes scale with the neurons (one [T, N] tensor or T
            # per-step [N] ones); smaller ones are per layer ([T] alpha, TSG's own tensors)
            big = sum(b for b in sb.storages.values() if b >= N)
            rows.append(dict(candidate=c.name, family=c.family, backend=c.backend,
                             surrogate=c.surrogate, memory_mode=c.memory_mode, T=T, N=N,
                             saved_bytes=sb.bytes, saved_storages=len(sb.storages),
                             bytes_per_neuron_step=sb.bytes / (T * N),
                             neuron_step_bytes_per_neuron_step=big / (T * N),
                             per_layer_bytes=sb.bytes - big))
            print(f'[saved by the neuron alone T={T} N={N}] {c.name:<42} '
                  f'{sb.bytes / (T * N):6.3f} B per neuron-step ({big / (T * N):.3f} in '
                  f'neuron-sized tensors, {len(sb.storages)} storages)', flush=True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append(dict(candidate=c.name, family=c.family, status='error', T=T, N=N,
                             reason=f'{type(exc).__name__}: {exc}'.splitlines()[0][:300]))
    return rows


def run_long_T(cfg: Config) -> List[dict]:
    """T sweep with TSG(T=T) and TSG(T=1) on every CF backend of the device."""
    backends, default = cf_backends(cfg.device)
    lean = cf_supports_memory()
    rows = []
    for b in backends:
        if cfg.long_backends and b not in cfg.long_backends:
            continue
        modes = ['normal'] + (['lean'] if lean and cf_supports_memory(b) else [])
        for tsg in ('T', '1'):
            for memory in modes:
                for T in cfg.long_Ts:
                    c = cf_candidate(b, 'TSG', b == default, memory=memory,
                                     tsg_T=None if tsg == 'T' else 1)
                    n = cfg.long_n_reference if b == 'torch' else cfg.long_n
                    x, grad = make_data(T, cfg.batch, n, cfg.device, seed=7)
                    row = dict(candidate=c.name, backend=b, tsg=f'TSG(T={tsg})', memory_mode=memory,
                               T=T, batch=cfg.batch, n=n)
                    try:
                        net = make_net(c, n, T, cfg.device)
                        mem, t, first = memory_and_timing(net, x, grad, cfg)
                        row.update(status='ok', time_s=t.to_dict(), first_call_s=first, **mem)
                        print(f'[long T n={n}] {b:<6} TSG(T={tsg:<1}) {memory:<6} T={T:<4} '
                              f'{common.fmt_time(t.median):>9}  saved '
                              f'{common.fmt_bytes(mem["saved_bytes"])}', flush=True)
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        row.update(status='error',
                                   reason=f'{type(exc).__name__}: {exc}'.splitlines()[0][:300])
                    rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# targets, report
# ---------------------------------------------------------------------------------------------
def _time(rows, pred) -> Optional[float]:
    for r in rows:
        if r.get('status') == 'ok' and pred(r):
            return r['time_s']['median']
    return None


def evaluate_targets(cfg: Config, rows: List[dict], per_step: List[dict]) -> List[dict]:
    out = []
    for n in cfg.ns:
        cf = _time(rows, lambda r: r['n'] == n and r['family'] == 'CF' and r['default']
                   and r['surrogate'] == 'TSG' and r['memory_mode'] == 'normal')
        lif = [r for r in rows if r['n'] == n and r['family'] == 'LIF' and r.get('status') == 'ok']
        peers = [r for r in rows if r['n'] == n and r['family'] == 'peer' and r.get('status') == 'ok']
        lin = _time(rows, lambda r: r['n'] == n and r['family'] == 'linear')
        for group, label, bound in ((lif, 'fastest {}', TARGET_VS_LIF),
                                    (peers, 'fastest peer ({})', TARGET_VS_PEERS)):
            if not group:
                continue
            best = min(group, key=lambda r: r['time_s']['median'])
            ratio = cf / best['time_s']['median'] if cf else None
            neuron_ratio = None
            if cf and lin is not None and best['time_s']['median'] > lin:
                neuron_ratio = (cf - lin) / (best['time_s']['median'] - lin)
            out.append(dict(target=f'CF default TSG / {label.format(best["candidate"])} <= {bound}',
                            n=n, T=cfg.T, measured=ratio, neuron_only_ratio=neuron_ratio,
                            passed=None if ratio is None or cfg.T != TARGET_T or n not in TARGET_NS
                            else ratio <= bound))
    lean = [r for r in per_step if r.get('memory_mode') == 'lean' and 'bytes_per_neuron_step' in r]
    if lean:
        key = 'neuron_step_bytes_per_neuron_step'
        worst = max(lean, key=lambda r: r[key])
        out.append(dict(target=f'lean mode saves <= {TARGET_LEAN_BYTES} B per neuron-step in '
                               f'neuron-sized tensors (worst: {worst["candidate"]}; plus '
                               f'{worst["per_layer_bytes"]} B per layer and call)',
                        n=None, T=worst['T'], measured=worst[key],
                        passed=worst[key] <= TARGET_LEAN_BYTES))
    return out


def markdown_report(p: dict) -> str:
    meta = p['environment']
    lines = [f'# Protocol benchmark (Linear(n, n) + neuron, open-neuromorphic): {p["tag"]}', '',
             f'Command: `{p["command"]}`', ''] + common.stamp_lines(meta) + ['']
    cfg = p['config']
    lines += [f'One training step (forward + backward, weight gradients included) on '
              f'`[T={cfg["T"]}, batch={cfg["batch"]}, n]` float32; median of {cfg["repeats"]} '
              f'calls after {cfg["warmup"]} warm-up; "saved" = unique storages the autograd graph '
              f'saves for backward (Linear\'s input and weight included); "peak RSS +" = '
              f'process peak RSS increase during one call (glibc may reuse freed memory, so this '
              f'can be below the saved bytes).', '']
    header = ['candidate', 'n', 'median', 'IQR', 'x CF default TSG', 'saved', 'peak RSS +']
    if meta['device'].startswith('cuda'):
        header.append('CUDA peak')
    header.append('firing rate')
    rows = []
    for n in cfg['ns']:
        cf = _time(p['protocol'], lambda r: r['n'] == n and r['family'] == 'CF' and r['default']
                   and r['surrogate'] == 'TSG' and r['memory_mode'] == 'normal')
        for r in p['protocol']:
            if r['n'] != n:
                continue
            if r.get('status') != 'ok':
                rows.append([r['candidate'], n, r.get('status'), r.get('reason', '')] +
                            [''] * (len(header) - 4))
                continue
            t = r['time_s']
            row = [r['candidate'] + (' (default)' if r.get('default') and r['family'] == 'CF'
                                     else ''), n, common.fmt_time(t['median']),
                   f'{common.fmt_time(t["q25"])}..{common.fmt_time(t["q75"])}',
                   f'{t["median"] / cf:.2f}' if cf else 'n/a',
                   common.fmt_bytes(r['saved_bytes']),
                   common.fmt_bytes(r.get('peak_rss_increase_bytes'))]
            if 'CUDA peak' in header:
                row.append(common.fmt_bytes(r.get('cuda_peak_bytes')))
            row.append(f'{r["firing_rate"]:.3f}')
            rows.append(row)
    lines += ['## Protocol', '', common.markdown_table(header, rows), '']
    lines += ['## Saved bytes per neuron-step (the neuron layer alone)', '',
              common.markdown_table(['candidate', 'T', 'N', 'saved', 'B per neuron-step',
                                     'of which neuron-sized tensors', 'per-layer bytes',
                                     'storages'],
                                    [[r['candidate'], r['T'], r['N'],
                                      common.fmt_bytes(r.get('saved_bytes')),
                                      f'{r["bytes_per_neuron_step"]:.3f}'
                                      if 'bytes_per_neuron_step' in r else r.get('reason'),
                                      f'{r["neuron_step_bytes_per_neuron_step"]:.3f}'
                                      if 'bytes_per_neuron_step' in r else '',
                                      r.get('per_layer_bytes', ''),
                                      r.get('saved_storages', '')] for r in p['per_step']]), '']
    if p['long_T']:
        lines += [f'## Long sequences (Linear(n, n) + CF, batch {cfg["batch"]}; n = '
                  f'{cfg["long_n"]} on the kernels, {cfg["long_n_reference"]} on the Python-loop '
                  f'reference)', '',
                  common.markdown_table(
                      ['backend', 'surrogate', 'memory', 'n', 'T', 'median', 'time / T', 'saved',
                       'saved / T'],
                      [[r['backend'], r['tsg'], r['memory_mode'], r['n'], r['T'],
                        common.fmt_time(r['time_s']['median']) if r.get('status') == 'ok'
                        else r.get('reason'),
                        common.fmt_time(r['time_s']['median'] / r['T'])
                        if r.get('status') == 'ok' else '',
                        common.fmt_bytes(r.get('saved_bytes')),
                        common.fmt_bytes(r['saved_bytes'] / r['T']) if 'saved_bytes' in r else '']
                       for r in p['long_T']]), '']
    lines += ['## Checks (CF network vs the same network on the reference backend)', '',
              common.markdown_table(['candidate', 'spikes equal', 'grad x rel err',
                                     'grad W rel err', 'grad TSG rel err', 'tolerance', 'result'],
                                    [[c['candidate'], c.get('spikes_equal'),
                                      f'{c.get("grad_x_rel_err", float("nan")):.1e}',
                                      f'{c.get("grad_w_rel_err", float("nan")):.1e}',
                                      f'{c.get("grad_tsg_rel_err", float("nan")):.1e}',
                                      c.get('tolerance'), common.verdict(c.get('passed'))]
                                     for c in p['checks']]), '']
    lines += ['## Targets', '',
              common.markdown_table(['target', 'n', 'T', 'measured', 'neuron part only',
                                     'result'],
                                    [[t['target'], t['n'] or '', t['T'],
                                      'n/a' if t['measured'] is None else f'{t["measured"]:.3g}',
                                      '' if t.get('neuron_only_ratio') is None
                                      else f'{t["neuron_only_ratio"]:.3g}',
                                      common.verdict(t['passed'])] for t in p['targets']]), '',
              '"neuron part only" = (candidate - Linear only) / (baseline - Linear only): the '
              'ratio once the shared Linear layer\'s time is taken out.', '']
    lines += ['## Equivalent parameters', ''] + [f'- {k}: {v}' for k, v in
                                                 p['lif_parameters'].items()] + ['']
    if p['notes']:
        lines += ['## Notes', ''] + [f'- {x}' for x in p['notes']] + ['']
    return '\n'.join(lines)


def plot(p: dict, path: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    ok = [r for r in p['protocol'] if r.get('status') == 'ok']
    names = []
    for r in ok:
        if r['candidate'] not in names:
            names.append(r['candidate'])
    ns = p['config']['ns']
    width = 0.8 / max(1, len(ns))
    for i, n in enumerate(ns):
        vals = [next((r['time_s']['median'] for r in ok if r['candidate'] == nm and r['n'] == n),
                     0) for nm in names]
        ax.barh([j + i * width for j in range(len(names))], vals, height=width, label=f'n={n}')
    ax.set_yticks([j + width * (len(ns) - 1) / 2 for j in range(len(names))])
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xscale('log')
    ax.invert_yaxis()
    ax.set_xlabel('forward + backward time (s, log)')
    ax.set_title(f'protocol T={p["config"]["T"]}, batch {p["config"]["batch"]}')
    ax.legend(fontsize=7)
    long_rows = [r for r in p['long_T'] if r.get('status') == 'ok']
    series = []
    for r in long_rows:
        key = (r['backend'], r['tsg'], r['memory_mode'])
        if key not in series:
            series.append(key)
    for key in series:
        rs = sorted([r for r in long_rows if (r['backend'], r['tsg'], r['memory_mode']) == key],
                    key=lambda r: r['T'])
        label = f'{key[0]} {key[1]} {key[2]} n={rs[0]["n"]}'
        axes[1].plot([r['T'] for r in rs], [r['time_s']['median'] for r in rs], 'o-', label=label)
        axes[2].plot([r['T'] for r in rs], [r['saved_bytes'] for r in rs], 'o-', label=label)
    for ax, what in ((axes[1], 'time (s)'), (axes[2], 'saved bytes')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('T (log)')
        ax.set_ylabel(what + ' (log)')
        ax.set_title(f'long T: {what} (slope 1 = linear)')
        ax.legend(fontsize=6)
        ax.grid(True, which='both', alpha=0.3)
    meta = p['environment']
    fig.suptitle(f'{p["tag"]}: {meta["device_label"]}, torch {meta["torch"]}, '
                 f'{meta["date"][:10]}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu', help="'cpu' (default), 'cuda', 'auto'")
    p.add_argument('--n', nargs='+', type=int, default=None,
                   help='layer widths; default 512 4096 (CPU), 512 4096 16384 (CUDA)')
    p.add_argument('--T', type=int, default=TARGET_T)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--long-T', nargs='+', type=int, default=None, help='default 8 64 500')
    p.add_argument('--long-n', type=int, default=512)
    p.add_argument('--long-n-reference', type=int, default=64,
                   help='n of the long-T sweep on the pure-PyTorch reference (a Python loop)')
    p.add_argument('--per-step-T', type=int, default=64,
                   help='T of the saved-bytes-per-neuron-step measurement (T-independent)')
    p.add_argument('--slow-s', type=float, default=20.0,
                   help='a case whose first call takes longer is timed with one call')
    p.add_argument('--no-long-T', action='store_true')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--repeats', type=int, default=3, help='timed calls per case (median)')
    p.add_argument('--max-call-s', type=float, default=60.0,
                   help='skip larger n for a candidate whose call would take longer')
    p.add_argument('--only', nargs='+', default=None, help='substrings of candidate names')
    p.add_argument('--long-backends', nargs='+', default=None,
                   help='CF backends of the long-T sweep (default: all of the device)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch.set_num_threads for the run (default: torch\'s choice); on a '
                        'shared machine 1 thread avoids OpenMP waits in the per-step loops')
    p.add_argument('--quick', action='store_true', help='tiny sweep (seconds)')
    p.add_argument('--out', default=os.path.join(common.REPO_ROOT, 'benchmarks', 'results'))
    p.add_argument('--tag', default=None, help='file name tag; default sj<SpikingJelly version>')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        ns, T, long_Ts, long_n = args.n or [32], min(args.T, 12), args.long_T or [4, 8], 32
        batch, repeats, warmup, long_n_ref, per_step_T = 2, 3, 1, 16, 8
    else:
        ns = args.n or ([512, 4096, 16384] if device.type == 'cuda' else [512, 4096])
        T, long_Ts, long_n = args.T, args.long_T or [8, 64, 500], args.long_n
        batch, repeats, warmup = args.batch, args.repeats, args.warmup
        long_n_ref, per_step_T = args.long_n_reference, args.per_step_T
    skip = ()
    if args.quick and not any('inductor' in o for o in args.only or ()):
        # a smoke run: the inductor backend compiles a graph per surrogate, T and grad mode
        # (about 3.5 of the 4 minutes of a --quick run with a cold Inductor cache)
        skip = ('inductor',)
        note("--quick: backend 'inductor' not run (its compiles take minutes with a cold cache; "
             "name it in --only to include it)")
    long_backends = args.long_backends
    if long_backends is None and skip:
        long_backends = [b for b in cf_backends(device)[0] if b not in skip]
    cfg = Config(device=device, ns=ns, T=T, batch=batch, long_Ts=[] if args.no_long_T else long_Ts,
                 long_n=long_n, long_n_reference=long_n_ref, per_step_T=per_step_T,
                 slow_s=args.slow_s, long_backends=long_backends, warmup=warmup,
                 repeats=repeats, max_call_s=args.max_call_s,
                 quick=args.quick, only=args.only)
    meta = common.environment(device)
    tag = args.tag or f'sj{meta["spikingjelly"]}'
    print(f'protocol benchmark [{tag}]: {meta["device_label"]}, torch {meta["torch"]}, '
          f'{meta["torch_threads"]} threads, load {meta["load_average_start"]}', flush=True)
    began = time.time()
    cands = build_candidates(device, args.only, skip=skip)
    for c in cands:
        if c.unavailable:
            note(f'{c.name}: not run: {c.unavailable}')
    checks = []
    for c in cands:
        if c.family == 'CF' and not c.unavailable:
            try:
                r = check_cf(c, device)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                r = dict(candidate=c.name, passed=False,
                         error=f'{type(exc).__name__}: {exc}'.splitlines()[0])
            checks.append(r)
            print(f'check {c.name:<40} {common.verdict(r["passed"])} {r}', flush=True)
            if not r['passed']:
                c.unavailable = 'disagrees with the reference (see the checks)'
    rows = run_protocol(cfg, cands)
    per_step = neuron_saved_bytes(cands, cfg, T=cfg.per_step_T, n=cfg.ns[0])
    long_rows = run_long_T(cfg) if cfg.long_Ts else []
    meta['load_average_end'] = common.load_average()
    if meta['load_average_end'] and meta['load_average_end'][0] > 0.5 * common.cpu_count() \
            and device.type == 'cpu':
        note(f'the machine was busy (load average {meta["load_average_start"]} at start, '
             f'{meta["load_average_end"]} at end, {common.cpu_count()} cores shared with other '
             f'processes): times are noisy; ratios within one run are the reliable part')
    payload = dict(benchmark='protocol', tag=tag,
                   command=' '.join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                   environment=meta,
                   config=dict(ns=cfg.ns, T=cfg.T, batch=cfg.batch, long_Ts=cfg.long_Ts,
                               long_n=cfg.long_n, long_n_reference=cfg.long_n_reference,
                               per_step_T=cfg.per_step_T, slow_s=cfg.slow_s, warmup=cfg.warmup,
                               repeats=cfg.repeats, quick=cfg.quick),
                   lif_parameters=LIF_PARAMETERS, checks=checks, protocol=rows, per_step=per_step,
                   long_T=long_rows, targets=[], notes=NOTES,
                   wall_s=round(time.time() - began, 1))
    payload['targets'] = evaluate_targets(cfg, rows, per_step)
    for t in payload['targets']:
        print(f'target: {t["target"]} n={t["n"]}: measured '
              f'{"n/a" if t["measured"] is None else format(t["measured"], ".3g")} '
              f'-> {common.verdict(t["passed"])}', flush=True)
    out_dir = common.results_dir(args.out, device)
    stem = os.path.join(out_dir, f'protocol_{tag}')
    common.write_json(stem + '.json', payload)
    common.write_text(stem + '.md', markdown_report(payload))
    try:
        plot(payload, stem + '.png')
    except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the results
        print(f'plot skipped: {exc}')
    print(f'wrote {stem}.{{json,md,png}} in {payload["wall_s"]} s', flush=True)
    return 0 if all(c['passed'] for c in checks) else 1


if __name__ == '__main__':
    sys.exit(main())
