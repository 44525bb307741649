r"""The circulate-firing (CF) neuron as a SpikingJelly ``BaseNode`` (docs/method.md, section 1)."""
import copy
import warnings
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron as sj_neuron

from . import _compat, _recompute, _step
from .backends._ops import MEMORY_MODES
from ._validation import check_v_threshold_neg
from .functional.neuron import BACKENDS, cf_multi_step, check_cf_parameters, resolve_backend
from .surrogate import CFRect

__all__ = ['CFNode', 'VARIANTS', 'variant_kwargs', 'replace_neurons']

#: The paper's Fig. 6 variants as ``(k_pos, k_neg)``; ``None`` means "K".
VARIANTS = {'ST': (1, 0), 'DT': (1, 1), 'SCF': (None, 0), 'CF': (None, None)}


def variant_kwargs(name: str, K: int = 2) -> dict:
    """``{'k_pos': ..., 'k_neg': ...}`` of a named variant: ST (single threshold, 1/0),
    DT (double threshold, 1/1), SCF (single-side circulate firing, K/0), CF (K/K).

    >>> variant_kwargs('SCF', K=3)
    {'k_pos': 3, 'k_neg': 0}
    """
    key = str(name).upper()
    if key not in VARIANTS:
        raise ValueError(f'variant must be one of {tuple(VARIANTS)}, got {name!r}')
    k_pos, k_neg = VARIANTS[key]
    return {'k_pos': K if k_pos is None else k_pos, 'k_neg': K if k_neg is None else k_neg}


