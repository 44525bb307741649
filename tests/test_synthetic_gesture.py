"""Tests of the synthetic DVS128 Gesture generator (spikingjelly_cf.datasets.synthetic_gesture)."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from spikingjelly_cf.datasets import synthetic_gesture as sg

TINY = dict(n_train_per_class=2, n_test_per_class=1, events=(1500, 3000), n_steps=32)


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synthetic_gesture') / 'DVS128Gesture')
    assert sg.write_synthetic_gesture(root, seed=0, **TINY) == root
    return root


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _marker(root):
    with open(os.path.join(root, sg.MARKER)) as f:
        return json.load(f)


def _samples(root):
    for split in ('train', 'test'):
        for label in range(sg.NUM_CLASSES):
            d = os.path.join(root, 'events_np', split, str(label))
            for name in sorted(os.listdir(d)):
                yield split, label, os.path.join(d, name)


# ------------------------------------------------------------------------------------------
# layout, dtypes, ranges, determinism, cache
# ------------------------------------------------------------------------------------------

def test_layout_dtypes_ranges(tiny_root):
    assert sorted(os.listdir(tiny_root)) == ['events_np', sg.MARKER]
    assert sorted(os.listdir(os.path.join(tiny_root, 'events_np'))) == ['test', 'train']
    for split, n in (('train', 2), ('test', 1)):
        d = os.path.join(tiny_root, 'events_np', split)
        assert sorted(os.listdir(d), key=int) == [str(i) for i in range(11)]
        for label in range(11):
            assert len(os.listdir(os.path.join(d, str(label)))) == n
    n_files = 0
    for split, label, path in _samples(tiny_root):
        assert path.endswith('.npz')
        ev = _load(path)
        assert sorted(ev) == ['p', 't', 'x', 'y']
        n = ev['t'].size
        assert 1500 <= n <= 3000
        for k in 'txyp':
            assert ev[k].dtype == np.int64 and ev[k].shape == (n,)
        assert np.all(np.diff(ev['t']) >= 0) and ev['t'][0] >= 0
        assert 0.9e6 <= ev['t'][-1] - ev['t'][0] <= 2.0e6
        assert ev['x'].min() >= 0 and ev['x'].max() <= 127
        assert ev['y'].min() >= 0 and ev['y'].max() <= 127
        assert set(np.unique(ev['p'])) == {0, 1}
        assert 0.2 < ev['p'].mean() < 0.8
        n_files += 1
    assert n_files == 33
    meta = _marker(tiny_root)
    assert meta['complete'] is True and meta['seed'] == 0 and meta['n_files'] == 33
    assert meta['version'] == sg.VERSION
    assert sg.is_complete(tiny_root)


def test_default_sample_is_dvs_like():
    for label in (0, 4, 9):
        ev = sg.generate_sample(label, sg._sample_rng(0, 'train', label, 0))
        assert 20000 <= ev['t'].size <= 40000
        # events concentrate on the blobs' paths: the busiest quarter of the pixels holds most
        counts = np.sort(np.bincount(ev['y'] * 128 + ev['x'], minlength=128 * 128))[::-1]
        assert counts[:4096].sum() > 0.75 * ev['t'].size


def test_determinism(tiny_root, tmp_path):
    a = sg.generate_sample(4, sg._sample_rng(3, 'train', 4, 7))
    b = sg.generate_sample(4, sg._sample_rng(3, 'train', 4, 7))
    c = sg.generate_sample(4, sg._sample_rng(4, 'train', 4, 7))
    for k in 'txyp':
        assert np.array_equal(a[k], b[k])
    assert a['t'].size != c['t'].size or not np.array_equal(a['x'], c['x'])
    # same seed, other sizes: the shared samples are identical; another seed differs
    same = sg.write_synthetic_gesture(str(tmp_path / 'same'), seed=0, **dict(TINY, n_train_per_class=1))
    other = sg.write_synthetic_gesture(str(tmp_path / 'other'), seed=1, **TINY)
    n_diff = 0
    for split, label, path in _samples(same):
        rel = os.path.relpath(path, same)
        x, y, z = _load(path), _load(os.path.join(tiny_root, rel)), _load(os.path.join(other, rel))
        for k in 'txyp':
            assert np.array_equal(x[k], y[k])
        n_diff += x['t'].size != z['t'].size or not np.array_equal(x['t'], z['t'])
    assert n_diff == 22


def test_cache_and_rewrite(tmp_path):
    root = str(tmp_path / 'r')
    kw = dict(TINY, n_train_per_class=1, events=(500, 800))
    sg.write_synthetic_gesture(root, seed=0, **kw)
    probe = os.path.join(root, 'events_np', 'train', '0', 'synth_0_0.npz')
    os.utime(probe, ns=(1, 1))                           # a rewrite would reset this
    sg.write_synthetic_gesture(root, seed=0, **kw)       # complete and matching: nothing done
    assert os.stat(probe).st_mtime_ns == 1
    # stale SpikingJelly frames must go when the events change
    os.makedirs(os.path.join(root, 'frames_number_8_split_by_number', 'train'))
    sg.write_synthetic_gesture(root, seed=1, **kw)
    assert os.stat(probe).st_mtime_ns != 1
    assert not os.path.exists(os.path.join(root, 'frames_number_8_split_by_number'))
    assert _marker(root)['seed'] == 1
    # a missing file makes the set incomplete -> rewritten
    os.remove(probe)
    assert not sg.is_complete(root)
    sg.write_synthetic_gesture(root, seed=1, **kw)
    assert os.path.exists(probe) and sg.is_complete(root)
    # an interrupted write (pending marker) is redone
    meta = _marker(root)
    with open(os.path.join(root, sg.MARKER), 'w') as f:
        json.dump(dict(meta, complete=False), f)
    os.utime(probe, ns=(1, 1))
    sg.write_synthetic_gesture(root, seed=1, **kw)
    assert os.stat(probe).st_mtime_ns != 1 and sg.is_complete(root)
    # a foreign events_np (e.g. the real dataset) is never replaced silently
    foreign = tmp_path / 'real'
    (foreign / 'events_np' / 'train' / '0').mkdir(parents=True)
    with pytest.raises(FileExistsError):
        sg.write_synthetic_gesture(str(foreign), **kw)
    assert (foreign / 'events_np' / 'train' / '0').is_dir()
    with pytest.raises(ValueError):
        sg.write_synthetic_gesture(str(tmp_path / 'empty'), n_train_per_class=0)


def test_command_line(tmp_path):
    root = str(tmp_path / 'cli')
    assert sg.main([root, '--train', '1', '--test', '1', '--events', '300', '400', '--steps', '16',
                    '--frames', '3']) == 0
    assert sg.is_complete(root)
    assert len(os.listdir(os.path.join(root, 'frames_number_3_split_by_number', 'test', '10'))) == 1


# ------------------------------------------------------------------------------------------
# SpikingJelly's own loader
# ------------------------------------------------------------------------------------------

def _dvs128gesture():
    mod = pytest.importorskip('spikingjelly.datasets.dvs128_gesture')
    return mod.DVS128Gesture


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


@pytest.fixture(scope='module')
def sj_root(tiny_root, tmp_path_factory):
    """A copy of the tiny set for SpikingJelly's loader, which writes frame folders beside
    ``events_np``: the tests that read ``tiny_root`` see it as written, in any order."""
    root = str(tmp_path_factory.mktemp('sj_loader') / 'DVS128Gesture')
    shutil.copytree(tiny_root, root)
    return root


@pytest.fixture(scope='module')
def sj_frames(sj_root):
    """SpikingJelly integrates the tiny set itself (T=4, split_by number)."""
    DVS128Gesture = _dvs128gesture()
    from spikingjelly import configure
    threads = configure.max_threads_number_for_datasets_preprocess
    configure.max_threads_number_for_datasets_preprocess = 2     # its default 16 only thrashes here
    try:
        try:
            _quiet(DVS128Gesture, sj_root, train=True, data_type='frame', frames_number=4, split_by='number')
        except FileNotFoundError:   # a class left empty by a lost 0.0.0.0.14 worker: redone below
            pass
        sg.redo_missing_frames(sj_root, 4, DVS128Gesture)
        return {train: _quiet(DVS128Gesture, sj_root, train=train, data_type='frame', frames_number=4,
                              split_by='number') for train in (True, False)}
    finally:
        configure.max_threads_number_for_datasets_preprocess = threads


def test_spikingjelly_loader_frames(sj_root, sj_frames):
    train, test = sj_frames[True], sj_frames[False]
    assert len(train) == 22 and len(test) == 11
    # no download / extract folders: events_np made SpikingJelly skip them
    assert not os.path.exists(os.path.join(sj_root, 'download'))
    assert not os.path.exists(os.path.join(sj_root, 'extract'))
    assert os.path.isdir(os.path.join(sj_root, 'frames_number_4_split_by_number'))
    seen = set()
    for ds, split in ((train, 'train'), (test, 'test')):
        for i in range(len(ds)):
            frames, target = ds[i]
            path = ds.samples[i][0]
            label = sg.loader_target_to_label(target)
            assert os.path.basename(os.path.dirname(path)) == str(label)
            assert sg.LOADER_CLASS_NAMES[target] == sg.CLASS_NAMES[label]
            assert frames.shape == (4, 2, 128, 128) and frames.dtype == np.float32
            ev = _load(path.replace('frames_number_4_split_by_number', 'events_np'))
            assert frames.sum() == ev['t'].size
            assert frames[:, 1].sum() == ev['p'].sum()
            seen.add((split, label))
    assert len(seen) == 22
    # folder '10' sorts before '2': the loader's targets follow string order
    assert sg.loader_target_to_label(2) == 10 and sg.loader_target_to_label(3) == 2


def test_spikingjelly_loader_events(sj_root):
    DVS128Gesture = _dvs128gesture()
    ds = _quiet(DVS128Gesture, sj_root, train=False, data_type='event')
    ev, target = ds[0]
    assert sorted(ev.keys()) == ['p', 't', 'x', 'y'] and target == 0


def test_integrate_frames_equals_spikingjelly(tiny_root, sj_root, sj_frames, tmp_path):
    sjds = pytest.importorskip('spikingjelly.datasets')
    # per-sample function against SpikingJelly's, including fewer events than frames
    for _, _, path in list(_samples(tiny_root))[:5]:
        ev = _load(path)
        for T in (1, 4, 7):
            ref = sjds.integrate_events_by_fixed_frames_number(ev, 'number', T, 128, 128)
            assert np.array_equal(sg.frames_by_number(ev, T), ref)
    short = {k: v[:3] for k, v in ev.items()}
    assert np.array_equal(sg.frames_by_number(short, 5),
                          sjds.integrate_events_by_fixed_frames_number(short, 'number', 5, 128, 128))
    # the folder it writes loads through DVS128Gesture with SpikingJelly's values
    root = str(tmp_path / 'copy')
    shutil.copytree(os.path.join(tiny_root, 'events_np'), os.path.join(root, 'events_np'))
    out = sg.integrate_frames(root, 4)
    assert out == os.path.join(root, 'frames_number_4_split_by_number')
    ours = _quiet(_dvs128gesture(), root, train=True, data_type='frame', frames_number=4, split_by='number')
    ref = sj_frames[True]
    assert [os.path.relpath(p, root) for p, _ in ours.samples] == \
        [os.path.relpath(p, sj_root) for p, _ in ref.samples]
    for i in range(len(ours)):
        (a, ta), (b, tb) = ours[i], ref[i]
        assert ta == tb and a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
    # complete: left alone; incomplete: rebuilt
    victim = os.path.join(out, 'test', '5', 'synth_5_0.npz')
    os.utime(victim, ns=(1, 1))
    sg.integrate_frames(root, 4)
    assert os.stat(victim).st_mtime_ns == 1
    os.remove(os.path.join(out, 'train', '0', 'synth_0_0.npz'))
    sg.integrate_frames(root, 4)
    assert os.path.exists(os.path.join(out, 'train', '0', 'synth_0_0.npz'))
    assert os.stat(victim).st_mtime_ns != 1


# ------------------------------------------------------------------------------------------
# time matters
# ------------------------------------------------------------------------------------------

def _binned(ev, T=16, D=32):
    """Frames as SpikingJelly integrates them (split_by number), sum-pooled to DxD, per event."""
    f = sg.frames_by_number(ev, T).reshape(T, 2, D, 128 // D, D, 128 // D).sum(axis=(3, 5))
    return f.astype(np.float32) / ev['t'].size


def _motion_features(f):
    """Per-time-bin motion read off the frame sequence f [T, 2, D, D] (OFF, ON).

    In each bin: d = ON centroid - OFF centroid (the direction of motion: ON at the leading edge),
    m = bin centroid - sample centroid; features are the bin means of d, of the rotation m x d,
    plus per bin the ON fraction and the mean radius of ON minus OFF events (expansion).
    """
    T, _, D, _ = f.shape
    yy, xx = np.mgrid[0:D, 0:D].astype(np.float64)
    tot = f.sum(axis=(0, 1))
    c = np.array([(tot * xx).sum(), (tot * yy).sum()]) / max(tot.sum(), 1e-12)
    r = np.hypot(xx - c[0], yy - c[1])
    out = []
    for k in range(T):
        w_off, w_on = f[k, 0], f[k, 1]
        w = w_off + w_on
        cen = lambda a: np.array([(a * xx).sum(), (a * yy).sum()]) / max(a.sum(), 1e-12)
        d = cen(w_on) - cen(w_off)
        m = cen(w) - c
        rad = (w_on * r).sum() / max(w_on.sum(), 1e-12) - (w_off * r).sum() / max(w_off.sum(), 1e-12)
        out.append([d[0], d[1], m[0] * d[1] - m[1] * d[0], w_on.sum() / max(w.sum(), 1e-12), rad])
    out = np.array(out)
    return np.concatenate([out[:, :3].mean(0), out[:, 3], out[:, 4]])


def _logreg(x_tr, y_tr, x_te, y_te, weight_decay=1e-3):
    """Multinomial logistic regression (standardised features, L-BFGS); returns test accuracy."""
    x_tr = torch.as_tensor(x_tr.reshape(len(x_tr), -1), dtype=torch.float64)
    x_te = torch.as_tensor(x_te.reshape(len(x_te), -1), dtype=torch.float64)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-8
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    classes = sorted(set(y_tr.tolist()))
    t_tr = torch.tensor([classes.index(v) for v in y_tr])
    t_te = torch.tensor([classes.index(v) for v in y_te])
    w = torch.zeros(x_tr.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_tr @ w + b, t_tr) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny problem: threads only add overhead on a busy CPU
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return ((x_te @ w + b).argmax(1) == t_te).double().mean().item()


def _dataset(labels, n_train, n_test, seed=0, events=(4000, 6000), n_steps=32):
    data = {}
    for split, n in (('train', n_train), ('test', n_test)):
        f, y = [], []
        for label in labels:
            for i in range(n):
                ev = sg.generate_sample(label, sg._sample_rng(seed, split, label, i), events=events,
                                        n_steps=n_steps)
                f.append(_binned(ev))
                y.append(label)
        data[split] = (np.stack(f), np.array(y))
    return data


def _accuracies(data):
    (f_tr, y_tr), (f_te, y_te) = data['train'], data['test']
    summed = _logreg(f_tr.sum(1), y_tr, f_te.sum(1), y_te)
    m_tr = np.stack([_motion_features(f) for f in f_tr])
    m_te = np.stack([_motion_features(f) for f in f_te])
    temporal = _logreg(m_tr, y_tr, m_te, y_te)
    return summed, temporal


@pytest.mark.parametrize('a, b', [(4, 5), (0, 1), (2, 3), (6, 7)])
def test_reversal_pairs_have_identical_time_sums(a, b):
    """Same seed, no thinning: the two classes of a pair give the same summed frames, not the same bins."""
    for i in range(3):
        kw = dict(events=(10 ** 8, 10 ** 8), noise=(0.03, 0.03))
        ea = sg.generate_sample(a, sg._sample_rng(0, 'train', 0, i), **kw)
        eb = sg.generate_sample(b, sg._sample_rng(0, 'train', 0, i), **kw)
        fa, fb = sg.frames_by_number(ea, 16), sg.frames_by_number(eb, 16)
        assert ea['t'].size == eb['t'].size > 10000
        assert np.array_equal(fa.sum(0), fb.sum(0))
        assert np.abs(fa - fb).sum() > 0.5 * ea['t'].size


def test_time_matters_clockwise_vs_counterclockwise():
    data = _dataset([4, 5], n_train=30, n_test=60)
    summed, temporal = _accuracies(data)
    print(f'circle_cw vs circle_ccw: time-summed logreg {summed:.3f}, per-bin motion logreg {temporal:.3f}')
    assert summed <= 0.65
    assert temporal >= 0.95


def test_time_matters_all_classes():
    data = _dataset(range(11), n_train=20, n_test=10)
    summed, temporal = _accuracies(data)
    print(f'11 classes: time-summed logreg {summed:.3f}, per-bin motion logreg {temporal:.3f}')
    # 8 classes form 4 pairs that are indistinguishable once summed: at best (3 + 4) / 11 = 0.64
    assert summed <= 0.72
    assert temporal >= 0.90
    assert temporal - summed >= 0.25
