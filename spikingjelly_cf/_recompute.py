r"""Exact recomputation of :class:`~spikingjelly_cf.neuron.CFNode` under ``torch.utils.checkpoint``
(docs/method.md, section 6, "Recomputation").

A CF node keeps its membrane potential ``v`` and TSG's step counter ``step_count`` as module
state. ``torch.utils.checkpoint`` re-runs the forward of a checkpointed region during the
backward pass; re-run from the state the first run already advanced, the node computes other
tensors than the ones the gradients need (silently wrong gradients; TSG asks for steps it does
not have) and advances its state a second time. This module lets the re-run start from the
state the first run started from.

How a call is identified (non-reentrant checkpointing, ``use_reentrant=False``):

* During the first run of a checkpointed region, PyTorch's ``_checkpoint_hook`` is the active
  saved-tensor hook; its pack function closes over the region's ``_CheckpointFrame``. Each CF
  call there records the state it starts from (``v`` as a detached alias with the original
  ``requires_grad``, so the re-run saves the same tensors, and ``step_count``) in a list per
  frame and module, in call order.
* During the re-run, ``_recomputation_hook`` is active; its pack function closes over a weak
  reference to the same frame and the id of the backward pass. The n-th call of a module in a
  re-run (counted per frame, module and backward pass) starts from that module's n-th record
  and leaves the module's state (``v``, ``step_count``, ``v_seq``, ``h_seq``) alone. So regions
  may be recomputed in any order (separate regions run in reverse), calls within a region
  replay in forward order (one region around a whole single-step loop), and a second backward
  pass (``retain_graph=True``) counts from the start again.
* Records are keyed weakly by the frame: they are freed with it, i.e. when the backward pass
  has consumed the region's saved tensors or the graph is dropped. Resetting the network does
  not touch them (a backward pass after ``reset_net`` still finds them). Outside checkpointed
  regions, and under ``torch.no_grad()``, nothing is recorded.

A forward that runs inside a backward pass and cannot be identified this way raises a
``RuntimeError`` naming the supported alternatives instead of computing from the wrong state:
``use_reentrant=True`` (its re-run has no frame), a checkpoint nested inside a checkpointed
region, and saved-tensor hooks of one's own pushed inside a checkpointed region.

The same records serve :class:`~spikingjelly_cf.surrogate.TSG` when a SpikingJelly neuron calls it
without a step index: its step counter is recorded and replayed like a CF node's state
(:func:`replayed_state`).

Under ``torch.compile`` none of this runs (the caller checks
``torch.compiler.is_compiling()``): Dynamo traces a checkpoint as a higher-order op whose
state is a graph input.
"""
import inspect
import weakref
from typing import Optional, Tuple

import torch

__all__ = ['replayed_v', 'before_run', 'replayed_state', 'pending_frames']

_CHECKPOINT_PACK = '_checkpoint_hook.__init__.<locals>.pack_hook'
_RECOMPUTE_PACK = '_recomputation_hook.__init__.<locals>.pack_hook'
#: attribute of a recorded ``v`` that carries the step count the recorded call started from
_STEP_ATTR = '_spikingjelly_cf_replay_step'

ALTERNATIVES = ("use torch.utils.checkpoint.checkpoint(..., use_reentrant=False) with one "
                "level of checkpointing, or SpikingJelly 2.0's "
                "spikingjelly.activation_based.memopt.checkpoint_module, which passes neuron "
                "states explicitly")


class _Records:
    """The states the CF calls of one checkpointed region started from."""

    __slots__ = ('calls', 'replayed', '__weakref__')

    def __init__(self):
        self.calls = {}     # module -> [recorded v, ...] in forward order
        self.replayed = {}  # (backward id, module) -> number of calls replayed so far


_records: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()  # frame -> _Records


def _top_hooks():
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except TypeError:  # older signature without ignore_is_tracing
        return torch._C._autograd._top_saved_tensors_default_hooks()


def _closure(fn) -> dict:
    code = getattr(fn, '__code__', None)
    cells = getattr(fn, '__closure__', None) or ()
    if code is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # empty cell
            pass
    return out