class CFNode(sj_neuron.BaseNode):
    r"""Circulate-firing neuron: multi-level bipolar firing with soft reset (Eq. 10-13).

    .. math::
        h_t &= (1 - 1/\tau)\,v_{t-1} + x_t
            \quad(\text{decay_input}:\ h_t = v_{t-1} + (x_t - v_{t-1})/\tau) \\
        s_t &= \sum_{k=1}^{K_P} H(h_t - k\theta_P) - \sum_{k=1}^{K_N} H(k\theta_N - h_t) \\
        v_t &= h_t - \theta_P\,n^+_t - \theta_N\,n^-_t

    The output is the signed spike count :math:`s_t \in \{-K_N, \dots, K_P\}` in the input's
    dtype; :math:`H(0) = 1` like every SpikingJelly neuron. Defaults are the paper's setting:
    :math:`k_\tau = 1 - 1/\tau = 0.25`, thresholds :math:`\pm 1`, :math:`K = 2`.

    Several defaults differ from SpikingJelly's ``LIFNode`` (``tau`` 4/3 instead of 2,
    ``decay_input=False``, soft reset, the CFRect surrogate, ``backend='auto'``): the table
    "Defaults that differ from SpikingJelly's LIFNode" in ``docs/guide/neuron.md`` lists each
    with its reason. ``tau``, ``decay_input`` and ``v_threshold`` may be passed by position, in
    ``LIFNode``'s order; everything else is keyword-only (``LIFNode``'s 4th positional
    argument is ``v_reset``: ``CFNode(2., True, 1., None)`` is a ``TypeError``, not a silently
    different neuron).

    Parameters
    ----------
    tau : float
        Membrane time constant, > 1 (default 4/3, decay factor 0.25).
    decay_input : bool
        Whether the input is scaled by :math:`1/\tau` too (SpikingJelly's LIF convention).
    v_threshold : float
        Positive threshold :math:`\theta_P > 0`.
    v_threshold_neg : float or None
        Negative threshold :math:`\theta_N < 0`; ``None`` (default) means ``-v_threshold`` at
        every call: after ``node.v_threshold = 0.5`` the negative threshold is ``-0.5``. An
        explicit value stays fixed when ``v_threshold`` changes.
    k_pos, k_neg : int
        Number of positive (>= 1) and negative (>= 0) levels, :math:`K_P` and :math:`K_N`.
        Named variants: :func:`variant_kwargs` / :meth:`from_variant`.
    surrogate_function : nn.Module or None
        Per-level surrogate: :class:`~spikingjelly_cf.surrogate.CFRect` (default, a fresh
        instance per node), :class:`~spikingjelly_cf.surrogate.TSG`, or a SpikingJelly surrogate.
    detach_reset : bool
        Detach the reset from the graph (then :math:`\partial v_t / \partial h_t = 1`).
    step_mode : str
        ``'s'`` (input ``[N, *]``) or ``'m'`` (input ``[T, N, *]``).
    backend : str
        ``'auto'`` (fastest for the tensor's device), ``'torch'`` (reference), ``'cpp'``
        (compiled CPU kernel, float32/float16/bfloat16), ``'cupy'`` (fused CUDA kernel).
    store_v_seq : bool
        Keep the post-reset potentials in ``self.v_seq`` (``[T, N, *]``; in single-step mode
        the steps since the last reset are appended).
    store_h_seq : bool
        Keep the pre-reset potentials, differentiable, in ``self.h_seq``: ``[T, N, *]`` after a
        multi-step forward, ``[1, N, *]`` (the current step) after a single-step one.
    v_reset : None
        Accepted for SpikingJelly compatibility; CF always soft-resets, anything but ``None``
        is an error.
    memory : str
        What the backward pass keeps per neuron and step. ``'normal'``: the float32 pre-reset
        potential (4 bytes). ``'lean'``: CFRect keeps 1 byte, which level windows :math:`h`
        fell in (gradients bit-identical to ``'normal'``); TSG, Sigmoid and ATan keep 3 bytes,
        the nearest level's index and the float16 offset of :math:`h` from it (gradients within
        about 1e-3 of ``'normal'`` at any threshold). Implemented by the ``'cpp'`` backend;
        elsewhere it runs as ``'normal'`` with a one-time warning. ``store_h_seq=True`` keeps
        the float32 :math:`h` anyway.

    Shape
    -----
    ``step_mode='s'``: ``[N, *] -> [N, *]``; ``step_mode='m'``: ``[T, N, *] -> [T, N, *]``.

    Examples
    --------
    >>> import torch
    >>> from spikingjelly.activation_based import functional
    >>> node = CFNode(step_mode='m')
    >>> node(torch.tensor([[0.5], [2.2], [-1.4]])).flatten().tolist()
    [0.0, 2.0, -1.0]
    >>> functional.reset_net(node)
    """

    def __init__(self, tau: float = 4 / 3, decay_input: bool = False, v_threshold: float = 1.0, *,
                 v_threshold_neg: Optional[float] = None, k_pos: int = 2, k_neg: int = 2,
                 surrogate_function: Optional[nn.Module] = None, detach_reset: bool = False,
                 step_mode: str = 's', backend: str = 'auto', store_v_seq: bool = False,
                 store_h_seq: bool = False, v_reset: Optional[float] = None,
                 memory: str = 'normal'):
        if v_reset is not None:
            raise ValueError(f'v_reset must be None: the CF neuron always soft-resets '
                             f'(Eq. 10), got v_reset={v_reset!r}')
        p = check_cf_parameters(tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                                detach_reset)
        if surrogate_function is None:
            surrogate_function = CFRect()
        elif not callable(surrogate_function):
            raise TypeError(f'surrogate_function must be a callable nn.Module (CFRect, TSG or a '
                            f'SpikingJelly surrogate), got {surrogate_function!r}')
        if step_mode not in ('s', 'm'):
            raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
        if memory not in MEMORY_MODES:
            raise ValueError(f'memory must be one of {MEMORY_MODES}, got {memory!r}')
        super().__init__(v_threshold=p['v_threshold'], v_reset=None,
                         surrogate_function=surrogate_function, detach_reset=detach_reset,
                         step_mode=step_mode, store_v_seq=store_v_seq)
        self.tau = p['tau']
        self.decay_input = p['decay_input']
        self.v_threshold_neg = v_threshold_neg  # None: -v_threshold at every call (property)
        self.k_pos = p['k_pos']
        self.k_neg = p['k_neg']
        self.backend = backend
        self.store_h_seq = store_h_seq
        self.memory = memory
        # Steps seen since the last reset: an int in eager mode (no tensor per step); a step
        # traced by torch.compile makes it a 0-d int64 CPU tensor, so that Dynamo traces one
        # graph for every later step instead of specialising on an integer attribute (TSG reads
        # a_t at this index).
        self.register_memory('step_count', 0)

    # -- construction helpers ------------------------------------------------------------------
    @classmethod
    def from_variant(cls, name: str, K: int = 2, **kwargs) -> 'CFNode':
        """A node of a named variant (``'ST'``, ``'DT'``, ``'SCF'``, ``'CF'``) with ``K`` levels.

        >>> CFNode.from_variant('DT').k_pos, CFNode.from_variant('DT').k_neg
        (1, 1)
        """
        return cls(**variant_kwargs(name, K), **kwargs)

    # -- backends -------------------------------------------------------------------------------
    @property
    def supported_backends(self) -> Tuple[str, ...]:
        return BACKENDS

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str):
        if value not in BACKENDS:
            raise ValueError(f'backend must be one of {BACKENDS}, got {value!r}')
        self._backend = value

    # -- thresholds ---------------------------------------------------------------------------------
    @property
    def v_threshold_neg(self) -> float:
        """The negative threshold :math:`\\theta_N < 0`. Constructed (or set) to ``None``, it is
        ``-v_threshold`` read at every call, so that ``node.v_threshold = 0.5`` moves both
        thresholds; an explicit value stays fixed."""
        value = self._v_threshold_neg
        return -float(self.v_threshold) if value is None else value

    @v_threshold_neg.setter
    def v_threshold_neg(self, value: Optional[float]):
        self._v_threshold_neg = check_v_threshold_neg(value)

    # -- memories that are not SpikingJelly memories -------------------------------------------
    @property
    def store_v_seq(self) -> bool:
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool):
        if not isinstance(value, bool):
            raise TypeError(f'store_v_seq must be a bool, got {value!r}')
        self._store_v_seq = value
        self.__dict__['v_seq'] = None

    @property
    def store_h_seq(self) -> bool:
        return self._store_h_seq

    @store_h_seq.setter
    def store_h_seq(self, value: bool):
        if not isinstance(value, bool):
            raise TypeError(f'store_h_seq must be a bool, got {value!r}')
        self._store_h_seq = value
        self.__dict__['h_seq'] = None

    def reset(self):
        super().reset()
        self.__dict__['v_seq'] = None
        self.__dict__['h_seq'] = None
        self.__dict__.pop('_rerun_h_seq', None)
        self.__dict__['_step_plan'] = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_step_plan'] = None  # rebuilt by the next full step (see spikingjelly_cf._step)
        return state

    def detach(self):
        # Out of place: SpikingJelly's detach_() refuses the state of a kernel backend, a view of
        # the op's output ("Can't detach views in-place").
        self.__dict__['_step_plan'] = None
        for key, value in self._memories.items():
            if isinstance(value, torch.Tensor):
                self._memories[key] = value.detach()
        for name in ('v_seq', 'h_seq'):
            value = self.__dict__.get(name)
            if isinstance(value, torch.Tensor):
                self.__dict__[name] = value.detach()

    def extra_repr(self):
        neg = self.v_threshold_neg
        if self._v_threshold_neg is None:
            neg = f'{neg} (-v_threshold)'
        return (f'tau={self.tau}, decay_input={self.decay_input}, v_threshold={self.v_threshold}, '
                f'v_threshold_neg={neg}, k_pos={self.k_pos}, k_neg={self.k_neg}, '
                f'detach_reset={self.detach_reset}, step_mode={self.step_mode}, '
                f'backend={self.backend}' + (f', memory={self.memory!r}'
                                             if self.memory != 'normal' else ''))

    # -- forward ----------------------------------------------------------------------------------
    def _parameters_dict(self) -> dict:
        return dict(tau=self.tau, decay_input=self.decay_input, v_threshold=self.v_threshold,
                    v_threshold_neg=self.v_threshold_neg, k_pos=self.k_pos, k_neg=self.k_neg,
                    surrogate_function=self.surrogate_function, detach_reset=self.detach_reset)

    def _initial_v(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'{name} must be a torch.Tensor, got {type(x).__name__}')
        if not x.is_floating_point():
            raise TypeError(f'{name} must be a floating-point tensor, got dtype {x.dtype}')
        if not torch.compiler.is_compiling():  # a checkpoint re-run starts from the recorded v
            replayed = _recompute.replayed_v(self)
            if replayed is not None:
                return replayed
        v = self.v
        if isinstance(v, float):
            return torch.full_like(x, v)
        if v.shape != x.shape:
            raise ValueError(
                f'{name} has shape {tuple(x.shape)} per step but the neuron state has shape '
                f'{tuple(v.shape)} from earlier steps; call '
                f'spikingjelly.activation_based.functional.reset_net(net) before a new input shape')
        if v.device != x.device:
            raise ValueError(
                f'{name} is on {x.device} but the neuron state is on {v.device}; move the model '
                f'with .to(device) or call spikingjelly.activation_based.functional.reset_net(net)')
        if v.dtype != x.dtype:
            v = v.to(dtype=x.dtype)
        return v

    def _run(self, x_seq: torch.Tensor, v: torch.Tensor):
        t_start, replay = self.step_count, False
        if not torch.compiler.is_compiling():  # see _recompute: checkpoint recomputation
            t_start, replay = _recompute.before_run(self, v, t_start)
        s_seq, v, h_seq, v_seq = cf_multi_step(
            x_seq, v, **self._parameters_dict(), t_start=t_start,
            return_h_seq=self.store_h_seq, return_v_seq=self.store_v_seq, backend=self.backend,
            memory=self.memory)
        if replay:  # the first run already committed the state
            # the re-run's pre-reset potentials, for a PNBMonitor hook of this call (the re-run
            # must save what the first run saved, even after a reset dropped self.h_seq)
            if h_seq is not None:
                self.__dict__['_rerun_h_seq'] = h_seq
            return s_seq, None, False
        if not torch.compiler.is_compiling():
            self.__dict__.pop('_rerun_h_seq', None)
        if torch.compiler.is_exporting() and _is_fake(v):
            # Non-strict torch.export runs this code on fake tensors: an exported program is a
            # function of its input from a reset state, and torch 2.9 would otherwise leave the
            # fake tensors in the module's memories. (Under Dynamo, v is no FakeTensor; torch
            # 2.9's is_exporting() is wrongly True inside torch.compile too.)
            return s_seq, v_seq, False
        self.v = v
        count = self.step_count  # see __init__
        if torch.compiler.is_compiling():
            if not isinstance(count, torch.Tensor):
                count = torch.tensor(count, dtype=torch.int64)
            self.step_count = count + x_seq.shape[0]
        else:
            self.step_count = int(count) + x_seq.shape[0]
        if self.store_h_seq:
            self.__dict__['h_seq'] = h_seq
        return s_seq, v_seq, True

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            # eager: the lean path of spikingjelly_cf._step when the last step left a plan that
            # still applies (same shapes, parameters, backend, ...); otherwise the full step
            plan = self.__dict__.get('_step_plan')
            if plan is not None:
                s = plan.run(self, x)
                if s is not None:
                    return s
                self.__dict__['_step_plan'] = None
        v = self._initial_v(x, 'x')
        s_seq, v_seq, committed = self._run(x.unsqueeze(0), v)
        if v_seq is not None:
            old = self.__dict__.get('v_seq')
            self.__dict__['v_seq'] = v_seq if old is None else torch.cat((old, v_seq))
        if committed and not torch.compiler.is_compiling():
            # a step that committed its state (not a checkpoint re-run) leaves a plan
            # (the backend this step ran on: resolved again with the same key, so a first-use
            # check has run and its verdict is cached)
            self.__dict__['_step_plan'] = _step.build_plan(
                self, x, self.v, resolve_backend(
                    self.backend, x.unsqueeze(0), self.surrogate_function, k_pos=self.k_pos,
                    k_neg=self.k_neg, detach_reset=self.detach_reset))
        return s_seq[0]

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 1 or x_seq.shape[0] == 0:
            raise ValueError(f"x_seq must be a tensor of shape [T, N, *] with T >= 1 in "
                             f"step_mode='m', got {getattr(x_seq, 'shape', type(x_seq).__name__)}")
        v = self._initial_v(x_seq[0], 'x_seq[t]')
        s_seq, v_seq, _ = self._run(x_seq, v)
        if v_seq is not None:
            self.__dict__['v_seq'] = v_seq
        return s_seq

    def single_step_functional_forward(self, inputs, states, **kwargs):
        """Explicit-state step for SpikingJelly 2.0's functional API: states are ``(v, step_count)``."""
        x = inputs[0]
        v, count = states[0], states[1]
        if isinstance(v, float):
            v = torch.full_like(x, v)
        s_seq, v, _, _ = cf_multi_step(x.unsqueeze(0), v, **self._parameters_dict(),
                                       t_start=count, backend=self.backend, memory=self.memory)
        return (s_seq[0],), (v, count + 1)


