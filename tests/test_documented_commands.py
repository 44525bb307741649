"""Every shell command the docs show works from the repository root.

Docs read: ``README.rst``, ``benchmarks/README.md``, ``docs/*.md`` and ``docs/guide/*.md``
(``DOCS`` below).

What counts as a documented command
-----------------------------------
- Where: every line of every code block (RST ``.. code-block::`` / ``.. code::`` / ``::`` literal
  blocks, Markdown fences) except blocks marked ``python`` (Python code, run by the doctests), and
  every inline literal (RST ````...````, Markdown ```...```).
- Normalised: a ``\\`` line continuation is joined, a leading ``$`` prompt and a trailing
  `` # comment`` are removed, runs of white space become one space.
- Is a command when, after any leading ``NAME=value`` assignments, its first word is one of
  ``COMMAND_WORDS`` (``bash``, ``python``, ``pip``, ``torchrun``, ``pytest``, ...) or a path to
  a Python interpreter (``.venv/bin/python``) or to a shell script (``scripts/x.sh``, ``./x.sh``).
  An inline literal needs at least one argument as well (````pip```` or ````scripts/test.sh````
  alone names a program, it does not show a command line).

Adding a documented command: add ONE line to ``COMMANDS``, keyed by the command exactly as
normalised above (the failure message of ``test_every_documented_command_is_known`` prints the
key), mapping to ``smoke('<quickest variant>', creates=...)`` or ``skip('<why not run>')``.

How a smoke run runs
--------------------
``bash -c '<variant>'`` from the repository root, ``{tmp}`` replaced by a fresh temporary
folder, with the current interpreter's folder first on ``PATH`` (so ``python``, ``pip`` and
``torchrun`` are this pass's), ``PYTHONPATH`` and the test-pass variables removed (a user's shell
after the README's setup), ``OMP_NUM_THREADS=1`` and ``MPLBACKEND=Agg``. It must exit 0 within
``timeout`` seconds and create every path in ``creates``. Commands naming ``.venv`` or
``.venv-sj2`` use those environments whatever pass runs the test; the smoke runs therefore run
in one pass only (``scripts/test.sh`` sets ``SPIKINGJELLY_CF_SKIP_DOC_SMOKE=1`` in the others).
"""
import glob
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import NamedTuple, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ('README.rst', 'benchmarks/README.md', 'docs/*.md', 'docs/guide/*.md')
STAMP_INPUTS = ('scripts/setup_env.sh', 'requirements.txt', 'setup.py', 'setup.cfg')
COMMAND_WORDS = {'bash', 'sh', 'python', 'python3', 'pip', 'pip3', 'torchrun', 'pytest', 'cd',
                 'git', 'make', 'source', '.', 'conda', 'uv'}


class Row(NamedTuple):
    smoke: Optional[str]          # the quickest variant, a bash command line ({tmp}: a temp folder)
    creates: Tuple[str, ...] = ()  # paths (with {tmp}) the smoke run must create
    timeout: int = 300
    needs: Tuple[str, ...] = ()    # environments it uses (skipped where they are not set up)
    skip: Optional[str] = None    # why it is not run


def smoke(command: str, creates=(), timeout: int = 300, needs=('.venv',)) -> Row:
    """A smoke run; ``needs``: the environments the command uses (default the main ``.venv``)."""
    return Row(command, tuple([creates] if isinstance(creates, str) else creates), timeout,
               tuple([needs] if isinstance(needs, str) else needs))


def skip(reason: str) -> Row:
    return Row(None, skip=reason)


# tiny settings of the DVS example (about 10-20 s on 2 cores)
DVS_TINY = ('-T 4 --width 4 -b 8 --epochs 1 --synthetic-train 2 --synthetic-test 1 --no-progress '
            '--threads 1 --no-analysis')
# the benchmarks' quickest sweep: one tiny case, one repetition (correctness checks still run)
NEURON_TINY = ('--quick --device cpu --T 4 --log2n 10 --only CFNode --no-memory --budget-s 0.01 '
               '--warmup 1 --min-repeats 1 --out {tmp}')
