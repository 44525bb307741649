"""Draw the documentation's figures: analytic ones computed with the package itself, the
benchmark and accuracy figures from the committed JSON results in ``benchmarks/results/``.

Run by ``docs/conf.py`` at the start of every Sphinx build (so a figure never disagrees with the
code or the results it shows), or by hand from the repository root::

    python docs/make_figures.py [OUT_DIR]      # default docs/_generated/figures

Each results figure reads the newest ``benchmarks/results/<date>_<device>/`` folder that holds
its input file; a figure whose input is missing is skipped with a message (the pages then say
so through Sphinx's missing-image warning, which fails a ``-W`` build).
"""
import glob
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
DEFAULT_OUT = os.path.join(HERE, '_generated', 'figures')

CF_COLOR, LIF_COLOR, OTHER_COLOR, COPY_COLOR = '#c0392b', '#2c7fb8', '#7f8c8d', '#27ae60'


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.rcParams.update({'figure.dpi': 110, 'savefig.dpi': 110, 'font.size': 10,
                         'axes.spines.top': False, 'axes.spines.right': False,
                         'svg.hashsalt': 'spikingjelly-cf', 'axes.grid': True,
                         'grid.alpha': 0.3})
    return plt


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, bbox_inches='tight', metadata={'Software': None})
    _plt().close(fig)
    return path


def newest(pattern: str) -> Optional[str]:
    """The file matching ``pattern`` in the newest results folder that has one."""
    hits = sorted(glob.glob(os.path.join(RESULTS, '*', pattern)))
    return hits[-1] if hits else None


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# analytic figures, computed by the package
# ------------------------------------------------------------------------------------------------
def _one_step(h, **kwargs):
    """Spikes, post-reset potential and ds/dh of one step from v = 0 with input h (so the charged
    potential is h), computed by the reference backend."""
    import torch
    from spikingjelly_cf.functional import cf_multi_step
    x = h.detach().clone().reshape(1, -1).requires_grad_(True)
    s, v, _, _ = cf_multi_step(x, torch.zeros_like(x[0]), backend='torch', **kwargs)
    (grad,) = torch.autograd.grad(s.sum(), x)
    return s[0].detach(), v.detach(), grad[0]


def fig_staircase(out_dir: str) -> str:
    """CF's signed multi-level output against LIF's binary step, and what each keeps."""
    import torch
    plt = _plt()
    h = torch.linspace(-3.2, 3.2, 1601, dtype=torch.float64)
    # drawn solid first, so that the dashed and dotted lines stay visible where they coincide
    cases = [('CF, K = 2 (levels -2..2)', dict(k_pos=2, k_neg=2), CF_COLOR, '-'),
             ('SCF, K = 2 (levels 0..2)', dict(k_pos=2, k_neg=0), '#f39c12', ':'),
             ('LIF (one level, soft reset)', dict(k_pos=1, k_neg=0), LIF_COLOR, '--')]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, kw, color, ls in cases:
        s, v, _ = _one_step(h, **kw)
        ax1.plot(h, s, ls, color=color, lw=2, label=label)
        ax2.plot(h, v, ls, color=color, lw=2, label=label)
    ax2.plot(h, torch.zeros_like(h), color='k', lw=0.8)
    ax1.set(xlabel='charged potential h (thresholds +1 / −1)', ylabel='spike s',
            title='Output: signed multi-level vs binary spike', yticks=range(-2, 3))
    ax2.set(xlabel='charged potential h', ylabel='potential kept after the reset, v',
            title='Soft reset: what is kept for the next step')
    ax1.legend(loc='upper left', frameon=False)
    fig.tight_layout()
    return _save(fig, out_dir, 'staircase.png')


