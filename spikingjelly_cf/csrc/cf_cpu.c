/*
 * cf_cpu.c -- fused multi-step CF neuron on the CPU (float32 arithmetic; float32, float16 or
 * bfloat16 storage; OpenMP when the compiler has it).
 *
 * Built by setup.py as the optional extension `spikingjelly_cf._cf_cpu`.  The
 * kernels are plain C functions called through ctypes (backends/cpp.py), which
 * releases the GIL for the call; the Python module defined at the bottom is
 * empty and exists so that setuptools can build and install the file as an
 * ordinary extension (and so that `importlib` can find it).  Compile with
 * -DCF_STANDALONE to build a shared library without Python headers, e.g.
 *   gcc -O3 -fopenmp -ffp-contract=off -fno-trapping-math -fPIC -shared \
 *       -DCF_STANDALONE spikingjelly_cf/csrc/cf_cpu.c -o /tmp/cf_cpu.so -lm
 * Without -fopenmp (macOS clang, MSVC) the same file builds a single-threaded
 * kernel: every OpenMP call is behind #ifdef _OPENMP (cf_cpu_openmp() says which).
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
 *
 * Storage dtypes (as the CUDA kernels): x, v0, s, v_seq, v_last and the incoming and outgoing
 * gradients are float32, float16 or bfloat16 (CF_DT_*).  A half/bfloat16 row segment is widened
 * to float32 in the thread's scratch before the arithmetic and rounded back (to nearest even, as
 * PyTorch rounds) after it; the state carries in float32 and the h saved for the backward pass
 * is float32 (or memory-lean), so a half/bfloat16 call computes exactly what float32 computes
 * on the same (rounded) inputs and rounds only its outputs.
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
#elif defined(_MSC_VER)
#pragma fp_contract(off)
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
#define CF_SCRATCH_ARRAYS 11 /* per-neuron arrays a block function may need */
#define CF_ABI_VERSION 3

/* Storage dtypes (backends/cpp.py uses the same numbers). */
#define CF_DT_F32 0
#define CF_DT_F16 1
#define CF_DT_BF16 2

static const float cf_zeros[CF_BLOCK_MAX] = {0.0f};

/* Row segment [off, off + nb) of a storage array as float32: the array itself (float32), or
 * widened into buf.  NULL reads as zeros. */
CF_CLONES static const float *cf_load_row(const void *arr, int dt, int64_t off, int64_t nb,
                                          float *restrict buf)
{
    int64_t i;
    if (!arr)
        return cf_zeros;
    if (dt == CF_DT_F32)
        return (const float *)arr + off;
    if (dt == CF_DT_F16) {
        const unsigned short *restrict src = (const unsigned short *)arr + off;
        for (i = 0; i < nb; ++i)
            buf[i] = cf_half_bits_to_float(src[i]);
    } else {
        const unsigned short *restrict src = (const unsigned short *)arr + off;
        for (i = 0; i < nb; ++i)
            buf[i] = cf_bf16_bits_to_float(src[i]);
    }
    return buf;
}

/* Where a float32 row for storage array arr is computed: the array itself (float32) or buf. */
CF_ALWAYS_INLINE float *cf_out_row(void *arr, int dt, int64_t off, float *buf)
{
    return dt == CF_DT_F32 ? (float *)arr + off : buf;
}

/* Writes the float32 row src to [off, off + nb) of a storage array, rounding to nearest even
 * for half/bfloat16 (nothing to do when src is the float32 array itself). */
CF_CLONES static void cf_store_row(void *arr, int dt, int64_t off, const float *src, int64_t nb)
{
    int64_t i;
    if (dt == CF_DT_F32) {
        float *dst = (float *)arr + off;
        if (dst != src)
            memcpy(dst, src, (size_t)nb * sizeof(float));
    } else if (dt == CF_DT_F16) {
        unsigned short *restrict dst = (unsigned short *)arr + off;
        for (i = 0; i < nb; ++i)
            dst[i] = cf_float_to_half_bits(src[i]);
    } else {
        unsigned short *restrict dst = (unsigned short *)arr + off;
        for (i = 0; i < nb; ++i)
            dst[i] = cf_float_to_bf16_bits(src[i]);
    }
}

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

/* The OpenMP version this file was compiled with (the _OPENMP macro, e.g. 201511), or 0 for a
 * build without OpenMP (single-threaded). */
