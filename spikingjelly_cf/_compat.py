"""What differs between the SpikingJelly release lines we support (0.0.0.0.14 and 2.0.x), and
torch helpers that keep ``import spikingjelly_cf`` cheap."""
import torch.nn as nn
from spikingjelly.activation_based import base, functional, neuron, surrogate  # noqa: F401

try:
    from importlib.metadata import version as _version
    SPIKINGJELLY_VERSION = _version('spikingjelly')
except Exception:  # pragma: no cover - metadata missing (e.g. source checkout on PYTHONPATH)
    SPIKINGJELLY_VERSION = getattr(__import__('spikingjelly'), '__version__', 'unknown')

#: True on the classic line (0.0.0.0.14): ``BaseNode(..., backend=...)``, ``functional.set_backend``.
CLASSIC = not SPIKINGJELLY_VERSION.startswith(('1.', '2.', '3.'))


def invalidate_reset_cache(net: nn.Module) -> None:
    """SpikingJelly 2.0 caches the module list of ``reset_net``; drop it after swapping modules."""
    fn = getattr(functional, 'invalidate_reset_cache', None)
    if fn is not None:
        fn(net)


def assume_constant_result(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does, without importing
    ``torch._dynamo`` (1-2 s) at import time: Dynamo reads the mark when it traces a call of
    ``fn`` (runs it once, outside the graph, and uses the result as a constant). PyTorch's
    decorator sets exactly this attribute; ``tests/test_import.py`` checks that they agree."""
    fn._dynamo_marked_constant = True
    return fn
