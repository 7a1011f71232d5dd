// adaLN for FLUX blocks on bf16 activations, the two elementwise steps around every
// attention and MLP sub-layer, each one pass over memory:
//   norm_modulate:     y = LayerNorm(x) · (1 + scale) + shift   (LayerNorm without weights)
//   gated_residual:    y = residual + gate · x
// scale, shift and gate are one row of `hidden` values per batch element (views into the
// modulation projection's output, `vec_batch` apart). With candle ops each step is two or
// three broadcast kernels, which run far below memory bandwidth.
//
// norm_modulate_e4m3 is norm_modulate for a projection with per-row FP8 scales: the row,
// already in registers, is quantized to e4m3 with its own scale (max |y| / 448) in the same
// kernel, so the bf16 result never goes to memory. It rounds through bf16 first, so its bits
// equal norm_modulate followed by fp8_quant.cu's headshot_quantize_rows_e4m3.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#define ADALN_THREADS 256
// Pairs of values per thread: rows up to 2 · 8 · 256 = 4096 wide.
#define ADALN_PAIRS 8

// Sum (or, with MAX, maximum: of non-negative values) of v over the block, in every thread.
template <bool MAX> __device__ __forceinline__ float combine(float a, float b) {
    return MAX ? fmaxf(a, b) : a + b;
}

template <bool MAX> __device__ __forceinline__ float block_reduce(float v, float *scratch) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v = combine<MAX>(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    __syncthreads(); // scratch may still be read from the previous reduction
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < ADALN_THREADS / 32; ++w) {
        total = combine<MAX>(total, scratch[w]);
    }
    return total;
}

__device__ __forceinline__ float block_sum(float v, float *scratch) {
    return block_reduce<false>(v, scratch);
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
    return block_reduce<true>(v, scratch);
}

// LayerNorm(x) · (1 + scale) + shift of the block's row (blockIdx.x of batch blockIdx.y),
// rounded to bf16, into o: pair p = threadIdx.x + k · ADALN_THREADS at o[k] (zero past the
// row's hidden / 2 pairs).
__device__ __forceinline__ void modulated_row(const __nv_bfloat16 *__restrict__ x,
                                              const __nv_bfloat16 *__restrict__ scale,
                                              const __nv_bfloat16 *__restrict__ shift,
                                              long long vec_batch, int rows, int hidden,
                                              float eps, float *scratch,
                                              float2 o[ADALN_PAIRS]) {
    const int pairs = hidden / 2;
    const long long row = (long long)blockIdx.y * rows + blockIdx.x;
    const __nv_bfloat162 *xr = reinterpret_cast<const __nv_bfloat162 *>(x + row * hidden);
    float2 v[ADALN_PAIRS];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < ADALN_PAIRS; ++k) {
        const int p = threadIdx.x + k * ADALN_THREADS;
        v[k] = p < pairs ? __bfloat1622float2(xr[p]) : make_float2(0.f, 0.f);
        sum += v[k].x + v[k].y;
    }
    const float mean = block_sum(sum, scratch) / hidden;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < ADALN_PAIRS; ++k) {
        const int p = threadIdx.x + k * ADALN_THREADS;
        if (p < pairs) {
            const float a = v[k].x - mean, b = v[k].y - mean;
            sq += a * a + b * b;
        }
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / hidden + eps);
    const __nv_bfloat162 *sc = reinterpret_cast<const __nv_bfloat162 *>(scale + blockIdx.y * vec_batch);
    const __nv_bfloat162 *sh = reinterpret_cast<const __nv_bfloat162 *>(shift + blockIdx.y * vec_batch);
#pragma unroll
    for (int k = 0; k < ADALN_PAIRS; ++k) {
        const int p = threadIdx.x + k * ADALN_THREADS;
        o[k] = make_float2(0.f, 0.f);
        if (p < pairs) {
            const float2 s = __bfloat1622float2(sc[p]);
            const float2 t = __bfloat1622float2(sh[p]);
            o[k] = __bfloat1622float2(
                __floats2bfloat162_rn((v[k].x - mean) * rstd * (1.f + s.x) + t.x,
                                      (v[k].y - mean) * rstd * (1.f + s.y) + t.y));
        }
    }
}

