"""Shared helpers of the benchmarks: environment stamp, timing, peak memory, JSON, Markdown, plots.

Nothing here imports SpikingJelly: the scripts choose (through ``PYTHONPATH``) which installed
SpikingJelly they run against and import it themselves.

Timing follows one rule: warm up, synchronise, then time single calls (``time.perf_counter`` on
the CPU, CUDA events around a synchronised call on the GPU) until both a minimum number of repeats
and a time budget are reached, and report the median with its quartiles.
"""
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

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
# timing and memory
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float   # seconds
    q25: float
    q75: float
    min: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            min_repeats: int = 5, max_repeats: int = 100, budget_s: float = 1.0) -> Timing:
    """Median time of ``fn()`` in seconds after ``warmup`` calls.

    Repeats until at least ``min_repeats`` calls and ``budget_s`` seconds of measurement (or
    ``max_repeats`` calls). On CUDA every call is bracketed by CUDA events and synchronised.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    gc.collect()
    times: List[float] = []
    began = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats
                                        or time.perf_counter() - began < budget_s):
        if device.type == 'cuda':
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(median=statistics.median(times), q25=q[0], q75=q[2], min=times[0],
                  repeats=len(times))


class _AllocationTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Live bytes of tensor storages created by ATen ops while active, and their peak.

    Used on the CPU, where PyTorch keeps no allocator statistics. A storage is counted from the
    op that creates it until the last tensor viewing it is freed. Memory that a kernel allocates
    itself (outside ATen) is not seen.
    """

    def __init__(self):
        super().__init__()
        self.live: Dict[int, list] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: tensors created by ATen ops during the call
    (a dispatch-mode tracker; ``tracemalloc`` does not see PyTorch's allocations).
    """
    gc.collect()
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    tracker = _AllocationTracker()
    with tracker:
        fn()
    return int(tracker.peak)


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
