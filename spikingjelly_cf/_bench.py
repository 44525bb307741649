r"""Timing core of the benchmarks, and ``python -m spikingjelly_cf bench``.

Two parts, both used by the scripts under ``benchmarks/`` (not installed; ``benchmarks/benchlib.py``
re-exports the first, ``benchmarks/gpu_bench.py`` is a command line over the second):

* timing and memory: :func:`measure` (warm up, synchronise, time single calls, median and
  quartiles), :func:`peak_memory`, :func:`synchronize`;
* the neuron benchmark behind ``bench``: CF on every kernel backend that runs the device and
  dtype, against SpikingJelly's ``LIFNode`` on each backend it has there and against a device copy
  of the bytes the fused CF kernel must move (:func:`bytes_moved`), training (forward + backward)
  and inference (``no_grad``), ``[T, N]`` inputs (:func:`run_bench`). Each CF backend is first
  checked against the float32 reference (:func:`check_cf`). Per case: median time, fraction of
  the copy bandwidth (copy time / time), peak memory above the inputs, ratio to the fastest LIF.

Timing follows one rule: warm up, synchronise, then time single calls (``time.perf_counter`` on
the CPU, CUDA events around a synchronised call on the GPU) until both a minimum number of repeats
and a time budget are reached, and report the median with its quartiles.
"""
import gc
import math
import os
import statistics
import time
import traceback
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

__all__ = ['synchronize', 'Timing', 'measure', 'peak_memory', 'bytes_moved', 'cf_candidates',
           'lif_candidates', 'check_cf', 'make_call', 'largest_fitting_log2n', 'run_bench',
           'markdown', 'format_rows', 'TARGET_LOG2N', 'TARGET_RATIO', 'TARGET_COPY']


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
# CF against SpikingJelly's LIFNode
# ---------------------------------------------------------------------------------------------
#: The targets evaluated on GPU runs: training at N = 2^22, CF's fastest backend <= 1.0x the
#: fastest LIF, >= 70 % of the copy bandwidth.
TARGET_LOG2N, TARGET_RATIO, TARGET_COPY = 22, 1.0, 0.70
MODES = ('training', 'inference')


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def bytes_moved(mode: str, T: int, N: int, element_size: int) -> int:
    """Least bytes a fused CF kernel moves: storage-dtype x, s, gradients; float32 h saved.

    inference: read x, write s [T, N]; read v0, write v_last [N].
    training: forward reads x, writes s and h (float32); backward reads grad_s and h, writes
    grad_x; plus v0, v_last, grad_v0 [N].
    """
    if mode == 'inference':
        return (2 * T + 2) * N * element_size
    return T * N * (4 * element_size + 2 * 4) + 3 * N * element_size


def cf_candidates(device: torch.device, dtype: torch.dtype, compiled: bool = True,
                  only=None) -> dict:
    """``{name: (callable(x, v) -> (s, v_last), why-not)}`` for CF's kernel backends on
    ``device`` (Triton's interpreter, a test mode, and ``'inductor'`` without ``compiled`` are
    left out; ``only``: these backends only), plus ``'auto'`` with what it picks."""
    from . import backends
    from ._info import available_on
    from .functional.neuron import cf_multi_step, resolve_backend
    from .surrogate import CFRect
    out = {}
    probe = torch.zeros(1, 4, device=device, dtype=dtype)
    for name in backends.KERNEL_BACKENDS:
        if (device.type == 'cpu' and name == 'triton') or (only and name not in only):
            continue  # the interpreter runs CPU tensors for tests only
        if name == 'inductor' and not compiled:
            out[name] = (None, 'left out (compiles for tens of seconds; run without --quick)')
            continue
        ok, why = available_on(name, device.type)
        if not ok:
            out[name] = (None, why)
            continue
        if dtype not in backends.kernel_dtypes(name, device.type):
            out[name] = (None, f'{_dtype_name(dtype)} runs on the reference')
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                chosen = resolve_backend(name, probe, CFRect())
            if chosen != name:
                raise RuntimeError(f'{_dtype_name(dtype)} runs on {chosen!r}')
            out[name] = ((lambda x, v, name=name: cf_multi_step(x, v, backend=name)[:2]), None)
        except Exception as exc:  # noqa: BLE001 - recorded, never dropped
            out[name] = (None, f'{type(exc).__name__}: {exc}'.splitlines()[0][:200])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            out['auto'] = (None, f"'auto' picks {resolve_backend('auto', probe, CFRect())!r}")
        except Exception:  # noqa: BLE001
            pass
    return out


