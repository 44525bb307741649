/*
 * cf_step.h -- the per-neuron arithmetic of the circulate-firing (CF) neuron.
 *
 * This header is the single source of truth for one time step of one neuron
 * (charge, multi-level fire, soft reset) and for the matching backward step,
 * as written in docs/architecture.md and docs/method.md, sections 1-2.  It is plain C99 so
 * that it is accepted unchanged by
 *   - gcc / clang for the CPU extension (csrc/cf_cpu.c),
 *   - nvcc and NVRTC for the CUDA kernels (csrc/cf_kernel.cuh, included
 *     textually by backends/source.py into the string CuPy compiles).
 * It includes no header under NVRTC (math functions are built in there).
 *
 * Floating-point contract (so that every backend fires exactly like the
 * PyTorch reference `cf_multi_step_ref` in float32):
 *   h     = fl(fl(k * v) + fl(c * x))         (two products, one sum; no FMA)
 *   level = float32(j * theta)                (product in double, then rounded:
 *                                              what `h - j * v_threshold` does
 *                                              in PyTorch with Python floats)
 *   n_pos = sum_j [h >= level_p(j)],  n_neg = sum_j [h <= level_n(j)]   (H(0) = 1)
 *   v     = fl(fl(h - fl(theta_p * n_pos)) - fl(theta_n * n_neg))
 * On the device the products and sums use the __f*_rn intrinsics, which the
 * compiler never contracts into FMAs; the CPU extension is built with
 * -ffp-contract=off.
 */
#ifndef SPIKINGJELLY_CF_STEP_H
#define SPIKINGJELLY_CF_STEP_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CF_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define CF_HD static inline
#endif

/* Rounded float32 operations that are never fused into an FMA. */
#if defined(__CUDA_ARCH__)
#define CF_MUL(a, b) __fmul_rn((a), (b))
#define CF_ADD(a, b) __fadd_rn((a), (b))
#define CF_SUB(a, b) __fsub_rn((a), (b))
#else
#define CF_MUL(a, b) ((a) * (b))
#define CF_ADD(a, b) ((a) + (b))
#define CF_SUB(a, b) ((a) - (b))
#endif

/* Surrogate kinds (backends/source.py and backends/cpp.py use the same numbers). */
#define CF_RECT 0    /* CFRect, Eq. 14: height * 1[|x| < theta/2] (cf_rect_height_*)   */
#define CF_TSG 1     /* TSG, Eq. 15-17: max(0, a * (1 - a|x|)), a learnable per step  */
#define CF_SIGMOID 2 /* SpikingJelly Sigmoid: alpha * sig(alpha x) * (1 - sig(alpha x)) */
#define CF_ATAN 3    /* SpikingJelly ATan: alpha / 2 / (1 + (pi/2 * alpha * x)^2)       */

#define CF_PI_2 1.57079632679489661923f

/* CFRect's alpha for its default height (docs/method.md, section 2): 1/theta_p on positive levels,
 * 1/|theta_n| on negative ones.  Any alpha > 0 is the height on both sides. */
#define CF_RECT_DEFAULT_HEIGHT 0.0f

/* Everything that is constant over a call. */
typedef struct cf_params {
    float k;          /* 1 - 1/tau: d h_t / d v_{t-1}                          */
    float c;          /* 1/tau if decay_input else 1: d h_t / d x_t            */
    float theta_p;    /* float32(theta_p) > 0                                  */
    float theta_n;    /* float32(theta_n) < 0                                  */
    double theta_p_d; /* the same thresholds in double, to round the levels    */
    double theta_n_d;
    float inv_theta_p; /* float32(1 / theta_p), float32(1 / |theta_n|) in double: CFRect's     */
    float inv_theta_n; /* default heights, rounded like PyTorch's tensor-times-Python-float  */
    int k_pos;        /* K_P >= 1 */
    int k_neg;        /* K_N >= 0 */
    int detach_reset; /* 1: d v / d h = 1 in the backward pass                 */
} cf_params;

