import os
import warnings

import pytest
import torch

import spikingjelly_cf


def _expectation_errors():
    """What the running pass claims to test (scripts/test.sh sets these) against what it imports.

    ``SPIKINGJELLY_CF_EXPECT_SJ`` (e.g. ``0.0.0.0.14`` or ``2.0.0``), ``SPIKINGJELLY_CF_EXPECT_TORCH``
    (e.g. ``2.9.1``; compared without the ``+cu...`` local tag) and
    ``SPIKINGJELLY_CF_EXPECT_DATASETS=1`` (``spikingjelly.datasets.dvs128_gesture`` must import,
    so the DVS tests run instead of skipping). Unset: not checked.
    """
    errors = []
    want_sj = os.environ.get('SPIKINGJELLY_CF_EXPECT_SJ')
    if want_sj and spikingjelly_cf.SPIKINGJELLY_VERSION != want_sj:
        errors.append(f'SpikingJelly {spikingjelly_cf.SPIKINGJELLY_VERSION} is imported, '
                      f'this pass claims to test {want_sj} (SPIKINGJELLY_CF_EXPECT_SJ)')
    want_torch = os.environ.get('SPIKINGJELLY_CF_EXPECT_TORCH')
    if want_torch and torch.__version__.split('+')[0] != want_torch:
        errors.append(f'torch {torch.__version__} is imported, this pass claims to test {want_torch} '
                      f'(SPIKINGJELLY_CF_EXPECT_TORCH)')
    if os.environ.get('SPIKINGJELLY_CF_EXPECT_DATASETS', '') not in ('', '0'):
        try:
            import spikingjelly.datasets.dvs128_gesture  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any reason is a failure of this pass
            errors.append(f'spikingjelly.datasets.dvs128_gesture does not import ({type(exc).__name__}: '
                          f'{exc}), this pass claims to run the DVS tests (SPIKINGJELLY_CF_EXPECT_DATASETS)')
    return errors


def pytest_configure(config):
    # one_pass: a test that needs to run in only one pass of scripts/test.sh (expensive and
    # independent of the SpikingJelly line: nvcc, the MNIST-1D accuracy run, the GPU benchmark's
    # CPU smoke run). scripts/test.sh deselects it in pass 2 with -m "not one_pass".
    config.addinivalue_line('markers', 'one_pass: run in one pass of scripts/test.sh only (pass 2 '
                                       'deselects it)')
    errors = _expectation_errors()
    if errors:
        raise pytest.UsageError('wrong test environment: ' + '; '.join(errors))


def pytest_report_header(config):
    import spikingjelly
    return (f'spikingjelly {spikingjelly_cf.SPIKINGJELLY_VERSION} from '
            f'{os.path.dirname(spikingjelly.__file__)}; torch {torch.__version__}; '
            f'CUDA available: {torch.cuda.is_available()}')


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f'spikingjelly-cf tests ran against SpikingJelly {spikingjelly_cf.SPIKINGJELLY_VERSION}')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _quiet_known_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning)
        yield


# -- hypothesis profiles ------------------------------------------------------------------------
# 'ci' (the default, also what CI runs): derandomised, so every run draws the same examples and a
# failure comes back on the next run; a failing example is printed with its reproduction blob
# (@reproduce_failure). No example database, no deadline (shared CPUs make timings noisy).
# 'dev': randomised with 5x the examples, for local runs: pytest --hypothesis-profile=dev
# (a test's own @settings(max_examples=...) still wins over either profile).
from hypothesis import HealthCheck, settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile('ci', derandomize=True, max_examples=30, deadline=None,
                               print_blob=True, database=None,
                               suppress_health_check=[HealthCheck.too_slow])
_hyp_settings.register_profile('dev', max_examples=150, deadline=None, print_blob=True,
                               suppress_health_check=[HealthCheck.too_slow])
_hyp_settings.load_profile('ci')  # --hypothesis-profile=NAME (hypothesis' own option) overrides

