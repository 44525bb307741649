r"""Does CF beat LIF, and where? Variants x seeds with the same budget, tables and plots.

Each cell of a grid is one setting of ``examples/mnist1d.py`` (neuron, variant, K, surrogate,
PNB, pooling, T); every cell runs for the same seeds with the same recipe (the example's
defaults: Adam lr 0.003, cosine, 10 epochs, batch 64, width 32, T = 4). The reported accuracy is
the test accuracy after the last epoch (no picking of the best epoch on the test set).

Outputs in ``--out-dir`` (default ``benchmarks/results/<date>_<device>/``):
``accuracy_study.json`` (every run: per-seed accuracies, times, spike rates, the grid and the
command), ``accuracy_study.md`` (mean +- std, per-seed values), ``accuracy_study.png`` (bars with
error bars and the seeds as dots) and, for cells marked for diagnostics,
``accuracy_study_diagnostics.{md,png}`` (seed 0 of those cells runs with the example's
``--diagnostics``: surrogate dead zones, potentials, spike levels, pooling, gradient norms).

The study is resumable: a run whose cell and seed are already in the JSON (with the same
arguments) is skipped, so an interrupted study continues where it stopped and a finished one
only rewrites its table and figures.

Grids (``--grid``)
------------------
- ``smoke``: two cells, one seed, one epoch of a width-4 network: seconds (CI).
- ``core``: the paper's ablation at equal budget (LIF soft/hard, ST, DT, SCF, CF, CF+TSG,
  CF+TSG+PNB) plus average pooling for LIF and CF, 3 seeds: 30 runs, 16.5 min of CPU time,
  about 9 min with ``--jobs 2`` on an idle 2-core CPU (the first 10 rows of the committed table).
- ``full`` (default): ``core`` plus LIF+TSG, K = 1..4, T = 2/4/8, max vs average pooling for
  every variant and SpikingJelly's default LIF surrogate (Sigmoid), 3 seeds: 105 runs, 62 min of
  CPU time, about 35 min with ``--jobs 2`` on an idle 2-core CPU (measured: the 73 runs beyond
  ``core`` took 25.7 min). The committed ``benchmarks/results/2026-11-30_cpu-2core/`` table.
- ``where``: where does CF pay off? The seven variants LIF soft, ST, DT, SCF, CF, CF+TSG,
  CF+TSG+PNB at equal budget in ten settings (:data:`WHERE_SETTINGS`: plain, spiking / SEW / MS
  ResNets, Spikformer, sequential and time-reversed MNIST-1D with a recurrent SNN, the synthetic
  gestures of ``examples/dvs_gesture.py``), 3 seeds: 210 runs. Its parts run on their own and add
  up in the same files: ``where-plain``, ``where-residual``, ``where-transformer``,
  ``where-temporal``; ``where-probe``: the deep spiking ResNet with a Sigmoid surrogate (why it
  separates the variants); ``where-smoke``: the smallest configuration of each (CI). Writes
  ``where_cf_pays.*`` (tables and figures: ``benchmarks/where_report.py``); seed 0 of the marked
  residual cells measures the potentials before and after each residual sum
  (``where_cf_pays_potentials.*``). Time: see ``docs/accuracy_study.md``.

Examples
--------
::

    python benchmarks/accuracy_study.py --jobs 2                 # the committed table (105 runs)
    python benchmarks/accuracy_study.py --grid core --jobs 2     # its first 10 rows (30 runs)
    python benchmarks/accuracy_study.py --grid where --jobs 2     # the settings study (210 runs)
    python benchmarks/accuracy_study.py --grid where-residual --jobs 2   # one part of it
    python benchmarks/accuracy_study.py --grid smoke --out-dir /tmp/study
    python benchmarks/accuracy_study.py --list                   # the cells of each grid
"""
import argparse
import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'mnist1d.py')
#: The examples a cell can run: script, the flag of its data folder and that folder's default.
EXAMPLES = {
    'mnist1d': {'path': EXAMPLE, 'data_flag': '--data-dir', 'data_default': os.path.join('data', 'mnist1d')},
    'dvs_gesture': {'path': os.path.join(ROOT, 'examples', 'dvs_gesture.py'), 'data_flag': '--synthetic-root',
                    'data_default': os.path.join('data', 'synthetic_gesture')},
}

RECT = ['--surrogate', 'rect', '--pnb', '0']


def _cell(name, argv, note='', group='ablation', diagnose=False, example='mnist1d', setting=None, variant=None,
          measure=False):
    return {'name': name, 'argv': list(argv), 'note': note, 'group': group, 'diagnose': diagnose,
            'example': example, 'setting': setting, 'variant': variant, 'measure': measure}


#: The cells of the ``core`` grid, in table order.
CORE_CELLS = [
    _cell('LIF soft', ['--neuron', 'lif', '--lif-reset', 'soft'] + RECT,
          'LIF, soft reset (subtract theta), CF rectangle surrogate', diagnose=True),
    _cell('LIF hard', ['--neuron', 'lif', '--lif-reset', 'hard'] + RECT, 'LIF, hard reset to 0'),
    _cell('ST', ['--variant', 'ST'] + RECT, 'CFNode 1/0 levels (= LIF soft)'),
    _cell('DT', ['--variant', 'DT'] + RECT, 'CFNode 1/1 levels'),
    _cell('SCF', ['--variant', 'SCF', '--K', '2'] + RECT, 'CFNode 2/0 levels', diagnose=True),
    _cell('CF', ['--variant', 'CF', '--K', '2'] + RECT, 'CFNode 2/2 levels', diagnose=True),
    _cell('CF+TSG', ['--variant', 'CF', '--K', '2', '--surrogate', 'tsg', '--pnb', '0'], 'CF with TSG (Eq. 15-17)'),
    _cell('CF+TSG+PNB', ['--variant', 'CF', '--K', '2', '--surrogate', 'tsg', '--pnb', '0.25'],
          "the paper's full method (the example's default)"),
    _cell('LIF soft, avg pool', ['--neuron', 'lif', '--lif-reset', 'soft', '--pool', 'avg'] + RECT,
          'average pooling', group='pooling'),
    _cell('CF, avg pool', ['--variant', 'CF', '--K', '2', '--pool', 'avg'] + RECT, 'average pooling',
          group='pooling', diagnose=True),
]


