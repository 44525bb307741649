r"""``python -m spikingjelly_cf check``: every backend here against the float64 reference.

For every device (the CPU and each CUDA device), every backend that runs there (``'cpp'``,
``'inductor'``, ``'torch'`` on the CPU, plus ``'triton'`` in Triton's interpreter; ``'cupy'``,
``'triton'``, ``'inductor'``, ``'torch'`` on CUDA), every dtype it runs (float32, float16 and
bfloat16 where the kernel takes them, float64 for ``'inductor'``) and every surrogate the kernels
implement (CFRect, TSG, SpikingJelly's Sigmoid and ATan), one row: PASS or FAIL and the largest
error of its cases (:data:`CASES`), each against the reference ``cf_multi_step_ref`` run in
float64 on the same (rounded) input:

* ``T=8``: CFNode's defaults, TSG steps from ``t_start = 2``, upstream gradients into ``s``,
  ``v_last``, ``h_seq`` and ``v_seq``;
* ``T=8, other parameters``: ``decay_input``, asymmetric thresholds, ``k_pos=3, k_neg=1``,
  ``detach_reset`` (the kernels' other branches), gradient through ``s`` only;
* ``T=1`` and a long ``T`` (64 with ``--quick``, 256 otherwise);
* ``non-contiguous``: ``x_seq`` ``[T, B, C]`` and ``v`` as transposed views;
* ``single-step vs multi-step``: ``T`` calls of one step each (the state carried in the
  backend's dtype, as a single-step ``CFNode`` does) against the same chain of the reference,
  and, in float32/float64, bit for bit against one multi-step call of the backend.

Spikes must equal the reference's exactly (the inputs keep every float64 trajectory
``_probe.MARGIN`` away from the levels and CFRect's window edges, so rounding cannot flip one);
``h``, ``v``, ``v_last`` and the gradients of ``x``, ``v`` and TSG's parameter must agree to
``_probe.TOLERANCES`` after scaling by ``max(1, max|reference|)``.

Per backend and device, two more rows: ``opcheck`` (``torch.library.opcheck`` of its forward and
backward ops: schema, fake tensor, autograd registration, AOT dispatch) and ``torch.compile``
(``cf_multi_step`` with TSG under ``torch.compile(fullgraph=True)`` against eager; Inductor, or
``aot_eager`` with ``--quick``).

``'inductor'`` compiles one graph per configuration (tens of seconds each on two CPU cores): it
runs the ``T=8``, ``T=1`` and ``non-contiguous`` cases, and ``--quick`` leaves it out.
"""
import datetime
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import backends
from ._info import available_on
from .backends import _probe
from .backends._probe import Comparison, Params, DEFAULT_PARAMS, VARIANT_PARAMS

__all__ = ['CASES', 'Row', 'plan', 'run_check', 'main']

#: Case names, in order (the long one is ``T=<long>``).
CASES = ('T=8', 'T=8, other parameters', 'T=1', 'T=long', 'non-contiguous',
         'single-step vs multi-step')
#: Cases of the 'inductor' backend (one compilation per configuration).
INDUCTOR_CASES = ('T=8', 'T=1', 'non-contiguous')


@dataclass
class Sizes:
    n: int          # neurons of the T=8 / T=1 cases
    n_long: int     # neurons of the long case
    t_long: int


def sizes(device: torch.device, quick: bool) -> Sizes:
    """Problem sizes; ragged on purpose (not multiples of the kernels' block sizes)."""
    if device.type == 'cuda':
        return Sizes(4101, 4101, 64) if quick else Sizes(65541, 16389, 256)
    return Sizes(1029, 1029, 64) if quick else Sizes(4101, 4101, 256)


