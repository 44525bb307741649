"""``python -m spikingjelly_cf`` (info, check, bench): runs here, and ``check`` fails on a wrong
kernel, naming the backend and the case.

A wrong build of the C kernel is made the way a user's compiler could make one: a copy of
``csrc/cf_cpu.c`` and of ``csrc/cf_step.h`` with one expression changed, compiled into a shared
library and loaded through ``SPIKINGJELLY_CF_CPP_LIBRARY``.
"""
import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest
import torch

import spikingjelly_cf
from spikingjelly_cf import __main__ as cli
from spikingjelly_cf import _check, backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, 'spikingjelly_cf', 'csrc')


def run_cli(*args, env=None, timeout=600):
    full_env = dict(os.environ)
    full_env['PYTHONPATH'] = os.pathsep.join([REPO] + ([full_env['PYTHONPATH']]
                                                       if full_env.get('PYTHONPATH') else []))
    full_env.update(env or {})
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'spikingjelly_cf', *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO)
    proc.seconds = time.perf_counter() - began
    return proc


def test_console_script_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, 'setup.cfg'))
    scripts = cfg['options.entry_points']['console_scripts'].strip().splitlines()
    assert 'spikingjelly-cf = spikingjelly_cf.__main__:main' in [s.strip() for s in scripts]
    assert callable(cli.main)


