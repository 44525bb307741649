/*
 * cf_cpu.c -- fused multi-step CF neuron on the CPU (float32, OpenMP).
 *
 * Built by setup.py as the optional extension `spikingjelly_cf._cf_cpu`.  The
 * kernels are plain C functions called through ctypes (backends/cpp.py), which
 * releases the GIL for the call; the Python module defined at the bottom is
 * empty and exists so that setuptools can build and install the file as an
 * ordinary extension (and so that `importlib` can find it).  Compile with
 * -DCF_STANDALONE to build a shared library without Python headers, e.g.
 *   gcc -O3 -fopenmp -ffp-contract=off -fno-trapping-math -fPIC -shared \
 *       -DCF_STANDALONE spikingjelly_cf/csrc/cf_cpu.c -o /tmp/cf_cpu.so -lm
 *
 * Layout: every [T, N] array is contiguous (time-major).  Neurons are cut into
 * blocks of 512..8192 (cf_block_size); each OpenMP thread takes whole blocks and
 * walks time as the outer loop inside a block, so every time step streams one
 * contiguous row segment per array and the inner loop over neurons vectorises.
 * Segments of at least 32 KiB keep the hardware prefetchers streaming (2 KiB
 * segments ran at half the copy bandwidth); the per-neuron state of a block
 * lives in a per-thread scratch buffer.  The per-neuron arithmetic is
 * cf_step.h, shared with the CUDA kernels; the loops specialise it for the
 * paper's (K_P, K_N) and the surrogate kind, and AVX2 is picked at load time
 * on x86-64 Linux.
 */
#ifndef CF_STANDALONE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* Never fuse a*b+c into an FMA: the reference rounds every product (see cf_step.h).
 * no-trapping-math (FP exception flags only, never a value) lets gcc turn the
 * surrogates' selects into vector blends instead of branches. */
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "cf_step.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_WIN32)
#define CF_EXPORT __declspec(dllexport)
#else
#define CF_EXPORT __attribute__((visibility("default")))
#endif

#if defined(__GNUC__)
#define CF_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define CF_ALWAYS_INLINE static inline
#endif

/* x86-64 Linux with gcc: every block function is also compiled for AVX2 and picked at load
 * time (ifunc); AVX2 does not include FMA, so the arithmetic is the same. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) &&     \
    !defined(CF_NO_CLONES)
#define CF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CF_CLONES
#endif

#define CF_BLOCK_MIN 512
#define CF_BLOCK_MAX 8192
#define CF_SCRATCH_ARRAYS 6 /* per-neuron arrays a block function may need */
#define CF_ABI_VERSION 3

static const float cf_zeros[CF_BLOCK_MAX] = {0.0f};

/* Neurons per block: long row segments, and still 64 blocks to share out when N allows.
 * It depends on N only, so the per-block TSG sums (and so grad_alpha) do not depend on
 * the number of threads. */
static int64_t cf_block_size(int64_t N)
{
    int64_t b = (N + 63) / 64;
    b = (b + 63) / 64 * 64;
    return b < CF_BLOCK_MIN ? CF_BLOCK_MIN : (b > CF_BLOCK_MAX ? CF_BLOCK_MAX : b);
}

/* Bumped whenever a signature below changes; backends/cpp.py checks it. */
CF_EXPORT int cf_cpu_abi_version(void) { return CF_ABI_VERSION; }

CF_EXPORT int cf_cpu_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Runs body(ctx, b, n0, nb, work) over the neuron blocks [n0, n0 + nb) of size B in parallel
 * (dynamic schedule, whole blocks per thread), each thread with its own scratch of
 * CF_SCRATCH_ARRAYS * B floats.  Returns 0, or -1 if a scratch buffer cannot be allocated. */
typedef void (*cf_block_body)(void *ctx, int64_t b, int64_t n0, int64_t nb, float *work);