TRAINING_TINY = ('--quick --device cpu --networks dvs-vgg --no-memory --budget-s 0.01 --warmup 1 '
                 '--min-repeats 1 --out {tmp}')
# the protocol's quickest sweep: the CPU kernel and SpikingJelly's LIF only (peers, if installed,
# would take minutes), no long-T sweep
PROTOCOL_TINY = '--quick --no-long-T --only "cpp]" LIFNode --out {tmp}'
# the settings study's quickest runs: one cell of its smoke grid each, in-process, temporary folders
# (every architecture and task runs in tests/test_where_study.py)
WHERE_TMP = '--out-dir {tmp}/study --runs-dir {tmp}/runs --data-dir {tmp}/data --no-progress'
# one epoch of the MNIST-1D example on 256 sequences
MNIST1D_TINY = '--epochs 1 --limit 256 --threads 1 --no-progress --data-dir {tmp}/data --out-dir {tmp}/run'
_SETUP = 'the setup itself: every CI run executes it first (scripts/test.sh -> scripts/setup_env.sh)'
_PIP = ('installs into the user\'s environment; scripts/setup_env.sh installs the package the same '
        'way (pip install --no-deps --no-build-isolation -e .) in every CI run')

# One line per documented command: normalised command -> smoke(...) or skip(...).
COMMANDS = {
    'bash scripts/setup_env.sh': skip(_SETUP),
    'bash scripts/setup_env.sh --sj2-full': skip(_SETUP),
    'bash scripts/test.sh': skip('the test suite itself (CI runs it: .ci/run)'),
    'bash scripts/test.sh -k kernels': skip('the test suite itself with a pytest filter (CI runs bash scripts/test.sh)'),
    '.venv/bin/python setup.py -q build_ext --inplace': skip(_SETUP + '; it rebuilds the kernel exactly so'),
    'python setup.py build_ext': skip(_SETUP + ' (it builds the kernel so); tests/test_build.py builds it with and without OpenMP'),
    'python -m sphinx -W --keep-going -b html docs docs/_build/html': skip('the docs step of scripts/test.sh runs this build (into docs/_build/html, removed first) in every CI run'),
    'pip install .[docs]': skip("installs into the user's environment; scripts/setup_env.sh installs the same tools from requirements.txt in every CI run"),
    'python examples/minimal.py': skip('tests/test_minimal_example.py runs exactly this command in passes 1 and 2 and checks its report'),
    'bash scripts/run_dvs_gesture.sh': smoke(f'DATA={{tmp}}/data bash scripts/run_dvs_gesture.sh {DVS_TINY} --out-dir {{tmp}}/run', creates='{tmp}/run/summary.json'),
    'bash scripts/run_dvs_gesture.sh --sj2': smoke(f'DATA={{tmp}}/data bash scripts/run_dvs_gesture.sh --sj2 {DVS_TINY} --out-dir {{tmp}}/run', creates='{tmp}/run/summary.json', needs='.venv-sj2'),
    'python benchmarks/accuracy_study.py --grid core --jobs 2': smoke('python benchmarks/accuracy_study.py --grid smoke --jobs 1 --out-dir {tmp}/study --runs-dir {tmp}/runs --data-dir {tmp}/data --no-progress', creates='{tmp}/study/accuracy_study.json'),
    'python benchmarks/accuracy_study.py --jobs 2': skip('the --grid core row runs the same script on its smoke grid'),
    'python benchmarks/accuracy_study.py --grid where --jobs 2': smoke(f'python benchmarks/accuracy_study.py --grid where-smoke --jobs 1 --cells "sequential: CF+TSG+PNB" {WHERE_TMP}', creates='{tmp}/study/where_cf_pays.md'),
    'python benchmarks/accuracy_study.py --grid where-residual --jobs 2': smoke(f'python benchmarks/accuracy_study.py --grid where-smoke --jobs 1 --cells "spiking-resnet d2: LIF soft" {WHERE_TMP}', creates='{tmp}/study/where_cf_pays_potentials.md'),
    'python benchmarks/accuracy_study.py --grid where --report-only --out-dir benchmarks/results/2026-12-03_cpu-2core': smoke('mkdir -p {tmp}/copy && cp benchmarks/results/2026-12-03_cpu-2core/where_cf_pays.json {tmp}/copy/ && python benchmarks/accuracy_study.py --grid where --report-only --out-dir {tmp}/copy', creates='{tmp}/copy/where_cf_pays.md'),
    'python examples/mnist1d.py --arch spiking-resnet --depth 8 --width 16 --variant CF --surrogate rect --pnb 0 --potentials': smoke(f'python examples/mnist1d.py --arch spiking-resnet --depth 1 --width 4 --variant CF --surrogate rect --pnb 0 --potentials {MNIST1D_TINY}', creates='{tmp}/run/residual_potentials.json'),
    'python examples/mnist1d.py --arch rsnn --task sequential --depth 1 --width 64 --neuron lif --surrogate rect --pnb 0': smoke(f'python examples/mnist1d.py --arch rsnn --task sequential --depth 1 --width 4 --neuron lif --surrogate rect --pnb 0 {MNIST1D_TINY}', creates='{tmp}/run/summary.json'),
    'python examples/mnist1d.py --variant SCF --K 2 --surrogate rect --pnb 0 --seed 1': smoke('python examples/mnist1d.py --variant SCF --K 2 --surrogate rect --pnb 0 --seed 1 --epochs 1 --width 4 --threads 1 --no-progress --data-dir {tmp}/data --out-dir {tmp}/run', creates='{tmp}/run/summary.json'),
    'PYTHONPATH=.venv/sj/2.0.0:. .venv/bin/python benchmarks/bench_protocol.py': smoke(f'PYTHONPATH=.venv/sj/2.0.0:. .venv/bin/python benchmarks/bench_protocol.py {PROTOCOL_TINY}', creates='{tmp}/*/protocol_sj2.0.0.json'),
    'PYTHONPATH=. .venv/bin/python benchmarks/bench_protocol.py': smoke(f'PYTHONPATH=. .venv/bin/python benchmarks/bench_protocol.py {PROTOCOL_TINY}', creates='{tmp}/*/protocol_sj0.0.0.0.14.json'),
    'pip install .[benchmarks]': skip('optional peers (snnTorch, Norse) for the benchmarks; bench_protocol.py runs without them and says which it found'),
    'bash benchmarks/gpu_check.sh': skip('needs a CUDA GPU with CuPy (nvidia-smi); CI has none (tests/test_benchmarks.py runs it on the CPU, GPU_CHECK_DEVICE=cpu)'),
    'python -m spikingjelly_cf check': smoke('python -m spikingjelly_cf check --quick --backends cpp --surrogates CFRect --no-progress --json {tmp}/check.json', creates='{tmp}/check.json'),
    'python -m spikingjelly_cf bench': smoke('python -m spikingjelly_cf bench --quick --device cpu --log2n 10 --json {tmp}/bench.json', creates='{tmp}/bench.json'),
    'python -m spikingjelly_cf check --quick': skip('the smoke row of `python -m spikingjelly_cf check` runs --quick; tests/test_check_cli.py runs the whole --quick check'),
    'python -m spikingjelly_cf check --json': skip('the smoke row of `python -m spikingjelly_cf check` writes --json'),
    'python -m spikingjelly_cf check --backends cpp': skip('the smoke row of `python -m spikingjelly_cf check` runs --backends cpp'),
    'python -m spikingjelly_cf info': smoke('python -m spikingjelly_cf info --json {tmp}/info.json', creates='{tmp}/info.json'),
    'bash benchmarks/fetch_gpu_wheels.sh': skip('downloads wheels from PyPI for an offline GPU machine; tests/test_benchmarks.py checks its syntax'),
    'pip install .': skip(_PIP),
    'pip install .[cuda12]': skip('needs CUDA (cupy-cuda12x); CI has no GPU'),
    'pip install .[examples,test]': skip(_PIP),
    "pip install torch==2.9.1 torchvision==0.24.1 'torchaudio==2.9.*' spikingjelly==2.0.0": skip('what scripts/setup_env.sh --sj2-full installs into .venv-sj2 (same pins) in every CI run'),
    'pip install --no-deps spikingjelly==2.0.0': skip('what scripts/setup_env.sh installs into .venv/sj/2.0.0 (with --target)'),
    '.venv/bin/python benchmarks/bench_neuron.py': smoke(f'.venv/bin/python benchmarks/bench_neuron.py {NEURON_TINY}', creates='{tmp}/*/neuron_*.json'),
    'PYTHONPATH=.venv/sj/2.0.0 .venv/bin/python benchmarks/bench_neuron.py': smoke(f'PYTHONPATH=.venv/sj/2.0.0 .venv/bin/python benchmarks/bench_neuron.py {NEURON_TINY}', creates='{tmp}/*/neuron_sj2.0.0.json'),
    '.venv/bin/python benchmarks/combine.py benchmarks/results/$(date +%F)_cpu-$(nproc)core': smoke(f'.venv/bin/python benchmarks/bench_neuron.py {NEURON_TINY} && .venv/bin/python benchmarks/combine.py {{tmp}}/*_cpu-*core', creates='{tmp}/*/neuron_combined.md'),
    '.venv/bin/python benchmarks/bench_training.py': smoke(f'.venv/bin/python benchmarks/bench_training.py {TRAINING_TINY}', creates='{tmp}/*/training_*.json'),
    'PYTHONPATH=.venv/sj/2.0.0 .venv/bin/python benchmarks/bench_training.py': smoke(f'PYTHONPATH=.venv/sj/2.0.0 .venv/bin/python benchmarks/bench_training.py {TRAINING_TINY}', creates='{tmp}/*/training_*.json'),
    '.venv/bin/python benchmarks/bench_neuron.py --device cuda --T 8 --log2n 20 22 24': skip('needs a CUDA GPU; CI has none (benchmarks/gpu_check.sh runs the GPU benchmark)'),
    'PYTHONPATH=.venv/sj/2.0.0 .venv/bin/python benchmarks/bench_neuron.py --device cuda --T 8 --log2n 20 22 24': skip('needs a CUDA GPU; CI has none (benchmarks/gpu_check.sh runs the GPU benchmark)'),
}


