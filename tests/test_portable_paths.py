"""No committed file names a path of the machine it was made on (a home folder, a checkout under
``/work``): commands start at the repository root, result files record paths relative to it
(``benchmarks/benchlib.py: portable_path``)."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE_PATH = re.compile(r'(?<![\w.~-])/(?:work|root|home/\w+|Users/\w+)/')
TEXT = ('.py', '.md', '.rst', '.json', '.txt', '.cfg', '.sh', '.toml', '.yml', '.yaml', '.c', '.h',
        '.cu', '.cff')


def _tracked_files():
    try:
        out = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip('git is not available')
    if out.returncode != 0:
        pytest.skip('not a git checkout')
    return [f for f in out.stdout.splitlines() if f.endswith(TEXT) and f != 'tests/test_portable_paths.py']


def test_no_machine_paths_in_committed_files():
    hits = []
    for rel in _tracked_files():
        path = os.path.join(REPO, rel)
        if not os.path.isfile(path):
            continue
        with open(path, encoding='utf-8', errors='replace') as f:
            for n, line in enumerate(f, 1):
                if MACHINE_PATH.search(line):
                    hits.append(f'{rel}:{n}: {line.strip()[:120]}')
    assert not hits, 'paths of one machine (use paths relative to the repository root):\n' + '\n'.join(hits[:40])


def test_the_pattern_catches_what_it_should():
    assert MACHINE_PATH.search('"spikingjelly_path": "/work/main/.venv/sj"')
    assert MACHINE_PATH.search('see /home/alice/data')
    assert not MACHINE_PATH.search('benchmarks/results/x and .venv/sj/2.0.0 and https://host/work/x')
