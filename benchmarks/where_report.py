r"""Tables and figures of the settings study: where does CF pay off?

Reads the results dict that ``benchmarks/accuracy_study.py --grid where*`` writes
(``where_cf_pays.json``) and writes, beside it:

- ``where_cf_pays.md``: accuracy per setting and variant (mean ± std over seeds), what each
  component buys per setting (paired differences over seeds), the paper's ordering checked per
  setting, every run's numbers and the time it took;
- ``where_cf_pays.png``: one panel per setting (bars: mean ± std, dots: seeds) and a map of the
  component differences;
- ``where_cf_pays_potentials.{md,png}`` when runs measured their residual sums (the paper's
  Fig. 1): potentials before and after the residual addition, the fractions above θ and 2θ, and
  per step the potential each neuron rule sends, discards at its reset and loses to the leak,
  beside that setting's accuracies.
"""
import math
import os
import shlex
from typing import Dict, List

import numpy as np

#: Table order of the variants (``accuracy_study.WHERE_VARIANTS``).
VARIANT_ORDER = ('LIF soft', 'ST', 'DT', 'SCF', 'CF', 'CF+TSG', 'CF+TSG+PNB')
#: ``(label, a, b, what it isolates)``: a component's effect is ``acc(a) - acc(b)`` per seed.
COMPARISONS = (
    ('negative levels', 'CF', 'SCF', 'K_N = 2 negative levels added to SCF (2/0 -> 2/2)'),
    ('multi-level', 'SCF', 'ST', 'two positive levels instead of one (1/0 -> 2/0)'),
    ('one negative level', 'DT', 'ST', 'a negative level added to ST (1/0 -> 1/1)'),
    ('CF vs LIF', 'CF', 'LIF soft', 'CF (2/2, rectangle) against SpikingJelly LIF with soft reset'),
    ('TSG', 'CF+TSG', 'CF', 'the time-step-wise learnable surrogate instead of the rectangle'),
    ('PNB', 'CF+TSG+PNB', 'CF+TSG', 'the PNB loss (lambda 0.25) added'),
    ('full method vs LIF', 'CF+TSG+PNB', 'LIF soft', "the paper's method against LIF soft"),
)
#: Two-sided 95 % critical value of Student's t with n - 1 degrees of freedom (paired seeds).
T_CRIT = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57}
PAPER_ORDER = ('CF', 'SCF', 'DT', 'ST')
#: Markers around the part of ``where_cf_pays.md`` that ``docs/accuracy_study.md`` includes
#: (completeness, accuracy, component effects, the paper's ordering).
DOCS_START, DOCS_END = '<!-- docs-include-start -->', '<!-- docs-include-end -->'


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------
def settings_and_variants(results: dict) -> tuple:
    """``(settings, variants, notes)`` in the order of the stored cells."""
    settings, variants, notes = [], [], {}
    for c in results['cells']:
        if c.get('setting') is None:
            continue
        if c['setting'] not in settings:
            settings.append(c['setting'])
            notes[c['setting']] = (c.get('group'), c.get('note', ''))
        if c['variant'] not in variants:
            variants.append(c['variant'])
    variants.sort(key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER))
    return settings, variants, notes


def completeness(results: dict) -> Dict[str, dict]:
    """``{setting: {'runs': stored, 'expected': cells x seeds, 'seeds': sorted seeds with a run}}``
    for every setting of the stored cells, the seven variants only (probes apart)."""
    seeds = list(results.get('seeds') or [])
    known = {c['name']: c for c in results['cells'] if c.get('setting') is not None}
    out = {}
    for c in known.values():
        if c['variant'] not in VARIANT_ORDER:
            continue
        row = out.setdefault(c['setting'], {'runs': 0, 'expected': 0, 'seeds': set()})
        row['expected'] += len(seeds)
    for r in results['runs']:
        c = known.get(r['cell'])
        if c is None or c['variant'] not in VARIANT_ORDER:
            continue
        out[c['setting']]['runs'] += 1
        out[c['setting']]['seeds'].add(int(r['seed']))
    for row in out.values():
        row['seeds'] = sorted(row['seeds'])
    return out


def _seeds_note(n: int, full: int) -> str:
    """``' (1 seed)'`` where a row has fewer seeds than the study."""
    return '' if n >= full else f" ({n} seed{'s' if n != 1 else ''})"


