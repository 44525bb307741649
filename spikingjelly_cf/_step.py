r"""The lean single-step path of :class:`~spikingjelly_cf.neuron.CFNode` (eager mode).

Driven one call per time step (``step_mode='s'``: recurrent containers, online learning,
streaming inference), a CF layer spends most of its time on work that gives the same answer at
every step: validating the parameters and the tensors, resolving the backend, preparing the
kernel's arguments and dispatching the ``torch.library`` op. A :class:`StepPlan` is that work
done once: :meth:`CFNode.single_step_forward` runs a step in full (every check, the custom op)
and then, in eager mode, keeps a plan built from that step. The next step runs the plan when
everything the full step depended on is unchanged; otherwise it runs in full again (and errs
where the full step errs), which rebuilds the plan.

What a plan checks at every step (a few attribute reads and comparisons):

* the input is a plain, contiguous ``torch.Tensor`` with the shape, dtype and device of the
  step that built the plan (other layouts, e.g. ``channels_last``, run the full step, which
  returns outputs in the input's layout), and the state ``v`` is the very tensor the previous
  step stored (not replaced by the user, :func:`reset_net` or :meth:`CFNode.detach`, which drop
  the plan anyway);
* the node's parameters, backend, memory mode and surrogate (and the surrogate's ``spiking``
  and ``alpha``), and ``torch.are_deterministic_algorithms_enabled()``, equal those the plan was
  built with (:func:`fingerprint`): the backend resolution depends on nothing else (its
  first-use checks of run-time-compiled kernels ran in the full step and are cached per key);
* nothing that intercepts or transforms operators is active: no ``torch.compile``/export
  tracing, no ``TorchDispatchMode`` (fake tensors, op counters), no functorch transform
  (``vmap``/``grad``), and, when gradients are on, no saved-tensor hooks (checkpointing, whose
  re-runs need the bookkeeping of the full path) and no backward pass in progress.

What a plan does: for the ``cpp`` kernel, the kernel's forward (and, for training, backward)
body called directly through a ``torch.autograd.Function``: the same arithmetic, the same
buffers (the saved ``h`` still comes from the backend's pool), no op dispatch. For every other
backend, the backend's multi-step function called with the already validated arguments.

Under ``torch.compile`` none of this runs: the full path is traced (one graph, the op as one
node), as before.
"""
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import backends as _backends
from .backends import _ops
from .backends._common import KIND_CODES, prepare
from .surrogate import TSG

__all__ = ['StepPlan', 'build_plan', 'fingerprint']

_C = torch._C
_deterministic = torch.are_deterministic_algorithms_enabled


def fingerprint(node) -> tuple:
    """Everything a step's result depends on besides ``x`` and the state: the parameters as the
    node holds them, the backend and memory settings and the surrogate with its mode."""
    d = node.__dict__
    sg = node._modules.get('surrogate_function', d.get('surrogate_function'))
    sd = getattr(sg, '__dict__', {})
    return (d.get('tau'), d.get('decay_input'), d.get('v_threshold'), d.get('_v_threshold_neg'),
            d.get('k_pos'), d.get('k_neg'), d.get('detach_reset'), d.get('_backend'),
            d.get('memory'), d.get('_store_v_seq'), d.get('_store_h_seq'), sg,
            sd.get('spiking'), sd.get('alpha'),
            _deterministic())  # 'auto' passes over kernels that are not deterministic then


def _plain(grad: bool) -> bool:
    """Whether nothing intercepts operators here (see the module docstring)."""
    if _C._len_torch_dispatch_stack() or _C._functorch.peek_interpreter_stack() is not None:
        return False
    if grad and (_C._autograd._top_saved_tensors_default_hooks(False) is not None
                 or _C._current_graph_task_id() != -1):
        return False
    return True


class _KernelStep(torch.autograd.Function):
    """One step of a kernel backend: its forward and backward bodies, without the op layer."""

    @staticmethod
    def forward(ctx, x, v, alpha, plan):
        s, v_new, h = plan.forward(x, v, alpha, True)
        ctx.save_for_backward(h, alpha)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        if plan.recycle_h is not None:  # the pooled h goes back once the node is freed
            weakref.finalize(ctx, plan.recycle_h, h)
        return s, v_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s, grad_v):
        h, alpha = ctx.saved_tensors
        plan = ctx.plan
        n = plan.numel
        need_alpha = plan.kind == KIND_CODES['tsg'] and ctx.needs_input_grad[2]
        grad_x, grad_v0, grad_alpha = plan.backward_impl(
            h, alpha, None if grad_s is None else grad_s.reshape(1, n), None, None,
            None if grad_v is None else grad_v.reshape(n), *plan.backward_args, need_alpha,
            plan.dtype)
        return (grad_x.view(plan.shape) if ctx.needs_input_grad[0] else None,
                grad_v0.view(plan.shape) if ctx.needs_input_grad[1] else None,
                grad_alpha if need_alpha else None, None)


