"""An exact oracle of the CF neuron in rational arithmetic (``fractions.Fraction``), independent of
the package: docs/method.md, section 1 (charge, H(0) = 1, soft reset) and section 2 (CFRect's window
``|x| < theta/2``, strict), forward and backward, neuron by neuron.

On a dyadic grid (inputs multiples of 1/8, thresholds in {0.5, 1, 2}, decay 1 - 1/tau in
{0.25, 0.5, 0.75}) every float32 and float64 backend computes h and v exactly, so ties with a
level or a window edge are real ties and the results must equal this oracle bit for bit.
"""
from fractions import Fraction
from typing import List, Sequence

Frac = Fraction


def frac(value) -> Fraction:
    """The exact rational of a float (or int/Fraction)."""
    return Fraction(value)


def cf_exact(x: Sequence[Sequence[Fraction]], v0: Sequence[Fraction], *, tau: Fraction,
             decay_input: bool, theta_p: Fraction, theta_n: Fraction, k_pos: int, k_neg: int,
             alpha: Fraction = Fraction(1), detach_reset: bool = False,
             grad_s=None, grad_v_last=None, grad_h=None, grad_v_seq=None) -> dict:
    """Forward (``s``, ``h``, ``v_seq``, ``v_last``) and, when ``grad_s`` is given, the backward
    pass with CFRect(alpha) (``grad_x``, ``grad_v0``) for inputs ``x[t][n]``.

    The incoming gradients are lists like the outputs (``None``: zero).
    """
    T, N = len(x), len(v0)
    k = 1 - 1 / tau
    c = 1 / tau if decay_input else Fraction(1)
    half_p, half_n = theta_p / 2, -theta_n / 2

    def g(dist, half):
        return alpha if abs(dist) < half else Fraction(0)

    s = [[None] * N for _ in range(T)]
    h = [[None] * N for _ in range(T)]
    v_seq = [[None] * N for _ in range(T)]
    ds_dh = [[None] * N for _ in range(T)]
    dv_dh = [[None] * N for _ in range(T)]
    v_last = list(v0)
    for n in range(N):
        v = v0[n]
        for t in range(T):
            ht = k * v + c * x[t][n]
            pos = [ht - j * theta_p for j in range(1, k_pos + 1)]
            neg = [j * theta_n - ht for j in range(1, k_neg + 1)]
            n_pos = sum(1 for d in pos if d >= 0)  # H(0) = 1
            n_neg = sum(1 for d in neg if d >= 0)
            v = ht - theta_p * n_pos - theta_n * n_neg
            h[t][n], s[t][n], v_seq[t][n] = ht, n_pos - n_neg, v
            gp = sum((g(d, half_p) for d in pos), Fraction(0))
            gn = sum((g(d, half_n) for d in neg), Fraction(0))
            ds_dh[t][n] = gp + gn
            dv_dh[t][n] = Fraction(1) if detach_reset else 1 - theta_p * gp - (-theta_n) * gn
        v_last[n] = v
    out = dict(s=s, h=h, v_seq=v_seq, v_last=v_last, ds_dh=ds_dh, dv_dh=dv_dh)
    if grad_s is None:
        return out
    zero_tn = [[Fraction(0)] * N for _ in range(T)]
    grad_h = grad_h or zero_tn
    grad_v_seq = grad_v_seq or zero_tn
    grad_v_last = grad_v_last or [Fraction(0)] * N
    grad_x = [[None] * N for _ in range(T)]
    grad_v0: List[Fraction] = [None] * N
    for n in range(N):
        gv = grad_v_last[n]
        for t in reversed(range(T)):
            gv = gv + grad_v_seq[t][n]
            gh = grad_s[t][n] * ds_dh[t][n] + gv * dv_dh[t][n] + grad_h[t][n]
            grad_x[t][n] = c * gh
            gv = k * gh
        grad_v0[n] = gv
    out.update(grad_x=grad_x, grad_v0=grad_v0)
    return out
