"""One-time cost of the first-use check of a run-time-compiled backend (``'cupy'``, ``'triton'``).

The first training call (forward + backward) of a ``CFNode`` on the backend, timed in a fresh
process with the check and without it (``SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK=1``), the two
alternately, ``--repeats`` times each; also the second call (the steady state) and the time spent
inside the check (``_probe.first_use_log()``, which includes the kernels' compilation that the
first call pays anyway). The difference of the medians of the first calls is the check's cost.

On the CPU, ``--device cpu --backend triton`` runs Triton's interpreter (``TRITON_INTERPRET=1``
is set for the child processes). Writes ``<out>/first_use_cost_<device>_<backend>.json`` when
``--out`` is given.

    python benchmarks/first_use_cost.py --device cuda --backend triton --out benchmarks/results/X
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    import torch
    from spikingjelly_cf import CFNode
    from spikingjelly_cf.backends import _probe
    from spikingjelly_cf.surrogate import TSG, CFRect
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sg = TSG(args.T) if args.surrogate == 'tsg' else CFRect()
    node = CFNode(step_mode='m', backend=args.backend, surrogate_function=sg).to(device)
    x = (torch.randn(args.T, args.N, device=device) * 1.5).to(dtype).requires_grad_(True)
    times = []
    for _ in range(2):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        node.reset()
        node(x).sum().backward()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    probe = sum(e['seconds'] for e in _probe.first_use_log())
    print(json.dumps(dict(first_s=times[0], second_s=times[1], probe_s=probe,
                          checks=len(_probe.first_use_log()))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--backend', default='triton', choices=('cupy', 'triton'))
    p.add_argument('--dtype', default='float32')
    p.add_argument('--surrogate', default='rect', choices=('rect', 'tsg'))
    p.add_argument('--T', type=int, default=8)
    p.add_argument('--N', type=int, default=None, help='default 2^20 on CUDA, 4096 on the CPU')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--timeout-s', type=float, default=120.0, help='per child process')
    p.add_argument('--out', default=None, help='folder for the JSON')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.N is None:
        args.N = 2 ** 20 if args.device.startswith('cuda') else 4096
    if args.child:
        child(args)
        return 0
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH')
                                                  else []))
    if args.device == 'cpu':
        env['TRITON_INTERPRET'] = '1'
    cmd = [sys.executable, '-W', 'ignore', os.path.abspath(__file__), '--child',
           '--device', args.device, '--backend', args.backend, '--dtype', args.dtype,
           '--surrogate', args.surrogate, '--T', str(args.T), '--N', str(args.N)]
    runs = {'check': [], 'no check': []}
    for _ in range(args.repeats):
        for mode in ('check', 'no check'):
            child_env = dict(env)
            if mode == 'no check':
                child_env['SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK'] = '1'
            else:
                child_env.pop('SPIKINGJELLY_CF_DISABLE_FIRST_USE_CHECK', None)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env,
                                  timeout=args.timeout_s, cwd=REPO)
            if proc.returncode != 0:
                print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in ('first_s', 'second_s',
                                                                    'probe_s')}
           for mode, rs in runs.items()}
    result = dict(config=vars(args), runs=runs, median=med,
                  first_use_check_cost_s=med['check']['first_s'] - med['no check']['first_s'])
    print(f"{args.backend} on {args.device}, {args.dtype}, {args.surrogate}, T={args.T}, "
          f"N={args.N}: first call {med['check']['first_s']:.3f} s with the check, "
          f"{med['no check']['first_s']:.3f} s without (median of {args.repeats}); the check "
          f"itself {med['check']['probe_s']:.3f} s (compilation included); second call "
          f"{med['check']['second_s'] * 1e3:.2f} ms; cost of the check "
          f"{result['first_use_check_cost_s']:.3f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f'first_use_cost_{args.device.replace(":", "")}_'
                                      f'{args.backend}_{args.dtype}_{args.surrogate}.json')
        with open(path, 'w') as f:
            json.dump(result, f, indent=1)
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
