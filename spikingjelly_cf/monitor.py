r"""Monitors: forward hooks that compute the PNB loss, the energy table and spike-level counts.

All three register plain ``register_forward_hook`` hooks by module name (SpikingJelly's own
``monitor.py`` imports tensorboard at import time, so nothing here builds on it), offer
``enable()`` / ``disable()`` / ``remove()`` and work as context managers. ``disable()``
removes the hooks, so a disabled monitor costs nothing; nothing relies on ``__del__``.

- :class:`PNBMonitor`: the positive-negative balanced loss of Eq. 18-23 (docs/method.md, section 3).
- :class:`EnergyMonitor`: FLOPs, firing rates, SOPs and energy per synaptic layer
  (Eq. 26-28, docs/method.md, section 4), printed like the paper's Table X.
- :class:`SpikeLevelHistogram`: how many outputs of each CF layer sit at each level
  :math:`-K_N, \dots, K_P` (the paper's Fig. 8 trade-off between K and spike count).
"""
import io
import weakref
from typing import Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from .functional.energy import (AVERAGE_POOL_TYPES, E_FLOP_ANN, E_MAC, E_SOP, SYNAPTIC_LAYER_TYPES,
                                _batched, _conv_dims, _fold, _pool_dims, is_spike_valued,
                                synaptic_flops, synaptic_operations)
from .functional.pnb import pnb_loss_from_statistics, pnb_statistics
from .neuron import CFNode

__all__ = ['PNBMonitor', 'EnergyMonitor', 'SpikeLevelHistogram']

ClassFilter = Union[Type[nn.Module], Tuple[Type[nn.Module], ...], None]

#: The live PNBMonitor of each monitored layer (module -> weak reference to the monitor): a
#: second PNBMonitor on the same layer would turn its store_h_seq off under the first.
_PNB_OWNERS: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def _select_modules(net: nn.Module, instance: ClassFilter, names: Optional[Iterable[str]],
                    default: Tuple[type, ...], what: str) -> Dict[str, nn.Module]:
    """``{name: module}`` of the modules of ``net`` to monitor, in ``named_modules`` order."""
    if not isinstance(net, nn.Module):
        raise TypeError(f'net must be an nn.Module, got {type(net).__name__}')
    if instance is None:
        classes = None if names is not None else default
    else:
        classes = instance if isinstance(instance, tuple) else (instance,)
        if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
            raise TypeError(f'instance must be an nn.Module subclass or a tuple of them, got {instance!r}')
    wanted = None
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        known = dict(net.named_modules())
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ValueError(f'names: no module called {missing} in net; '
                             f'names are those of net.named_modules()')
        wanted = set(wanted)
    selected = {}
    for name, module in net.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if classes is not None and not isinstance(module, classes):
            continue
        selected[name] = module
    if not selected:
        raise ValueError(f'found no {what} to monitor in {type(net).__name__} '
                         f'(instance={instance!r}, names={names!r})')
    return selected


