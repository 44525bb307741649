"""MNIST-1D example and accuracy study (``examples/mnist1d.py``, ``benchmarks/accuracy_study.py``).

Cost per pass (one torch thread; measured on the shared 2-core machine at load 7-10, the whole
file 43 s with SpikingJelly 0.0.0.0.14 and 61 s with 2.0.0 at 4 epochs): generating the data once
~3 s; the accuracy run of the example's defaults (CF + TSG + PNB, 5 epochs, ~35 s of CPU time);
the smoke grid of the study (two width-4 runs of one epoch, with diagnostics) ~10 s; everything
else < 1 s each. The accuracy run is the one expensive test (``test_defaults_reach_80_percent``).
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip('mnist1d', reason='examples/mnist1d.py needs the mnist1d package (requirements.txt)')


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load('mnist1d_example_under_test', os.path.join('examples', 'mnist1d.py'))
study = _load('accuracy_study_under_test', os.path.join('benchmarks', 'accuracy_study.py'))


def _run(argv):
    threads = torch.get_num_threads()
    try:
        return example.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """The standard split generated once (offline) into a temporary cache."""
    d = str(tmp_path_factory.mktemp('mnist1d_data'))
    example.load_standard_split(d, verbose=False)
    return d


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def test_standard_split_is_generated_offline(data_dir, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError('MNIST-1D must not be downloaded')
    monkeypatch.setattr(requests, 'get', no_network)
    np.random.seed(123)
    state = np.random.get_state()
    d = example.generate_standard_split()
    # the caller's NumPy random state is left as it was (make_dataset seeds numpy itself)
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert d['x'].shape == (4000, 40) and d['x_test'].shape == (1000, 40)
    assert d['x'].dtype == np.float32 and d['y'].dtype == np.int64
    assert sorted(np.unique(d['y']).tolist()) == list(range(10))
    assert sorted(np.unique(d['y_test']).tolist()) == list(range(10))
    # the generator is deterministic and the cache holds exactly what it generates
    cached = example.load_standard_split(data_dir, verbose=False)
    for k in ('x', 'y', 'x_test', 'y_test'):
        assert np.array_equal(cached[k], d[k]), k
    # normalised as the package does it (whole set: mean 0, std 1)
    xs = np.concatenate([d['x'], d['x_test']])
    assert abs(xs.mean()) < 1e-3 and abs(xs.std() - 1) < 1e-3


def test_example_file_name_does_not_shadow_the_package():
    # examples/ is on sys.path (the example imports common.py), and the example is mnist1d.py
    sys.modules['mnist1d'] = example
    try:
        get_args, make = example._mnist1d_package()
        assert 'num_samples' in get_args(as_dict=True)
    finally:
        del sys.modules['mnist1d']


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('argv, k_pos, k_neg, pnb', [
    ([], 2, 2, 0.25),                                        # the paper's method
    (['--variant', 'ST'], 1, 0, 0.0),                        # PNB undefined: default switched off
    (['--variant', 'dt'], 1, 1, 0.25),
    (['--variant', 'SCF', '--K', '3'], 3, 0, 0.0),
    (['--variant', 'CF', '--K', '4', '--pnb', '0'], 4, 4, 0.0),
    (['--neuron', 'lif', '--lif-reset', 'hard'], 1, 0, 0.0),
])
def test_variant_arguments(argv, k_pos, k_neg, pnb):
    args = example.parse_args(argv)
    assert (args.k_pos, args.k_neg, args.pnb) == (k_pos, k_neg, pnb)


@pytest.mark.parametrize('argv, message', [
    (['--variant', 'SCF', '--pnb', '0.25'], 'needs negative levels'),
    (['--neuron', 'lif', '--pnb', '0.1'], 'defined for CF layers only'),
    (['--neuron', 'lif', '--variant', 'CF'], 'use them with --neuron cf'),
    (['--K', '0'], '--K must be >= 1'),
    (['--width', '0'], '--width must be >= 1'),
    (['--lif-reset', 'hard'], 'LIF option'),
    (['--k-pos', '3'], '--variant and --K'),
    (['--epochs', '0'], '--epochs must be >= 1'),
])
def test_bad_arguments_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        example.parse_args(argv)


@pytest.mark.parametrize('argv', [['--variant', 'XT'], ['--pool', 'min'], ['--surrogate', 'relu'],
                                  ['--lif-reset', 'none']])
def test_unknown_choices_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert 'invalid choice' in capsys.readouterr().err


def test_model_shapes_and_lif_reset():
    args = example.parse_args(['--neuron', 'lif', '--lif-reset', 'hard', '--width', '3', '--pool', 'avg'])
    net = example.build_model(args)
    out = net(example.to_input(torch.randn(5, 1, 40), args))
    assert out.shape == (4, 5, 10)
    nodes = [m for m in net.modules() if type(m).__name__ == 'LIFNode']
    assert len(nodes) == 3 and all(m.v_reset == 0.0 for m in nodes)
    assert any(type(m).__name__ == 'AvgPool1d' for m in net.modules())
    with pytest.raises(ValueError, match='pool'):
        example.Conv1dSNN(4, type(nodes[0]), pool='min')


# ----------------------------------------------------------------------------------------------
# diagnostics: the numbers behind the explanation
# ----------------------------------------------------------------------------------------------
def test_surrogate_derivative_is_the_rect_window_of_each_level():
    from spikingjelly_cf import CFNode, CFRect
    h = torch.tensor([[0.0, 0.49, 0.6, 1.2, 1.6, 2.4, 2.6, -0.6, -1.4, -2.6]])
    cf = CFNode(k_pos=2, k_neg=2, surrogate_function=CFRect(), step_mode='m')
    g = example.surrogate_derivative(cf, h)
    assert g.tolist() == [[0., 0., 1., 1., 1., 1., 0., 1., 1., 0.]]     # dead zone |h| < 1/2, and beyond 5/2
    scf = CFNode(k_pos=2, k_neg=0, surrogate_function=CFRect(), step_mode='m')
    assert example.surrogate_derivative(scf, h).tolist() == [[0., 0., 1., 1., 1., 1., 0., 0., 0., 0.]]
    lif = example.common.LIFNode(tau=4 / 3, decay_input=False, v_threshold=1.0, v_reset=None,
                         surrogate_function=CFRect(), step_mode='m')
    assert example.surrogate_derivative(lif, h).tolist() == [[0., 0., 1., 1., 0., 0., 0., 0., 0., 0.]]


def test_pool_diagnostics_count_dropped_negative_spikes():
    args = example.parse_args(['--surrogate', 'rect', '--pnb', '0', '--width', '2'])
    net = example.build_model(args)
    diag = example.Diagnostics(net, steps_per_epoch=1, every=1)
    try:
        diag._current = {'pool': {}}
        pool = torch.nn.MaxPool1d(2)
        x = torch.tensor([[[-1., 0., -1., -2., 1., -1., 2., 1.]]])   # windows (-1,0) (-1,-2) (1,-1) (2,1)
        diag._pool_hook('p')(pool, (x,), pool(x))                     # max: 0, -1, 1, 2
        r = diag._current['pool']['p']
        assert r['neg_share_in'] == pytest.approx(5 / 9)
        assert r['neg_share_out'] == pytest.approx(1 / 4)
        assert r['neg_dropped'] == pytest.approx(2 / 3)                # of the 3 windows with a negative spike
        assert r['windows_with_neg'] == pytest.approx(3 / 4)
    finally:
        diag.remove()
    assert all(not m.store_h_seq for m in example.common.spiking_layers(net).values())


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------
def test_smoke_grid(data_dir, tmp_path, monkeypatch):
    """The study's smallest grid end to end (in-process): JSON, table, plot, diagnostics; resumable."""
    out = str(tmp_path / 'study')
    results = study.run_study('smoke', out_dir=out, runs_dir=str(tmp_path / 'runs'), data_dir=data_dir,
                              progress=False)
    assert [(r['cell'], r['seed']) for r in results['runs']] == [('LIF soft', 0), ('CF', 0)]
    for name in ('accuracy_study.json', 'accuracy_study.md', 'accuracy_study.png',
                 'accuracy_study_diagnostics.md', 'accuracy_study_diagnostics.png', 'accuracy_study_diagnostics.json'):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, 'accuracy_study.json')) as f:
        stored = json.load(f)
    assert stored['grid'] == 'smoke' and len(stored['runs']) == 2
    for r in stored['runs']:
        assert 0. <= r['test_acc'] <= 1. and r['epochs'] == 1
    table = open(os.path.join(out, 'accuracy_study.md')).read()
    assert '| LIF soft |' in table and '| CF |' in table and 'mean ± std' in table
    diag = {r['cell']: r['diagnostics']['epochs'][-1] for r in stored['runs']}
    for cell, d in diag.items():
        for layer in d['spiking'].values():
            assert 0. <= layer['zero_grad_fraction'] <= 1.
            assert sum(layer['level_fractions'].values()) == pytest.approx(1.)
        assert d['grad_norm'] and all(v > 0 for v in d['grad_norm'].values())
    # LIF has no negative spikes; CF's levels are -2..2 and max-pooling loses negative spike mass
    assert all(p['neg_share_in'] == 0. for p in diag['LIF soft']['pool'].values())
    assert set(next(iter(diag['CF']['spiking'].values()))['level_fractions']) == {'-2', '-1', '0', '1', '2'}
    assert all(p['neg_share_out'] < p['neg_share_in'] for p in diag['CF']['pool'].values())

    # resumable: a second call runs nothing and rewrites the same table
    def fail(*args, **kwargs):
        raise AssertionError('a finished cell was run again')
    monkeypatch.setattr(study, '_run_in_process', fail)
    again = study.run_study('smoke', out_dir=out, runs_dir=str(tmp_path / 'runs'), data_dir=data_dir,
                            progress=False)
    assert [r['test_acc'] for r in again['runs']] == [r['test_acc'] for r in stored['runs']]


