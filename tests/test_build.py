"""The CPU kernel without OpenMP, and which build is loaded.

Where the compiler has no OpenMP (Apple clang without libomp, MSVC) ``setup.py`` must still build
the kernel, single-threaded, instead of leaving users on the reference. Here a compiler wrapper
that refuses ``-fopenmp`` (as Apple clang does) stands in for such a compiler: ``setup.py
build_ext`` into a temporary directory must fall back to a build without OpenMP, and that build,
loaded through ``SPIKINGJELLY_CF_CPP_LIBRARY``, must match the reference (spikes exactly, state
and gradients to float32 rounding) and say what it is in ``cpp.build_info()``. The wrapper also
builds with ``-O1`` instead of ``-O3`` to keep the test short (the floating-point contract does
not depend on the optimisation level: ``-ffp-contract=off`` stays).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from spikingjelly_cf.backends import cpp

pytestmark = pytest.mark.one_pass  # builds C code: nothing in it depends on SpikingJelly

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = shutil.which(os.environ.get('CC', 'gcc') or 'gcc') or shutil.which('cc')
needs_cc = pytest.mark.skipif(CC is None, reason='no C compiler on PATH')


def _wrapper(tmp_path, refuse_openmp: bool) -> str:
    """A compiler that logs its arguments, refuses -fopenmp when asked to, and builds -O1."""
    log = tmp_path / 'cc.log'
    script = tmp_path / 'cc-wrapper'
    script.write_text(textwrap.dedent(f'''\
        #!/bin/sh
        echo "$@" >> "{log}"
        for a in "$@"; do
          if [ "$a" = "-fopenmp" ] && [ {int(refuse_openmp)} = 1 ]; then
            echo "error: unsupported option '-fopenmp'" >&2
            exit 1
          fi
        done
        args=""
        for a in "$@"; do
          if [ "$a" = "-O3" ]; then a="-O1"; fi
          args="$args '$a'"
        done
        eval exec "{CC}" $args
        '''))
    script.chmod(0o755)
    return str(script)


def _build(tmp_path, refuse_openmp: bool, env_extra=None):
    """``setup.py build_ext`` into tmp_path with the wrapper; returns (process, library, log)."""
    env = dict(os.environ, CC=_wrapper(tmp_path, refuse_openmp), **(env_extra or {}))
    env.pop('LDSHARED', None)  # derived from CC, so the link goes through the wrapper too
    proc = subprocess.run([sys.executable, 'setup.py', 'build_ext', '--build-lib',
                           str(tmp_path / 'lib'), '--build-temp', str(tmp_path / 'tmp'),
                           '--force'], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    libs = list((tmp_path / 'lib').rglob('_cf_cpu*'))
    log = (tmp_path / 'cc.log').read_text() if (tmp_path / 'cc.log').exists() else ''
    return proc, (str(libs[0]) if libs else None), log


PARITY = textwrap.dedent('''
    import json, torch
    from spikingjelly_cf.backends import cpp
    from spikingjelly_cf.functional import cf_multi_step, cf_multi_step_ref
    from spikingjelly_cf.surrogate import CFRect, TSG
    torch.manual_seed(0)
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        for make in (CFRect, lambda: TSG(6)):
            for memory in ('normal', 'lean'):
                x = (torch.randn(6, 3001) * 2).to(dtype)
                kw = dict(v_threshold=0.8, v_threshold_neg=-1.3, k_pos=2, k_neg=2)
                out = []
                for fn in ('cpp', 'torch'):
                    xx = (x if fn == 'cpp' else x.float()).clone().requires_grad_(True)
                    s, v, _, _ = cf_multi_step(xx, torch.zeros_like(xx[0]), surrogate_function=make(),
                                               backend=fn, memory=memory if fn == 'cpp' else 'normal', **kw)
                    (s.float().sum() + v.float().pow(2).sum()).backward()
                    out.append((s.float(), v.float(), xx.grad.float()))
                (s, v, g), (s_r, v_r, g_r) = out
                assert torch.equal(s, s_r), (dtype, memory)
                tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
                if memory == 'lean' and make is not CFRect:
                    tol = max(tol, 4e-3)
                torch.testing.assert_close(v, v_r if dtype == torch.float32 else v_r.to(dtype).float(),
                                           rtol=tol, atol=tol)
                torch.testing.assert_close(g, g_r, rtol=tol, atol=tol * max(1.0, g_r.abs().max().item()))
                checked += 1
    info = cpp.build_info()
    info['checked'] = checked
    info['launches'] = cpp.launch_count
    print(json.dumps(info))
''')


def _run_with_library(library, code=PARITY):
    env = dict(os.environ, SPIKINGJELLY_CF_CPP_LIBRARY=library,
               PYTHONPATH=os.pathsep.join([REPO] + ([os.environ['PYTHONPATH']]
                                                    if os.environ.get('PYTHONPATH') else [])))
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_cc
def test_build_falls_back_to_no_openmp_and_matches_reference(tmp_path):
    proc, library, log = _build(tmp_path, refuse_openmp=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '-fopenmp' in log, 'OpenMP was tried first'
    assert library is not None, f'no library built:\n{proc.stderr[-3000:]}'
    assert 'built without OpenMP' in proc.stderr and 'with OpenMP the build failed' in proc.stderr
    info = _run_with_library(library)
    assert info['available'] and info['library'] == library
    assert info['source'] == 'SPIKINGJELLY_CF_CPP_LIBRARY'
    assert info['openmp'] is False and info['openmp_version'] is None
    assert info['threads'] == 1 and info['max_threads'] == 1
    assert info['checked'] == 8 and info['launches'] == 16  # every case ran in that library


@needs_cc
def test_no_openmp_env_var_builds_without_trying(tmp_path):
    proc, library, log = _build(tmp_path, refuse_openmp=False,
                                env_extra={'SPIKINGJELLY_CF_NO_OPENMP': '1'})
    assert proc.returncode == 0 and library is not None, proc.stderr[-3000:]
    assert log and '-fopenmp' not in log
    assert 'SPIKINGJELLY_CF_NO_OPENMP is set' in proc.stderr
    info = _run_with_library(library, 'import json; from spikingjelly_cf.backends import cpp; '
                                      'print(json.dumps(cpp.build_info()))')
    assert info['available'] and info['openmp'] is False


def test_library_variable_that_does_not_load_is_reported(tmp_path):
    """A wrong SPIKINGJELLY_CF_CPP_LIBRARY never silently loads the package's build."""
    bogus = tmp_path / 'not_a_library.so'
    bogus.write_text('no ELF here')
    for path, words in ((str(tmp_path / 'missing.so'), 'is not a file'),
                        (str(bogus), 'cannot load')):
        info = _run_with_library(path, 'import json; from spikingjelly_cf.backends import cpp; '
                                       'print(json.dumps(cpp.build_info()))')
        assert not info['available'] and info['library'] is None
        assert words in info['reason'] and path in info['reason']


@pytest.mark.skipif(not cpp.available(), reason='the cpp extension is not built')
def test_build_info_of_the_loaded_kernel():
    info = cpp.build_info()
    assert info['available'] and info['reason'] == ''
    assert info['library'] == cpp.library_path() and os.path.isfile(info['library'])
    assert info['abi_version'] == 3
    assert info['dtypes'] == ('float32', 'float16', 'bfloat16')
    if info['openmp']:  # gcc on Linux, the CI build
        assert info['openmp_version'] >= 200805 and info['max_threads'] >= 1
        import torch
        assert info['threads'] == torch.get_num_threads()
    else:
        assert info['threads'] == 1
