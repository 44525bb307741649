"""Where CFNode's time goes in single-step (streaming) mode, next to SpikingJelly's LIFNode.

One layer (batch 16 x 512 neurons by default), float32, CPU, one torch thread, CF defaults
(``backend='auto'``) and ``LIFNode(tau=4/3, decay_input=False, v_reset=None)``. Three views:

* **Layers of the call** (inference, ``eval()`` + ``no_grad``): the per-call time of each nested
  entry point, from ``node(x)`` down to the compiled kernel into preallocated outputs, each timed
  on its own (CPU time of the thread, minimum over repeats of the mean of many calls: robust
  against other processes on a shared machine); the difference of two adjacent layers is what the outer one adds. Some parts
  (argument checks, backend resolution, TSG's step indexing, the step counter) are also timed on
  their own.
* **cProfile** of whole sequences (inference; training = forward steps + one backward pass),
  internal time grouped by what the code does. cProfile inflates Python-level calls relative to
  C calls, so read these as fractions of a profiled run, not as microseconds.
* **torch.profiler**: ATen ops and allocations per step (CF and LIF).

Writes ``<out>/<date>_<device>/single_step_profile_<tag>.{json,md}``::

    python benchmarks/profile_single_step.py
"""
import argparse
import collections
import cProfile
import os
import pstats
import sys
import time
import timeit
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402

#: TSG length of the step-indexing timing (a typical sequence length)
SINGLE_TSG_T = 500

#: cProfile categories: (name, predicate on (file name, function name)); the first match wins.
CATEGORIES = (
    ('kernel call (ctypes, incl. its argument conversion)', lambda f, n: 'backends/cpp.py' in f and n in ('_forward', '_backward')),
    ('op dispatch (torch.library custom op, autograd wrapper)', lambda f, n: any(k in f for k in ('torch/_ops.py', 'torch/_library/', 'torch/_dynamo/', 'torch/_compile.py', 'torch/_library')) or 'backends/_ops.py' in f and n in ('cf_forward', 'cf_backward', 'setup_context', 'backward', '_empty_like_none', '_saved_tensors_hooked')),
    ('kernel argument preparation (prepare, views, save_h)', lambda f, n: 'backends/_common.py' in f or 'backends/_ops.py' in f),
    ('backend resolution', lambda f, n: n in ('resolve_backend', 'is_available', 'get', 'module', '_function', 'kernel_dtypes', 'import_module', '_gcd_import', '_warn_once') or 'importlib' in f),
    ('argument checks', lambda f, n: '_validation.py' in f or n in ('_initial_v', '_parameters_dict', 'check_tensors', 'check_cf_parameters', '_is_real', '_is_int') or ('abc' in f and n == '__instancecheck__')),
    ('surrogate spec / TSG step indexing', lambda f, n: 'surrogate.py' in f),
    ('checkpoint bookkeeping (_recompute)', lambda f, n: '_recompute.py' in f),
    ('state handling (CFNode._run, memories)', lambda f, n: 'spikingjelly_cf/neuron.py' in f or ('spikingjelly' in f and n in ('__setattr__', '__getattr__'))),
    ('module call (nn.Module, SpikingJelly step dispatch)', lambda f, n: 'torch/nn/modules/module.py' in f or 'spikingjelly' in f),
    ('tensor allocation (empty/full/clone/tensor)', lambda f, n: n in ("<built-in method torch.empty_like>", "<built-in method torch.full>", "<built-in method torch.tensor>", "<method 'new_empty' of 'torch._C.TensorBase' objects>", "<method 'clone' of 'torch._C.TensorBase' objects>", "<built-in method torch.empty>")),
    ('tensor views and metadata (view, reshape, unsqueeze, contiguous, data_ptr)', lambda f, n: any(k in n for k in ("'view'", "'reshape'", "'unsqueeze'", "'contiguous'", "'data_ptr'", "'__getitem__'", "'dim'", "'is_floating_point'"))),
    ('autograd engine (backward pass, C++)', lambda f, n: 'run_backward' in n or '_engine_run_backward' in n or 'autograd/__init__.py' in f or 'autograd/graph.py' in f),
)


def category(path: str, name: str) -> str:
    path = path.replace(os.sep, '/')
    for cat, pred in CATEGORIES:
        try:
            if pred(path, name):
                return cat
        except TypeError:  # pragma: no cover
            pass
    return 'other (benchmark loop, builtins)'


def per_call_us(fn, number: int, repeat: int = 7) -> float:
    """Minimum over ``repeat`` runs of the mean CPU time of ``number`` calls, in microseconds.

    CPU time of this thread (``time.thread_time``, user + system), not wall-clock time: on a
    shared machine the time the process waits for a core is left out.
    """
    return min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.thread_time)) / number * 1e6


