"""Pure functions of spikingjelly-cf: the CF neuron's multi-step functions, the PNB loss
(docs/method.md, section 3) and the energy estimate (docs/method.md, section 4)."""
from . import energy, neuron, pnb
from .energy import *  # noqa: F401,F403
from .neuron import *  # noqa: F401,F403
from .pnb import *  # noqa: F401,F403

__all__ = list(neuron.__all__) + list(pnb.__all__) + list(energy.__all__)