def test_info_runs(tmp_path):
    path = tmp_path / 'info.json'
    proc = run_cli('info', '--json', str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f'torch        {torch.__version__}' in out
    assert f'SpikingJelly {spikingjelly_cf.SPIKINGJELLY_VERSION}' in out
    assert 'Backends per device type and dtype' in out
    info = json.loads(path.read_text())
    cpu = {e['dtype']: e for e in info['backends']['cpu']}
    if backends.is_available('cpp'):
        assert "float32   runs: cpp" in out and "'auto' -> cpp" in out
        assert cpu['float32']['auto'] == 'cpp'
        assert cpu['float16']['auto'] == cpu['bfloat16']['auto'] == 'cpp'
    assert cpu['float64']['auto'] == 'torch'
    assert 'cpp' in cpu['float64']['unavailable']  # why the others cannot
    assert 'cupy' in cpu['float32']['unavailable']


def test_check_quick_passes(tmp_path):
    if not backends.is_available('cpp'):
        pytest.skip(backends.unavailable_reason('cpp'))
    path = tmp_path / 'check.json'
    proc = run_cli('check', '--quick', '--json', str(path))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    print(f'check --quick took {proc.seconds:.1f} s (wall clock, shared machine)')
    report = json.loads(path.read_text())
    assert report['passed'] and report['quick']
    rows = {(r['backend'], r['dtype'], r['surrogate']): r for r in report['rows']}
    for backend in ('cpp', 'torch'):
        for sg in ('CFRect', 'TSG', 'Sigmoid', 'ATan'):
            row = rows[(backend, 'float32', sg)]
            assert row['passed'] and row['largest_error'] < 1e-5
            assert [c['case'] for c in row['cases']] == ['T=8', 'T=8, other parameters', 'T=1',
                                                         'T=64', 'non-contiguous',
                                                         'single-step vs multi-step']
            for case in row['cases']:
                assert case['errors']['s'] == 0, case
    assert 'grad_p' in rows[('cpp', 'float32', 'TSG')]['cases'][0]['errors']
    assert rows[('cpp', 'float32', 'opcheck')]['passed']
    assert rows[('cpp', 'float32', 'torch.compile')]['passed']
    skipped = {s['backend']: s['reason'] for s in report['not_checked']}
    assert 'inductor' in skipped and '--quick' in skipped['inductor']
    assert report['environment']['torch'] == torch.__version__
    assert 'PASS' in proc.stdout and 'FAIL' not in proc.stdout
    assert f"all {len(report['rows'])} rows passed" in proc.stdout


def _wrong(monkeypatch, name, transform):
    """Replace backend ``name``'s multi-step function by ``transform(result)`` of it."""
    backends.is_available(name)
    real = backends.get(name)

    def wrong(*args, **kwargs):
        return transform(real(*args, **kwargs))

    monkeypatch.setitem(backends._functions, name, wrong)


def test_check_fails_on_a_patched_backend(monkeypatch, capsys):
    """A wrong backend function (v_last off by 1e-4) makes check exit 1 naming it and the case."""
    if not backends.is_available('cpp'):
        pytest.skip(backends.unavailable_reason('cpp'))
    _wrong(monkeypatch, 'cpp', lambda r: (r[0], r[1] + 1e-4, r[2], r[3]))
    status = cli.main(['check', '--quick', '--backends', 'cpp', 'torch', '--surrogates', 'TSG',
                       '--dtypes', 'float32', '--no-progress'])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL: backend 'cpp' on cpu, float32, TSG, case 'T=8': v_last differs by" in out
    assert "backend 'torch'" not in out.split('FAIL:', 1)[1]  # only the wrong one fails
    assert '1 of 4 rows FAILED' in out


def test_check_fails_on_wrong_gradients(monkeypatch):
    """Wrong gradients alone (forward right) are caught too: gradient of x off by 0.1 %."""
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            return s.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.001

    if not backends.is_available('cpp'):
        pytest.skip(backends.unavailable_reason('cpp'))
    _wrong(monkeypatch, 'cpp', lambda r: (Scale.apply(r[0]),) + tuple(r[1:]))
    report = _check.run_check(quick=True, only_backends=['cpp'], only_surrogates=['CFRect'],
                              progress=False)
    row = next(r for r in report['rows'] if r['surrogate'] == 'CFRect')
    assert not report['passed'] and not row['passed']
    assert 'grad_x differs' in row['message'] or 'grad_v0 differs' in row['message']


# -- a wrong build of the C kernel -----------------------------------------------------------
def build_kernel(folder, old=None, new=None):
    """``csrc/cf_cpu.c`` compiled against a copy of ``cf_step.h`` with ``old`` replaced by
    ``new``, as setup.py compiles it; the path of the shared library."""
    cc = (sysconfig.get_config_var('CC') or 'gcc').split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f'no C compiler ({cc})')
    shutil.copy(os.path.join(CSRC, 'cf_cpu.c'), folder)
    header = open(os.path.join(CSRC, 'cf_step.h')).read()
    if old is not None:
        assert header.count(old) == 1, f'{old!r} is not in cf_step.h once'
        header = header.replace(old, new)
    with open(os.path.join(folder, 'cf_step.h'), 'w') as f:
        f.write(header)
    lib = os.path.join(folder, 'libcf_cpu_test.so')
    cmd = [cc, '-O3', '-fopenmp', '-ffp-contract=off', '-fno-trapping-math', '-std=c99',
           '-shared', '-fPIC', f'-I{folder}', f"-I{sysconfig.get_paths()['include']}",
           os.path.join(folder, 'cf_cpu.c'), '-o', lib, '-lm']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return lib


@pytest.mark.one_pass  # compiles the C kernel: independent of the SpikingJelly line
def test_own_build_of_the_kernel_passes(tmp_path):
    """The control: the unmodified sources built the same way pass, loaded from the variable."""
    lib = build_kernel(str(tmp_path))
    env = {'SPIKINGJELLY_CF_CPP_LIBRARY': lib}
    info = run_cli('info', env=env)
    assert info.returncode == 0 and lib in info.stdout
    proc = run_cli('check', '--quick', '--backends', 'cpp', '--surrogates', 'CFRect', 'ATan',
                   '--no-progress', env=env)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]


WRONG_BUILDS = {
    # the charge h = k v + c x off by 1e-3 (a forward error: spikes, h, v)
    'charge': ('return CF_ADD(CF_MUL(p->k, v_prev), CF_MUL(p->c, x));',
               'return CF_ADD(CF_MUL(p->k, v_prev), CF_MUL(p->c, x)) + 1e-3f;',
               ('CFRect', 'TSG', 'Sigmoid', 'ATan')),
    # pi/2 of ATan's derivative to 5 digits (only ATan's gradients, by ~1e-4 relative)
    'atan-constant': ('#define CF_PI_2 1.57079632679489661923f', '#define CF_PI_2 1.5707f',
                      ('ATan',)),
}