def make_nodes(B, N):
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly_cf import CFNode, _compat
    lif_kw = dict(step_mode='s', tau=4 / 3, decay_input=False, v_reset=None)
    if _compat.CLASSIC:
        lif_kw['backend'] = 'torch'
    return CFNode(step_mode='s'), sj_neuron.LIFNode(**lif_kw)


def _no_grad_block():
    with torch.no_grad():
        pass


def layers_of_the_call(B: int, N: int, number: int) -> dict:
    """Inference: per-call time of each nested entry point and of the parts timed on their own."""
    from spikingjelly_cf import TSG, _validation
    from spikingjelly_cf.backends import _common, _ops, cpp
    from spikingjelly_cf.functional.neuron import cf_multi_step, resolve_backend
    from spikingjelly_cf.surrogate import CFRect, surrogate_spec
    cf, lif = make_nodes(B, N)
    cf.eval()
    lif.eval()
    x = torch.randn(B, N) * 1.5
    x1 = x.unsqueeze(0)
    v = torch.zeros(B, N)
    sg = CFRect()
    call = _common.prepare('cpp', x1, v, 4 / 3, False, 1.0, -1.0, 2, 2, sg, False, 0)
    op = _ops.forward_op('cpp')
    op_args = (call.x, call.v0, call.alpha, 0, call.k, call.c, call.theta_p, call.theta_n,
               call.k_pos, call.k_neg, False, False, False, False, False)
    lib = cpp._load()
    s_buf, v_buf = torch.empty(B * N), torch.empty(B * N)
    kernel_args = (call.x.data_ptr(), call.v0.data_ptr(), s_buf.data_ptr(), None, None,
                   v_buf.data_ptr(), None, None, cpp.DTYPES[torch.float32], 1, B * N, call.k,
                   call.c, call.theta_p, call.theta_n, 2, 2, 1)
    x_one, v_one, s_one, w_one = (torch.zeros(1) for _ in range(4))
    kernel_one = (x_one.data_ptr(), v_one.data_ptr(), s_one.data_ptr(), None, None, w_one.data_ptr(),
                  None, None, cpp.DTYPES[torch.float32], 1, 1, call.k, call.c, 1.0, -1.0, 2, 2, 1)
    tsg = TSG(T=SINGLE_TSG_T)
    count = torch.tensor(7, dtype=torch.int64)
    layers = [
        ('node(x): the whole step', lambda: cf(x)),
        ('node.single_step_forward(x): without nn.Module.__call__', lambda: cf.single_step_forward(x)),
        ('cf_multi_step(x[None], v, **node parameters): the functional dispatcher',
         lambda: cf_multi_step(x1, v, **cf._parameters_dict())),
        ('cf_multi_step_cpp(x[None], v): the backend function', lambda: cpp.cf_multi_step_cpp(x1, v, surrogate_function=sg)),
        ('torch.ops cf_forward_cpp(prepared args): the custom op', lambda: op(*op_args)),
        ('cpp._forward(prepared args): the op body', lambda: cpp._forward(*op_args[:10], False, False, False)),
        ('ctypes cf_cpu_forward into preallocated outputs', lambda: lib.cf_cpu_forward(*kernel_args)),
        ('ctypes cf_cpu_forward, N = 1 (call overhead only)', lambda: lib.cf_cpu_forward(*kernel_one)),
    ]
    parts = [
        ('check_cf_parameters', lambda: _validation.check_cf_parameters(4 / 3, False, 1.0, None, 2, 2, False)),
        ('check_tensors', lambda: _validation.check_tensors(x1, v)),
        ("resolve_backend('auto')", lambda: resolve_backend('auto', x1, sg, 0)),
        ('prepare (flatten, surrogate spec, alpha tensor)', lambda: _common.prepare('cpp', x1, v, 4 / 3, False, 1.0, -1.0, 2, 2, sg, False, 0)),
        ('TSG alpha for a tensor step count (one-hot product)', lambda: surrogate_spec(tsg, count, 1, x.device)),
        ('TSG alpha for an int step count (slice)', lambda: surrogate_spec(tsg, 7, 1, x.device)),
        ('step counter: count + 1 (a new 0-d tensor)', lambda: count + 1),
        ('two torch.empty_like (s, v_last)', lambda: (torch.empty_like(x), torch.empty_like(x))),
        ('with torch.no_grad(): (enter + exit)', _no_grad_block),
        ('LIFNode step (eval, no_grad)', lambda: lif(x)),
    ]
    out = {'layers': [], 'parts': []}
    with torch.no_grad():
        for key, items in (('layers', layers), ('parts', parts)):
            for name, fn in items:
                fn()
                out[key].append(dict(name=name, us=per_call_us(fn, number)))
    cf.reset()
    lif.reset()
    return out


