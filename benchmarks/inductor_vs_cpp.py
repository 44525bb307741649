"""CFNode's ``'inductor'`` backend against the ``'cpp'`` kernel, T=8, CPU float32, interleaved.

The question this answers: should ``backend='auto'`` pick ``'inductor'`` for some CPU float32
case? For each N, one call first (it compiles or finds the compiled function: reported apart),
then ``inductor`` and ``cpp`` calls alternate and the medians are compared (same process, same
inputs, default CF parameters). Writes ``<out>/<date>_<device>/inductor_vs_cpp_<tag>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/inductor_vs_cpp.py --log2n 10 14 17 20
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--T', type=int, default=8)
    p.add_argument('--log2n', nargs='+', type=int, default=[10, 14, 17, 20])
    p.add_argument('--out', default=os.path.join(common.REPO_ROOT, 'benchmarks', 'results'))
    p.add_argument('--tag', default=None)
    args = p.parse_args(argv)
    from spikingjelly_cf.functional.neuron import cf_multi_step
    device = torch.device('cpu')
    meta = common.environment(device)
    tag = args.tag or f'sj{meta["spikingjelly"]}'
    torch.manual_seed(0)
    T, rows = args.T, []
    for lg in args.log2n:
        N = 2 ** lg
        x = (torch.randn(T, N) * 1.5).requires_grad_()
        g = torch.randn(T, N)
        v0 = torch.zeros(N)

        def train(b):
            s, _, _, _ = cf_multi_step(x, v0, backend=b)
            torch.autograd.grad(s, x, g)

        def infer(b):
            with torch.no_grad():
                cf_multi_step(x, v0, backend=b)
        for mode, f in (('inference', infer), ('training', train)):
            # correctness first: same spikes and gradient as cpp (which the tests tie to the reference)
            with torch.no_grad():
                s_i = cf_multi_step(x, v0, backend='inductor')[0]
                s_c = cf_multi_step(x, v0, backend='cpp')[0]
            assert torch.equal(s_i, s_c), 'inductor and cpp spikes differ'
            t0 = time.perf_counter()
            f('inductor')
            first = time.perf_counter() - t0
            for _ in range(2):
                f('inductor')
                f('cpp')
            ti, tc = [], []
            reps = 15 if lg >= 18 else 60
            for _ in range(reps):  # interleaved
                t0 = time.perf_counter()
                f('inductor')
                ti.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                f('cpp')
                tc.append(time.perf_counter() - t0)
            mi, mc = statistics.median(ti), statistics.median(tc)
            rows.append(dict(mode=mode, T=T, N=N, first_call_s=first, inductor_s=mi, cpp_s=mc,
                             inductor_over_cpp=mi / mc, repeats=reps))
            print(f'{mode} T={T} N=2^{lg}: first call {first:.1f} s; inductor {mi * 1e3:.3f} ms, '
                  f'cpp {mc * 1e3:.3f} ms, inductor/cpp {mi / mc:.2f}', flush=True)
    meta['load_average_end'] = common.load_average()
    payload = dict(benchmark='inductor_vs_cpp', tag=tag, meta=meta,
                   command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]), results=rows)
    stem = os.path.join(common.results_dir(args.out, device), f'inductor_vs_cpp_{tag}')
    common.write_json(stem + '.json', payload)
    lines = [f'# CFNode backend inductor vs cpp: {tag}', ''] + common.stamp_lines(meta) + [
        '', f'Command: `{payload["command"]}` (threads: {torch.get_num_threads()})', '',
        'Medians of interleaved single calls; "first call" includes compilation (or the cache).',
        '', common.markdown_table(
            ['mode', 'T', 'N', 'first call (s)', 'inductor (ms)', 'cpp (ms)', 'inductor / cpp'],
            [[r['mode'], r['T'], common.fmt_n(r['N']), f'{r["first_call_s"]:.3g}',
              f'{r["inductor_s"] * 1e3:.4g}', f'{r["cpp_s"] * 1e3:.4g}',
              f'{r["inductor_over_cpp"]:.3g}'] for r in rows])]
    common.write_text(stem + '.md', '\n'.join(lines) + '\n')
    print(f'wrote {stem}.json, .md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