/* The call's constants from the launcher's arguments (thresholds arrive as doubles so that the
 * levels round like PyTorch's tensor-minus-Python-float). */
CF_HD cf_params cf_make_params(float k, float c, double theta_p, double theta_n, int k_pos,
                               int k_neg, int detach_reset)
{
    cf_params p;
    p.k = k;
    p.c = c;
    p.theta_p = (float)theta_p;
    p.theta_n = (float)theta_n;
    p.theta_p_d = theta_p;
    p.theta_n_d = theta_n;
    p.inv_theta_p = (float)(1.0 / theta_p);
    p.inv_theta_n = (float)(-1.0 / theta_n);
    p.k_pos = k_pos;
    p.k_neg = k_neg;
    p.detach_reset = detach_reset;
    return p;
}

/* Level j (1-based) on one side: float32(j * theta). */
CF_HD float cf_level(int j, double theta_d)
{
    return (float)((double)j * theta_d);
}

/* The alpha cf_surrogate_grad takes on each side: for CFRect its height there (the given
 * alpha, or by default 1/theta of that side), for the other kinds alpha itself. */
CF_HD float cf_side_alpha_pos(int kind, float alpha, const cf_params *p)
{
    return (kind == CF_RECT && alpha == CF_RECT_DEFAULT_HEIGHT) ? p->inv_theta_p : alpha;
}
CF_HD float cf_side_alpha_neg(int kind, float alpha, const cf_params *p)
{
    return (kind == CF_RECT && alpha == CF_RECT_DEFAULT_HEIGHT) ? p->inv_theta_n : alpha;
}

/* Surrogate derivative g(x) of H at x = signed distance past one level.
 * half_width is theta/2 of that side (only CFRect uses it); alpha is that side's
 * cf_side_alpha_*: CFRect's height, the surrogate's alpha, or a_t for TSG. */
CF_HD float cf_surrogate_grad(int kind, float x, float alpha, float half_width)
{
    float ax = fabsf(x);
    if (kind == CF_RECT) {
        return ax < half_width ? alpha : 0.0f;
    } else if (kind == CF_TSG) {
        const float y = alpha * (1.0f - alpha * ax);
        return y > 0.0f ? y : 0.0f; /* fmaxf(0, y) without a libm call */
    } else if (kind == CF_SIGMOID) {
        float sg = 1.0f / (1.0f + expf(-alpha * x));
        return (1.0f - sg) * sg * alpha;
    } else { /* CF_ATAN */
        float z = CF_PI_2 * alpha * x;
        return alpha / 2.0f / (1.0f + z * z);
    }
}

/* TSG: d n / d a of one level, psi(x; a) = x * (1 - a|x|) for |x| < 1/a, else 0. */
CF_HD float cf_tsg_psi(float x, float a)
{
    const float ax = fabsf(x);
    const float y = x * (1.0f - a * ax); /* computed unconditionally: a select, no branch */
    return a * ax < 1.0f ? y : 0.0f;
}

/* ------------------------------------------------------------------ forward */
/* The primitives below are the whole forward arithmetic.  cf_forward_step_k
 * composes them for one neuron: the CUDA kernels call it, and so does the CPU
 * kernel with literal K (its fixed-K specialisations, where gcc unrolls the
 * level loops and vectorises the loop over neurons).  For other K the CPU
 * kernel applies the same primitives level by level to a block of neurons.
 * Counts are summed over levels j = 1, 2, ... in that order everywhere. */

/* Charge: h_t = k * v_{t-1} + c * x_t. */
CF_HD float cf_charge(float v_prev, float x, const cf_params *p)
{
    return CF_ADD(CF_MUL(p->k, v_prev), CF_MUL(p->c, x));
}

/* H(h - level) for a positive level, H(level - h) for a negative one (H(0) = 1). */
CF_HD float cf_fire_pos(float h, float level) { return h >= level ? 1.0f : 0.0f; }
CF_HD float cf_fire_neg(float h, float level) { return h <= level ? 1.0f : 0.0f; }

