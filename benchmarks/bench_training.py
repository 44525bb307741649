"""One training step of a whole network: CFNode against LIFNode, each on its fastest backend.

A step is ``zero_grad``, a multi-step forward of ``[T, B, 2, 128, 128]`` event frames, the
cross-entropy of the time-averaged output, ``backward``, ``SGD.step`` and ``reset_net``. Networks:

* ``dvs-vgg``: the DVS Gesture example's VGG (``examples/dvs_gesture.py``) when it exposes a
  model builder, otherwise the small VGG defined here (the output says which);
* ``DVSGestureNet``: SpikingJelly's ``model.parametric_lif_net.DVSGestureNet``.

Each network is built once with ``LIFNode`` on every backend the installed SpikingJelly offers,
and once with the same weights and ``CFNode`` (via ``spikingjelly_cf.replace_neurons``) on every
CF backend; the fastest of each family gives the CF/LIF ratio (target: at most 1.15).

Compiled peers (``--compiled``, default on except with ``--quick``): the whole network through
``torch.compile`` (Inductor), LIF on its ``torch`` backend (0.0.0.0.14; the default dispatch on
2.0) and CF on the reference backend ``'torch'`` and on the default one (``'auto'``); their ratio
(fastest compiled CF / fastest compiled LIF) has the target "compiled CF / compiled LIF <= 1.15". The first step,
which compiles, is reported apart from the median; before timing, each compiled network's first
loss is compared with the same network run eagerly. Results go to
``<out>/<YYYY-MM-DD>_<device>/training_<tag>.{json,md,png}``.
"""
import argparse
import copy
import importlib
import math
import os
import sys
import time
import traceback
import warnings
from typing import Callable, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RATIO_TARGET = 1.15
NOTES: List[str] = []