def profile_sequences(B: int, N: int, T: int, reps: int) -> dict:
    """cProfile internal time by category for CF sequences (inference; training)."""
    from spikingjelly.activation_based import functional
    cf, _ = make_nodes(B, N)
    xs = [torch.randn(B, N) * 1.5 for _ in range(T)]
    xg = [x.clone().requires_grad_(True) for x in xs]
    gs = [torch.randn(B, N) for _ in range(T)]

    def infer():
        with torch.no_grad():
            for x in xs:
                cf(x)
        functional.reset_net(cf)

    def train():
        outs = [cf(x) for x in xg]
        torch.autograd.grad(outs, xg, gs)
        functional.reset_net(cf)

    result = {}
    for mode, fn, train_mode in (('inference', infer, False), ('training', train, True)):
        cf.train(train_mode)
        fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            fn()
        prof.disable()
        stats = pstats.Stats(prof).stats
        total = sum(v[2] for v in stats.values())
        by_cat = collections.Counter()
        top = []
        for (path, line, name), (cc, nc, tt, ct, callers) in stats.items():
            by_cat[category(path, name)] += tt
            top.append((tt, f'{os.path.basename(path)}:{line}({name})' if path != '~' else name, nc))
        top.sort(reverse=True)
        steps = reps * T
        result[mode] = dict(
            total_profiled_s=total, steps=steps,
            categories=[dict(category=c, fraction=t / total, us_per_step_profiled=t / steps * 1e6)
                        for c, t in by_cat.most_common()],
            top=[dict(function=f, calls_per_step=nc / steps, fraction=tt / total)
                 for tt, f, nc in top[:15]])
    return result


def aten_ops_per_step(B: int, N: int, T: int) -> dict:
    """ATen ops (and allocations) per step recorded by torch.profiler, CF and LIF, both modes."""
    from torch.profiler import ProfilerActivity, profile
    cf, lif = make_nodes(B, N)
    xs = [(torch.randn(B, N) * 1.5).requires_grad_(True) for _ in range(T)]
    out = {}
    for label, node in (('CFNode', cf), ('LIFNode', lif)):
        for mode in ('inference', 'training'):
            node.train(mode == 'training')
            node.reset()
            node(xs[0])  # the first step turns the float state into a tensor: not counted
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                if mode == 'inference':
                    with torch.no_grad():
                        for x in xs[1:]:
                            node(x)
                else:
                    outs = [node(x) for x in xs[1:]]
            node.reset()
            if mode == 'training':
                del outs
            ops = collections.Counter()
            for evt in prof.key_averages():
                if evt.key.startswith('aten::') or '::' in evt.key:
                    ops[evt.key] += evt.count
            steps = T - 1
            top_level = sum(c for k, c in ops.items())
            out[f'{label} {mode}' + (' (forward steps)' if mode == 'training' else '')] = dict(
                ops_per_step={k: c / steps for k, c in ops.most_common(12)},
                all_op_events_per_step=top_level / steps,
                allocations_per_step=sum(c for k, c in ops.items()
                                         if k in ('aten::empty', 'aten::empty_like', 'aten::empty_strided',
                                                  'aten::full', 'aten::zeros', 'aten::scalar_tensor')) / steps)
    return out