def test_results_name_paths_relative_to_the_repository():
    argv = study.run_argv(study.GRIDS['core'][0][0], 1, [], os.path.join(ROOT, 'runs', 'x'),
                          os.path.join(ROOT, 'data', 'mnist1d'))
    assert argv[argv.index('--out-dir') + 1] == os.path.join('runs', 'x', 'LIF_soft', 'seed1')
    assert argv[argv.index('--data-dir') + 1] == os.path.join('data', 'mnist1d')
    assert study._absolute(argv)[argv.index('--out-dir') + 1] == os.path.join(ROOT, 'runs', 'x', 'LIF_soft', 'seed1')


def test_study_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='grid must be one of'):
        study.run_study('huge', out_dir=str(tmp_path))
    with pytest.raises(ValueError, match='not in grid'):
        study.run_study('smoke', out_dir=str(tmp_path), cells=['XYZ'])
    with pytest.raises(ValueError, match='jobs must be a positive int'):
        study.run_study('smoke', out_dir=str(tmp_path), jobs=0)
    with pytest.raises(SystemExit):
        study.main(['--grid', 'nope'])


def test_grids_hold_the_issue_cells():
    names = {c['name'] for c in study.GRIDS['core'][0]}
    assert {'LIF soft', 'LIF hard', 'ST', 'DT', 'SCF', 'CF', 'CF+TSG', 'CF+TSG+PNB', 'CF, avg pool'} <= names
    assert len(study.GRIDS['core'][1]) >= 3 and len(study.GRIDS['full'][1]) >= 3
    full = study.GRIDS['full'][0]
    full_names = [c['name'] for c in full]
    assert len(set(full_names)) == len(full_names) and set(full_names) >= names | {'LIF+TSG', 'CF K=4', 'CF, T=8'}
    for cell in full:   # every cell is a valid command line of the example
        example.parse_args(cell['argv'])


