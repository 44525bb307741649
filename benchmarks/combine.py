"""Merge the ``neuron_<tag>.json`` files of one results folder (one per SpikingJelly version).

Each ``bench_neuron.py`` run measures CFNode together with the baselines of the SpikingJelly it
imported. This script puts the runs side by side; every ratio it prints still divides times
measured in the same run (a baseline by the CF default of its own run)::

    PYTHONPATH=.venv/sj/0.0.0.0.14:. .venv/bin/python benchmarks/bench_neuron.py
    PYTHONPATH=.venv/sj/2.0.0:. .venv/bin/python benchmarks/bench_neuron.py
    .venv/bin/python benchmarks/combine.py benchmarks/results/<date>_<device>

writes ``neuron_combined.md`` (every T) and ``neuron_combined.rst`` (T=8, for README.rst).
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402


def load_runs(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        if payload.get('benchmark') == 'neuron':
            runs.append(payload)
    return runs


def columns(runs):
    """(label, run index, candidate name) for every column: CF default and copy per run, the
    other candidates once (their names carry the SpikingJelly version)."""
    cols, seen = [], set()
    for i, run in enumerate(runs):
        default = next((r['candidate'] for r in run['results']
                        if r.get('family') == 'CF' and r.get('default') and r.get('status') == 'ok'), None)
        if default:
            cols.append((f'{default} @{run["tag"]}', i, default, 'cf'))
    for i, run in enumerate(runs):
        for r in run['results']:
            if r.get('status') != 'ok' or r['family'] in ('CF', 'copy') or r['candidate'] in seen:
                continue
            seen.add(r['candidate'])
            cols.append((r['candidate'], i, r['candidate'], 'baseline'))
    for i, run in enumerate(runs):
        if any(r.get('family') == 'copy' and r.get('status') == 'ok' for r in run['results']):
            cols.append((f'copy @{run["tag"]}', i, 'copy', 'copy'))
    return cols


def index(runs):
    table = {}
    for i, run in enumerate(runs):
        for r in run['results']:
            if r.get('status') == 'ok':
                table[(i, r['candidate'], r['dtype'], r['mode'], r['T'], r['N'])] = r
    return table


def case_rows(runs, dtype, mode, Ts):
    cols = columns(runs)
    table = index(runs)
    cf_default = {i: name for (label, i, name, kind) in cols if kind == 'cf'}
    Ns = sorted({k[5] for k in table if k[2] == dtype and k[3] == mode})
    header = ['T', 'N'] + [c[0] for c in cols]
    speed_cols = [c for c in cols if c[3] != 'cf']
    header += [('copy frac @' + runs[c[1]]['tag']) if c[3] == 'copy'
               else f'x{c[0]}' for c in speed_cols]
    rows = []
    for T in Ts:
        for N in Ns:
            cells = [table.get((i, name, dtype, mode, T, N)) for (_, i, name, _) in cols]
            if not any(cells):
                continue
            row = [T, common.fmt_n(N)] + [common.fmt_ms(c['time_s']['median']) if c else ''
                                          for c in cells]
            for (_, i, name, kind) in speed_cols:
                other = table.get((i, name, dtype, mode, T, N))
                cf = table.get((i, cf_default.get(i), dtype, mode, T, N))
                row.append(f'{other["time_s"]["median"] / cf["time_s"]["median"]:.3g}'
                           if other and cf else '')
            rows.append(row)
    return header, rows


def short(name: str) -> str:
    """``LIFNode[torch] (SJ 0.0.0.0.14)`` -> ``LIF[torch]@0.0.0.0.14`` for narrow tables."""
    return (name.replace(' (SJ ', '@').replace(')', '').replace('Node', '')
            .replace(' @sj', '@'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('folder', help='a results folder holding neuron_<tag>.json files')
    p.add_argument('--readme-T', type=int, default=8)
    args = p.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.folder, 'neuron_*.json')))
    runs = load_runs(paths)
    if not runs:
        raise SystemExit(f'no neuron_*.json in {args.folder}')
    dtypes = []
    for run in runs:
        for d in run['config']['dtypes']:
            if d not in dtypes:
                dtypes.append(d)
    modes = runs[0]['config']['modes']
    lines = ['# Multi-step neuron benchmark, runs combined', '',
             'Median times in ms. Each "xX" column is X time / the CF default time of the run that '
             'measured X; "copy frac" is copy time / CF time of the same run. Runs:', '']
    for run in runs:
        m = run['meta']
        lines.append(f'- `{run["tag"]}`: SpikingJelly {m["spikingjelly"]}, torch {m["torch"]}, '
                     f'{m["device_label"]}, {m["date"]}, commit `{m["git_commit"]}`, load average '
                     f'{m.get("load_average_start")} -> {m.get("load_average_end")}')
    rst = []
    for dtype in dtypes:
        for mode in modes:
            Ts = sorted({T for run in runs for T in run['config']['T']})
            header, rows = case_rows(runs, dtype, mode, Ts)
            if rows:
                lines += ['', f'## {mode}, {dtype}', '', common.markdown_table(header, rows)]
            header, rows = case_rows(runs, dtype, mode, [args.readme_T])
            if rows:
                rst += ['', f'{mode}, {dtype}, T={args.readme_T} (median ms)', '',
                        common.rst_table([short(h) for h in header], rows)]
    lines += ['', '## Targets (each evaluated within one run)', '']
    targets = [(run['tag'], t) for run in runs for t in run.get('targets', [])]
    lines.append(common.markdown_table(
        ['run', 'target', 'where', 'measured', 'threshold', 'verdict'],
        [[tag, t['target'], t['where'], f'{t["value"]:.3g}' if 'value' in t else t.get('reason', ''),
          t.get('threshold', ''), common.verdict(t.get('passed'))] for tag, t in targets]))
    notes = [(run['tag'], n) for run in runs for n in run.get('notes', [])]
    if notes:
        lines += ['', '## Notes', ''] + [f'- `{tag}`: {n}' for tag, n in notes]
    md = os.path.join(args.folder, 'neuron_combined.md')
    common.write_text(md, '\n'.join(lines))
    rst_path = os.path.join(args.folder, 'neuron_combined.rst')
    common.write_text(rst_path, '\n'.join(rst).lstrip('\n'))
    print('\n'.join(lines))
    print(f'\nwrote {md} and {rst_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
