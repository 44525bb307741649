"""End-to-end tests of the examples (tiny settings, CPU).

The DVS tests read the built-in synthetic gesture set through SpikingJelly's ``DVS128Gesture``;
with SpikingJelly 2.0.0 ``spikingjelly.datasets`` cannot be imported (it needs torchaudio), so
they skip there. ``examples/cifar10.py --fake-data`` runs under both lines.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from spikingjelly_cf import _compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, 'examples')


def _datasets_importable():
    """Skip only for the known case: SpikingJelly 2.x, whose ``spikingjelly.datasets`` imports
    torchaudio, without torchaudio installed. Any other import error fails the module."""
    try:
        import spikingjelly.datasets.dvs128_gesture  # noqa: F401
        return True, ''
    except ModuleNotFoundError as e:
        from spikingjelly_cf._compat import CLASSIC
        if e.name == 'torchaudio' and not CLASSIC:
            return False, f'{type(e).__name__}: {e}'
        raise


_OK, _WHY = _datasets_importable()
needs_datasets = pytest.mark.skipif(
    not _OK, reason=f'spikingjelly.datasets cannot be imported with this SpikingJelly ({_WHY}); '
                    f'the DVS example needs it (SpikingJelly 0.0.0.0.14)')

# tiny settings: 8 + 4 samples per class, T=4, width 4, 5 epochs of 22 steps (about 10 s of CPU per run;
# test accuracy 39-59 % over seeds 0-2, chance is 1/11)
EPOCHS = 5
TINY = ['-T', '4', '--width', '4', '-b', '4', '--lr', '0.05', '--epochs', str(EPOCHS), '--synthetic-train', '8',
        '--synthetic-test', '4', '--no-progress', '--threads', '1']


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f'example_{name}', os.path.join(EXAMPLES, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_in_process(name, argv):
    """Run an example's ``main(argv)`` here (no interpreter start-up); torch's thread count is restored."""
    threads = torch.get_num_threads()
    try:
        return _load_example(name).main(argv)
    finally:
        torch.set_num_threads(threads)


def _env():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in [ROOT] + sys.path if p)
    env['OMP_NUM_THREADS'] = '1'
    return env


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('synthetic_gesture'))


@pytest.fixture(scope='module')
def reference_run(data_root, tmp_path_factory):
    """An uninterrupted tiny run (also the reference of the resume test)."""
    out = str(tmp_path_factory.mktemp('run_full'))
    summary = _run_in_process('dvs_gesture', TINY + ['--synthetic-root', data_root, '--out-dir', out])
    return out, summary


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@needs_datasets
def test_dvs_gesture_end_to_end(reference_run):
    out, summary = reference_run
    for name in ('args.json', 'summary.json', 'curves.png', 'tsg_alpha.png', 'potentials.png',
                 'checkpoints/latest.pt', 'checkpoints/best.pt'):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, 'tensorboard'))
    with open(os.path.join(out, 'summary.json')) as f:
        saved = json.load(f)
    assert saved['test_samples'] == 44 and saved['train_samples'] == 88
    assert len(saved['history']) == EPOCHS
    # chance is 1/11: the tiny run must clearly beat it
    assert saved['best_test_acc'] > 2 / 11, saved['history']
    assert saved['train_acc'] > 2 / 11
    # energy table, spike levels of every CF layer (levels -2..2), TSG alphas, potentials
    assert saved['energy']['total']['sops'] > 0
    assert len(saved['energy']['layers']) == 9           # 8 convolutions + the read-out
    assert len(saved['spike_levels']) == 8
    assert all(set(map(int, h)) == {-2, -1, 0, 1, 2} for h in saved['spike_levels'].values())
    assert len(saved['tsg_alpha']) == 8 and all(len(a) == 4 for a in saved['tsg_alpha'].values())
    assert all(sum(p['counts']) > 0 for p in saved['potentials'].values())
    ckpt = _state(os.path.join(out, 'checkpoints', 'latest.pt'))
    for key in ('model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'best_acc', 'rng'):
        assert key in ckpt
    assert ckpt['epoch'] == EPOCHS


@needs_datasets
def test_dvs_gesture_resume_equals_uninterrupted(reference_run, data_root, tmp_path):
    full, _ = reference_run
    out = str(tmp_path / 'run_resumed')
    args = TINY + ['--synthetic-root', data_root, '--out-dir', out]
    _run_in_process('dvs_gesture', args + ['--stop-after', '2'])
    assert _state(os.path.join(out, 'checkpoints', 'latest.pt'))['epoch'] == 2
    assert not os.path.exists(os.path.join(out, 'summary.json'))
    _run_in_process('dvs_gesture', args + ['--resume'])
    a = _state(os.path.join(full, 'checkpoints', 'latest.pt'))
    b = _state(os.path.join(out, 'checkpoints', 'latest.pt'))
    assert a['epoch'] == b['epoch'] == EPOCHS
    assert a['model'].keys() == b['model'].keys()
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['momentum_buffer'], sb['momentum_buffer'])
    assert [h['test_acc'] for h in a['history']] == [h['test_acc'] for h in b['history']]


@needs_datasets
def test_dvs_gesture_noise_evaluation(reference_run, data_root, tmp_path):
    full, summary = reference_run
    out = str(tmp_path / 'robustness')
    report = _run_in_process('dvs_gesture', [
        '--eval-only', '--checkpoint', os.path.join(full, 'checkpoints', 'latest.pt'),
        '--noise', 'uniform', 'salt_pepper', 'gaussian', '--noise-levels', '0', '0.5',
        '--synthetic-root', data_root,
        '--out-dir', out, '--no-progress', '--threads', '1'])
    assert os.path.isfile(os.path.join(out, 'robustness.json'))
    assert os.path.isfile(os.path.join(out, 'robustness.png'))
    assert set(report['robustness']) == {'uniform', 'salt_pepper', 'gaussian'}
    assert report['test_acc'] == pytest.approx(summary['test_acc'])
    for rows in report['robustness'].values():
        assert [r['level'] for r in rows] == [0.0, 0.5]
        assert rows[0]['acc'] == pytest.approx(report['test_acc'])   # level 0 = no noise


@needs_datasets
def test_dvs_gesture_torchrun_two_processes(data_root, reference_run, tmp_path):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(EXAMPLES, 'dvs_gesture.py')] + TINY[:-2] + [
           '--epochs', '1', '--synthetic-root', data_root, '--out-dir', out, '--no-analysis']
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '2 process(es)' in proc.stdout
    with open(os.path.join(out, 'summary.json')) as f:
        saved = json.load(f)
    assert saved['processes'] == 2
    assert len(saved['history']) == 1
    # metrics are reduced over both ranks: accuracies are multiples of 1/44 (the whole test set)
    assert abs(saved['test_acc'] * 44 - round(saved['test_acc'] * 44)) < 1e-6
    assert os.path.isfile(os.path.join(out, 'checkpoints', 'latest.pt'))


def test_cifar10_fake_data_one_epoch(tmp_path):
    out = str(tmp_path / 'cifar')
    cmd = [sys.executable, os.path.join(EXAMPLES, 'cifar10.py'), '--fake-data', '--fake-train-size', '8',
           '--fake-test-size', '8', '-T', '1', '-b', '8', '--epochs', '1', '--out-dir', out, '--no-progress']
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, 'summary.json')) as f:
        saved = json.load(f)
    assert saved['arch'] == 'resnet18' and saved['T'] == 1
    assert saved['train_samples'] == 8 and saved['test_samples'] == 8
    assert len(saved['spike_levels']) > 0 and saved['energy']['total']['flops'] > 0
    assert os.path.isfile(os.path.join(out, 'checkpoints', 'latest.pt'))


@needs_datasets
def test_dvs_interrupted_integration_is_rebuilt(tmp_path):
    """A frames folder left by an interrupted integration is rebuilt: one with missing files, or one
    beside SpikingJelly 2.0's ``.building`` marker (2.0 refuses to start while the marker exists)."""
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture
    from spikingjelly_cf.datasets import synthetic_gesture as sg
    dvs = _load_example('dvs_gesture')
    root = str(tmp_path / 'set')
    sg.write_synthetic_gesture(root, n_train_per_class=1, n_test_per_class=1, events=(300, 400), n_steps=16)
    frames = dvs._frames_dir(root, 3)
    n_events = dvs._count_files(os.path.join(root, 'events_np'))
    sets = dvs._integrate(root, 3, DVS128Gesture, verbose=False)
    assert len(sets['train']) == len(sets['test']) == 11 and dvs._count_files(frames) == n_events
    victim = os.path.join(frames, 'train', '0', os.listdir(os.path.join(frames, 'train', '0'))[0])
    # 1. a file missing: rebuilt
    os.remove(victim)
    dvs._integrate(root, 3, DVS128Gesture, verbose=False)
    assert os.path.isfile(victim) and dvs._count_files(frames) == n_events
    # 2. the folder complete but 2.0's marker left beside it: rebuilt, marker gone
    open(frames + '.building', 'w').close()
    os.utime(victim, ns=(1, 1))
    sets = dvs._integrate(root, 3, DVS128Gesture, verbose=False)
    assert not os.path.exists(frames + '.building')
    assert os.stat(victim).st_mtime_ns != 1 and dvs._count_files(frames) == n_events
    x, target = sets['train'][0]
    assert x.shape == (3, 2, 128, 128) and 0 <= target < 11