CF_EXPORT int cf_cpu_openmp(void)
{
#ifdef _OPENMP
    return (int)_OPENMP;
#else
    return 0;
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
#ifndef _OPENMP
    num_threads = 1; /* built without OpenMP: one thread */
#endif
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
#ifdef _OPENMP
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
#endif
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
    const void *x, *v0;      /* storage dtype dt */
    void *s, *v_seq, *v_last; /* storage dtype dt */
    float *h_seq;            /* float32 [T, N], or NULL */
    unsigned char *code_seq; /* memory-lean CFRect: window codes [T, N], or NULL */
    unsigned char *off_seq;  /* memory-lean smooth surrogates: [T, 3, N] (cf_store_lean), or NULL */
    const float *lp, *ln;    /* levels, for the any-K path */
    int64_t T, N;
    int dt;
} cf_fwd_args;

/* Memory-lean saving of one row segment of h (cf_step.h): window codes, or per neuron the
 * binary16 bits of d = h - level_m (low bytes, then high bytes) and the signed index m, as the
 * three byte planes of row t of off_seq [T, 3, N]. */
CF_ALWAYS_INLINE void cf_store_lean(const cf_fwd_args *a, const cf_params *q, int kp, int kn,
                                    int64_t t, int64_t n0, const float *restrict ht, int64_t nb)
{
    int64_t i;
    if (a->code_seq) {
        unsigned char *restrict ct = a->code_seq + t * a->N + n0;
        for (i = 0; i < nb; ++i)
            ct[i] = cf_window_code_k(ht[i], q, kp, kn);
    }
    if (a->off_seq) {
        unsigned char *restrict lo = a->off_seq + 3 * t * a->N + n0;
        unsigned char *restrict hi = lo + a->N, *restrict idx = lo + 2 * a->N;
        for (i = 0; i < nb; ++i) {
            const int m = cf_nearest_level(ht[i], q, kp, kn);
            const unsigned short bits = cf_float_to_half_bits(CF_SUB(ht[i], cf_signed_level(m, q)));
            lo[i] = (unsigned char)(bits & 0xffu);
            hi[i] = (unsigned char)(bits >> 8);
            idx[i] = (unsigned char)(signed char)m;
        }
    }
}

/* Compile-time K_P, K_N: cf_forward_step_k per neuron, level loops unrolled, one pass a step. */
CF_ALWAYS_INLINE void cf_forward_block_fixed(const int kp, const int kn, const cf_fwd_args *a,
                                             const cf_params *p, int64_t n0, int64_t nb,
                                             float *work)
{
    const cf_params q = *p; /* a local copy: no store in the loop can alias it */
    float *restrict v = work, *restrict hl = work + nb, *restrict xb = work + 4 * nb,
                    *restrict sb = work + 5 * nb;
    int64_t t, i;
    memcpy(v, cf_load_row(a->v0, a->dt, n0, nb, xb), (size_t)nb * sizeof(float));
    for (t = 0; t < a->T; ++t) {
        const int64_t off = t * a->N + n0;
        const float *restrict xt = cf_load_row(a->x, a->dt, off, nb, xb);
        float *restrict st = cf_out_row(a->s, a->dt, off, sb);
        float *restrict ht = a->h_seq ? a->h_seq + off : hl;
        for (i = 0; i < nb; ++i) {
            const cf_fwd_out o = cf_forward_step_k(v[i], xt[i], &q, kp, kn);
            st[i] = o.n_pos - o.n_neg;
            ht[i] = o.h;
            v[i] = o.v;
        }
        cf_store_row(a->s, a->dt, off, st, nb);
        cf_store_lean(a, &q, kp, kn, t, n0, ht, nb);
        if (a->v_seq)
            cf_store_row(a->v_seq, a->dt, off, v, nb);
    }
    cf_store_row(a->v_last, a->dt, n0, v, nb);
}