def aggregate(results: dict) -> Dict[str, Dict[str, dict]]:
    """``{setting: {variant: row}}``; a row holds mean, std (ddof 1), per-seed accuracies (%), mean
    training accuracy, spikes per neuron and step, wall and CPU seconds per run."""
    out = {}
    known = {c['name']: c for c in results['cells']}
    for r in results['runs']:
        c = known.get(r['cell'])
        if c is None or c.get('setting') is None:
            continue
        out.setdefault(c['setting'], {}).setdefault(c['variant'], []).append(r)
    table = {}
    for setting, by_variant in out.items():
        table[setting] = {}
        for variant, runs in by_variant.items():
            runs = sorted(runs, key=lambda r: r['seed'])
            acc = np.array([100 * r['test_acc'] for r in runs])
            cpu = [r['cpu_seconds'] for r in runs if r.get('cpu_seconds') is not None]
            table[setting][variant] = {
                'n': len(runs), 'mean': float(acc.mean()), 'std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.,
                'seeds': {int(r['seed']): float(100 * r['test_acc']) for r in runs},
                'train_acc': float(np.mean([100 * r['train_acc'] for r in runs])),
                'spikes': float(np.mean([r['spikes_per_neuron_step'] or 0. for r in runs])),
                'seconds': float(np.mean([r['seconds'] for r in runs])),
                'cpu_seconds': float(np.mean(cpu)) if cpu else None,
                'parameters': runs[0].get('parameters')}
    return table


def paired_difference(a: dict, b: dict) -> dict:
    """``a - b`` over the seeds both rows have: mean, sample std of the differences, n, and
    ``resolved`` (paired t-test, two-sided 95 %: ``|t| > T_CRIT[n]``)."""
    seeds = sorted(set(a['seeds']) & set(b['seeds']))
    d = np.array([a['seeds'][s] - b['seeds'][s] for s in seeds])
    if len(d) == 0:
        return {'n': 0, 'mean': float('nan'), 'std': float('nan'), 'resolved': False}
    sd = float(d.std(ddof=1)) if len(d) > 1 else float('nan')
    resolved = False
    if len(d) > 1 and len(d) in T_CRIT:
        resolved = bool(sd == 0 and d.mean() != 0) or bool(sd > 0 and abs(d.mean()) / (sd / math.sqrt(len(d)))
                                                             > T_CRIT[len(d)])
    return {'n': int(len(d)), 'mean': float(d.mean()), 'std': sd, 'resolved': resolved}


def component_effects(table: dict) -> Dict[str, Dict[str, dict]]:
    """``{setting: {comparison label: paired_difference}}`` for every comparison both rows exist for."""
    out = {}
    for setting, rows in table.items():
        out[setting] = {label: paired_difference(rows[a], rows[b])
                        for label, a, b, _ in COMPARISONS if a in rows and b in rows}
    return out


def paper_ordering(rows: dict) -> dict:
    """The measured order of ST, DT, SCF, CF by mean accuracy, and each step of the paper's
    CF > SCF > DT > ST (``True`` where it holds by the means, with ``resolved`` by the paired test)."""
    present = [v for v in PAPER_ORDER if v in rows]
    order = sorted(present, key=lambda v: -rows[v]['mean'])
    steps = {}
    for hi, lo in zip(PAPER_ORDER, PAPER_ORDER[1:]):
        if hi in rows and lo in rows:
            d = paired_difference(rows[hi], rows[lo])
            steps[f'{hi} > {lo}'] = {'holds': d['mean'] > 0, 'resolved': d['resolved'], 'delta': d['mean']}
    return {'order': order, 'steps': steps, 'exact': order == list(PAPER_ORDER)}


def _quoted_command(command: str, settings: List[str]) -> str:
    """A stored command line with the setting names after ``--settings`` quoted where they hold a
    space (``--settings spiking-resnet d8`` -> ``--settings 'spiking-resnet d8'``), as a shell needs
    them; commands recorded already quoted are returned as they are."""
    words = command.split(' ')
    if '--settings' not in words or "'" in command or '"' in command:
        return command
    i = words.index('--settings') + 1
    out = words[:i]
    names = sorted(settings, key=lambda n: -len(n.split(' ')))
    while i < len(words) and not words[i].startswith('--'):
        for name in names:
            n = len(name.split(' '))
            if ' '.join(words[i:i + n]) == name:
                out.append(shlex.quote(name))
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return ' '.join(out + words[i:])


