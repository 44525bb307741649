/*
 * cf_kernel.cuh -- fused multi-step CF neuron on CUDA: one thread per neuron,
 * a loop over time inside, the per-neuron arithmetic from cf_step.h.
 *
 * backends/source.py pastes cf_step.h in place of the #include below and
 * appends extern "C" entry points for one storage dtype and one surrogate
 * kind; that string is what CuPy hands to NVRTC (and what the CI test hands
 * to nvcc).  No system or CUDA header is needed: half and bfloat16 are
 * converted with PTX / bit operations, so the source compiles the same under
 * NVRTC and nvcc without include paths.
 *
 * Storage dtypes: float, cf_half (IEEE binary16), cf_bfloat16.  Every value is
 * loaded into float32 and all arithmetic and carries are float32; the
 * pre-reset potentials the backward pass needs are kept in float32 (h_save),
 * so a half/bfloat16 run computes exactly what float32 computes on the same
 * (rounded) inputs, and only the outputs are rounded to the storage dtype.
 * Layout: [T, N] contiguous (time-major), so each step's loads are coalesced.
 */
#include "cf_step.h"

struct cf_half {
    unsigned short bits;
};
struct cf_bfloat16 {
    unsigned short bits;
};

__device__ __forceinline__ float cf_load(const float *p) { return *p; }
__device__ __forceinline__ float cf_load(const cf_half *p)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
    return f;
}
__device__ __forceinline__ float cf_load(const cf_bfloat16 *p)
{
    return __uint_as_float(((unsigned int)p->bits) << 16);
}

__device__ __forceinline__ void cf_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void cf_store(cf_half *p, float v)
{
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v)); /* round to nearest even */
    p->bits = b;
}
__device__ __forceinline__ void cf_store(cf_bfloat16 *p, float v)
{
    /* round to nearest even, NaN -> 0x7fc0: the same as PyTorch's float -> bfloat16 */
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p->bits = (unsigned short)0x7fc0u;
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        p->bits = (unsigned short)(u >> 16);
    }
}

/* Optional [T, N] / [N] inputs: NULL reads as zero. */
template <typename S>
__device__ __forceinline__ float cf_load_or_zero(const S *p, long long i)
{
    return p ? cf_load(p + i) : 0.0f;
}

/*
 * Forward.  x, s: [T, N]; v0, v_last: [N].  Optional (NULL = not written):
 * h_save [T, N] float32 (for the backward pass, or the float32 h_seq output),
 * h_out [T, N] in the storage dtype (the h_seq output of a half/bfloat16 call),
 * v_seq [T, N].
 */
template <typename S>
__device__ __forceinline__ void cf_forward_impl(const S *__restrict__ x, const S *__restrict__ v0,
                                                S *__restrict__ s, float *__restrict__ h_save,
                                                S *__restrict__ h_out, S *__restrict__ v_seq,
                                                S *__restrict__ v_last, int T, long long N,
                                                const cf_params p)
{
    const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    float v = cf_load(v0 + n);
#pragma unroll 4 /* lets the loads of several steps be in flight at once */
    for (int t = 0; t < T; ++t) {
        const long long i = (long long)t * N + n;
        const cf_fwd_out o = cf_forward_step(v, cf_load(x + i), &p);
        cf_store(s + i, o.n_pos - o.n_neg);
        if (h_save)
            h_save[i] = o.h;
        if (h_out)
            cf_store(h_out + i, o.h);
        if (v_seq)
            cf_store(v_seq + i, o.v);
        v = o.v;
    }
    cf_store(v_last + n, v);
}

/* Sum of v over the block, added to *dst by one atomicAdd (every thread must call it). */
__device__ __forceinline__ void cf_block_sum_atomic(float v, float *dst)
{
    __shared__ float warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0)
        warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? warp_sums[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1)
            v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0)
            atomicAdd(dst, v);
    }
    __syncthreads(); /* warp_sums is reused by the next call */
}

