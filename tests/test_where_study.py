"""Where does CF pay off? The settings study's networks, tasks, measurement, grids and report.

``examples/mnist1d_models.py`` (residual, Spikformer and recurrent networks, the potential
replay), the sequential / time-reversed tasks of ``examples/mnist1d.py``, the ``where*`` grids of
``benchmarks/accuracy_study.py`` and ``benchmarks/where_report.py``.

Cost (one torch thread): every test < 5 s except two marked ``one_pass`` (pass 1 only): the
smoke grid on MNIST-1D (the smallest configuration of each architecture and of the sequential
task, one epoch on 256 sequences, with its results-schema check: 15 s on an idle 2-core machine,
about 30 s on a loaded one) and the gesture smoke run (the synthetic set is written and
integrated first, about 18 s; it needs ``spikingjelly.datasets``). The whole file: about 60 s in
pass 1, 15 s in pass 2, measured on a loaded machine.
"""
import copy
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'examples'))

import mnist1d_models as models  # noqa: E402
from spikingjelly.activation_based import functional  # noqa: E402
from spikingjelly_cf import CFNode, CFRect  # noqa: E402


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lif(**kw):
    import common
    return common.LIFNode(tau=4 / 3, decay_input=False, v_threshold=1.0, surrogate_function=CFRect(),
                          detach_reset=False, step_mode='m', **kw)


CF_KW = dict(tau=4 / 3, decay_input=False, v_threshold=1.0, v_threshold_neg=-1.0, k_pos=2, k_neg=2,
             surrogate_function=CFRect(), step_mode='m')


# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('build', [
    lambda: models.SpikingResNet1d('spiking', 4, 3, CFNode, **CF_KW),
    lambda: models.SpikingResNet1d('sew', 4, 3, CFNode, **CF_KW),
    lambda: models.SpikingResNet1d('ms', 4, 3, CFNode, **CF_KW),
    lambda: models.Spikformer1d(4, 2, CFNode, num_heads=2, **CF_KW),
], ids=['spiking', 'sew', 'ms', 'spikformer'])
def test_static_networks_train_end_to_end(build):
    net = build()
    x = torch.randn(3, 5, 1, 40)
    out = net(x)
    assert out.shape == (3, 5, 10)
    out.mean(0).logsumexp(1).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    # every layer has its own neuron (and so its own surrogate)
    nodes = [m for m in net.modules() if isinstance(m, CFNode)]
    assert len({id(m.surrogate_function) for m in nodes}) == len(nodes)


def test_resnet_depth_and_stages():
    net = models.SpikingResNet1d('spiking', 4, 8, CFNode, **CF_KW)
    assert sum(isinstance(m, CFNode) for m in net.modules()) == 17          # ResNet-18's depth
    strides = [b.conv1[0].stride[0] for b in net.blocks]
    assert strides == [1, 1, 1, 1, 2, 1, 1, 1]
    with pytest.raises(ValueError, match='kind must be one of'):
        models.SpikingResNet1d('dense', 4, 2, CFNode, **CF_KW)
    with pytest.raises(ValueError, match='depth must be a positive int'):
        models.SpikingResNet1d('sew', 4, 0, CFNode, **CF_KW)


def _record_inputs(module, store):
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach()))


