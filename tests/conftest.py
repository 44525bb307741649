import os
import warnings

import pytest
import torch

import spikingjelly_cf


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