static int cf_parallel_blocks(int64_t N, int64_t B, int num_threads, cf_block_body body, void *ctx)
{
    const int64_t nblocks = (N + B - 1) / B;
    int failed = 0;
    int64_t b;
    if (num_threads < 1)
        num_threads = 1;
    if ((int64_t)num_threads > nblocks)
        num_threads = (int)(nblocks > 0 ? nblocks : 1);
    if (num_threads == 1) {
        /* no team for a single block: starting one costs more than small layers take, and on a
         * busy machine the idle thread's join can wait a whole scheduler time slice */
        float *work;
        if (nblocks == 0)
            return 0;
        work = (float *)malloc((size_t)(CF_SCRATCH_ARRAYS * B) * sizeof(float));
        if (!work)
            return -1;
        for (b = 0; b < nblocks; ++b) {
            const int64_t n0 = b * B;
            body(ctx, b, n0, (N - n0) < B ? (N - n0) : B, work);
        }
        free(work);
        return 0;
    }
#pragma omp parallel num_threads(num_threads)
    {
        float *work = (float *)malloc((size_t)(CF_SCRATCH_ARRAYS * B) * sizeof(float));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (b = 0; b < nblocks; ++b) {
            const int64_t n0 = b * B;
            if (work)
                body(ctx, b, n0, (N - n0) < B ? (N - n0) : B, work);
        }
        free(work);
    }
    return failed ? -1 : 0;
}

/* Levels float32(j * theta), j = 1..k, computed once per call (cf_level). */
static float *cf_make_levels(int k, double theta)
{
    float *lv = (float *)malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
    int j;
    if (lv)
        for (j = 1; j <= k; ++j)
            lv[j - 1] = cf_level(j, theta);
    return lv;
}

/* ------------------------------------------------------------------ forward */

/* Arguments of one block of neurons [n0, n0 + nb). */
typedef struct cf_fwd_args {
    const float *x, *v0;
    float *s, *h_seq, *v_seq, *v_last;
    unsigned char *code_seq; /* memory-lean CFRect: window codes [T, N], or NULL */
    unsigned short *h16_seq; /* memory-lean smooth surrogates: h as binary16 [T, N], or NULL */
    const float *lp, *ln; /* levels, for the any-K path */
    int64_t T, N;
} cf_fwd_args;

/* Memory-lean saving of one row segment of h (cf_step.h): window codes and/or binary16. */
CF_ALWAYS_INLINE void cf_store_lean(const cf_fwd_args *a, const cf_params *q, int kp, int kn,
                                    int64_t off, const float *restrict ht, int64_t nb)
{
    int64_t i;
    if (a->code_seq) {
        unsigned char *restrict ct = a->code_seq + off;
        for (i = 0; i < nb; ++i)
            ct[i] = cf_window_code_k(ht[i], q, kp, kn);
    }
    if (a->h16_seq) {
        unsigned short *restrict h16 = a->h16_seq + off;
        for (i = 0; i < nb; ++i)
            h16[i] = cf_float_to_half_bits(ht[i]);
    }
}

/* Compile-time K_P, K_N: cf_forward_step_k per neuron, level loops unrolled, one pass a step. */
CF_ALWAYS_INLINE void cf_forward_block_fixed(const int kp, const int kn, const cf_fwd_args *a,
                                             const cf_params *p, int64_t n0, int64_t nb,
                                             float *work)
{
    const cf_params q = *p; /* a local copy: no store in the loop can alias it */
    float *restrict v = work, *restrict hl = work + nb;
    int64_t t, i;
    memcpy(v, a->v0 + n0, (size_t)nb * sizeof(float));
    for (t = 0; t < a->T; ++t) {
        const int64_t off = t * a->N + n0;
        const float *restrict xt = a->x + off;
        float *restrict st = a->s + off;
        float *restrict ht = a->h_seq ? a->h_seq + off : hl;
        for (i = 0; i < nb; ++i) {
            const cf_fwd_out o = cf_forward_step_k(v[i], xt[i], &q, kp, kn);
            st[i] = o.n_pos - o.n_neg;
            ht[i] = o.h;
            v[i] = o.v;
        }
        cf_store_lean(a, &q, kp, kn, off, ht, nb);
        if (a->v_seq)
            memcpy(a->v_seq + off, v, (size_t)nb * sizeof(float));
    }
    memcpy(a->v_last + n0, v, (size_t)nb * sizeof(float));
}