@pytest.mark.parametrize('kind', models.RESIDUAL_KINDS)
def test_residual_blocks_put_the_shortcut_where_their_kind_says(kind):
    """spiking: the second neuron's input is the conv branch plus the block input; SEW: the
    block output is the second neuron's spikes plus the input; MS: the output is the input plus
    the conv branch (no neuron after the sum)."""
    torch.manual_seed(1)
    block = models.ResidualBlock1d(kind, 4, 4, 1, CFNode, **CF_KW)
    functional.set_step_mode(block, 'm')
    block.eval()
    x = torch.randn(3, 2, 4, 10) * 2
    seen = {'sn1': [], 'sn2': []}
    hooks = [_record_inputs(block.sn1, seen['sn1']), _record_inputs(block.sn2, seen['sn2'])]
    out = block(x)
    for h in hooks:
        h.remove()
    functional.reset_net(block)
    if kind == 'spiking':
        s1 = block.sn1(block.conv1(x))
        torch.testing.assert_close(seen['sn2'][0], block.conv2(s1) + x)
        assert (block.neuron_before_add, block.neuron_after_add) == ('sn1', 'sn2')
    elif kind == 'sew':
        s2 = block.sn2(block.conv2(block.sn1(block.conv1(x))))
        torch.testing.assert_close(out, s2 + x)
        assert block.neuron_after_add is None
    else:
        torch.testing.assert_close(seen['sn1'][0], x)
        functional.reset_net(block)
        torch.testing.assert_close(out, x + block.conv2(block.sn2(block.conv1(block.sn1(x)))))


def test_spikformer_block_adds_attention_and_mlp():
    torch.manual_seed(0)
    net = models.Spikformer1d(8, 1, CFNode, num_heads=2, **CF_KW)
    net.eval()
    blk = net.blocks[0]
    x = torch.randint(-2, 3, (2, 3, 8, 20)).float()
    out = blk(x)
    functional.reset_net(net)
    a = x + blk.attn(x)
    torch.testing.assert_close(out, a + blk.mlp(a))
    with pytest.raises(ValueError, match='multiple of num_heads'):
        models.Spikformer1d(6, 1, CFNode, num_heads=4, **CF_KW)


def test_local_spiking_self_attention_arithmetic():
    """The local SSA: per head, (v k^T) q * 0.125 between its neurons (checked by einsum)."""
    torch.manual_seed(0)
    ssa = models.SpikingSelfAttention(4, num_heads=2, spiking_neuron=CFNode, **CF_KW)
    ssa.eval()
    seen = []
    h = _record_inputs(ssa.attn_lif, seen)
    x = torch.randint(-1, 2, (2, 3, 4, 5)).float()
    ssa(x)
    h.remove()
    functional.reset_net(ssa)
    qkv = ssa.qkv_lif(ssa.qkv_conv_bn(x)).reshape(2, 3, 3, 2, 2, 5)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]           # [T, N, heads, head_dim, L]
    expected = torch.einsum('tnhcl,tnhdl,tnhdm->tnhcm', v, k, q) * 0.125
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(TypeError, match='spiking_neuron is required'):
        models.SpikingSelfAttention(4, 2)


def test_local_spiking_self_attention_equals_spikingjelly_2():
    """On SpikingJelly 2.0 the model uses its SpikingSelfAttention; the local one (used on
    0.0.0.0.14) has the same parameters and gives the same output and gradients."""
    attention = pytest.importorskip('spikingjelly.activation_based.layer.attention',
                                    reason='SpikingJelly 0.0.0.0.14 has no spiking self-attention')
    assert models.spiking_self_attention_class() is attention.SpikingSelfAttention
    torch.manual_seed(0)
    theirs = attention.SpikingSelfAttention(8, num_heads=2, spiking_neuron=CFNode, **CF_KW)
    ours = models.SpikingSelfAttention(8, num_heads=2, spiking_neuron=CFNode, **CF_KW)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randint(-2, 3, (3, 2, 8, 6)).float()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = theirs(xa), ours(xb)
    torch.testing.assert_close(yb, ya)
    (ya * torch.arange(ya.numel()).reshape(ya.shape)).sum().backward()
    (yb * torch.arange(yb.numel()).reshape(yb.shape)).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)