def _full_cells():
    cells = list(CORE_CELLS)
    names = {c['name'] for c in cells}

    def add(c):
        if c['name'] not in names:
            cells.append(c)
            names.add(c['name'])
    add(_cell('LIF+TSG', ['--neuron', 'lif', '--lif-reset', 'soft', '--surrogate', 'tsg', '--pnb', '0'],
              'LIF soft with TSG'))
    add(_cell('SCF, avg pool', ['--variant', 'SCF', '--K', '2', '--pool', 'avg'] + RECT, 'average pooling',
              group='pooling'))
    add(_cell('LIF soft+sigmoid', ['--neuron', 'lif', '--lif-reset', 'soft', '--surrogate', 'sigmoid', '--pnb', '0'],
              "SpikingJelly's default surrogate (Sigmoid, alpha 4)", group='surrogate'))
    add(_cell('LIF hard+sigmoid', ['--neuron', 'lif', '--lif-reset', 'hard', '--surrogate', 'sigmoid', '--pnb', '0'],
              "SpikingJelly's LIFNode defaults", group='surrogate'))
    add(_cell('CF+sigmoid', ['--variant', 'CF', '--surrogate', 'sigmoid', '--pnb', '0'],
              'SpikingJelly Sigmoid per level', group='surrogate'))
    for K in (1, 3, 4):
        add(_cell(f'SCF K={K}', ['--variant', 'SCF', '--K', str(K)] + RECT, f'CFNode {K}/0 levels', group='K'))
        add(_cell(f'CF K={K}', ['--variant', 'CF', '--K', str(K)] + RECT, f'CFNode {K}/{K} levels', group='K'))
    for T in (2, 8):
        for base in ('LIF soft', 'SCF', 'CF', 'CF+TSG+PNB'):
            c = next(c for c in CORE_CELLS if c['name'] == base)
            add(_cell(f'{base}, T={T}', c['argv'] + ['--T', str(T)], f'T = {T}', group='T'))
    for base in ('LIF hard', 'ST', 'DT', 'CF+TSG', 'CF+TSG+PNB', 'LIF+TSG'):
        c = next(c for c in cells if c['name'] == base)
        add(_cell(f'{base}, avg pool', c['argv'] + ['--pool', 'avg'], 'average pooling', group='pooling'))
    return cells


# ----------------------------------------------------------------------------------------------
# "where does CF pay off?": the same seven variants in every setting
# ----------------------------------------------------------------------------------------------
#: The variants of the settings study, in table order (the paper's ablation at equal budget).
WHERE_VARIANTS = ('LIF soft', 'ST', 'DT', 'SCF', 'CF', 'CF+TSG', 'CF+TSG+PNB')
#: Each variant's arguments for ``examples/mnist1d.py`` (the same as the ``core`` grid's cells).
MNIST1D_VARIANT_ARGV = {c['name']: c['argv'] for c in CORE_CELLS if c['name'] in WHERE_VARIANTS}
#: ... and for ``examples/dvs_gesture.py`` (levels through ``--k-pos/--k-neg``; LIF resets softly).
DVS_VARIANT_ARGV = {
    'LIF soft': ['--neuron', 'lif'] + RECT,
    'ST': ['--k-pos', '1', '--k-neg', '0'] + RECT,
    'DT': ['--k-pos', '1', '--k-neg', '1'] + RECT,
    'SCF': ['--k-pos', '2', '--k-neg', '0'] + RECT,
    'CF': ['--k-pos', '2', '--k-neg', '2'] + RECT,
    'CF+TSG': ['--k-pos', '2', '--k-neg', '2', '--surrogate', 'tsg', '--pnb', '0'],
    'CF+TSG+PNB': ['--k-pos', '2', '--k-neg', '2', '--surrogate', 'tsg', '--pnb', '0.25'],
}


def _setting(name, part, argv, note, example='mnist1d', measure=()):
    return {'name': name, 'part': part, 'argv': list(argv), 'note': note, 'example': example,
            'measure': tuple(measure)}