/* Soft reset: v_t = h_t - theta_p * n_pos - theta_n * n_neg. */
CF_HD float cf_reset(float h, float n_pos, float n_neg, const cf_params *p)
{
    return CF_SUB(CF_SUB(h, CF_MUL(p->theta_p, n_pos)), CF_MUL(p->theta_n, n_neg));
}

typedef struct cf_fwd_out {
    float h;     /* charged (pre-reset) potential h_t */
    float n_pos; /* positive levels crossed           */
    float n_neg; /* negative levels crossed           */
    float v;     /* post-reset potential v_t          */
} cf_fwd_out;

/* One step of one neuron with K_P = k_pos, K_N = k_neg levels: s_t = n_pos - n_neg.
 * (The CPU kernel passes literal k_pos/k_neg for its fixed-K specialisations.) */
CF_HD cf_fwd_out cf_forward_step_k(float v_prev, float x, const cf_params *p, int k_pos, int k_neg)
{
    cf_fwd_out o;
    int j;
    o.h = cf_charge(v_prev, x, p);
    o.n_pos = 0.0f;
    for (j = 1; j <= k_pos; ++j)
        o.n_pos += cf_fire_pos(o.h, cf_level(j, p->theta_p_d));
    o.n_neg = 0.0f;
    for (j = 1; j <= k_neg; ++j)
        o.n_neg += cf_fire_neg(o.h, cf_level(j, p->theta_n_d));
    o.v = cf_reset(o.h, o.n_pos, o.n_neg, p);
    return o;
}

/* One step of one neuron: s_t = n_pos - n_neg. */
CF_HD cf_fwd_out cf_forward_step(float v_prev, float x, const cf_params *p)
{
    return cf_forward_step_k(v_prev, x, p, p->k_pos, p->k_neg);
}

/* ----------------------------------------------------------------- backward */
/* Per level: x = h - level (positive side) or level - h (negative side);
 *   Sp = sum_j g(x_pos_j), Sn = sum_j g(x_neg_j)      (half width theta/2 and, for CFRect,
 *                                                      height cf_side_alpha_* per side)
 *   Pp = sum_j psi(x_pos_j; a_t), Pn = sum_j psi(x_neg_j; a_t)      (TSG only)
 * then cf_backward_combine turns the four sums into the gradients. */

CF_HD float cf_dist_pos(float h, float level) { return CF_SUB(h, level); }
/* CFRect's window half width on each side: theta_p / 2 and |theta_n| / 2. */
CF_HD float cf_half_width_pos(const cf_params *p) { return 0.5f * p->theta_p; }
CF_HD float cf_half_width_neg(const cf_params *p) { return -0.5f * p->theta_n; }
CF_HD float cf_dist_neg(float h, float level) { return CF_SUB(level, h); }

typedef struct cf_bwd_out {
    float grad_x;      /* c * gh                                    */
    float grad_v_prev; /* k * gh: the carry into step t-1           */
    float grad_alpha;  /* TSG only: this neuron's part of dL/d a_t  */
} cf_bwd_out;

/*   gv_tot = carry from step t+1 + dL/dv_t from v_seq (+ dL/dv_last at t = T-1)
 *   dv_dh  = 1 if detach_reset else 1 - theta_p * Sp - |theta_n| * Sn
 *   gh     = grad_s * (Sp + Sn) + gv_tot * dv_dh + grad_h
 *   grad_a = grad_s * (Pp - Pn) + (0 if detach_reset else gv_tot * (-theta_p Pp - theta_n Pn)) */
CF_HD cf_bwd_out cf_backward_combine(int kind, float sp, float sn, float pp, float pn,
                                     float grad_s, float gv_tot, float grad_h,
                                     const cf_params *p)
{
    cf_bwd_out o;
    float dv_dh = p->detach_reset ? 1.0f : 1.0f - p->theta_p * sp + p->theta_n * sn;
    float gh = grad_s * (sp + sn) + gv_tot * dv_dh + grad_h;
    o.grad_x = p->c * gh;
    o.grad_v_prev = p->k * gh;
    o.grad_alpha = 0.0f;
    if (kind == CF_TSG) {
        o.grad_alpha = grad_s * (pp - pn);
        if (!p->detach_reset)
            o.grad_alpha += gv_tot * (-p->theta_p * pp - p->theta_n * pn);
    }
    return o;
}

