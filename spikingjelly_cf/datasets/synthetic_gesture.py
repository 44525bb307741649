"""Synthetic DVS128 Gesture events in SpikingJelly's ``events_np`` layout.

A small, deterministic stand-in for the DVS128 Gesture dataset, so that the
whole real pipeline (``spikingjelly.datasets.dvs128_gesture.DVS128Gesture``
with ``data_type='frame'``, frame integration, training) runs on a machine
without the hand-fetched archive. Only NumPy is needed to write it.

Layout written by :func:`write_synthetic_gesture`::

    root/
      events_np/train/<label>/synth_<label>_<index>.npz   # label = 0..10
      events_np/test/<label>/synth_<label>_<index>.npz
      synthetic_gesture.json                             # marker: version, seed, sizes, parameters

Each ``.npz`` holds int64 arrays ``t`` (microseconds, sorted ascending), ``x``
and ``y`` (0..127 on the 128x128 sensor; ``y`` is the image row, growing
downwards) and ``p`` (1 = ON, brightness rose; 0 = OFF, brightness fell),
exactly what SpikingJelly writes when it converts the real archive. Because
``root/events_np`` exists, ``DVS128Gesture(root, train=..., data_type='frame',
frames_number=T, split_by='number')`` (0.0.0.0.14 and 2.0.0 alike) skips the
download, md5 check and extraction and integrates the files into
``root/frames_number_T_split_by_number/`` on first use. The marker lives in
``root``, not under ``events_np``, because SpikingJelly integrates every file it
finds under ``events_np``.

How events are made
-------------------
Each sample is a short scene (1-2 s) of one or two bright, rounded
"hand" blobs (a separable super-Gaussian, ``exp(-(dx/sx)**4 - ...)``) moving
over a dark background. The scene is rendered as ``n_steps`` log-intensity
frames; like a real DVS pixel, a pixel emits an event whenever its log
intensity crosses one of its contrast levels (spacing ``C``, a random phase per
pixel), ON when rising and OFF when falling, with the crossing time linearly
interpolated between rendered frames. The events are thinned at random to a
target count, and uniform background noise events and a few hot pixels are
added. Every sample draws its own position, path, speed (through duration and
number of cycles), size, aspect ratio, brightness, contrast threshold, phase,
noise level and event count, from a generator seeded by
``(seed, split, label, index)``, so a sample does not depend on how many others
are written, and the same seed always gives identical arrays.

Classes
-------
=====  ================  =====================================================
label  name              motion
=====  ================  =====================================================
0      ``swipe_right``   one blob enters at the left edge, leaves at the right
1      ``swipe_left``    the time reversal of ``swipe_right``
2      ``swipe_down``    enters at the top edge, leaves at the bottom
3      ``swipe_up``      the time reversal of ``swipe_down``
4      ``circle_cw``     circles clockwise (as seen on the image), 1 or 2 full
                         turns from a random start angle
5      ``circle_ccw``    the time reversal of ``circle_cw``
6      ``open``          fades in small, expands (ring of ON events), fades
                         out large
7      ``close``         the time reversal of ``open`` (contracting ring of OFF
                         events)
8      ``wave``          waves back and forth horizontally in place (1.5-3
                         cycles, random phase)
9      ``clap``          two blobs side by side meet and part, 2-3 times
10     ``swipe_diag``    enters at the bottom-left, leaves at the top-right
=====  ================  =====================================================

Time matters
------------
Labels 0/1, 2/3, 4/5 and 6/7 are time-reversal pairs whose scenes start and
end in the same state (empty, or the same position after whole turns), so each
pixel sees as many ON as OFF crossings and the two classes of a pair have the
*same distribution of time-summed frames*: a classifier on the summed frames
is at chance within each pair (about 7/11 = 64 % over the 11 classes at best),
while every single time bin still shows the direction of motion (ON events at
the leading edge, OFF at the trailing edge), which a temporal model picks up.
The tests check this with a logistic regression on summed frames against one
on per-bin motion features. (A back-and-forth wave pair, left-first against
right-first, would differ only in the order of its strokes once SpikingJelly
splits the events by count, with no single bin telling them apart; the
left/right pair here is therefore the swipe.)

Defaults
--------
60 train and 20 test samples per class (660 + 220), 64 rendered steps, 20k-40k
events per sample (about 29k on average; a few ``open``/``close`` scenes have
fewer), 1-2 s long, 2-6 % noise. Writing the default set takes about 15 s of
one CPU core and 125 MB of disk.

Loader class order
------------------
SpikingJelly's loader is a ``torchvision`` ``DatasetFolder``: it sorts the class
folders as strings (``'0', '1', '10', '2', ..., '9'``), so the target it returns
for folder ``'10'`` is 2, for folder ``'2'`` is 3, and so on, exactly as with the
real dataset. :data:`LOADER_CLASS_NAMES` lists the class names in the loader's
target order; :func:`loader_target_to_label` maps back to the folder label.

Examples
--------
>>> from spikingjelly_cf.datasets.synthetic_gesture import write_synthetic_gesture
>>> root = write_synthetic_gesture('data/synthetic_gesture')          # doctest: +SKIP
>>> from spikingjelly.datasets.dvs128_gesture import DVS128Gesture     # doctest: +SKIP
>>> train = DVS128Gesture(root, train=True, data_type='frame',
...                       frames_number=16, split_by='number')        # doctest: +SKIP

Optionally, :func:`integrate_frames` writes the frames folder SpikingJelly would
write, with the same values, about 5x faster and 10x faster to load.

Command line::

    python -m spikingjelly_cf.datasets.synthetic_gesture ROOT [--seed 0] [--train 60] [--test 20] [--frames 16 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    'CLASS_NAMES', 'LOADER_CLASS_NAMES', 'NUM_CLASSES', 'H', 'W', 'VERSION', 'MARKER',
    'DEFAULT_TRAIN_PER_CLASS', 'DEFAULT_TEST_PER_CLASS',
    'generate_sample', 'render_events', 'write_synthetic_gesture', 'is_complete',
    'frames_by_number', 'integrate_frames', 'redo_missing_frames',
    'loader_target_to_label', 'main',
]

#: Format version of the generator; bump when the generated events change.
VERSION = 1
#: Name of the marker file written in ``root`` once a set is complete.
MARKER = 'synthetic_gesture.json'
#: Sensor size (rows, columns), as DVS128.
H, W = 128, 128
#: Class names, indexed by folder label 0..10.
CLASS_NAMES: Tuple[str, ...] = (
    'swipe_right', 'swipe_left', 'swipe_down', 'swipe_up', 'circle_cw', 'circle_ccw',
    'open', 'close', 'wave', 'clap', 'swipe_diag',
)
NUM_CLASSES = len(CLASS_NAMES)
#: Folder labels in the order SpikingJelly's ``DatasetFolder`` numbers its targets.
_LOADER_FOLDERS: Tuple[int, ...] = tuple(int(s) for s in sorted(str(i) for i in range(NUM_CLASSES)))
#: Class names in the order of the targets SpikingJelly's loader returns.
LOADER_CLASS_NAMES: Tuple[str, ...] = tuple(CLASS_NAMES[i] for i in _LOADER_FOLDERS)

DEFAULT_TRAIN_PER_CLASS = 60
DEFAULT_TEST_PER_CLASS = 20

_SPLIT_IDS = {'train': 0, 'test': 1}
# pairs (label, partner): partner is label's scene played backwards
_REVERSED_OF = {1: 0, 3: 2, 5: 4, 7: 6}


def loader_target_to_label(target: int) -> int:
    """Folder label (0..10, index into :data:`CLASS_NAMES`) of a target from SpikingJelly's loader.

    Parameters
    ----------
    target : int
        Class index returned by ``DVS128Gesture`` (string-sorted class folders).

    Returns
    -------
    int
        The label of the folder the sample came from.
    """
    return _LOADER_FOLDERS[int(target)]


# --------------------------------------------------------------------------------------
# scenes: each returns a list of blobs, a blob is a dict of per-step arrays
# cx, cy (centre, pixels), sx, sy (half-widths, pixels), a (brightness, >= 0)
# --------------------------------------------------------------------------------------

def _blob(cx, cy, sx, sy, a, n):
    full = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()
    return {'cx': full(cx), 'cy': full(cy), 'sx': full(sx), 'sy': full(sy), 'a': full(a)}


def _size(rng) -> Tuple[float, float]:
    s = rng.uniform(9.0, 14.0)
    aspect = np.exp(rng.uniform(-0.2, 0.2))
    return s * aspect, s / aspect


def _swipe(rng, tau, direction):
    """Blob crossing the whole sensor, from off-screen to off-screen."""
    n = tau.size
    sx, sy = _size(rng)
    margin = 2.2 * max(sx, sy)
    offset = rng.uniform(-34.0, 34.0)          # across the motion direction
    drift = rng.uniform(-20.0, 20.0)           # slow drift across the motion, symmetric
    # eased progress (slower at the edges), symmetric under tau -> 1 - tau
    ease = rng.uniform(0.0, 0.8)
    prog = tau - ease * np.sin(2 * np.pi * tau) / (2 * np.pi)
    along = -margin + (W - 1 + 2 * margin) * prog
    across = 63.5 + offset + drift * (tau - 0.5)
    if direction == 'x':
        cx, cy = along, across
    elif direction == 'y':
        cx, cy = across, along
    else:  # diagonal: bottom-left -> top-right
        d = (W - 1 + 2 * margin) * np.sqrt(2.0) * (prog - 0.5)
        c = offset * 0.8 + drift * (tau - 0.5)
        cx = 63.5 + d / np.sqrt(2.0) + c / np.sqrt(2.0)
        cy = 63.5 - d / np.sqrt(2.0) + c / np.sqrt(2.0)
    return [_blob(cx, cy, sx, sy, rng.uniform(1.5, 3.0), n)]


def _circle(rng, tau):
    n = tau.size
    sx, sy = _size(rng)
    cx0, cy0 = rng.uniform(46.0, 82.0, size=2)
    r = rng.uniform(22.0, 34.0)
    ry = r * np.exp(rng.uniform(-0.15, 0.15))
    turns = int(rng.integers(1, 3))
    th = rng.uniform(0.0, 2 * np.pi) + 2 * np.pi * turns * tau   # y grows downwards: clockwise
    return [_blob(cx0 + r * np.cos(th), cy0 + ry * np.sin(th), sx, sy, rng.uniform(1.5, 3.0), n)]


def _envelope(tau, fade):
    """1 in the middle, smooth ramps of length ``fade`` at both ends, 0 at the ends."""
    up = np.clip(tau / fade, 0.0, 1.0)
    down = np.clip((1.0 - tau) / fade, 0.0, 1.0)
    e = np.minimum(up, down)
    return e * e * (3 - 2 * e)


def _open(rng, tau):
    n = tau.size
    cx, cy = rng.uniform(44.0, 84.0, size=2)
    s0, s1 = rng.uniform(3.0, 5.0), rng.uniform(17.0, 26.0)
    aspect = np.exp(rng.uniform(-0.15, 0.15))
    fade = rng.uniform(0.12, 0.2)
    # size grows only between the fades (shape of growth random but monotone)
    g = np.clip((tau - fade) / (1 - 2 * fade), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    s = s0 + (s1 - s0) * g
    a = rng.uniform(1.5, 3.0) * _envelope(tau, fade)
    return [_blob(cx, cy, s * aspect, s / aspect, a, n)]


def _wave(rng, tau):
    n = tau.size
    sx, sy = _size(rng)
    x0 = rng.uniform(40.0, 88.0)
    y0 = rng.uniform(36.0, 92.0)
    amp = rng.uniform(14.0, 24.0)
    cycles = rng.uniform(1.5, 3.0)
    ph = rng.uniform(0.0, 2 * np.pi)
    th = 2 * np.pi * cycles * tau + ph
    cx = x0 + amp * np.sin(th)
    cy = y0 + 0.25 * amp * np.cos(2 * th)      # slight arc, like a wrist
    return [_blob(cx, cy, sx, sy, rng.uniform(1.5, 3.0), n)]


def _clap(rng, tau):
    n = tau.size
    s = rng.uniform(8.0, 11.0)
    cx, cy = rng.uniform(48.0, 80.0), rng.uniform(40.0, 88.0)
    d_min, d_max = rng.uniform(2.0, 2.4) * s, rng.uniform(60.0, 80.0)
    claps = int(rng.integers(2, 4))
    ph = rng.uniform(-0.4, 0.4)
    d = d_min + (d_max - d_min) * 0.5 * (1 + np.cos(2 * np.pi * claps * tau + ph))
    a = rng.uniform(1.5, 3.0)
    return [_blob(cx - d / 2, cy, s * 0.8, s * 1.25, a, n),
            _blob(cx + d / 2, cy, s * 0.8, s * 1.25, a * rng.uniform(0.85, 1.15), n)]


_SCENES: Dict[int, Callable] = {
    0: lambda rng, tau: _swipe(rng, tau, 'x'),
    2: lambda rng, tau: _swipe(rng, tau, 'y'),
    4: _circle,
    6: _open,
    8: _wave,
    9: _clap,
    10: lambda rng, tau: _swipe(rng, tau, 'diag'),
}


def _scene(label: int, rng: np.random.Generator, n_steps: int) -> List[dict]:
    tau = np.linspace(0.0, 1.0, n_steps)
    base = _REVERSED_OF.get(label, label)
    blobs = _SCENES[base](rng, tau)
    if label in _REVERSED_OF:
        blobs = [{k: v[::-1].copy() for k, v in b.items()} for b in blobs]
    return blobs


def _profile(c, s, n):
    """[steps, n] super-Gaussian profile exp(-((u - c)/s)^4)."""
    u = np.arange(n, dtype=np.float32)[None, :]
    d = (u - c.astype(np.float32)[:, None]) / s.astype(np.float32)[:, None]
    d *= d
    return np.exp(-(d * d))


def render_events(blobs: Sequence[dict], t_steps: np.ndarray, contrast: float,
                  rng: np.random.Generator, max_events: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Turn rendered blobs into DVS events by log-intensity level crossings.

    Parameters
    ----------
    blobs : sequence of dict
        Each with per-step arrays ``cx, cy, sx, sy, a`` (length ``n_steps``).
    t_steps : numpy.ndarray
        Time of each rendered frame in microseconds (float, increasing).
    contrast : float
        Spacing ``C`` of the log-intensity levels (the DVS contrast threshold).
    rng : numpy.random.Generator
        Draws each pixel's level phase, and the events kept when thinning.
    max_events : int, optional
        Keep a uniformly random subset of this many events when there are more.

    Returns
    -------
    dict
        ``t`` (float64, unsorted), ``x``, ``y``, ``p`` (int64) of the signal events.
    """
    n = t_steps.size
    phase = rng.random(H * W, dtype=np.float32).reshape(H, W)  # per-pixel level phase
    gys, gxs = [], []
    rows = np.zeros(H, dtype=bool)
    cols = np.zeros(W, dtype=bool)
    for b in blobs:
        a = b['a'].astype(np.float32)
        gys.append(_profile(b['cy'], b['sy'], H) * a[:, None])
        gxs.append(_profile(b['cx'], b['sx'], W))
        # outside these rows/columns the blob adds < 2**-26 to an intensity >= 1, which
        # float32 rounds away: rendering only the bounding box changes no event
        rows |= gys[-1].max(axis=0) >= 2.0 ** -26
        cols |= gxs[-1].max(axis=0) * max(float(a.max()), 1.0) >= 2.0 ** -26
    ry, cx_ = np.flatnonzero(rows), np.flatnonzero(cols)
    if ry.size == 0 or cx_.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return {'t': np.zeros(0), 'x': empty, 'y': empty.copy(), 'p': empty.copy()}
    r0, r1, c0, c1 = ry[0], ry[-1] + 1, cx_[0], cx_[-1] + 1
    h, w = r1 - r0, c1 - c0
    inten = np.ones((n, h, w), dtype=np.float32)             # dark background = 1
    for gy, gx in zip(gys, gxs):
        inten += gy[:, r0:r1, None] * gx[:, None, c0:c1]
    level = np.log(inten).reshape(n, h * w)
    level *= np.float32(1.0 / contrast)
    level += phase[r0:r1, c0:c1].reshape(1, h * w)
    q = level.astype(np.int16)                                # level >= 0: truncation is floor
    dq = np.diff(q, axis=0)
    nz = np.flatnonzero(dq)                                   # (step, pixel) with crossings
    cnt = dq.ravel()[nz]
    num = np.abs(cnt).astype(np.int64)
    end = np.cumsum(num)
    total = int(end[-1]) if end.size else 0
    if max_events is not None and total > max_events:
        e = np.sort(rng.choice(total, size=int(max_events), replace=False))
    else:
        e = np.arange(total)
    g = np.searchsorted(end, e, side='right')                 # group of each event
    j = e - (end[g] - num[g])                                 # its rank within the group
    k, pix = np.divmod(nz[g], h * w)
    rising = cnt[g] > 0
    l0 = level[k, pix]
    l1 = level[k + 1, pix]
    q0 = q[k, pix].astype(np.float32)
    cross = np.where(rising, q0 + 1 + j, q0 - j)              # level boundary crossed
    frac = np.clip((cross - l0) / (l1 - l0), 0.0, 1.0)
    t = t_steps[k] + frac * (t_steps[k + 1] - t_steps[k])
    y, x = np.divmod(pix, w)
    y += r0
    x += c0
    return {'t': t, 'x': x.astype(np.int64), 'y': y.astype(np.int64), 'p': rising.astype(np.int64)}


