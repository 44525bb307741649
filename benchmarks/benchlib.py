"""Shared helpers of the benchmarks: environment stamp, timing, peak memory, JSON, Markdown, plots.

Nothing here imports SpikingJelly: the scripts choose (through ``PYTHONPATH``) which installed
SpikingJelly they run against and import it themselves.

Timing follows one rule: warm up, synchronise, then time single calls (``time.perf_counter`` on
the CPU, CUDA events around a synchronised call on the GPU) until both a minimum number of repeats
and a time budget are reached, and report the median with its quartiles.
"""
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
from typing import Iterable, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run from a checkout without installing spikingjelly_cf
    sys.path.insert(0, REPO_ROOT)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def git_commit() -> str:
    """``<sha>`` of the checkout, with ``+dirty`` when tracked files differ, or ``'unknown'``."""
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    if not sha:
        return 'unknown'
    return sha + ('+dirty' if dirty else '')


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or 'unknown CPU'


def device_label(device: torch.device) -> str:
    """Folder-friendly device name: ``cpu-2core`` or the GPU name (``nvidia-h200``)."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')
    return f'cpu-{cpu_count()}core'


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def environment(device: torch.device) -> dict:
    """Versions, device, commit and date, the stamp of every result file."""
    import numpy
    import spikingjelly
    import spikingjelly_cf
    info = {
        'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'git_commit': git_commit(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'numpy': numpy.__version__,
        'spikingjelly': spikingjelly_cf.SPIKINGJELLY_VERSION,
        'spikingjelly_path': os.path.dirname(spikingjelly.__file__),
        'spikingjelly_cf': getattr(spikingjelly_cf, '__version__', 'unknown'),
        'device': str(device),
        'device_label': device_label(device),
        'cpu': cpu_name(),
        'cpu_count': cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'platform': platform.platform(),
        'load_average_start': load_average(),
    }
    try:
        import cupy
        info['cupy'] = cupy.__version__
    except Exception:  # noqa: BLE001 - any import failure just means "no CuPy"
        info['cupy'] = None
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info['gpu'] = torch.cuda.get_device_name(device)
        info['gpu_memory_GiB'] = round(props.total_memory / 2 ** 30, 1)
        info['cuda'] = torch.version.cuda
    return info


def results_dir(root: str, device: torch.device, date: Optional[str] = None) -> str:
    """``<root>/<YYYY-MM-DD>_<device label>/``, created."""
    date = date or datetime.date.today().isoformat()
    path = os.path.join(root, f'{date}_{device_label(device)}')
    os.makedirs(path, exist_ok=True)
    return path


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device {name}: CUDA is not available on this machine')
    return device


def parse_dtype(name: str) -> torch.dtype:
    table = {'float32': torch.float32, 'fp32': torch.float32, 'float16': torch.float16,
             'fp16': torch.float16, 'half': torch.float16, 'bfloat16': torch.bfloat16,
             'bf16': torch.bfloat16, 'float64': torch.float64}
    if name not in table:
        raise SystemExit(f'unknown dtype {name!r}; choose from {sorted(table)}')
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


# ---------------------------------------------------------------------------------------------
# timing and memory: spikingjelly_cf._bench's (``python -m spikingjelly_cf bench`` times with the
# same code), looked up on first use: importing the package imports SpikingJelly, which must wait
# until a script has set its environment (bench_neuron.py --sj2-lif-impl)
# ---------------------------------------------------------------------------------------------
_FROM_PACKAGE = ('Timing', '_AllocationTracker', 'measure', 'peak_memory', 'synchronize')


def __getattr__(name: str):
    if name in _FROM_PACKAGE:
        from spikingjelly_cf import _bench
        return getattr(_bench, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------
def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return 'n/a'
    if seconds >= 1:
        return f'{seconds:.2f} s'
    if seconds >= 1e-3:
        return f'{seconds * 1e3:.3g} ms'
    return f'{seconds * 1e6:.3g} us'


def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return 'n/a'
    return f'{seconds * 1e3:.4g}'


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return 'n/a'
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if abs(n) < 1024 or unit == 'GiB':
            return f'{n:.3g} {unit}' if unit != 'B' else f'{int(n)} B'
        n /= 1024
    return f'{n:.3g} GiB'  # pragma: no cover


def fmt_n(n: int) -> str:
    """``2^20`` for powers of two, else the number."""
    if n > 0 and n & (n - 1) == 0:
        return f'2^{n.bit_length() - 1}'
    return str(n)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    header = [str(h) for h in header]
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---' if i < 2 else '---:' for i in range(len(header))) + '|']
    for row in rows:
        lines.append('| ' + ' | '.join(str(c) for c in row) + ' |')
    return '\n'.join(lines)


def rst_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A reStructuredText grid-free ``simple`` table."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    rule = '  '.join('=' * w for w in widths)
    out = [rule, '  '.join(c.ljust(w) for c, w in zip(cells[0], widths)), rule]
    out += ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    out.append(rule)
    return '\n'.join(out)


def stamp_lines(meta: dict) -> List[str]:
    """Markdown bullet lines with the environment stamp."""
    keys = ['date', 'git_commit', 'device', 'gpu', 'cpu', 'cpu_count', 'torch_threads', 'torch',
            'cuda', 'cupy', 'numpy', 'spikingjelly', 'spikingjelly_path', 'spikingjelly_cf',
            'python', 'load_average_start', 'load_average_end']
    return [f'- {k}: `{meta[k]}`' for k in keys if k in meta and meta[k] is not None]


def write_json(path: str, payload: dict) -> None:
    with open(path, 'w') as f:
        json.dump(payload, f, indent=1, sort_keys=False, default=str)
        f.write('\n')


def write_text(path: str, text: str) -> None:
    with open(path, 'w') as f:
        f.write(text if text.endswith('\n') else text + '\n')


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def verdict(passed: Optional[bool]) -> str:
    return {True: 'PASS', False: 'FAIL', None: 'n/a'}[passed]