/* One reverse step of one neuron at time t (alpha = a_t for TSG, CF_RECT_DEFAULT_HEIGHT for
 * CFRect's default) with K_P = k_pos, K_N = k_neg.  kind is a compile-time constant in every
 * caller, so the branches fold. */
CF_HD cf_bwd_out cf_backward_step_k(int kind, float h, float grad_s, float gv_tot, float grad_h,
                                    float alpha, const cf_params *p, int k_pos, int k_neg)
{
    float sp = 0.0f, sn = 0.0f, pp = 0.0f, pn = 0.0f;
    const float hw_p = cf_half_width_pos(p), hw_n = cf_half_width_neg(p);
    const float al_p = cf_side_alpha_pos(kind, alpha, p), al_n = cf_side_alpha_neg(kind, alpha, p);
    int j;
    for (j = 1; j <= k_pos; ++j) {
        float xd = cf_dist_pos(h, cf_level(j, p->theta_p_d));
        sp += cf_surrogate_grad(kind, xd, al_p, hw_p);
        if (kind == CF_TSG)
            pp += cf_tsg_psi(xd, alpha);
    }
    for (j = 1; j <= k_neg; ++j) {
        float xd = cf_dist_neg(h, cf_level(j, p->theta_n_d));
        sn += cf_surrogate_grad(kind, xd, al_n, hw_n);
        if (kind == CF_TSG)
            pn += cf_tsg_psi(xd, alpha);
    }
    return cf_backward_combine(kind, sp, sn, pp, pn, grad_s, gv_tot, grad_h, p);
}

/* One reverse step of one neuron at time t. */
CF_HD cf_bwd_out cf_backward_step(int kind, float h, float grad_s, float gv_tot, float grad_h,
                                  float alpha, const cf_params *p)
{
    return cf_backward_step_k(kind, h, grad_s, gv_tot, grad_h, alpha, p, p->k_pos, p->k_neg);
}

/* ------------------------------------------------------- memory-lean saving */
/* What the backward pass reads per neuron and step can be smaller than the
 * float32 h (memory='lean'):
 *   - CFRect needs only how many levels' windows |x| < theta/2 contain h, on
 *     each side: one byte, the positive count in the low nibble and the
 *     negative count in the high nibble (K_P, K_N <= 15).  The backward pass
 *     then adds each side's height that many times, which is exactly the
 *     float32 sum cf_backward_step_k forms (the other levels add 0.0f), so the
 *     gradients are bit-identical.
 *   - The smooth surrogates (TSG, Sigmoid, ATan) need the distances x of h to
 *     the levels, whose windows are absolute (about 1/a wide): h itself in
 *     16 bits would lose them at large thresholds (float16 keeps h to 2^-11 of
 *     |h|, i.e. 5 at h = 1e4).  So three bytes are kept: the index m of the
 *     level nearest to h (the rest point 0 counts as level 0; a signed byte,
 *     K_P, K_N <= 127) and the offset d = h - level_m as IEEE half (binary16,
 *     round to nearest even).  The backward pass forms every distance from
 *     them, x = (level_m - level_j) + d (cf_dist_*_offset), so each x is
 *     within 2^-11 |d| <= 2^-11 |x| (plus float32 rounding) of the normal
 *     mode's h - level_j, for any threshold. */
#define CF_LEAN_MAX_K 15
#define CF_LEAN_MAX_K_OFFSET 127

