"""Nothing a user reads names an issue number of this project's own tracker.

A user meets the README, the docs, the docstrings, the examples, the scripts and what the
benchmarks print and write; "Targets of issue 6" means nothing outside the tracker. A target is
named by what it compares ("CF training / compiled LIF <= 1.0"). References to other projects'
trackers stay possible, written so that the project is named: ``fangwei123456/spikingjelly#629``
or a URL ending in ``/issues/629``.
"""
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: What a user reads (globs relative to the repository root; ``**`` recurses).
USER_FACING = (
    'README.rst', 'CHANGELOG.rst', 'CITATION.cff', 'LICENSE', 'setup.cfg', 'setup.py',
    'docs/**/*', 'spikingjelly_cf/**/*', 'examples/**/*', 'scripts/**/*',
    'benchmarks/*.py', 'benchmarks/*.sh', 'benchmarks/*.md', 'benchmarks/results/**/*',
)
TEXT_SUFFIXES = {'', '.py', '.md', '.rst', '.txt', '.cfg', '.cff', '.sh', '.json', '.c', '.h',
                 '.cu', '.cuh', '.toml', '.yaml', '.yml', '.csv'}

#: "issue 9", "issue #9", "issues 6 and 9", "Issue-6", "#12" in prose.
PATTERNS = (
    re.compile(r'\bissues?[\s-]*#?\s*\d+', re.I),
    re.compile(r'(?<![\w/&#])#\d{1,4}\b(?![\w-])'),
)
#: Another project's tracker, named as such: ``owner/repo#N`` or ``.../issues/N`` (a URL).
UPSTREAM = re.compile(r'[\w.-]+/[\w.-]+#\d+|/issues/\d+|/pull/\d+')


def tracker_refs(text: str):
    """``[(line number, match)]`` of every mention of one of our issue numbers in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        cleaned = UPSTREAM.sub('', line)
        for pattern in PATTERNS:
            found += [(number, m.group(0)) for m in pattern.finditer(cleaned)]
    return found


def _tracked():
    try:
        out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return {ROOT / f for f in out.split()}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        return None


def user_facing_files():
    tracked = _tracked()
    files = set()
    for pattern in USER_FACING:
        for path in ROOT.glob(pattern):
            if (path.is_file() and path.suffix in TEXT_SUFFIXES
                    and (tracked is None or path in tracked)
                    and not any(part.startswith(('_build', '.venv')) for part in path.parts)):
                files.add(path)
    return sorted(files)


def test_the_scan_covers_what_users_read():
    names = {str(p.relative_to(ROOT)) for p in user_facing_files()}
    for expected in ('README.rst', 'docs/method.md', 'spikingjelly_cf/neuron.py',
                     'examples/minimal.py', 'benchmarks/bench_neuron.py', 'scripts/test.sh'):
        assert expected in names, expected
    assert any(n.startswith('benchmarks/results/') for n in names)
    assert any(n.startswith('docs/guide/') for n in names)


def test_no_user_facing_file_names_our_tracker():
    bad = []
    for path in user_facing_files():
        for line, match in tracker_refs(path.read_text(errors='replace')):
            bad.append(f'{path.relative_to(ROOT)}:{line}: {match!r}')
    assert not bad, ('user-facing text names an issue of our tracker; name the target by what it '
                     'compares instead (another project\'s issue: write owner/repo#N):\n'
                     + '\n'.join(bad))


@pytest.mark.parametrize('text', [
    'Targets of issue 6 on the CPU', 'see issue #9', '(issues 6 and 9)', 'the issue-6 target',
    'fixed in #12.', "print('=== targets (Issue 11) ===')", 'as #3 showed'])
def test_detects_tracker_numbers(text):
    assert tracker_refs(text)


@pytest.mark.parametrize('text', [
    '#include "cf_step.h"', "color='#1f77b4'", '## 3. PNB loss', '#: a comment', '# 1 thread',
    'SpikingJelly (fangwei123456/spikingjelly#629) gets it wrong',
    'https://github.com/fangwei123456/spikingjelly/issues/629', 'x[#]', 'CF training <= 1.0x'])
def test_leaves_other_text_alone(text):
    assert not tracker_refs(text)