def fig_surrogates(out_dir: str) -> str:
    """ds/dh of CFRect and of TSG at several sharpness values a, for CF with K = 2."""
    import torch
    from spikingjelly_cf import TSG, CFRect
    plt = _plt()
    h = torch.linspace(-3.2, 3.2, 1601, dtype=torch.float64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    s, _, g = _one_step(h, surrogate_function=CFRect())
    ax1.plot(h, s, color=OTHER_COLOR, lw=1, label='spike s (forward)')
    ax1.fill_between(h, g, step='mid', color=CF_COLOR, alpha=0.35, lw=0)
    ax1.plot(h, g, color=CF_COLOR, lw=2, label='ds/dh (backward)')
    ax1.set(title='CFRect (Eq. 14): a window of width θ per level',
            xlabel='charged potential h', ylabel='value')
    ax1.legend(loc='lower right', frameon=True, fontsize=8)
    for a, color in ((0.75, '#9ecae1'), (2.0, CF_COLOR), (3.5, '#67000d')):
        sg = TSG(T=1, alpha_init=a, alpha_min=0.5, alpha_max=3.6)
        _, _, g = _one_step(h, surrogate_function=sg)
        ax2.plot(h, g.detach(), color=color, lw=2, label=f'TSG, a = {a:g}')
    ax2.plot(h, s, color=OTHER_COLOR, lw=1)
    ax2.set(title='TSG (Eq. 15-17): triangles of learnable sharpness a',
            xlabel='charged potential h')
    ax2.legend(loc='lower right', frameon=True, fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, 'surrogates.png')


# ------------------------------------------------------------------------------------------------
# benchmark figures, from benchmarks/results/*/*.json
# ------------------------------------------------------------------------------------------------
def _neuron_rows(payload: dict, T: int, N: int, mode: str) -> Dict[str, float]:
    rows = {}
    for r in payload['results']:
        if (r.get('status') == 'ok' and r.get('dtype') == 'float32' and r.get('T') == T
                and r.get('N') == N and r.get('mode') == mode):
            rows[r['candidate']] = r['time_s']['median'] * 1e3
    return rows


def fig_neuron_speed(out_dir: str) -> Optional[str]:
    """One neuron layer [T=8, N=2^20], CPU float32: every candidate of both SpikingJelly runs."""
    runs = [p for p in (newest('neuron_sj0.0.0.0.14.json'), newest('neuron_sj2.0.0.json')) if p]
    if not runs:
        print('make_figures: no neuron_sj*.json results: neuron_speed.png skipped')
        return None
    plt = _plt()
    T, N = 8, 2 ** 20
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 + 0.42 * 10), sharex=False)
    for ax, mode in zip(axes, ('training', 'inference')):
        labels, values, colors = [], [], []
        for path in runs:
            payload = _load(path)
            line = payload['meta']['spikingjelly']
            for name, ms in sorted(_neuron_rows(payload, T, N, mode).items(), key=lambda kv: kv[1]):
                if name.startswith('copy (fresh') or 'kernel only' in name:
                    continue
                label = name if 'SJ' in name else f'{name} (run with SJ {line})'
                labels.append(label)
                values.append(ms)
                colors.append('#f1948a' if name.startswith('CFNode[torch]') else
                              CF_COLOR if name.startswith('CFNode') else
                              COPY_COLOR if name.startswith('copy') else
                              LIF_COLOR if 'LIF' in name else OTHER_COLOR)
        y = range(len(labels))
        ax.barh(list(y), values, color=colors)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale('log')
        ax.set(xlabel='median time per call (ms, log scale)',
               title=f'{mode}, T = {T}, N = 2^20, float32, CPU')
        for yi, v in zip(y, values):
            ax.text(v, yi, f' {v:.3g}', va='center', fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, 'neuron_speed.png')


def fig_protocol(out_dir: str) -> Optional[str]:
    """The SNN-library protocol (Linear + neuron, T = 500), one run (one machine state): time
    and the bytes saved for the backward pass."""
    path = newest('protocol_sj2.0.0_peers.json') or newest('protocol_sj2.0.0.json')
    if path is None:
        print('make_figures: no protocol_sj2.0.0*.json: protocol.png skipped')
        return None
    plt = _plt()
    payload = _load(path)
    rows = {r['candidate']: r for r in payload['protocol']
            if r.get('status') == 'ok' and r.get('n') == 512 and r.get('T') == 500}
    per_step = {r['candidate']: r['bytes_per_neuron_step'] for r in payload.get('per_step') or []}
    names = sorted(rows, key=lambda n: rows[n]['time_s']['median'])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.38 * len(names)))
    colors = [CF_COLOR if n.startswith('CFNode') else OTHER_COLOR if 'Linear' in n else LIF_COLOR
              for n in names]
    times = [rows[n]['time_s']['median'] for n in names]
    ax1.barh(range(len(names)), times, color=colors)
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale('log')
    ax1.set(xlabel='forward + backward (s, log scale)',
            title='Linear(512, 512) + neuron, batch 16, T = 500, CPU')
    for i, t in enumerate(times):
        ax1.text(t, i, f' {t:.3g}', va='center', fontsize=7)
    saved = [rows[n].get('saved_bytes', 0) / 2 ** 20 for n in names]
    ax2.barh(range(len(names)), saved, color=colors)
    ax2.set_yticks(range(len(names)), [''] * len(names))
    ax2.invert_yaxis()
    ax2.set(xlabel='saved for the backward pass (MiB; Linear included)',
            title='Memory the autograd graph keeps')
    for i, (n, m) in enumerate(zip(names, saved)):
        b = per_step.get(n)
        ax2.text(m, i, f' {m:.3g}' + (f'  (neuron: {b:.3g} B/neuron-step)' if b is not None else ''),
                 va='center', fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, 'protocol.png')