/* Any K_P, K_N: the same primitives applied one level at a time over the block. */
CF_CLONES static void cf_forward_block_any(const cf_fwd_args *a, const cf_params *p, int64_t n0,
                                           int64_t nb, float *work)
{
    const cf_params q = *p;
    float *restrict v = work, *restrict hl = work + nb, *restrict np = work + 2 * nb,
                    *restrict nn = work + 3 * nb;
    int64_t t, i;
    int j;
    memcpy(v, a->v0 + n0, (size_t)nb * sizeof(float));
    for (t = 0; t < a->T; ++t) {
        const int64_t off = t * a->N + n0;
        const float *restrict xt = a->x + off;
        float *restrict st = a->s + off;
        float *restrict ht = a->h_seq ? a->h_seq + off : hl;
        for (i = 0; i < nb; ++i) {
            ht[i] = cf_charge(v[i], xt[i], &q);
            np[i] = 0.0f;
            nn[i] = 0.0f;
        }
        for (j = 0; j < q.k_pos; ++j) {
            const float lv = a->lp[j];
            for (i = 0; i < nb; ++i)
                np[i] += cf_fire_pos(ht[i], lv);
        }
        for (j = 0; j < q.k_neg; ++j) {
            const float lv = a->ln[j];
            for (i = 0; i < nb; ++i)
                nn[i] += cf_fire_neg(ht[i], lv);
        }
        for (i = 0; i < nb; ++i) {
            st[i] = np[i] - nn[i];
            v[i] = cf_reset(ht[i], np[i], nn[i], &q);
        }
        cf_store_lean(a, &q, q.k_pos, q.k_neg, off, ht, nb);
        if (a->v_seq)
            memcpy(a->v_seq + off, v, (size_t)nb * sizeof(float));
    }
    memcpy(a->v_last + n0, v, (size_t)nb * sizeof(float));
}

typedef void (*cf_fwd_block_fn)(const cf_fwd_args *, const cf_params *, int64_t, int64_t,
                                float *);

/* Specialisations for the paper's variants ST (1,0), DT (1,1), SCF (K,0), CF (K,K), K <= 4. */
#define CF_FIXED_K(X)                                                                              \
    X(1, 0) X(1, 1) X(2, 0) X(2, 2) X(3, 0) X(3, 3) X(4, 0) X(4, 4)

#define CF_DEFINE_FWD(KP, KN)                                                                      \
    CF_CLONES static void cf_forward_block_##KP##_##KN(const cf_fwd_args *a, const cf_params *p,  \
                                                       int64_t n0, int64_t nb, float *work)        \
    {                                                                                              \
        cf_forward_block_fixed(KP, KN, a, p, n0, nb, work);                                        \
    }
CF_FIXED_K(CF_DEFINE_FWD)

static cf_fwd_block_fn cf_pick_forward(int k_pos, int k_neg)
{
#define CF_PICK_FWD(KP, KN)                                                                        \
    if (k_pos == KP && k_neg == KN)                                                                \
        return cf_forward_block_##KP##_##KN;
    CF_FIXED_K(CF_PICK_FWD)
#undef CF_PICK_FWD
    return cf_forward_block_any;
}

typedef struct cf_fwd_ctx {
    const cf_fwd_args *a;
    const cf_params *p;
    cf_fwd_block_fn fn;
} cf_fwd_ctx;

static void cf_forward_body(void *ctx, int64_t b, int64_t n0, int64_t nb, float *work)
{
    const cf_fwd_ctx *c = (const cf_fwd_ctx *)ctx;
    (void)b;
    c->fn(c->a, c->p, n0, nb, work);
}

/*
 * x, s: [T, N]; v0, v_last: [N]; h_seq, v_seq: [T, N] or NULL (not written);
 * code_seq: [T, N] uint8 window codes (memory-lean CFRect, K_P, K_N <= 15) or NULL;
 * h16_seq: [T, N] binary16 bits of h (memory-lean smooth surrogates) or NULL.
 * Returns 0, -1 if a small buffer cannot be allocated, -2 for K > 15 with code_seq.
 */