def _is_fake(t: torch.Tensor) -> bool:
    # imported here: torch._subclasses.fake_tensor is loaded by export anyway, and importing it
    # with the package would cost every user its import time
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def _default_lif_classes() -> Tuple[type, ...]:
    return (sj_neuron.LIFNode,)


def replace_neurons(net: nn.Module, old: Union[Type[nn.Module], Tuple[Type[nn.Module], ...], None] = None,
                    surrogate_function: Union[nn.Module, Callable[[], nn.Module], str, None] = None,
                    **cf_kwargs) -> nn.Module:
    r"""Replace the ``LIFNode``\ s (or other neurons) of ``net`` by :class:`CFNode`\ s, in place.

    Each new node takes ``tau``, ``decay_input``, ``v_threshold``, ``detach_reset``,
    ``step_mode`` and ``store_v_seq`` from the neuron it replaces (a neuron without ``tau``, like
    ``IFNode``, gets ``tau`` from ``cf_kwargs`` or CF's default). Keywords in ``cf_kwargs``
    (``k_pos``, ``v_threshold_neg``, ``tau``, ``backend``...) override. The CF neuron always
    soft-resets: a hard-reset neuron becomes a soft-reset one (a warning says so once per call).

    The backend is not copied: every new node gets ``backend='auto'`` (the fastest kernel for
    each call's device and dtype) unless ``cf_kwargs`` has ``backend=``. SpikingJelly's backend
    names describe its own implementations: ``'torch'``, the default of 0.0.0.0.14's
    ``LIFNode``, is its ordinary path, where ours is the slow pure-PyTorch reference, and
    ``'cupy'`` asks for the fused GPU path, which ``'auto'`` picks on CUDA.

    Parameters
    ----------
    net : nn.Module
        Model to modify; also returned.
    old : class or tuple of classes
        Neuron classes to replace (default SpikingJelly's ``neuron.LIFNode``).
    surrogate_function : nn.Module, callable, ``'keep'`` or None
        ``None``: a fresh :class:`CFRect` per node. ``'keep'``: a copy of each replaced neuron's
        surrogate. A module: a deep copy per node (so a ``TSG`` gives every layer its own
        parameters). A zero-argument callable: called once per node.

    Examples
    --------
    >>> from spikingjelly.activation_based import neuron, layer
    >>> net = nn.Sequential(layer.Linear(4, 3), neuron.LIFNode(tau=2.))
    >>> net = replace_neurons(net, k_pos=1, k_neg=1)
    >>> type(net[1]).__name__, net[1].tau, net[1].k_neg, net[1].backend
    ('CFNode', 2.0, 1, 'auto')
    """
    old = _default_lif_classes() if old is None else old
    if not isinstance(old, tuple):
        old = (old,)
    hard_reset = []

    def make_surrogate(module):
        if surrogate_function is None:
            return CFRect()
        if isinstance(surrogate_function, str):
            if surrogate_function != 'keep':
                raise ValueError(f"surrogate_function must be None, 'keep', a module or a "
                                 f"callable, got {surrogate_function!r}")
            return copy.deepcopy(module.surrogate_function)
        if isinstance(surrogate_function, nn.Module):
            return copy.deepcopy(surrogate_function)
        if callable(surrogate_function):
            return surrogate_function()
        raise TypeError(f'surrogate_function must be None, a module or a callable, got '
                        f'{surrogate_function!r}')

    def convert(module: nn.Module) -> CFNode:
        kwargs = {}
        if getattr(module, 'tau', None) is not None and not isinstance(module.tau, torch.Tensor):
            kwargs['tau'] = float(module.tau)
        for name in ('decay_input', 'detach_reset', 'step_mode', 'store_v_seq'):
            if hasattr(module, name):
                kwargs[name] = getattr(module, name)
        if hasattr(module, 'v_threshold'):
            kwargs['v_threshold'] = float(module.v_threshold)
        # The replaced neuron's backend is not copied: SpikingJelly's names ('torch', its
        # default; 'cupy', its fused GPU path) describe SpikingJelly's implementations, and our
        # 'torch' is the slow reference. Every converted layer runs 'auto' unless cf_kwargs
        # has backend=.
        if getattr(module, 'v_reset', None) is not None:
            hard_reset.append(module)
        kwargs.update(cf_kwargs)
        kwargs['surrogate_function'] = make_surrogate(module)
        return CFNode(**kwargs)

    def walk(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, old) and not isinstance(child, CFNode):
                setattr(parent, name, convert(child))
            else:
                walk(child)

    if isinstance(net, old):
        raise ValueError('net itself is a neuron; replace_neurons changes the children of a model')
    walk(net)
    if hard_reset:
        warnings.warn(f'replace_neurons: {len(hard_reset)} replaced neuron(s) had hard reset '
                      f'(v_reset={hard_reset[0].v_reset}); CFNode always soft-resets.',
                      UserWarning, stacklevel=2)
    _compat.invalidate_reset_cache(net)
    return net