#: The settings, in table order: ``part`` is the ``--grid where-<part>`` that runs them. Widths and
#: depths are sized so that the whole study fits about 90 min on 2 cores (see the module doc).
WHERE_SETTINGS = [
    _setting('plain', 'plain', [], 'static input, the plain conv net of the accuracy study (3 conv blocks, width 32)'),
    _setting('spiking-resnet d2', 'residual', ['--arch', 'spiking-resnet', '--depth', '2', '--width', '16'],
             "static, spiking ResNet (shortcut added before the neuron, the paper's Fig. 1), 2 blocks: "
             '5 spiking layers, width 16', measure=('LIF soft', 'CF')),
    _setting('spiking-resnet d8', 'residual', ['--arch', 'spiking-resnet', '--depth', '8', '--width', '16'],
             'static, spiking ResNet, 8 blocks: 17 spiking layers (ResNet-18 depth), width 16',
             measure=('LIF soft', 'CF')),
    _setting('sew-resnet d8', 'residual', ['--arch', 'sew-resnet', '--depth', '8', '--width', '16'],
             'static, SEW-ResNet (ADD after the neuron), 8 blocks, width 16'),
    _setting('ms-resnet d8', 'residual', ['--arch', 'ms-resnet', '--depth', '8', '--width', '16'],
             'static, MS-ResNet (membrane shortcut), 8 blocks, width 16', measure=('LIF soft', 'CF')),
    _setting('spikformer d1', 'transformer', ['--arch', 'spikformer', '--depth', '1', '--width', '16', '--heads', '2'],
             'static, Spikformer (spiking self-attention), 1 block, 16 channels, 2 heads'),
    _setting('spikformer d4', 'transformer', ['--arch', 'spikformer', '--depth', '4', '--width', '16', '--heads', '2'],
             'static, Spikformer, 4 blocks, 16 channels, 2 heads'),
    _setting('sequential', 'temporal', ['--arch', 'rsnn', '--task', 'sequential', '--depth', '1', '--width', '64'],
             'temporal: sequential MNIST-1D (one sample per step, T = 40), one recurrent layer of 64'),
    _setting('reversed', 'temporal', ['--arch', 'rsnn', '--task', 'reversed', '--depth', '1', '--width', '64'],
             'temporal: sequential MNIST-1D, a fixed half played backwards as 10 more classes (20 classes)'),
    _setting('gestures', 'temporal', [], "temporal: built-in synthetic gestures, the DVS example's defaults "
             '(VGG width 4, T = 10, SGD, 10 epochs, 30 + 10 samples per class)', example='dvs_gesture'),
]


def where_cells(settings=None) -> list:
    """Cells ``'<setting>: <variant>'`` of the settings study (all settings by default)."""
    cells = []
    for st in (WHERE_SETTINGS if settings is None else settings):
        table = DVS_VARIANT_ARGV if st['example'] == 'dvs_gesture' else MNIST1D_VARIANT_ARGV
        for v in WHERE_VARIANTS:
            cells.append(_cell(f"{st['name']}: {v}", st['argv'] + table[v], note=st['note'], group=st['part'],
                               example=st['example'], setting=st['name'], variant=v, measure=v in st['measure']))
    return cells


WHERE_PARTS = ('plain', 'residual', 'transformer', 'temporal')


def _where_probe_cells() -> list:
    """Why the deep spiking ResNet separates the variants: the same network with SpikingJelly's
    Sigmoid surrogate (alpha 4, non-zero everywhere) instead of the rectangle, for LIF soft and CF.
    If LIF trains there with it, the rectangle's gradient (zero outside a window around each level,
    multiplied over the 8 neurons on the residual path) is what held LIF back, not the forward pass."""
    st = next(s for s in WHERE_SETTINGS if s['name'] == 'spiking-resnet d8')
    sigmoid = ['--surrogate', 'sigmoid', '--pnb', '0']
    return [_cell(f"{st['name']}: {name}", st['argv'] + argv + sigmoid,
                  note="probe: SpikingJelly's Sigmoid surrogate (alpha 4) instead of the rectangle", group='probe',
                  setting=st['name'], variant=name)
            for name, argv in (('LIF soft+sigmoid', ['--neuron', 'lif', '--lif-reset', 'soft']),
                               ('CF+sigmoid', ['--variant', 'CF', '--K', '2']))]


def _where_smoke_cells() -> list:
    """The smallest configuration of every architecture and temporal task: one epoch on 256
    sequences at width 4 (CF + TSG + PNB: every code path), the tiny gesture setting, and LIF on
    the spiking ResNet (the measurement compares it with CF)."""
    tiny = ['--epochs', '1', '--width', '4', '--limit', '256']
    cells = []
    for st in WHERE_SETTINGS:
        if st['example'] == 'dvs_gesture':
            argv = DVS_VARIANT_ARGV['CF+TSG+PNB'] + ['-T', '4', '--width', '4', '-b', '8', '--epochs', '1',
                                                     '--synthetic-train', '2', '--synthetic-test', '1']
            cells.append(_cell(f"{st['name']}: CF+TSG+PNB", argv, st['note'], st['part'], example='dvs_gesture',
                               setting=st['name'], variant='CF+TSG+PNB'))
            continue
        if st['name'] in ('spiking-resnet d8', 'spikformer d4', 'reversed'):
            continue   # same code as the shallow / sequential setting
        argv = [a for a in st['argv']]
        if '--depth' in argv:
            argv[argv.index('--depth') + 1] = '1'
        variants = ('LIF soft', 'CF+TSG+PNB') if st['name'] == 'spiking-resnet d2' else ('CF+TSG+PNB',)
        for v in variants:
            cells.append(_cell(f"{st['name']}: {v}", argv + MNIST1D_VARIANT_ARGV[v] + tiny, st['note'], st['part'],
                               setting=st['name'], variant=v, measure=st['name'] == 'spiking-resnet d2'))
    return cells


#: ``name -> (cells, seeds, extra example arguments)``.
GRIDS = {
    'smoke': ([_cell('LIF soft', ['--neuron', 'lif'] + RECT, diagnose=True),
               _cell('CF', ['--variant', 'CF'] + RECT, diagnose=True)],
              [0], ['--epochs', '1', '--width', '4', '--diagnostics-every', '16']),
    'core': (CORE_CELLS, [0, 1, 2], []),
    'full': (_full_cells(), [0, 1, 2], []),
    'where-smoke': (_where_smoke_cells(), [0], []),
    'where': (where_cells(), [0, 1, 2], []),
    'where-probe': (_where_probe_cells(), [0, 1, 2], []),
}
for _part in WHERE_PARTS:
    GRIDS[f'where-{_part}'] = (where_cells([s for s in WHERE_SETTINGS if s['part'] == _part]), [0, 1, 2], [])
