r"""Surrogate gradients of the circulate-firing neuron (docs/method.md, section 2).

Every surrogate here is a per-level pseudo-derivative :math:`g(x)` of the Heaviside step
:math:`H(x) = 1[x \ge 0]`, where :math:`x` is the signed distance past one firing level:
:math:`x = h - k\theta_P` for the positive levels and :math:`x = k\theta_N - h` for the negative
ones. A CF neuron with :math:`K_P` positive and :math:`K_N` negative levels therefore calls its
surrogate :math:`K_P + K_N` times per step.

Three families are supported everywhere (reference path and fused kernels):

* :class:`CFRect`, the rectangle of Eq. (14), the default of :class:`~spikingjelly_cf.CFNode`;
* :class:`TSG`, the time-step-wise learnable triangle of Eq. (15)-(17);
* SpikingJelly's own ``surrogate.Sigmoid`` and ``surrogate.ATan`` (any other SpikingJelly
  surrogate runs on the reference path, applied per level with its own derivative).

All modules follow SpikingJelly's convention: ``spiking=True`` gives the exact step in the forward
pass, ``spiking=False`` gives the smooth (or piecewise-linear) primitive, which makes a whole node
differentiable for ``torch.autograd.gradcheck``.
"""
import math
import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import base as _sj_base
from spikingjelly.activation_based import surrogate as _sj_surrogate

from . import _recompute

__all__ = ['CFRect', 'TSG', 'heaviside', 'surrogate_spec', 'kernel_kind', 'level_spike', 'KERNEL_SURROGATES']

#: Surrogate kinds the fused kernels implement (see :func:`surrogate_spec`).
KERNEL_SURROGATES = ('CFRect', 'TSG', 'spikingjelly Sigmoid', 'spikingjelly ATan')


def heaviside(x: torch.Tensor) -> torch.Tensor:
    r"""SpikingJelly's step function, :math:`H(x) = 1` if :math:`x \ge 0` else 0, in ``x``'s dtype."""
    return (x >= 0).to(x.dtype)


def _check_real(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a real number, got {value!r} ({type(value).__name__})')
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f'{name} must be finite, got {value}')
    if positive and value <= 0:
        raise ValueError(f'{name} must be > 0, got {value}')
    return value