@dataclass
class Row:
    """One row of the report: a backend on a device, a dtype and a surrogate (or one of the
    per-backend checks ``'opcheck'`` / ``'torch.compile'``)."""
    backend: str
    device: str
    dtype: str
    surrogate: str
    cases: List[str]
    passed: Optional[bool] = None
    largest_error: Optional[float] = None
    largest_error_of: str = ''
    message: str = ''
    results: List[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(backend=self.backend, device=self.device, dtype=self.dtype,
                    surrogate=self.surrogate, passed=self.passed,
                    largest_error=self.largest_error, largest_error_of=self.largest_error_of,
                    message=self.message, cases=self.results, seconds=round(self.seconds, 3))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16,
           'float64': torch.float64}


def devices(only: Optional[List[str]] = None) -> List[torch.device]:
    out = [torch.device('cpu')]
    if torch.cuda.is_available():
        out += [torch.device('cuda', i) for i in range(torch.cuda.device_count())]
    if only:
        wanted = [torch.device(d) for d in only]
        out = [d for d in out if any(d.type == w.type and (w.index is None or w.index == d.index)
                                     for w in wanted)]
    return out


def plan(quick: bool, only_backends=None, only_devices=None, only_dtypes=None,
         only_surrogates=None) -> Tuple[List[Tuple[torch.device, Row]], List[dict]]:
    """The rows to run, and what is not checked here (with the reason)."""
    rows, skipped = [], []
    names = ['torch'] + list(backends.KERNEL_BACKENDS)
    if only_surrogates:
        known = [n.lower() for n in _probe.KIND_NAMES.values()]
        unknown = [sg for sg in only_surrogates if sg.lower() not in known]
        if unknown:
            raise SystemExit(f'--surrogates: unknown {unknown}; surrogates are '
                             f'{list(_probe.KIND_NAMES.values())}')
    if only_devices:
        for name in only_devices:
            try:
                wanted = torch.device(name)
            except RuntimeError as exc:
                raise SystemExit(f'--devices: {name!r} is not a device ({exc})')
            if wanted.type == 'cuda' and not torch.cuda.is_available():
                skipped.append(dict(backend='every backend', device=name,
                                    reason='PyTorch sees no CUDA device'))
    if only_backends:
        unknown = [b for b in only_backends if b not in names]
        if unknown:
            raise SystemExit(f'--backends: unknown {unknown}; backends are {names}')
        names = [n for n in names if n in only_backends]
    for device in devices(only_devices):
        for name in names:
            ok, why = available_on(name, device.type)
            if not ok:
                skipped.append(dict(backend=name, device=str(device), reason=why))
                continue
            if name == 'inductor' and quick:
                skipped.append(dict(backend=name, device=str(device),
                                    reason='left out by --quick (it compiles one graph per '
                                           'configuration, tens of seconds each on a small CPU)'))
                continue
            if name == 'torch':
                dtypes = (torch.float32,)
            else:
                dtypes = tuple(backends.kernel_dtypes(name, device.type))
            if only_dtypes:
                dtypes = tuple(d for d in dtypes if _dtype_name(d) in only_dtypes)
            kinds = [k for k in _probe.KINDS if not only_surrogates
                     or _probe.KIND_NAMES[k].lower() in [s.lower() for s in only_surrogates]]
            for dtype in dtypes:
                for kind in kinds:
                    if name == 'inductor' and dtype == torch.float64 and kind != 'rect':
                        continue  # float64 compiles the same loop again: one surrogate is enough
                    cases = list(INDUCTOR_CASES if name == 'inductor' else CASES)
                    rows.append((device, Row(name, str(device), _dtype_name(dtype),
                                             _probe.KIND_NAMES[kind], cases)))
            if name not in ('torch', 'inductor') and dtypes:
                rows.append((device, Row(name, str(device), _dtype_name(dtypes[0]), 'opcheck',
                                         ['ops'])))
                rows.append((device, Row(name, str(device), _dtype_name(dtypes[0]),
                                         'torch.compile', ['fullgraph'])))
    return rows, skipped


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------
def _kind_of(row: Row) -> str:
    return {v: k for k, v in _probe.KIND_NAMES.items()}[row.surrogate]


