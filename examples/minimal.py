"""spikingjelly-cf in one page: build a CF network, train it with the paper's loss
(cross-entropy + 0.25 * PNB), compile it, report accuracy and spikes.  python examples/minimal.py"""
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import spikingjelly_cf  # registers neuron.CFNode, surrogate.TSG and surrogate.CFRect
from spikingjelly_cf import PNBMonitor, SpikeLevelHistogram

torch.manual_seed(0)
T, B = 4, 64
net = torch.nn.Sequential(
    layer.Linear(16, 64),
    neuron.CFNode(surrogate_function=surrogate.TSG(T)),  # K=2 levels each side, thresholds +-1
    layer.Linear(64, 4))
functional.set_step_mode(net, 'm')                       # inputs are [T, B, ...]

x = torch.rand(T, B, 16)                                 # a toy task: which block of 4 inputs
y = x.mean(0).view(B, 4, 4).sum(-1).argmax(-1)           # has the largest sum
optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
with PNBMonitor(net) as pnb:
    for step in range(40):
        loss = F.cross_entropy(net(x).mean(0), y) + 0.25 * pnb.loss()   # Eq. 23
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        functional.reset_net(net)                        # between samples, as for any SJ neuron
        if step % 10 == 0:
            print(f'step {step:2d}  loss {loss.item():.3f}')

compiled = torch.compile(net)                            # the CF kernel is one graph node
with torch.no_grad(), SpikeLevelHistogram(net) as hist:
    accuracy = (compiled(x).mean(0).argmax(-1) == y).float().mean().item()
functional.reset_net(net)
print(f'training accuracy after 40 steps: {accuracy:.1%}')
print('spike levels of the CF layer:', hist.counts())