#: Results file stem of each grid: the settings study keeps its own files beside the MNIST-1D ablation's.
GRID_STEM = {name: 'where_cf_pays' if name.startswith('where') else 'accuracy_study' for name in GRIDS}


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
_EXAMPLE_MODULES = {}


def _load_example(name: str = 'mnist1d'):
    """The example script ``name`` of :data:`EXAMPLES` as a module (loaded once)."""
    if name not in _EXAMPLE_MODULES:
        spec = importlib.util.spec_from_file_location(f'{name}_example', EXAMPLES[name]['path'])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _EXAMPLE_MODULES[name] = module
    return _EXAMPLE_MODULES[name]


def _rel(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it (no machine paths in the JSON)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


PATH_FLAGS = ('--out-dir', '--data-dir', '--synthetic-root')


def _absolute(argv: list) -> list:
    """``argv`` with the relative output and data folders made absolute (relative to the root)."""
    argv = list(argv)
    for flag in PATH_FLAGS:
        if flag in argv:
            i = argv.index(flag) + 1
            argv[i] = os.path.join(ROOT, argv[i])
    return argv


def run_dir_name(cell_name: str) -> str:
    """A cell's folder name: ``'spiking-resnet d8: CF+TSG'`` -> ``'spiking-resnet_d8_CF+TSG'``."""
    return cell_name.replace(': ', '_').replace(' ', '_').replace(',', '').replace('=', '')


def run_argv(cell, seed, extra, runs_dir, data_dir, gesture_root=None) -> list:
    """The example's arguments for one run (paths relative to the repository root)."""
    example = EXAMPLES[cell.get('example', 'mnist1d')]
    data = data_dir if example['path'] == EXAMPLE else (gesture_root or os.path.join(ROOT, example['data_default']))
    runs_dir, data = _rel(runs_dir), _rel(data)
    out = os.path.join(runs_dir, run_dir_name(cell['name']), f'seed{seed}')
    argv = cell['argv'] + list(extra) + ['--seed', str(seed), '--out-dir', out, example['data_flag'], data,
                                         '--no-progress', '--no-analysis', '--threads', '1']
    if cell.get('diagnose') and seed == 0:
        argv.append('--diagnostics')
    if cell.get('measure') and seed == 0:
        argv.append('--potentials')
    return argv


def _record(cell, seed, argv, summary, seconds, cpu_seconds=None, resumed=False) -> dict:
    hist = summary.get('history') or []
    rec = {'cell': cell['name'], 'seed': seed, 'argv': cell['argv'], 'run_argv': argv,
           'example': cell.get('example', 'mnist1d'),
           'test_acc': summary['test_acc'], 'best_test_acc': summary['best_test_acc'],
           'train_acc': summary['train_acc'], 'epochs': summary['epochs'],
           'spikes_per_neuron_step': hist[-1]['spikes_per_neuron_step'] if hist else None,
           'test_acc_per_epoch': [h['test_acc'] for h in hist],
           'seconds': seconds,
           'cpu_seconds': cpu_seconds if cpu_seconds is not None else summary.get('cpu_seconds_process'),
           'parameters': summary.get('parameters'),
           'setting': summary.get('setting'), 'versions': summary.get('versions')}
    if cell.get('setting') is not None:
        rec['where'] = {'setting': cell['setting'], 'variant': cell['variant'], 'part': cell['group']}
    if resumed:
        rec['resumed'] = True   # continued from a checkpoint: seconds and CPU time cover the rest only
    if summary.get('recovered'):
        rec['recovered'] = True  # finished after its study had stopped; times from its own summary
    if 'diagnostics' in summary:
        rec['diagnostics'] = summary['diagnostics']
    if 'residual_potentials' in summary:
        rec['residual_potentials'] = summary['residual_potentials']
    return rec


def _run_in_process(example, argv):
    import torch
    threads = torch.get_num_threads()
    try:
        return example.main(argv)
    finally:
        torch.set_num_threads(threads)


def _run_subprocess(argv, log_path, script=EXAMPLE):
    """Run ``script argv`` in a fresh interpreter; ``(summary, CPU seconds of that process)``."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env.setdefault('OMP_NUM_THREADS', '1')
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, script] + argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)   # the child's own rusage (all its threads)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f'run failed (exit {rc}), see {log_path}')
    out_dir = argv[argv.index('--out-dir') + 1]
    with open(os.path.join(out_dir, 'summary.json')) as f:
        return json.load(f), usage.ru_utime + usage.ru_stime


def _finished_summary(argv: list):
    """The summary of a run that finished with exactly these (absolute) arguments after its study
    had stopped (a study ended while its runs went on), else ``None``. Its wall and CPU time are
    the run's own (``seconds_total``, ``cpu_seconds_process``: the example's process, all threads)."""
    out = argv[argv.index('--out-dir') + 1]
    marker, path = os.path.join(out, 'study_run_argv.json'), os.path.join(out, 'summary.json')
    if not (os.path.isfile(marker) and os.path.isfile(path)):
        return None
    with open(marker) as f:
        if json.load(f) != argv:
            return None
    with open(path) as f:
        summary = json.load(f)
    if summary.get('test_acc') is None or len(summary.get('history') or []) != summary.get('epochs'):
        return None
    return dict(summary, recovered=True)


def _resume_or_start(argv: list) -> tuple:
    """``(argv, resumed)``: continue a run interrupted with exactly these arguments from its last
    epoch checkpoint (the example's ``--resume``; on the CPU it ends with the weights of an
    uninterrupted run), else start it in an empty folder."""
    out = argv[argv.index('--out-dir') + 1]
    marker = os.path.join(out, 'study_run_argv.json')
    ckpt = os.path.join(out, 'checkpoints', 'latest.pt')
    if os.path.isfile(marker) and os.path.isfile(ckpt):
        with open(marker) as f:
            if json.load(f) == argv:
                return argv + ['--resume'], True
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    os.makedirs(out)
    _write_json(argv, marker)
    return argv, False


def prepare_data(todo: list) -> None:
    """Make every data set the runs in ``todo`` read, once, before runs start side by side
    (``todo``: ``(cell, seed, absolute argv)``)."""
    done = set()
    for cell, _, argv in todo:
        name = cell.get('example', 'mnist1d')
        flag = EXAMPLES[name]['data_flag']
        root = argv[argv.index(flag) + 1]
        example = _load_example(name)
        if name == 'mnist1d':
            key = (name, root)
            if key not in done:
                example.load_standard_split(root)
        else:
            args = example.parse_args([a for a in argv if a not in ('--resume',)])
            key = (name, root, args.T, args.input_size, args.synthetic_train, args.synthetic_test, args.data_seed)
            if key not in done:
                from types import SimpleNamespace
                example.build_data(args, example.common.Distributed('cpu'), SimpleNamespace(class_names=None))
        done.add(key)


def _write_json(obj, path):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def default_out_dir() -> str:
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        cuda = False
    if cuda:
        device = torch.cuda.get_device_name(0).replace(' ', '-')
    else:
        device = f'cpu-{os.cpu_count()}core'
    date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
    return os.path.join(ROOT, 'benchmarks', 'results', f'{date}_{device}')


def run_study(grid: str = 'full', out_dir: str = None, jobs: int = 1, seeds=None, cells=None,
              runs_dir: str = None, data_dir: str = None, progress: bool = True, epochs: int = None,
              gesture_root: str = None, settings=None) -> dict:
    """Run (or resume) a grid; write JSON, Markdown and figures; return the results dict.

    Parameters
    ----------
    grid : str
        One of :data:`GRIDS`.
    out_dir : str
        Folder of ``accuracy_study.*`` (default: ``benchmarks/results/<date>_<device>``).
    jobs : int
        Runs at a time: 1 runs the example in this process, more start subprocesses (one
        torch thread each).
    seeds, cells : list, optional
        Override the grid's seeds, or keep only the cells with these names.
    settings : list, optional
        Keep only the cells of these settings (``where*`` grids, e.g. ``['spiking-resnet d8']``).
    epochs : int, optional
        Override the example's epochs (a different budget: recorded in the JSON).
    data_dir, gesture_root : str, optional
        MNIST-1D cache (default ``data/mnist1d``) and the synthetic gesture set's folder
        (default ``data/synthetic_gesture``).

    The ``where*`` grids write ``where_cf_pays.*`` and add to what is there: each part
    (``--grid where-residual``, ...) can run on its own and the report covers every setting
    run so far. The other grids write ``accuracy_study.*`` for their own cells.
    """
    if grid not in GRIDS:
        raise ValueError(f'grid must be one of {tuple(GRIDS)}, got {grid!r}')
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f'jobs must be a positive int, got {jobs!r}')
    grid_cells, grid_seeds, extra = GRIDS[grid]
    seeds = list(grid_seeds if seeds is None else seeds)
    if cells is not None:
        known = [c['name'] for c in grid_cells]
        unknown = [c for c in cells if c not in known]
        if unknown:
            raise ValueError(f'cells {unknown} are not in grid {grid!r}; its cells: {known}')
        grid_cells = [c for c in grid_cells if c['name'] in cells]
    if settings is not None:
        known = list(dict.fromkeys(c.get('setting') for c in grid_cells if c.get('setting') is not None))
        unknown = [s for s in settings if s not in known]
        if unknown:
            raise ValueError(f'settings {unknown} are not in grid {grid!r}; its settings: {known}')
        grid_cells = [c for c in grid_cells if c.get('setting') in settings]
    extra = list(extra) + (['--epochs', str(epochs)] if epochs is not None else [])
    stem = GRID_STEM[grid]
    out_dir = out_dir or default_out_dir()
    runs_dir = runs_dir or os.path.join(ROOT, 'runs', stem, os.path.basename(os.path.abspath(out_dir)))
    data_dir = data_dir or os.path.join(ROOT, 'data', 'mnist1d')
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + '.json')
    results = {'runs': []}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
    done = {(r['cell'], r['seed']): r for r in results['runs']}
    todo = []
    for s in seeds:             # seed-major: an interrupted study has whole seeds of every cell
        for c in grid_cells:
            argv = run_argv(c, s, extra, runs_dir, data_dir, gesture_root)
            r = done.get((c['name'], s))
            if r is not None and r.get('run_argv', [])[:len(c['argv']) + len(extra)] == c['argv'] + extra:
                continue
            if r is not None:
                print(f'[study] {c["name"]} seed {s}: arguments changed since the stored run, running it again')
                results['runs'].remove(r)
            todo.append((c, s, argv))
    command = ('python benchmarks/accuracy_study.py '
               + ' '.join(shlex.quote(_rel(a) if os.path.isabs(a) else a) for a in sys.argv[1:])
               if sys.argv and sys.argv[0].endswith('accuracy_study.py') else None)
    keys = ('name', 'argv', 'note', 'group', 'diagnose', 'example', 'setting', 'variant', 'measure')
    new_cells = [{k: c.get(k) for k in keys} for c in grid_cells]
    if stem == 'where_cf_pays':     # the parts add up: keep the cells of earlier parts, in study order
        merged = {c['name']: c for c in results.get('cells', [])}
        merged.update({c['name']: c for c in new_cells})
        order = [c['name'] for c in GRIDS['where'][0] + GRIDS['where-probe'][0]]
        new_cells = sorted(merged.values(), key=lambda c: order.index(c['name']) if c['name'] in order else 10 ** 6)
        grids = list(results.get('grids', []))
        results['grids'] = grids + ([grid] if grid not in grids else [])
        commands = list(results.get('commands', []))
        results['commands'] = commands + ([command] if command and command not in commands else [])
    results.update({'grid': grid, 'seeds': sorted(set(results.get('seeds', [])) | set(seeds))
                    if stem == 'where_cf_pays' else seeds, 'extra_argv': extra, 'cells': new_cells,
                    'command': command})
    results.setdefault('wall_seconds', 0.)
    print(f'[study] grid {grid!r}: {len(grid_cells)} cells x {len(seeds)} seeds; '
          f'{len(grid_cells) * len(seeds) - len(todo)} done, '
          f'{len(todo)} to run ({jobs} at a time); results in {out_dir}', flush=True)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc='accuracy study', dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    tic = time.time()

    def finish(c, s, argv, summary, seconds, cpu=None, resumed=False):
        rec = _record(c, s, argv, summary, seconds, cpu, resumed)
        results['runs'].append(rec)
        results['wall_seconds'] += time.time() - finish.last
        finish.last = time.time()
        _write_json(results, path)
        msg = f'{c["name"]} seed {s}: {100 * rec["test_acc"]:.2f} % ({seconds:.0f} s)'
        if bar is not None:
            bar.update(1)
            bar.write('[study] ' + msg)
        else:
            print('[study] ' + msg, flush=True)
    finish.last = tic

    if todo:
        prepare_data([(c, s, _absolute(argv)) for c, s, argv in todo])
    for c, s, argv in list(todo):
        summary = _finished_summary(_absolute(argv))
        if summary is not None:
            todo.remove((c, s, argv))
            finish(c, s, argv, summary, summary['seconds_total'], summary.get('cpu_seconds_process'))
    if jobs == 1:
        for c, s, argv in todo:
            t0, c0 = time.time(), time.process_time()
            full, resumed = _resume_or_start(_absolute(argv))
            summary = _run_in_process(_load_example(c.get('example', 'mnist1d')), full)
            finish(c, s, argv, summary, time.time() - t0, time.process_time() - c0, resumed)
    elif todo:
        with ThreadPoolExecutor(jobs) as pool:
            futures = {}
            for c, s, argv in todo:
                futures[pool.submit(_timed_subprocess, c, argv)] = (c, s, argv)
            for fut in as_completed(futures):
                c, s, argv = futures[fut]
                (summary, cpu), seconds, resumed = fut.result()
                finish(c, s, argv, summary, seconds, cpu, resumed)
    if bar is not None:
        bar.close()
    order = [c['name'] for c in results['cells']]
    results['runs'].sort(key=lambda r: (order.index(r['cell']) if r['cell'] in order else 10 ** 6, r['seed']))
    results['machine'] = machine_info()
    _write_json(results, path)
    if stem == 'where_cf_pays':
        _where_report().write_report(results, out_dir)
    else:
        write_report(results, out_dir)
    return results


def _timed_subprocess(cell, argv):
    t0 = time.time()
    full, resumed = _resume_or_start(_absolute(argv))
    log = os.path.join(full[full.index('--out-dir') + 1], 'log.txt')
    out = _run_subprocess(full, log, EXAMPLES[cell.get('example', 'mnist1d')]['path'])
    return out, time.time() - t0, resumed


def _where_report():
    """``benchmarks/where_report.py`` (tables and figures of the settings study)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import where_report
    return where_report


