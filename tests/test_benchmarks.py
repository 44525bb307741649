"""The benchmark scripts in ``--quick`` mode: they run, check correctness and write sane reports.

Each script runs once per module as a subprocess (against the SpikingJelly this test session
imports) with a temporary output folder. Timings are not asserted: only that every figure is
there, positive and finite, that the CF backends passed their correctness check, and that no
baseline vanished without a reason.
"""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip('matplotlib')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, 'benchmarks')


def _run_quick(script: str, out_dir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.setdefault('MPLBACKEND', 'Agg')
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), '--quick', '--device', 'cpu',
                           '--out', out_dir], capture_output=True, text=True, timeout=600, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, f'{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
    return proc


def _outputs(out_dir: str, prefix: str):
    folders = glob.glob(os.path.join(out_dir, '*_cpu-*core'))
    assert len(folders) == 1, folders
    stems = glob.glob(os.path.join(folders[0], f'{prefix}_*.json'))
    assert len(stems) == 1, stems
    stem = stems[0][:-len('.json')]
    for ext in ('.json', '.md', '.png'):
        assert os.path.getsize(stem + ext) > 100, stem + ext
    with open(stem + '.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with open(stem + '.json') as f:
        payload = json.load(f)
    with open(stem + '.md') as f:
        markdown = f.read()
    return payload, markdown


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_meta(meta: dict):
    import spikingjelly_cf
    for key in ('date', 'git_commit', 'torch', 'spikingjelly', 'spikingjelly_cf', 'device',
                'device_label', 'cpu_count'):
        assert meta.get(key) not in (None, ''), key
    assert meta['torch'] == torch.__version__
    assert meta['spikingjelly'] == spikingjelly_cf.SPIKINGJELLY_VERSION


@pytest.fixture(scope='module')
def neuron_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('bench_neuron'))
    proc = _run_quick('bench_neuron.py', out)
    payload, markdown = _outputs(out, 'neuron')
    return proc, payload, markdown


@pytest.fixture(scope='module')
def training_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('bench_training'))
    proc = _run_quick('bench_training.py', out)
    payload, markdown = _outputs(out, 'training')
    return proc, payload, markdown


def test_neuron_quick_reports(neuron_run):
    proc, payload, markdown = neuron_run
    _check_meta(payload['meta'])
    assert payload['config']['quick'] is True
    # correctness checked before timing, and passed, for every CF backend that ran
    assert payload['checks']
    assert all(c['passed'] for c in payload['checks']), payload['checks']
    checked = {c['candidate'] for c in payload['checks']}
    assert 'CFNode[torch]' in checked
    ok = [r for r in payload['results'] if r['status'] == 'ok']
    for r in ok:
        assert _positive(r['time_s']['median']) and r['time_s']['repeats'] >= 3, r
        assert r['time_s']['q25'] <= r['time_s']['median'] <= r['time_s']['q75'] + 1e-12
        assert _positive(r['bytes_moved'])
        assert r['peak_memory_bytes'] is None or r['peak_memory_bytes'] >= 0
    # every mode has the default CF backend, a LIF baseline and the copy limit
    for mode in ('inference', 'training'):
        rows = [r for r in ok if r['mode'] == mode]
        assert any(r['family'] == 'CF' and r['default'] for r in rows), mode
        assert any(r['family'] == 'LIF' for r in rows), mode
        assert any(r['family'] == 'copy' for r in rows), mode
    # nothing dropped silently: whatever did not run says why
    for r in payload['results']:
        if r['status'] != 'ok':
            assert r.get('reason'), r
    # ratios are measured in this run and sane
    assert payload['ratios']
    for r in payload['ratios']:
        assert _positive(r['cf_over_other']) and _positive(r['speedup']), r
    assert payload['targets']
    for t in payload['targets']:
        assert _positive(t['value']) or t.get('reason'), t
    for key in ('inference', 'training'):
        assert key in payload['bytes_formulas']
    # the second and third physical-limit figures and the allocation cost
    from spikingjelly_cf.backends import cpp
    ft = payload['first_touch_reference']
    assert _positive(ft['fill_preallocated_s']) and _positive(ft['alloc_and_first_fill_s'])
    assert math.isfinite(ft['alloc_first_touch_s_per_MiB'])
    for mode in ('inference', 'training'):
        rows = [r for r in ok if r['mode'] == mode]
        fresh = [r for r in rows if r['family'] == 'clone']
        assert fresh and all(r['candidate'] == 'copy (fresh outputs)' for r in fresh), mode
        for r in fresh:
            assert _positive(r['time_s']['median']) and r.get('implementation'), r
            assert _positive(r['first_touch']['alloc_and_first_fill_s']), r
            assert math.isfinite(r['first_touch']['alloc_first_touch_s_per_MiB']), r
        kernel = [r for r in rows if r['family'] == 'CF-kernel']
        if cpp.available():
            assert kernel, mode
            assert all(_positive(r['time_s']['median']) for r in kernel), kernel
    if cpp.available():
        assert 'CFNode[cpp] kernel only' in checked
    else:
        assert any(r['family'] == 'CF-kernel' and r['status'] == 'unavailable' and r['reason']
                   for r in payload['results'])
    assert payload['physical_limits']
    for m in payload['physical_limits']:
        for key in ('copy_s', 'copy_fresh_s', 'cf_over_copy', 'cf_over_copy_fresh'):
            assert _positive(m[key]), (key, m)
        if cpp.available():
            assert _positive(m['kernel_only_s']) and _positive(m['kernel_only_over_copy']), m
    assert any('copy (fresh outputs)' in t['target'] for t in payload['targets'])
    for heading in ('copy (fresh outputs)', 'kernel only', 'alloc+touch'):
        assert heading in markdown, heading
    assert 'physical limits' in proc.stdout
    for heading in ('Correctness', 'Targets', 'median time', 'peak memory'):
        assert heading in markdown
    assert '=== targets ===' in proc.stdout