def _case(fn, device, dtype, kind, sz: Sizes, case: str, seed: int) -> Comparison:
    """One case of one row: a :class:`~._probe.Comparison` (its message names what differs)."""
    every = ('s', 'v_last', 'h', 'v_seq')
    T, N, p, t_start, upstream = 8, sz.n, DEFAULT_PARAMS, 2, every
    if case == 'T=8, other parameters':
        p, t_start, upstream = VARIANT_PARAMS, 0, ('s',)
    elif case == 'T=1':
        T, t_start = 1, 5
    elif case == 'T=long':
        T, N, t_start, upstream = sz.t_long, sz.n_long, 0, ('s', 'v_last')
    sg = _probe.make_surrogate(kind, t_start + T, seed=seed, device=device)
    if case == 'single-step vs multi-step':
        return _single_vs_multi(fn, device, dtype, kind, sg, N, seed)
    inp = _probe.make_inputs(T, N, dtype, device, p, sg, kind, t_start, upstream, seed=seed)
    x, v0 = inp.x, inp.v0
    if case == 'non-contiguous':
        B = 3
        C = N // B
        N = B * C
        x, v0 = x[:, :N], v0[:N]
        inp.upstream = {k: (u[:, :N] if u.dim() == 2 else u[:N]) for k, u in inp.upstream.items()}
        x = x.reshape(T, C, B).transpose(1, 2)   # [T, B, C], not contiguous
        v0 = v0.reshape(C, B).t()                 # [B, C], not contiguous
        assert not x.is_contiguous() and not v0.is_contiguous()
    ref = _probe.run(_probe.cf_multi_step_ref, x, v0, sg, p, t_start, inp.upstream,
                     dtype=torch.float64)
    got = _probe.run(fn, x, v0, sg, p, t_start, inp.upstream)
    return _probe.compare(got, ref, dtype)


def _chain(fn, x, v0, sg, p, t_start, up, dtype, state_dtype):
    """``T`` single-step calls of ``fn``; the state is rounded to ``state_dtype`` between calls."""
    params = [q for q in sg.parameters() if q.requires_grad]
    x = x.detach().to(dtype).requires_grad_(True)
    v0 = v0.detach().to(dtype).requires_grad_(True)
    v, spikes = v0, []
    for t in range(x.shape[0]):
        s, v, _, _ = fn(x[t:t + 1], v, surrogate_function=sg, t_start=t_start + t, **p.kwargs())
        if v.dtype != state_dtype:
            v = v.to(state_dtype).to(dtype)
        spikes.append(s)
    s = torch.cat(spikes)
    grads = torch.autograd.grad([s, v], [x, v0] + params,
                                [up['s'].to(dtype), up['v_last'].to(dtype)], allow_unused=True)
    out = {'s': s.detach(), 'v_last': v.detach(), 'grad_x': grads[0], 'grad_v0': grads[1]}
    if params:
        out['grad_p'] = grads[2]
    return out


