r"""The ``@triton.jit`` kernels of backend ``'triton'``: the arithmetic of ``csrc/cf_step.h``.

Imported only by :mod:`.triton` when the backend is first used (importing this module imports
Triton). Whether the kernels run compiled (CUDA) or in Triton's interpreter (CPU tensors, NumPy
semantics) is decided by ``TRITON_INTERPRET`` **when this module is imported**: ``@triton.jit``
reads it while decorating.

Floating-point contract (``csrc/cf_step.h``; identical in compiled and interpreted runs):

* ``h = fl(fl(k * v) + fl(c * x))``: two rounded products and one rounded sum. Every launch
  passes ``enable_fp_fusion=False``, so the compiler emits no FMA (the interpreter never fuses);
* the levels ``float32(j * theta)`` are rounded from double on the host
  (:func:`.triton.levels`) and read from a small float32 tensor;
* ``n_pos = sum_j [h >= level_j]``, ``n_neg = sum_j [h <= level_j]`` (``H(0) = 1``), summed in
  the order ``j = 1, 2, ...``;
* ``v = fl(fl(h - fl(theta_p * n_pos)) - fl(theta_n * n_neg))``.

Storage: float32, float16 or bfloat16; every value is loaded into float32 and all arithmetic and
state is float32 (the saved ``h`` too). bfloat16 tensors are handed to the kernels as ``int16``
views and converted with integer bit operations (round to nearest even, NaN -> ``0x7fc0``, as
PyTorch does), because the interpreter's own float32 -> bfloat16 cast truncates.

Layout: ``[T, N]`` contiguous; one program per ``BLOCK`` neurons, the time loop inside, the
pointers advanced by ``N`` per step (64-bit pointer arithmetic, no ``t * N`` overflow).
"""
import triton
import triton.language as tl

# surrogate kinds: the numbers of cf_step.h / _common.KIND_CODES
RECT: tl.constexpr = tl.constexpr(0)
TSG: tl.constexpr = tl.constexpr(1)
SIGMOID: tl.constexpr = tl.constexpr(2)
ATAN: tl.constexpr = tl.constexpr(3)
PI_2: tl.constexpr = tl.constexpr(1.5707963267948966)

# The kernels call only Triton builtins and the @triton.jit helpers of this module, never
# Triton's own @jit library (tl.zeros, tl.sum, ...): Triton's library is decorated when Triton is
# imported, compiled unless TRITON_INTERPRET=1 was set then, and an interpreted kernel cannot
# call a compiled @jit function. So the reduction is tl.reduce with a combine function: Triton's
# own _sum_combine where it exists (the interpreter recognises it and sums with NumPy), else ours.


@triton.jit
def _add(a, b):
    return a + b


_SUM_COMBINE = getattr(tl.standard, '_sum_combine', _add)