def markdown(payload: dict) -> str:
    meta = payload['meta']
    cfg = payload['config']
    lines = [f'# Single-step (streaming) profile of CFNode: {payload["tag"]}', '']
    lines += common.stamp_lines(meta)
    lines += ['', f'Command: `{payload["command"]}`', '',
              f'Layer {cfg["batch"]} x {cfg["neurons"]}, float32, {cfg["threads"]} torch '
              f'thread(s), CF defaults (`backend=\'auto\'` = {payload["backend"]}) and '
              'LIFNode(tau=4/3, decay_input=False, v_reset=None). Load average when the run '
              f'started {meta["load_average_start"]}, when it ended {meta.get("load_average_end")}'
              ' (the machine is shared: absolute microseconds are inflated by other processes; '
              'the minimum-of-repeats timings and the fractions are what to read).', '',
              '## Layers of one inference step (eval, no_grad)', '',
              'Each entry point timed on its own with the arguments the outer layer would pass '
              '(CPU time of the thread, minimum over 7 runs of the mean per call); "adds" = this layer minus the next '
              'one down, i.e. what this layer costs on top of the work below it.', '']
    layers = payload['layers']['layers']
    rows = []
    for i, r in enumerate(layers):
        below = layers[i + 1]['us'] if i + 1 < len(layers) else None
        adds = '' if below is None else f'{r["us"] - below:.1f}'
        rows.append([r['name'], f'{r["us"]:.1f}', adds,
                     f'{100 * r["us"] / layers[0]["us"]:.0f}%'])
    lines.append(common.markdown_table(['layer', 'us per call', 'adds (us)', 'of the step'], rows))
    lines += ['', 'Parts timed on their own (us per call):', '']
    lines.append(common.markdown_table(['part', 'us'], [[r['name'], f'{r["us"]:.1f}']
                                                       for r in payload['layers']['parts']]))
    for mode, prof in payload['cprofile'].items():
        lines += ['', f'## cProfile, {mode}: internal time by category', '',
                  f'{prof["steps"]} steps profiled ({prof["total_profiled_s"]:.3g} s with the '
                  'profiler on).', '']
        lines.append(common.markdown_table(
            ['category', 'fraction', 'us/step (profiled)'],
            [[c['category'], f'{100 * c["fraction"]:.1f}%', f'{c["us_per_step_profiled"]:.1f}']
             for c in prof['categories']]))
        lines += ['', 'Top functions by internal time:', '']
        lines.append(common.markdown_table(
            ['function', 'calls/step', 'fraction'],
            [[f'`{t["function"]}`', f'{t["calls_per_step"]:.2g}', f'{100 * t["fraction"]:.1f}%']
             for t in prof['top']]))
    lines += ['', '## torch.profiler: ATen ops per step', '']
    lines.append(common.markdown_table(
        ['node, mode', 'op events / step', 'allocations / step', 'most frequent ops (per step)'],
        [[k, f'{v["all_op_events_per_step"]:.1f}', f'{v["allocations_per_step"]:.1f}',
          ', '.join(f'{op} {n:.2g}' for op, n in v['ops_per_step'].items())]
         for k, v in payload['aten'].items()]))
    if payload.get('summary'):
        lines += ['', '## Summary', ''] + payload['summary']
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--neurons', type=int, default=512)
    p.add_argument('--T', type=int, default=100, help='steps per profiled sequence')
    p.add_argument('--reps', type=int, default=5, help='profiled sequences per mode')
    p.add_argument('--number', type=int, default=2000, help='calls per timing of a layer')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=os.path.join(common.REPO_ROOT, 'benchmarks', 'results'))
    p.add_argument('--tag', default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script in SpikingJelly 0.0.0.0.14
    torch.manual_seed(0)
    device = torch.device('cpu')
    from spikingjelly_cf.functional.neuron import resolve_backend
    from spikingjelly_cf.surrogate import CFRect
    meta = common.environment(device)
    tag = args.tag or f'sj{meta["spikingjelly"]}'
    B, N = args.batch, args.neurons
    payload = dict(benchmark='single_step_profile', tag=tag,
                   command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]), meta=meta,
                   config=dict(batch=B, neurons=N, T=args.T, reps=args.reps, number=args.number,
                               threads=args.threads),
                   backend=resolve_backend('auto', torch.zeros(1, B, N), CFRect()))
    print(f'single-step profile [{tag}]: layer {B}x{N}, load average {meta["load_average_start"]}',
          flush=True)
    payload['layers'] = layers_of_the_call(B, N, args.number)
    for r in payload['layers']['layers'] + payload['layers']['parts']:
        print(f'{r["name"]:<62} {r["us"]:8.1f} us', flush=True)
    payload['cprofile'] = profile_sequences(B, N, args.T, args.reps)
    for mode, prof in payload['cprofile'].items():
        print(f'\ncProfile {mode}:')
        for c in prof['categories']:
            print(f'  {c["category"]:<72} {100 * c["fraction"]:5.1f}%')
    payload['aten'] = aten_ops_per_step(B, N, min(args.T, 50))
    for k, v in payload['aten'].items():
        print(f'{k:<20} {v["all_op_events_per_step"]:.1f} op events/step, '
              f'{v["allocations_per_step"]:.1f} allocations/step')
    meta['load_average_end'] = common.load_average()
    out_dir = common.results_dir(args.out, device)
    stem = os.path.join(out_dir, f'single_step_profile_{tag}')
    common.write_json(stem + '.json', payload)
    common.write_text(stem + '.md', markdown(payload))
    print(f'\nwrote {stem}.json, .md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