def fig_long_sequences(out_dir: str) -> Optional[str]:
    """Time and saved bytes against T (T = 8, 64, 500) for every CF backend."""
    path = newest('protocol_sj2.0.0.json')
    if path is None:
        return None
    rows = [r for r in _load(path).get('long_T') or [] if r.get('status') == 'ok']
    if not rows:
        print('make_figures: no long-T rows: long_sequences.png skipped')
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in sorted({r['candidate'] for r in rows}):
        rs = sorted((r for r in rows if r['candidate'] == name), key=lambda r: r['T'])
        Ts = [r['T'] for r in rs]
        label = f'{name}, batch {rs[0]["batch"]} x n {rs[0]["n"]}'
        ax1.plot(Ts, [r['time_s']['median'] for r in rs], 'o-', label=label)
        ax2.plot(Ts, [r['saved_bytes'] / 2 ** 20 for r in rs], 'o-', label=label)
    for ax in (ax1, ax2):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('time steps T (log)')
    ax1.set(ylabel='forward + backward (s, log)', title='Time against T')
    ax2.set(ylabel='saved for backward (MiB, log)', title='Saved memory against T (slope 1 = linear)')
    ax1.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, out_dir, 'long_sequences.png')


# ------------------------------------------------------------------------------------------------
# accuracy study, from accuracy_study.json
# ------------------------------------------------------------------------------------------------
CORE_CELLS = ['LIF soft', 'LIF hard', 'ST', 'DT', 'SCF', 'CF', 'CF+TSG', 'CF+TSG+PNB',
              'LIF soft, avg pool', 'CF, avg pool']


def _by_cell(payload: dict) -> Dict[str, List[dict]]:
    cells: Dict[str, List[dict]] = {}
    for r in payload['runs']:
        cells.setdefault(r['cell'], []).append(r)
    return cells


def fig_accuracy(out_dir: str) -> Optional[str]:
    """Test accuracy (mean and each seed) of the first table's cells, and spikes per neuron-step."""
    path = newest('accuracy_study.json')
    if path is None:
        print('make_figures: no accuracy_study.json: accuracy.png skipped')
        return None
    plt = _plt()
    cells = _by_cell(_load(path))
    names = [c for c in CORE_CELLS if c in cells]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={'width_ratios': [3, 2]})
    for i, name in enumerate(names):
        accs = [100 * r['test_acc'] for r in cells[name]]
        color = LIF_COLOR if name.startswith('LIF') else CF_COLOR
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ax1.bar(i, mean, color=color, alpha=0.75, yerr=sd, capsize=3)
        ax1.plot([i] * len(accs), accs, 'k.', ms=4)
        ax1.text(i, mean + sd + 0.3, f'{mean:.1f}', ha='center', fontsize=7)
        spikes = statistics.mean(r['spikes_per_neuron_step'] for r in cells[name])
        ax2.scatter(spikes, mean, color=color, s=30)
        offset = {'LIF soft': (4, -9), 'LIF hard': (4, -3), 'ST': (4, 3),
                  'CF+TSG': (4, -10)}.get(name, (4, 2))
        ax2.annotate(name, (spikes, mean), fontsize=7, xytext=offset, textcoords='offset points')
    low = min(100 * r['test_acc'] for n in names for r in cells[n])
    ax1.set_ylim(math.floor(low) - 2, 100)
    ax1.set_xticks(range(len(names)), names, rotation=40, ha='right', fontsize=8)
    ax1.set(ylabel='test accuracy (%)', title='MNIST-1D, T = 4, 10 epochs: mean ± std, dots = seeds')
    ax2.set(xlabel='spikes per neuron and step (|s|)', ylabel='mean test accuracy (%)',
            title='Accuracy against spike count')
    fig.tight_layout()
    return _save(fig, out_dir, 'accuracy.png')


def fig_accuracy_curves(out_dir: str) -> Optional[str]:
    """Test accuracy per epoch (mean over seeds) of a few cells."""
    path = newest('accuracy_study.json')
    if path is None:
        return None
    plt = _plt()
    cells = _by_cell(_load(path))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, color in (('LIF soft', LIF_COLOR), ('SCF', OTHER_COLOR), ('CF', CF_COLOR),
                        ('CF+TSG+PNB', '#67000d'), ('DT', '#fdae6b')):
        runs = [r for r in cells.get(name, []) if r.get('test_acc_per_epoch')]
        if not runs:
            continue
        epochs = min(len(r['test_acc_per_epoch']) for r in runs)
        mean = [100 * statistics.mean(r['test_acc_per_epoch'][e] for r in runs) for e in range(epochs)]
        ax.plot(range(1, epochs + 1), mean, 'o-', ms=3, color=color, label=name)
    ax.set(xlabel='epoch', ylabel='test accuracy (%), mean of seeds', title='Learning curves')
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, 'accuracy_curves.png')


