"""Validation of the CF neuron's parameters and tensors, shared by every backend and the module.

User errors are ``TypeError``/``ValueError`` naming the parameter, its value and what is allowed.
Only metadata (types, shapes, dtypes, devices) is checked, never tensor values, so the checks add
no graph break under ``torch.compile``.

Non-finite inputs are not errors. Their policy, the same on every backend: a NaN input (or state)
fires no level (every comparison with NaN is false), so its spike is 0, and h and v become NaN
and stay NaN for the following steps; ``+inf`` fires all ``K_P`` positive levels (``v = +inf``),
``-inf`` all ``K_N`` negative ones (``v = -inf``).
"""
import math
import numbers

import torch

__all__ = ['check_cf_parameters', 'check_v_threshold_neg', 'check_tensors']


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_cf_parameters(tau, decay_input, v_threshold, v_threshold_neg, k_pos, k_neg,
                        detach_reset) -> dict:
    """Validate the CF parameters; returns them normalised (floats, ints, ``theta_n`` filled in).

    Raises ``TypeError``/``ValueError`` naming the parameter, its value and what is allowed.
    """
    if not _is_real(tau):
        raise TypeError(f'tau must be a real number > 1, got {tau!r}')
    if not (math.isfinite(tau) and tau > 1):
        raise ValueError(f'tau must be > 1 (decay factor 1 - 1/tau in (0, 1)), got {tau}')
    if not isinstance(decay_input, bool):
        raise TypeError(f'decay_input must be a bool, got {decay_input!r}')
    if not _is_real(v_threshold):
        raise TypeError(f'v_threshold must be a float > 0, got {v_threshold!r} '
                        f'({type(v_threshold).__name__})')
    if not (math.isfinite(v_threshold) and v_threshold > 0):
        raise ValueError(f'v_threshold must be a finite float > 0, got {v_threshold}')
    v_threshold_neg = check_v_threshold_neg(v_threshold_neg)
    if v_threshold_neg is None:
        v_threshold_neg = -float(v_threshold)
    if not _is_int(k_pos):
        raise TypeError(f'k_pos must be an integer >= 1, got {k_pos!r} ({type(k_pos).__name__})')
    if k_pos < 1:
        raise ValueError(f'k_pos must be >= 1, got {k_pos}')
    if not _is_int(k_neg):
        raise TypeError(f'k_neg must be an integer >= 0, got {k_neg!r} ({type(k_neg).__name__})')
    if k_neg < 0:
        raise ValueError(f'k_neg must be >= 0, got {k_neg}')
    if not isinstance(detach_reset, bool):
        raise TypeError(f'detach_reset must be a bool, got {detach_reset!r}')
    return dict(tau=float(tau), decay_input=decay_input, v_threshold=float(v_threshold),
                v_threshold_neg=float(v_threshold_neg), k_pos=int(k_pos), k_neg=int(k_neg),
                detach_reset=detach_reset)


def check_v_threshold_neg(v_threshold_neg):
    """``None`` (meaning ``-v_threshold``) or a finite float < 0, returned as ``None`` or a float."""
    if v_threshold_neg is None:
        return None
    if not _is_real(v_threshold_neg):
        raise TypeError(f'v_threshold_neg must be a float < 0 or None, got {v_threshold_neg!r} '
                        f'({type(v_threshold_neg).__name__})')
    if not (math.isfinite(v_threshold_neg) and v_threshold_neg < 0):
        raise ValueError(f'v_threshold_neg must be a finite float < 0 (or None for -v_threshold), '
                         f'got {v_threshold_neg}')
    return float(v_threshold_neg)


def check_tensors(x_seq: torch.Tensor, v) -> None:
    """Check ``x_seq`` (a floating tensor ``[T, *]``, ``T >= 1``) and ``v`` (``[*]``, same dtype and
    device); raises ``TypeError``/``ValueError`` naming the argument."""
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f'x_seq must be a torch.Tensor, got {type(x_seq).__name__}')
    if not x_seq.is_floating_point():
        raise TypeError(f'x_seq must be a floating-point tensor (float16/bfloat16/float32/float64), '
                        f'got dtype {x_seq.dtype}')
    if x_seq.dim() < 1 or x_seq.shape[0] < 1:
        raise ValueError(f'x_seq must have shape [T, *] with T >= 1, got {tuple(x_seq.shape)}')
    if not isinstance(v, torch.Tensor):
        raise TypeError(f'v must be a torch.Tensor of shape {tuple(x_seq.shape[1:])}, got {type(v).__name__}')
    if v.shape != x_seq.shape[1:]:
        raise ValueError(f'v must have the shape of one step of x_seq, {tuple(x_seq.shape[1:])}, '
                         f'got {tuple(v.shape)}')
    if v.dtype != x_seq.dtype:
        raise TypeError(f'v must have the dtype of x_seq ({x_seq.dtype}), got {v.dtype}')
    if v.device != x_seq.device:
        raise ValueError(f'v and x_seq must be on one device, got v on {v.device} and x_seq on '
                         f'{x_seq.device}')