def test_neuron_quick_single_step_section(neuron_run):
    """The single-step (streaming) rows: CF checked against the reference, CF and LIF timed in
    one run per mode, ratios of those medians, the load noted, targets from the eager pair."""
    proc, payload, markdown = neuron_run
    ss = payload['single_step']
    assert ss['threads'] == 1 and ss['T'] == 20 and set(ss['layers']) == {'small'}
    assert ss['checks'] and all(c['passed'] for c in ss['checks']), ss['checks']
    assert {c['mode'] for c in ss['cases']} == {'inference', 'training'}
    for case in ss['cases']:
        assert case['load_average_before'] and case['rounds'] >= 3
        rows = {r['family']: r for r in case['rows']}
        assert set(rows) == {'CF', 'LIF'}, rows   # --quick: no compiled candidates
        for r in rows.values():
            assert r['status'] == 'ok', r
            assert _positive(r['per_step_s']['median']) and _positive(r['cpu_per_step_s'])
            assert r['per_step_s']['repeats'] == case['rounds']
        (pair,) = case['ratios']
        assert pair['target'] and pair['cf'] == rows['CF']['candidate']
        assert pair['ratio'] == pytest.approx(rows['CF']['per_step_s']['median']
                                              / rows['LIF']['per_step_s']['median'])
    stated = [t for t in payload['targets'] if 'single-step' in t['target']]
    assert len(stated) == 2 and all(t['passed'] is (t['value'] <= 1.0) for t in stated)
    assert 'Single-step (streaming) mode' in markdown and 'single-step (streaming)' in proc.stdout


def test_single_step_timing_alternates():
    """Every round runs one sequence of each candidate, the order reversed every other round,
    and the ratio divides the medians of those same rounds."""
    bn = _load('bench_neuron')
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly_cf import CFNode
    order = []

    class Tagged(torch.nn.Module):
        def __init__(self, tag, inner):
            super().__init__()
            self.tag, self.inner = tag, inner

        def forward(self, x):
            order.append(self.tag)
            return self.inner(x)

        def reset(self):
            self.inner.reset()

    cands = [bn.Candidate('cf', 'CF', 'auto', default=True,
                          factory=lambda: Tagged('cf', CFNode(step_mode='s'))),
             bn.Candidate('lif', 'LIF', 'torch',
                          factory=lambda: Tagged('lif', sj_neuron.LIFNode(step_mode='s')))]
    cfg = bn.Config(device=torch.device('cpu'), dtypes=[torch.float32], Ts=[4], Ns=[64],
                    modes=['inference'], warmup=1, min_repeats=4, budget_s=0.0, max_call_s=1.0,
                    memory=False, check_N=64, quick=True, only=None, single_step='only',
                    single_step_layers={'tiny': (2, 8)}, single_step_T=3,
                    single_step_budget_s=0.0)
    case = bn.time_single_step(cfg, cands, 'inference', 'tiny')
    assert case['rounds'] == 4
    timed = order[2 * 3 * 2:]   # first sequence + one warm-up sequence of each, 3 steps each
    per_round = [timed[i:i + 6] for i in range(0, len(timed), 6)]
    assert per_round[0] == ['cf'] * 3 + ['lif'] * 3 and per_round[1] == ['lif'] * 3 + ['cf'] * 3
    assert len(per_round) == 4
    (pair,) = case['ratios']
    rows = {r['candidate']: r for r in case['rows']}
    assert pair['ratio'] == pytest.approx(rows['cf']['per_step_s']['median']
                                          / rows['lif']['per_step_s']['median'])
    (target,) = bn.single_step_targets(dict(threads=1, cases=[case]))
    assert target['passed'] is (pair['ratio'] <= 1.0) and 'timed alternately' in target['target']


