"""CI compiles the CUDA source exactly as CuPy receives it, so a kernel that does not compile
fails here, on a machine without a GPU.

* ``nvcc`` (skipped with a message when it is not on PATH) builds every (dtype, surrogate kind)
  source for sm_70, sm_80 and sm_90. CUDA 13 dropped sm_70 (Volta): where ``nvcc
  --list-gpu-arch`` does not offer an architecture, the lowest one it offers (sm_75 on CUDA 13)
  stands in for it.
* NVRTC itself (the compiler CuPy calls; skipped when ``libnvrtc`` cannot be found) compiles
  every source with CuPy's options, for the same architectures.
"""
import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.one_pass  # compiles CUDA source: nothing in it depends on SpikingJelly

from spikingjelly_cf.backends.source import (DTYPES, KINDS, NVRTC_OPTIONS, cuda_source,
                                             kernel_names)

WANTED_ARCHS = (70, 80, 90)
COMBOS = [(d, k) for d in DTYPES for k in KINDS]


def _nvcc_archs():
    """The architectures to build for: WANTED_ARCHS, each replaced by the lowest one this nvcc
    supports when it supports it no more."""
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        return None, []
    out = subprocess.run([nvcc, '--list-gpu-arch'], capture_output=True, text=True, timeout=60)
    offered = sorted(int(a.split('_')[1]) for a in out.stdout.split() if a.startswith('compute_'))
    if not offered:  # old nvcc without --list-gpu-arch: ask for what we want
        return nvcc, list(WANTED_ARCHS)
    archs = []
    for arch in WANTED_ARCHS:
        if arch not in offered:
            arch = min(a for a in offered if a >= arch) if any(a >= arch for a in offered) else None
        if arch is not None and arch not in archs:
            archs.append(arch)
    return nvcc, archs


NVCC, ARCHS = _nvcc_archs()


def test_source_is_self_contained():
    for dtype_name, kind in COMBOS:
        src = cuda_source(dtype_name, kind)
        local = [line for line in src.splitlines() if line.lstrip().startswith('#include "')]
        assert not local  # cf_step.h is pasted in; no include path needed
        assert src.rstrip().endswith(f'CF_DEFINE_KERNELS({dtype_name}, {DTYPES[dtype_name]}, '
                                     f'{KINDS[kind]}, {kind})')


@pytest.mark.skipif(NVCC is None, reason='nvcc is not on PATH: the CUDA compile check needs the '
                                         'CUDA toolkit (it runs in CI)')
@pytest.mark.parametrize('dtype_name,kind', COMBOS)
def test_nvcc_compiles_source(dtype_name, kind, tmp_path):
    src = tmp_path / f'cf_{dtype_name}_{kind}.cu'
    src.write_text(cuda_source(dtype_name, kind))
    gencode = []
    for arch in ARCHS:
        gencode += ['-gencode', f'arch=compute_{arch},code=sm_{arch}']
    cmd = [NVCC, *NVRTC_OPTIONS, *gencode, '-Werror', 'all-warnings', '-c', str(src), '-o',
           str(tmp_path / 'cf.o')]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f'{" ".join(cmd)}\n{out.stdout}\n{out.stderr}'


def _find_nvrtc():
    candidates = []
    found = ctypes.util.find_library('nvrtc')
    if found:
        candidates.append(found)
    roots = [os.environ.get('CUDA_PATH', ''), os.environ.get('CUDA_HOME', ''), '/usr/local/cuda']
    for root in filter(None, roots):
        candidates += sorted(glob.glob(os.path.join(root, 'lib64', 'libnvrtc.so*')))
        candidates += sorted(glob.glob(os.path.join(root, 'lib', 'libnvrtc.so*')))
    for site in sys.path:  # the pip wheels PyTorch and CuPy install
        candidates += sorted(glob.glob(os.path.join(site, 'nvidia', '*', 'lib', 'libnvrtc.so*')))
        candidates += sorted(glob.glob(os.path.join(site, 'nvidia', 'cuda_nvrtc', 'lib',
                                                    'libnvrtc.so*')))
    for path in candidates:
        if 'builtins' in os.path.basename(path) or '.alt.' in os.path.basename(path):
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()


def _nvrtc_compile(src: str, options):
    """(return code, log, PTX) of NVRTC on ``src``."""
    lib = NVRTC
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b'cf_kernels.cu', 0, None,
                                  None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        ptx = ''
        if rc == 0:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, buf)
            ptx = buf.value.decode(errors='replace')
        return rc, log.value.decode(errors='replace'), ptx
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.skipif(NVRTC is None, reason='libnvrtc not found (CUDA toolkit or the nvidia pip '
                                          'wheels): the NVRTC compile check is skipped')
@pytest.mark.parametrize('dtype_name,kind', COMBOS)
def test_nvrtc_compiles_source(dtype_name, kind):
    archs = ARCHS or [75, 80, 90]
    for arch in archs:
        options = list(NVRTC_OPTIONS) + [f'--gpu-architecture=compute_{arch}']
        rc, log, ptx = _nvrtc_compile(cuda_source(dtype_name, kind), options)
        assert rc == 0, f'NVRTC {options}:\n{log}'
        assert 'warning' not in log.lower(), log
        for name in kernel_names(dtype_name, kind):  # what CuPy's get_function looks up
            assert f'.entry {name}(' in ptx