/*
 * Backward, reverse time.  h_save: [T, N] float32; grad_s, grad_h, grad_v_seq:
 * [T, N] or NULL (zero); grad_v_last: [N] or NULL; alpha: [T] float32 (a_t for
 * TSG, the constant alpha otherwise).  Writes grad_x [T, N], grad_v0 [N] and,
 * for TSG with grad_alpha != NULL, adds sum_n dL/da_t into grad_alpha[t]
 * (float32 [T], zeroed by the caller): per-block reduction + one atomicAdd.
 * blockDim.x must be a multiple of 32.
 */
template <typename S, int KIND>
__device__ __forceinline__ void cf_backward_impl(
    const float *__restrict__ h_save, const S *__restrict__ grad_s, const S *__restrict__ grad_h,
    const S *__restrict__ grad_v_seq, const S *__restrict__ grad_v_last,
    const float *__restrict__ alpha, S *__restrict__ grad_x, S *__restrict__ grad_v0,
    float *__restrict__ grad_alpha, int T, long long N, const cf_params p)
{
    const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = n < N;
    /* inactive threads stay for the block reductions of TSG */
    if (!active && !(KIND == CF_TSG && grad_alpha))
        return;
    float carry = active ? cf_load_or_zero(grad_v_last, n) : 0.0f;
#pragma unroll 4
    for (int t = T - 1; t >= 0; --t) {
        float ga = 0.0f;
        if (active) {
            const long long i = (long long)t * N + n;
            const float gv_tot = carry + cf_load_or_zero(grad_v_seq, i);
            const cf_bwd_out o = cf_backward_step(KIND, h_save[i], cf_load_or_zero(grad_s, i),
                                                  gv_tot, cf_load_or_zero(grad_h, i), alpha[t],
                                                  &p);
            cf_store(grad_x + i, o.grad_x);
            carry = o.grad_v_prev;
            ga = o.grad_alpha;
        }
        if (KIND == CF_TSG && grad_alpha)
            cf_block_sum_atomic(ga, grad_alpha + t);
    }
    if (active)
        cf_store(grad_v0 + n, carry);
}

/* Entry points, one pair per (storage dtype, surrogate kind), appended by
 * backends/source.py with this macro:
 *   CF_DEFINE_KERNELS(float16, cf_half, CF_RECT, rect)
 * defines cf_forward_float16 and cf_backward_float16_rect. */
#define CF_DEFINE_FORWARD(DTYPE, S)                                                                \
    extern "C" __global__ void cf_forward_##DTYPE(                                                 \
        const S *x, const S *v0, S *s, float *h_save, S *h_out, S *v_seq, S *v_last, int T,        \
        long long N, float k, float c, double theta_p, double theta_n, int k_pos, int k_neg)       \
    {                                                                                              \
        cf_forward_impl<S>(x, v0, s, h_save, h_out, v_seq, v_last, T, N,                           \
                           cf_make_params(k, c, theta_p, theta_n, k_pos, k_neg, 0));               \
    }

#define CF_DEFINE_BACKWARD(DTYPE, S, KIND, KIND_NAME)                                              \
    extern "C" __global__ void cf_backward_##DTYPE##_##KIND_NAME(                                  \
        const float *h_save, const S *grad_s, const S *grad_h, const S *grad_v_seq,                \
        const S *grad_v_last, const float *alpha, S *grad_x, S *grad_v0, float *grad_alpha,        \
        int T, long long N, float k, float c, double theta_p, double theta_n, int k_pos,           \
        int k_neg, int detach_reset)                                                               \
    {                                                                                              \
        cf_backward_impl<S, KIND>(h_save, grad_s, grad_h, grad_v_seq, grad_v_last, alpha, grad_x, \
                                  grad_v0, grad_alpha, T, N,                                       \
                                  cf_make_params(k, c, theta_p, theta_n, k_pos, k_neg,             \
                                                   detach_reset));                                 \
    }

#define CF_DEFINE_KERNELS(DTYPE, S, KIND, KIND_NAME)                                               \
    CF_DEFINE_FORWARD(DTYPE, S)                                                                    \
    CF_DEFINE_BACKWARD(DTYPE, S, KIND, KIND_NAME)