// grid (rows, batch), block 256: one row of `hidden` (even, ≤ 4096) values per block.
extern "C" __global__ void __launch_bounds__(ADALN_THREADS)
    headshot_norm_modulate_bf16(const __nv_bfloat16 *__restrict__ x,
                                const __nv_bfloat16 *__restrict__ scale,
                                const __nv_bfloat16 *__restrict__ shift, long long vec_batch,
                                __nv_bfloat16 *__restrict__ y, int rows, int hidden, float eps) {
    __shared__ float scratch[ADALN_THREADS / 32];
    float2 o[ADALN_PAIRS];
    modulated_row(x, scale, shift, vec_batch, rows, hidden, eps, scratch, o);
    const int pairs = hidden / 2;
    const long long row = (long long)blockIdx.y * rows + blockIdx.x;
    __nv_bfloat162 *yr = reinterpret_cast<__nv_bfloat162 *>(y + row * hidden);
#pragma unroll
    for (int k = 0; k < ADALN_PAIRS; ++k) {
        const int p = threadIdx.x + k * ADALN_THREADS;
        if (p < pairs) {
            yr[p] = __floats2bfloat162_rn(o[k].x, o[k].y); // exact: o is bf16-valued
        }
    }
}

// As headshot_norm_modulate_bf16, then per-row e4m3: y (batch · rows rows of hidden bytes,
// hidden even) holds the row times 448 / max|row|, row_scales[row] = max|row| / 448.
extern "C" __global__ void __launch_bounds__(ADALN_THREADS)
    headshot_norm_modulate_e4m3(const __nv_bfloat16 *__restrict__ x,
                                const __nv_bfloat16 *__restrict__ scale,
                                const __nv_bfloat16 *__restrict__ shift, long long vec_batch,
                                __nv_fp8x2_storage_t *__restrict__ y,
                                float *__restrict__ row_scales, int rows, int hidden,
                                float eps) {
    __shared__ float scratch[ADALN_THREADS / 32];
    float2 o[ADALN_PAIRS];
    modulated_row(x, scale, shift, vec_batch, rows, hidden, eps, scratch, o);
    float m = 0.f;
#pragma unroll
    for (int k = 0; k < ADALN_PAIRS; ++k) {
        m = fmaxf(m, fmaxf(fabsf(o[k].x), fabsf(o[k].y)));
    }
    const float amax = fmaxf(block_max(m, scratch), 1e-12f);
    const float inv = 448.f / amax;
    const int pairs = hidden / 2;
    const long long row = (long long)blockIdx.y * rows + blockIdx.x;
    if (threadIdx.x == 0) {
        row_scales[row] = amax / 448.f;
    }
    __nv_fp8x2_storage_t *yr = y + row * pairs;
#pragma unroll
    for (int k = 0; k < ADALN_PAIRS; ++k) {
        const int p = threadIdx.x + k * ADALN_THREADS;
        if (p < pairs) {
            yr[p] = __nv_cvt_float2_to_fp8x2(make_float2(o[k].x * inv, o[k].y * inv),
                                             __NV_SATFINITE, __NV_E4M3);
        }
    }
}

// Grid-stride over value pairs of (batch, rows, hidden); hidden even.
extern "C" __global__ void __launch_bounds__(ADALN_THREADS)
    headshot_gated_residual_bf16(const __nv_bfloat16 *__restrict__ residual,
                                 const __nv_bfloat16 *__restrict__ x,
                                 const __nv_bfloat16 *__restrict__ gate, long long vec_batch,
                                 __nv_bfloat16 *__restrict__ y, long long rows, int hidden) {
    const long long pairs_per_row = hidden / 2;
    const long long pairs_per_batch = rows * pairs_per_row;
    const __nv_bfloat162 *r2 = reinterpret_cast<const __nv_bfloat162 *>(residual);
    const __nv_bfloat162 *x2 = reinterpret_cast<const __nv_bfloat162 *>(x);
    __nv_bfloat162 *y2 = reinterpret_cast<__nv_bfloat162 *>(y);
    const long long b = blockIdx.y;
    const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162 *>(gate + b * vec_batch);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < pairs_per_batch;
         i += (long long)gridDim.x * blockDim.x) {
        const long long at = b * pairs_per_batch + i;
        const float2 r = __bfloat1622float2(r2[at]);
        const float2 v = __bfloat1622float2(x2[at]);
        const float2 g = __bfloat1622float2(g2[i % pairs_per_row]);
        y2[at] = __floats2bfloat162_rn(r.x + g.x * v.x, r.y + g.y * v.y);
    }
}