/* The window code of h (CFRect): low nibble positive windows, high nibble negative ones. */
CF_HD unsigned char cf_window_code_k(float h, const cf_params *p, int k_pos, int k_neg)
{
    const float hw_p = cf_half_width_pos(p), hw_n = cf_half_width_neg(p);
    unsigned int cp = 0u, cn = 0u;
    int j;
    for (j = 1; j <= k_pos; ++j)
        cp += fabsf(cf_dist_pos(h, cf_level(j, p->theta_p_d))) < hw_p ? 1u : 0u;
    for (j = 1; j <= k_neg; ++j)
        cn += fabsf(cf_dist_neg(h, cf_level(j, p->theta_n_d))) < hw_n ? 1u : 0u;
    return (unsigned char)(cp | (cn << 4));
}

/* Sp and Sn of CFRect from a window code: each side's height added once per window, as
 * cf_backward_step_k adds it (in-window levels add it, the others 0.0f, which changes nothing). */
CF_HD void cf_rect_sums_from_code(unsigned char code, float height_p, float height_n, float *sp,
                                  float *sn)
{
    unsigned int cp = code & 15u, cn = (unsigned int)code >> 4;
    float a = 0.0f, b = 0.0f;
    for (; cp; --cp)
        a += height_p;
    for (; cn; --cn)
        b += height_n;
    *sp = a;
    *sn = b;
}

/* One reverse step of one neuron from its window code (CFRect only): the same gradients as
 * cf_backward_step_k(CF_RECT, h, ...) for the h the code was made from. */
CF_HD cf_bwd_out cf_backward_step_code(unsigned char code, float grad_s, float gv_tot,
                                       float grad_h, float alpha, const cf_params *p)
{
    float sp, sn;
    cf_rect_sums_from_code(code, cf_side_alpha_pos(CF_RECT, alpha, p),
                           cf_side_alpha_neg(CF_RECT, alpha, p), &sp, &sn);
    return cf_backward_combine(CF_RECT, sp, sn, 0.0f, 0.0f, grad_s, gv_tot, grad_h, p);
}

typedef union cf_f32_bits {
    float f;
    unsigned int u;
} cf_f32_bits;

/* float32 -> IEEE binary16 bits, round to nearest even: PyTorch's own scalar conversion
 * (c10::detail::fp16_ieee_from_fp32_value, after FP16 by M. Dukhan): the rounding is done by a
 * float32 addition, so there is no branch and a loop of it vectorises.  NaN -> 0x7e00 | sign. */
