"""Floating-point edge cases shared by the interpreter tests and the GPU tests."""


def fma_sensitive_cases(count=6, seed=0):
    """(v0, x, theta): with k = float32(1 - 1/3), h = fl(fl(k v0) + x) lies just below the level
    theta, while the fused fl(k v0 + x) lands on it: an FMA would fire where the reference does
    not."""
    import numpy as np
    from fractions import Fraction
    rng = np.random.default_rng(seed)
    k = np.float32(1.0 - 1.0 / 3.0)
    found = []
    while len(found) < count:
        v0 = np.float32(rng.uniform(0.5, 2.0))
        x = np.float32(rng.uniform(0.1, 1.0))
        unfused = np.float32(np.float32(k * v0) + x)
        fused = np.float32(Fraction(float(k)) * Fraction(float(v0)) + Fraction(float(x)))
        if unfused < fused:
            found.append((float(v0), float(x), float(fused)))
    return found
