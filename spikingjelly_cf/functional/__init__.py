"""Pure functions of spikingjelly-cf: the CF neuron's multi-step functions, the PNB loss
(SPEC section 3) and the energy estimate (SPEC section 4)."""
from .neuron import *  # noqa: F401,F403
from .neuron import __all__ as _neuron_all

__all__ = list(_neuron_all)
try:  # the PNB and energy modules land separately
    from .pnb import *  # noqa: F401,F403
    from .pnb import __all__ as _pnb_all
    __all__ += list(_pnb_all)
except ImportError:  # pragma: no cover
    pass
try:
    from .energy import *  # noqa: F401,F403
    from .energy import __all__ as _energy_all
    __all__ += list(_energy_all)
except ImportError:  # pragma: no cover
    pass