def _fmt_delta(d: dict, full: int = 3) -> str:
    if not d or d['n'] == 0:
        return ''
    sd = '' if math.isnan(d['std']) else f" ± {d['std']:.1f}"
    return f"{d['mean']:+.1f}{sd}{' **' if d['resolved'] else ''}{_seeds_note(d['n'], full)}"


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    all_settings, variants, notes = settings_and_variants(results)
    table = aggregate(results)
    effects = component_effects(table)
    done = completeness(results)
    full = len(results.get('seeds') or []) or 1
    settings = [s for s in all_settings if s in table]
    runs = results['runs']
    wall = results.get('wall_seconds', 0.)
    cpu = [r['cpu_seconds'] for r in runs if r.get('cpu_seconds') is not None]
    versions = next((r.get('versions') for r in runs if r.get('versions')), None)
    n_main = sum(d['runs'] for d in done.values())
    expected = sum(d['expected'] for d in done.values())
    lines = ['# Where does CF pay off? Settings x variants, same budget per variant', '',
             f"{n_main} of {expected} runs ({len(all_settings)} settings x "
             f"{len([v for v in variants if v in VARIANT_ORDER])} variants x seeds "
             f"{results.get('seeds')}); test accuracy (%) after the last epoch, mean ± sample std over seeds. "
             'Within a setting every variant runs the same recipe (the example defaults of that setting: '
             'MNIST-1D Adam lr 0.003, cosine, batch 64, 10 epochs; gestures SGD lr 0.025, 10 epochs).', '']
    lines += ['Commands: ' + '; '.join(f'`{_quoted_command(c, all_settings)}`'
                                       for c in results.get('commands', []) if c) + '.',
              f"Wall time of the runs {wall / 60:.1f} min; CPU time {sum(cpu) / 60:.1f} min in all "
              f"(each run one process with one torch thread; CPU time from the process's own rusage, "
              f"interpreter start-up included).", '']
    if versions:
        lines += [f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.", '']
    lines += [DOCS_START, '']   # docs/accuracy_study.md includes the part between the markers
    missing = [f"{s} ({done[s]['runs']} of {done[s]['expected']} runs"
               + (f", seeds {done[s]['seeds']}" if done[s]['runs'] else '') + ')'
               for s in all_settings if s in done and done[s]['runs'] < done[s]['expected']]
    if missing:
        lines += ['**Not complete yet:** ' + '; '.join(missing) + '. Their rows hold the seeds that have run '
                  '(marked with their number); a setting without runs has no row.', '']
    probes = [v for v in variants if v not in VARIANT_ORDER]
    variants = [v for v in variants if v in VARIANT_ORDER]
    lines += ['## Accuracy', '', '| setting | ' + ' | '.join(variants) + ' |',
              '|---|' + '---|' * len(variants)]
    for s in settings:
        rows = table[s]
        best = max(r['mean'] for v, r in rows.items() if v in variants)
        cells = []
        for v in variants:
            r = rows.get(v)
            if r is None:
                cells.append('')
                continue
            txt = f"{r['mean']:.1f}" + (f" ± {r['std']:.1f}" if r['n'] > 1 else '')
            cells.append((f'**{txt}**' if r['mean'] == best else txt) + _seeds_note(r['n'], full))
        lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
    probe_rows = [(s, v) for s in settings for v in probes if v in table[s]]
    if probe_rows:
        lines += ['', '## Probes', '', 'Cells beyond the seven variants (same setting and budget), with the '
                  'paired difference to the setting\'s LIF soft and CF cells.', '',
                  '| setting | cell | test acc (%) | per seed | train acc (%) | − LIF soft | − CF |',
                  '|---|---|---|---|---|---|---|']
        for s, v in probe_rows:
            r = table[s][v]
            d_lif = _fmt_delta(paired_difference(r, table[s]['LIF soft']), full) if 'LIF soft' in table[s] else ''
            d_cf = _fmt_delta(paired_difference(r, table[s]['CF']), full) if 'CF' in table[s] else ''
            lines.append(f"| {s} | {v} | {r['mean']:.1f} ± {r['std']:.1f} | "
                         f"{' / '.join(f'{a:.1f}' for a in r['seeds'].values())} | {r['train_acc']:.1f} | "
                         f'{d_lif} | {d_cf} |')
    lines += ['', '## What each component buys', '',
              'Paired over seeds (same seed: same initial weights and data order): mean difference in '
              'accuracy points ± sample std of the per-seed differences; ** = resolved by a paired t-test '
              '(two-sided 95 %, with 3 seeds |t| > 4.30); "(1 seed)": one seed only, no spread.', '',
              '| setting | ' + ' | '.join(c[0] for c in COMPARISONS) + ' |', '|---|' + '---|' * len(COMPARISONS)]
    for s in settings:
        lines.append(f'| {s} | ' + ' | '.join(_fmt_delta(effects[s].get(c[0]), full) for c in COMPARISONS) + ' |')
    lines += [''] + [f'- *{label}*: {a} − {b}: {what}.' for label, a, b, what in COMPARISONS]
    lines += ['', "## The paper's ordering CF > SCF > DT > ST", '',
              '| setting | measured order | ' + ' | '.join(f'{a} > {b}' for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]))
              + ' | CF > LIF | TSG helps | PNB helps |', '|---|---|---|---|---|---|---|---|']
    for s in settings:
        o = paper_ordering(table[s])
        marks = []
        for key in [f'{a} > {b}' for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:])]:
            st = o['steps'].get(key)
            marks.append('' if st is None else ('yes' if st['holds'] else 'no') + (' **' if st['resolved'] else ''))
        for label in ('CF vs LIF', 'TSG', 'PNB'):
            d = effects[s].get(label)
            marks.append('' if d is None else ('yes' if d['mean'] > 0 else 'no') + (' **' if d['resolved'] else ''))
        n = min(r['n'] for v, r in table[s].items() if v in variants)
        lines.append(f"| {s}{_seeds_note(n, full)} | {' > '.join(o['order'])} | " + ' | '.join(marks) + ' |')
    lines += ['', '"yes"/"no": by the means; ** as above (the difference is resolved by the seeds).', '',
              DOCS_END, '', '## Settings', ''] + [f'- **{s}** ({notes[s][0]}): {notes[s][1]}' for s in all_settings]
    lines += ['', '## Every run', '',
              '| setting | variant | per seed (%) | train acc (%) | spikes/neuron/step | parameters | wall s/run | '
              'CPU s/run |', '|---|---|---|---|---|---|---|---|']
    for s in settings:
        for v in variants + probes:
            r = table[s].get(v)
            if r is None:
                continue
            cpu_txt = '' if r['cpu_seconds'] is None else f"{r['cpu_seconds']:.0f}"
            per_seed = ' / '.join(f'{seed}: {a:.1f}' for seed, a in r['seeds'].items())
            lines.append(f"| {s} | {v} | {per_seed} | "
                         f"{r['train_acc']:.1f} | {r['spikes']:.3f} | {r['parameters'] or ''} | "
                         f"{r['seconds']:.0f} | {cpu_txt} |")
    lines += ['', '## Time per setting', '', '| setting | runs | CPU min | wall min (sum of runs) |', '|---|---|---|---|']
    for s in settings:
        rs = [r for r in runs if r['cell'].startswith(s + ': ')]
        c = [r['cpu_seconds'] for r in rs if r.get('cpu_seconds') is not None]
        lines.append(f"| {s} | {len(rs)} | {sum(c) / 60:.1f} | {sum(r['seconds'] for r in rs) / 60:.1f} |")
    resumed = [f"{r['cell']} seed {r['seed']}" for r in runs if r.get('resumed')]
    if resumed:
        lines += ['', 'Continued from a checkpoint after an interruption (their times cover the rest only): '
                  + ', '.join(resumed) + '.']
    for note in results.get('notes', []):
        lines += ['', note]
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
VARIANT_COLORS = {'LIF soft': '0.55', 'ST': '#9ecae1', 'DT': '#6baed6', 'SCF': '#3182bd', 'CF': '#08519c',
                  'CF+TSG': '#fd8d3c', 'CF+TSG+PNB': '#d94801'}


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


