"""Every GPU backend of CFNode against SpikingJelly's LIFNode on its fastest GPU backend.

One multi-step neuron layer on ``x`` of shape ``[T, N]``, ``T = 8``, ``N = 2^20 .. 2^24``,
float32/float16/bfloat16, inference (``no_grad`` forward) and training (forward + backward with a
fixed upstream gradient). Candidates:

* ``CF[<backend>]``: :func:`spikingjelly_cf.functional.cf_multi_step` on each kernel backend that
  runs the device and dtype (``cupy``, ``triton``, ``inductor`` where present; the call must not
  fall back to the reference), checked against the float32 reference on a small input first
  (spikes exactly equal, on the rounded input for half/bfloat16);
* ``LIF[<backend>]``: SpikingJelly's ``LIFNode`` (``step_mode='m'``) on each GPU backend the
  installed SpikingJelly has (0.0.0.0.14: ``torch`` and ``cupy``, with the one-line ``np.int``
  shim NumPy >= 1.24 needs; 2.0: its default dispatch, Triton on CUDA); "LIF fastest" is the
  fastest of them in each case;
* ``copy``: a device-to-device copy of as many bytes as the fused CF kernel must move (the
  physical limit; ``bytes_moved``), so ``copy time / time`` is the fraction of the copy bandwidth.

Reported per case: median time (CUDA events, after warm-up), the fraction of copy bandwidth, the
peak memory above the inputs (``torch.cuda.max_memory_allocated``), the ratio to LIF fastest; and
the GPU targets at N = 2^22 (CF's fastest training step <= 1.0x LIF's fastest, >= 70 % of
copy bandwidth). Every case is guarded: an error is recorded and the run goes on; cases that no
longer fit ``--deadline-s`` are recorded as skipped. Runs on the CPU too (``--device cpu
--log2n 10``), as a smoke test of the script itself.

Writes ``<out>/gpu_bench.json`` and ``<out>/gpu_bench.md``.
"""
import argparse
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402

CF_GPU_BACKENDS = ('cupy', 'triton', 'inductor')
TARGET_LOG2N, TARGET_RATIO, TARGET_COPY = 22, 1.0, 0.70


def bytes_moved(mode: str, T: int, N: int, element_size: int) -> int:
    """Least bytes a fused CF kernel moves: storage-dtype x, s, gradients; float32 h saved.

    inference: read x, write s [T, N]; read v0, write v_last [N].
    training: forward reads x, writes s and h (float32); backward reads grad_s and h, writes
    grad_x; plus v0, v_last, grad_v0 [N].
    """
    if mode == 'inference':
        return (2 * T + 2) * N * element_size
    return T * N * (4 * element_size + 2 * 4) + 3 * N * element_size


