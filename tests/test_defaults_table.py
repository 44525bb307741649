"""The table "Defaults that differ from SpikingJelly's LIFNode" (docs/guide/neuron.md) against the
installed signatures: every row's LIFNode column for the SpikingJelly line installed here and its
CFNode column, every parameter of both classes has a row, and the positional-argument rule."""
import inspect
import pathlib
import re

import pytest
from spikingjelly.activation_based import neuron, surrogate

from spikingjelly_cf import CFNode, CFRect, TSG
from spikingjelly_cf._compat import CLASSIC

PAGE = pathlib.Path(__file__).resolve().parent.parent / 'docs' / 'guide' / 'neuron.md'
HEADING = "## Defaults that differ from SpikingJelly's LIFNode"
ABSENT = '(no such parameter)'
LIF_COLUMN = 'LIFNode 0.0.0.0.14' if CLASSIC else 'LIFNode 2.0.0'
POSITION_ROW = '4th positional argument'


def _table():
    text = PAGE.read_text()
    assert HEADING in text, f'{PAGE.name} lost its section {HEADING!r}'
    section = text.split(HEADING, 1)[1].split('\n## ', 1)[0]
    lines = [line for line in section.splitlines() if line.startswith('|')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert len(cells) == len(header), line
        key = cells[0].strip('`')
        assert key not in rows, f'two rows for {key}'
        rows[key] = dict(zip(header, cells))
    return header, rows


def _first_code(cell: str) -> str:
    m = re.search(r'`([^`]*)`', cell)
    assert m, f'no value in {cell!r}'
    return m.group(1)


def _value(cell: str):
    return eval(_first_code(cell), {'Sigmoid': surrogate.Sigmoid, 'CFRect': CFRect, 'TSG': TSG})


def _same(documented, actual) -> bool:
    if isinstance(documented, (surrogate.Sigmoid, CFRect)):
        return type(actual) is type(documented) and repr(actual) == repr(documented)
    return type(actual) is type(documented) and actual == documented


def _parameters(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    return {p.name: p for p in params}


def test_every_parameter_has_a_row():
    header, rows = _table()
    assert header[:4] == ['parameter', 'LIFNode 0.0.0.0.14', 'LIFNode 2.0.0', 'CFNode']
    documented = set(rows) - {POSITION_ROW}
    assert set(_parameters(neuron.LIFNode)) <= documented
    assert set(_parameters(CFNode)) <= documented
    assert documented <= set(_parameters(neuron.LIFNode)) | set(_parameters(CFNode))


@pytest.mark.parametrize('column,cls', [(LIF_COLUMN, neuron.LIFNode), ('CFNode', CFNode)])
def test_each_row_matches_the_installed_signature(column, cls):
    _, rows = _table()
    params = _parameters(cls)
    for name, row in rows.items():
        if name == POSITION_ROW:
            continue
        cell = row[column]
        if cell == ABSENT:
            assert name not in params, f'{cls.__name__} has {name} but the table says it has not'
            continue
        assert name in params, f'{cls.__name__} has no parameter {name} ({column}: {cell})'
        documented, actual = _value(cell), params[name].default
        assert _same(documented, actual), (f'{column} {name}: the table says {documented!r}, '
                                           f'the signature has {actual!r}')
        if name == 'surrogate_function' and cls is CFNode:
            assert isinstance(CFNode().surrogate_function, CFRect), 'the table promises a CFRect'


def test_positional_arguments():
    _, rows = _table()
    row = rows[POSITION_ROW]
    lif = list(_parameters(neuron.LIFNode).values())
    assert lif[3].name == _first_code(row[LIF_COLUMN])
    assert 'keyword-only' in row['CFNode']
    cf = list(_parameters(CFNode).values())
    assert [p.name for p in cf[:3]] == [p.name for p in lif[:3]] == ['tau', 'decay_input', 'v_threshold']
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in cf[:3])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in cf[3:])
    # LIFNode's positional call is an error for CFNode, not a silently different neuron
    node = CFNode(2., True, 0.5)
    assert (node.tau, node.decay_input, node.v_threshold) == (2.0, True, 0.5)
    with pytest.raises(TypeError, match='positional'):
        CFNode(2., True, 1.0, None)
    with pytest.raises(TypeError, match='positional'):
        CFNode(2., True, 1.0, -0.5)


def test_cfnode_docstring_points_to_the_table():
    assert 'docs/guide/neuron.md' in CFNode.__doc__
    assert "Defaults that differ from SpikingJelly's LIFNode" in CFNode.__doc__