CF_EXPORT int cf_cpu_forward_ex(const float *x, const float *v0, float *s, float *h_seq,
                                float *v_seq, float *v_last, unsigned char *code_seq,
                                unsigned short *h16_seq, int64_t T, int64_t N, float k, float c,
                                double theta_p, double theta_n, int k_pos, int k_neg,
                                int num_threads)
{
    const cf_params p = cf_make_params(k, c, theta_p, theta_n, k_pos, k_neg, 0);
    const int64_t B = cf_block_size(N);
    const cf_fwd_block_fn fn = cf_pick_forward(k_pos, k_neg);
    int failed = 0;
    cf_fwd_args a;
    a.x = x;
    a.v0 = v0;
    a.s = s;
    a.h_seq = h_seq;
    a.v_seq = v_seq;
    a.v_last = v_last;
    a.code_seq = code_seq;
    a.h16_seq = h16_seq;
    a.T = T;
    a.N = N;
    if (code_seq && (k_pos > CF_LEAN_MAX_K || k_neg > CF_LEAN_MAX_K))
        return -2;
    a.lp = cf_make_levels(k_pos, theta_p);
    a.ln = cf_make_levels(k_neg, theta_n);
    if (!a.lp || !a.ln) {
        free((void *)a.lp);
        free((void *)a.ln);
        return -1;
    }
    {
        cf_fwd_ctx ctx;
        ctx.a = &a;
        ctx.p = &p;
        ctx.fn = fn;
        failed = cf_parallel_blocks(N, B, num_threads, cf_forward_body, &ctx);
    }
    free((void *)a.lp);
    free((void *)a.ln);
    return failed ? -1 : 0;
}

/* The forward pass that saves float32 h (or nothing): cf_cpu_forward_ex without lean buffers. */
CF_EXPORT int cf_cpu_forward(const float *x, const float *v0, float *s, float *h_seq, float *v_seq,
                             float *v_last, int64_t T, int64_t N, float k, float c, double theta_p,
                             double theta_n, int k_pos, int k_neg, int num_threads)
{
    return cf_cpu_forward_ex(x, v0, s, h_seq, v_seq, v_last, NULL, NULL, T, N, k, c, theta_p,
                             theta_n, k_pos, k_neg, num_threads);
}

/* ----------------------------------------------------------------- backward */

typedef struct cf_bwd_args {
    const float *h_seq, *grad_s, *grad_h, *grad_v_seq, *grad_v_last, *alpha;
    const unsigned char *code_seq; /* memory-lean CFRect: window codes instead of h_seq */
    const unsigned short *h16_seq; /* memory-lean smooth surrogates: binary16 h instead */
    float *grad_x, *grad_v0;
    double *alpha_part; /* [nblocks, T] per-block sums of dL/da_t (TSG), or NULL */
    const float *lp, *ln;
    int64_t T, N;
} cf_bwd_args;

/* Row segment of h at offset off: h_seq itself, or h16_seq widened into the scratch row hd. */
CF_ALWAYS_INLINE const float *cf_h_row(const cf_bwd_args *a, int64_t off, int64_t nb,
                                       float *restrict hd)
{
    int64_t i;
    if (!a->h16_seq)
        return a->h_seq + off;
    for (i = 0; i < nb; ++i)
        hd[i] = cf_half_bits_to_float(a->h16_seq[off + i]);
    return hd;
}

/* Memory-lean CFRect, one step of a block: the window codes stand in for h (same arithmetic). */
CF_ALWAYS_INLINE void cf_backward_row_code(const unsigned char *restrict ct,
                                           const float *restrict gst, const float *restrict gvt,
                                           const float *restrict ght, const float al,
                                           const cf_params *q, const int64_t nb,
                                           float *restrict gxt, float *restrict carry)
{
    int64_t i;
    for (i = 0; i < nb; ++i) {
        const cf_bwd_out o = cf_backward_step_code(ct[i], gst[i], carry[i] + gvt[i], ght[i], al, q);
        gxt[i] = o.grad_x;
        carry[i] = o.grad_v_prev;
    }
}