def _context() -> Tuple[str, object, object]:
    """Where a forward call runs: ``('plain'|'forward'|'recompute'|'unknown', frame, gid)``.

    ``'forward'``: first run of a non-reentrant checkpointed region; ``'recompute'``: its
    re-run in the backward pass; ``'unknown'``: inside a backward pass but not identifiable;
    ``'plain'``: anything else (nothing to do).
    """
    if not torch.is_grad_enabled():
        return 'plain', None, None
    hooks = _top_hooks()
    in_backward = torch._C._current_graph_task_id() != -1
    if hooks is not None:
        pack = inspect.unwrap(hooks[0])  # the re-run's pack function is wrapped by dynamo.disable
        name = getattr(pack, '__qualname__', '')
        if name == _RECOMPUTE_PACK:
            cells = _closure(pack)
            ref, gid = cells.get('target_frame_ref'), cells.get('gid')
            frame = ref() if callable(ref) else None
            if frame is not None and 'gid' in cells:
                return 'recompute', frame, gid
            return 'unknown', None, None
        if name == _CHECKPOINT_PACK:
            frame = _closure(pack).get('frame')
            if frame is not None and not in_backward:
                return 'forward', frame, None
            return 'unknown', None, None  # a checkpoint opened inside a re-run (nested)
    if in_backward:
        return 'unknown', None, None
    return 'plain', None, None


def _unidentified(module) -> RuntimeError:
    return RuntimeError(
        f'{type(module).__name__}: a forward call runs inside a backward pass (a checkpoint '
        f'recomputation) but cannot be matched to the call of the first forward pass, so it '
        f'would start from the already advanced neuron state and give wrong gradients. This '
        f'happens with torch.utils.checkpoint(..., use_reentrant=True), with a checkpoint '
        f'nested inside a checkpointed region, and with saved_tensors_hooks pushed inside a '
        f'checkpointed region. Instead, {ALTERNATIVES}.')


def replayed_v(module) -> Optional[torch.Tensor]:
    """The ``v`` a re-run call of ``module`` starts from, or ``None`` for a first run.

    Called once per forward call, before the module reads its own state. Raises
    ``RuntimeError`` for a call inside a backward pass that cannot be identified.
    """
    kind, frame, gid = _context()
    if kind == 'plain' or kind == 'forward':
        return None
    if kind == 'unknown':
        raise _unidentified(module)
    records = _records.get(frame)
    calls = None if records is None else records.calls.get(module)
    key = (gid, module)
    index = 0 if records is None else records.replayed.get(key, 0)
    if calls is None or index >= len(calls):
        raise RuntimeError(
            f'{type(module).__name__}: the checkpoint recomputation calls this module more often '
            f'({index + 1}) than the first forward pass of the region did '
            f'({0 if calls is None else len(calls)} recorded calls with gradients enabled); the '
            f'region must run the same calls both times. Otherwise, {ALTERNATIVES}.')
    records.replayed[key] = index + 1
    return calls[index]


def before_run(module, v: torch.Tensor, step_count: int) -> Tuple[int, bool]:
    """``(t_start, replay)`` for a call about to run from ``v``.

    ``v`` from :func:`replayed_v` means a re-run: the recorded step count and ``replay=True``
    (the caller must leave its state alone). In the first run of a checkpointed region the
    starting state is recorded. Otherwise nothing happens.
    """
    step = getattr(v, _STEP_ATTR, None)
    if step is not None:
        return step, True
    kind, frame, _ = _context()
    if kind == 'forward':
        rec = v.detach().requires_grad_(v.requires_grad)
        setattr(rec, _STEP_ATTR, step_count)
        records = _records.get(frame)
        if records is None:
            records = _records[frame] = _Records()
        records.calls.setdefault(module, []).append(rec)
    return step_count, False


def replayed_state(module, state) -> Tuple[object, bool]:
    """``(state, replay)`` for one call of ``module`` whose only state is ``state`` (TSG's
    step counter when a SpikingJelly neuron calls it without a step index).

    In the first run of a checkpointed region ``state`` is recorded and returned; in its
    re-run the n-th call returns the n-th recorded state and ``replay=True`` (the caller must
    leave its state alone). Elsewhere ``(state, False)``. Raises ``RuntimeError`` for a call
    inside a backward pass that cannot be identified.
    """
    kind, frame, gid = _context()
    if kind == 'plain':
        return state, False
    if kind == 'unknown':
        raise _unidentified(module)
    records = _records.get(frame)
    if kind == 'forward':
        if records is None:
            records = _records[frame] = _Records()
        records.calls.setdefault(module, []).append(state)
        return state, False
    calls = None if records is None else records.calls.get(module)
    key = (gid, module)
    index = 0 if records is None else records.replayed.get(key, 0)
    if calls is None or index >= len(calls):
        raise RuntimeError(
            f'{type(module).__name__}: the checkpoint recomputation calls this module more often '
            f'({index + 1}) than the first forward pass of the region did '
            f'({0 if calls is None else len(calls)} recorded calls with gradients enabled); the '
            f'region must run the same calls both times. Otherwise, {ALTERNATIVES}.')
    records.replayed[key] = index + 1
    return calls[index], True


def pending_frames() -> int:
    """Number of checkpointed regions whose records are still held (for tests)."""
    return len(_records)
