"""``python -m spikingjelly_cf`` (also the console script ``spikingjelly-cf``): check an install.

Subcommands:

``info``
    Versions (Python, torch and its CUDA, SpikingJelly, CuPy, Triton), compilers, devices and,
    for each device type and dtype, the backends that run, why the others cannot and what
    ``backend='auto'`` picks. ``--json PATH`` writes it.
``check``
    Every backend on every device here against the float64 reference (``spikingjelly_cf._check``):
    one row per backend, device, dtype and surrogate with PASS/FAIL and the largest error.
    Exit status 1 when a row fails, naming the backend and the case. ``--quick`` runs smaller
    cases and leaves out the ``inductor`` backend; ``--json PATH`` writes the whole report
    (environment included) for a bug report.
``bench``
    CF on each kernel backend against SpikingJelly's ``LIFNode`` on the same device, training and
    inference, ``T = 8``, the largest ``N <= 2^24`` that fits (``spikingjelly_cf._bench``): time,
    fraction of the copy bandwidth, peak memory. ``--json PATH`` writes the results.

Examples (from a shell)::

    python -m spikingjelly_cf info
    python -m spikingjelly_cf check --quick
    python -m spikingjelly_cf check --json check.json
    python -m spikingjelly_cf bench --quick
"""
import argparse
import json
import sys
from typing import List, Optional

__all__ = ['main', 'build_parser']

DEFAULT_CHECK_JSON = 'spikingjelly_cf_check.json'
DEFAULT_BENCH_JSON = 'spikingjelly_cf_bench.json'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m spikingjelly_cf',
        description='Diagnose a spikingjelly-cf install: environment, correctness of every '
                    'backend on this machine, speed.')
    sub = p.add_subparsers(dest='command', metavar='{info,check,bench}')
    sub.required = True

    info = sub.add_parser('info', help='versions, devices and the backends that run here')
    info.add_argument('--json', metavar='PATH', help='also write everything as JSON')

    check = sub.add_parser(
        'check', help='every backend against the float64 reference (exit status 1 on a failure)',
        description='Every backend on every device here against the float64 reference: one row '
                    'per backend, device, dtype and surrogate. Exit status 1 on any failure.')
    check.add_argument('--quick', action='store_true',
                       help='smaller cases, no inductor backend (under 30 s on two CPU cores)')
    check.add_argument('--json', metavar='PATH', nargs='?', const=DEFAULT_CHECK_JSON,
                       help=f'write the whole report as JSON (default path {DEFAULT_CHECK_JSON})')
    check.add_argument('--backends', nargs='+', metavar='NAME',
                       help='only these backends (torch, cpp, cupy, triton, inductor)')
    check.add_argument('--devices', nargs='+', metavar='DEVICE',
                       help="only these devices ('cpu', 'cuda', 'cuda:1')")
    check.add_argument('--dtypes', nargs='+', metavar='DTYPE',
                       choices=('float32', 'float16', 'bfloat16', 'float64'),
                       help='only these dtypes')
    check.add_argument('--surrogates', nargs='+', metavar='NAME',
                       help='only these surrogates (CFRect, TSG, Sigmoid, ATan)')
    check.add_argument('--deadline-s', type=float, metavar='SECONDS',
                       help='start no row after this many seconds (the rest is listed as not '
                            'checked)')
    check.add_argument('--no-progress', action='store_true', help='no progress bar')

    bench = sub.add_parser(
        'bench', help="CF's backends vs SpikingJelly's LIFNode on the same device",
        description="CF on each kernel backend against SpikingJelly's LIFNode on the same "
                    "device and a device copy of the bytes CF must move: training and inference, "
                    "median time, fraction of the copy bandwidth, peak memory.")
    bench.add_argument('--device', default='auto', help="'auto' (CUDA if present), 'cpu', 'cuda:0'")
    bench.add_argument('--T', type=int, default=8)
    bench.add_argument('--log2n', nargs='+', type=int,
                       help='log2 of N (default: the largest that fits, up to 24)')
    bench.add_argument('--dtypes', nargs='+', choices=('float32', 'float16', 'bfloat16'),
                       help='default: float32 on the CPU; float32 float16 bfloat16 on CUDA')
    bench.add_argument('--modes', nargs='+', choices=('training', 'inference'),
                       default=['training', 'inference'])
    bench.add_argument('--budget-s', type=float, default=None,
                       help='measurement time per case (default 0.3 s, 0.05 s with --quick)')
    bench.add_argument('--deadline-s', type=float, default=300.0,
                       help='start no case after this many seconds (default 300)')
    bench.add_argument('--backends', nargs='+', metavar='NAME',
                       help="CF's kernel backends to time (default: every one that runs here)")
    bench.add_argument('--quick', action='store_true',
                       help='float32, N = 2^14 on the CPU (2^20 on CUDA), no inductor: seconds')
    bench.add_argument('--json', metavar='PATH', nargs='?', const=DEFAULT_BENCH_JSON,
                       help=f'write the results as JSON (default path {DEFAULT_BENCH_JSON})')
    return p