# ------------------------------------------------------------------------------------------
# extraction
# ------------------------------------------------------------------------------------------
_ASSIGNMENT = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*=\S*$')


def normalise(line: str) -> str:
    """One logical line as the table keys it: prompt, trailing comment and extra spaces removed."""
    line = line.strip()
    if line.startswith('$ '):
        line = line[2:]
    line = re.sub(r'(^|\s)#.*$', '', line)   # a comment: '#' at the start of a word
    return ' '.join(line.split())


def is_command(line: str, min_words: int = 1) -> bool:
    words = line.split()
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    if len(words) < max(min_words, 1):
        return False
    w = words[0]
    return (w in COMMAND_WORDS or w.endswith('/bin/python') or w.endswith('/bin/python3')
            or w.startswith(('scripts/', './', '.ci/', 'benchmarks/')) and w.endswith('.sh'))


def _join_continuations(lines):
    out, pending = [], ''
    for line in lines:
        if line.rstrip().endswith('\\'):
            pending += line.rstrip()[:-1] + ' '
            continue
        out.append(pending + line)
        pending = ''
    if pending:
        out.append(pending)
    return out


def _rst_blocks(text: str):
    """(language, lines) of each literal block of an RST text, and the text outside blocks."""
    lines = text.splitlines()
    blocks, prose, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r'^(\s*)\.\. (?:code-block|code|sourcecode)::\s*(\S*)', line)
        literal = re.search(r'::\s*$', line) and not m and not line.lstrip().startswith('..')
        if m or literal:
            lang = (m.group(2) if m else '') or ''
            indent = len(line) - len(line.lstrip())
            if literal:
                prose.append(line)
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            body = [b for b in body if not re.match(r'^\s*:\w[\w-]*:', b)]   # directive options
            blocks.append((lang.lower(), body))
            continue
        prose.append(line)
        i += 1
    return blocks, '\n'.join(prose)