def _mean_sd(runs: List[dict]):
    accs = [100 * r['test_acc'] for r in runs]
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def fig_accuracy_sweeps(out_dir: str) -> Optional[str]:
    """Test accuracy against the number of levels K and the number of time steps T."""
    path = newest('accuracy_study.json')
    if path is None:
        return None
    plt = _plt()
    cells = _by_cell(_load(path))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    # K = 1: SCF is ST (levels 1/0), CF is DT (levels 1/1); K = 2 is the default cell
    for family, k1, color in (('SCF', 'ST', OTHER_COLOR), ('CF', 'DT', CF_COLOR)):
        names = [k1, family, f'{family} K=3', f'{family} K=4']
        pts = [(k, *_mean_sd(cells[n])) for k, n in zip((1, 2, 3, 4), names) if n in cells]
        if pts:
            ks, means, sds = zip(*pts)
            ax1.errorbar(ks, means, yerr=sds, fmt='o-', color=color, capsize=3,
                         label=f'{family} (levels K/{"0" if family == "SCF" else "K"})')
    if 'LIF soft' in cells:
        m, _ = _mean_sd(cells['LIF soft'])
        ax1.axhline(m, color=LIF_COLOR, ls='--', label='LIF soft')
    ax1.set(xlabel='levels K', ylabel='test accuracy (%)', title='More levels', xticks=[1, 2, 3, 4])
    ax1.legend(frameon=False, fontsize=8)
    for name, color in (('LIF soft', LIF_COLOR), ('SCF', OTHER_COLOR), ('CF', CF_COLOR),
                        ('CF+TSG+PNB', '#67000d')):
        names = [(2, f'{name}, T=2'), (4, name), (8, f'{name}, T=8')]
        pts = [(t, *_mean_sd(cells[n])) for t, n in names if n in cells]
        if pts:
            ts, means, sds = zip(*pts)
            ax2.errorbar(ts, means, yerr=sds, fmt='o-', color=color, capsize=3, label=name)
    ax2.set_xscale('log', base=2)
    ax2.set(xlabel='time steps T', title='Fewer or more time steps', xticks=[2, 4, 8],
            xticklabels=['2', '4', '8'])
    ax2.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, 'accuracy_sweeps.png')


# ------------------------------------------------------------------------------------------------
# the settings study ("where does CF pay off?"), from where_cf_pays.json
# ------------------------------------------------------------------------------------------------
def _where_report():
    """``benchmarks/where_report.py``: the study's own tables and figures, so the page and the
    committed results show the same numbers."""
    bench = os.path.join(ROOT, 'benchmarks')
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import where_report
    return where_report


def _report_style():
    """The report's own matplotlib style (no grid over the heat map, all spines), not the pages'."""
    import matplotlib
    _plt()
    return matplotlib.rc_context({'axes.grid': False, 'axes.spines.top': True, 'axes.spines.right': True})


def fig_where_accuracy(out_dir: str) -> Optional[str]:
    """Accuracy of the seven variants per setting, and what each component buys (paired)."""
    path = newest('where_cf_pays.json')
    if path is None:
        print('make_figures: no where_cf_pays.json: where_accuracy.png skipped')
        return None
    out = os.path.join(out_dir, 'where_accuracy.png')
    with _report_style():
        _where_report().plot(_load(path), out)
    return out


def fig_where_potentials(out_dir: str) -> Optional[str]:
    """Potentials before and after the residual sums, and what each reset rule loses."""
    path = newest('where_cf_pays.json')
    if path is None:
        return None
    out = os.path.join(out_dir, 'where_potentials.png')
    with _report_style():
        _where_report().plot_potential_summary(_load(path), out)
    return out if os.path.isfile(out) else None


FIGURES = (fig_staircase, fig_surrogates, fig_neuron_speed, fig_protocol, fig_long_sequences,
           fig_accuracy, fig_accuracy_curves, fig_accuracy_sweeps, fig_where_accuracy, fig_where_potentials)


def main(out_dir: str = DEFAULT_OUT) -> List[str]:
    """Draw every figure into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    written = []
    for make in FIGURES:
        path = make(out_dir)
        if path:
            written.append(path)
    return written


if __name__ == '__main__':
    for p in main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT):
        print(os.path.relpath(p))