def test_single_step_check_catches_a_wrong_neuron():
    """The single-step correctness check fails for a neuron that is not the CF neuron."""
    bn = _load('bench_neuron')
    from spikingjelly_cf import CFNode
    good = bn.check_single_step(bn.Candidate('cf', 'CF', 'auto', factory=lambda: CFNode()),
                                2, 8, 6, torch.device('cpu'), torch.float32)
    assert good['passed'], good
    bad = bn.check_single_step(bn.Candidate('cf', 'CF', 'auto',
                                            factory=lambda: CFNode(v_threshold=1.1)),
                               2, 8, 6, torch.device('cpu'), torch.float32)
    assert not bad['passed'] and bad['neurons_with_spike_mismatch'] > 0, bad


def test_profile_single_step_smoke(tmp_path):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, 'profile_single_step.py'),
                           '--batch', '2', '--neurons', '8', '--T', '4', '--reps', '1',
                           '--number', '5', '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = glob.glob(os.path.join(str(tmp_path), '*_cpu-*core', 'single_step_profile_*.md'))
    with open(md[:-3] + '.json') as f:
        payload = json.load(f)
    layers = payload['layers']['layers']
    assert layers[0]['name'].startswith('node(x)') and all(_positive(r['us']) for r in layers)
    for mode in ('inference', 'training'):
        cats = payload['cprofile'][mode]['categories']
        assert sum(c['fraction'] for c in cats) == pytest.approx(1.0)
    assert set(payload['aten']) == {'CFNode inference', 'CFNode training (forward steps)',
                                    'LIFNode inference', 'LIFNode training (forward steps)'}
    with open(md) as f:
        text = f.read()
    for heading in ('Layers of one inference step', 'cProfile, inference', 'ATen ops per step'):
        assert heading in text


