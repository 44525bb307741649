r"""Train a spiking ResNet-18 with circulate-firing neurons on CIFAR-10 (the paper's headline setting).

SpikingJelly's own ``spiking_resnet.spiking_resnet18`` built with ``spiking_neuron=neuron.CFNode``
(TSG surrogate, CF K = 2, thresholds +1/-1, decay 0.25) and trained with
``CE + 0.25 * L_pnb`` (Eq. 23) at T = 1, 2 or 4, static images repeated over the time steps
(direct encoding: the first convolution sees real values). The training loop (DDP, AMP,
checkpoints, ``--resume``, summary and figures, robustness evaluation) is shared with the DVS
example in ``examples/common.py``.

Architectures
-------------
- ``--arch resnet18`` (default): the CIFAR variant of ResNet-18 used by the direct-training
  literature (and the paper's Table II): SpikingJelly's ``spiking_resnet18`` with the ImageNet
  stem (7x7 stride-2 convolution + 3x3 max-pooling) replaced by one 3x3 stride-1 convolution,
  so the 32 x 32 image keeps its resolution into ``layer1``; a linear read-out (``fc``) averaged
  over time is Eq. 24.
- ``--arch resnet18-imagenet``: ``spiking_resnet18`` unchanged (for larger images).

Data
----
torchvision's CIFAR-10 in ``--data-dir`` (downloaded when possible), random crop and horizontal
flip for training; ``--fake-data`` uses torchvision's ``FakeData`` (random images, 10 classes)
to run without it. Noise for ``--eval-only --noise ...`` is added to the ``[0, 1]`` images
before normalisation.

Examples
--------
::

    python examples/cifar10.py -T 4                      # the paper's recipe (400 epochs)
    python examples/cifar10.py --fake-data --epochs 1    # smoke test without the dataset
    torchrun --nproc_per_node 4 examples/cifar10.py -T 2 -b 32
    python examples/cifar10.py --compile --backend torch # whole model through torch.compile
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/common.py)

from spikingjelly.activation_based import functional, layer  # noqa: E402

CLASS_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
DEFAULTS = dict(T=4, epochs=400, batch_size=64, weight_decay=1e-4)  # the paper: wd 1e-4 for static data


def build_model(args) -> nn.Module:
    from spikingjelly.activation_based.model import spiking_resnet
    cls, kwargs = common.neuron_spec(args)
    net = spiking_resnet.spiking_resnet18(spiking_neuron=cls, num_classes=10,
                                          zero_init_residual=args.zero_init_residual, **kwargs)
    if args.arch == 'resnet18':  # CIFAR stem: 3x3 stride-1 convolution, no max-pooling
        net.conv1 = layer.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif args.arch != 'resnet18-imagenet':
        raise ValueError(f'unknown --arch {args.arch!r}')
    functional.set_step_mode(net, 'm')
    return net


def build_data(args, dist_):
    import torchvision
    import torchvision.transforms as T
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    test_tf = T.ToTensor()
    if args.fake_data:
        train = torchvision.datasets.FakeData(size=args.fake_train_size, image_size=(3, 32, 32), num_classes=10,
                                              transform=train_tf, random_offset=0)
        test = torchvision.datasets.FakeData(size=args.fake_test_size, image_size=(3, 32, 32), num_classes=10,
                                             transform=test_tf, random_offset=10 ** 6)
        return train, test
    root = args.data_dir
    if dist_.is_main:  # download once
        try:
            torchvision.datasets.CIFAR10(root, train=True, download=True)
            torchvision.datasets.CIFAR10(root, train=False, download=True)
        except Exception as e:
            raise SystemExit(f'CIFAR-10 is not in {os.path.abspath(root)} and could not be downloaded '
                             f'({type(e).__name__}: {e}); put cifar-10-batches-py/ there, or run with '
                             f'--fake-data') from e
    dist_.barrier()
    return (torchvision.datasets.CIFAR10(root, train=True, transform=train_tf),
            torchvision.datasets.CIFAR10(root, train=False, transform=test_tf))


def to_input(x: torch.Tensor, args) -> torch.Tensor:
    """``[B, 3, 32, 32]`` images in ``[0, 1]`` -> normalised, repeated over ``T``: ``[T, B, 3, 32, 32]``."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x.float() - mean) / std
    return x.unsqueeze(0).repeat(args.T, 1, 1, 1, 1)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = parser.add_argument_group('model and data')
    m.add_argument('--arch', choices=('resnet18', 'resnet18-imagenet'), default='resnet18')
    m.add_argument('--zero-init-residual', action='store_true')
    m.add_argument('--data-dir', default=os.path.join('data', 'cifar10'))
    m.add_argument('--fake-data', action='store_true', help="torchvision's FakeData instead of CIFAR-10")
    m.add_argument('--fake-train-size', type=int, default=256)
    m.add_argument('--fake-test-size', type=int, default=128)
    common.add_common_arguments(parser, **DEFAULTS)
    return parser


def main(argv=None) -> dict:
    args = common.parse_arguments(get_parser(), argv)
    if args.T not in (1, 2, 4):
        print(f'note: the paper reports T = 1, 2, 4 on CIFAR-10; running T = {args.T}')
    task = common.Task(name='cifar10', build_model=build_model, build_data=build_data, to_input=to_input,
                       class_names=CLASS_NAMES,
                       data_arguments=('data_dir', 'fake_data', 'fake_train_size', 'fake_test_size'))
    return common.main(task, args)


if __name__ == '__main__':
    main()
