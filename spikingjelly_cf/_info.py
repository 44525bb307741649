"""``python -m spikingjelly_cf info``: the environment, the devices and the backends that run here.

:func:`collect` returns everything as a dictionary (also the ``environment`` of the ``check``
report); :func:`format_info` renders it as text. Nothing here compiles or launches a kernel.
"""
import inspect
import os
import platform
import shutil
import sys
import sysconfig
from typing import Optional

import torch

from . import backends

__all__ = ['collect', 'format_info', 'one_line']

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _version(module: str):
    """``(version, None)`` or ``(None, why not)`` without letting an import error escape."""
    try:
        mod = __import__(module)
        return getattr(mod, '__version__', 'unknown'), None
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        return None, f'{type(exc).__name__}: {exc}'.splitlines()[0][:200]


def _compilers() -> dict:
    cc = (sysconfig.get_config_var('CC') or 'cc').split()[0]
    cxx = os.environ.get('CXX') or next((c for c in ('g++', 'c++', 'clang++') if shutil.which(c)),
                                        None)
    out = dict(c=shutil.which(cc) and cc, cxx=cxx and shutil.which(cxx.split()[0]) and cxx)
    nvcc = shutil.which('nvcc')
    out['nvcc'] = 'nvcc' if nvcc else None
    return out


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpp_kernel() -> dict:
    from .backends import cpp
    out = dict(available=cpp.available(), reason=cpp.unavailable_reason(),
               library=cpp.library_path())
    build_info = getattr(cpp, 'build_info', None)
    if callable(build_info) and cpp.available():
        try:
            out['build_info'] = build_info()
        except Exception as exc:  # noqa: BLE001
            out['build_info'] = f'{type(exc).__name__}: {exc}'
    return out


def available_on(name: str, device_type: str):
    """``(True, '')`` when backend ``name`` runs tensors of ``device_type`` here, else
    ``(False, why not)``."""
    if name == 'torch':
        return True, ''
    if not backends.kernel_dtypes(name, device_type):
        types = ' or '.join(t.upper() for t in backends.KERNEL_BACKENDS[name])
        if name == 'triton' and device_type == 'cpu':
            return False, ("runs CPU tensors only in Triton's interpreter (set TRITON_INTERPRET=1 "
                           "to run its kernels on the CPU)")
        return False, f'runs {types} tensors only'
    mod = backends.module(name)
    if 'device_type' in inspect.signature(mod.available).parameters:
        ok, why = mod.available(device_type), mod.unavailable_reason(device_type)
    else:
        ok, why = backends.is_available(name), backends.unavailable_reason(name)
    return bool(ok), ('' if ok else why)


def _auto_pick(device_type: str, dtype: torch.dtype) -> str:
    """What ``backend='auto'`` takes for a CFRect call of this device type and dtype, before
    the first-use check of a run-time-compiled kernel (which is not run here)."""
    order = backends.AUTO_ORDER.get(device_type, ())
    for name in order:
        if dtype in backends.kernel_dtypes(name, device_type) and backends.is_available(name):
            return name
    return 'torch'


def _backend_table(device_type: str) -> list:
    """Per dtype: backends that run, why each other cannot, what 'auto' picks."""
    out = []
    for dtype in DTYPES:
        runs, why_not = [], {}
        for name in backends.KERNEL_BACKENDS:
            dtypes = backends.kernel_dtypes(name, device_type)
            if not dtypes:
                types = ' or '.join(t.upper() for t in backends.KERNEL_BACKENDS[name])
                why_not[name] = (f"{types} tensors only (CPU tensors in Triton's interpreter, "
                                 f"TRITON_INTERPRET=1)" if name == 'triton' else
                                 f'{types} tensors only')
                continue
            if dtype not in dtypes:
                why_not[name] = (f"runs {', '.join(str(d).replace('torch.', '') for d in dtypes)}"
                                 f" on {device_type}")
                continue
            ok, reason = available_on(name, device_type)
            if ok:
                runs.append(name)
            else:
                why_not[name] = reason
        runs.append('torch')
        auto = _auto_pick(device_type, dtype)
        note = (' (after its first-use check; see docs/guide/gpu_check.md)'
                if auto in backends.RUNTIME_COMPILED else '')
        out.append(dict(dtype=str(dtype).replace('torch.', ''), runs=runs, unavailable=why_not,
                        auto=auto, auto_note=note))
    return out