def test_training_quick_reports(training_run):
    proc, payload, markdown = training_run
    _check_meta(payload['meta'])
    assert {s['network'] for s in payload['summary']} == {'dvs-vgg', 'DVSGestureNet'}
    for s in payload['summary']:
        assert _positive(s['cf_over_lif']), s
        assert s['threshold'] > 1  # the verdict is the ratio against the threshold, nothing else
        assert s['passed'] is (s['cf_over_lif'] <= s['threshold']), s
    for r in payload['results']:
        assert r['status'] in ('ok', 'unavailable'), r
        if r['status'] == 'ok':
            assert _positive(r['time_s']['median']) and math.isfinite(r['first_loss'])
        else:
            assert r.get('reason')
    assert 'CF / LIF' in markdown


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f'_bench_{name}', os.path.join(BENCH, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bytes_moved_formula():
    bench = _load('bench_neuron')
    assert bench.bytes_moved('inference', 8, 2 ** 20, 4) == (2 * 8 + 2) * 2 ** 20 * 4
    assert bench.bytes_moved('training', 8, 2 ** 20, 2) == (6 * 8 + 3) * 2 ** 20 * 2


@pytest.mark.parametrize('k_pos,k_neg', [(2, 2), (1, 0), (3, 1)])
def test_flexsn_cf_core_matches_reference(k_pos, k_neg):
    """The single-step CF function given to FlexSN is the CF neuron: spikes, v and gradients."""
    from spikingjelly_cf.functional.neuron import cf_multi_step_ref
    bench = _load('bench_neuron')
    core = bench.flexsn_cf_core_factory(k_pos=k_pos, k_neg=k_neg)
    x = (torch.randn(6, 257, dtype=torch.float64) * 1.5).requires_grad_(True)
    g = torch.randn(6, 257, dtype=torch.float64)
    v = torch.zeros(257, dtype=torch.float64)
    spikes = []
    for t in range(x.shape[0]):
        s, v = core(x[t], v)
        spikes.append(s)
    s_seq = torch.stack(spikes)
    grad, = torch.autograd.grad(s_seq, x, g)
    s_ref, v_ref, _, _ = cf_multi_step_ref(x, torch.zeros(257, dtype=torch.float64), k_pos=k_pos,
                                           k_neg=k_neg)
    grad_ref, = torch.autograd.grad(s_ref, x, g)
    assert torch.equal(s_seq.detach(), s_ref.detach())
    torch.testing.assert_close(v.detach(), v_ref.detach())
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.one_pass  # the GPU script's benchmark on the CPU: nothing SpikingJelly-specific
def test_gpu_bench_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_bench.py (the GPU script's benchmark) runs end to end on a tiny CPU case
    and writes its JSON and Markdown; gpu_check.sh parses (bash -n)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH')
                                                  else []))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, 'gpu_bench.py'), '--device', 'cpu',
                           '--T', '2', '--log2n', '8', '--dtypes', 'float32', '--budget-s', '0.01',
                           '--out', str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.load(open(tmp_path / 'gpu_bench.json'))
    by_name = {(r['candidate'], r['mode']): r for r in result['rows']}
    for mode in ('training', 'inference'):
        assert by_name[('copy', mode)]['time_s'] > 0
        lif = [r for (name, m), r in by_name.items() if name.startswith('LIF[') and m == mode]
        assert any(r['status'] == 'ok' and r['time_s'] > 0 and r['peak_bytes'] > 0 for r in lif)
    assert (tmp_path / 'gpu_bench.md').read_text().startswith('# CF GPU backends')
    if subprocess.run(['bash', '--version'], capture_output=True).returncode == 0:
        check = subprocess.run(['bash', '-n', os.path.join(BENCH, 'gpu_check.sh')],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


@pytest.mark.one_pass  # the GPU script end to end on the CPU: nothing SpikingJelly-specific
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh runs its steps (info, check, the GPU tests, bench, ...) within its
    budget on the CPU (GPU_CHECK_DEVICE=cpu), writes its summary and exports the reports;
    fetch_gpu_wheels.sh parses."""
    if subprocess.run(['bash', '--version'], capture_output=True).returncode != 0:
        pytest.skip('no bash')
    for script in ('gpu_check.sh', 'fetch_gpu_wheels.sh'):
        check = subprocess.run(['bash', '-n', os.path.join(BENCH, script)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DEVICE='cpu', GPU_CHECK_QUICK='1',
               GPU_CHECK_BUDGET_S='150', GPU_CHECK_RESULTS=str(tmp_path / 'results'),
               GPU_CHECK_SITE=str(tmp_path / 'site'), GPU_CHECK_EXPORT=str(tmp_path / 'export'))
    proc = subprocess.run(['bash', os.path.join(BENCH, 'gpu_check.sh')], capture_output=True,
                          text=True, timeout=400, env=env, cwd=REPO)
    summary = json.loads((tmp_path / 'results' / 'gpu_check.json').read_text())
    assert proc.returncode == 1 and not summary['ok'], 'no GPU: the GPU tests all skip'
    steps = summary['steps']
    assert steps['info']['exit_status'] == 0 and steps['check']['exit_status'] == 0, steps
    assert summary['check']['passed'] and summary['check']['rows'] >= 4
    assert summary['total_s'] <= 150 + 30, 'the budget holds'
    for name in ('gpu_check.json', 'gpu_check.log', 'check.json', 'info.json', 'results.tar.gz'):
        assert (tmp_path / 'export' / name).is_file(), name
    assert len(os.listdir(tmp_path / 'export')) <= 8  # what the device tool brings back


# -- bench_protocol.py (issue 11) ---------------------------------------------------------------
@pytest.fixture(scope='module')
def protocol_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('bench_protocol'))
    proc = _run_quick('bench_protocol.py', out)
    payload, markdown = _outputs(out, 'protocol')
    return proc, payload, markdown


def test_protocol_quick(protocol_run):
    _, payload, markdown = protocol_run
    _check_meta(payload['environment'])
    assert payload['checks'] and all(c['passed'] for c in payload['checks'])
    rows = payload['protocol']
    for r in rows:  # every candidate ran or says why not
        assert r['status'] == 'ok' or r.get('reason'), r
    ok = {r['candidate']: r for r in rows if r['status'] == 'ok'}
    assert any(r['family'] == 'CF' and r['default'] for r in ok.values())
    assert any(r['family'] == 'LIF' for r in ok.values())
    for r in ok.values():
        assert _positive(r['time_s']['median']) and _positive(r['saved_bytes']), r
    per_step = {r['candidate']: r for r in payload['per_step'] if 'bytes_per_neuron_step' in r}
    if 'CFNode[cpp] CFRect' not in per_step:
        pytest.skip('the cpp backend is not built')
    # the fused kernel saves float32 h (4 B) per neuron-step; lean 1 B (CFRect window codes) or
    # 3 B (TSG: nearest level's index + float16 offset)
    assert per_step['CFNode[cpp] CFRect']['neuron_step_bytes_per_neuron_step'] == 4.0
    assert per_step['CFNode[cpp] CFRect lean']['neuron_step_bytes_per_neuron_step'] == 1.0
    assert per_step['CFNode[cpp] TSG(T=T) lean']['neuron_step_bytes_per_neuron_step'] == 3.0
    long_rows = [r for r in payload['long_T'] if r['status'] == 'ok']
    assert {r['tsg'] for r in long_rows} == {'TSG(T=T)', 'TSG(T=1)'}
    for r in long_rows:  # saved bytes grow with T
        twice = [q for q in long_rows if q['candidate'] == r['candidate']
                 and q['memory_mode'] == r['memory_mode'] and q['T'] == 2 * r['T']]
        for q in twice:  # (the Linear's weight is a constant part)
            assert q['saved_bytes'] > r['saved_bytes']
    assert 'Saved bytes per neuron-step' in markdown and 'peers found' in markdown


def test_compiled_peer_targets_and_summary():
    """Issue 9's ratios from synthetic rows: CF default vs compiled LIF / CFNode[inductor]
    (training is the target, inference for information) and the compiled network ratio."""
    bench = _load('bench_neuron')

    def row(name, family, backend, t, mode='training', default=False):
        return dict(candidate=name, family=family, backend=backend, default=default, mode=mode,
                    dtype='float32', T=8, N=2 ** 20, status='ok', time_s={'median': t})
    for mode, passed in (('training', [True, False]), ('inference', [None, None])):
        rows = [row('CFNode[cpp]', 'CF', 'cpp', 1.0, mode, True),
                row('CFNode[inductor]', 'CF', 'inductor', 0.8, mode),
                row('LIFNode[torch] compiled (SJ x)', 'LIF-compiled', 'torch', 1.25, mode)]
        out = bench.compiled_targets(rows, rows[0], 'float32', mode, 8, 2 ** 20, 'here')
        assert [t['value'] for t in out] == pytest.approx([0.8, 1.25])
        assert [t['threshold'] for t in out] == [bench.COMPILED_LIF_TARGET, bench.INDUCTOR_TARGET]
        assert [t['passed'] for t in out] == passed
    training = _load('bench_training')
    rows = [dict(network='n', variant=v, family=f, status='ok', time_s={'median': t})
            for v, f, t in (('CF', 'CF', 2.0), ('LIF', 'LIF', 1.0), ('CF c', 'CF-compiled', 1.1),
                            ('LIF c', 'LIF-compiled', 1.0))]
    summary = {s['kind']: s for s in training.summarize(rows)}
    assert summary['eager']['cf_over_lif'] == pytest.approx(2.0) and not summary['eager']['passed']
    assert summary['compiled']['cf_over_lif'] == pytest.approx(1.1) and summary['compiled']['passed']
    assert summary['compiled']['cf'] == 'CF c'


def test_compiled_lif_check_against_eager():
    """The compiled-LIFNode peer is checked against the same LIFNode run eagerly. Here Dynamo
    only (``backend='eager'``: no Inductor code generation, seconds instead of minutes); the
    benchmark itself compiles with Inductor."""
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly_cf import _compat
    bench = _load('bench_neuron')
    kw = dict(step_mode='m', **({'backend': 'torch'} if _compat.CLASSIC else {}))
    cand = bench.Candidate('LIFNode[torch] compiled', 'LIF-compiled', 'torch',
                           factory=lambda: torch.compile(sj_neuron.LIFNode(**kw), backend='eager'))
    r = bench.check_compiled_lif(cand, 2, 64, torch.device('cpu'), torch.float32)
    assert r['passed'], r
    assert r['neurons_with_spike_mismatch'] == 0 and r['grad_x_max_rel_err'] <= 1e-5
    assert bench.is_compiled(cand)
    assert callable(bench.compiled_lif_factory(sj_neuron, _compat.CLASSIC))


def test_protocol_targets_from_rows():
    """``evaluate_targets``: the ratio is CF's median over the fastest LIF / peer of the same n,
    the neuron-only ratio subtracts the Linear layer, and only the target's T and n pass/fail."""
    bp = _load('bench_protocol')
    cfg = bp.Config(device=torch.device('cpu'), ns=[512, 1024], T=bp.TARGET_T, batch=16, long_Ts=[],
                    long_n=512, long_n_reference=512, per_step_T=8, slow_s=1.0, long_backends=None,
                    warmup=1, repeats=1, max_call_s=1.0, quick=True, only=None)

    def row(n, family, t, candidate, **kw):
        return dict(n=n, family=family, candidate=candidate, status='ok', time_s={'median': t},
                    default=kw.get('default', False), surrogate=kw.get('surrogate', ''),
                    memory_mode=kw.get('memory_mode', 'normal'))

    rows = [row(512, 'CF', 3.0, 'CF', default=True, surrogate='TSG'),
            row(512, 'LIF', 12.0, 'LIF slow'), row(512, 'LIF', 10.0, 'LIF fast'),
            row(512, 'peer', 5.0, 'snnTorch'), row(512, 'linear', 2.0, 'Linear'),
            row(1024, 'CF', 4.0, 'CF', default=True, surrogate='TSG'),
            row(1024, 'LIF', 8.0, 'LIF fast')]
    out = bp.evaluate_targets(cfg, rows, [])
    by = {(o['n'], o['target'].split(' / ')[1].split(' <=')[0]): o for o in out}
    assert len(out) == 3
    lif = by[(512, 'fastest LIF fast')]
    assert lif['measured'] == pytest.approx(0.3) and lif['neuron_only_ratio'] == pytest.approx(1 / 8)
    assert lif['passed'] is True
    peer = by[(512, 'fastest peer (snnTorch)')]
    assert peer['measured'] == pytest.approx(0.6) and peer['neuron_only_ratio'] == pytest.approx(1 / 3)
    assert peer['passed'] is False
    assert by[(1024, 'fastest LIF fast')]['passed'] is None   # 1024 is not a target size


def test_head_to_head_alternates_and_sets_the_target():
    """bench_neuron's issue-9 ratio: CF default and the compiled LIF are timed alternately and the
    target uses that ratio (the sequential one is kept in the target's text)."""
    bn = _load('bench_neuron')
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly_cf import neuron
    order = []

    class Tagged(torch.nn.Module):
        def __init__(self, tag, inner):
            super().__init__()
            self.tag, self.inner = tag, inner

        def forward(self, x):
            order.append(self.tag)
            return self.inner(x)

        def reset(self):
            self.inner.reset()

    cf = bn.Candidate('CFNode[cpp]', 'CF', 'cpp', default=True)
    lif = bn.Candidate('LIF compiled', 'LIF-compiled', 'torch')
    modules = {(cf.name, torch.float32): Tagged('cf', neuron.CFNode(step_mode='m', backend='cpp')),
               (lif.name, torch.float32): Tagged('lif', sj_neuron.LIFNode(step_mode='m'))}
    cfg = bn.Config(device=torch.device('cpu'), dtypes=[torch.float32], Ts=[4], Ns=[64],
                    modes=['training'], warmup=1, min_repeats=3, budget_s=0.01, max_call_s=1.0,
                    memory=False, check_N=64, quick=True, only=None)
    x = torch.randn(4, 64)
    rows = [dict(candidate=c.name, family=c.family, backend=c.backend, default=c.default,
                 mode='training', dtype='float32', T=4, N=64, status='ok', time_s={'median': t})
            for c, t in ((cf, 2.0), (lif, 1.0))]
    bn.head_to_head(cfg, [cf, lif], modules, rows, 'training', torch.float32, x, torch.randn(4, 64), '')
    res = rows[0]['interleaved_vs_compiled_lif']
    assert res['rounds'] >= 10 and res['other'] == lif.name
    assert res['ratio'] == pytest.approx(res['cf_median_s'] / res['other_median_s'])
    timed = order[4:]   # after two warm-up calls of each
    assert len(timed) == 2 * res['rounds']
    assert timed[:4] == ['cf', 'lif', 'lif', 'cf']   # who goes first alternates
    (target,) = [t for t in bn.compiled_targets(rows, rows[0], 'float32', 'training', 4, 64, 'here')
                 if 'LIF compiled' in t['target']]
    assert target['value'] == res['ratio'] and 'one after the other: 2' in target['target']