def test_recurrent_snn_feeds_back_the_previous_spikes():
    """Each step's neuron input is BN(W x_t) + R s_{t-1} with s_{-1} = 0; state carries over steps."""
    torch.manual_seed(0)
    net = models.RecurrentSNN(6, 1, CFNode, **CF_KW)
    net.eval()
    assert net.neurons[0].step_mode == 's'
    seen = []
    h = _record_inputs(net.neurons[0], seen)
    x = torch.randn(7, 3, 1)
    out = net(x)
    h.remove()
    assert out.shape == (7, 3, 10)
    u = net.fc[0](x)
    functional.reset_net(net)
    s = torch.zeros(3, 6)
    node = net.neurons[0]
    for t in range(7):
        torch.testing.assert_close(seen[t], u[t] + net.rec[0](s))
        s = node(seen[t])
    with pytest.raises(ValueError, match='hidden must be a positive int'):
        models.RecurrentSNN(0, 1, CFNode, **CF_KW)


# ----------------------------------------------------------------------------------------------
# the motivating measurement
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('rule', models.REPLAY_RULES, ids=[r[0] for r in models.REPLAY_RULES])
def test_replay_accounts_for_all_the_potential(rule):
    name, kp, kn, reset = rule
    x = torch.randn(6, 50) * 1.8
    r = models.replay(x, kp, kn, reset)
    # sum of the inputs = sent + discarded by the reset + leaked + what is left at the end
    torch.testing.assert_close(x.sum(0), (r['sent'] + r['discarded'] + r['leaked']).sum(0) + r['left'][-1])
    assert float(r['s'].min()) >= -kn and float(r['s'].max()) <= kp
    if reset == 'soft':
        assert float(r['discarded'].abs().max()) == 0.
    else:
        assert float(r['discarded'].min()) >= 0. and float(r['discarded'].max()) > 0.


def test_replay_is_the_neurons_own_arithmetic():
    """The replayed rules give the spikes and potentials of CFNode (SCF, CF, ST = LIF soft) and
    of SpikingJelly's LIFNode with hard and soft reset."""
    x = torch.randn(8, 40) * 2
    for kp, kn in ((2, 2), (2, 0), (1, 0)):
        node = CFNode(k_pos=kp, k_neg=kn, step_mode='m', store_h_seq=True, backend='torch')
        s = node(x)
        r = models.replay(x, kp, kn, 'soft')
        torch.testing.assert_close(r['s'], s)
        torch.testing.assert_close(r['h'], node.h_seq)
    for v_reset, reset in ((None, 'soft'), (0.0, 'hard')):
        lif = _lif(v_reset=v_reset)
        lif.store_h_seq = True
        s = lif(x)
        r = models.replay(x, 1, 0, reset)
        torch.testing.assert_close(r['s'], s)
        torch.testing.assert_close(r['h'], lif.h_seq)
    with pytest.raises(ValueError, match='one positive level only'):
        models.replay(x, 2, 2, 'hard')


def test_residual_potentials_record_the_inputs_of_the_right_neurons():
    torch.manual_seed(0)
    net = models.SpikingResNet1d('spiking', 4, 2, CFNode, **CF_KW)
    net.eval()
    for m in net.modules():
        if isinstance(m, CFNode):
            m.store_h_seq = True
    with models.ResidualPotentials(net) as rec:
        net(torch.randn(4, 3, 1, 40))
        out = rec.summary()
        assert set(out) == {'blocks.0.sn1', 'blocks.0.sn2', 'blocks.1.sn1', 'blocks.1.sn2'}
        assert {k: v['where'] for k, v in out.items()}['blocks.1.sn2'] == 'after'
        h = net.blocks[1].sn2.h_seq
        hist = torch.histc(h.clamp(-4, 4), models.HIST_BINS, -4, 4)
        assert out['blocks.1.sn2']['histogram'] == hist.tolist()
        assert out['blocks.1.sn2']['fractions']['above_theta'] == pytest.approx(float((h >= 1).float().mean()))
        for rule in ('LIF hard', 'LIF soft', 'SCF', 'CF'):
            q = out['blocks.0.sn2']['replay'][rule]
            assert len(q['sent']) == 4 and min(q['leaked']) >= 0
    assert not rec.handles
    with pytest.raises(ValueError, match='no residual block'):
        models.ResidualPotentials(models.SpikingResNet1d('sew', 4, 1, CFNode, **CF_KW))