@needs_datasets
@pytest.mark.skipif(not _compat.CLASSIC, reason='SpikingJelly 2.0 collects its workers\' errors itself')
def test_dvs_lost_integration_worker_is_redone(tmp_path, monkeypatch):
    """SpikingJelly 0.0.0.0.14 drops the exception of a failing integration thread, leaving a
    frames file (here a whole class folder) out; the example integrates what is missing again."""
    import threading
    from spikingjelly import datasets as sjds
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture
    from spikingjelly_cf.datasets import synthetic_gesture as sg
    dvs = _load_example('dvs_gesture')
    root = str(tmp_path / 'set')
    sg.write_synthetic_gesture(root, n_train_per_class=1, n_test_per_class=1, events=(300, 400), n_steps=16)
    real, calls = sjds.integrate_events_file_to_frames_file_by_fixed_frames_number, []

    def flaky(loader, events_np_file, output_dir, *args, **kwargs):
        calls.append((events_np_file, threading.current_thread() is threading.main_thread()))
        if os.sep + os.path.join('train', '10') + os.sep in events_np_file and not calls[-1][1]:
            raise OSError('simulated lost worker')
        return real(loader, events_np_file, output_dir, *args, **kwargs)

    monkeypatch.setattr(sjds, 'integrate_events_file_to_frames_file_by_fixed_frames_number', flaky)
    sets = dvs._integrate(root, 3, DVS128Gesture, verbose=False)
    redone = [f for f, main in calls if main]
    assert len(redone) == 1 and os.sep + os.path.join('train', '10') + os.sep in redone[0]
    assert len(sets['train']) == len(sets['test']) == 11
    assert dvs._count_files(dvs._frames_dir(root, 3)) == dvs._count_files(os.path.join(root, 'events_np'))
    assert sorted(int(t) for _, t in sets['train'].samples) == list(range(11))
    # a persistent failure is not hidden: the real error comes out of the serial pass
    monkeypatch.setattr(sjds, 'integrate_events_file_to_frames_file_by_fixed_frames_number',
                        lambda *a, **k: (_ for _ in ()).throw(OSError('disk on fire')))
    root2 = str(tmp_path / 'set2')
    sg.write_synthetic_gesture(root2, n_train_per_class=1, n_test_per_class=1, events=(300, 400), n_steps=16)
    with pytest.raises(OSError, match='disk on fire'):
        dvs._integrate(root2, 3, DVS128Gesture, verbose=False)