def lif_candidates(device: torch.device) -> dict:
    """``{name: (factory, why-not)}`` for SpikingJelly's LIFNode on this device."""
    from spikingjelly.activation_based import neuron as sj_neuron
    from . import _compat
    out = {}
    if _compat.CLASSIC:
        for b in sj_neuron.LIFNode(step_mode='m').supported_backends:
            reason = None
            if b == 'cupy':
                if device.type != 'cuda':
                    reason = 'CuPy needs CUDA'
                else:
                    try:
                        import cupy  # noqa: F401
                        import numpy
                        if 'int' not in numpy.__dict__:
                            numpy.int = int  # the one-line fix 0.0.0.0.14's auto_cuda needs
                    except Exception as exc:  # noqa: BLE001
                        reason = f'cupy not importable: {exc}'.splitlines()[0]
            out[b] = ((lambda b=b: sj_neuron.LIFNode(step_mode='m', backend=b)), reason)
    else:
        out['default'] = ((lambda: sj_neuron.LIFNode(step_mode='m')), None)
    return out


def check_cf(fn, device, dtype) -> str:
    """Spikes against the float32 reference on a small input: 'ok' or what differs."""
    from .backends.reference import cf_multi_step_ref
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(8, 4099, generator=g, device=device) * 1.5).to(dtype)
    s, v = fn(x, torch.zeros(4099, device=device, dtype=dtype))
    s_r, v_r, _, _ = cf_multi_step_ref(x.float(), torch.zeros(4099, device=device))
    if not torch.equal(s.float(), s_r):
        return f'spikes differ at {(s.float() != s_r).sum().item()} of {s.numel()}'
    err = (v.float() - v_r).abs().max().item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
           torch.float64: 1e-5}[dtype] * 4
    return 'ok' if err <= tol else f'v_last differs by {err:.3g}'


def make_call(kind, obj, mode, x, v0, grad):
    """A no-argument call of one candidate in one mode."""
    if kind == 'cf':
        if mode == 'inference':
            def call():
                with torch.no_grad():
                    obj(x, v0)
        else:
            xg = x.detach().requires_grad_(True)

            def call():
                xg.grad = None
                s, _ = obj(xg, v0)
                s.backward(grad)
        return call
    module = obj
    from spikingjelly.activation_based import functional as sj_functional
    if mode == 'inference':
        def call():
            sj_functional.reset_net(module)
            with torch.no_grad():
                module(x)
    else:
        xg = x.detach().requires_grad_(True)

        def call():
            sj_functional.reset_net(module)
            xg.grad = None
            module(xg).backward(grad)
    return call


#: Memory one training case may need, in [T, N] tensors of 4 bytes (inputs, the LIF's saved
#: tensors, gradients, the copy's buffers): a generous bound used to pick the largest N.
TENSORS_PER_CASE = 24


def _free_bytes(device: torch.device) -> Optional[int]:
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def largest_fitting_log2n(device: torch.device, T: int, max_log2n: int = 24,
                          min_log2n: int = 10) -> int:
    """The largest ``log2 N <= max_log2n`` whose case fits in half the free memory."""
    free = _free_bytes(device)
    if free is None:
        return min(max_log2n, 20)
    for log2n in range(max_log2n, min_log2n - 1, -1):
        if TENSORS_PER_CASE * T * 2 ** log2n * 4 <= free // 2:
            return log2n
    return min_log2n


