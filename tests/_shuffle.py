"""A pytest plugin that runs the collected tests in another order, to prove they do not depend
on it (issue 12): ``PYTHONPATH=.:tests python -m pytest -p _shuffle --shuffle=reverse`` or
``--shuffle=SEED`` (a random permutation from that integer seed)."""
import random


def pytest_addoption(parser):
    parser.addoption('--shuffle', default=None,
                     help="'reverse' or an integer seed: run the tests in that order")


def pytest_collection_modifyitems(session, config, items):
    how = config.getoption('shuffle')
    if how is None:
        return
    if how == 'reverse':
        items.reverse()
    else:
        random.Random(int(how)).shuffle(items)


def pytest_report_header(config):
    how = config.getoption('shuffle')
    return None if how is None else f'test order: --shuffle={how}'