def _single_vs_multi(fn, device, dtype, kind, sg, N, seed) -> Comparison:
    T, p, t_start = 8, DEFAULT_PARAMS, 0
    inp = _probe.make_inputs(T, N, dtype, device, p, sg, kind, t_start, ('s', 'v_last'),
                             seed=seed, chain=True)
    ref = _chain(_probe.cf_multi_step_ref, inp.x, inp.v0, sg, p, t_start, inp.upstream,
                 torch.float64, dtype)
    got = _chain(fn, inp.x, inp.v0, sg, p, t_start, inp.upstream, dtype, dtype)
    cmp = _probe.compare(got, ref, dtype)
    if cmp.passed and dtype in (torch.float32, torch.float64):
        multi = _probe.run(fn, inp.x, inp.v0, sg, p, t_start, grad=False)
        for name in ('s', 'v_last'):
            if not torch.equal(multi[name], got[name]):
                diff = (multi[name] != got[name]).reshape(T, -1) if name == 's' else None
                where = '' if diff is None else f' (first at {_probe._where(diff)})'
                cmp.passed = False
                cmp.message = (f'{name} of {T} single-step calls differs from one multi-step '
                               f'call{where}')
                break
    return cmp


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ------------------------------------------------------------------------------------------------
def _opcheck(name: str, device: torch.device, dtype: torch.dtype, quick: bool = False) -> str:
    """'' when ``torch.library.opcheck`` passes on the backend's forward and backward ops (for
    CFRect and TSG; ``quick``: one argument set per op instead of three or four)."""
    from .backends import _ops
    from .backends._common import KIND_CODES
    if name not in _ops._ops:
        return ''
    fwd, bwd = _ops.forward_op(name), _ops.backward_op(name)
    g = torch.Generator().manual_seed(3)
    T, N = 3, 37

    def rnd(*shape, grad=False):
        t = (torch.randn(*shape, generator=g) * 1.5).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    lean = getattr(backends.get(name), 'supports_memory_lean', False)
    problems = []
    for kind in ('rect', 'tsg'):
        alpha = (torch.rand(T, generator=g) + 1.0).to(device)
        if kind == 'tsg':
            alpha.requires_grad_(True)
        code = KIND_CODES[kind]
        arg_sets = [(rnd(T, N, grad=True), rnd(N, grad=True), alpha, code, 0.25, 1.0, 1.0, -1.0,
                     2, 2, False, True, False, False),
                    (rnd(T, N, grad=True), rnd(N), alpha, code, 0.5, 0.5, 0.75, -0.5, 3, 1, True,
                     True, True, True),
                    (rnd(T, N), rnd(N), alpha.detach(), code, 0.25, 1.0, 1.0, -1.0, 2, 2, False,
                     False, False, False)]
        if lean:
            arg_sets.append(arg_sets[0] + (True,))
        if quick:
            arg_sets = arg_sets[1:2]
        for args in arg_sets:
            try:
                torch.library.opcheck(fwd, args)
            except Exception as exc:  # noqa: BLE001 - reported as the failure
                problems.append(f'cf_forward_{name} ({kind}): {type(exc).__name__}: '
                                f'{str(exc).strip().splitlines()[0][:300]}')
        h = torch.randn(T, N, generator=g).to(device)
        bargs = [(h, alpha.detach(), rnd(T, N), None, None, None, code, 0.25, 1.0, 1.0, -1.0, 2,
                  2, False, kind == 'tsg', dtype),
                 (h, alpha.detach(), rnd(T, N), rnd(T, N), rnd(T, N), rnd(N), code, 0.5, 0.5,
                  0.75, -0.5, 3, 1, True, kind == 'tsg', dtype)]
        for args in (bargs[1:] if quick else bargs):
            try:
                torch.library.opcheck(bwd, args)
            except Exception as exc:  # noqa: BLE001
                problems.append(f'cf_backward_{name} ({kind}): {type(exc).__name__}: '
                                f'{str(exc).strip().splitlines()[0][:300]}')
    return '; '.join(problems)