def _md_blocks(text: str):
    blocks, prose, lang, body = [], [], None, []
    for line in text.splitlines():
        m = re.match(r'^\s*(```+|~~~+)\s*([\w+-]*)', line)
        if m and lang is None:
            lang, body = m.group(2).lower(), []
        elif m:
            blocks.append((lang, body))
            lang = None
        elif lang is not None:
            body.append(line)
        else:
            prose.append(line)
    return blocks, '\n'.join(prose)


def documented_commands():
    """``{normalised command: [where, ...]}`` of every command the docs show."""
    found = {}
    paths = sorted({p for pattern in DOCS for p in glob.glob(os.path.join(ROOT, pattern))})
    for path in paths:
        rel = os.path.relpath(path, ROOT)
        with open(path, encoding='utf-8') as f:
            text = f.read()
        if path.endswith('.rst'):
            blocks, prose = _rst_blocks(text)
            inline = re.findall(r'``(.+?)``', prose)
        else:
            blocks, prose = _md_blocks(text)
            inline = re.findall(r'(?<!`)`([^`\n]+)`(?!`)', prose)
        candidates = [(f'{rel} (code block)', line, 1) for lang, body in blocks
                      if lang not in ('python', 'py', 'pycon', 'python3')
                      for line in _join_continuations(body)]
        candidates += [(f'{rel} (inline)', s, 2) for s in inline]
        for where, line, min_words in candidates:
            cmd = normalise(line)
            if is_command(cmd, min_words):
                found.setdefault(cmd, []).append(where)
    return found


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
def test_extraction_rule():
    rst = ('Text ``bash scripts/a.sh --x`` and ``--flag`` and ``.venv``.\n\n'
           '.. code-block:: bash\n\n   $ python x.py \\\n       --y 1   # comment\n'
           '   PYTHONPATH=a:b .venv/bin/python z.py\n   echo not-a-command\n\n'
           '.. code-block:: python\n\n   python = 3\n\nEnd::\n\n    pip install q\n\nafter\n')
    blocks, prose = _rst_blocks(rst)
    assert [lang for lang, _ in blocks] == ['bash', 'python', '']
    cmds = [normalise(line) for lang, body in blocks if lang != 'python'
            for line in _join_continuations(body) if is_command(normalise(line))]
    assert cmds == ['python x.py --y 1', 'PYTHONPATH=a:b .venv/bin/python z.py', 'pip install q']
    assert [s for s in re.findall(r'``(.+?)``', prose) if is_command(normalise(s))] == \
        ['bash scripts/a.sh --x']
    md = 'See `python b.py` or `PYTHONPATH`.\n```bash\ncd somewhere  # no\nX=1 bash c.sh\n```\n'
    blocks, prose = _md_blocks(md)
    assert [normalise(b) for _, body in blocks for b in body] == ['cd somewhere', 'X=1 bash c.sh']
    assert all(is_command(normalise(b)) for _, body in blocks for b in body)
    assert not is_command('PYTHONPATH') and not is_command('--quick') and not is_command('.venv')
    assert is_command('pytest') and not is_command('pytest', min_words=2)
    assert is_command('scripts/test.sh -k x', min_words=2) and not is_command('scripts/test.sh', 2)