class StepPlan:
    """A single step of one :class:`CFNode` with everything but ``x`` and ``v`` fixed."""

    __slots__ = ('key', 'shape', 'numel', 'dtype', 'device', 'v', 'tsg', 'alpha', 'kind',
                 'forward_impl', 'backward_impl', 'recycle_h', 'step_forward', 'forward_args',
                 'backward_args', 'params', '__weakref__')

    def forward(self, x, v, alpha, save_h: bool):
        """``(s, v_new, h)`` of one step on contiguous ``x``, ``v`` of the plan's shape (``h``
        the tensor saved for the backward pass, or ``None``)."""
        if self.step_forward is not None:
            return self.step_forward(x, v, alpha, *self.forward_args, save_h)
        n = self.numel
        s, v_last, h, _ = self.forward_impl(x.view(1, n), v.view(n), alpha, *self.forward_args,
                                            save_h, False, False)
        return s.view(self.shape), v_last.view(self.shape), h if save_h else None

    def run(self, node, x) -> Optional[Tensor]:
        """The step's spikes, with the node's state advanced; ``None`` when the plan does not
        apply to this call (the caller then runs the full step)."""
        mem = node._memories
        v = mem['v']
        if (v is not self.v or type(x) is not Tensor or x.shape != self.shape
                or x.dtype is not self.dtype or x.device != self.device
                or not x.is_contiguous()):  # other layouts: the full step keeps them
            return None
        if self.key != fingerprint(node):
            return None
        count = mem['step_count']
        if type(count) is not int:
            return None
        grad = _C.is_grad_enabled()
        if not _plain(grad):
            return None
        sg = self.tsg
        if sg is not None:
            alpha = sg.alpha_steps(count, 1).float()
            need = grad and (x.requires_grad or v.requires_grad or alpha.requires_grad)
        else:
            alpha = self.alpha
            need = grad and (x.requires_grad or v.requires_grad)
        if self.params is not None:  # no kernel body to call: the backend's multi-step function
            s, v_new, _, _ = self.params[0](x.unsqueeze(0), v, t_start=count, **self.params[1])
            s = s[0]
        elif need:
            s, v_new = _KernelStep.apply(x, v, alpha, self)
        else:
            s, v_new, _ = self.forward(x, v, alpha, False)
        mem['v'] = v_new
        mem['step_count'] = count + 1
        self.v = v_new
        return s


def build_plan(node, x: Tensor, v_new: Tensor, backend: str) -> Optional[StepPlan]:
    """A plan for the next steps of ``node`` after a full step on ``x`` that ran on ``backend``
    (resolved) and stored ``v_new``; ``None`` where the lean path does not apply."""
    if (type(x) is not Tensor or type(v_new) is not Tensor or node.store_v_seq
            or node.store_h_seq or not x.is_contiguous() or not v_new.is_contiguous()
            or v_new.shape != x.shape or v_new.dtype != x.dtype or v_new.device != x.device
            or not _plain(_C.is_grad_enabled())):
        return None
    with torch.no_grad():  # nothing here belongs to the graph (or to a checkpoint's records)
        return _build(node, x, v_new, backend)


def _build(node, x: Tensor, v_new: Tensor, backend: str) -> StepPlan:
    plan = StepPlan()
    plan.key = fingerprint(node)
    plan.shape, plan.numel, plan.dtype, plan.device = x.shape, x.numel(), x.dtype, x.device
    plan.v = v_new
    sg = node.surrogate_function
    params = node._parameters_dict()
    plan.tsg = sg if isinstance(sg, TSG) else None
    plan.forward_impl = plan.backward_impl = plan.recycle_h = plan.step_forward = None
    plan.alpha = plan.kind = plan.params = None
    impls = _ops.kernel_impls(backend)
    if impls is None or x.device.type != 'cpu' or node.memory != 'normal':
        # the backend's own multi-step function with the validated arguments
        extra = {'memory': node.memory} if getattr(_backends.get(backend), 'supports_memory_lean',
                                                   False) else {}
        plan.params = (_backends.get(backend), dict(params, return_h_seq=False,
                                                    return_v_seq=False, **extra))
        return plan
    call = prepare(backend, x.detach().unsqueeze(0), v_new.detach(), t_start=0, **params)
    plan.forward_impl, plan.backward_impl, plan.recycle_h, _, plan.step_forward = impls
    plan.kind = KIND_CODES[call.kind]
    plan.alpha = None if plan.tsg is not None else call.alpha.reshape(1)
    plan.forward_args = (plan.kind, call.k, call.c, call.theta_p, call.theta_n, call.k_pos,
                         call.k_neg)
    plan.backward_args = (plan.kind, call.k, call.c, call.theta_p, call.theta_n, call.k_pos,
                          call.k_neg, call.detach_reset)
    return plan