SHORT_NAMES = {'LIF soft': 'LIF', 'CF+TSG': '+TSG', 'CF+TSG+PNB': '+TSG+PNB'}


def _bars(ax, rows: dict, variants: List[str], title: str, fontsize: float = 8) -> None:
    """Mean ± std per variant, the seeds as dots, LIF soft dashed; y from just below the lowest seed."""
    xs = np.arange(len(variants))
    present = [v for v in variants if v in rows]
    for i, v in enumerate(variants):
        r = rows.get(v)
        if r is None:
            continue
        ax.bar(i, r['mean'], yerr=r['std'] if r['n'] > 1 else None, capsize=2,
               color=VARIANT_COLORS.get(v, 'tab:gray'), alpha=0.9)
        vals = list(r['seeds'].values())
        ax.plot([i] * len(vals), vals, 'k.', ms=3)
    if 'LIF soft' in rows:
        ax.axhline(rows['LIF soft']['mean'], color='0.4', lw=0.8, ls='--')
    lo = min(min(rows[v]['seeds'].values()) for v in present)
    hi = max(max(rows[v]['seeds'].values()) for v in present)
    ax.set_ylim(max(0., lo - 0.15 * (hi - lo) - 2), min(100., hi + 0.1 * (hi - lo) + 1))
    ax.set_xticks(xs)
    ax.set_xticklabels([SHORT_NAMES.get(v, v) for v in variants], rotation=60, ha='right', fontsize=fontsize - 1)
    ax.set_title(title, fontsize=fontsize)
    ax.tick_params(axis='y', labelsize=fontsize - 1)
    ax.grid(axis='y', alpha=0.3)