def note(text: str) -> None:
    if text not in NOTES:
        NOTES.append(text)
        print(f'NOTE: {text}', flush=True)


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
class DVSVGG(nn.Module):
    """Small VGG for ``[T, B, 2, 128, 128]`` DVS frames: (conv-BN-neuron-maxpool) per width,
    then a linear read-out to 11 classes. Used when ``examples/dvs_gesture.py`` has no builder."""

    def __init__(self, widths=(64, 128, 128, 256, 256), num_classes: int = 11,
                 spiking_neuron: Callable = None, **neuron_kwargs):
        super().__init__()
        from spikingjelly.activation_based import layer
        layers, c_in = [], 2
        for w in widths:
            layers += [layer.Conv2d(c_in, w, kernel_size=3, padding=1, bias=False),
                       layer.BatchNorm2d(w), spiking_neuron(**copy.deepcopy(neuron_kwargs)),
                       layer.MaxPool2d(2, 2)]
            c_in = w
        side = 128 // 2 ** len(widths)
        layers += [layer.Flatten(), layer.Linear(c_in * side * side, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def example_vgg_builder() -> Tuple[Optional[Callable], str]:
    """The DVS example's VGG (``examples.dvs_gesture.VGGSNN``) as ``f(widths_scale, neuron, **kw)``."""
    try:
        module = importlib.import_module('examples.dvs_gesture')
    except Exception as exc:  # noqa: BLE001
        return None, f'examples/dvs_gesture.py not importable ({type(exc).__name__}: {exc})'.splitlines()[0]
    cls = getattr(module, 'VGGSNN', None)
    if cls is None:
        return None, 'examples/dvs_gesture.py has no VGGSNN'

    def build(width, spiking_neuron, **neuron_kwargs):
        return cls(width, spiking_neuron, input_size=128, **neuron_kwargs)
    return build, 'examples.dvs_gesture.VGGSNN'


def build_network(name: str, spiking_neuron, neuron_kwargs: dict, scale: str):
    """A network of ``name`` whose neurons are ``spiking_neuron(**neuron_kwargs)``."""
    from spikingjelly.activation_based import functional
    if name == 'DVSGestureNet':
        from spikingjelly.activation_based.model.parametric_lif_net import DVSGestureNet
        channels = 8 if scale == 'quick' else 128
        net = DVSGestureNet(channels=channels, spiking_neuron=spiking_neuron, **neuron_kwargs)
    elif name == 'dvs-vgg':
        builder, where = example_vgg_builder()
        net = None
        if builder is not None:
            try:
                width = 4 if scale == 'quick' else 16
                net = builder(width, spiking_neuron, **neuron_kwargs)
                note(f'dvs-vgg: {where}, width {width}, 128x128 input')
            except Exception as exc:  # noqa: BLE001
                where = f'{where} failed: {type(exc).__name__}: {exc}'.splitlines()[0]
        if net is None:
            widths = (8, 8, 16, 16, 16) if scale == 'quick' else (64, 128, 128, 256, 256)
            net = DVSVGG(widths=widths, spiking_neuron=spiking_neuron, **neuron_kwargs)
            note(f'dvs-vgg: the DVS example\'s VGG is not available ({where}); using the small '
                 f'VGG of bench_training.py, widths {widths}')
    else:
        raise ValueError(f'unknown network {name!r}')
    functional.set_step_mode(net, 'm')
    return net


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
def lif_variants(device) -> List[Tuple[str, dict, Optional[str]]]:
    """(label, LIFNode keyword arguments, reason it cannot run or None) per LIF backend."""
    from spikingjelly_cf import _compat
    from spikingjelly.activation_based import neuron
    version = _compat.SPIKINGJELLY_VERSION
    if not _compat.CLASSIC:
        return [(f'LIFNode[default] (SJ {version})', {}, None)]
    out = []
    for b in neuron.LIFNode(step_mode='m').supported_backends:
        reason = None
        if b == 'cupy':
            if device.type != 'cuda':
                reason = 'CuPy backend needs CUDA tensors'
            else:
                try:
                    import cupy  # noqa: F401
                    import numpy
                    if 'int' not in numpy.__dict__:
                        numpy.int = int  # 0.0.0.0.14's auto_cuda uses np.int (gone in NumPy >= 1.24)
                        note('applied the one-line fix `numpy.int = int` for SpikingJelly '
                             '0.0.0.0.14\'s CuPy LIFNode (np.int was removed in NumPy 1.24)')
                except Exception as exc:  # noqa: BLE001
                    reason = f'cupy not importable: {exc}'.splitlines()[0]
        out.append((f'LIFNode[{b}] (SJ {version})', {'backend': b}, reason))
    return out


def cf_backends(device, all_backends: bool) -> List[str]:
    """CF backends to time: the fused kernels (the reference too with ``--all-backends``, or
    when no kernel is available)."""
    try:
        from spikingjelly_cf.backends import available_backends
        names = list(available_backends(device.type, torch.float32))
    except ImportError:
        names = ['cupy', 'torch'] if device.type == 'cuda' else ['cpp', 'torch']
    kernels = [b for b in names if b != 'torch']
    if all_backends or not kernels:
        return names
    note(f"CF variants: the fused backend(s) {kernels} only; the pure-PyTorch reference "
         f"'torch' is slower (add --all-backends to time it)")
    return kernels


def make_step(net, opt, x, y) -> Callable[[], float]:
    from spikingjelly.activation_based import functional

    def step():
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = F.cross_entropy(out.mean(0), y)
        loss.backward()
        opt.step()
        functional.reset_net(net)
        return loss
    return step


def run_network(args, device, network: str, scale: str, T: int, B: int) -> List[dict]:
    from spikingjelly.activation_based import neuron, surrogate
    from spikingjelly_cf import replace_neurons
    rows = []
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(T, B, 2, 128, 128, generator=g) < 0.05).float().to(device)
    y = torch.randint(0, 11, (B,), generator=g).to(device)
    base_kwargs = dict(tau=2.0, detach_reset=True, surrogate_function=surrogate.ATan())
    variants = []
    for label, extra, reason in lif_variants(device):
        variants.append(('LIF', label, extra, reason, None))
    for b in cf_backends(device, args.all_backends):
        if b == 'inductor' and not args.compiled:
            continue  # torch.compile of the CF loop: a compiled peer
        variants.append(('CF', f'CFNode[{b}]', {}, None, b))
    if args.compiled:
        from spikingjelly_cf import _compat
        version = _compat.SPIKINGJELLY_VERSION
        lif_extra = {'backend': 'torch'} if _compat.CLASSIC else {}
        variants.append(('LIF-compiled', f'LIFNode[{"torch" if _compat.CLASSIC else "default"}] '
                         f'compiled (SJ {version})', lif_extra, None, None))
        for b in ('torch', 'auto'):
            variants.append(('CF-compiled', f'CFNode[{b}] compiled', {}, None, b))
    if args.only:
        variants = [v for v in variants if v[1] in args.only or v[0] in args.only]
    eager_first_loss = {}
    for family, label, extra, reason, cf_backend in variants:
        row = dict(network=network, variant=label, family=family, T=T, B=B)
        if reason:
            row.update(status='unavailable', reason=reason)
            note(f'{network}: {label} not run: {reason}')
            rows.append(row)
            continue
        try:
            torch.manual_seed(0)  # every variant starts from the same weights
            if family in ('LIF', 'LIF-compiled'):
                net = build_network(network, neuron.LIFNode, {**base_kwargs, **extra}, scale)
            else:
                net = build_network(network, neuron.LIFNode, dict(base_kwargs), scale)
                with warnings.catch_warnings():  # LIF's hard reset becomes CF's soft reset
                    warnings.simplefilter('ignore', UserWarning)
                    net = replace_neurons(net, backend=cf_backend)
                note('CF variants: replace_neurons() on the LIF network (same weights; tau=2 '
                     'from the LIF; the LIF hard reset becomes CF\'s soft reset)')
            net = net.to(device).train()
            row['neurons'] = sum(1 for m in net.modules() if isinstance(m, neuron.BaseNode))
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            compiled = family.endswith('-compiled')
            if compiled:
                eager_key = (family, cf_backend)
                if eager_key not in eager_first_loss:  # the same network, eagerly: first loss
                    eager_first_loss[eager_key] = float(make_step(
                        copy.deepcopy(net), torch.optim.SGD([torch.zeros(1)], lr=0.0), x, y)())
                model = torch.compile(net)
            else:
                model = net
            step = make_step(model, opt, x, y)
            common.synchronize(device)
            t0 = time.perf_counter()
            loss = float(step())
            common.synchronize(device)
            first_step_s = time.perf_counter() - t0
            if not torch.isfinite(torch.tensor(loss)):
                raise FloatingPointError(f'loss is {loss}')
            timing = common.measure(step, device, warmup=args.warmup, min_repeats=args.min_repeats,
                                    max_repeats=50, budget_s=args.budget_s)
            # the CPU tracker is a TorchDispatchMode, which torch.compile refuses to run under
            traced = compiled or cf_backend == 'inductor'
            peak = (None if args.no_memory or (traced and device.type != 'cuda')
                    else common.peak_memory(step, device))
            row.update(status='ok', first_loss=loss, time_s=timing.to_dict(), peak_memory_bytes=peak,
                       first_step_s=first_step_s,
                       compile_s=max(first_step_s - timing.median, 0.0) if compiled else None)
            if compiled:
                ref = eager_first_loss[eager_key]
                row['eager_first_loss'] = ref
                row['first_loss_rel_diff'] = abs(loss - ref) / max(abs(ref), 1e-12)
                if not math.isfinite(row['first_loss_rel_diff']) or row['first_loss_rel_diff'] > 1e-3:
                    note(f'{network}: {label}: first loss {loss:.6g} differs from the eager '
                         f'network\'s {ref:.6g} by more than 1e-3 relative')
            print(f'{network:<14} {label:<32} step {common.fmt_time(timing.median):>10} '
                  f'(IQR {common.fmt_time(timing.q25)}..{common.fmt_time(timing.q75)}, '
                  f'n={timing.repeats}) peak {common.fmt_bytes(peak)}'
                  + (f' first step {first_step_s:.3g} s (loss {loss:.6g}, eager {ref:.6g})'
                     if compiled else ''), flush=True)
            del net, opt, step, model
        except Exception as exc:  # noqa: BLE001 - recorded, never dropped
            traceback.print_exc()
            msg = f'{type(exc).__name__}: {exc}'.splitlines()[0][:300]
            row.update(status='error', reason=msg)
            note(f'{network}: {label}: error: {msg}')
        rows.append(row)
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


def summarize(rows: List[dict]) -> List[dict]:
    """Fastest CF / fastest LIF per network (same run), eager and (when timed) compiled."""
    out = []
    for network, kind in ((n, k) for n in dict.fromkeys(r['network'] for r in rows)
                          for k in ('eager', 'compiled')):
        ok = [r for r in rows if r['network'] == network and r['status'] == 'ok']
        suffix = '' if kind == 'eager' else '-compiled'
        if kind == 'compiled' and not any(r['network'] == network and r['family'].endswith(suffix)
                                          for r in rows):
            continue
        best = {}
        for fam in ('CF', 'LIF'):
            cands = [r for r in ok if r['family'] == fam + suffix]
            if cands:
                best[fam] = min(cands, key=lambda r: r['time_s']['median'])
        entry = dict(network=network, kind=kind)
        if len(best) == 2:
            ratio = best['CF']['time_s']['median'] / best['LIF']['time_s']['median']
            entry.update(cf=best['CF']['variant'], lif=best['LIF']['variant'], cf_over_lif=ratio,
                         threshold=RATIO_TARGET, passed=ratio <= RATIO_TARGET)
        else:
            entry.update(passed=None, reason='CF or LIF did not run')
        out.append(entry)
    return out


def markdown_report(payload) -> str:
    lines = [f'# Training step benchmark: {payload["tag"]}', '']
    lines += common.stamp_lines(payload['meta'])
    cfg = payload['config']
    lines += ['', f'Command: `{payload["command"]}`', '',
              f'One step = zero_grad + forward of [T={cfg["T"]}, B={cfg["B"]}, 2, 128, 128] + '
              f'cross-entropy + backward + SGD step + reset_net; median of single steps after '
              f'warm-up. Peak memory: {payload["memory_method"]}.', '']
    if payload['notes']:
        lines += ['## Notes', ''] + [f'- {n}' for n in payload['notes']] + ['']
    lines += ['## CF / LIF (fastest backend of each, same run; eager and whole-network compiled)',
              '']
    lines.append(common.markdown_table(
        ['network', 'kind', 'CF', 'LIF', 'CF time / LIF time', 'target', 'verdict'],
        [[s['network'], s.get('kind', 'eager'), s.get('cf', ''), s.get('lif', ''),
          f'{s["cf_over_lif"]:.3g}' if 'cf_over_lif' in s else s.get('reason', ''),
          f'<= {RATIO_TARGET}', common.verdict(s.get('passed'))] for s in payload['summary']]))
    lines += ['', '## All variants', '']
    rows = []
    for r in payload['results']:
        if r['status'] == 'ok':
            t = r['time_s']
            rows.append([r['network'], r['variant'], f'{t["median"] * 1e3:.4g}',
                         f'{t["q25"] * 1e3:.4g}..{t["q75"] * 1e3:.4g}', t['repeats'],
                         common.fmt_bytes(r.get('peak_memory_bytes'))])
        else:
            rows.append([r['network'], r['variant'], r['status'], r.get('reason', ''), '', ''])
    lines.append(common.markdown_table(['network', 'variant', 'median (ms)', 'IQR (ms)', 'n',
                                        'peak memory'], rows))
    compiled = [r for r in payload['results'] if r['status'] == 'ok' and r.get('compile_s') is not None]
    if compiled:
        lines += ['', '## Compiled variants: first step (compilation) and first loss vs eager', '',
                  'The first step compiles the forward and backward graphs; "compile" is first '
                  'step minus the median. "eager first loss" is the same network (same weights) '
                  'run without torch.compile.', '']
        lines.append(common.markdown_table(
            ['network', 'variant', 'first step (s)', 'compile (s)', 'median step (ms)',
             'first loss', 'eager first loss', 'rel. diff'],
            [[r['network'], r['variant'], f'{r["first_step_s"]:.3g}', f'{r["compile_s"]:.3g}',
              f'{r["time_s"]["median"] * 1e3:.4g}', f'{r["first_loss"]:.6g}',
              f'{r["eager_first_loss"]:.6g}', f'{r["first_loss_rel_diff"]:.2e}']
             for r in compiled]))
    return '\n'.join(lines) + '\n'


def plot(payload, path):
    plt = common.pyplot()
    ok = [r for r in payload['results'] if r['status'] == 'ok']
    networks = list(dict.fromkeys(r['network'] for r in payload['results']))
    fig, axes = plt.subplots(1, max(1, len(networks)), figsize=(6 * max(1, len(networks)), 4),
                             squeeze=False)
    for ax, network in zip(axes[0], networks):
        sub = [r for r in ok if r['network'] == network]
        labels = [r['variant'].replace(' (SJ ', '\n(SJ ') for r in sub]
        vals = [r['time_s']['median'] * 1e3 for r in sub]
        colors = [{'CF': 'tab:blue', 'LIF': 'tab:orange', 'CF-compiled': 'tab:cyan',
                   'LIF-compiled': 'tab:red'}.get(r['family'], 'grey') for r in sub]
        ax.bar(range(len(sub)), vals, color=colors)
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel('median step time (ms)')
        ratio = ''.join(f', {s.get("kind", "eager")} CF/LIF {s["cf_over_lif"]:.3g}'
                        for s in payload['summary']
                        if s['network'] == network and 'cf_over_lif' in s)
        ax.set_title(f'{network}{ratio}', fontsize=9)
        ax.grid(True, axis='y', alpha=0.3)
    meta = payload['meta']
    fig.suptitle(f'{payload["tag"]}: {meta["device_label"]}, torch {meta["torch"]}, SpikingJelly '
                 f'{meta["spikingjelly"]}, {meta["date"][:10]}, {meta["git_commit"][:12]}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='auto')
    p.add_argument('--networks', nargs='+', default=['dvs-vgg', 'DVSGestureNet'],
                   choices=['dvs-vgg', 'DVSGestureNet'])
    p.add_argument('--T', type=int, default=None, help='time steps (default 8 CPU, 16 CUDA)')
    p.add_argument('--B', type=int, default=None, help='batch size (default 2 CPU, 16 CUDA)')
    p.add_argument('--quick', action='store_true', help='narrow networks, T=4, B=1: under a minute')
    p.add_argument('--out', default=os.path.join(common.REPO_ROOT, 'benchmarks', 'results'))
    p.add_argument('--tag', default=None)
    p.add_argument('--warmup', type=int, default=None)
    p.add_argument('--min-repeats', type=int, default=None)
    p.add_argument('--budget-s', type=float, default=None)
    p.add_argument('--no-memory', action='store_true')
    p.add_argument('--compiled', dest='compiled', action='store_true', default=None,
                   help='also time whole networks through torch.compile (default: yes, except '
                        'with --quick)')
    p.add_argument('--no-compiled', dest='compiled', action='store_false')
    p.add_argument('--only', nargs='+', default=None,
                   help="run only these variants: a family (LIF, CF, LIF-compiled, CF-compiled) or "
                        "a label as printed (e.g. 'CFNode[auto] compiled')")
    p.add_argument('--all-backends', action='store_true',
                   help="also time CFNode's pure-PyTorch reference backend")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    gpu = device.type == 'cuda'
    scale = 'quick' if args.quick else 'full'
    T = args.T or (4 if args.quick else (16 if gpu else 8))
    B = args.B or (1 if args.quick else (16 if gpu else 2))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.min_repeats = args.min_repeats or (3 if args.quick else 5)
    args.budget_s = args.budget_s if args.budget_s is not None else (0.2 if args.quick else 5.0)
    if args.compiled is None:
        args.compiled = not args.quick
    meta = common.environment(device)
    tag = args.tag or f'sj{meta["spikingjelly"]}'
    print(f'training benchmark [{tag}]: {meta["device_label"]}, torch {meta["torch"]}, SpikingJelly '
          f'{meta["spikingjelly"]}, commit {meta["git_commit"]}, load average '
          f'{meta["load_average_start"]}', flush=True)
    if meta['load_average_start'] and meta['load_average_start'][0] > 0.5 * meta['cpu_count']:
        note(f'the machine was busy when this run started (load average '
             f'{meta["load_average_start"]} on {meta["cpu_count"]} CPUs): figures are noisy')
    torch.manual_seed(0)
    results = []
    for network in args.networks:
        results.extend(run_network(args, device, network, scale, T, B))
    meta['load_average_end'] = common.load_average()
    payload = dict(
        benchmark='training', tag=tag,
        command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]), meta=meta,
        config=dict(device=str(device), networks=args.networks, T=T, B=B, scale=scale,
                    warmup=args.warmup, min_repeats=args.min_repeats, budget_s=args.budget_s,
                    compiled=args.compiled,
                    neuron='LIFNode(tau=2, detach_reset=True, ATan); CFNode via replace_neurons '
                           '(tau=2 taken from the LIF, K=2, CFRect)',
                    optimizer='SGD(lr=0.01, momentum=0.9)'),
        memory_method=('torch.cuda.max_memory_allocated during one step' if gpu else
                       'tensors created by ATen ops during one step (CPU)'),
        results=results)
    payload['summary'] = summarize(results)
    payload['notes'] = list(NOTES)
    out_dir = common.results_dir(args.out, device)
    stem = os.path.join(out_dir, f'training_{tag}')
    common.write_json(stem + '.json', payload)
    common.write_text(stem + '.md', markdown_report(payload))
    plot(payload, stem + '.png')
    print('\n=== CF / LIF training step, fastest backend of each, same run ===')
    for s in payload['summary']:
        if 'cf_over_lif' in s:
            print(f'{common.verdict(s["passed"]):<4} {s["network"]} ({s.get("kind")}): {s["cf"]} / {s["lif"]} = '
                  f'{s["cf_over_lif"]:.3g} (target <= {RATIO_TARGET})')
        else:
            print(f'n/a  {s["network"]}: {s["reason"]}')
    print(f'\nwrote {stem}.json, .md, .png')
    return 0 if all(r['status'] in ('ok', 'unavailable') for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