/* Compile-time kind, K_P, K_N: cf_backward_step per neuron, one pass per step. */
CF_ALWAYS_INLINE void cf_backward_block_fixed(const int kind, const int kp, const int kn,
                                              const cf_bwd_args *a, const cf_params *p,
                                              int64_t n0, int64_t nb, double *ap, float *work)
{
    const cf_params q = *p; /* a local copy: no store in the loop can alias it */
    float *restrict carry = work, *restrict hd = work + nb;
    int64_t t, i;
    const float *restrict gvl = a->grad_v_last ? a->grad_v_last + n0 : cf_zeros;
    for (i = 0; i < nb; ++i)
        carry[i] = gvl[i];
    for (t = a->T - 1; t >= 0; --t) {
        const int64_t off = t * a->N + n0;
        const float *restrict gst = a->grad_s ? a->grad_s + off : cf_zeros;
        const float *restrict ght = a->grad_h ? a->grad_h + off : cf_zeros;
        const float *restrict gvt = a->grad_v_seq ? a->grad_v_seq + off : cf_zeros;
        float *restrict gxt = a->grad_x + off;
        const float al = a->alpha[t];
        float ga = 0.0f;
        const float *restrict ht;
        if (kind == CF_RECT && a->code_seq) { /* memory-lean CFRect: from the window codes */
            cf_backward_row_code(a->code_seq + off, gst, gvt, ght, al, &q, nb, gxt, carry);
            continue;
        }
        ht = cf_h_row(a, off, nb, hd);
        /* gv_tot = carry (grad_v_last already in it at T-1) + grad_v_seq[t] */
        if (kind == CF_TSG) {
            for (i = 0; i < nb; ++i) {
                const cf_bwd_out o = cf_backward_step_k(CF_TSG, ht[i], gst[i], carry[i] + gvt[i],
                                                        ght[i], al, &q, kp, kn);
                gxt[i] = o.grad_x;
                carry[i] = o.grad_v_prev;
                ga += o.grad_alpha;
            }
            if (ap)
                ap[t] = (double)ga;
        } else {
            for (i = 0; i < nb; ++i) {
                const cf_bwd_out o = cf_backward_step_k(kind, ht[i], gst[i], carry[i] + gvt[i],
                                                        ght[i], al, &q, kp, kn);
                gxt[i] = o.grad_x;
                carry[i] = o.grad_v_prev;
            }
        }
    }
    memcpy(a->grad_v0 + n0, carry, (size_t)nb * sizeof(float));
}

/* Any K: the per-level terms accumulated level by level over the block (same sums, same order). */
CF_ALWAYS_INLINE void cf_backward_block_any(const int kind, const cf_bwd_args *a,
                                            const cf_params *p, int64_t n0, int64_t nb,
                                            double *ap, float *work)
{
    const cf_params q = *p;
    float *restrict carry = work, *restrict sp = work + nb, *restrict sn = work + 2 * nb,
                    *restrict pp = work + 3 * nb, *restrict pn = work + 4 * nb,
                    *restrict hd = work + 5 * nb;
    const float hw_p = cf_half_width_pos(&q), hw_n = cf_half_width_neg(&q);
    const int tsg = kind == CF_TSG;
    int64_t t, i;
    int j;
    const float *restrict gvl = a->grad_v_last ? a->grad_v_last + n0 : cf_zeros;
    for (i = 0; i < nb; ++i)
        carry[i] = gvl[i];
    for (t = a->T - 1; t >= 0; --t) {
        const int64_t off = t * a->N + n0;
        const float *restrict gst = a->grad_s ? a->grad_s + off : cf_zeros;
        const float *restrict ght = a->grad_h ? a->grad_h + off : cf_zeros;
        const float *restrict gvt = a->grad_v_seq ? a->grad_v_seq + off : cf_zeros;
        float *restrict gxt = a->grad_x + off;
        const float al = a->alpha[t];
        float ga = 0.0f, al_p, al_n;
        const float *restrict ht;
        if (kind == CF_RECT && a->code_seq) { /* memory-lean CFRect: from the window codes */
            cf_backward_row_code(a->code_seq + off, gst, gvt, ght, al, &q, nb, gxt, carry);
            continue;
        }
        ht = cf_h_row(a, off, nb, hd);
        al_p = cf_side_alpha_pos(kind, al, &q);
        al_n = cf_side_alpha_neg(kind, al, &q);
        for (i = 0; i < nb; ++i) {
            sp[i] = 0.0f;
            sn[i] = 0.0f;
            pp[i] = 0.0f;
            pn[i] = 0.0f;
        }
        for (j = 0; j < q.k_pos; ++j) {
            const float lv = a->lp[j];
            for (i = 0; i < nb; ++i) {
                const float xd = cf_dist_pos(ht[i], lv);
                sp[i] += cf_surrogate_grad(kind, xd, al_p, hw_p);
                if (tsg)
                    pp[i] += cf_tsg_psi(xd, al);
            }
        }
        for (j = 0; j < q.k_neg; ++j) {
            const float lv = a->ln[j];
            for (i = 0; i < nb; ++i) {
                const float xd = cf_dist_neg(ht[i], lv);
                sn[i] += cf_surrogate_grad(kind, xd, al_n, hw_n);
                if (tsg)
                    pn[i] += cf_tsg_psi(xd, al);
            }
        }
        for (i = 0; i < nb; ++i) {
            const cf_bwd_out o = cf_backward_combine(kind, sp[i], sn[i], pp[i], pn[i], gst[i],
                                                     carry[i] + gvt[i], ght[i], &q);
            gxt[i] = o.grad_x;
            carry[i] = o.grad_v_prev;
            ga += o.grad_alpha;
        }
        if (tsg && ap)
            ap[t] = (double)ga;
    }
    memcpy(a->grad_v0 + n0, carry, (size_t)nb * sizeof(float));
}