def test_every_documented_command_is_known():
    found = documented_commands()
    assert len(found) >= 5, found        # the README alone shows more: the extraction broke
    unknown = {cmd: where for cmd, where in found.items() if cmd not in COMMANDS}
    assert not unknown, (
        'documented commands without a row in COMMANDS (tests/test_documented_commands.py); add '
        'one line each, smoke(...) or skip(...):\n' +
        '\n'.join(f'    {cmd!r}: ...,   # {", ".join(where)}' for cmd, where in unknown.items()))


def test_no_stale_rows():
    found = documented_commands()
    stale = [cmd for cmd in COMMANDS if cmd not in found]
    assert not stale, f'rows of COMMANDS that no doc shows any more (remove them): {stale}'


def _program(command: str) -> str:
    """The command up to its script (``PYTHONPATH=x .venv/bin/python benchmarks/a.py``)."""
    words = command.split()
    for i, w in enumerate(words):
        if w.endswith(('.py', '.sh')):
            return ' '.join(words[:i + 1])
    return command


def test_every_row_is_smoke_or_skip_with_reason():
    for cmd, row in COMMANDS.items():
        assert (row.smoke is None) != (row.skip is None), cmd
        assert row.skip is None or len(row.skip) > 10, cmd
        # the smoke run runs the documented program (with the same environment assignments)
        assert row.smoke is None or _program(cmd) in row.smoke, (cmd, row.smoke)


