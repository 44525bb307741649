r"""Train a circulate-firing SNN on DVS128 Gesture with the paper's full method.

CF neurons (K = 2, thresholds +1/-1, decay 0.25), the time-step-wise learnable surrogate TSG
and the loss ``CE + 0.25 * L_pnb`` (Eq. 23) through :class:`spikingjelly_cf.PNBMonitor`, on
SpikingJelly's own dataset, layers and model zoo. The training loop (DDP, AMP, checkpoints,
``--resume``, summary and figures, robustness evaluation) is in ``examples/common.py``.

Data
----
- ``--data-dir ROOT``: the real dataset through
  ``spikingjelly.datasets.dvs128_gesture.DVS128Gesture(ROOT, train=..., data_type='frame',
  frames_number=T, split_by='number')``. The archive is not downloadable: put
  ``DvsGesture.tar.gz`` (with ``gesture_mapping.csv``, ``LICENSE.txt``, ``README.txt``) in
  ``ROOT/download/``.
- default: the built-in synthetic gesture set (:mod:`spikingjelly_cf.datasets.synthetic_gesture`),
  written in SpikingJelly's ``events_np`` layout under ``--synthetic-root`` and read through
  the same ``DVS128Gesture`` loader, so the whole real pipeline runs.

SpikingJelly integrates the events into ``[T, 2, 128, 128]`` frames once (cached in ROOT);
this script then downsamples them to ``--input-size`` (48, as TET, by area averaging) and
caches the result in ``ROOT/cf_cache/`` so later runs start at once.

Models
------
- ``--arch vggsnn`` (default): the VGG of TET/TEBN for DVS data,
  ``w C3 - 2w C3 - AP2 - 4w C3 - 4w C3 - AP2 - 8w C3 - 8w C3 - AP2 - 8w C3 - 8w C3 - AP2``
  (``w = 64`` in TET; ``--width``), conv-BN-neuron blocks, then a linear layer onto
  ``11 x voting_size`` outputs and SpikingJelly's ``layer.VotingLayer``: the read-out
  :math:`O = \frac{1}{T} \sum_t M s_t` of Eq. 24.
- ``--arch dvsgesturenet``: SpikingJelly's own ``parametric_lif_net.DVSGestureNet`` built with
  ``spiking_neuron=neuron.CFNode`` (128 x 128 input; ends in ``layer.VotingLayer(10)``).

Defaults
--------
The recipe is the paper's (CF K = 2, thresholds +/-1, tau = 4/3, TSG, lambda = 0.25, SGD
lr 0.025 momentum 0.9 weight decay 5e-4, cosine). The sizes are chosen so that a run on the
built-in data finishes in a few minutes on a 2-core CPU: 30 + 10 synthetic samples per class,
T = 10 (the paper's DVS setting), width 4, batch 16, 10 epochs (about 100 s on an idle 2-core
CPU, data generation and frame integration included; 99 % test accuracy with CF neurons, seed
0). The paper's network width on the real data is ``--width 64``.

Examples
--------
::

    python examples/dvs_gesture.py                        # built-in data, CPU-sized defaults (below)
    python examples/dvs_gesture.py --neuron lif           # the LIF baseline, same settings
    python examples/dvs_gesture.py --data-dir data/DVS128Gesture -T 10 --width 64 \
        --epochs 200 -b 16                                 # the paper's setting, real data
    torchrun --nproc_per_node 2 examples/dvs_gesture.py   # data-parallel
    python examples/dvs_gesture.py --compile --backend torch   # whole model through torch.compile
    python examples/dvs_gesture.py --eval-only --checkpoint runs/.../checkpoints/best.pt \
        --noise uniform salt_pepper gaussian --noise-levels 0 0.1 0.2 0.4
"""
import argparse
import contextlib
import copy
import io
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

from spikingjelly.activation_based import functional, layer  # noqa: E402
from spikingjelly_cf.datasets.synthetic_gesture import redo_missing_frames  # noqa: E402

NUM_CLASSES = 11
#: Class names of the real DVS128 Gesture set, by folder label.
REAL_CLASS_NAMES = ('hand_clapping', 'right_hand_wave', 'left_hand_wave', 'right_arm_clockwise',
                    'right_arm_counter_clockwise', 'left_arm_clockwise', 'left_arm_counter_clockwise',
                    'arm_roll', 'air_drums', 'air_guitar', 'other_gestures')