typedef void (*cf_bwd_block_fn)(const cf_bwd_args *, const cf_params *, int64_t, int64_t,
                                double *, float *);

#define CF_KINDS(X, KP, KN) X(CF_RECT, rect, KP, KN) X(CF_TSG, tsg, KP, KN)                      \
    X(CF_SIGMOID, sigmoid, KP, KN) X(CF_ATAN, atan, KP, KN)

#define CF_DEFINE_BWD_KIND(KIND, NAME, KP, KN)                                                     \
    CF_CLONES static void cf_backward_block_##NAME##_##KP##_##KN(                                 \
        const cf_bwd_args *a, const cf_params *p, int64_t n0, int64_t nb, double *ap,             \
        float *work)                                                                               \
    {                                                                                              \
        cf_backward_block_fixed(KIND, KP, KN, a, p, n0, nb, ap, work);                            \
    }
#define CF_DEFINE_BWD(KP, KN) CF_KINDS(CF_DEFINE_BWD_KIND, KP, KN)
CF_FIXED_K(CF_DEFINE_BWD)

#define CF_DEFINE_BWD_ANY(KIND, NAME, KP, KN)                                                      \
    CF_CLONES static void cf_backward_block_##NAME##_any(                                         \
        const cf_bwd_args *a, const cf_params *p, int64_t n0, int64_t nb, double *ap,             \
        float *work)                                                                               \
    {                                                                                              \
        cf_backward_block_any(KIND, a, p, n0, nb, ap, work);                                       \
    }
CF_KINDS(CF_DEFINE_BWD_ANY, _, _)

static cf_bwd_block_fn cf_pick_backward(int kind, int k_pos, int k_neg)
{
#define CF_PICK_BWD_KIND(KIND, NAME, KP, KN)                                                       \
    if (kind == KIND && k_pos == KP && k_neg == KN)                                                \
        return cf_backward_block_##NAME##_##KP##_##KN;
#define CF_PICK_BWD(KP, KN) CF_KINDS(CF_PICK_BWD_KIND, KP, KN)
    CF_FIXED_K(CF_PICK_BWD)
#undef CF_PICK_BWD
#undef CF_PICK_BWD_KIND
    switch (kind) {
    case CF_RECT:
        return cf_backward_block_rect_any;
    case CF_TSG:
        return cf_backward_block_tsg_any;
    case CF_SIGMOID:
        return cf_backward_block_sigmoid_any;
    default:
        return cf_backward_block_atan_any;
    }
}

typedef struct cf_bwd_ctx {
    const cf_bwd_args *a;
    const cf_params *p;
    cf_bwd_block_fn fn;
} cf_bwd_ctx;

/* Block b writes its TSG partial sums to row b of alpha_part ([nblocks, T]). */
static void cf_backward_body(void *ctx, int64_t b, int64_t n0, int64_t nb, float *work)
{
    const cf_bwd_ctx *c = (const cf_bwd_ctx *)ctx;
    c->fn(c->a, c->p, n0, nb, c->a->alpha_part ? c->a->alpha_part + b * c->a->T : NULL, work);
}

/*
 * h_seq: [T, N] saved pre-reset potentials, or NULL when code_seq (CFRect only: the
 * uint8 window codes of cf_cpu_forward_ex) or h16_seq (binary16 h) is given instead;
 * grad_s, grad_h, grad_v_seq: [T, N] or
 * NULL (zero); grad_v_last: [N] or NULL; alpha: [T] (a_t for TSG, the constant
 * alpha otherwise, CF_RECT_DEFAULT_HEIGHT for CFRect's default heights).  Writes grad_x [T, N], grad_v0 [N] and, when grad_alpha is
 * not NULL (TSG), grad_alpha [T] = sum over neurons, reduced per block in
 * float32, then over blocks in double in a fixed order (deterministic for any
 * thread count).  Returns 0, or -1 if a scratch buffer cannot be allocated.
 */