def setup_stamp() -> str:
    """The stamp ``scripts/setup_env.sh`` writes into a finished environment (same inputs, same hash)."""
    h = hashlib.sha256()
    for name in STAMP_INPUTS:
        with open(os.path.join(ROOT, name), 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


def test_setup_stamp_matches_setup_env():
    """setup_stamp() computes what setup_env.sh's stamp_of does (else the smoke runs would skip)."""
    with open(os.path.join(ROOT, 'scripts', 'setup_env.sh')) as f:
        script = f.read()
    assert f'cat {" ".join(STAMP_INPUTS)} | sha256sum' in script
    out = subprocess.run(['bash', '-c', f'cat {" ".join(STAMP_INPUTS)} | sha256sum'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()[0]
    assert out == setup_stamp()


def _smoke_env():
    env = {k: v for k, v in os.environ.items()
           if k != 'PYTHONPATH' and not k.startswith('SPIKINGJELLY_CF_EXPECT')}
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    env.update(OMP_NUM_THREADS='1', MPLBACKEND='Agg', PYTHONDONTWRITEBYTECODE='1')
    return env


@pytest.mark.parametrize('command', [c for c, r in COMMANDS.items() if r.smoke], ids=str)
def test_smoke(command, tmp_path):
    if os.environ.get('SPIKINGJELLY_CF_SKIP_DOC_SMOKE', '') not in ('', '0'):
        pytest.skip('documented commands choose their own environment: one pass of scripts/test.sh '
                    'runs them (SPIKINGJELLY_CF_SKIP_DOC_SMOKE is set in this one)')
    row = COMMANDS[command]
    for venv in row.needs:
        stamp = os.path.join(ROOT, venv, '.spikingjelly_cf-setup')
        current = os.path.isfile(stamp) and open(stamp).read().strip() == setup_stamp()
        if not current:
            # a stale environment would make the command re-run pip inside the test
            why = (f'{venv} is not set up or out of date in this checkout (bash scripts/setup_env.sh'
                   f'{" --sj2-full" if venv == ".venv-sj2" else ""} sets it up)')
            if os.environ.get('CI', '') == 'true':   # CI ran the setup first: never skip there
                pytest.fail(why)
            pytest.skip(why)
    tmp = str(tmp_path)
    line = row.smoke.replace('{tmp}', shlex.quote(tmp))
    tic = time.time()
    # own process group: a timeout ends the command and everything it started
    proc = subprocess.Popen(['bash', '-c', line], cwd=ROOT, env=_smoke_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=row.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f'{line!r} took longer than {row.timeout} s:\n{out[-3000:]}\n{err[-3000:]}')
    took = time.time() - tic
    assert proc.returncode == 0, (f'{line!r} failed ({took:.0f} s, exit {proc.returncode}):\n'
                                  f'{out[-3000:]}\n{err[-3000:]}')
    for pattern in row.creates:
        assert glob.glob(pattern.replace('{tmp}', glob.escape(tmp))), (pattern, out[-2000:])