# ----------------------------------------------------------------------------------------------
# the example's arguments and tasks
# ----------------------------------------------------------------------------------------------
pytest.importorskip('mnist1d', reason='examples/mnist1d.py needs the mnist1d package (requirements.txt)')
example = _load('mnist1d_example_where', os.path.join('examples', 'mnist1d.py'))
study = _load('accuracy_study_where', os.path.join('benchmarks', 'accuracy_study.py'))
report = _load('where_report_under_test', os.path.join('benchmarks', 'where_report.py'))


@pytest.mark.parametrize('argv, message', [
    (['--arch', 'plain', '--depth', '3'], '--depth applies'),
    (['--arch', 'rsnn'], 'reads one sample per step'),
    (['--task', 'sequential'], 'reads one sample per step'),
    (['--arch', 'rsnn', '--task', 'sequential', '--T', '8'], 'T = 40'),
    (['--arch', 'spikformer', '--width', '6', '--heads', '4'], 'even --width that --heads divides'),
    (['--arch', 'sew-resnet', '--potentials'], 'SEW-ResNet adds after'),
    (['--arch', 'plain', '--potentials'], 'measures residual sums'),
    (['--arch', 'ms-resnet', '--pool', 'avg'], 'option of the plain network'),
    (['--arch', 'spiking-resnet', '--depth', '0'], '--depth must be >= 1'),
    (['--limit', '0'], '--limit must be >= 1'),
])
def test_bad_architecture_arguments_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        example.parse_args(argv)


def test_defaults_per_architecture():
    assert example.parse_args(['--arch', 'spiking-resnet']).depth == 2
    a = example.parse_args(['--arch', 'rsnn', '--task', 'reversed'])
    assert (a.depth, a.T) == (2, 40)
    assert example.parse_args([]).depth is None and example.parse_args([]).arch == 'plain'


def test_sequential_and_reversed_tasks():
    x = torch.arange(2 * 40, dtype=torch.float32).reshape(2, 1, 40)
    args = example.parse_args(['--arch', 'rsnn', '--task', 'sequential'])
    seq = example.to_input(x, args)
    assert seq.shape == (40, 2, 1) and torch.equal(seq[:, 1, 0], x[1, 0])      # one sample per step, in order
    m1, m2 = example.reversal_mask(1000, 'test'), example.reversal_mask(1000, 'test')
    assert np.array_equal(m1, m2) and 0.45 < m1.mean() < 0.55                     # fixed, about half
    assert not np.array_equal(m1, example.reversal_mask(1000, 'train'))
    xs = np.random.RandomState(0).randn(1000, 40).astype(np.float32)
    ys = np.arange(1000) % 10
    xr, yr = example.make_reversed(xs, ys, 'test')
    assert np.array_equal(xr[m1], xs[m1, ::-1]) and np.array_equal(xr[~m1], xs[~m1])
    assert np.array_equal(yr, ys + 10 * m1)
    assert len(example.class_names('reversed')) == 20 and len(example.class_names('sequential')) == 10
    net = example.build_model(example.parse_args(['--arch', 'rsnn', '--task', 'reversed', '--width', '4']))
    assert net.classifier.out_features == 20


# ----------------------------------------------------------------------------------------------
# the grids
# ----------------------------------------------------------------------------------------------
def _variant_free(cell):
    table = study.DVS_VARIANT_ARGV if cell['example'] == 'dvs_gesture' else study.MNIST1D_VARIANT_ARGV
    v = table[cell['variant']]
    assert cell['argv'][-len(v):] == v
    return cell['argv'][:-len(v)]


