"""Every reference to the method page (``docs/method.md, section N``) names a section that exists.

The code, tests and docs cite the method page by section number; renumbering or deleting a section
without updating its citations must fail here, not leave readers at a dead end.
"""
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHOD = ROOT / 'docs' / 'method.md'
REF = re.compile(r'docs/method\.md,?\s+sections?\s+(\d+)(?:\s*-\s*(\d+))?')
SUFFIXES = {'.py', '.md', '.rst', '.h', '.c', '.cuh', '.cu', '.sh', '.cfg', '.txt'}


def _sections():
    return {int(m.group(1)) for m in re.finditer(r'^## (\d+)\.', METHOD.read_text(), re.M)}


def _tracked_files():
    try:
        out = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        files = [ROOT / f for f in out]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        files = [p for p in ROOT.rglob('*') if '.venv' not in p.parts]
    return [f for f in files if f.suffix in SUFFIXES and f.is_file()]


def references():
    refs = []
    for path in _tracked_files():
        if path.name == pathlib.Path(__file__).name:   # its own examples of dead references
            continue
        text = path.read_text(errors='replace')
        for m in REF.finditer(text):
            first = int(m.group(1))
            last = int(m.group(2) or first)
            line = text.count('\n', 0, m.start()) + 1
            refs.append((f'{path.relative_to(ROOT)}:{line}', first, last))
    return refs


def test_method_page_has_numbered_sections():
    assert _sections() >= {1, 2, 3, 4, 5, 6}


def test_every_reference_names_an_existing_section():
    sections = _sections()
    refs = references()
    assert len(refs) >= 20, 'the code should cite the method page; did the citation format change?'
    dead = [f'{where}: section {n}' for where, first, last in refs
            for n in range(first, last + 1) if n not in sections]
    assert not dead, f'references to missing sections of docs/method.md: {dead}'


def test_no_reference_to_the_unshipped_spec_file():
    stale = []
    for path in _tracked_files():
        if path.name == pathlib.Path(__file__).name:
            continue
        for i, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
            if re.search(r'\bSPEC\b', line):
                stale.append(f'{path.relative_to(ROOT)}:{i}')
    assert not stale, f'"SPEC" is not a file of this repository; cite docs/method.md: {stale}'


@pytest.mark.parametrize('bad', ['docs/method.md, section 9', 'docs/method.md, sections 5-8'])
def test_a_dead_reference_is_detected(tmp_path, bad, monkeypatch):
    m = REF.search(bad)
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    assert any(n not in _sections() for n in range(first, last + 1))