# ----------------------------------------------------------------------------------------------
# the accuracy claim (the one expensive test: ~35 s of CPU)
# ----------------------------------------------------------------------------------------------
SUMMARY_KEYS = {'task', 'arch', 'neuron', 'T', 'test_acc', 'best_test_acc', 'best_epoch', 'train_acc', 'epochs',
                'train_samples', 'test_samples', 'parameters', 'seconds_total', 'versions', 'history', 'setting',
                'figures'}
HISTORY_KEYS = {'epoch', 'train_loss', 'train_ce', 'train_pnb', 'train_acc', 'test_loss', 'test_acc',
                'spikes_per_neuron_step', 'lr', 'seconds'}


@pytest.mark.one_pass  # 30-40 s; the smoke grid runs the example on every pass
def test_defaults_reach_80_percent(data_dir, tmp_path):
    """The example's defaults (CF + TSG + PNB 0.25, Adam) with 5 instead of 10 epochs: >= 80 %
    (seed 0 reaches 85.0 %, seed 1 88.0 %; 4 epochs give 81.3 % for seed 0, too close to the bar);
    the summary.json schema."""
    out = str(tmp_path / 'run')
    summary = _run(['--epochs', '5', '--data-dir', data_dir, '--out-dir', out, '--no-progress', '--threads', '1',
                    '--no-analysis'])
    assert summary['test_acc'] >= 0.80, summary['test_acc']
    with open(os.path.join(out, 'summary.json')) as f:
        stored = json.load(f)
    assert SUMMARY_KEYS <= set(stored), SUMMARY_KEYS - set(stored)
    assert stored['task'] == 'mnist1d' and stored['train_samples'] == 4000 and stored['test_samples'] == 1000
    assert len(stored['history']) == 5 and all(HISTORY_KEYS <= set(h) for h in stored['history'])
    assert stored['test_acc'] == stored['history'][-1]['test_acc']
    s = stored['setting']
    assert (s['neuron'], s['variant'], s['k_pos'], s['k_neg'], s['surrogate'], s['pnb'], s['pool']) == \
        ('cf', 'CF', 2, 2, 'tsg', 0.25, 'max')
    assert stored['history'][-1]['train_pnb'] > 0     # the PNB term was on