def _write_json(path: str, payload: dict) -> None:
    import os
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(payload, f, indent=1, default=str)
        f.write('\n')


def _info(args) -> int:
    from . import _info
    env = _info.collect()
    print(_info.format_info(env))
    if args.json:
        _write_json(args.json, env)
        print(f'wrote {args.json}')
    return 0


def _check(args) -> int:
    from . import _check
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        report = _check.run_check(quick=args.quick, only_backends=args.backends,
                                  only_devices=args.devices, only_dtypes=args.dtypes,
                                  only_surrogates=args.surrogates, progress=progress,
                                  deadline_s=args.deadline_s)
    except SystemExit as exc:  # a bad option value: a usage error, as argparse's
        if isinstance(exc.code, str):
            print(f'python -m spikingjelly_cf check: error: {exc.code}', file=sys.stderr)
            return 2
        raise
    report['command'] = ' '.join(['python -m spikingjelly_cf'] + sys.argv[1:])
    if args.json:
        _write_json(args.json, report)
        print(f'wrote {args.json}')
    return 0 if report['passed'] else 1


def _bench(args) -> int:
    import torch
    from . import _bench, _info
    if args.device == 'auto':
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(args.device)
        if device.type == 'cuda' and not torch.cuda.is_available():
            print(f'--device {args.device}: PyTorch sees no CUDA device', file=sys.stderr)
            return 2
    gpu = device.type == 'cuda'
    names = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
    if args.dtypes:
        dtypes = [names[d] for d in args.dtypes]
    else:
        dtypes = ([torch.float32, torch.float16, torch.bfloat16] if gpu and not args.quick
                  else [torch.float32])
    if args.log2n:
        log2ns = args.log2n
    elif args.quick:
        log2ns = [20 if gpu else 14]
    else:
        log2ns = [_bench.largest_fitting_log2n(device, args.T)]
    budget = args.budget_s if args.budget_s is not None else (0.05 if args.quick else 0.3)
    env = _info.collect()
    print(_info.one_line(env))
    print(f"bench on {device}: T={args.T}, N={', '.join(f'2^{k}' for k in log2ns)}, "
          f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}, {', '.join(args.modes)}",
          flush=True)
    payload = _bench.run_bench(device, dtypes, args.T, log2ns, args.modes, budget_s=budget,
                               deadline_s=args.deadline_s, compiled=not args.quick, meta=env,
                               log=lambda line: print(line, flush=True), only=args.backends)
    payload['command'] = ' '.join(['python -m spikingjelly_cf'] + sys.argv[1:])
    print(_bench.format_rows(payload))
    for note in payload['notes']:
        print(f'note: {note}')
    print(f"bench: {payload['meta']['total_s']} s")
    if args.json:
        _write_json(args.json, payload)
        print(f'wrote {args.json}')
    errors = [r for r in payload['rows'] if str(r.get('status', '')).startswith('error')]
    return 1 if errors else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {'info': _info, 'check': _check, 'bench': _bench}[args.command](args)


if __name__ == '__main__':
    sys.exit(main())