def _compile_smoke(name: str, device: torch.device, dtype: torch.dtype, quick: bool) -> str:
    """'' when ``cf_multi_step(backend=name)`` with TSG under ``torch.compile(fullgraph=True)``
    gives eager's spikes and state, and its gradients (of ``x`` and TSG's parameter)."""
    from .functional.neuron import cf_multi_step
    sg = _probe.make_surrogate('tsg', 8, seed=4, device=device)
    p = DEFAULT_PARAMS
    inp = _probe.make_inputs(8, 517, dtype, device, p, sg, 'tsg', 0, ('s',), seed=4)
    kwargs = p.kwargs()

    def step(x, v):
        s, v_last, _, _ = cf_multi_step(x, v, surrogate_function=sg, backend=name, **kwargs)
        return s, v_last

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend='aot_eager' if quick else 'inductor')
    results = []
    for f in (compiled, step):
        x = inp.x.detach().clone().requires_grad_(True)
        s, v = f(x, inp.v0)
        gx, gp = torch.autograd.grad(s, [x, sg.p], inp.upstream['s'])
        results.append((s.detach(), v.detach(), gx, gp))
    (s_c, v_c, gx_c, gp_c), (s_e, v_e, gx_e, gp_e) = results
    if not torch.equal(s_c, s_e):
        return f'compiled spikes differ from eager at {int((s_c != s_e).sum())} entries'
    cmp = _probe.compare({'v_last': v_c, 'grad_x': gx_c, 'grad_p': gp_c},
                         {'v_last': v_e.double(), 'grad_x': gx_e.double(),
                          'grad_p': gp_e.double()}, dtype)
    return '' if cmp.passed else f'compiled vs eager: {cmp.message}'


# ------------------------------------------------------------------------------------------------
# running the plan
# ------------------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: a plain counter on stderr
        class _Bar:
            def __init__(self):
                self.n = 0

            def set_description_str(self, text):
                if enabled:
                    sys.stderr.write(f'\r[{self.n}/{total}] {text[:70]:<70}')
                    sys.stderr.flush()

            def update(self, k=1):
                self.n += k

            def close(self):
                if enabled:
                    sys.stderr.write('\n')
        return _Bar()
    return tqdm(total=total, disable=not enabled, unit='case', leave=False, dynamic_ncols=True,
                file=sys.stderr)