def collect() -> dict:
    """Versions, compilers, devices and, per device type and dtype, the backends."""
    import spikingjelly_cf
    from . import _compat
    numpy_v, _ = _version('numpy')
    cupy_v, cupy_why = _version('cupy')
    triton_v, triton_why = _version('triton')
    tqdm_v, _ = _version('tqdm')
    env = dict(
        spikingjelly_cf=spikingjelly_cf.__version__,
        spikingjelly_cf_path=os.path.dirname(spikingjelly_cf.__file__),
        python=platform.python_version(), python_executable=sys.executable,
        platform=platform.platform(),
        torch=torch.__version__, torch_cuda=torch.version.cuda,
        spikingjelly=_compat.SPIKINGJELLY_VERSION,
        spikingjelly_line='classic, 0.0.0.0.14 API' if _compat.CLASSIC else '2.x API',
        numpy=numpy_v, cupy=cupy_v or f'not usable ({cupy_why})',
        triton=triton_v or f'not usable ({triton_why})', tqdm=tqdm_v,
        compilers=_compilers(), cpp_kernel=_cpp_kernel(),
        torch_threads=torch.get_num_threads(),
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        settings={k: v for k, v in os.environ.items()
                  if k.startswith('SPIKINGJELLY_CF_') or k in ('TRITON_INTERPRET',
                                                                'CUDA_VISIBLE_DEVICES')},
    )
    if cupy_v is not None and torch.cuda.is_available():
        try:
            import cupy
            major_minor = cupy.cuda.nvrtc.getVersion()
            env['nvrtc'] = '.'.join(map(str, major_minor))
            env['cuda_driver'] = cupy.cuda.runtime.driverGetVersion()
        except Exception as exc:  # noqa: BLE001
            env['nvrtc'] = f'not usable ({type(exc).__name__}: {exc})'.splitlines()[0]
    devices = [dict(type='cpu', name=_cpu_name(), cores=_cpu_count())]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(dict(type='cuda', index=i, name=props.name,
                                capability=f'{props.major}.{props.minor}',
                                memory_GiB=round(props.total_memory / 2 ** 30, 1)))
    else:
        env['cuda_reason'] = 'PyTorch sees no CUDA device'
    env['devices'] = devices
    types = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    env['backends'] = {t: _backend_table(t) for t in types}
    env['auto_order'] = {k: list(v) for k, v in backends.AUTO_ORDER.items()}
    return env


def one_line(env: dict) -> str:
    gpus = [d for d in env['devices'] if d['type'] == 'cuda']
    gpu = ', '.join(f"cuda:{d['index']} {d['name']}" for d in gpus) or 'no CUDA device'
    return (f"spikingjelly-cf {env['spikingjelly_cf']}, torch {env['torch']}, SpikingJelly "
            f"{env['spikingjelly']}, Python {env['python']}; {env['devices'][0]['name']} "
            f"({env['devices'][0]['cores']} cores), {gpu}")


def format_info(env: Optional[dict] = None) -> str:
    env = env or collect()
    comp = env['compilers']
    cpp = env['cpp_kernel']
    lines = [f"spikingjelly-cf {env['spikingjelly_cf']} ({env['spikingjelly_cf_path']})",
             f"  Python       {env['python']} ({env['python_executable']}), {env['platform']}",
             f"  torch        {env['torch']}, CUDA {env['torch_cuda'] or 'none (CPU build)'}, "
             f"{env['torch_threads']} threads",
             f"  SpikingJelly {env['spikingjelly']} ({env['spikingjelly_line']})",
             f"  NumPy        {env['numpy']}",
             f"  CuPy         {env['cupy']}" + (f", NVRTC {env['nvrtc']}" if 'nvrtc' in env else ''),
             f"  Triton       {env['triton']}",
             f"  compilers    C: {comp['c'] or 'none found'}; C++ (Inductor): "
             f"{comp['cxx'] or 'none found'}; nvcc: {comp['nvcc'] or 'none found'}",
             f"  C kernel     " + (cpp['library'] if cpp['available'] else
                                   f"unavailable: {cpp['reason']}")]
    if 'build_info' in cpp:
        lines.append(f"  C kernel build {cpp['build_info']}")
    if env['settings']:
        lines.append('  settings     ' + ', '.join(f'{k}={v}' for k, v in env['settings'].items()))
    if env['deterministic_algorithms']:
        lines.append('  torch.use_deterministic_algorithms(True) is set')
    lines.append('Devices')
    for d in env['devices']:
        if d['type'] == 'cpu':
            lines.append(f"  cpu     {d['name']}, {d['cores']} cores")
        else:
            lines.append(f"  cuda:{d['index']}  {d['name']}, compute capability "
                         f"{d['capability']}, {d['memory_GiB']} GiB")
    if 'cuda_reason' in env:
        lines.append(f"  cuda    none: {env['cuda_reason']}")
    lines.append("Backends per device type and dtype ('auto' order: "
                 + '; '.join(f"{k}: {', '.join(v)}" for k, v in env['auto_order'].items()) + ')')
    for dev, table in env['backends'].items():
        for entry in table:
            lines.append(f"  {dev:<5} {entry['dtype']:<9} runs: {', '.join(entry['runs'])}; "
                         f"'auto' -> {entry['auto']}{entry['auto_note']}")
            for name, why in entry['unavailable'].items():
                lines.append(f"{'':18}{name}: {why}")
    return '\n'.join(lines)