def test_where_grids_hold_every_setting_and_variant_at_equal_budget():
    cells, seeds, extra = study.GRIDS['where']
    assert len(seeds) >= 3 and extra == []
    names = [c['name'] for c in cells]
    assert len(set(names)) == len(names) == len(study.WHERE_SETTINGS) * len(study.WHERE_VARIANTS)
    assert study.WHERE_VARIANTS == ('LIF soft', 'ST', 'DT', 'SCF', 'CF', 'CF+TSG', 'CF+TSG+PNB')
    assert tuple(report.VARIANT_ORDER) == study.WHERE_VARIANTS
    archs = set()
    for st in study.WHERE_SETTINGS:
        mine = [c for c in cells if c['setting'] == st['name']]
        assert [c['variant'] for c in mine] == list(study.WHERE_VARIANTS)
        # equal budget: within a setting the cells differ only in the variant's own arguments
        assert len({tuple(_variant_free(c)) for c in mine}) == 1, st['name']
        for c in mine:
            ex = example if c['example'] == 'mnist1d' else _load('dvs_for_grid', os.path.join('examples', 'dvs_gesture.py'))
            a = ex.parse_args(c['argv'])
            if c['example'] == 'mnist1d':
                archs.add((a.arch, a.task))
        assert not any(c['measure'] for c in mine) or st['part'] == 'residual'
    assert {a for a, _ in archs} == set(example.ARCHS)
    assert {t for _, t in archs} == set(example.TASKS)
    # depth: a shallow and a deep setting of the spiking ResNet and of the Spikformer
    for arch in ('spiking-resnet', 'spikformer'):
        depths = {int(s['argv'][s['argv'].index('--depth') + 1]) for s in study.WHERE_SETTINGS
                  if s['argv'][:2] == ['--arch', arch]}
        assert len(depths) >= 2 and max(depths) >= 4 * min(depths)
    # the parts add up to the whole grid
    parts = [c['name'] for p in study.WHERE_PARTS for c in study.GRIDS[f'where-{p}'][0]]
    assert sorted(parts) == sorted(names)
    assert all(study.GRID_STEM[g] == 'where_cf_pays' for g in study.GRIDS if g.startswith('where'))
    # the probes: the deep spiking ResNet's arguments, only the surrogate (and neuron) changed
    deep = next(s for s in study.WHERE_SETTINGS if s['name'] == 'spiking-resnet d8')
    for c in study.GRIDS['where-probe'][0]:
        a = example.parse_args(c['argv'])
        assert c['argv'][:len(deep['argv'])] == deep['argv'] and a.surrogate == 'sigmoid' and a.pnb == 0
        assert c['setting'] == deep['name'] and c['name'] not in names
    assert study.GRID_STEM['full'] == 'accuracy_study'


def test_where_smoke_grid_covers_every_architecture_and_temporal_task():
    cells = study.GRIDS['where-smoke'][0]
    seen = set()
    for c in cells:
        if c['example'] == 'mnist1d':
            a = example.parse_args(c['argv'])
            seen.add(a.arch)
            assert a.epochs == 1 and a.width == 4 and a.limit == 256 and a.depth in (None, 1)
        else:
            seen.add('gestures')
    assert seen == set(example.ARCHS) | {'gestures'}
    assert any(c['measure'] for c in cells)


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def _fake_results(accs):
    """``accs``: {setting: {variant: [acc seed 0, 1, 2]}} -> a results dict as the study writes it."""
    cells, runs = [], []
    for s, by_v in accs.items():
        for v, vals in by_v.items():
            name = f'{s}: {v}'
            cells.append({'name': name, 'argv': [], 'note': 'n', 'group': 'residual', 'setting': s, 'variant': v})
            for seed, a in enumerate(vals):
                runs.append({'cell': name, 'seed': seed, 'test_acc': a / 100, 'train_acc': 0.9, 'seconds': 10.,
                             'cpu_seconds': 9., 'spikes_per_neuron_step': 0.1, 'run_argv': []})
    return {'cells': cells, 'runs': runs, 'seeds': [0, 1, 2], 'commands': ['python x'], 'wall_seconds': 60.}


