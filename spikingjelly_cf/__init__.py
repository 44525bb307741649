"""spikingjelly-cf: the circulate-firing (CF) neuron, its time-step-wise learnable surrogate
gradient (TSG) and the positive-negative balanced (PNB) loss for SpikingJelly.

Importing this package registers ``CFNode`` in ``spikingjelly.activation_based.neuron`` and
``CFRect`` / ``TSG`` in ``spikingjelly.activation_based.surrogate``, so existing model code can
write ``neuron.CFNode(...)``.
"""
from spikingjelly.activation_based import neuron as _sj_neuron
from spikingjelly.activation_based import surrogate as _sj_surrogate

from . import functional, surrogate
from ._compat import SPIKINGJELLY_VERSION
from .neuron import VARIANTS, CFNode, replace_neurons, variant_kwargs
from .surrogate import TSG, CFRect

__version__ = '0.1.0'

__all__ = ['CFNode', 'CFRect', 'TSG', 'VARIANTS', 'variant_kwargs', 'replace_neurons',
           'functional', 'surrogate', 'SPIKINGJELLY_VERSION', '__version__']

_sj_neuron.CFNode = CFNode
_sj_surrogate.CFRect = CFRect
_sj_surrogate.TSG = TSG

from . import monitor  # noqa: E402
from .monitor import *  # noqa: E402,F401,F403

__all__ += ['monitor'] + list(monitor.__all__)