#: Defaults sized for the built-in data on a 2-core CPU (see the README for the timing).
DEFAULTS = dict(T=10, epochs=10, batch_size=16, weight_decay=5e-4)
DEFAULT_WIDTH = {'vggsnn': 4, 'dvsgesturenet': 128}
DEFAULT_SYNTHETIC = dict(train=30, test=10)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class VGGSNN(nn.Module):
    r"""VGG of TET / TEBN for event data, width configurable, multi-step (``[T, B, 2, H, W]``).

    ``w C3 - 2w C3 - AP2 - 4w C3 - 4w C3 - AP2 - 8w C3 - 8w C3 - AP2 - 8w C3 - 8w C3 - AP2``, each
    ``C3`` a 3x3 convolution, batch normalisation and a spiking neuron, then
    ``Linear(., classes x voting_size)`` and ``VotingLayer(voting_size)`` (Eq. 24).

    Parameters
    ----------
    width : int
        Channels ``w`` of the first layer (TET: 64).
    spiking_neuron : callable
        Neuron class, built as ``spiking_neuron(**deepcopy(kwargs))`` per layer (the model zoo's
        convention, so each layer gets its own surrogate).
    num_classes, voting_size : int
        Output classes and voting neurons per class.
    input_size : int
        Height = width of the input frames (a multiple of 16; TET: 48).
    """

    def __init__(self, width: int, spiking_neuron, num_classes: int = NUM_CLASSES, voting_size: int = 10,
                 in_channels: int = 2, input_size: int = 48, **kwargs):
        super().__init__()
        if input_size % 16:
            raise ValueError(f'input_size must be a multiple of 16 (four 2x2 poolings), got {input_size}')
        w = width
        cfg = [w, 2 * w, 'P', 4 * w, 4 * w, 'P', 8 * w, 8 * w, 'P', 8 * w, 8 * w, 'P']
        features, c = [], in_channels
        for v in cfg:
            if v == 'P':
                features.append(layer.AvgPool2d(2))
                continue
            features += [layer.Conv2d(c, v, kernel_size=3, padding=1, bias=False), layer.BatchNorm2d(v),
                         spiking_neuron(**copy.deepcopy(kwargs))]
            c = v
        self.features = nn.Sequential(*features)
        side = input_size // 16
        self.classifier = nn.Sequential(layer.Flatten(), layer.Linear(c * side * side, num_classes * voting_size),
                                        layer.VotingLayer(voting_size))
        functional.set_step_mode(self, 'm')

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x_seq))


