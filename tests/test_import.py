"""Importing the package stays cheap: ``torch._dynamo`` (1.4-1.9 s to import) loads only when
something compiles. The functions Dynamo must treat as constants are still marked for it."""
import subprocess
import sys

import torch

from spikingjelly_cf import _compat, backends
from spikingjelly_cf.functional import neuron as functional_neuron


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_import_does_not_load_dynamo():
    code = ("import sys, spikingjelly.activation_based.neuron\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "import spikingjelly_cf\n"
            "print(before, 'torch._dynamo' in sys.modules)")
    before, after = _run(code).split()
    if before == 'True':  # pragma: no cover - a SpikingJelly release that loads it itself
        return
    assert after == 'False', 'import spikingjelly_cf loaded torch._dynamo'


def test_reference_forward_does_not_load_dynamo():
    """Our own per-call path (validation, backend resolution, TSG) imports no Dynamo either. A
    kernel backend's first call does: PyTorch's ``torch.library.custom_op`` dispatch wraps the
    kernel in ``torch._dynamo.disable`` and imports Dynamo then (once per process)."""
    code = ("import sys, torch, spikingjelly.activation_based.neuron\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "from spikingjelly_cf import CFNode, TSG\n"
            "node = CFNode(step_mode='m', surrogate_function=TSG(3), backend='torch')\n"
            "x = torch.randn(3, 4, requires_grad=True)\n"
            "node(x).sum().backward()\n"
            "print(before, 'torch._dynamo' in sys.modules)")
    before, after = _run(code).split()
    if before == 'True':  # pragma: no cover
        return
    assert after == 'False', 'a CFNode forward/backward on the reference loaded torch._dynamo'


def test_constant_results_marked_like_torch_does():
    """``_compat.assume_constant_result`` marks a function exactly as
    ``torch.compiler.assume_constant_result`` does, without importing Dynamo."""
    def mine():
        return 1

    def theirs():
        return 1

    marked = _compat.assume_constant_result(mine)
    reference = torch.compiler.assume_constant_result(theirs)
    assert marked is mine and reference is theirs
    assert {k: v for k, v in vars(mine).items()} == {k: v for k, v in vars(theirs).items()} != {}
    for fn in (backends.is_available, backends.unavailable_reason, backends._triton_interpreted,
               functional_neuron._warn_once):
        assert vars(fn) == vars(theirs), fn.__name__
