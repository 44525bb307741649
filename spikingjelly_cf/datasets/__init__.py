"""Datasets for spikingjelly-cf examples and tests.

:mod:`spikingjelly_cf.datasets.synthetic_gesture` writes a synthetic DVS128 Gesture set in
SpikingJelly's ``events_np`` layout, read through SpikingJelly's own ``DVS128Gesture`` loader.
"""

from .synthetic_gesture import (  # noqa: F401
    CLASS_NAMES,
    LOADER_CLASS_NAMES,
    NUM_CLASSES,
    frames_by_number,
    generate_sample,
    integrate_frames,
    is_complete,
    loader_target_to_label,
    write_synthetic_gesture,
)

__all__ = ['CLASS_NAMES', 'LOADER_CLASS_NAMES', 'NUM_CLASSES', 'frames_by_number', 'generate_sample',
           'integrate_frames', 'is_complete',
           'loader_target_to_label', 'write_synthetic_gesture']