class _ForwardHookMonitor:
    """Hooks by module name, enable/disable/remove, context manager (no ``__del__``)."""

    def __init__(self, modules: Dict[str, nn.Module]):
        self._monitored = modules
        self._handles = {}
        self._removed = False

    # -- subclass interface -----------------------------------------------------------------------
    def _hook(self, name: str, module: nn.Module, args, output):  # pragma: no cover - abstract
        raise NotImplementedError

    def _on_enable(self):
        pass

    def _on_disable(self):
        pass

    def reset(self):
        """Clear everything accumulated so far."""

    # -- public ---------------------------------------------------------------------------------------
    @property
    def monitored_layers(self) -> List[str]:
        """Names (as in ``net.named_modules()``) of the monitored modules."""
        return list(self._monitored)

    @property
    def is_enabled(self) -> bool:
        return bool(self._handles)

    def enable(self):
        """(Re-)attach the hooks. Returns ``self``."""
        if self._removed:
            raise RuntimeError(f'this {type(self).__name__} was removed; create a new one')
        if not self._handles:
            for name, module in self._monitored.items():
                self._handles[name] = module.register_forward_hook(self._make_hook(name))
            self._on_enable()
        return self

    def disable(self):
        """Detach the hooks (a disabled monitor adds no cost to a forward pass). Returns ``self``."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._on_disable()
        return self

    def remove(self):
        """Detach the hooks for good and undo every change made to the monitored modules.
        What was accumulated stays readable (so a table can be printed after a ``with`` block)."""
        if not self._removed:
            self.disable()
            self._on_remove()
            self._removed = True

    def _on_remove(self):
        pass

    def _make_hook(self, name: str):
        def hook(module, args, output):
            return self._hook(name, module, args, output)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.remove()
        return False


class PNBMonitor(_ForwardHookMonitor):
    r"""Positive-negative balanced loss of a network's CF layers (Eq. 18-23, docs/method.md, section 3).

    Attaches a forward hook to every monitored CF layer and turns on its ``store_h_seq``.
    After each forward call of a layer the hook adds the per-level sufficient statistics
    (:func:`~spikingjelly_cf.functional.pnb_statistics`) of the layer's pre-reset potentials
    ``h_seq`` to that layer's accumulator: in multi-step mode ``h_seq`` is the whole
    ``[T, N, *]`` sequence, in single-step mode the current step, so the sums over a
    forward pass are the same in both modes. Only the ``[K, 6]`` sums are kept, never the
    potentials. :meth:`loss` returns

    .. math::

        \mathcal{L}_{\text{pnb}} = \frac{1}{|\mathcal{C}|} \sum_{l \in \mathcal{C}}
        \mathcal{L}_{\text{layer}}(l),

    the mean over the layers :math:`\mathcal{C}` that ran since the last call, of the
    per-layer loss of Eq. 22 (:func:`~spikingjelly_cf.functional.pnb_loss`), and clears the
    accumulators. The training objective of Eq. 23 is ``CE + 0.25 * pnb.loss()``.

    The PNB loss is a training term, so the monitor records only forward passes whose graph
    autograd keeps: nothing under ``torch.no_grad()`` or ``torch.inference_mode()`` (validation
    passes may run while the monitor is attached and leave the next training loss unchanged),
    and nothing when ``torch.utils.checkpoint`` re-runs a region inside the backward pass (its
    first run was recorded). ``net.eval()`` alone changes nothing: an eval-mode forward with
    gradients enabled is recorded like any other (evaluate under ``torch.no_grad()``). The
    layers keep ``store_h_seq=True`` while the monitor is enabled, also without gradients;
    :meth:`disable` turns that off.

    Parameters
    ----------
    net : nn.Module
        The network.
    instance : class or tuple of classes, optional
        Monitor the modules of these classes; default :class:`~spikingjelly_cf.neuron.CFNode`
        (or, when ``names`` is given, the named modules whatever their class). A monitored
        module needs ``store_h_seq``, ``h_seq``, ``v_threshold``, ``v_threshold_neg``,
        ``k_pos`` and ``k_neg``.
    names : str or iterable of str, optional
        Monitor only the modules with these names (as in ``net.named_modules()``).
    eps : float
        :math:`\varepsilon` of Eq. 20-22, default ``1e-6``.

    Raises
    ------
    ValueError
        If no layer is found, a layer has ``k_pos != k_neg`` or ``k_neg == 0`` (the loss
        pairs level :math:`k` on both sides), or a layer already has a PNBMonitor that was not
        removed (one PNBMonitor per layer).

    Examples
    --------
    >>> from spikingjelly.activation_based import functional
    >>> net = nn.Sequential(nn.Linear(4, 8), CFNode(step_mode='s'))
    >>> with PNBMonitor(net) as pnb:
    ...     for t in range(3):
    ...         out = net(torch.randn(2, 4))
    ...     loss = out.sum() * 0. + 0.25 * pnb.loss()  # CE + 0.25 * L_pnb in real code
    ...     loss.backward()
    ...     sorted(pnb.per_layer())
    ['1']
    >>> functional.reset_net(net)
    """

    def __init__(self, net: nn.Module, instance: ClassFilter = None,
                 names: Optional[Iterable[str]] = None, eps: float = 1e-6):
        super().__init__(_select_modules(net, instance, names, (CFNode,), 'CF layer'))
        eps = float(eps)
        if eps < 0.:
            raise ValueError(f'eps must be >= 0, got {eps!r}')
        self.eps = eps
        for name, module in self._monitored.items():
            self._check_layer(name, module)
            owner = _PNB_OWNERS.get(module)
            if owner is not None and owner() is not None and not owner()._removed:
                raise ValueError(f'layer {name!r} ({type(module).__name__}) already has a '
                                 f'PNBMonitor; remove() that one first (one PNBMonitor per layer)')
        for module in self._monitored.values():
            _PNB_OWNERS[module] = weakref.ref(self)
        self._original_store_h_seq = {name: bool(m.store_h_seq) for name, m in self._monitored.items()}
        self._stats: Dict[str, torch.Tensor] = {}
        self._last: Dict[str, torch.Tensor] = {}
        self.enable()

    @staticmethod
    def _check_layer(name: str, module: nn.Module):
        label = f'layer {name!r} ({type(module).__name__})'
        for attr in ('store_h_seq', 'v_threshold', 'v_threshold_neg', 'k_pos', 'k_neg'):
            if not hasattr(module, attr):
                raise ValueError(f'{label} has no attribute {attr!r}: PNBMonitor needs a CF layer '
                                 f'that exposes its pre-reset potentials (CFNode)')
        if module.k_neg == 0 or module.k_pos != module.k_neg:
            raise ValueError(f'{label} has k_pos={module.k_pos}, k_neg={module.k_neg}: the PNB loss '
                             f'needs k_pos == k_neg >= 1; leave this layer out with instance=/names=')

    def _on_enable(self):
        for module in self._monitored.values():
            module.store_h_seq = True

    def _on_disable(self):
        for module in self._monitored.values():
            module.store_h_seq = False

    def _on_remove(self):
        for name, module in self._monitored.items():
            module.store_h_seq = self._original_store_h_seq[name]
            owner = _PNB_OWNERS.get(module)
            if owner is not None and owner() is self:
                del _PNB_OWNERS[module]

    def _hook(self, name, module, args, output):
        if not torch.is_grad_enabled():
            return  # torch.no_grad() / inference_mode(): a validation pass, no loss to train
        # a torch.utils.checkpoint re-run inside the backward pass: the first run was recorded;
        # the statistics are computed again (the re-run must save the tensors the first run
        # saved) and dropped
        rerun = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
        h = getattr(module, 'h_seq', None)
        if rerun:  # CFNode's re-run leaves h_seq alone and hands its own potentials over here
            h = module.__dict__.pop('_rerun_h_seq', None)
            if h is None:
                return
        if h is None:
            raise RuntimeError(f'PNBMonitor: layer {name!r} ran with store_h_seq=True but left '
                               f'h_seq=None; its forward must store the pre-reset potentials')
        if module.k_pos != module.k_neg or module.k_neg == 0:
            self._check_layer(name, module)
        stats = pnb_statistics(h, module.v_threshold, module.v_threshold_neg, module.k_pos)
        if rerun:
            return
        old = self._stats.get(name)
        self._stats[name] = stats if old is None else old + stats.to(old.device)

    def loss(self) -> torch.Tensor:
        """Mean PNB loss over the layers that ran since the last call; clears the accumulators.

        Returns a scalar tensor attached to the graph of the potentials (0 when no monitored
        layer ran).
        """
        if not self._stats:
            self._last = {}
            return torch.zeros(())
        losses = {name: pnb_loss_from_statistics(stats, self.eps) for name, stats in self._stats.items()}
        self._stats = {}
        self._last = {name: value.detach() for name, value in losses.items()}
        values = list(losses.values())
        device = values[0].device
        return sum(v.to(device) for v in values) / len(values)

    def per_layer(self) -> Dict[str, float]:
        """``{name: loss}`` of each layer at the last :meth:`loss` call, for logging."""
        return {name: float(value) for name, value in self._last.items()}

    def statistics(self) -> Dict[str, torch.Tensor]:
        """The current ``[K, 6]`` accumulators (detached), see
        :data:`~spikingjelly_cf.functional.PNB_STATISTICS_FIELDS`."""
        return {name: stats.detach() for name, stats in self._stats.items()}

    def reset(self):
        """Drop the accumulators (and the graph they hold) without computing the loss."""
        self._stats = {}
        self._last = {}

    def __repr__(self):
        return (f'{type(self).__name__}(layers={self.monitored_layers}, eps={self.eps}, '
                f'enabled={self.is_enabled})')


class _EnergyRecord:
    __slots__ = ('module', 'sample_steps', 'macs', 'abs_sum', 'numel', 'sops', 'real_valued', 'steps',
                 'spike_macs', 'pooled', 'pooled_real', 'unfolded')

    def __init__(self, module):
        self.module = module
        self.sample_steps = 0   # samples x steps seen
        self.macs = 0           # MACs of everything seen (the layer's own, for the ANN reference)
        self.spike_macs = 0     # MACs of the map the spikes went through (folded pool), Eq. 26
        self.abs_sum = None     # sum |s| of the spikes (pre-pool ones when pooled), float64 tensor
        self.numel = 0          # spike elements seen
        self.sops = None        # exact SOPs of everything seen (float64 tensor)
        self.real_valued = None  # bool tensor: some input was not integer-valued
        self.steps = set()      # T of multi-step inputs
        self.pooled = False     # some input came through an average pool, folded
        self.pooled_real = None  # bool tensor: one of those pools read non-integer values
        self.unfolded = None    # why an average-pooled input could not be folded (str)


class _PoolRecord:
    """The last call of an average pool: its output (weakly) and the |s| of its input per
    pooled position, summed over every other dimension."""
    __slots__ = ('output', 'ptr', 'numel', 'device', 'in_shape', 'out_shape', 'contiguous', 'per_position',
                 'abs_sum', 'numel_in', 'real')

    def __init__(self, pool, x, output):
        dims = _pool_dims(pool)
        a = x.detach().abs()
        if not a.is_floating_point() or a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()
        # the tensor that owns the output's memory: every view of the output (a Flatten, the
        # reshapes of SpikingJelly's multi-step layers) keeps it alive, so while it lives a tensor
        # at the same address with as many elements is that output
        self.output = weakref.ref(output if output._base is None else output._base)
        self.ptr, self.numel, self.device = output.data_ptr(), output.numel(), output.device
        self.in_shape, self.out_shape = tuple(x.shape), tuple(output.shape)
        self.contiguous = output.is_contiguous()
        self.per_position = a.sum(dim=tuple(range(a.dim() - dims)), dtype=torch.float64)
        self.abs_sum = self.per_position.sum()
        self.numel_in = x.numel()
        self.real = ~is_spike_valued(x)

    def feeds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is this pool's output or a view of it in the same element order
        (``Flatten``, a reshape)."""
        out = self.output()
        return (out is not None and x.device == self.device and x.numel() == self.numel
                and x.data_ptr() == self.ptr and self.contiguous and x.is_contiguous())


