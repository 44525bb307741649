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