def run_bench(device: torch.device, dtypes, T: int, log2ns, modes=MODES, budget_s: float = 0.3,
              deadline_s: float = 240.0, compiled: bool = True, meta: Optional[dict] = None,
              log=print, only=None) -> dict:
    """CF's backends vs LIFNode and the copy on ``[T, 2^log2n]`` inputs; the payload of the JSON
    (``meta``, ``config``, ``notes``, ``rows``, ``targets``). Cases that no longer fit the
    deadline are recorded as skipped; errors are recorded and the run goes on."""
    began = time.perf_counter()
    meta = dict(meta or {})
    rows, notes = [], []

    def left():
        return deadline_s - (time.perf_counter() - began)

    for dtype in dtypes:
        dtype_name = _dtype_name(dtype)
        cands = []  # (name, kind, obj)
        for name, (fn, why) in cf_candidates(device, dtype, compiled, only).items():
            label = f'CF[{name}]'
            if fn is None:
                notes.append(f'{dtype_name} {label}: {why}')
                continue
            t0 = time.perf_counter()
            try:
                verdict = check_cf(fn, device, dtype)
            except Exception as exc:  # noqa: BLE001
                verdict = f'{type(exc).__name__}: {exc}'.splitlines()[0][:200]
                traceback.print_exc()
            notes.append(f'{dtype_name} {label}: check {verdict} '
                         f'(first calls {time.perf_counter() - t0:.1f} s, compilation included)')
            log(notes[-1])
            if verdict == 'ok' or not verdict.startswith(('RuntimeError', 'TypeError')):
                cands.append((label, 'cf', fn))
        for name, (factory, why) in lif_candidates(device).items():
            label = f'LIF[{name}]'
            if why is not None:
                notes.append(f'{dtype_name} {label}: {why}')
                continue
            cands.append((label, 'lif', factory))
        for log2n in log2ns:
            N = 2 ** log2n
            g = torch.Generator(device=device).manual_seed(log2n)
            try:
                x = (torch.randn(T, N, generator=g, device=device) * 1.5).to(dtype)
                grad = torch.randn(T, N, generator=g, device=device).to(dtype)
                v0 = torch.zeros(N, device=device, dtype=dtype)
            except Exception as exc:  # noqa: BLE001 - out of memory
                notes.append(f'{dtype_name} N=2^{log2n}: inputs: {exc}'.splitlines()[0])
                continue
            for mode in modes:
                nbytes = bytes_moved(mode, T, N, x.element_size())
                case = dict(dtype=dtype_name, T=T, N=N, log2n=log2n, mode=mode, bytes=nbytes)
                try:
                    half = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(half)
                    t_copy = measure(lambda: dst.copy_(half), device, budget_s=budget_s).median
                    del half, dst
                except Exception as exc:  # noqa: BLE001
                    t_copy = None
                    notes.append(f'copy {case}: {exc}'.splitlines()[0])
                rows.append(dict(case, candidate='copy', status='ok', time_s=t_copy,
                                 frac_copy=1.0 if t_copy else None, peak_bytes=None))
                for label, kind, obj in cands:
                    row = dict(case, candidate=label)
                    if left() < 5:
                        rows.append(dict(row, status='skipped: deadline'))
                        continue
                    try:
                        module = obj() if kind == 'lif' else obj
                        if kind == 'lif':
                            module = module.to(device)
                        call = make_call(kind, module, mode, x, v0, grad)
                        timing = measure(call, device, warmup=3, min_repeats=5,
                                         budget_s=budget_s)
                        peak = peak_memory(call, device)
                        row.update(status='ok', time_s=timing.median, q25=timing.q25,
                                   q75=timing.q75, repeats=timing.repeats, peak_bytes=peak,
                                   frac_copy=(t_copy / timing.median) if t_copy else None,
                                   GBps=nbytes / timing.median / 1e9)
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        row.update(status=f'error: {type(exc).__name__}: {exc}'.splitlines()[0]
                                   [:200])
                        traceback.print_exc()
                    rows.append(row)
                    log(_row_line(row))
                    if device.type == 'cuda':
                        torch.cuda.empty_cache()
            del x, grad, v0
            if device.type == 'cuda':
                torch.cuda.empty_cache()

    # ratios to LIF fastest, targets
    def same_case(a, b):
        return all(a[k] == b[k] for k in ('dtype', 'N', 'mode'))

    for r in rows:
        lif = [q['time_s'] for q in rows if same_case(q, r) and q['candidate'].startswith('LIF')
               and q.get('status') == 'ok']
        r['lif_fastest_s'] = min(lif) if lif else None
        if r.get('status') == 'ok' and r.get('time_s') and lif:
            r['ratio_vs_lif'] = r['time_s'] / min(lif)
    targets = []
    for dtype in dtypes:
        case_rows = [r for r in rows if r['dtype'] == _dtype_name(dtype)
                     and r['log2n'] == TARGET_LOG2N and r['mode'] == 'training'
                     and r['candidate'].startswith('CF[') and r.get('status') == 'ok']
        if not case_rows:
            continue
        best = min(case_rows, key=lambda r: r['time_s'])
        targets.append(dict(dtype=_dtype_name(dtype), fastest=best['candidate'],
                            ratio_vs_lif=best.get('ratio_vs_lif'),
                            frac_copy=best.get('frac_copy'),
                            ratio_ok=(best.get('ratio_vs_lif') is not None
                                      and best['ratio_vs_lif'] <= TARGET_RATIO),
                            copy_ok=(best.get('frac_copy') is not None
                                     and best['frac_copy'] >= TARGET_COPY)))
    meta['total_s'] = round(time.perf_counter() - began, 1)
    config = dict(device=str(device), dtypes=[_dtype_name(d) for d in dtypes], T=T,
                  log2n=list(log2ns), modes=list(modes), budget_s=budget_s,
                  deadline_s=deadline_s, compiled=compiled, backends=only)
    return dict(meta=meta, config=config, notes=notes, rows=rows, targets=targets)