PART_LABELS = {'plain': 'static', 'residual': 'static, residual', 'transformer': 'static, transformer',
               'temporal': 'temporal', 'probe': 'probe'}


def plot(results: dict, path: str) -> None:
    """One bar panel per setting, five to a row in study order (plain and residual, then
    transformer and temporal), and a map of the component differences (settings x components).
    A setting of the study without runs yet keeps its panel, marked as such."""
    plt = _pyplot()
    settings, variants, notes = settings_and_variants(results)
    variants = [v for v in variants if v in VARIANT_ORDER]
    table = aggregate(results)
    if not table:
        return
    full = len(results.get('seeds') or []) or 1
    effects = component_effects(table)
    cols = min(5, len(settings))
    nrows = math.ceil(len(settings) / cols)
    map_h = 0.28 * len(settings) + 1.3
    fig = plt.figure(figsize=(2.3 * cols + 0.6, 2.7 * nrows + map_h + 0.5))
    grid = fig.add_gridspec(nrows + 1, cols, height_ratios=[2.7] * nrows + [map_h], hspace=0.75, wspace=0.3,
                            top=1 - 0.75 / (2.7 * nrows + map_h + 0.5))
    for i, s in enumerate(settings):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        kind = PART_LABELS.get(notes[s][0], notes[s][0])
        if s not in table:
            ax.set_title(f'{s}\n({kind})', fontsize=8)
            ax.text(0.5, 0.5, 'not run yet', ha='center', va='center', fontsize=9, color='0.4',
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        n = min(r['n'] for v, r in table[s].items() if v in variants)
        _bars(ax, table[s], variants, f'{s}{_seeds_note(n, full)}\n({kind})')
        if i % cols == 0:
            ax.set_ylabel('test accuracy (%)', fontsize=8)
    ax = fig.add_subplot(grid[nrows, :])
    labels = [c[0] for c in COMPARISONS]
    m = np.full((len(settings), len(labels)), np.nan)
    for i, s in enumerate(settings):
        for j, lab in enumerate(labels):
            d = effects.get(s, {}).get(lab)
            if d is not None and d['n']:
                m[i, j] = d['mean']
    lim = 15.   # colours saturate at +-15 points: the small effects (TSG, PNB) stay visible
    ax.imshow(m, cmap='RdBu', vmin=-lim, vmax=lim, aspect='auto')
    for i, s in enumerate(settings):
        for j, lab in enumerate(labels):
            d = effects.get(s, {}).get(lab)
            if d is not None and d['n']:
                txt = f"{d['mean']:+.1f}{'*' if d['resolved'] else ''}" + ('' if d['n'] >= full else f" ({d['n']})")
                ax.text(j, i, txt, ha='center', va='center', fontsize=7.5,
                        color='k' if abs(d['mean']) < 0.6 * lim else 'w')
            else:
                ax.text(j, i, '–', ha='center', va='center', fontsize=7.5, color='0.5')
    ax.set_yticks(range(len(settings)))
    ax.set_yticklabels(settings, fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f'{c[0]}\n{c[1]} − {c[2]}' for c in COMPARISONS], fontsize=7.5)
    ax.tick_params(length=0)
    ax.set_title('What each component buys: accuracy difference in points, paired over seeds '
                 '(* resolved by a paired t-test at 95 %; (n): seeds if fewer)', fontsize=9)
    fig.suptitle('Where does CF pay off? Test accuracy per setting (bars: mean ± std, dots: seeds, '
                 'dashed: LIF soft)', fontsize=10, y=0.995)
    fig.savefig(path, dpi=110, bbox_inches='tight', metadata={'Software': None})
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the motivating measurement
# ----------------------------------------------------------------------------------------------
def measured_runs(results: dict) -> list:
    known = {c['name']: c for c in results['cells']}
    return [r for r in results['runs'] if r.get('residual_potentials') and r['cell'] in known]