@pytest.mark.skipif(not _compat.CLASSIC,
                    reason='one pass is enough: compiling the whole network takes about 2 minutes of '
                           'CPU; the SpikingJelly 0.0.0.0.14 pass runs it (tests/test_compile.py '
                           'covers the CF node under torch.compile on both lines)')
def test_dvs_gesture_compile_one_epoch(data_root, tmp_path):
    """``--compile``: one epoch with the whole model through ``torch.compile`` trains, and its
    first step's loss is the eager run's.

    The default backend: the fused ``cpp`` kernel is a ``torch.library`` op inside the graph.
    """
    args = TINY[:TINY.index('--epochs')] + ['--epochs', '1'] + TINY[TINY.index('--epochs') + 2:] + [
        '--synthetic-root', data_root, '--no-analysis']
    eager = _run_in_process('dvs_gesture', args + ['--out-dir', str(tmp_path / 'eager')])
    compiled = _run_in_process('dvs_gesture', args + ['--out-dir', str(tmp_path / 'compiled'),
                                                      '--compile'])
    e, c = eager['history'][0], compiled['history'][0]
    # Same weights, same first batch: the compiled graph computes the same numbers up to the
    # rounding of Inductor's fused kernels (~1e-6 relative); a spike whose potential sits within
    # that rounding of a level could flip and move the loss by ~1e-4, hence 1e-3.
    assert c['train_first_step_loss'] == pytest.approx(e['train_first_step_loss'], rel=1e-3)
    # it trains: 22 optimiser steps, finite losses, and the epoch's mean loss stays near eager's
    # (the two runs may drift apart after the first step, by rounding, but not far in one epoch)
    assert math.isfinite(c['train_loss']) and math.isfinite(c['test_loss'])
    assert c['train_loss'] == pytest.approx(e['train_loss'], rel=0.05)
    a = _state(os.path.join(str(tmp_path / 'eager'), 'checkpoints', 'latest.pt'))['model']
    b = _state(os.path.join(str(tmp_path / 'compiled'), 'checkpoints', 'latest.pt'))['model']
    assert a.keys() == b.keys()   # the checkpoint holds the plain model, not the compiled wrapper


@needs_datasets
def test_dvs_gesture_lif_with_tsg(data_root, tmp_path):
    """``--neuron lif --surrogate tsg``: SpikingJelly's own LIFNode runs TSG (it counts the steps,
    no subclass needed in training) and every layer learns a_t at every step."""
    out = str(tmp_path / 'lif')
    args = TINY[:TINY.index('--epochs')] + ['--epochs', '1'] + TINY[TINY.index('--epochs') + 2:]
    summary = _run_in_process('dvs_gesture', args + ['--synthetic-root', data_root, '--out-dir', out,
                                                     '--neuron', 'lif', '--surrogate', 'tsg', '--pnb', '0'])
    alphas = summary['tsg_alpha']
    assert alphas and all(len(a) == 4 for a in alphas.values())
    moved = {name: [abs(a_t - 2.0) > 1e-6 for a_t in a] for name, a in alphas.items()}
    assert all(all(steps) for steps in moved.values()), f'a_t that never trained: {moved}'
    assert math.isfinite(summary['test_acc'])