CF_EXPORT int cf_cpu_backward_ex(int kind, const float *h_seq, const unsigned char *code_seq,
                                 const unsigned short *h16_seq, const float *grad_s,
                                 const float *grad_h, const float *grad_v_seq,
                                 const float *grad_v_last, const float *alpha, float *grad_x,
                                 float *grad_v0, float *grad_alpha, int64_t T, int64_t N, float k,
                                 float c, double theta_p, double theta_n, int k_pos, int k_neg,
                                 int detach_reset, int num_threads)
{
    const cf_params p = cf_make_params(k, c, theta_p, theta_n, k_pos, k_neg, detach_reset);
    const int64_t B = cf_block_size(N), nblocks = (N + B - 1) / B;
    const cf_bwd_block_fn fn = cf_pick_backward(kind, k_pos, k_neg);
    int failed = 0;
    cf_bwd_args a;
    int64_t b;
    a.h_seq = h_seq;
    a.code_seq = code_seq;
    a.h16_seq = h16_seq;
    if ((code_seq != NULL) + (h16_seq != NULL) + (h_seq != NULL) != 1 ||
        (code_seq && (kind != CF_RECT || k_pos > CF_LEAN_MAX_K || k_neg > CF_LEAN_MAX_K)))
        return -2;
    a.grad_s = grad_s;
    a.grad_h = grad_h;
    a.grad_v_seq = grad_v_seq;
    a.grad_v_last = grad_v_last;
    a.alpha = alpha;
    a.grad_x = grad_x;
    a.grad_v0 = grad_v0;
    a.T = T;
    a.N = N;
    a.alpha_part = NULL;
    if (grad_alpha && nblocks > 0 && T > 0)
        a.alpha_part = (double *)calloc((size_t)(nblocks * T), sizeof(double));
    a.lp = cf_make_levels(k_pos, theta_p);
    a.ln = cf_make_levels(k_neg, theta_n);
    if (!a.lp || !a.ln || (grad_alpha && nblocks > 0 && T > 0 && !a.alpha_part)) {
        free((void *)a.lp);
        free((void *)a.ln);
        free(a.alpha_part);
        return -1;
    }
    {
        cf_bwd_ctx ctx;
        ctx.a = &a;
        ctx.p = &p;
        ctx.fn = fn;
        failed = cf_parallel_blocks(N, B, num_threads, cf_backward_body, &ctx);
    }
    if (grad_alpha && !failed) {
        int64_t t;
        for (t = 0; t < T; ++t) {
            double acc = 0.0;
            for (b = 0; b < nblocks; ++b)
                acc += a.alpha_part[b * T + t];
            grad_alpha[t] = (float)acc;
        }
    }
    free(a.alpha_part);
    free((void *)a.lp);
    free((void *)a.ln);
    return failed ? -1 : 0;
}

/* The backward pass from float32 h: cf_cpu_backward_ex without lean buffers. */
CF_EXPORT int cf_cpu_backward(int kind, const float *h_seq, const float *grad_s,
                              const float *grad_h, const float *grad_v_seq,
                              const float *grad_v_last, const float *alpha, float *grad_x,
                              float *grad_v0, float *grad_alpha, int64_t T, int64_t N, float k,
                              float c, double theta_p, double theta_n, int k_pos, int k_neg,
                              int detach_reset, int num_threads)
{
    return cf_cpu_backward_ex(kind, h_seq, NULL, NULL, grad_s, grad_h, grad_v_seq, grad_v_last,
                              alpha, grad_x, grad_v0, grad_alpha, T, N, k, c, theta_p, theta_n,
                              k_pos, k_neg, detach_reset, num_threads);
}

#ifndef CF_STANDALONE
/* An empty module: the kernels above are reached through ctypes. */
static struct PyModuleDef cf_cpu_module = {
    PyModuleDef_HEAD_INIT, "_cf_cpu",
    "Compiled CPU kernels of spikingjelly_cf (called through ctypes by backends/cpp.py).", -1,
    NULL};

PyMODINIT_FUNC PyInit__cf_cpu(void) { return PyModule_Create(&cf_cpu_module); }
#endif