@pytest.mark.one_pass
@pytest.mark.parametrize('mutation', sorted(WRONG_BUILDS))
def test_wrong_build_of_the_kernel_fails(tmp_path, mutation):
    old, new, failing = WRONG_BUILDS[mutation]
    lib = build_kernel(str(tmp_path), old, new)
    path = tmp_path / 'check.json'
    proc = run_cli('check', '--quick', '--backends', 'cpp', '--no-progress', '--json', str(path),
                   env={'SPIKINGJELLY_CF_CPP_LIBRARY': lib})
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report['environment']['cpp_kernel']['library'] == lib
    # float32 rows: a perturbation of the arithmetic may hide below the half types' tolerances
    verdicts = {r['surrogate']: r['passed'] for r in report['rows'] if r['dtype'] == 'float32'}
    for sg in ('CFRect', 'TSG', 'Sigmoid', 'ATan'):
        assert verdicts[sg] == (sg not in failing), (sg, verdicts)
    for sg in failing:
        assert f"FAIL: backend 'cpp' on cpu, float32, {sg}, case 'T=8'" in proc.stdout, \
            proc.stdout[-3000:]


@pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='Triton is not installed')
@pytest.mark.filterwarnings('ignore:overflow encountered:RuntimeWarning',
                            'ignore:invalid value encountered:RuntimeWarning')
def test_check_runs_the_triton_kernels_in_the_interpreter():
    """With Triton's interpreter on, check covers the Triton kernels on CPU tensors (bfloat16:
    the storage handled by integer bit operations), their ops and torch.compile."""
    from spikingjelly_cf.backends import triton as tb
    assert tb.use_interpreter(True)
    try:
        report = _check.run_check(quick=True, only_backends=['triton'], only_dtypes=['bfloat16'],
                                  only_surrogates=['TSG'], progress=False)
    finally:
        tb.use_interpreter(None)
    rows = {r['surrogate']: r for r in report['rows']}
    assert set(rows) == {'TSG', 'opcheck', 'torch.compile'}
    assert report['passed'], [r['message'] for r in report['rows'] if not r['passed']]
    assert rows['TSG']['dtype'] == 'bfloat16' and len(rows['TSG']['cases']) == 6


def test_bench_quick(tmp_path):
    """bench --quick: CF on its kernel backends, LIFNode, the copy; the same timing code as
    benchmarks/ (benchlib's measure is the package's)."""
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    try:
        import benchlib
    finally:
        sys.path.pop(0)
    from spikingjelly_cf import _bench
    assert benchlib.measure is _bench.measure and benchlib.peak_memory is _bench.peak_memory
    path = tmp_path / 'bench.json'
    proc = run_cli('bench', '--quick', '--device', 'cpu', '--json', str(path))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    payload = json.loads(path.read_text())
    rows = {(r['candidate'], r['mode']): r for r in payload['rows']}
    for mode in ('training', 'inference'):
        assert rows[('copy', mode)]['time_s'] > 0
        lif = [r for (name, m), r in rows.items() if name.startswith('LIF[') and m == mode]
        assert any(r['status'] == 'ok' and r['time_s'] > 0 for r in lif)
        if backends.is_available('cpp'):
            cf = rows[('CF[cpp]', mode)]
            assert cf['status'] == 'ok' and 0 < cf['frac_copy'] and cf['N'] == 2 ** 14
            assert cf['ratio_vs_lif'] > 0
    assert 'candidate' in proc.stdout and 'of copy' in proc.stdout


def test_bad_options_are_usage_errors(capsys):
    assert cli.main(['check', '--surrogates', 'Foo']) == 2
    assert "--surrogates: unknown ['Foo']; surrogates are ['CFRect', 'TSG'" in capsys.readouterr().err
    assert cli.main(['check', '--backends', 'cuda']) == 2
    assert "--backends: unknown ['cuda']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(['check', '--dtypes', 'int8'])
    assert info.value.code == 2