def _row_line(r: dict) -> str:
    if r.get('status') != 'ok':
        return f"{r['mode']:<9} {r['dtype']:<8} N=2^{r['log2n']:<2} {r['candidate']:<14} {r['status']}"
    return (f"{r['mode']:<9} {r['dtype']:<8} N=2^{r['log2n']:<2} {r['candidate']:<14} "
            f"{r['time_s'] * 1e3:10.4g} ms  {r['GBps']:7.1f} GB/s  "
            f"{(r.get('frac_copy') or 0):6.0%} of copy")


def _fmt(v, spec):
    return '' if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_rows(payload: dict) -> str:
    """The rows as a plain-text table (what ``bench`` prints)."""
    header = ('dtype', 'mode', 'N', 'candidate', 'time (ms)', 'of copy', 'x LIF fastest',
              'peak (MiB)', 'status')
    body = []
    for r in payload['rows']:
        body.append((r['dtype'], r['mode'], f"2^{r['log2n']}", r['candidate'],
                     _fmt(r['time_s'] * 1e3 if r.get('time_s') else None, '.4g'),
                     _fmt(r.get('frac_copy'), '.0%'), _fmt(r.get('ratio_vs_lif'), '.2f'),
                     _fmt(r['peak_bytes'] / 2 ** 20 if r.get('peak_bytes') else None, '.0f'),
                     r.get('status', '')))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ['  '.join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip(),
             '  '.join('-' * w for w in widths)]
    lines += ['  '.join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in body]
    return '\n'.join(lines)


def markdown(payload: dict, stamp_lines: List[str] = (),
             title: str = 'CF backends vs SpikingJelly LIFNode') -> str:
    """The report as Markdown: stamp, notes, the table, the targets."""
    T = payload['config']['T']
    lines = [f'# {title}', '']
    lines += list(stamp_lines) + ['']
    lines += [f'T = {T}; median of timed calls after warm-up (CUDA events on the GPU); "of copy" '
              f'= time of a device copy of the bytes the fused CF kernel must move / time; peak = '
              f'memory allocated above the inputs during one call.', '']
    for note in payload['notes']:
        lines.append(f'- {note}')
    lines.append('')
    header = ['dtype', 'mode', 'N', 'candidate', 'time (ms)', 'of copy', 'x LIF fastest',
              'peak (MiB)', 'status']
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    for r in payload['rows']:
        cells = [r['dtype'], r['mode'], f"2^{r['log2n']}", r['candidate'],
                 _fmt(r['time_s'] * 1e3 if r.get('time_s') else None, '.4g'),
                 _fmt(r.get('frac_copy'), '.0%'), _fmt(r.get('ratio_vs_lif'), '.2f'),
                 _fmt(r['peak_bytes'] / 2 ** 20 if r.get('peak_bytes') else None, '.0f'),
                 r.get('status', '')]
        lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    lines += ['', f'## Targets (training, N = 2^{TARGET_LOG2N}: CF fastest <= {TARGET_RATIO}x LIF '
                  f'fastest, >= {TARGET_COPY:.0%} of copy bandwidth)', '']
    verdict = {True: 'PASS', False: 'FAIL', None: 'n/a'}
    for t in payload['targets']:
        lines.append(f"- {t['dtype']}: {t['fastest']}, {t['ratio_vs_lif'] or float('nan'):.2f}x "
                     f"LIF ({verdict[t['ratio_ok']]}), "
                     f"{(t['frac_copy'] or 0):.0%} of copy ({verdict[t['copy_ok']]})")
    return '\n'.join(lines) + '\n'