def test_paired_differences_and_the_paper_ordering():
    res = _fake_results({'a': {'ST': [80, 81, 82], 'DT': [81, 82, 83.5], 'SCF': [85, 85, 86], 'CF': [90, 88, 91],
                               'LIF soft': [80, 82, 81], 'CF+TSG': [90, 88.5, 90], 'CF+TSG+PNB': [89, 88, 90]}})
    table = report.aggregate(res)
    assert table['a']['CF']['mean'] == pytest.approx(89.6667, abs=1e-3)
    assert table['a']['CF']['std'] == pytest.approx(float(np.std([90, 88, 91], ddof=1)))
    d = report.paired_difference(table['a']['CF'], table['a']['SCF'])
    diffs = np.array([5., 3., 5.])
    assert d['mean'] == pytest.approx(diffs.mean()) and d['std'] == pytest.approx(diffs.std(ddof=1))
    assert d['resolved'] is True                                      # t = 11.3 > 4.30
    tsg = report.paired_difference(table['a']['CF+TSG'], table['a']['CF'])  # 0, +0.5, -1: not resolved
    assert tsg['resolved'] is False
    o = report.paper_ordering(table['a'])
    assert o['order'] == ['CF', 'SCF', 'DT', 'ST'] and o['exact']
    assert all(s['holds'] for s in o['steps'].values())
    assert o['steps']['DT > ST']['resolved'] is True                 # +1, +1, +1.5
    swapped = dict(table['a'], DT=table['a']['ST'], ST=table['a']['DT'])
    o2 = report.paper_ordering(swapped)
    assert not o2['exact'] and o2['steps']['DT > ST']['holds'] is False
    md = report.markdown(res)
    assert '| a | 81.0 ± 1.0 |' in md and '+4.3 ± 1.2 **' in md


def test_where_report_files(tmp_path):
    res = _fake_results({'s1': {'LIF soft': [50, 52, 51], 'CF': [60, 62, 61]}, 's2': {'LIF soft': [70, 71, 72]}})
    report.write_report(res, str(tmp_path))
    assert os.path.isfile(tmp_path / 'where_cf_pays.md') and os.path.isfile(tmp_path / 'where_cf_pays.png')
    assert not os.path.exists(tmp_path / 'where_cf_pays_potentials.md')   # no run measured potentials


def test_stored_commands_are_shown_as_a_shell_needs_them():
    names = ['plain', 'spiking-resnet d8', 'spiking-resnet d2']
    q = report._quoted_command('python b.py --settings plain spiking-resnet d8 --jobs 2', names)
    assert q == "python b.py --settings plain 'spiking-resnet d8' --jobs 2"
    assert report._quoted_command("python b.py --settings 'spiking-resnet d2'", names) == \
        "python b.py --settings 'spiking-resnet d2'"
    assert report._quoted_command('python b.py --grid where', names) == 'python b.py --grid where'


def test_where_report_says_which_settings_are_incomplete(tmp_path):
    """A study that is still running: rows with fewer seeds say how many, a setting without runs
    is named as not complete (and keeps an empty panel), no spread is made up for one seed."""
    res = _fake_results({'full': {'LIF soft': [50, 52, 51], 'CF': [60, 62, 61]},
                         'part': {'LIF soft': [70, 71, 72], 'CF': [80]},
                         'none': {'LIF soft': [], 'CF': []}})
    done = report.completeness(res)
    assert done['full'] == {'runs': 6, 'expected': 6, 'seeds': [0, 1, 2]}
    assert done['part'] == {'runs': 4, 'expected': 6, 'seeds': [0, 1, 2]}
    assert done['none'] == {'runs': 0, 'expected': 6, 'seeds': []}
    md = report.markdown(res)
    assert md.startswith('# Where') and '10 of 18 runs (3 settings x 2 variants x seeds [0, 1, 2])' in md
    line = next(l for l in md.splitlines() if l.startswith('**Not complete yet:**'))
    assert 'part (4 of 6 runs' in line and 'none (0 of 6 runs)' in line and 'full' not in line
    assert '| part | 71.0 ± 1.0 | **80.0** (1 seed) |' in md            # no "± 0.0" for one seed
    assert '+10.0 (1 seed)' in md                                      # CF - LIF soft, seed 0 only
    assert '| full | 51.0 ± 1.0 | **61.0 ± 1.0** |' in md
    report.plot(res, str(tmp_path / 'p.png'))
    assert os.path.getsize(tmp_path / 'p.png') > 10000
    complete = _fake_results({'full': {'LIF soft': [50, 52, 51], 'CF': [60, 62, 61]}})
    assert 'Not complete' not in report.markdown(complete)


