// Group norm (+ optional SiLU) over bf16 (batch, channels, height, width), as the FLUX
// autoencoder's decoder runs it before nearly every convolution. A group at full resolution
// holds channels/groups · height · width values (4 · 1024 · 1024 for a 1024² image): one
// block per group would leave most of the GPU idle, so the work is split in two launches,
// each over many blocks:
//   headshot_group_stats_bf16:  each block sums one chunk of one group (sum and sum of
//                               squares in f32, combined in f64) into partials[group][chunk];
//   headshot_group_apply_bf16:  each block combines its group's partials into mean and
//                               1/std, then writes (x - mean) / std · weight[c] + bias[c],
//                               through SiLU when asked, for its chunk.
// (headshot_group_finalize_bf16 combines the partials into (mean, 1/std) per group instead,
// for conv_implicit.cu, which applies the norm as it reads the convolution's input.)
// The sums are of x - K, K the group's first value: var = E[(x-K)²] - E[x-K]² then keeps its
// precision when the mean is large against the spread (summing x itself, the f32 error of
// E[x²] would be multiplied by about mean²/var).
// Three passes over memory in all (read, read, write) where candle's group norm runs about
// ten kernels, each a pass, in f32.

#include <cuda_bf16.h>
#include <stdint.h>

#include "norm_apply.cuh"

#define GN_THREADS 256

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

// grid (chunks, batch · groups), block 256. Group g of batch b is the contiguous run of
// `group_len` values starting at (b · groups + g) · group_len (channels are contiguous
// groups in NCHW). Chunk k covers [k · chunk_len, min((k + 1) · chunk_len, group_len)).
// group_len and chunk_len are even, so values are read in bf16 pairs.
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    headshot_group_stats_bf16(const __nv_bfloat16 *__restrict__ x, long long group_len,
                              long long chunk_len, double *__restrict__ partials) {
    __shared__ float sums[GN_THREADS / 32];
    __shared__ float squares[GN_THREADS / 32];
    const long long group = blockIdx.y;
    const long long begin = (long long)blockIdx.x * chunk_len;
    long long end = begin + chunk_len;
    if (end > group_len) {
        end = group_len;
    }
    const __nv_bfloat162 *xg = reinterpret_cast<const __nv_bfloat162 *>(x + group * group_len);
    const float shift = __bfloat162float(x[group * group_len]);
    float s = 0.f, q = 0.f;
    for (long long p = begin / 2 + threadIdx.x; p < end / 2; p += GN_THREADS) {
        const float2 v = __bfloat1622float2(xg[p]);
        const float a = v.x - shift, b = v.y - shift;
        s += a + b;
        q += a * a + b * b;
    }
    s = warp_sum(s);
    q = warp_sum(q);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        sums[warp] = s;
        squares[warp] = q;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ts = 0.0, tq = 0.0;
#pragma unroll
        for (int w = 0; w < GN_THREADS / 32; ++w) {
            ts += sums[w];
            tq += squares[w];
        }
        double *out = partials + 2 * (group * gridDim.x + blockIdx.x);
        out[0] = ts;
        out[1] = tq;
    }
}

// Mean and 1/std of group `group` from its `chunks` partials (the stats launch's sums of
// x - K, K = first, the group's first value).
__device__ __forceinline__ void group_mean_rstd(const double *__restrict__ partials, int chunks,
                                                long long group, float first,
                                                long long group_len, float eps, float *mean,
                                                float *rstd) {
    const double *p = partials + 2 * group * chunks;
    double ts = 0.0, tq = 0.0;
    for (int k = 0; k < chunks; ++k) {
        ts += p[2 * k];
        tq += p[2 * k + 1];
    }
    const double shifted_mean = ts / (double)group_len;
    double var = tq / (double)group_len - shifted_mean * shifted_mean;
    if (var < 0.0) {
        var = 0.0;
    }
    *mean = (float)((double)first + shifted_mean);
    *rstd = (float)(1.0 / sqrt(var + (double)eps));
}

// grid ((all_groups + 255) / 256), block 256: stats[2g], stats[2g + 1] = mean and 1/std of
// group g, for kernels that apply the norm themselves (conv_implicit.cu's prep).
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    headshot_group_finalize_bf16(const __nv_bfloat16 *__restrict__ x,
                                 const double *__restrict__ partials, int chunks,
                                 int all_groups, long long group_len, float eps,
                                 float *__restrict__ stats) {
    const int group = blockIdx.x * GN_THREADS + threadIdx.x;
    if (group < all_groups) {
        group_mean_rstd(partials, chunks, group, __bfloat162float(x[group * group_len]),
                        group_len, eps, &stats[2 * group], &stats[2 * group + 1]);
    }
}

// grid (chunks, batch · groups), block 256: same chunks as the stats launch.
// `channel_len` = height · width (even); channel of a value = its group's first channel
// + offset / channel_len.
extern "C" __global__ void __launch_bounds__(GN_THREADS)
    headshot_group_apply_bf16(const __nv_bfloat16 *__restrict__ x,
                              const double *__restrict__ partials, int chunks,
                              const __nv_bfloat16 *__restrict__ weight,
                              const __nv_bfloat16 *__restrict__ bias, int groups,
                              long long group_len, long long chunk_len, long long channel_len,
                              float eps, int silu, __nv_bfloat16 *__restrict__ y) {
    __shared__ float stats[2];
    const long long group = blockIdx.y;
    if (threadIdx.x == 0) {
        group_mean_rstd(partials, chunks, group, __bfloat162float(x[group * group_len]),
                        group_len, eps, &stats[0], &stats[1]);
    }
    __syncthreads();
    const float mean = stats[0], rstd = stats[1];
    const long long begin = (long long)blockIdx.x * chunk_len;
    long long end = begin + chunk_len;
    if (end > group_len) {
        end = group_len;
    }
    const int channels_per_group = (int)(group_len / channel_len);
    const int first_channel = (int)(group % groups) * channels_per_group;
    // Pairs per channel; a group's offsets fit 32 bits (the wrapper checks), so the channel
    // of each pair is a 32-bit division.
    const unsigned channel_pairs = (unsigned)(channel_len / 2);
    const __nv_bfloat162 *xg = reinterpret_cast<const __nv_bfloat162 *>(x + group * group_len);
    __nv_bfloat162 *yg = reinterpret_cast<__nv_bfloat162 *>(y + group * group_len);
    for (long long p = begin / 2 + threadIdx.x; p < end / 2; p += GN_THREADS) {
        // Both values of a pair share a channel: channel_len is even.
        const int c = first_channel + (int)((unsigned)p / channel_pairs);
        const float2 scale_shift = norm_scale_shift(weight[c], bias[c], mean, rstd);
        const float2 v = __bfloat1622float2(xg[p]);
        yg[p] = __floats2bfloat162_rn(norm_apply(v.x, scale_shift, silu),
                                      norm_apply(v.y, scale_shift, silu));
    }
}