def build_model(args) -> nn.Module:
    cls, kwargs = common.neuron_spec(args)
    if args.arch == 'vggsnn':
        return VGGSNN(args.width, cls, voting_size=args.voting_size, input_size=args.input_size, **kwargs)
    if args.arch == 'dvsgesturenet':
        from spikingjelly.activation_based.model import parametric_lif_net
        net = parametric_lif_net.DVSGestureNet(channels=args.width, spiking_neuron=cls, **kwargs)
        functional.set_step_mode(net, 'm')
        return net
    raise ValueError(f'unknown --arch {args.arch!r}')


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class FramesDataset(torch.utils.data.Dataset):
    """Frames held in memory: ``x[i]`` is ``[T, 2, S, S]`` (float16), ``y[i]`` the target."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _import_dvs128():
    try:
        from spikingjelly.datasets.dvs128_gesture import DVS128Gesture
    except Exception as e:  # SpikingJelly 2.0's datasets import torchaudio (and torchvision)
        import spikingjelly_cf
        hint = ('SpikingJelly 2.0 needs a torchaudio that loads beside this torch '
                f'({torch.__version__}); the tested combination is torch==2.9.1 torchvision==0.24.1 '
                "'torchaudio==2.9.*' (bash scripts/run_dvs_gesture.sh --sj2 sets it up)"
                if not spikingjelly_cf._compat.CLASSIC else 'is SpikingJelly installed completely?')
        raise SystemExit(f'spikingjelly.datasets cannot be imported with SpikingJelly '
                         f'{spikingjelly_cf.SPIKINGJELLY_VERSION} ({type(e).__name__}: {e}): {hint}') from e
    return DVS128Gesture


def _check_real_root(root: str, DVS128Gesture) -> None:
    if os.path.isdir(os.path.join(root, 'events_np')):
        return
    download = os.path.join(root, 'download')
    missing = [name for name, _, _ in DVS128Gesture.resource_url_md5()
               if not os.path.isfile(os.path.join(download, name))]
    if missing:
        url = DVS128Gesture.resource_url_md5()[0][1]
        raise SystemExit(f'DVS128 Gesture is not downloadable: fetch {", ".join(missing)} by hand from {url} '
                         f'and put {"them" if len(missing) > 1 else "it"} in {os.path.abspath(download)}/ '
                         f'(SpikingJelly then extracts and converts it), or run without --data-dir to use '
                         f'the built-in synthetic data')


def _frames_dir(root: str, T: int) -> str:
    return os.path.join(root, f'frames_number_{T}_split_by_number')


def _count_files(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _integrate(root: str, T: int, DVS128Gesture, verbose: bool):
    """``DVS128Gesture`` train and test frame sets; SpikingJelly integrates the events on first use.

    A frames folder left by an interrupted run is removed and rebuilt: one with fewer files than
    ``events_np`` (SpikingJelly 0.0.0.0.14 writes in place), or one beside SpikingJelly 2.0's
    ``<frames>.building`` marker (2.0 itself refuses to start while that marker exists)."""
    frames = _frames_dir(root, T)
    events = os.path.join(root, 'events_np')
    marker = frames + '.building'
    if os.path.exists(marker) or (os.path.isdir(frames) and _count_files(frames) != _count_files(events)):
        print(f'[data] {frames} is incomplete (interrupted integration?); rebuilding it')
        shutil.rmtree(frames, ignore_errors=True)
        if os.path.exists(marker):
            os.remove(marker)
    tic = time.time()
    built = not os.path.isdir(frames)

    def build(split):
        return DVS128Gesture(root, train=split == 'train', data_type='frame', frames_number=T, split_by='number')

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):  # SpikingJelly prints a line per file
        try:
            train = build('train')  # integrates every split on first use
        except FileNotFoundError:   # a class folder left empty by a lost worker (see below)
            if not built:
                raise
            train = None
        if built:
            redo_missing_frames(root, T, DVS128Gesture)  # 0.0.0.0.14 may lose a worker's file
        sets = {'train': train if train is not None else build('train'), 'test': build('test')}
    if built and verbose:
        print(f'[data] SpikingJelly integrated the events of {root} into {T} frames per sample in '
              f'{time.time() - tic:.1f} s')
    return sets


def _load_split(dataset, input_size: int) -> tuple:
    xs, ys = [], []
    for i in range(len(dataset)):
        frames, target = dataset[i]
        x = torch.from_numpy(frames).float()                     # [T, 2, 128, 128]
        if x.shape[-1] != input_size or x.shape[-2] != input_size:
            x = F.adaptive_avg_pool2d(x, input_size)             # area downsampling (e.g. 128 -> 48)
        xs.append(x.to(torch.float16))
        ys.append(int(target))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _signature(dataset) -> list:
    out = []
    for path, target in dataset.samples:
        st = os.stat(path)
        out.append((os.path.basename(path), int(target), st.st_size, int(st.st_mtime)))
    return out


def _prepare(root: str, T: int, input_size: int, build: bool, verbose: bool) -> dict:
    DVS128Gesture = _import_dvs128()
    cache_dir = os.path.join(root, 'cf_cache')
    out = {}
    for split, ds in _integrate(root, T, DVS128Gesture, verbose).items():
        path = os.path.join(cache_dir, f'{split}_T{T}_size{input_size}.pt')
        signature = _signature(ds)
        cached = torch.load(path, weights_only=False) if os.path.isfile(path) else None
        if cached is not None and cached.get('signature') != signature:
            cached = None
        if cached is None:
            if not build:
                raise RuntimeError(f'frame cache {path} is missing or stale after rank 0 built it')
            tic = time.time()
            x, y = _load_split(ds, input_size)
            cached = {'x': x, 'y': y, 'signature': signature}
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(cached, path + '.tmp')
            os.replace(path + '.tmp', path)
            if verbose:
                print(f'[data] cached {len(y)} {split} samples as [{T}, 2, {input_size}, {input_size}] '
                      f'frames in {path} ({time.time() - tic:.1f} s)')
        out[split] = FramesDataset(cached['x'], cached['y'])
    return out


def load_frames(root: str, T: int, input_size: int, dist_, verbose: bool = True) -> dict:
    """``{'train': FramesDataset, 'test': FramesDataset}`` of ``[T, 2, S, S]`` frames.

    Rank 0 integrates (SpikingJelly), downsamples and caches in ``root/cf_cache``; the other
    ranks wait for it and read the cache.
    """
    out = _prepare(root, T, input_size, True, verbose) if dist_.is_main else None
    dist_.barrier()
    if out is None:
        out = _prepare(root, T, input_size, False, False)
    return out


def build_data(args, dist_, task):
    if args.data_dir is not None:
        root = args.data_dir
        if dist_.is_main:
            _check_real_root(root, _import_dvs128())
        task.class_names = [REAL_CLASS_NAMES[int(s)] for s in sorted(str(i) for i in range(NUM_CLASSES))]
    else:
        from spikingjelly_cf.datasets.synthetic_gesture import LOADER_CLASS_NAMES, write_synthetic_gesture
        root = args.synthetic_root
        if dist_.is_main:
            tic = time.time()
            write_synthetic_gesture(root, n_train_per_class=args.synthetic_train, n_test_per_class=args.synthetic_test,
                                    seed=args.data_seed)
            took = time.time() - tic
            if took > 1:
                print(f'[data] wrote the built-in synthetic gesture set ({args.synthetic_train} train + '
                      f'{args.synthetic_test} test per class, seed {args.data_seed}) to {root} in {took:.1f} s')
        dist_.barrier()
        task.class_names = list(LOADER_CLASS_NAMES)
    sets = load_frames(root, args.T, args.input_size, dist_, verbose=dist_.is_main)
    return sets['train'], sets['test']


def to_input(x: torch.Tensor, args) -> torch.Tensor:
    """``[B, T, 2, S, S]`` frames -> ``[T, B, 2, S, S]`` float32."""
    return x.float().transpose(0, 1).contiguous()


def make_augment(shift: int):
    """Random translation of each sample by up to ``shift`` pixels (zero fill). No flips: they
    would turn a leftward gesture into a rightward one."""
    if shift <= 0:
        return None

    def augment(x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        d = torch.randint(-shift, shift + 1, (B, 2))
        padded = F.pad(x, (shift, shift, shift, shift))
        H, W = x.shape[-2:]
        return torch.stack([padded[i, ..., shift + d[i, 0]:shift + d[i, 0] + H, shift + d[i, 1]:shift + d[i, 1] + W]
                            for i in range(B)])
    return augment


# ----------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = parser.add_argument_group('model and data')
    m.add_argument('--arch', choices=('vggsnn', 'dvsgesturenet'), default='vggsnn')
    m.add_argument('--width', type=int, default=None,
                   help='channels of the first layer (None: %s)' % ', '.join(
                       f'{w} for {a}' for a, w in DEFAULT_WIDTH.items()))
    m.add_argument('--voting-size', type=int, default=10, help='voting neurons per class (vggsnn)')
    m.add_argument('--input-size', type=int, default=None,
                   help='frames are downsampled to this size (None: 48 for vggsnn, 128 for dvsgesturenet)')
    m.add_argument('--shift', type=int, default=0, help='training augmentation: random translation (pixels)')
    m.add_argument('--data-dir', default=None,
                   help='root of the real DVS128 Gesture set (default: the built-in synthetic set)')
    m.add_argument('--synthetic-root', default=os.path.join('data', 'synthetic_gesture'),
                   help='where the built-in synthetic set is written (cached)')
    m.add_argument('--synthetic-train', type=int, default=DEFAULT_SYNTHETIC['train'],
                   help='synthetic training samples per class')
    m.add_argument('--synthetic-test', type=int, default=DEFAULT_SYNTHETIC['test'],
                   help='synthetic test samples per class')
    m.add_argument('--data-seed', type=int, default=0, help='seed of the synthetic set')
    common.add_common_arguments(parser, **DEFAULTS)
    return parser


def parse_args(argv=None):
    args = common.parse_arguments(get_parser(), argv)
    if args.width is None:
        args.width = DEFAULT_WIDTH[args.arch]
    if args.input_size is None:
        args.input_size = 128 if args.arch == 'dvsgesturenet' else 48
    if args.arch == 'dvsgesturenet' and args.input_size != 128:
        raise SystemExit('--arch dvsgesturenet needs --input-size 128 (five 2x2 poolings down to 4x4)')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    task = common.Task(name='dvs_gesture', build_model=build_model, build_data=None, to_input=to_input,
                       augment=make_augment(args.shift),
                       data_arguments=('data_dir', 'synthetic_root', 'synthetic_train', 'synthetic_test',
                                       'data_seed'))
    task.build_data = lambda a, d: build_data(a, d, task)
    return common.main(task, args)


if __name__ == '__main__':
    main()