def machine_info() -> dict:
    import platform
    info = {'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'python': platform.python_version()}
    try:
        with open('/proc/loadavg') as f:
            info['loadavg_at_end'] = f.read().split()[:3]
    except OSError:  # pragma: no cover
        pass
    return info


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def aggregate(results: dict) -> list:
    """One row per cell (in grid order): mean, std (ddof 1), per-seed test accuracies."""
    rows = []
    for c in results['cells']:
        runs = sorted((r for r in results['runs'] if r['cell'] == c['name']), key=lambda r: r['seed'])
        if not runs:
            continue
        acc = np.array([100 * r['test_acc'] for r in runs])
        rows.append({'name': c['name'], 'note': c['note'], 'group': c['group'], 'n': len(runs),
                     'mean': float(acc.mean()), 'std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.,
                     'seeds': {r['seed']: float(100 * r['test_acc']) for r in runs},
                     'train_acc': float(np.mean([100 * r['train_acc'] for r in runs])),
                     'spikes': float(np.mean([r['spikes_per_neuron_step'] or 0. for r in runs])),
                     'seconds': float(np.mean([r['seconds'] for r in runs]))})
    return rows


def base_names(results: dict) -> set:
    return {c['name'] for c in results['cells']}


def write_report(results: dict, out_dir: str) -> None:
    rows = aggregate(results)
    base = {r['name']: r for r in rows}.get('LIF soft')
    lines = ['# Accuracy study on MNIST-1D', '',
             f"Grid `{results['grid']}`: {len(rows)} cells x seeds {results['seeds']}, "
             f"test accuracy after the last epoch, mean ± std over seeds (sample std).",
             f"Recipe: `examples/mnist1d.py` defaults (Adam lr 0.003, cosine, batch 64, width 32, T = 4, 10 epochs) "
             f"unless the cell says otherwise{'; extra arguments ' + repr(results['extra_argv']) if results['extra_argv'] else ''}.",
             f"Command: `{results.get('command') or 'python benchmarks/accuracy_study.py --grid ' + results['grid']}`; "
             f"wall time of the runs {results.get('wall_seconds', 0) / 60:.1f} min "
             f"({results.get('machine', {}).get('cpu_count')} CPU cores).", '',
             '| cell | setting | test acc (%) | vs LIF soft | per seed | train acc (%) | spikes/neuron/step | s/run |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        delta = f"{r['mean'] - base['mean']:+.2f}" if base is not None and r is not base else ''
        lines.append(f"| {r['name']} | {r['note']} | {r['mean']:.2f} ± {r['std']:.2f} | {delta} | "
                     f"{' / '.join(f'{v:.1f}' for v in r['seeds'].values())} | {r['train_acc']:.1f} | "
                     f"{r['spikes']:.3f} | {r['seconds']:.0f} |")
    versions = next((r.get('versions') for r in results['runs'] if r.get('versions')), None)
    if versions:
        lines += ['', f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}."]
    cpu = [r['cpu_seconds'] for r in results['runs'] if r.get('cpu_seconds') and r['cell'] in base_names(results)]
    if cpu:
        lines += ['', f"CPU time of the {len(cpu)} runs: {sum(cpu) / 60:.1f} min in all, median {np.median(cpu):.0f} s "
                      f"per run (one torch thread each, interpreter start-up included)."]
    for note in results.get('notes', []):   # free text added to the JSON by hand (how the runs went)
        lines += ['', note]
    with open(os.path.join(out_dir, 'accuracy_study.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot_study(rows, os.path.join(out_dir, 'accuracy_study.png'), title=f"MNIST-1D, grid {results['grid']}")
    diag = [r for r in results['runs'] if r.get('diagnostics') and r['cell'] in base_names(results)]
    if diag:
        write_diagnostics(diag, out_dir)


def plot_study(rows: list, path: str, title: str = '') -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colors = {'ablation': 'tab:blue', 'pooling': 'tab:orange', 'surrogate': 'tab:green', 'K': 'tab:purple',
              'T': 'tab:brown'}
    fig, ax = plt.subplots(figsize=(max(6., 0.55 * len(rows) + 1.5), 4.2))
    x = np.arange(len(rows))
    ax.bar(x, [r['mean'] for r in rows], yerr=[r['std'] for r in rows], capsize=3,
           color=[colors.get(r['group'], 'tab:gray') for r in rows], alpha=0.75)
    for i, r in enumerate(rows):
        v = list(r['seeds'].values())
        ax.plot([i] * len(v), v, 'k.', ms=4)
    lo = min(min(r['seeds'].values()) for r in rows)
    hi = max(max(r['seeds'].values()) for r in rows)
    ax.set_ylim(max(0., lo - 3), min(100., hi + 2))
    ax.set_xticks(x)
    ax.set_xticklabels([r['name'] for r in rows], rotation=60, ha='right', fontsize=7)
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'{title}: mean ± std over seeds (dots: seeds)', fontsize=9)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_diagnostics(runs: list, out_dir: str) -> None:
    """Table and figure of the diagnosed runs (seed 0 of the marked cells)."""
    lines = ['# Diagnostics (seed 0 of the marked cells)', '',
             'Per spiking layer: `dead` = fraction of pre-reset potentials h where the surrogate derivative '
             'ds/dh is exactly 0 (first / last epoch); `h < -θ/2, abs(h) < θ/2, h > θ/2` = where h falls (last epoch); '
             '`levels` = fraction of outputs at each spike value (last epoch); `‖∇W‖` = weight-gradient norm of '
             'the convolution feeding the layer (first / last epoch). Per pooling layer: share of |s| carried '
             'by negative spikes at the input / output, and the fraction of windows holding a negative spike '
             'whose output is not negative.', '',
             '| run | layer | dead (first / last) | h < -θ/2, abs(h) < θ/2, h > θ/2 | levels | ‖∇W‖ (first / last) | '
             'pool: neg share in / out, neg dropped |',
             '|---|---|---|---|---|---|---|']
    for r in runs:
        d = r['diagnostics']
        first, last = d['epochs'][0], d['epochs'][-1]
        layers = list(last['spiking'])
        convs = [n for n in last['grad_norm'] if not n.startswith('classifier')]
        pools = list(last['pool'])
        for i, name in enumerate(layers):
            sp0, sp = first['spiking'][name], last['spiking'][name]
            levels = ', '.join(f'{k}: {v:.3f}' for k, v in sp['level_fractions'].items())
            conv = convs[i] if i < len(convs) else None
            g = f"{first['grad_norm'][conv]:.3g} / {last['grad_norm'][conv]:.3g}" if conv else ''
            pool = last['pool'].get(pools[i]) if i < len(pools) else None
            p = ''
            if pool:
                nd = pool['neg_dropped']
                p = f"{pool['neg_share_in']:.3f} / {pool['neg_share_out']:.3f}, " + ('–' if nd is None else f'{nd:.3f}')
            reg = ' / '.join(f'{v:.2f}' for v in sp['h_regions'])
            lines.append(f"| {r['cell']} ({100 * r['test_acc']:.1f} %) | {name} | "
                         f"{sp0['zero_grad_fraction']:.3f} / {sp['zero_grad_fraction']:.3f} | {reg} | {levels} | {g} | {p} |")
    with open(os.path.join(out_dir, 'accuracy_study_diagnostics.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    _plot_diagnostics(runs, os.path.join(out_dir, 'accuracy_study_diagnostics.png'))
    _write_json({r['cell']: dict(r['diagnostics'], test_acc=r['test_acc']) for r in runs},
                os.path.join(out_dir, 'accuracy_study_diagnostics.json'))


def _plot_diagnostics(runs: list, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    styles = ['-', '--', ':', '-.']
    for j, r in enumerate(runs):
        d = r['diagnostics']
        epochs = d['epochs']
        xs = [e['epoch'] for e in epochs]
        color = f'C{j}'
        for i, name in enumerate(epochs[-1]['spiking']):
            axes[0].plot(xs, [e['spiking'][name]['zero_grad_fraction'] for e in epochs], color=color,
                         ls=styles[i % 4], label=f"{r['cell']} {name}" if i == 0 else None)
        convs = [n for n in epochs[-1]['grad_norm']]
        axes[1].plot(range(len(convs)), [np.mean([e['grad_norm'][n] for e in epochs]) for n in convs],
                     color=color, marker='o', label=r['cell'])
        axes[1].set_xticks(range(len(convs)))
        axes[1].set_xticklabels([n.replace('features.', 'f.') for n in convs], fontsize=7)
        pools = list(epochs[-1]['pool'])
        axes[2].plot(range(len(pools)), [epochs[-1]['pool'][p]['neg_share_out'] for p in pools], color=color,
                     marker='o', label=f"{r['cell']} out")
        axes[2].plot(range(len(pools)), [epochs[-1]['pool'][p]['neg_share_in'] for p in pools], color=color,
                     marker='x', ls='--', label=f"{r['cell']} in")
        axes[2].set_xticks(range(len(pools)))
        axes[2].set_xticklabels(pools, fontsize=7)
        last = epochs[-1]['spiking']
        for i, name in enumerate(last):
            fr = last[name]['level_fractions']
            ks = sorted(int(k) for k in fr)
            axes[3].plot([k + 0.06 * (j - len(runs) / 2) for k in ks], [fr[str(k)] for k in ks], color=color,
                         ls=styles[i % 4], marker='.', label=r['cell'] if i == 0 else None)
    axes[0].set_title('fraction of h with ds/dh = 0 (line style: layer)', fontsize=9)
    axes[0].set_xlabel('epoch')
    axes[0].set_ylim(0, 1)
    axes[1].set_title('weight-gradient norm per layer (mean over epochs)', fontsize=9)
    axes[1].set_yscale('log')
    axes[2].set_title('share of |s| in negative spikes, last epoch', fontsize=9)
    axes[3].set_title('spike-level fractions, last epoch (line style: layer)', fontsize=9)
    axes[3].set_yscale('log')
    axes[3].set_xlabel('spike value')
    for ax in axes:
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--grid', choices=tuple(GRIDS), default='full', help='which grid (see the module doc)')
    parser.add_argument('--out-dir', default=None, help='default: benchmarks/results/<date>_<device>')
    parser.add_argument('--runs-dir', default=None, help='per-run outputs (default: runs/accuracy_study/...)')
    parser.add_argument('--data-dir', default=None, help='MNIST-1D cache (default: data/mnist1d)')
    parser.add_argument('--gesture-root', default=None,
                        help='the synthetic gesture set of the where-temporal grid (default: data/synthetic_gesture)')
    parser.add_argument('--jobs', type=int, default=1, help='runs at a time (>1: subprocesses, 1 thread each)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help="override the grid's seeds")
    parser.add_argument('--cells', nargs='+', default=None, help='only these cells of the grid')
    parser.add_argument('--settings', nargs='+', default=None,
                        help="only the cells of these settings (where* grids), e.g. 'spiking-resnet d8'")
    parser.add_argument('--epochs', type=int, default=None, help="override the example's epochs")
    parser.add_argument('--report-only', action='store_true', help='rewrite table and figures from the JSON')
    parser.add_argument('--list', action='store_true', help='print the cells of every grid and exit')
    parser.add_argument('--no-progress', action='store_true')
    return parser


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    if args.list:
        for name, (cells, seeds, extra) in GRIDS.items():
            print(f'{name}: {len(cells)} cells x seeds {seeds} {extra or ""}')
            for c in cells:
                print(f"  {c['name']:<24} {' '.join(c['argv'])}")
        return {}
    if args.jobs < 1:
        raise SystemExit(f'--jobs must be >= 1, got {args.jobs}')
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f'--epochs must be >= 1, got {args.epochs}')
    if args.report_only:
        out_dir = args.out_dir or default_out_dir()
        stem = GRID_STEM[args.grid]
        with open(os.path.join(out_dir, stem + '.json')) as f:
            results = json.load(f)
        if stem == 'where_cf_pays':
            _where_report().write_report(results, out_dir)
        else:
            write_report(results, out_dir)
        return results
    try:
        return run_study(args.grid, args.out_dir, args.jobs, args.seeds, args.cells, args.runs_dir, args.data_dir,
                         progress=not args.no_progress, epochs=args.epochs, gesture_root=args.gesture_root,
                         settings=args.settings)
    except ValueError as e:
        raise SystemExit(str(e)) from e


if __name__ == '__main__':
    main()