def _check_schema(stored, expect_cells):
    assert set(stored) >= {'runs', 'cells', 'grids', 'commands', 'seeds', 'wall_seconds', 'machine'}
    assert sorted((r['cell'], r['seed']) for r in stored['runs']) == sorted((c, 0) for c in expect_cells)
    for r in stored['runs']:
        assert set(r) >= {'cell', 'seed', 'run_argv', 'example', 'test_acc', 'train_acc', 'epochs', 'seconds',
                          'cpu_seconds', 'test_acc_per_epoch', 'where', 'versions'}
        assert 0. <= r['test_acc'] <= 1. and r['epochs'] == 1 and r['cpu_seconds'] >= 0
        assert set(r['where']) == {'setting', 'variant', 'part'}


@pytest.mark.one_pass  # ~15-30 s; the networks run on both SpikingJelly lines in the tests above
def test_where_smoke_grid_mnist1d(tmp_path, monkeypatch):
    """Every new architecture and the sequential task, smallest configuration, in-process: JSON
    schema, tables, figures, the potentials measurement, resumable."""
    names = [c['name'] for c in study.GRIDS['where-smoke'][0] if c['example'] == 'mnist1d']
    out, runs, data = str(tmp_path / 'out'), str(tmp_path / 'runs'), str(tmp_path / 'data')
    results = study.run_study('where-smoke', out_dir=out, runs_dir=runs, data_dir=data, cells=names, progress=False)
    with open(os.path.join(out, 'where_cf_pays.json')) as f:
        stored = json.load(f)
    _check_schema(stored, names)
    assert stored['grids'] == ['where-smoke']
    for name in ('where_cf_pays.md', 'where_cf_pays.png', 'where_cf_pays_potentials.md',
                 'where_cf_pays_potentials.png'):
        assert os.path.isfile(os.path.join(out, name)), name
    md = open(os.path.join(out, 'where_cf_pays.md')).read()
    for section in ('## Accuracy', '## What each component buys', "## The paper's ordering", '## Every run',
                    '## Time per setting'):
        assert section in md
    measured = [r for r in stored['runs'] if r.get('residual_potentials')]
    assert {r['where']['variant'] for r in measured} == {'LIF soft', 'CF+TSG+PNB'}
    for r in measured:
        layers = r['residual_potentials']['layers']
        assert {d['where'] for d in layers.values()} == {'before', 'after'}
        assert all(sum(d['histogram']) > 0 for d in layers.values())
    # resumable: nothing runs again
    monkeypatch.setattr(study, '_run_in_process', lambda *a, **k: (_ for _ in ()).throw(AssertionError('re-run')))
    again = study.run_study('where-smoke', out_dir=out, runs_dir=runs, data_dir=data, cells=names, progress=False)
    assert [r['test_acc'] for r in again['runs']] == [r['test_acc'] for r in results['runs']]


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    argv = ['--seed', '0', '--out-dir', str(tmp_path / 'run')]
    first, resumed = study._resume_or_start(argv)
    assert first == argv and not resumed
    os.makedirs(tmp_path / 'run' / 'checkpoints')
    open(tmp_path / 'run' / 'checkpoints' / 'latest.pt', 'w').close()
    again, resumed = study._resume_or_start(argv)
    assert resumed and again == argv + ['--resume']
    other, resumed = study._resume_or_start(['--seed', '1', '--out-dir', str(tmp_path / 'run')])
    assert not resumed and not os.path.exists(tmp_path / 'run' / 'checkpoints')   # stale run removed
    # a run that finished after its study had stopped is taken as it is
    summary = {'test_acc': 0.5, 'epochs': 2, 'history': [{}, {}], 'seconds_total': 3., 'cpu_seconds_process': 2.}
    with open(tmp_path / 'run' / 'summary.json', 'w') as f:
        json.dump(summary, f)
    assert study._finished_summary(['--seed', '1', '--out-dir', str(tmp_path / 'run')])['recovered'] is True
    assert study._finished_summary(argv) is None                       # other arguments
    with open(tmp_path / 'run' / 'summary.json', 'w') as f:
        json.dump(dict(summary, history=[{}]), f)                      # stopped after epoch 1
    assert study._finished_summary(['--seed', '1', '--out-dir', str(tmp_path / 'run')]) is None


