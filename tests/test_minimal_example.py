"""``examples/minimal.py``, the quickstart's script, runs as documented and learns.

Run as a user would (``python examples/minimal.py`` from the repository root) with this pass's
interpreter and SpikingJelly, then its report is read: the loss falls, the accuracy on its toy
task is well above chance (25 %), and the CF layer fires multi-level spikes.
"""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'examples', 'minimal.py')


def test_minimal_example_is_short():
    with open(SCRIPT) as f:
        assert len(f.read().splitlines()) <= 40


def test_minimal_example_trains_compiles_and_reports():
    env = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg', PYTHONDONTWRITEBYTECODE='1')
    proc = subprocess.run([sys.executable, 'examples/minimal.py'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    losses = [float(x) for x in re.findall(r'^step +\d+ +loss ([\d.]+)$', out, re.M)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, out
    accuracy = float(re.search(r'training accuracy after 40 steps: ([\d.]+)%', out).group(1))
    assert accuracy > 50, out
    counts = ast.literal_eval(re.search(r'spike levels of the CF layer: (\{.*\})$', out, re.M).group(1))
    (levels,) = counts.values()
    assert set(levels) == {-2, -1, 0, 1, 2}
    assert sum(levels.values()) == 4 * 64 * 64          # T x batch x neurons, one compiled call
    assert levels[-1] > 0 and levels[1] > 0              # signed spikes