CF_HD unsigned short cf_float_to_half_bits(float f)
{
    cf_f32_bits w, b, base;
    unsigned int shl1_w, sign, bias, exp_bits, mantissa_bits, nonsign;
    w.f = f;
    /* |f| * 2^112 * 2^-110: overflow to inf beyond the half range, else |f| * 4 */
    base.f = (fabsf(f) * 5.192296858534827628530496329220096e+33f) *
             7.703719777548943412223911770339877e-34f;
    shl1_w = w.u + w.u;
    sign = w.u & 0x80000000u;
    bias = shl1_w & 0xff000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    b.u = (bias >> 1) + 0x07800000u;
    base.f = b.f + base.f; /* rounds the mantissa to 10 bits (nearest even) */
    exp_bits = (base.u >> 13) & 0x00007c00u;
    mantissa_bits = base.u & 0x00000fffu;
    nonsign = exp_bits + mantissa_bits;
    return (unsigned short)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

/* IEEE binary16 bits -> float32 (exact; selects only, so a loop of it vectorises). */
CF_HD float cf_half_bits_to_float(unsigned short hbits)
{
    cf_f32_bits out, sub;
    const unsigned int sign = ((unsigned int)hbits & 0x8000u) << 16;
    const unsigned int e = ((unsigned int)hbits >> 10) & 0x1fu;
    const unsigned int m = (unsigned int)hbits & 0x3ffu;
    sub.f = (float)m * 5.9604644775390625e-8f; /* subnormal half: m * 2^-24, exact in float32 */
    out.u = e == 0x1fu ? (0x7f800000u | (m << 13))                /* inf, nan */
            : e != 0u  ? (((e + 112u) << 23) | (m << 13))          /* normal: rebias 15 -> 127 */
                       : sub.u;                                     /* zero, subnormal */
    out.u |= sign;
    return out.f;
}

/* bfloat16 bits -> float32 (exact) and float32 -> bfloat16 bits, round to nearest even with
 * NaN -> 0x7fc0 (what PyTorch's float -> bfloat16 conversion does). */
CF_HD float cf_bf16_bits_to_float(unsigned short bbits)
{
    cf_f32_bits out;
    out.u = (unsigned int)bbits << 16;
    return out.f;
}

CF_HD unsigned short cf_float_to_bf16_bits(float f)
{
    cf_f32_bits in;
    in.f = f;
    return (in.u & 0x7fffffffu) > 0x7f800000u
               ? (unsigned short)0x7fc0u
               : (unsigned short)((in.u + 0x7fffu + ((in.u >> 16) & 1u)) >> 16);
}

/* Memory-lean smooth surrogates: the index of the level nearest to h, in [-k_neg, k_pos]
 * (positive levels 1..k_pos, negative levels -1..-k_neg, 0 the rest point 0; NaN gives 0).
 * Any index would do (the distances are formed from it exactly); the nearest keeps |d| small. */
CF_HD int cf_nearest_level(float h, const cf_params *p, int k_pos, int k_neg)
{
    const int pos = h >= 0.0f;
    const float q = (pos ? h * p->inv_theta_p : -h * p->inv_theta_n) + 0.5f;
    const int kmax = pos ? k_pos : k_neg;
    const int m = q >= 1.0f ? (q < (float)kmax ? (int)q : kmax) : 0; /* NaN: 0 */
    return pos ? m : -m;
}

/* Level m as a signed index: cf_level(m, theta_p) for m > 0, cf_level(-m, theta_n) (< 0) for
 * m < 0, 0 for m = 0 (one product in double, then rounded: no branch). */
CF_HD float cf_signed_level(int m, const cf_params *p)
{
    return (float)((double)m * (m >= 0 ? p->theta_p_d : -p->theta_n_d));
}

/* The distances of cf_dist_pos / cf_dist_neg from (level_m, d = h - level_m). */
CF_HD float cf_dist_pos_offset(float lm, float d, float level)
{
    return CF_ADD(CF_SUB(lm, level), d);
}
CF_HD float cf_dist_neg_offset(float lm, float d, float level)
{
    return CF_SUB(CF_SUB(level, lm), d);
}

/* One reverse step of one neuron from (level_m, d): cf_backward_step_k with the distances
 * formed by cf_dist_*_offset. */
CF_HD cf_bwd_out cf_backward_step_offset_k(int kind, float lm, float d, float grad_s,
                                           float gv_tot, float grad_h, float alpha,
                                           const cf_params *p, int k_pos, int k_neg)
{
    float sp = 0.0f, sn = 0.0f, pp = 0.0f, pn = 0.0f;
    const float hw_p = cf_half_width_pos(p), hw_n = cf_half_width_neg(p);
    const float al_p = cf_side_alpha_pos(kind, alpha, p), al_n = cf_side_alpha_neg(kind, alpha, p);
    int j;
    for (j = 1; j <= k_pos; ++j) {
        float xd = cf_dist_pos_offset(lm, d, cf_level(j, p->theta_p_d));
        sp += cf_surrogate_grad(kind, xd, al_p, hw_p);
        if (kind == CF_TSG)
            pp += cf_tsg_psi(xd, alpha);
    }
    for (j = 1; j <= k_neg; ++j) {
        float xd = cf_dist_neg_offset(lm, d, cf_level(j, p->theta_n_d));
        sn += cf_surrogate_grad(kind, xd, al_n, hw_n);
        if (kind == CF_TSG)
            pn += cf_tsg_psi(xd, alpha);
    }
    return cf_backward_combine(kind, sp, sn, pp, pn, grad_s, gv_tot, grad_h, p);
}

#endif /* SPIKINGJELLY_CF_STEP_H */