@pytest.mark.one_pass  # writes and integrates the synthetic gesture set first (~20 s)
def test_where_smoke_grid_gestures(tmp_path):
    pytest.importorskip('spikingjelly.datasets.dvs128_gesture',
                        reason='the DVS example needs spikingjelly.datasets (SpikingJelly 0.0.0.0.14 here)')
    names = [c['name'] for c in study.GRIDS['where-smoke'][0] if c['example'] == 'dvs_gesture']
    out = str(tmp_path / 'out')
    study.run_study('where-smoke', out_dir=out, runs_dir=str(tmp_path / 'runs'), data_dir=str(tmp_path / 'data'),
                    gesture_root=str(tmp_path / 'gestures'), cells=names, progress=False, jobs=2)
    with open(os.path.join(out, 'where_cf_pays.json')) as f:
        stored = json.load(f)
    _check_schema(stored, names)
    assert stored['runs'][0]['example'] == 'dvs_gesture'
    assert stored['runs'][0]['cpu_seconds'] > 1        # the child process's own CPU time (--jobs 2)


COMMITTED = os.path.join(ROOT, 'benchmarks', 'results', '2026-12-03_cpu-2core')


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_committed_tables_come_from_the_committed_runs_of_the_current_grid():
    """The committed where_cf_pays tables are what the report makes of the committed JSON, and
    every stored run is a cell of today's grid with today's arguments: so the documented command
    (--grid where) reruns exactly what the tables show. A setting with fewer runs than the grid
    (a study still running) is named in the table's "Not complete yet" line."""
    with open(os.path.join(COMMITTED, 'where_cf_pays.json')) as f:
        results = json.load(f)
    with open(os.path.join(COMMITTED, 'where_cf_pays.md')) as f:
        md = f.read()
    assert report.markdown(results) == md
    with open(os.path.join(COMMITTED, 'where_cf_pays_potentials.md')) as f:
        assert report.potentials_markdown(results) == f.read()
    for name in ('where_cf_pays.png', 'where_cf_pays_potentials.png', 'where_cf_pays_potentials_summary.png'):
        assert os.path.isfile(os.path.join(COMMITTED, name)), name
    cells = {c['name']: c for c in study.GRIDS['where'][0] + study.GRIDS['where-probe'][0]}
    assert {c['name'] for c in results['cells']} >= {c['name'] for c in study.GRIDS['where'][0]}
    for r in results['runs']:
        assert r['cell'] in cells and r['seed'] in (0, 1, 2), (r['cell'], r['seed'])
        assert r['argv'] == cells[r['cell']]['argv'], r['cell']
        assert ('--potentials' in r['run_argv']) == (cells[r['cell']]['measure'] and r['seed'] == 0)
    assert len({(r['cell'], r['seed']) for r in results['runs']}) == len(results['runs'])
    incomplete = [s for s, d in report.completeness(results).items() if d['runs'] < d['expected']]
    notice = [line for line in md.splitlines() if line.startswith('**Not complete yet:**')]
    assert bool(notice) == bool(incomplete)
    for s in incomplete:
        assert f' {s} (' in notice[0], s
    # no path of the machine that ran it: every path is relative to the repository root
    for text in _strings(results):
        assert not text.startswith(('/', '~')) and ROOT not in text and os.path.expanduser('~') + os.sep not in text, text