/* Any K_P, K_N: the same primitives applied one level at a time over the block. */
CF_CLONES static void cf_forward_block_any(const cf_fwd_args *a, const cf_params *p, int64_t n0,
                                           int64_t nb, float *work)
{
    const cf_params q = *p;
    float *restrict v = work, *restrict hl = work + nb, *restrict np = work + 2 * nb,
                    *restrict nn = work + 3 * nb, *restrict xb = work + 4 * nb,
                    *restrict sb = work + 5 * nb;
    int64_t t, i;
    int j;
    memcpy(v, cf_load_row(a->v0, a->dt, n0, nb, xb), (size_t)nb * sizeof(float));
    for (t = 0; t < a->T; ++t) {
        const int64_t off = t * a->N + n0;
        const float *restrict xt = cf_load_row(a->x, a->dt, off, nb, xb);
        float *restrict st = cf_out_row(a->s, a->dt, off, sb);
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
        cf_store_row(a->s, a->dt, off, st, nb);
        cf_store_lean(a, &q, q.k_pos, q.k_neg, t, n0, ht, nb);
        if (a->v_seq)
            cf_store_row(a->v_seq, a->dt, off, v, nb);
    }
    cf_store_row(a->v_last, a->dt, n0, v, nb);
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
 * x, s: [T, N]; v0, v_last: [N]; v_seq: [T, N] or NULL (not written), all of storage dtype
 * dtype (CF_DT_*); h_seq: float32 [T, N] or NULL;
 * code_seq: [T, N] uint8 window codes (memory-lean CFRect, K_P, K_N <= 15) or NULL;
 * off_seq: [T, 3, N] uint8 nearest-level offsets (memory-lean smooth surrogates,
 * K_P, K_N <= 127: cf_store_lean) or NULL.
 * Returns 0, -1 if a small buffer cannot be allocated, -2 for K beyond a lean form's limit,
 * -3 for an unknown dtype.
 */
CF_EXPORT int cf_cpu_forward(const void *x, const void *v0, void *s, float *h_seq, void *v_seq,
                             void *v_last, unsigned char *code_seq, unsigned char *off_seq,
                             int dtype, int64_t T, int64_t N, float k, float c, double theta_p,
                             double theta_n, int k_pos, int k_neg, int num_threads)
{
    const cf_params p = cf_make_params(k, c, theta_p, theta_n, k_pos, k_neg, 0);
    const int64_t B = cf_block_size(N);
    const cf_fwd_block_fn fn = cf_pick_forward(k_pos, k_neg);
    int failed = 0;
    cf_fwd_args a;
    if (dtype != CF_DT_F32 && dtype != CF_DT_F16 && dtype != CF_DT_BF16)
        return -3;
    if ((code_seq && (k_pos > CF_LEAN_MAX_K || k_neg > CF_LEAN_MAX_K)) ||
        (off_seq && (k_pos > CF_LEAN_MAX_K_OFFSET || k_neg > CF_LEAN_MAX_K_OFFSET)))
        return -2;
    a.x = x;
    a.v0 = v0;
    a.s = s;
    a.h_seq = h_seq;
    a.v_seq = v_seq;
    a.v_last = v_last;
    a.code_seq = code_seq;
    a.off_seq = off_seq;
    a.T = T;
    a.N = N;
    a.dt = dtype;
    a.lp = cf_make_levels(k_pos, theta_p);
    a.ln = cf_make_levels(k_neg, theta_n);
    if (!a.lp || !a.ln) {
        failed = 1;
    } else {
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

/* ----------------------------------------------------------------- backward */

typedef struct cf_bwd_args {
    const float *h_seq, *alpha;
    const void *grad_s, *grad_h, *grad_v_seq, *grad_v_last; /* storage dtype dt, or NULL */
    const unsigned char *code_seq; /* memory-lean CFRect: window codes instead of h_seq */
    const unsigned char *off_seq;  /* memory-lean smooth surrogates: [T, 3, N] offsets instead */
    void *grad_x, *grad_v0;        /* storage dtype dt */
    double *alpha_part; /* [nblocks, T] per-block sums of dL/da_t (TSG), or NULL */
    const float *lp, *ln;
    int64_t T, N;
    int dt;
} cf_bwd_args;

/* Memory-lean offsets of row t, neurons [n0, n0 + nb): level_m into lm, d into dd. */
CF_CLONES static void cf_offset_row(const cf_bwd_args *a, const cf_params *q, int64_t t,
                                    int64_t n0, int64_t nb, float *restrict lm,
                                    float *restrict dd)
{
    const unsigned char *restrict lo = a->off_seq + 3 * t * a->N + n0;
    const unsigned char *restrict hi = lo + a->N, *restrict idx = lo + 2 * a->N;
    int64_t i;
    for (i = 0; i < nb; ++i) {
        lm[i] = cf_signed_level((int)(signed char)idx[i], q);
        dd[i] = cf_half_bits_to_float((unsigned short)(lo[i] | ((unsigned int)hi[i] << 8)));
    }
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

/* One step of a block from float32 h (restrict parameters: gcc honours them once inlined, so the
 * loop needs no run-time alias checks and vectorises); returns the block's sum of dL/da_t. */
CF_ALWAYS_INLINE float cf_backward_row_h(const int kind, const int kp, const int kn,
                                         const float *restrict ht, const float *restrict gst,
                                         const float *restrict gvt, const float *restrict ght,
                                         const float al, const cf_params *q, const int64_t nb,
                                         float *restrict gxt, float *restrict carry)
{
    float ga = 0.0f;
    int64_t i;
    for (i = 0; i < nb; ++i) {
        const cf_bwd_out o =
            cf_backward_step_k(kind, ht[i], gst[i], carry[i] + gvt[i], ght[i], al, q, kp, kn);
        gxt[i] = o.grad_x;
        carry[i] = o.grad_v_prev;
        ga += o.grad_alpha;
    }
    return ga;
}

/* The same from the memory-lean offsets (level_m in lm, d in dd). */
CF_ALWAYS_INLINE float cf_backward_row_offset(const int kind, const int kp, const int kn,
                                              const float *restrict lm, const float *restrict dd,
                                              const float *restrict gst,
                                              const float *restrict gvt,
                                              const float *restrict ght, const float al,
                                              const cf_params *q, const int64_t nb,
                                              float *restrict gxt, float *restrict carry)
{
    float ga = 0.0f;
    int64_t i;
    for (i = 0; i < nb; ++i) {
        const cf_bwd_out o = cf_backward_step_offset_k(kind, lm[i], dd[i], gst[i],
                                                       carry[i] + gvt[i], ght[i], al, q, kp, kn);
        gxt[i] = o.grad_x;
        carry[i] = o.grad_v_prev;
        ga += o.grad_alpha;
    }
    return ga;
}

/* Scratch of a backward block function: carry, sp, sn, pp, pn, lm, dd, then rows of the
 * incoming gradients and of grad_x in float32 (half/bfloat16 storage). */
#define CF_W_CARRY 0
#define CF_W_SP 1
#define CF_W_SN 2
#define CF_W_PP 3
#define CF_W_PN 4
#define CF_W_LM 5
#define CF_W_DD 6
#define CF_W_GS 7
#define CF_W_GH 8
#define CF_W_GV 9
#define CF_W_GX 10

/* Compile-time kind, K_P, K_N: cf_backward_step per neuron, one pass per step. */
CF_ALWAYS_INLINE void cf_backward_block_fixed(const int kind, const int kp, const int kn,
                                              const cf_bwd_args *a, const cf_params *p,
                                              int64_t n0, int64_t nb, double *ap, float *work)
{
    const cf_params q = *p; /* a local copy: no store in the loop can alias it */
    float *restrict carry = work + CF_W_CARRY * nb, *restrict lm = work + CF_W_LM * nb,
                    *restrict dd = work + CF_W_DD * nb;
    const int dt = a->dt;
    int64_t t;
    memcpy(carry, cf_load_row(a->grad_v_last, dt, n0, nb, work + CF_W_GV * nb),
           (size_t)nb * sizeof(float));
    for (t = a->T - 1; t >= 0; --t) {
        const int64_t off = t * a->N + n0;
        const float *restrict gst = cf_load_row(a->grad_s, dt, off, nb, work + CF_W_GS * nb);
        const float *restrict ght = cf_load_row(a->grad_h, dt, off, nb, work + CF_W_GH * nb);
        const float *restrict gvt = cf_load_row(a->grad_v_seq, dt, off, nb, work + CF_W_GV * nb);
        float *restrict gxt = cf_out_row(a->grad_x, dt, off, work + CF_W_GX * nb);
        const float al = a->alpha[t];
        float ga = 0.0f;
        /* gv_tot = carry (grad_v_last already in it at T-1) + grad_v_seq[t] */
        if (kind == CF_RECT && a->code_seq) { /* memory-lean CFRect: from the window codes */
            cf_backward_row_code(a->code_seq + off, gst, gvt, ght, al, &q, nb, gxt, carry);
        } else if (a->off_seq) { /* memory-lean smooth surrogates: from (level_m, d) */
            cf_offset_row(a, p, t, n0, nb, lm, dd); /* p, not &q: q must not escape */
            ga = cf_backward_row_offset(kind, kp, kn, lm, dd, gst, gvt, ght, al, &q, nb, gxt,
                                        carry);
        } else {
            ga = cf_backward_row_h(kind, kp, kn, a->h_seq + off, gst, gvt, ght, al, &q, nb, gxt,
                                   carry);
        }
        if (kind == CF_TSG && ap)
            ap[t] = (double)ga;
        cf_store_row(a->grad_x, dt, off, gxt, nb);
    }
    cf_store_row(a->grad_v0, dt, n0, carry, nb);
}

/* Any K: the per-level terms accumulated level by level over the block (same sums, same order). */
CF_ALWAYS_INLINE void cf_backward_block_any(const int kind, const cf_bwd_args *a,
                                            const cf_params *p, int64_t n0, int64_t nb,
                                            double *ap, float *work)
{
    const cf_params q = *p;
    float *restrict carry = work + CF_W_CARRY * nb, *restrict sp = work + CF_W_SP * nb,
                    *restrict sn = work + CF_W_SN * nb, *restrict pp = work + CF_W_PP * nb,
                    *restrict pn = work + CF_W_PN * nb, *restrict lm = work + CF_W_LM * nb,
                    *restrict dd = work + CF_W_DD * nb;
    const float hw_p = cf_half_width_pos(&q), hw_n = cf_half_width_neg(&q);
    const int tsg = kind == CF_TSG, dt = a->dt;
    int64_t t, i;
    int j;
    memcpy(carry, cf_load_row(a->grad_v_last, dt, n0, nb, work + CF_W_GV * nb),
           (size_t)nb * sizeof(float));
    for (t = a->T - 1; t >= 0; --t) {
        const int64_t off = t * a->N + n0;
        const float *restrict gst = cf_load_row(a->grad_s, dt, off, nb, work + CF_W_GS * nb);
        const float *restrict ght = cf_load_row(a->grad_h, dt, off, nb, work + CF_W_GH * nb);
        const float *restrict gvt = cf_load_row(a->grad_v_seq, dt, off, nb, work + CF_W_GV * nb);
        float *restrict gxt = cf_out_row(a->grad_x, dt, off, work + CF_W_GX * nb);
        const float al = a->alpha[t];
        const float al_p = cf_side_alpha_pos(kind, al, &q), al_n = cf_side_alpha_neg(kind, al, &q);
        const int offsets = a->off_seq != NULL;
        const float *restrict ht = a->h_seq ? a->h_seq + off : NULL;
        float ga = 0.0f;
        if (kind == CF_RECT && a->code_seq) { /* memory-lean CFRect: from the window codes */
            cf_backward_row_code(a->code_seq + off, gst, gvt, ght, al, &q, nb, gxt, carry);
            cf_store_row(a->grad_x, dt, off, gxt, nb);
            continue;
        }
        if (offsets)
            cf_offset_row(a, p, t, n0, nb, lm, dd); /* p, not &q: q must not escape */
        for (i = 0; i < nb; ++i) {
            sp[i] = 0.0f;
            sn[i] = 0.0f;
            pp[i] = 0.0f;
            pn[i] = 0.0f;
        }
        for (j = 0; j < q.k_pos; ++j) {
            const float lv = a->lp[j];
            if (offsets) {
                for (i = 0; i < nb; ++i) {
                    const float xd = cf_dist_pos_offset(lm[i], dd[i], lv);
                    sp[i] += cf_surrogate_grad(kind, xd, al_p, hw_p);
                    if (tsg)
                        pp[i] += cf_tsg_psi(xd, al);
                }
            } else {
                for (i = 0; i < nb; ++i) {
                    const float xd = cf_dist_pos(ht[i], lv);
                    sp[i] += cf_surrogate_grad(kind, xd, al_p, hw_p);
                    if (tsg)
                        pp[i] += cf_tsg_psi(xd, al);
                }
            }
        }
        for (j = 0; j < q.k_neg; ++j) {
            const float lv = a->ln[j];
            if (offsets) {
                for (i = 0; i < nb; ++i) {
                    const float xd = cf_dist_neg_offset(lm[i], dd[i], lv);
                    sn[i] += cf_surrogate_grad(kind, xd, al_n, hw_n);
                    if (tsg)
                        pn[i] += cf_tsg_psi(xd, al);
                }
            } else {
                for (i = 0; i < nb; ++i) {
                    const float xd = cf_dist_neg(ht[i], lv);
                    sn[i] += cf_surrogate_grad(kind, xd, al_n, hw_n);
                    if (tsg)
                        pn[i] += cf_tsg_psi(xd, al);
                }
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
        cf_store_row(a->grad_x, dt, off, gxt, nb);
    }
    cf_store_row(a->grad_v0, dt, n0, carry, nb);
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
 * Exactly one of: h_seq [T, N] float32 saved pre-reset potentials; code_seq (CFRect only: the
 * uint8 window codes of cf_cpu_forward); off_seq (the [T, 3, N] nearest-level offsets of
 * cf_cpu_forward).  grad_s, grad_h, grad_v_seq: [T, N] or NULL (zero); grad_v_last: [N] or
 * NULL; grad_x [T, N] and grad_v0 [N] written; all of storage dtype dtype (CF_DT_*).
 * alpha: [T] float32 (a_t for TSG, the constant alpha otherwise, CF_RECT_DEFAULT_HEIGHT for
 * CFRect's default heights).  When grad_alpha is not NULL (TSG), grad_alpha [T] float32 = sum
 * over neurons, reduced per block in float32, then over blocks in double in a fixed order
 * (deterministic for any thread count).  Returns 0, -1 if a scratch buffer cannot be
 * allocated, -2 for an inconsistent saved form, -3 for an unknown dtype.
 */
CF_EXPORT int cf_cpu_backward(int kind, const float *h_seq, const unsigned char *code_seq,
                              const unsigned char *off_seq, int dtype, const void *grad_s,
                              const void *grad_h, const void *grad_v_seq,
                              const void *grad_v_last, const float *alpha, void *grad_x,
                              void *grad_v0, float *grad_alpha, int64_t T, int64_t N, float k,
                              float c, double theta_p, double theta_n, int k_pos, int k_neg,
                              int detach_reset, int num_threads)
{
    const cf_params p = cf_make_params(k, c, theta_p, theta_n, k_pos, k_neg, detach_reset);
    const int64_t B = cf_block_size(N), nblocks = (N + B - 1) / B;
    const cf_bwd_block_fn fn = cf_pick_backward(kind, k_pos, k_neg);
    int failed = 0;
    cf_bwd_args a;
    int64_t b;
    if (dtype != CF_DT_F32 && dtype != CF_DT_F16 && dtype != CF_DT_BF16)
        return -3;
    if ((code_seq != NULL) + (off_seq != NULL) + (h_seq != NULL) != 1 ||
        (code_seq && (kind != CF_RECT || k_pos > CF_LEAN_MAX_K || k_neg > CF_LEAN_MAX_K)) ||
        (off_seq && (k_pos > CF_LEAN_MAX_K_OFFSET || k_neg > CF_LEAN_MAX_K_OFFSET)))
        return -2;
    a.h_seq = h_seq;
    a.code_seq = code_seq;
    a.off_seq = off_seq;
    a.grad_s = grad_s;
    a.grad_h = grad_h;
    a.grad_v_seq = grad_v_seq;
    a.grad_v_last = grad_v_last;
    a.alpha = alpha;
    a.grad_x = grad_x;
    a.grad_v0 = grad_v0;
    a.T = T;
    a.N = N;
    a.dt = dtype;
    a.alpha_part = NULL;
    if (grad_alpha && nblocks > 0 && T > 0)
        a.alpha_part = (double *)calloc((size_t)(nblocks * T), sizeof(double));
    a.lp = cf_make_levels(k_pos, theta_p);
    a.ln = cf_make_levels(k_neg, theta_n);
    if (!a.lp || !a.ln || (grad_alpha && nblocks > 0 && T > 0 && !a.alpha_part)) {
        failed = 1;
    } else {
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

#ifndef CF_STANDALONE
/* An empty module: the kernels above are reached through ctypes. */
static struct PyModuleDef cf_cpu_module = {
    PyModuleDef_HEAD_INIT, "_cf_cpu",
    "Compiled CPU kernels of spikingjelly_cf (called through ctypes by backends/cpp.py).", -1,
    NULL};

PyMODINIT_FUNC PyInit__cf_cpu(void) { return PyModule_Create(&cf_cpu_module); }
#endif