def potentials_markdown(results: dict) -> str:
    lines = ['# Potentials before and after a residual addition (the paper\'s Fig. 1)', '',
             'Seed 0 of the marked cells, after training, on the first test sequences. Per residual block: the '
             'neuron whose input holds the shortcut sum ("after") and the block\'s neuron without it ("before"). '
             '`h ≥ θ`, `h ≥ 2θ`, `h ≤ −θ`, `h ≤ −2θ`: fractions of the pre-spike potentials of the network\'s own '
             'neurons. Replay: the same recorded input currents run through LIF hard / LIF soft / SCF / CF '
             '(θ = 1, decay 0.25); per neuron and step, in units of θ, the potential *sent* as spikes (θ·|s|), '
             '*discarded* by the reset (a hard reset drops h − θ after a spike; soft resets drop nothing) and '
             '*leaked* (v/τ of the potential left over from the previous step, lost to the decay before it '
             'can be sent), means over the steps.', '',
             '| run | block neuron | where | h ≥ θ | h ≥ 2θ | h ≤ −θ | h ≤ −2θ | sent / discarded / leaked: '
             'LIF hard | LIF soft | SCF | CF |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in measured_runs(results):
        for name, d in r['residual_potentials']['layers'].items():
            f = d['fractions']
            rep = []
            for rule in ('LIF hard', 'LIF soft', 'SCF', 'CF'):
                q = d['replay'][rule]
                rep.append(f"{np.mean(q['sent']):.2f} / {np.mean(q['discarded']):.2f} / {np.mean(q['leaked']):.2f}")
            lines.append(f"| {r['cell']} ({100 * r['test_acc']:.1f} %) | {name} | {d['where']} | "
                         f"{f['above_theta']:.3f} | {f['above_2theta']:.3f} | {f['below_minus_theta']:.3f} | "
                         f"{f['below_minus_2theta']:.3f} | " + ' | '.join(rep) + ' |')
    lines += ['', summary_lines(results)]
    return '\n'.join(lines) + '\n'


def potential_summary(run: dict) -> dict:
    """Means over the blocks of a measured run, separately for ``before`` and ``after``."""
    out = {}
    for where in ('before', 'after'):
        layers = [d for d in run['residual_potentials']['layers'].values() if d['where'] == where]
        if not layers:
            continue
        out[where] = {k: float(np.mean([d['fractions'][k] for d in layers]))
                      for k in ('above_theta', 'above_2theta', 'below_minus_theta', 'below_minus_2theta')}
        out[where]['replay'] = {rule: {q: float(np.mean([np.mean(d['replay'][rule][q]) for d in layers]))
                                       for q in ('sent', 'discarded', 'leaked')}
                                for rule in layers[0]['replay']}
    return out


def summary_lines(results: dict) -> str:
    lines = ['Means over the blocks (before → after the residual sum):', '']
    for r in measured_runs(results):
        s = potential_summary(r)
        if 'before' not in s or 'after' not in s:
            continue
        b, a = s['before'], s['after']
        lines.append(f"- {r['cell']}: h ≥ θ {b['above_theta']:.3f} → {a['above_theta']:.3f}, h ≥ 2θ "
                     f"{b['above_2theta']:.3f} → {a['above_2theta']:.3f}; LIF hard discards "
                     f"{b['replay']['LIF hard']['discarded']:.3f} → {a['replay']['LIF hard']['discarded']:.3f} θ "
                     f"per neuron-step; leak LIF soft {b['replay']['LIF soft']['leaked']:.3f} → "
                     f"{a['replay']['LIF soft']['leaked']:.3f}, CF {b['replay']['CF']['leaked']:.3f} → "
                     f"{a['replay']['CF']['leaked']:.3f}")
    return '\n'.join(lines)


def _block_index(name: str) -> int:
    """``'blocks.3.sn2'`` -> 3."""
    parts = name.split('.')
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def plot_potentials(results: dict, path: str) -> None:
    """Per measured run: potential histograms before / after, fractions ≥ θ and ≥ 2θ per block,
    per-step potential sent / discarded / leaked by each rule after the sum, and the setting's
    accuracies beside them."""
    runs = measured_runs(results)
    if not runs:
        return
    plt = _pyplot()
    table = aggregate(results)
    _, variants, _ = settings_and_variants(results)
    known = {c['name']: c for c in results['cells']}
    fig, axes = plt.subplots(len(runs), 4, figsize=(17, 2.9 * len(runs)), squeeze=False)
    rules = ('LIF hard', 'LIF soft', 'SCF', 'CF')
    rule_colors = {'LIF hard': '0.3', 'LIF soft': '0.6', 'SCF': '#3182bd', 'CF': '#08519c'}
    for i, r in enumerate(runs):
        layers = r['residual_potentials']['layers']
        ax = axes[i, 0]
        for where, color in (('before', 'tab:blue'), ('after', 'tab:red')):
            hs = [np.asarray(d['histogram']) for d in layers.values() if d['where'] == where]
            if not hs:
                continue
            h = np.sum(hs, axis=0)
            lo, hi = next(iter(layers.values()))['range']
            edges = np.linspace(lo, hi, len(h) + 1)
            ax.stairs(h / max(h.sum(), 1), edges, color=color, label=f'{where} the sum')
        for level in (-2, -1, 1, 2):
            ax.axvline(level, color='0.5', lw=0.6, ls=':')
        ax.set_yscale('log')
        ax.set_title(f"{r['cell']}: pre-spike h, all blocks (edges: beyond ±4θ)", fontsize=8)
        ax.set_xlabel('h / θ', fontsize=7)
        ax.legend(fontsize=6)
        ax = axes[i, 1]
        for k, (key, marker) in enumerate((('above_theta', 'o'), ('above_2theta', 's'))):
            for where, color in (('before', 'tab:blue'), ('after', 'tab:red')):
                names = [n for n in layers if layers[n]['where'] == where]
                ax.plot([_block_index(n) for n in names], [layers[n]['fractions'][key] for n in names],
                        marker=marker, ls='-' if k == 0 else '--', color=color, ms=3,
                        label=f"{where}: {'h ≥ θ' if k == 0 else 'h ≥ 2θ'}")
        ax.set_xlabel('block', fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title('fraction of h at or above θ, 2θ per block', fontsize=8)
        ax.legend(fontsize=6)
        ax = axes[i, 2]
        after = [d for d in layers.values() if d['where'] == 'after'] or list(layers.values())
        T = len(after[0]['replay']['CF']['sent'])
        width = 0.8 / len(rules)
        for k, rule in enumerate(rules):
            sent = np.mean([d['replay'][rule]['sent'] for d in after], axis=0)
            disc = np.mean([d['replay'][rule]['discarded'] for d in after], axis=0)
            leak = np.mean([d['replay'][rule]['leaked'] for d in after], axis=0)
            x = np.arange(1, T + 1) + (k - len(rules) / 2 + 0.5) * width
            ax.bar(x, sent, width, color=rule_colors[rule], label=f'{rule}: sent')
            ax.bar(x, disc, width, bottom=sent, color='tab:red', alpha=0.8, label='discarded by reset' if k == 0 else None)
            ax.bar(x, leak, width, bottom=sent + disc, color='tab:orange', alpha=0.6, label='leaked' if k == 0 else None)
        ax.set_xlabel('time step (bars: LIF hard, LIF soft, SCF, CF)', fontsize=7)
        ax.set_ylabel('θ per neuron', fontsize=7)
        ax.set_title('same inputs (after the sum) through each rule', fontsize=8)
        ax.legend(fontsize=5, ncol=2)
        ax = axes[i, 3]
        setting = known[r['cell']].get('setting')
        if setting in table:
            _bars(ax, table[setting], [v for v in variants if v in table[setting]], f'{setting}: accuracy')
        else:
            ax.axis('off')
        for a in axes[i]:
            a.tick_params(labelsize=7)
    fig.suptitle("Potentials before and after a residual addition (the paper's Fig. 1) beside the accuracy", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_run_label(cell: str) -> str:
    """``'spiking-resnet d8: LIF soft'`` -> ``'spiking d8: LIF soft'`` (tick labels)."""
    setting, variant = cell.split(': ', 1)
    return setting.replace('-resnet', '') + ': ' + variant


def plot_potential_summary(results: dict, path: str) -> None:
    """The measurement in three panels, one bar group per measured run (means over its blocks):
    the fractions of pre-spike potentials at or above θ and 2θ (and at or below −θ, −2θ) before
    and after the residual sum; per neuron and step, the potential a hard-reset LIF discards and
    the potential each soft rule (LIF soft, SCF, CF) loses to the leak, on the same inputs after
    the sum; the histogram of the deepest measured LIF run's potentials before and after."""
    runs = [r for r in measured_runs(results) if {'before', 'after'} <= set(potential_summary(r))]
    if not runs:
        return
    plt = _pyplot()
    summaries = [potential_summary(r) for r in runs]
    labels = [_short_run_label(r['cell']) for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), gridspec_kw={'width_ratios': [1.25, 1.25, 1]})
    x = np.arange(len(runs))
    def after_bars_before_ticks(ax, series, headroom, ylabel, title):
        """One bar group per run: each ``(name, color, value)`` after the sum as a bar, before it
        as a tick (``value(summary_side)``)."""
        width = 0.2
        for k, (name, color, value) in enumerate(series):
            pos = x + (k - 1.5) * width
            ax.bar(pos, [value(s['after']) for s in summaries], width, color=color, label=name)
            ax.plot(pos, [value(s['before']) for s in summaries], '_', color='k', ms=9, mew=1.5,
                    label='before the sum' if k == 0 else None)
        ax.set_ylim(0, headroom * ax.get_ylim()[1])
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha='right')
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6.5, ncol=2, loc='upper left')

    fractions = (('above_theta', 'h ≥ θ', '#08519c'), ('above_2theta', 'h ≥ 2θ', '#6baed6'),
                 ('below_minus_theta', 'h ≤ −θ', '#a50f15'), ('below_minus_2theta', 'h ≤ −2θ', '#fb6a4a'))
    after_bars_before_ticks(axes[0], [(name, color, lambda side, key=key: side[key])
                                      for key, name, color in fractions],
                            1.45, 'fraction of pre-spike potentials',
                            'Beyond ±θ, ±2θ: after (bars), before (ticks) the sum')
    rules = [('LIF hard', 'discarded', 'LIF hard: reset discards', '#a50f15'),
             ('LIF soft', 'leaked', 'LIF soft: leaked', '0.55'),
             ('SCF', 'leaked', 'SCF: leaked', '#6baed6'),
             ('CF', 'leaked', 'CF: leaked', '#08519c')]
    after_bars_before_ticks(axes[1], [(name, color, lambda side, rule=rule, q=q: side['replay'][rule][q])
                                      for rule, q, name, color in rules],
                            1.35, 'θ per neuron and step', 'Potential lost (same inputs through each rule)')
    ax = axes[2]
    lif = [r for r in runs if r['cell'].endswith('LIF soft')] or runs
    r = max(lif, key=lambda r: len(r['residual_potentials']['layers']))
    layers = r['residual_potentials']['layers']
    for where, color in (('before', 'tab:blue'), ('after', 'tab:red')):
        hs = [np.asarray(d['histogram']) for d in layers.values() if d['where'] == where]
        h = np.sum(hs, axis=0)
        lo, hi = next(iter(layers.values()))['range']
        ax.stairs(h / max(h.sum(), 1), np.linspace(lo, hi, len(h) + 1), color=color, label=f'{where} the sum')
    for level in (-2, -1, 1, 2):
        ax.axvline(level, color='0.5', lw=0.6, ls=':')
    ax.set_yscale('log')
    ax.set_xlabel('pre-spike potential h / θ (edge bins: beyond ±4)', fontsize=8)
    ax.set_title(f"{r['cell']}, all blocks", fontsize=9)
    ax.legend(fontsize=7)
    for a in axes:
        a.tick_params(labelsize=7)
        a.grid(axis='y', alpha=0.3)
    fig.suptitle("Residual sums push potential beyond θ and 2θ (the paper's Fig. 1), measured after training "
                 '(seed 0, test sequences)', fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110, metadata={'Software': None})
    plt.close(fig)


def write_report(results: dict, out_dir: str) -> None:
    """``where_cf_pays.{md,png}`` and, when runs measured potentials, ``where_cf_pays_potentials.{md,png}``
    and ``where_cf_pays_potentials_summary.png``."""
    with open(os.path.join(out_dir, 'where_cf_pays.md'), 'w') as f:
        f.write(markdown(results))
    plot(results, os.path.join(out_dir, 'where_cf_pays.png'))
    if measured_runs(results):
        with open(os.path.join(out_dir, 'where_cf_pays_potentials.md'), 'w') as f:
            f.write(potentials_markdown(results))
        plot_potentials(results, os.path.join(out_dir, 'where_cf_pays_potentials.png'))
        plot_potential_summary(results, os.path.join(out_dir, 'where_cf_pays_potentials_summary.png'))