@triton.jit
def _load_f32(ptr, mask, BF16: tl.constexpr):
    """Load storage values as float32 (bfloat16 arrives as int16 bits: exact widening)."""
    if BF16:
        bits = tl.load(ptr, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_f32(ptr, value, mask, BF16: tl.constexpr):
    """Store float32 values in the storage dtype (round to nearest even)."""
    if BF16:
        u = value.to(tl.int32, bitcast=True)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(is_nan, 0x7FC0, rounded)
        tl.store(ptr, bits.to(tl.int16), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _surrogate_grad(KIND: tl.constexpr, xd, alpha, half_width):
    """g(x) of one level (cf_surrogate_grad)."""
    ax = tl.abs(xd)
    if KIND == 0:  # CFRect
        g = tl.where(ax < half_width, alpha, 0.0)
    elif KIND == 1:  # TSG
        y = alpha * (1.0 - alpha * ax)
        g = tl.where(y > 0.0, y, 0.0)
    elif KIND == 2:  # SpikingJelly Sigmoid
        sg = 1.0 / (1.0 + tl.exp(-alpha * xd))
        g = (1.0 - sg) * sg * alpha
    else:  # SpikingJelly ATan
        z = 1.5707963267948966 * alpha * xd
        g = alpha / 2.0 / (1.0 + z * z)
    return g


@triton.jit
def _tsg_psi(xd, a):
    """d n / d a of one level (cf_tsg_psi): x (1 - a|x|) for |x| < 1/a, else 0."""
    ax = tl.abs(xd)
    y = xd * (1.0 - a * ax)
    return tl.where(a * ax < 1.0, y, 0.0)


@triton.jit
def cf_forward_kernel(x_ptr, v0_ptr, lvl_p_ptr, lvl_n_ptr, s_ptr, h_ptr, vseq_ptr, vlast_ptr,
                      T, N, k, c, theta_p, theta_n,
                      K_POS: tl.constexpr, K_NEG: tl.constexpr, SAVE_H: tl.constexpr,
                      SAVE_V: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Forward over all T steps for BLOCK neurons. x, s, v_seq: [T, N]; h: [T, N] float32;
    v0, v_last: [N]; lvl_p [K_POS], lvl_n [max(K_NEG, 1)] float32 levels."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = _load_f32(v0_ptr + offs, mask, BF16)
    xp = x_ptr + offs
    sp = s_ptr + offs
    hp = h_ptr + offs
    vp = vseq_ptr + offs
    for _t in range(T):
        x = _load_f32(xp, mask, BF16)
        h = k * v + c * x  # two rounded products, one rounded sum (no FMA: see the launch)
        n_pos = tl.full((BLOCK,), 0.0, tl.float32)
        for j in tl.static_range(K_POS):
            n_pos += tl.where(h >= tl.load(lvl_p_ptr + j), 1.0, 0.0)
        n_neg = tl.full((BLOCK,), 0.0, tl.float32)
        for j in tl.static_range(K_NEG):
            n_neg += tl.where(h <= tl.load(lvl_n_ptr + j), 1.0, 0.0)
        v = (h - theta_p * n_pos) - theta_n * n_neg
        _store_f32(sp, n_pos - n_neg, mask, BF16)
        if SAVE_H:
            tl.store(hp, h, mask=mask)
        if SAVE_V:
            _store_f32(vp, v, mask, BF16)
        xp += N
        sp += N
        hp += N
        vp += N
    _store_f32(vlast_ptr + offs, v, mask, BF16)


@triton.jit
def cf_backward_kernel(h_ptr, gs_ptr, gh_ptr, gvs_ptr, gvl_ptr, alpha_ptr, lvl_p_ptr, lvl_n_ptr,
                       gx_ptr, gv0_ptr, ga_ptr,
                       T, N, k, c, theta_p, theta_n, hw_p, hw_n, inv_theta_p, inv_theta_n,
                       KIND: tl.constexpr, K_POS: tl.constexpr, K_NEG: tl.constexpr,
                       HAS_GS: tl.constexpr, HAS_GH: tl.constexpr, HAS_GVS: tl.constexpr,
                       HAS_GVL: tl.constexpr, DETACH: tl.constexpr, NEED_GA: tl.constexpr,
                       BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Backward in reverse time for BLOCK neurons (cf_backward_step_k / cf_backward_combine).

    h: [T, N] float32; grad_s, grad_h, grad_v_seq: [T, N] (read only when HAS_*); grad_v_last
    [N]; alpha [T] float32 (0 for CFRect's default heights inv_theta_p / inv_theta_n, the
    float32 1/theta of each side: cf_side_alpha_pos / _neg). Writes grad_x [T, N], grad_v0 [N] and, for TSG with NEED_GA, this
    program's partial sums of dL/da_t into row ``pid`` of ga [num_programs, T] (summed on the host
    afterwards: deterministic, no atomics)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if HAS_GVL:
        carry = _load_f32(gvl_ptr + offs, mask, BF16)
    else:
        carry = tl.full((BLOCK,), 0.0, tl.float32)
    for tt in range(T):
        t = T - 1 - tt
        base = t.to(tl.int64) * N + offs
        h = tl.load(h_ptr + base, mask=mask, other=0.0)
        a = tl.load(alpha_ptr + t)
        if KIND == 0:  # CFRect: its height per side (cf_side_alpha_pos / _neg)
            a_p = tl.where(a == 0.0, inv_theta_p, a)
            a_n = tl.where(a == 0.0, inv_theta_n, a)
        else:
            a_p = a
            a_n = a
        if HAS_GS:
            g_s = _load_f32(gs_ptr + base, mask, BF16)
        else:
            g_s = tl.full((BLOCK,), 0.0, tl.float32)
        if HAS_GVS:
            gv_tot = carry + _load_f32(gvs_ptr + base, mask, BF16)
        else:
            gv_tot = carry
        s_p = tl.full((BLOCK,), 0.0, tl.float32)
        s_n = tl.full((BLOCK,), 0.0, tl.float32)
        p_p = tl.full((BLOCK,), 0.0, tl.float32)
        p_n = tl.full((BLOCK,), 0.0, tl.float32)
        for j in tl.static_range(K_POS):
            xd = h - tl.load(lvl_p_ptr + j)
            s_p += _surrogate_grad(KIND, xd, a_p, hw_p)
            if KIND == 1:
                p_p += _tsg_psi(xd, a)
        for j in tl.static_range(K_NEG):
            xd = tl.load(lvl_n_ptr + j) - h
            s_n += _surrogate_grad(KIND, xd, a_n, hw_n)
            if KIND == 1:
                p_n += _tsg_psi(xd, a)
        if DETACH:
            dv_dh = tl.full((BLOCK,), 1.0, tl.float32)
        else:
            dv_dh = 1.0 - theta_p * s_p + theta_n * s_n
        g_h = g_s * (s_p + s_n) + gv_tot * dv_dh
        if HAS_GH:
            g_h += _load_f32(gh_ptr + base, mask, BF16)
        _store_f32(gx_ptr + base, c * g_h, mask, BF16)
        carry = k * g_h
        if KIND == 1:
            if NEED_GA:
                ga = g_s * (p_p - p_n)
                if not DETACH:
                    ga += gv_tot * (-theta_p * p_p - theta_n * p_n)
                ga = tl.where(mask, ga, 0.0)
                tl.store(ga_ptr + pid.to(tl.int64) * T + t, tl.reduce(ga, 0, _SUM_COMBINE))
    _store_f32(gv0_ptr + offs, carry, mask, BF16)