class _RectSpike(torch.autograd.Function):
    """Forward: :math:`H(x)`; backward: ``height`` :math:`\\cdot 1[|x| < w/2]`."""

    @staticmethod
    def forward(ctx, x, height: float, width: float):
        if x.requires_grad:
            ctx.save_for_backward(x)
            ctx.height = height
            ctx.width = width
        return heaviside(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        g = (x.abs() < ctx.width / 2).to(grad_output.dtype) * ctx.height
        return grad_output * g, None, None


class CFRect(nn.Module):
    r"""Rectangular surrogate of the CF neuron, Eq. (14).

    Per level the pseudo-derivative is

    .. math::
        g(x) = \alpha_\theta \, \mathbb{1}\left[|x| < \tfrac{\theta}{2}\right], \qquad
        \alpha_\theta = 1/\theta \ \text{(default) or the given } \alpha,

    with :math:`\theta = \theta_P` on positive levels and :math:`|\theta_N|` on negative ones. The
    union of the :math:`K` windows of one side is exactly Eq. (14)'s window
    :math:`(\theta/2, (K + 1/2)\theta)`.

    Why the default height is :math:`1/\theta` (docs/method.md, section 2): it is the slope of the
    staircase :math:`s = \lfloor h/\theta \rfloor` whose steps the windows smooth, so
    :math:`\partial v/\partial h = 1 - \theta\alpha_\theta = 0` inside a window and gradients
    through time stay bounded for any threshold. A fixed height 1 (Eq. 14 read literally) gives
    the reset factor :math:`1 - \theta`, whose powers grow exponentially in :math:`T` once
    :math:`\theta > 2` (measured at :math:`\theta = 4`, :math:`\tau = 2`, 32 steps, inputs
    :math:`\mathcal{N}(0, 16)`: the first step's input gradient 41x the last's, against 1.2x with
    :math:`1/\theta`). At the paper's :math:`\theta = 1` both are the same.

    Parameters
    ----------
    alpha : float or None
        ``None`` (default): height :math:`1/\theta_P` on positive levels and :math:`1/|\theta_N|`
        on negative ones. A float > 0: that height on both sides (Eq. 14's :math:`\alpha`).
    spiking : bool
        ``True``: forward is the exact step. ``False``: forward is the primitive
        :math:`\alpha_\theta\,\mathrm{clamp}(x + \theta/2, 0, \theta)`, piecewise linear (from 0
        to 1 with the default height).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([-0.6, -0.2, 0.0, 0.4], requires_grad=True)
    >>> sg = CFRect()
    >>> sg(x, theta=1.0)
    tensor([0., 0., 1., 1.], grad_fn=<_RectSpikeBackward>)
    >>> sg(x, theta=1.0).sum().backward(); x.grad
    tensor([0., 1., 1., 1.])
    >>> x.grad = None; sg(x, theta=2.0).sum().backward(); x.grad  # window |x| < 1, height 1/2
    tensor([0.5000, 0.5000, 0.5000, 0.5000])
    >>> CFRect(alpha=1.0)
    CFRect(alpha=1.0, spiking=True)
    """

    def __init__(self, alpha: Optional[float] = None, spiking: bool = True):
        super().__init__()
        self.alpha = None if alpha is None else _check_real('alpha', alpha, positive=True)
        if not isinstance(spiking, bool):
            raise TypeError(f'spiking must be a bool, got {spiking!r}')
        self.spiking = spiking

    def set_spiking_mode(self, spiking: bool):
        self.spiking = spiking

    def height(self, theta: float) -> float:
        """The window's height on a side with threshold magnitude ``theta``: ``alpha``, or
        ``1/theta`` by default."""
        return 1.0 / theta if self.alpha is None else self.alpha

    def forward(self, x: torch.Tensor, theta: float = 1.0, t: Optional[int] = None) -> torch.Tensor:
        if self.spiking:
            return _RectSpike.apply(x, self.height(theta), theta)
        return self.height(theta) * torch.clamp(x + theta / 2, min=0.0, max=theta)

    def extra_repr(self):
        return f'alpha={self.alpha}, spiking={self.spiking}'


def _triangle_primitive(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    r""":math:`\Phi_a(x)`, the antiderivative of the triangle :math:`\max(0, a(1 - a|x|))`."""
    ax = a * x
    lower = 0.5 * (ax + 1) ** 2
    upper = 1 - 0.5 * (1 - ax) ** 2
    zero = torch.zeros((), dtype=ax.dtype, device=ax.device)
    one = torch.ones((), dtype=ax.dtype, device=ax.device)
    return torch.where(ax < -1, zero, torch.where(ax < 0, lower, torch.where(ax < 1, upper, one)))


class TSG(_sj_base.MemoryModule):
    r"""Time-step-wise learnable surrogate gradient, Eq. (15)-(17).

    A triangle per level whose sharpness :math:`a_t` is learned per layer and per time step:

    .. math::
        g_t(x) = \max\bigl(0,\ a_t (1 - a_t |x|)\bigr), \qquad
        a_t = (a_{max} - a_{min})\,\sigma(p_t) + a_{min},

    which is Eq. (17) with scale :math:`s = a_{max} - a_{min}` and bias :math:`b = a_{min}`;
    :math:`p` is an ``nn.Parameter`` of length ``T``.

    The forward pass is the exact step; the backward pass is that of the triangle's antiderivative
    :math:`\Phi_a` (straight-through estimator), so per level
    :math:`\partial n / \partial a = x (1 - a|x|)` for :math:`|x| < 1/a`, else 0.

    **Which step.** :class:`~spikingjelly_cf.CFNode` passes the step ``t`` itself. SpikingJelly's
    own neurons (``LIFNode``, ``IFNode``, ...) call their surrogate once per time step without
    it; then TSG counts: the ``n``-th call since the last reset uses :math:`a_n`. The count is a
    SpikingJelly memory (``step_count``), so ``functional.reset_net(net)`` restarts it with the
    neuron's state; reset between samples as usual. A sequence longer than ``T`` raises
    ``ValueError``; so does one TSG shared by several neurons (each neuron needs its own TSG:
    pass a deep copy, as SpikingJelly's model zoo does with its ``**kwargs``). The count is a 0-d
    tensor after the first step (``torch.compile`` compiles one graph for every later step),
    ``torch.utils.checkpoint(..., use_reentrant=False)`` re-runs replay the recorded steps, and
    SpikingJelly 2.0's ``memopt`` saves and restores it with the neuron's state. SpikingJelly's
    fused kernels (0.0.0.0.14's ``backend='cupy'``) cannot run TSG and raise ``TypeError``; use
    their ``backend='torch'`` or :class:`~spikingjelly_cf.CFNode`, whose kernels run TSG.

    Parameters
    ----------
    T : int
        Number of learnable steps. ``T = 1`` shares one :math:`a` across all steps (the paper's
        degenerate case; nothing is counted). With ``T > 1`` step ``t`` uses :math:`a_t`; a
        longer sequence is an error, a shorter one uses the first entries.
    alpha_init, alpha_min, alpha_max : float
        Initial value and range of :math:`a_t` (defaults 2.0, 0.5, 3.5; ``a = 2`` was the best
        fixed value in the paper's Table I).
    spiking : bool
        ``False`` makes the forward the primitive :math:`\Phi_a(x)` itself.

    Examples
    --------
    >>> sg = TSG(T=4)
    >>> sg.alpha()
    tensor([2., 2., 2., 2.], grad_fn=<AddBackward0>)
    >>> x = torch.tensor([0.1, -0.1])
    >>> sg(x, t=2)
    tensor([1., 0.], grad_fn=<AddBackward0>)

    In a SpikingJelly neuron, every step trains its own :math:`a_t`:

    >>> from spikingjelly.activation_based import functional, neuron
    >>> lif = neuron.LIFNode(surrogate_function=TSG(T=4), step_mode='m')
    >>> lif(torch.linspace(0., 3., 64).repeat(4, 1)).sum().backward()
    >>> bool((lif.surrogate_function.p.grad != 0).all()), int(lif.surrogate_function.step_count)
    (True, 4)
    >>> functional.reset_net(lif); lif.surrogate_function.step_count
    0
    """

    def __init__(self, T: int, alpha_init: float = 2.0, alpha_min: float = 0.5,
                 alpha_max: float = 3.5, spiking: bool = True):
        super().__init__()
        if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
            raise ValueError(f'T must be an integer >= 1 (the number of time steps), got {T!r}')
        alpha_min = _check_real('alpha_min', alpha_min, positive=True)
        alpha_max = _check_real('alpha_max', alpha_max, positive=True)
        alpha_init = _check_real('alpha_init', alpha_init, positive=True)
        if not alpha_min < alpha_max:
            raise ValueError(f'alpha_min must be < alpha_max, got alpha_min={alpha_min}, alpha_max={alpha_max}')
        if not alpha_min < alpha_init < alpha_max:
            raise ValueError(f'alpha_init must lie strictly between alpha_min={alpha_min} and '
                             f'alpha_max={alpha_max}, got {alpha_init}')
        self.T = int(T)
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.alpha_init = alpha_init
        self.spiking = spiking
        q = (alpha_init - alpha_min) / (alpha_max - alpha_min)
        self.p = nn.Parameter(torch.full((self.T,), math.log(q / (1 - q))))
        # Calls without a step index since the last reset: the int 0 after a reset, then a 0-d
        # int64 tensor (like CFNode.step_count, so that torch.compile does not specialise on it)
        self.register_memory('step_count', 0)
        # the shape of the first such call since the last reset (a second neuron sharing this
        # TSG shows up as another shape)
        self._counted_shape = None

    def set_spiking_mode(self, spiking: bool):
        self.spiking = spiking

    def reset(self):
        """Restart the step count (``functional.reset_net`` calls this)."""
        super().reset()
        self._counted_shape = None

    @property
    def supported_backends(self):
        # TSG has no backend of its own: accept whatever functional.set_backend sets on the
        # network without a warning (SpikingJelly's fused kernels refuse TSG, see cuda_codes)
        return ('torch', 'cupy')

    def _refuse_fused(self, name: str):
        raise TypeError(
            f"TSG has no {name} for SpikingJelly's fused CUDA kernels: run this SpikingJelly "
            f"neuron with backend='torch' (TSG then trains a_t of every step), or use "
            f"spikingjelly_cf.CFNode, whose kernels run TSG on every backend.")

    @property
    def cuda_codes(self):
        """SpikingJelly 0.0.0.0.14's fused kernels read this; TSG refuses them (``TypeError``)."""
        self._refuse_fused('cuda_codes')

    @property
    def cuda_code(self):
        """SpikingJelly's fused kernels read this; TSG refuses them (``TypeError``)."""
        self._refuse_fused('cuda_code')

    def alpha(self) -> torch.Tensor:
        """All :math:`a_t`, shape ``[T]``, differentiable with respect to ``p``."""
        return (self.alpha_max - self.alpha_min) * torch.sigmoid(self.p) + self.alpha_min

    def _too_long(self, t_start, steps: int) -> str:
        return (f'TSG has T={self.T} learnable time steps but the sequence needs steps '
                f'{t_start}..{t_start + steps - 1} (length {t_start + steps}); call '
                f'spikingjelly.activation_based.functional.reset_net(net) between samples, or '
                f'build TSG(T={t_start + steps}).')

    def alpha_steps(self, t_start: Union[int, torch.Tensor], steps: int) -> torch.Tensor:
        r"""The :math:`a_t` of steps ``t_start .. t_start + steps - 1``, shape ``[steps]``.

        ``t_start`` is an ``int`` or a 0-d integer tensor (the step counter of a
        :class:`~spikingjelly_cf.CFNode` after its first step, so that ``torch.compile`` does
        not specialise on it). Raises ``ValueError`` when the steps run past ``T`` (for
        ``T > 1``); inside a compiled graph the same check is a runtime assertion.
        """
        a = self.alpha()
        if self.T == 1:
            return a.expand(steps)
        if not isinstance(t_start, torch.Tensor):
            if t_start + steps > self.T:
                raise ValueError(self._too_long(t_start, steps))
            return a[t_start:t_start + steps]
        if torch.compiler.is_compiling():
            torch._assert_async(t_start + steps <= self.T,
                                f'TSG has T={self.T} learnable time steps but the sequence runs '
                                f'past them; call functional.reset_net(net) between samples')
        elif int(t_start) + steps > self.T:
            raise ValueError(self._too_long(int(t_start), steps))
        # one-hot selection: works with a CPU step counter for parameters on any device
        idx = torch.arange(steps, device=a.device) + t_start
        mask = torch.arange(self.T, device=a.device)[None, :] == idx[:, None]
        return (mask.to(a.dtype) * a).sum(1)

    def _counted_step(self, x: torch.Tensor) -> Union[int, torch.Tensor]:
        """The step of a call without a step index: the calls since the last reset."""
        count = self.step_count
        if not torch.compiler.is_compiling():
            count, replay = _recompute.replayed_state(self, count)
            if replay:  # a checkpoint re-run: the steps of the first run, state left alone
                return count
            shape = tuple(x.shape)
            if self._counted_shape is None:
                self._counted_shape = shape
            elif shape != self._counted_shape:
                raise ValueError(
                    f'TSG was called without a step index with inputs of shape '
                    f'{self._counted_shape} and then {shape} since the last reset: one TSG is '
                    f'shared by several neurons, which would count each other\'s calls as time '
                    f'steps. Give every neuron its own TSG (e.g. copy.deepcopy(tsg)).')
            if int(count) >= self.T:
                raise ValueError(
                    f'TSG has T={self.T} learnable time steps and was called without a step '
                    f'index for the {int(count) + 1}th time since the last reset (a SpikingJelly '
                    f'neuron calls it once per step; a TSG shared by several neurons counts '
                    f'the calls of all). Call spikingjelly.activation_based.functional.'
                    f'reset_net(net) between samples, build TSG(T={int(count) + 1}) or more, or '
                    f'give each neuron its own TSG.')
        start = count if isinstance(count, torch.Tensor) else torch.tensor(count, dtype=torch.int64)
        self.step_count = start + 1
        return count

    def forward(self, x: torch.Tensor, theta: float = 1.0,
                t: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        """Spike :math:`H(x)` with the triangle of step ``t``'s :math:`a_t` as its gradient.

        ``t`` is the step index (what :class:`~spikingjelly_cf.CFNode` passes). Without it
        (SpikingJelly's neurons), the calls since the last reset are counted, see the class
        documentation. ``theta`` is accepted for a common signature with :class:`CFRect`.
        """
        if t is None:
            t = 0 if self.T == 1 else self._counted_step(x)
        a = self.alpha_steps(t, 1)[0].to(x.dtype)
        phi = _triangle_primitive(x, a)
        if not self.spiking:
            return phi
        return heaviside(x).detach() + (phi - phi.detach())

    def extra_repr(self):
        return (f'T={self.T}, alpha_init={self.alpha_init}, alpha_min={self.alpha_min}, '
                f'alpha_max={self.alpha_max}, spiking={self.spiking}')


def level_spike(surrogate_function, x: torch.Tensor, theta: float, t: int) -> torch.Tensor:
    r"""Spike of one firing level: :math:`H(x)` forward, the surrogate's derivative backward.

    ``theta`` is the threshold of that side (used by :class:`CFRect`), ``t`` the absolute step
    index (used by :class:`TSG`). Any other module (a SpikingJelly surrogate) is called as
    ``surrogate_function(x)``.
    """
    if isinstance(surrogate_function, CFRect):
        return surrogate_function(x, theta)
    if isinstance(surrogate_function, TSG):
        return surrogate_function(x, t=t)
    return surrogate_function(x)


#: SpikingJelly surrogate classes the kernels run, by kind.
_SJ_KINDS = tuple((kind, getattr(_sj_surrogate, name)) for kind, name in
                  (('sigmoid', 'Sigmoid'), ('atan', 'ATan')) if hasattr(_sj_surrogate, name))


def _spikingjelly_kind(surrogate_function) -> Optional[str]:
    for kind, cls in _SJ_KINDS:
        if type(surrogate_function) is cls:
            return kind
    return None


def surrogate_spec(surrogate_function, t_start: int, T: int,
                   device: Union[torch.device, str, None] = None
                   ) -> Optional[Tuple[str, Union[float, torch.Tensor]]]:
    r"""What a fused kernel needs to know of a surrogate, or ``None`` if no kernel can run it.

    Returns
    -------
    (kind, alpha)
        ``kind`` is ``'rect'``, ``'tsg'``, ``'sigmoid'`` or ``'atan'``. ``alpha`` is a float, or for
        TSG the differentiable float32 tensor of :math:`a_t` for steps ``t_start .. t_start+T-1``
        (shape ``[T]``, on ``device``), or for :class:`CFRect` with its default height ``None``
        (``1/theta`` per side; the kernels receive it as ``alpha = 0``).
    None
        For a surrogate in ``spiking=False`` mode or of any other class.
    """
    kind = kernel_kind(surrogate_function)
    if kind is None:
        return None
    if kind == 'tsg':
        a = surrogate_function.alpha_steps(t_start, T).float()
        if device is not None:
            a = a.to(device)
        return 'tsg', a
    if kind == 'rect' and surrogate_function.alpha is None:
        return 'rect', None
    return kind, float(surrogate_function.alpha)


def kernel_kind(surrogate_function) -> Optional[str]:
    """``'rect'``, ``'tsg'``, ``'sigmoid'`` or ``'atan'`` when a fused kernel can run this
    surrogate (spiking mode), else ``None``."""
    if not getattr(surrogate_function, 'spiking', True):
        return None
    if isinstance(surrogate_function, CFRect):
        return 'rect'
    if isinstance(surrogate_function, TSG):
        return 'tsg'
    return _spikingjelly_kind(surrogate_function)
