r"""SpikingJelly 2.0's memory optimisation (``activation_based.memopt``) on CF networks.

SpikingJelly 2.0 trains with less memory by checkpointing modules
(:func:`checkpoint_module`, :func:`optimize_memory`) and by storing the first input of a
checkpointed module, usually the spikes of the layer before it, in a compressed form: its
``BooleanSpikeCompressor``, ``BitSpikeCompressor`` and ``SparseSpikeCompressor`` keep only
whether a value is nonzero and ``Uint8SpikeCompressor`` casts to ``uint8``. That is lossless for
binary spikes; CF spikes are signed counts in :math:`\{-K_N, \dots, K_P\}` (docs/method.md, section 6), which
those compressors corrupt without a word (``-1`` becomes ``1`` or ``255``, ``2`` becomes ``1``).

This module adds

* :class:`SignedInt8SpikeCompressor`: stores integer-valued spikes in ``[-128, 127]`` as ``int8``
  (1 byte per element, a quarter of float32), lossless for every CF neuron; it plugs into
  SpikingJelly's interface (a ``SpikeCompressor`` subclass with ``compress``/``decompress``);
* :func:`guard_compressor`: wraps any compressor so that a payload that would not decompress to
  its input raises a ``ValueError`` naming the signed alternative, instead of silently
  corrupting the gradients;
* :func:`checkpoint_module` and :func:`optimize_memory`: SpikingJelly's functions with every
  compressor guarded. :func:`optimize_memory` picks its ``BitSpikeCompressor`` for modules whose
  input was binary in the example forward; a CF network can be binary there and signed later,
  which the guard then reports.

Recomputation is exact for CF neurons: SpikingJelly's checkpoint restores the neuron memories
(``v`` and ``step_count``, so TSG recomputes with the same per-step sharpness) before the
recomputation, so gradients equal the un-checkpointed ones (tested in ``tests/test_memopt.py``).

Needs SpikingJelly >= 2.0 (``memopt`` does not exist in 0.0.0.0.14): :func:`checkpoint_module`
and :func:`optimize_memory` raise ``ImportError`` there; :class:`SignedInt8SpikeCompressor` works
on both lines.

Examples
--------
>>> import torch
>>> c = SignedInt8SpikeCompressor()
>>> packed = c.compress(torch.tensor([-2., 0., 1., 2.]))
>>> packed[0].dtype, c.decompress(packed).tolist()
(torch.int8, [-2.0, 0.0, 1.0, 2.0])
"""
import functools

import torch

__all__ = ['SignedInt8SpikeCompressor', 'guard_compressor', 'GuardedCompressor',
           'checkpoint_module', 'optimize_memory']


def _sj_memopt():
    try:
        from spikingjelly.activation_based import memopt
    except ImportError as exc:
        from . import _compat
        raise ImportError(f'spikingjelly.activation_based.memopt needs SpikingJelly >= 2.0 '
                          f'(installed: {_compat.SPIKINGJELLY_VERSION})') from exc
    return memopt


try:  # SpikingJelly 2.0: plug into its interface
    from spikingjelly.activation_based.memopt import SpikeCompressor as _Base
except ImportError:  # 0.0.0.0.14: same interface, no base class to inherit
    _Base = object


class SignedInt8SpikeCompressor(_Base):
    r"""Store integer-valued (signed) spikes as ``int8``; lossless for CF spikes.

    The signed counterpart of SpikingJelly 2.0's ``Uint8SpikeCompressor``: values must be
    integers in ``[-128, 127]`` (CF spikes lie in ``[-K_N, K_P]``). ``compress`` returns
    ``(int8 tensor, dtype, shape)``; ``decompress`` restores dtype, shape and device.

    Parameters
    ----------
    check : bool
        Verify that every value is an integer in range (one extra pass over the tensor) and
        raise ``ValueError`` otherwise (default). ``False`` skips the pass; out-of-range or
        fractional values are then cast as ``Tensor.to(torch.int8)`` does (wrong).

    Examples
    --------
    >>> import torch
    >>> SignedInt8SpikeCompressor().compress(torch.tensor([0.5]))
    Traceback (most recent call last):
    ...
    ValueError: SignedInt8SpikeCompressor stores integer spikes in [-128, 127]; got a value 0.5 ...
    """

    def __init__(self, check: bool = True):
        if not isinstance(check, bool):
            raise TypeError(f'check must be a bool, got {check!r}')
        self.check = check

    def compress(self, x: torch.Tensor) -> object:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'SignedInt8SpikeCompressor.compress needs a tensor, got '
                            f'{type(x).__name__}')
        if self.check and x.numel():
            if x.is_floating_point():
                bad = (x != torch.round(x)) | (x < -128) | (x > 127)
            else:
                bad = (x < -128) | (x > 127)
            if bool(bad.any()):
                value = x[bad].reshape(-1)[0].item()
                raise ValueError(f'SignedInt8SpikeCompressor stores integer spikes in '
                                 f'[-128, 127]; got a value {value!r} (dtype {x.dtype}): '
                                 f'use no compressor for real-valued inputs')
        return x.to(torch.int8), x.dtype, x.shape

    def decompress(self, packed: object) -> torch.Tensor:
        values, dtype, shape = packed
        return values.to(dtype=dtype).reshape(shape)

    def __repr__(self):
        return f'SignedInt8SpikeCompressor(check={self.check})'