def run_row(device: torch.device, row: Row, quick: bool, bar=None) -> Row:
    began = time.perf_counter()
    dtype = _DTYPES[row.dtype]
    sz = sizes(device, quick)
    fn = backends.get(row.backend)
    label = f'{row.backend} {row.device} {row.dtype} {row.surrogate}'
    for i, case in enumerate(row.cases):
        if bar is not None:
            bar.set_description_str(f'{label}: {case}')
        t0 = time.perf_counter()
        name = case.replace('long', str(sz.t_long)) if case == 'T=long' else case
        result = dict(case=name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                if row.surrogate == 'opcheck':
                    msg = _opcheck(row.backend, device, dtype, quick)
                    result.update(passed=not msg, message=msg)
                elif row.surrogate == 'torch.compile':
                    msg = _compile_smoke(row.backend, device, dtype, quick)
                    result.update(passed=not msg, message=msg,
                                  compiler='aot_eager' if quick else 'inductor')
                else:
                    cmp = _case(fn, device, dtype, _kind_of(row), sz, case, seed=17 + i)
                    result.update(passed=cmp.passed, message=cmp.message, errors=cmp.errors,
                                  worst=cmp.worst, worst_output=cmp.worst_output)
        except Exception as exc:  # noqa: BLE001 - an error is a failure of this case
            tb = traceback.format_exc(limit=-3)
            result.update(passed=False, message=f'{type(exc).__name__}: '
                                                f'{str(exc).strip().splitlines()[0][:400]}',
                          traceback=tb)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        result['seconds'] = round(time.perf_counter() - t0, 3)
        row.results.append(result)
        if bar is not None:
            bar.update(1)
    row.passed = all(r['passed'] for r in row.results)
    failed = [r for r in row.results if not r['passed']]
    if failed:
        row.message = f"case {failed[0]['case']!r}: {failed[0]['message']}"
    for r in row.results:
        for out, err in (r.get('errors') or {}).items():
            if out == 's':
                continue
            if row.largest_error is None or err > row.largest_error:
                row.largest_error, row.largest_error_of = err, f"{out}, {r['case']}"
    row.seconds = time.perf_counter() - began
    return row


def _fmt_err(row: Row) -> str:
    if row.largest_error is None:
        return ''
    return f'{row.largest_error:.1e} ({row.largest_error_of})'


def format_table(rows: List[Row]) -> str:
    header = ('backend', 'device', 'dtype', 'surrogate', 'result', 'largest error (of)')
    body = [(r.backend, r.device, r.dtype, r.surrogate,
             'PASS' if r.passed else 'FAIL', _fmt_err(r)) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ['  '.join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip(),
             '  '.join('-' * w for w in widths)]
    lines += ['  '.join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in body]
    return '\n'.join(lines)


def run_check(quick: bool = False, only_backends=None, only_devices=None, only_dtypes=None,
              only_surrogates=None, progress: bool = True, out=None,
              deadline_s: Optional[float] = None) -> dict:
    """Run the check; returns the report (``passed``, ``rows``, ``not_checked``, environment).
    Prints the table and the failures to ``out`` (default ``sys.stdout``). Rows not started
    within ``deadline_s`` seconds are listed as not checked (and ``complete`` is ``False``)."""
    from . import _info
    out = sys.stdout if out is None else out
    began = time.perf_counter()
    torch.manual_seed(0)
    rows, skipped = plan(quick, only_backends, only_devices, only_dtypes, only_surrogates)
    env = _info.collect()
    print(_info.one_line(env), file=out)
    mode = 'quick' if quick else 'full'
    print(f'checking {len(rows)} rows ({mode}) against the float64 reference: spikes exactly, '
          f'the rest to {_tolerance_text()}', file=out, flush=True)
    bar = _progress(sum(len(r.cases) for _, r in rows), progress)
    done = []
    try:
        for device, row in rows:
            if deadline_s is not None and time.perf_counter() - began > deadline_s:
                skipped.append(dict(backend=row.backend, device=row.device,
                                    reason=f'{row.dtype} {row.surrogate}: not started within '
                                           f'--deadline-s {deadline_s:g}'))
                continue
            done.append(run_row(device, row, quick, bar))
    finally:
        bar.close()
    passed = bool(done) and all(r.passed for r in done)
    if done:
        print(format_table(done), file=out)
    for s in skipped:
        print(f"not checked: {s['backend']} on {s['device']}: {s['reason']}", file=out)
    failed = [r for r in done if not r.passed]
    for r in failed:
        print(f'FAIL: backend {r.backend!r} on {r.device}, {r.dtype}, {r.surrogate}, {r.message}',
              file=out)
    seconds = time.perf_counter() - began
    if failed:
        print(f'{len(failed)} of {len(done)} rows FAILED ({seconds:.1f} s). A failing backend gives '
              f'wrong results on this machine: do not train with it (pick another with '
              f'backend=...), and report the JSON (--json) as a bug.', file=out)
    elif not done:
        print('nothing was checked', file=out)
    else:
        print(f'all {len(done)} rows passed ({seconds:.1f} s)', file=out)
    return dict(tool='python -m spikingjelly_cf check', quick=quick,
                complete=len(done) == len(rows),
                date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                passed=passed, seconds=round(seconds, 2), tolerances=_tolerances(),
                margin=_probe.MARGIN, sizes={str(d): sizes(d, quick).__dict__
                                             for d in devices(only_devices)},
                rows=[r.to_dict() for r in done], not_checked=skipped,
                first_use_checks=_probe.first_use_log(), environment=env)


def _tolerances() -> dict:
    return {_dtype_name(d): t for d, t in _probe.TOLERANCES.items()}


def _tolerance_text() -> str:
    parts = ', '.join(f'{_dtype_name(d)} {t:.0e}' for d, t in _probe.TOLERANCES.items())
    return (f'{parts} (scaled by max(1, |reference|); sums over neurons '
            f'x{_probe.REDUCTION_FACTOR})')


def write_json(path: str, report: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(report, f, indent=1, default=str)
        f.write('\n')