def _add(old, new):
    return new if old is None else old + new.to(old.device)


class EnergyMonitor(_ForwardHookMonitor):
    r"""Operations and energy of the synaptic layers of a network (Eq. 26-28, docs/method.md, section 4).

    Hooks every ``Conv1d/2d/3d`` and ``Linear`` (SpikingJelly's ``layer.*`` versions
    included, single- and multi-step) and, per layer, accumulates over every forward call:

    - ``flops``: MACs of one step of one sample (the paper's FLOPs(l));
    - ``firing_rate``: :math:`f_r`, the mean :math:`|s|` per input neuron and step;
    - ``sops``: the exact count :math:`\sum_i |s_i| \cdot \text{fan-out}(i)` per sample;
    - ``sops_eq26``: the estimate :math:`f_r \cdot T \cdot \text{FLOPs}` of Eq. 26;
    - ``energy_j``: :math:`e_{SOP} \cdot \text{SOPs}` (Eq. 27) or, for a layer whose input
      had a non-integer value (the encoding layer), :math:`e_{MAC} \cdot \text{MACs}`.

    A layer fed by an average pool of spikes (``AvgPool -> Conv``, ``AvgPool -> Flatten ->
    Linear``, ``AdaptiveAvgPool``, SpikingJelly's ``layer.AvgPool*`` in either step mode) sees
    non-integer values, but pooling is linear: the monitor folds the pool into the layer and
    counts it as spike-driven over the pre-pool spikes
    (:func:`~spikingjelly_cf.functional.pooled_synaptic_operations`); its row says
    ``input='pooled spikes'``, its ``firing_rate`` is that of the pre-pool spikes and Eq. 26
    uses the folded map's MACs. The pool must feed the layer directly (or through a view such as
    ``Flatten``). Every layer counted as MACs says why in ``mac_reason`` (and in the notes under
    :meth:`format_table`).

    The totals add the ANN reference :math:`e_{FLOP} \cdot \sum_l \text{FLOPs}(l)` (Eq. 28).
    Values are per sample: a SpikingJelly layer in multi-step mode sees ``[T, N, ...]``
    (``N`` samples of ``T`` steps); any other call counts ``N`` sample-steps and ``T`` (the
    steps per sample) must then be given unless every layer runs multi-step.

    Parameters
    ----------
    net : nn.Module
        The network.
    T : int, optional
        Time steps per sample; default: inferred from multi-step inputs, else 1.
    e_sop : float
        Joules per synaptic operation, default 77 fJ (Eq. 27).
    e_mac : float
        Joules per MAC of a real-valued (encoding) layer, default 4.6 pJ (45 nm float MAC,
        as in Spikformer, whose accounting the paper follows).
    e_flop_ann : float
        Joules per FLOP of the ANN reference, default 12.5 pJ (Eq. 28).
    instance : class or tuple of classes, optional
        Layers to count; default all :data:`~spikingjelly_cf.functional.SYNAPTIC_LAYER_TYPES`.
    names : str or iterable of str, optional
        Count only the layers with these names.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 3), CFNode(), nn.Linear(3, 2))
    >>> with EnergyMonitor(net, T=1) as em:
    ...     _ = net(torch.tensor([[0.5, 2.0, 1.0, 3.0]]))
    ...     [row['input'] for row in em.table()['layers']]
    ['real', 'spikes']
    """

    def __init__(self, net: nn.Module, T: Optional[int] = None, e_sop: float = E_SOP,
                 e_mac: float = E_MAC, e_flop_ann: float = E_FLOP_ANN, instance: ClassFilter = None,
                 names: Optional[Iterable[str]] = None):
        modules = _select_modules(net, instance, names, SYNAPTIC_LAYER_TYPES, 'synaptic layer')
        bad = [n for n, m in modules.items() if not isinstance(m, SYNAPTIC_LAYER_TYPES)]
        if bad:
            raise ValueError(f'EnergyMonitor counts Conv1d/2d/3d and Linear layers (and subclasses); '
                             f'{bad} are not')
        super().__init__(modules)
        if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
            raise ValueError(f'T must be None or an int >= 1, got {T!r}')
        for label, value in (('e_sop', e_sop), ('e_mac', e_mac), ('e_flop_ann', e_flop_ann)):
            if not float(value) >= 0.:
                raise ValueError(f'{label} must be >= 0 (joules per operation), got {value!r}')
        self.T = T
        self.e_sop, self.e_mac, self.e_flop_ann = float(e_sop), float(e_mac), float(e_flop_ann)
        self._records: Dict[str, _EnergyRecord] = {}
        # every average pool of the network (whatever the filters): their outputs may feed a
        # counted layer, which then counts the pre-pool spikes
        self._pools = [m for m in net.modules() if isinstance(m, AVERAGE_POOL_TYPES)]
        self._pool_handles = []
        self._pool_calls: Dict[int, _PoolRecord] = {}
        self._folds = {}
        self.enable()

    def _on_enable(self):
        for pool in self._pools:
            self._pool_handles.append(pool.register_forward_hook(self._pool_hook))

    def _on_disable(self):
        for handle in self._pool_handles:
            handle.remove()
        self._pool_handles = []
        self._pool_calls = {}

    def _pool_hook(self, pool, args, output):
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        with torch.no_grad():
            self._pool_calls[id(pool)] = (pool, _PoolRecord(pool, args[0], output))

    def _pooled_input(self, x: torch.Tensor):
        for pool, call in self._pool_calls.values():
            if call.feeds(x):
                return pool, call
        return None, None

    def _fold_for(self, pool, module, in_shape):
        key = (id(pool), id(module), in_shape)
        if key not in self._folds:
            try:
                self._folds[key] = _fold(pool, module, in_shape)
            except ValueError as exc:
                self._folds[key] = str(exc)
        return self._folds[key]

    def _hook(self, name, module, args, output):
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        step_mode = getattr(module, 'step_mode', 's')
        with torch.no_grad():
            xb = _batched(module, x, step_mode)
            record = self._records.get(name)
            if record is None:
                record = self._records[name] = _EnergyRecord(module)
            multi = step_mode == 'm' and x.dim() >= 2 and (_conv_dims(module) == 0 or xb.dim() < x.dim())
            if multi:
                record.steps.add(int(x.shape[0]))
                sample_steps = int(x.shape[0]) * int(x.shape[1])
            else:
                sample_steps = int(xb.shape[0]) if xb.dim() >= 2 else 1
            record.sample_steps += sample_steps
            macs = synaptic_flops(module, xb, 's')
            record.macs += macs
            pool, call = self._pooled_input(x)
            fan_out = None if pool is None else self._fold_for(pool, module, call.in_shape)
            dims = 0 if pool is None else _pool_dims(pool)
            if (isinstance(fan_out, torch.Tensor) and _conv_dims(module)
                    and tuple(xb.shape[-dims - 1:]) != call.out_shape[-dims - 1:]):
                fan_out = (f'it reads the pooled {call.out_shape[-dims - 1:]} (channels, size) as '
                           f'{tuple(xb.shape[-dims - 1:])}')
            if isinstance(fan_out, str):
                record.unfolded = (f'its input is the average pool {type(pool).__name__} of '
                                   f'spikes, which cannot be folded into it: {fan_out}')
                fan_out = None
            if fan_out is not None:  # the pool folded into the layer: count the pre-pool spikes
                record.pooled = True
                fan_out = fan_out.to(call.per_position.device)
                record.sops = _add(record.sops, (call.per_position * fan_out).sum())
                channels = call.in_shape[-dims - 1]
                record.spike_macs += sample_steps * channels * int(round(float(fan_out.sum())))
                record.numel += call.numel_in
                record.abs_sum = _add(record.abs_sum, call.abs_sum)
                real = call.real
                record.pooled_real = real if record.pooled_real is None \
                    else record.pooled_real | real.to(record.pooled_real.device)
            else:
                record.spike_macs += macs
                record.numel += x.numel()
                record.abs_sum = _add(record.abs_sum, x.detach().abs().sum(dtype=torch.float64))
                record.sops = _add(record.sops, synaptic_operations(module, xb, 's'))
                real = ~is_spike_valued(x)
            record.real_valued = real if record.real_valued is None \
                else record.real_valued | real.to(record.real_valued.device)

    def reset(self):
        """Forget every count."""
        self._records = {}

    def _steps(self, record: _EnergyRecord) -> int:
        if self.T is not None:
            return self.T
        if len(record.steps) == 1:
            return next(iter(record.steps))
        inferred = {t for r in self._records.values() for t in r.steps}
        return inferred.pop() if len(inferred) == 1 else 1

    def table(self) -> dict:
        """The energy table as data: ``{'layers': [row, ...], 'total': {...}}``.

        Each row (a layer that ran) has ``name, type, input, T, flops, firing_rate, sops,
        sops_eq26, macs, energy_j, mac_reason``, all per sample. ``input`` is ``'spikes'``,
        ``'pooled spikes'`` (an average pool of spikes, folded into the layer: ``sops`` and
        ``firing_rate`` count the pre-pool spikes) or ``'real'`` (counted as MACs; then
        ``mac_reason`` says why, else it is ``None``). ``flops`` are the layer's own MACs per
        step (the ANN reference's). ``total`` has the sums of ``flops, sops, sops_eq26, macs,
        energy_j`` plus ``ann_energy_j`` (Eq. 28) and ``ann_to_snn`` (how many times the ANN
        reference exceeds the SNN estimate).
        """
        rows = []
        for name, record in self._records.items():
            T = self._steps(record)
            samples = record.sample_steps / T
            flops = record.macs / record.sample_steps
            real = bool(record.real_valued)
            fr = float(record.abs_sum) / record.numel if record.numel else 0.
            reason = None
            if real:
                sops = sops_eq26 = 0.
                macs = flops * T
                energy = self.e_mac * macs
                if record.pooled and record.pooled_real is not None and bool(record.pooled_real):
                    reason = ('its input is the average pool of non-integer values (not spikes), '
                              'so folding the pool gives no spike-driven layer')
                elif record.unfolded is not None:
                    reason = record.unfolded
                else:
                    reason = ('its input has non-integer values (not spikes): the data a first '
                              '(encoding) layer reads, or real values computed in between')
            else:
                sops = float(record.sops) / samples
                sops_eq26 = fr * T * (record.spike_macs / record.sample_steps)
                macs = 0.
                energy = self.e_sop * sops
            rows.append(dict(name=name, type=type(record.module).__name__,
                             input='real' if real else ('pooled spikes' if record.pooled else 'spikes'),
                             T=T, flops=flops, firing_rate=fr, sops=sops, sops_eq26=sops_eq26,
                             macs=macs, energy_j=energy, mac_reason=reason))
        keys = ('flops', 'sops', 'sops_eq26', 'macs', 'energy_j')
        total = {key: sum(row[key] for row in rows) for key in keys}
        total['ann_energy_j'] = self.e_flop_ann * total['flops']
        total['ann_to_snn'] = (total['ann_energy_j'] / total['energy_j'] if total['energy_j'] > 0
                               else float('inf'))
        return {'layers': rows, 'total': total}

    def format_table(self) -> str:
        """The table as text, in the spirit of the paper's Table X (ops in M, energy in mJ)."""
        data = self.table()
        header = ('layer', 'type', 'input', 'T', 'FLOPs (M)', 'f_r', 'SOPs (M)', 'Eq.26 SOPs (M)',
                  'MACs (M)', 'energy (mJ)')
        lines = []
        for row in data['layers']:
            lines.append((row['name'] or '(net)', row['type'], row['input'], str(row['T']),
                          f"{row['flops'] / 1e6:.4g}",
                          '-' if row['input'] == 'real' else f"{row['firing_rate']:.4g}",
                          '-' if row['input'] == 'real' else f"{row['sops'] / 1e6:.4g}",
                          '-' if row['input'] == 'real' else f"{row['sops_eq26'] / 1e6:.4g}",
                          f"{row['macs'] / 1e6:.4g}" if row['input'] == 'real' else '-',
                          f"{row['energy_j'] * 1e3:.4g}"))
        total = data['total']
        lines.append(('total (SNN, Eq. 27)', '', '', '', f"{total['flops'] / 1e6:.4g}", '',
                      f"{total['sops'] / 1e6:.4g}", f"{total['sops_eq26'] / 1e6:.4g}",
                      f"{total['macs'] / 1e6:.4g}", f"{total['energy_j'] * 1e3:.4g}"))
        lines.append(('ANN reference (Eq. 28)', '', '', '', f"{total['flops'] / 1e6:.4g}", '', '', '', '',
                      f"{total['ann_energy_j'] * 1e3:.4g}"))
        widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
        out = io.StringIO()

        def write(cells):
            out.write('  '.join(c.ljust(w) if i < 3 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip() + '\n')
        write(header)
        write(tuple('-' * w for w in widths))
        for line in lines[:-2]:
            write(line)
        write(tuple('-' * w for w in widths))
        for line in lines[-2:]:
            write(line)
        out.write(f'per sample; e_sop={self.e_sop:g} J, e_mac={self.e_mac:g} J, '
                  f'e_flop_ann={self.e_flop_ann:g} J\n')
        if any(row['input'] == 'pooled spikes' for row in data['layers']):
            out.write("pooled spikes: an average pool of spikes folded into the layer; SOPs and f_r "
                      "count the pre-pool spikes\n")
        for row in data['layers']:
            if row['mac_reason'] is not None:
                out.write(f"MACs for {row['name'] or '(net)'}: {row['mac_reason']}\n")
        return out.getvalue()

    def print_table(self, file=None):
        """Print :meth:`format_table`."""
        print(self.format_table(), end='', file=file)

    def __str__(self):
        return self.format_table()

    def __repr__(self):
        return f'{type(self).__name__}(layers={self.monitored_layers}, T={self.T}, enabled={self.is_enabled})'


class SpikeLevelHistogram(_ForwardHookMonitor):
    r"""Counts of the outputs of each CF layer at every level :math:`-K_N, \dots, K_P`.

    For the paper's Fig. 8-style trade-off between the number of levels, the accuracy and
    the number of spikes. Each forward call of a monitored layer adds its output's level
    counts (a ``bincount`` on the device, no copy kept).

    Parameters
    ----------
    net : nn.Module
        The network.
    instance : class or tuple of classes, optional
        Default :class:`~spikingjelly_cf.neuron.CFNode`. Other spiking layers work too; their
        levels are ``-k_neg .. k_pos`` if they have these attributes, else ``0, 1``.
    names : str or iterable of str, optional
        Only the modules with these names.

    Examples
    --------
    >>> node = CFNode(step_mode='m')
    >>> with SpikeLevelHistogram(node) as hist:
    ...     _ = node(torch.tensor([[0.5, 2.5, -1.2]]))
    ...     hist.counts()
    {'': {-2: 0, -1: 1, 0: 1, 1: 0, 2: 1}}
    """

    def __init__(self, net: nn.Module, instance: ClassFilter = None, names: Optional[Iterable[str]] = None):
        super().__init__(_select_modules(net, instance, names, (CFNode,), 'CF layer'))
        self._counts: Dict[str, torch.Tensor] = {}
        self.enable()

    @staticmethod
    def _levels(module) -> Tuple[int, int]:
        return int(getattr(module, 'k_neg', 0)), int(getattr(module, 'k_pos', 1))

    def _hook(self, name, module, args, output):
        if not isinstance(output, torch.Tensor):
            return
        k_neg, k_pos = self._levels(module)
        n_levels = k_neg + k_pos + 1
        with torch.no_grad():
            index = (output.detach().round().long() + k_neg).clamp_(0, n_levels - 1).reshape(-1)
            counts = torch.bincount(index, minlength=n_levels)
        self._counts[name] = _add(self._counts.get(name), counts)

    def counts(self) -> Dict[str, Dict[int, int]]:
        """``{name: {level: count}}`` over every forward call since the last reset."""
        result = {}
        for name, module in self._monitored.items():
            if name not in self._counts:
                continue
            k_neg, _ = self._levels(module)
            result[name] = {level - k_neg: int(c) for level, c in enumerate(self._counts[name].tolist())}
        return result

    def spike_count(self) -> Dict[str, int]:
        r"""``{name: \sum |s|}``: spikes weighted by magnitude (a level-2 output counts 2)."""
        return {name: sum(abs(level) * c for level, c in hist.items())
                for name, hist in self.counts().items()}

    def reset(self):
        """Forget every count."""
        self._counts = {}

    def __repr__(self):
        return f'{type(self).__name__}(layers={self.monitored_layers}, enabled={self.is_enabled})'