def cf_candidates(device, dtype):
    """``{name: (callable(x, v) -> (s, v_last), why-not)}`` for CF's kernel backends."""
    from spikingjelly_cf import backends
    from spikingjelly_cf.functional.neuron import cf_multi_step, resolve_backend
    from spikingjelly_cf.surrogate import CFRect
    names = CF_GPU_BACKENDS if device.type == 'cuda' else ('cpp',)
    out = {}
    for name in names:
        try:
            probe = torch.zeros(1, 4, device=device, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                chosen = resolve_backend(name, probe, CFRect())
            if chosen != name:
                raise RuntimeError(f'{common.dtype_name(dtype)} runs on {chosen!r}')
            out[name] = ((lambda x, v, name=name: cf_multi_step(x, v, backend=name)[:2]), None)
        except Exception as exc:  # noqa: BLE001 - recorded, never dropped
            out[name] = (None, f'{type(exc).__name__}: {exc}'.splitlines()[0][:200])
    try:
        out['auto'] = (None, f"'auto' picks {resolve_backend('auto', probe, CFRect())!r}")
    except Exception:  # noqa: BLE001
        pass
    del backends
    return out


def lif_candidates(device):
    """``{name: (factory, why-not)}`` for SpikingJelly's LIFNode on this device."""
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly_cf import _compat
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
    from spikingjelly_cf.functional.neuron import cf_multi_step_ref
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(8, 4099, generator=g, device=device) * 1.5).to(dtype)
    s, v = fn(x, torch.zeros(4099, device=device, dtype=dtype))
    s_r, v_r, _, _ = cf_multi_step_ref(x.float(), torch.zeros(4099, device=device))
    if not torch.equal(s.float(), s_r):
        return f'spikes differ at {(s.float() != s_r).sum().item()} of {s.numel()}'
    err = (v.float() - v_r).abs().max().item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * 4
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--T', type=int, default=8)
    p.add_argument('--log2n', nargs='+', type=int, default=[20, 22, 24])
    p.add_argument('--dtypes', nargs='+', default=['float32', 'float16', 'bfloat16'])
    p.add_argument('--modes', nargs='+', default=['training', 'inference'])
    p.add_argument('--budget-s', type=float, default=0.3, help='measurement time per case')
    p.add_argument('--deadline-s', type=float, default=240.0, help='stop starting cases after')
    p.add_argument('--out', required=True, help='folder for gpu_bench.json / .md')
    args = p.parse_args(argv)
    began = time.perf_counter()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    meta = common.environment(device)
    rows, notes = [], []

    def left():
        return args.deadline_s - (time.perf_counter() - began)

    for dtype_name in args.dtypes:
        dtype = common.parse_dtype(dtype_name)
        cands = []  # (name, kind, obj)
        for name, (fn, why) in cf_candidates(device, dtype).items():
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
            print(notes[-1], flush=True)
            if verdict == 'ok' or not verdict.startswith(('RuntimeError', 'TypeError')):
                cands.append((label, 'cf', fn))
        for name, (factory, why) in lif_candidates(device).items():
            label = f'LIF[{name}]'
            if why is not None:
                notes.append(f'{dtype_name} {label}: {why}')
                continue
            cands.append((label, 'lif', factory))
        for log2n in args.log2n:
            T, N = args.T, 2 ** log2n
            g = torch.Generator(device=device).manual_seed(log2n)
            try:
                x = (torch.randn(T, N, generator=g, device=device) * 1.5).to(dtype)
                grad = torch.randn(T, N, generator=g, device=device).to(dtype)
                v0 = torch.zeros(N, device=device, dtype=dtype)
            except Exception as exc:  # noqa: BLE001 - out of memory
                notes.append(f'{dtype_name} N=2^{log2n}: inputs: {exc}'.splitlines()[0])
                continue
            for mode in args.modes:
                nbytes = bytes_moved(mode, T, N, x.element_size())
                case = dict(dtype=dtype_name, T=T, N=N, log2n=log2n, mode=mode, bytes=nbytes)
                try:
                    half = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(half)
                    t_copy = common.measure(lambda: dst.copy_(half), device,
                                            budget_s=args.budget_s).median
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
                        timing = common.measure(call, device, warmup=3, min_repeats=5,
                                                budget_s=args.budget_s)
                        peak = common.peak_memory(call, device)
                        row.update(status='ok', time_s=timing.median, q25=timing.q25,
                                   q75=timing.q75, repeats=timing.repeats, peak_bytes=peak,
                                   frac_copy=(t_copy / timing.median) if t_copy else None,
                                   GBps=nbytes / timing.median / 1e9)
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        row.update(status=f'error: {type(exc).__name__}: {exc}'.splitlines()[0]
                                   [:200])
                        traceback.print_exc()
                    rows.append(row)
                    print({k: (round(v, 6) if isinstance(v, float) else v)
                           for k, v in row.items()}, flush=True)
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
    for dtype_name in args.dtypes:
        case_rows = [r for r in rows if r['dtype'] == dtype_name and r['log2n'] == TARGET_LOG2N
                     and r['mode'] == 'training' and r['candidate'].startswith('CF[')
                     and r.get('status') == 'ok']
        if not case_rows:
            continue
        best = min(case_rows, key=lambda r: r['time_s'])
        targets.append(dict(dtype=dtype_name, fastest=best['candidate'],
                            ratio_vs_lif=best.get('ratio_vs_lif'),
                            frac_copy=best.get('frac_copy'),
                            ratio_ok=(best.get('ratio_vs_lif') is not None
                                      and best['ratio_vs_lif'] <= TARGET_RATIO),
                            copy_ok=(best.get('frac_copy') is not None
                                     and best['frac_copy'] >= TARGET_COPY)))
    meta['total_s'] = round(time.perf_counter() - began, 1)
    common.write_json(os.path.join(args.out, 'gpu_bench.json'),
                      dict(meta=meta, args=vars(args), notes=notes, rows=rows, targets=targets))
    lines = ['# CF GPU backends vs SpikingJelly LIFNode', '']
    lines += common.stamp_lines(meta) + ['']
    lines += [f'T = {args.T}; median of CUDA-event-timed calls after warm-up; "of copy" = time of '
              f'a device copy of the bytes the fused CF kernel must move / time; peak = memory '
              f'allocated above the inputs during one call.', '']
    for note in notes:
        lines.append(f'- {note}')
    lines.append('')
    header = ['dtype', 'mode', 'N', 'candidate', 'time (ms)', 'of copy', 'x LIF fastest',
              'peak (MiB)', 'status']
    table = []
    for r in rows:
        table.append([r['dtype'], r['mode'], f"2^{r['log2n']}", r['candidate'],
                      common.fmt_ms(r.get('time_s')),
                      f"{r['frac_copy']:.0%}" if r.get('frac_copy') else '',
                      f"{r['ratio_vs_lif']:.2f}" if r.get('ratio_vs_lif') else '',
                      f"{r['peak_bytes'] / 2 ** 20:.0f}" if r.get('peak_bytes') else '',
                      r.get('status', '')])
    lines += [common.markdown_table(header, table), '']
    lines += [f'## Targets (training, N = 2^{TARGET_LOG2N}: CF fastest <= {TARGET_RATIO}x LIF '
              f'fastest, >= {TARGET_COPY:.0%} of copy bandwidth)', '']
    for t in targets:
        lines.append(f"- {t['dtype']}: {t['fastest']}, {t['ratio_vs_lif'] or float('nan'):.2f}x "
                     f"LIF ({common.verdict(t['ratio_ok'])}), "
                     f"{(t['frac_copy'] or 0):.0%} of copy ({common.verdict(t['copy_ok'])})")
    common.write_text(os.path.join(args.out, 'gpu_bench.md'), '\n'.join(lines) + '\n')
    print('\n'.join(lines[-len(targets) - 2:]), flush=True)
    print(f'gpu_bench: {meta["total_s"]} s, results in {args.out}', flush=True)


if __name__ == '__main__':
    main()