class GuardedCompressor(_Base):
    """A compressor that refuses inputs it would not restore exactly (see :func:`guard_compressor`).

    ``compress`` runs the wrapped compressor, decompresses the payload once and compares it
    with the input; any difference raises ``ValueError`` naming
    :class:`SignedInt8SpikeCompressor`. ``decompress`` is the wrapped one's.
    """

    def __init__(self, compressor):
        if not (callable(getattr(compressor, 'compress', None))
                and callable(getattr(compressor, 'decompress', None))):
            raise TypeError(f'compressor must have compress() and decompress() (a SpikingJelly '
                            f'SpikeCompressor), got {compressor!r}')
        self.compressor = compressor

    def compress(self, x: torch.Tensor) -> object:
        packed = self.compressor.compress(x)
        restored = self.compressor.decompress(packed)
        if restored.shape != x.shape or not torch.equal(restored, x):
            values = torch.unique(x.detach()).flatten()
            shown = values[:8].tolist()
            more = ', ...' if values.numel() > 8 else ''
            name = type(self.compressor).__name__
            raise ValueError(
                f'{name} cannot store this input exactly (values {shown}{more}): it assumes '
                f'binary, non-negative spikes, and CF spikes are signed multi-level counts. '
                f'Use spikingjelly_cf.memopt.SignedInt8SpikeCompressor() (int8, lossless for CF '
                f'spikes) or compressor=None.')
        return packed

    def decompress(self, packed: object) -> torch.Tensor:
        return self.compressor.decompress(packed)

    def __repr__(self):
        return f'GuardedCompressor({self.compressor!r})'


def guard_compressor(compressor):
    """``compressor`` wrapped so that lossy compression raises ``ValueError`` (``None`` stays
    ``None``; :class:`SignedInt8SpikeCompressor` checks its own input and is returned as is).

    The check decompresses every payload once at compression time (one extra pass over the
    tensor in the forward pass, none in the backward pass).
    """
    if compressor is None or isinstance(compressor, (GuardedCompressor,
                                                     SignedInt8SpikeCompressor)):
        return compressor
    return GuardedCompressor(compressor)


def checkpoint_module(module: torch.nn.Module, *, compressor=None, **kwargs) -> torch.nn.Module:
    """SpikingJelly 2.0's ``memopt.checkpoint_module`` with ``compressor`` guarded.

    Same arguments (``chunks``, ``chunked_args``, ``time_dim``); a compressor that would corrupt
    the module's first input (e.g. a bit/bool/uint8 compressor fed CF spikes) raises
    ``ValueError`` in the forward pass instead. Pass ``SignedInt8SpikeCompressor()`` to compress
    CF spikes.
    """
    return _sj_memopt().checkpoint_module(module, compressor=guard_compressor(compressor),
                                          **kwargs)


def guard_model(model: torch.nn.Module) -> int:
    """Guard the compressor of every SpikingJelly checkpoint wrapper in ``model`` in place;
    returns how many were guarded."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    count = 0
    for module in model.modules():
        if not isinstance(module, CheckpointWrapper):
            continue
        fn = module.checkpoint_fn
        keywords = getattr(fn, 'keywords', None)
        if not isinstance(fn, functools.partial) or not keywords \
                or keywords.get('compressor') is None:
            continue
        guarded = guard_compressor(keywords['compressor'])
        if guarded is not keywords['compressor']:
            module.checkpoint_fn = functools.partial(fn.func, *fn.args,
                                                     **{**keywords, 'compressor': guarded})
            count += 1
    return count


def optimize_memory(model: torch.nn.Module, targets, example_forward=None, *, level: int,
                    **kwargs) -> torch.nn.Module:
    """SpikingJelly 2.0's ``memopt.optimize_memory`` followed by :func:`guard_model`.

    SpikingJelly chooses its ``BitSpikeCompressor`` for a module whose input was binary in
    ``example_forward``; CF spikes that are signed later then raise ``ValueError`` instead of
    corrupting the gradients. ``compress=False`` (passed through) disables compression.
    """
    model = _sj_memopt().optimize_memory(model, targets, example_forward, level=level, **kwargs)
    guard_model(model)
    return model