def generate_sample(label: int, rng: np.random.Generator, n_steps: int = 64,
                    events: Tuple[int, int] = (20000, 40000),
                    noise: Tuple[float, float] = (0.02, 0.06),
                    duration_us: Tuple[float, float] = (1.0e6, 2.0e6)) -> Dict[str, np.ndarray]:
    """One synthetic gesture sample.

    Parameters
    ----------
    label : int
        Class, 0..10 (see :data:`CLASS_NAMES`).
    rng : numpy.random.Generator
        Source of all randomness of the sample.
    n_steps : int
        Rendered frames per sample (temporal resolution of the scene).
    events : (int, int)
        The sample is thinned at random to a count drawn uniformly from this range
        (noise included); a scene with fewer events keeps them all.
    noise : (float, float)
        Range of the background noise events, as a fraction of the signal events.
    duration_us : (float, float)
        Range of the sample duration in microseconds.

    Returns
    -------
    dict
        int64 arrays ``t`` (sorted, microseconds), ``x``, ``y`` (0..127), ``p`` (0/1).
    """
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f'label must be in 0..{NUM_CLASSES - 1}, got {label}')
    blobs = _scene(label, rng, n_steps)
    duration = rng.uniform(*duration_us)
    t0 = float(rng.integers(0, 5_000_000))
    t_steps = t0 + duration * np.linspace(0.0, 1.0, n_steps)
    contrast = rng.uniform(0.12, 0.2)
    target = int(rng.integers(events[0], events[1] + 1))
    noise_frac = rng.uniform(*noise)
    n_hot_pix = int(rng.integers(0, 4))
    hot_frac = 0.004                                          # of the signal events, per hot pixel
    sig_target = int(target / (1.0 + noise_frac + hot_frac * n_hot_pix))
    ev = render_events(blobs, t_steps, contrast, rng, max_events=sig_target)
    n_sig = ev['t'].size
    # background activity: uniform in space, time and polarity, plus a few hot pixels
    n_noise = int(round(noise_frac * n_sig))
    n_hot = int(round(hot_frac * n_sig)) * n_hot_pix
    if n_sig == sig_target:                                   # thinned: hit the target exactly
        n_noise = max(target - n_sig - n_hot, 0)
    hot = rng.integers(0, H * W, size=max(n_hot_pix, 1))
    hot_pix = hot[rng.integers(0, hot.size, size=n_hot)]
    noise_pix = np.concatenate([rng.integers(0, H * W, size=n_noise), hot_pix])
    m = noise_pix.size
    t = np.floor(np.concatenate([ev['t'], t0 + duration * rng.random(m)])).astype(np.int64)
    x = np.concatenate([ev['x'], noise_pix % W])
    y = np.concatenate([ev['y'], noise_pix // W])
    p = np.concatenate([ev['p'], rng.integers(0, 2, size=m)])
    order = np.argsort(t, kind='stable')
    return {'t': t[order], 'x': x[order].astype(np.int64), 'y': y[order].astype(np.int64),
            'p': p[order].astype(np.int64)}


def _save_npz(path: str, arrays: Dict[str, np.ndarray], compress: bool) -> None:
    """``numpy.savez[_compressed]`` with fast deflate (level 1): 5-7x faster, about 20 % bigger."""
    kw = {'compression': zipfile.ZIP_DEFLATED, 'compresslevel': 1} if compress else {}
    with zipfile.ZipFile(path, 'w', **kw) as zf:
        for key, value in arrays.items():
            with zf.open(key + '.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(value), allow_pickle=False)


def _sample_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([VERSION, int(seed), _SPLIT_IDS[split], label, index]))


def _file_name(label: int, index: int) -> str:
    return f'synth_{label}_{index}.npz'


def _expected_files(n_per_class: Dict[str, int]):
    for split, n in n_per_class.items():
        for label in range(NUM_CLASSES):
            for i in range(n):
                yield split, label, i


def _write_json(path: str, obj: dict) -> None:
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def _metadata(seed, n_train, n_test, n_steps, events, noise, duration_us, compress) -> dict:
    return {'generator': 'spikingjelly_cf.datasets.synthetic_gesture', 'version': VERSION,
            'seed': int(seed), 'n_train_per_class': int(n_train), 'n_test_per_class': int(n_test),
            'n_steps': int(n_steps), 'events': [int(e) for e in events],
            'noise': [float(v) for v in noise], 'duration_us': [float(v) for v in duration_us],
            'compress': bool(compress), 'classes': list(CLASS_NAMES), 'sensor': [H, W]}


def is_complete(root: str, meta: Optional[dict] = None) -> bool:
    """Whether ``root`` holds a complete synthetic set (with matching metadata, if given).

    Parameters
    ----------
    root : str
        Dataset root.
    meta : dict, optional
        Metadata the marker must match (the parameters a set was asked with).

    Returns
    -------
    bool
        True when the marker exists (and matches ``meta``) and every expected file is there.
    """
    try:
        with open(os.path.join(root, MARKER)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    if found.get('complete') is not True:
        return False
    if meta is not None and {k: v for k, v in found.items() if k in meta} != meta:
        return False
    sizes = {'train': found.get('n_train_per_class', 0), 'test': found.get('n_test_per_class', 0)}
    events_np = os.path.join(root, 'events_np')
    for split, n in sizes.items():
        for label in range(NUM_CLASSES):
            d = os.path.join(events_np, split, str(label))
            try:
                names = set(os.listdir(d))
            except OSError:
                return False
            if any(_file_name(label, i) not in names for i in range(n)):
                return False
    return True


_DERIVED = re.compile(r'^\.?(frames_number_\d+_split_by_(number|time)|duration_\d+)(\.building|\.partial)?$')


def _remove_derived(root: str) -> None:
    """Remove SpikingJelly's integrated frames, which are stale once events change."""
    for name in os.listdir(root):
        if _DERIVED.match(name):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def write_synthetic_gesture(root: str, n_train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
                            n_test_per_class: int = DEFAULT_TEST_PER_CLASS, seed: int = 0,
                            n_steps: int = 64, events: Tuple[int, int] = (20000, 40000),
                            noise: Tuple[float, float] = (0.02, 0.06),
                            duration_us: Tuple[float, float] = (1.0e6, 2.0e6),
                            compress: bool = True, overwrite: bool = False,
                            verbose: bool = False) -> str:
    """Write a synthetic DVS128 Gesture set under ``root`` (cached).

    If ``root`` already holds a complete set written with the same parameters
    (marker file :data:`MARKER`), nothing is done. If it holds a synthetic set
    with other parameters, that set and SpikingJelly's frames integrated from it
    (``frames_number_*``, ``duration_*``) are removed and the set is rewritten.
    The events are written into a temporary folder and moved into place at the
    end, so an interrupted run never leaves a partial ``events_np``.

    Parameters
    ----------
    root : str
        Dataset root; created if needed.
    n_train_per_class, n_test_per_class : int
        Samples per class in each split (at least 1: SpikingJelly's loader needs
        a file in every class folder).
    seed : int
        Seed; identical seeds give identical files.
    n_steps, events, noise, duration_us
        See :func:`generate_sample`.
    compress : bool
        Write compressed ``.npz`` (deflate level 1; SpikingJelly also compresses by
        default): about 6x smaller, a few ms more per sample.
    overwrite : bool
        Replace an ``events_np`` folder that was not written by this generator
        (for example the real dataset). Without it, such a folder raises.
    verbose : bool
        Print progress and timing.

    Returns
    -------
    str
        ``root``, to pass to ``DVS128Gesture``.

    Raises
    ------
    FileExistsError
        ``root/events_np`` exists but was not written by this generator.
    """
    if n_train_per_class < 1 or n_test_per_class < 1:
        raise ValueError('every class folder needs at least one sample per split')
    if not (0 < events[0] <= events[1]):
        raise ValueError(f'bad events range {events}')
    meta = _metadata(seed, n_train_per_class, n_test_per_class, n_steps, events, noise,
                     duration_us, compress)
    if is_complete(root, meta):
        if verbose:
            print(f'synthetic gesture set already complete in [{root}]')
        return root
    os.makedirs(root, exist_ok=True)
    events_np = os.path.join(root, 'events_np')
    marker = os.path.join(root, MARKER)
    if os.path.exists(events_np) and not os.path.exists(marker) and not overwrite:
        raise FileExistsError(
            f'[{events_np}] exists and was not written by the synthetic generator '
            f'(no {MARKER}); refusing to replace it (pass overwrite=True to do so)')
    tic = time.time()
    # a pending marker first: an interrupted run is then recognised as ours and redone
    _write_json(marker, dict(meta, complete=False))
    tmp = os.path.join(root, '.events_np.partial')
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    sizes = {'train': n_train_per_class, 'test': n_test_per_class}
    n_events = 0
    for split, n in sizes.items():
        for label in range(NUM_CLASSES):
            os.makedirs(os.path.join(tmp, split, str(label)))
    for split, label, i in _expected_files(sizes):
        ev = generate_sample(label, _sample_rng(seed, split, label, i), n_steps=n_steps,
                             events=events, noise=noise, duration_us=duration_us)
        n_events += ev['t'].size
        _save_npz(os.path.join(tmp, split, str(label), _file_name(label, i)), ev, compress)
    if os.path.exists(events_np):
        shutil.rmtree(events_np)
    _remove_derived(root)
    os.replace(tmp, events_np)
    n_files = NUM_CLASSES * (n_train_per_class + n_test_per_class)
    _write_json(marker, dict(meta, complete=True, n_files=n_files, mean_events=n_events / n_files))
    if verbose:
        print(f'wrote {n_files} synthetic gesture samples ({n_events / n_files:.0f} events each on '
              f'average) to [{events_np}] in {time.time() - tic:.1f} s')
    return root


def frames_by_number(events: Dict[str, np.ndarray], frames_number: int) -> np.ndarray:
    """Integrate events into frames exactly as SpikingJelly's ``split_by='number'`` does.

    Event ``i`` of ``N`` goes to frame ``min(i // (N // T), T - 1)`` (all to the last
    frame when ``N < T``), channel 0 for OFF and 1 for ON, pixel ``[y, x]``.

    Parameters
    ----------
    events : dict
        ``t, x, y, p`` arrays of one sample (``t`` sorted).
    frames_number : int
        Number of frames ``T``.

    Returns
    -------
    numpy.ndarray
        int64 event counts of shape ``[T, 2, 128, 128]``.
    """
    x, y, p = (np.asarray(events[k]) for k in ('x', 'y', 'p'))
    n = x.size
    di = n // frames_number
    if di == 0:
        k = np.full(n, frames_number - 1, dtype=np.int64)
    else:
        k = np.minimum(np.arange(n, dtype=np.int64) // di, frames_number - 1)
    idx = ((k * 2 + (p != 0)) * H + y.astype(np.int64)) * W + x.astype(np.int64)
    return np.bincount(idx, minlength=frames_number * 2 * H * W).reshape(frames_number, 2, H, W)


def _frames_name(frames_number: int) -> str:
    """SpikingJelly's folder name for frames integrated by number."""
    return f'frames_number_{frames_number}_split_by_number'


def _event_files(events_np: str) -> List[str]:
    """Paths of the event files under ``events_np``, relative to it."""
    rel = []
    for d, _, files in os.walk(events_np):
        rel += [os.path.relpath(os.path.join(d, f), events_np) for f in files]
    return rel


def integrate_frames(root: str, frames_number: int, verbose: bool = False) -> str:
    """Write ``root/frames_number_T_split_by_number`` faster than SpikingJelly does (optional).

    ``DVS128Gesture(root, data_type='frame', frames_number=T, split_by='number')``
    uses this folder as it is when it exists. The files have SpikingJelly's names and,
    once its loader has cast them to float32, exactly its values (see
    :func:`frames_by_number`); they are stored as int16 (int32 if needed) with fast
    compression, which makes writing them several times faster and loading them
    about 10x faster than SpikingJelly's compressed float64 frames. The folder is
    written under a temporary name and renamed when complete; an existing folder that
    holds a frame file for every event file is left alone, an incomplete one is rebuilt.

    Parameters
    ----------
    root : str
        Dataset root holding ``events_np``.
    frames_number : int
        Number of frames ``T``.
    verbose : bool
        Print timing.

    Returns
    -------
    str
        The frames folder.
    """
    if not (isinstance(frames_number, int) and frames_number > 0):
        raise ValueError(f'frames_number must be a positive int, got {frames_number!r}')
    events_np = os.path.join(root, 'events_np')
    name = _frames_name(frames_number)
    out = os.path.join(root, name)
    rel = _event_files(events_np)
    if not rel:
        raise FileNotFoundError(f'no event files under [{events_np}]')
    if os.path.isdir(out):
        if all(os.path.isfile(os.path.join(out, r)) for r in rel):
            return out
        shutil.rmtree(out)
    tic = time.time()
    tmp = os.path.join(root, f'.{name}.partial')
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    for r in sorted(rel):
        os.makedirs(os.path.join(tmp, os.path.dirname(r)), exist_ok=True)
        with np.load(os.path.join(events_np, r)) as ev:
            frames = frames_by_number(ev, frames_number)
        dtype = np.int16 if frames.max(initial=0) <= np.iinfo(np.int16).max else np.int32
        _save_npz(os.path.join(tmp, r), {'frames': frames.astype(dtype)}, compress=True)
    os.replace(tmp, out)
    if verbose:
        print(f'integrated {len(rel)} samples into [{out}] in {time.time() - tic:.1f} s')
    return out


def redo_missing_frames(root: str, frames_number: int, DVS128Gesture=None) -> int:
    """Integrate again, one by one in this thread, every events file of ``root`` whose
    SpikingJelly frames file (``frames_number_T_split_by_number``) is missing; return how many.

    SpikingJelly 0.0.0.0.14 integrates in a ``ThreadPoolExecutor`` and never collects the
    futures, so a worker that fails leaves its frames file out without a word (seen once in CI:
    a class folder of the test split empty, and ``DatasetFolder`` then refusing the split). Call
    this right after SpikingJelly built the folder: a transient failure becomes harmless, a
    persistent one raises its real error here. SpikingJelly 2.0 collects its futures, so there
    it finds nothing to do (and refuses with a ``RuntimeError`` if it ever did).
    """
    events = os.path.join(root, 'events_np')
    frames = os.path.join(root, _frames_name(frames_number))
    missing = [r for r in sorted(_event_files(events)) if not os.path.isfile(os.path.join(frames, r))]
    if not missing:   # the usual case: nothing imported (SpikingJelly 2.0's spikingjelly.datasets
        return 0      # needs torchaudio, which its DVS128Gesture module does not)
    import importlib
    sjds = importlib.import_module('spikingjelly.datasets')
    if DVS128Gesture is None:
        DVS128Gesture = importlib.import_module('spikingjelly.datasets.dvs128_gesture').DVS128Gesture
    integrate = getattr(sjds, 'integrate_events_file_to_frames_file_by_fixed_frames_number', None)
    if integrate is None:
        raise RuntimeError(f'{len(missing)} events file(s) of {events} have no frames file in {frames} '
                           f'after SpikingJelly integrated them (e.g. {missing[0]}); delete {frames} '
                           'and run again')
    import sys
    print(f'[data] SpikingJelly left {len(missing)} frames file(s) out; integrating them again',
          file=sys.stderr)
    height, width = DVS128Gesture.get_H_W()
    for r in missing:
        out_dir = os.path.dirname(os.path.join(frames, r))
        os.makedirs(out_dir, exist_ok=True)
        integrate(DVS128Gesture.load_events_np, os.path.join(events, r), out_dir, 'number',
                  frames_number, height, width)
    return len(missing)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m spikingjelly_cf.datasets.synthetic_gesture ROOT``."""
    ap = argparse.ArgumentParser(description='Write a synthetic DVS128 Gesture set in '
                                             "SpikingJelly's events_np layout.")
    ap.add_argument('root', help='dataset root (events_np/ is written inside)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--train', type=int, default=DEFAULT_TRAIN_PER_CLASS, help='train samples per class')
    ap.add_argument('--test', type=int, default=DEFAULT_TEST_PER_CLASS, help='test samples per class')
    ap.add_argument('--steps', type=int, default=64, help='rendered frames per sample')
    ap.add_argument('--events', type=int, nargs=2, default=(20000, 40000), metavar=('MIN', 'MAX'),
                    help='range of events per sample')
    ap.add_argument('--frames', type=int, nargs='*', default=(), metavar='T',
                    help='also integrate frames for these frame numbers (split_by number), '
                         'faster than SpikingJelly, in the folder it reads')
    ap.add_argument('--no-compress', action='store_true', help='write uncompressed .npz')
    ap.add_argument('--overwrite', action='store_true',
                    help='replace an events_np folder not written by this generator')
    args = ap.parse_args(argv)
    write_synthetic_gesture(args.root, n_train_per_class=args.train, n_test_per_class=args.test,
                            seed=args.seed, n_steps=args.steps, events=tuple(args.events),
                            compress=not args.no_compress, overwrite=args.overwrite, verbose=True)
    for t in args.frames:
        integrate_frames(args.root, t, verbose=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
