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

Writes ``<out>/gpu_bench.json`` and ``<out>/gpu_bench.md``. The benchmark itself lives in the
package (``spikingjelly_cf/_bench.py``, also ``python -m spikingjelly_cf bench``); this script is
its command line with the GPU script's defaults and file names.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402


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
    from spikingjelly_cf import _bench
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    meta = common.environment(device)
    payload = _bench.run_bench(device, [common.parse_dtype(d) for d in args.dtypes], args.T,
                               args.log2n, args.modes, budget_s=args.budget_s,
                               deadline_s=args.deadline_s, meta=meta,
                               log=lambda line: print(line, flush=True))
    payload['args'] = vars(args)
    common.write_json(os.path.join(args.out, 'gpu_bench.json'), payload)
    text = _bench.markdown(payload, common.stamp_lines(payload['meta']),
                           title='CF GPU backends vs SpikingJelly LIFNode')
    common.write_text(os.path.join(args.out, 'gpu_bench.md'), text)
    print('\n'.join(text.rstrip().splitlines()[-len(payload['targets']) - 2:]), flush=True)
    print(f"gpu_bench: {payload['meta']['total_s']} s, results in {args.out}", flush=True)


if __name__ == '__main__':
    main()
