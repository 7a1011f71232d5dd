// Per-tensor FP8 (e4m3) quantization of bf16 activations for the FP8 GEMM: one pass for
// max |x|, one pass to scale and convert. The scale (amax / 448, so the largest value maps to
// e4m3's largest finite value) stays on the device: cuBLASLt reads it through its
// B_SCALE_POINTER, and nothing waits for the host.
//
// Per-row quantization (headshot_quantize_rows_e4m3): one block per row finds the row's max
// |x| and converts it, so each token (and each output channel of a weight) gets its own scale
// and the activations are read from memory once instead of twice. The row may be two bf16
// sources joined (the single block's attention output and MLP hidden layer), which spares
// the join as a separate copy.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#define E4M3_MAX 448.f

// max |v| of 8 packed bf16.
__device__ __forceinline__ float absmax8(uint4 v) {
    const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&v);
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(p[j]);
        m = fmaxf(m, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
    return m;
}

// 8 packed bf16 times `inv`, as 8 e4m3 (saturating to the largest finite value).
__device__ __forceinline__ uint2 e4m3x8(uint4 v, float inv) {
    const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&v);
    uint32_t packed[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        float2 lo = __bfloat1622float2(p[2 * j]);
        float2 hi = __bfloat1622float2(p[2 * j + 1]);
        lo.x *= inv;
        lo.y *= inv;
        hi.x *= inv;
        hi.y *= inv;
        const uint32_t l = __nv_cvt_float2_to_fp8x2(lo, __NV_SATFINITE, __NV_E4M3);
        const uint32_t h = __nv_cvt_float2_to_fp8x2(hi, __NV_SATFINITE, __NV_E4M3);
        packed[j] = l | (h << 16);
    }
    return make_uint2(packed[0], packed[1]);
}

// max |x| over n values into *amax, which must start at 0. Grid-stride over 8-value chunks
// (x 16-byte aligned), then a warp reduction and one atomicMax per warp on the float's bits:
// non-negative floats order like their bit patterns read as signed ints.
extern "C" __global__ void headshot_amax_bf16(const __nv_bfloat16 *__restrict__ x,
                                              unsigned long long n, float *amax) {
    float m = 0.f;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long first = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long chunks = n / 8;
    const uint4 *x8 = reinterpret_cast<const uint4 *>(x);
    for (unsigned long long i = first; i < chunks; i += stride) {
        m = fmaxf(m, absmax8(x8[i]));
    }
    for (unsigned long long i = chunks * 8 + first; i < n; i += stride) {
        m = fmaxf(m, fabsf(__bfloat162float(x[i])));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    }
    if ((threadIdx.x & 31) == 0) {
        atomicMax(reinterpret_cast<int *>(amax), __float_as_int(m));
    }
}

// out = e4m3(x · 448 / amax) (saturating), and *scale = amax / 448 for the GEMM.
extern "C" __global__ void headshot_quantize_e4m3(const __nv_bfloat16 *__restrict__ x,
                                                  unsigned long long n,
                                                  const float *__restrict__ amax,
                                                  __nv_fp8_storage_t *__restrict__ out,
                                                  float *__restrict__ scale) {
    const float a = fmaxf(*amax, 1e-12f);
    const float inv = E4M3_MAX / a;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        *scale = a / E4M3_MAX;
    }
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long first = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long chunks = n / 8;
    const uint4 *x8 = reinterpret_cast<const uint4 *>(x);
    uint2 *out8 = reinterpret_cast<uint2 *>(out);
    for (unsigned long long i = first; i < chunks; i += stride) {
        out8[i] = e4m3x8(x8[i], inv);
    }
    for (unsigned long long i = chunks * 8 + first; i < n; i += stride) {
        out[i] = __nv_cvt_float_to_fp8(__bfloat162float(x[i]) * inv, __NV_SATFINITE, __NV_E4M3);
    }
}

// Row r of the joined input is a's row r (a_width values) followed by b's row r (b_width
// values; 0 when there is one source, b then unread). out's row r (a_width + b_width bytes)
// is that row times 448 / max|row| in e4m3, and scales[r] = max|row| / 448. Widths are
// multiples of 8 and the sources 16-byte aligned (8 values per load). One block of
// blockDim.x (a multiple of 32, at most 1024) threads per row, grid-stride over rows; the
// second pass re-reads the row, which the first has just brought into the caches.
extern "C" __global__ void headshot_quantize_rows_e4m3(const __nv_bfloat16 *__restrict__ a,
                                                       unsigned int a_width,
                                                       const __nv_bfloat16 *__restrict__ b,
                                                       unsigned int b_width, unsigned int rows,
                                                       __nv_fp8_storage_t *__restrict__ out,
                                                       float *__restrict__ scales) {
    __shared__ float warp_max[32];
    const unsigned int chunks_a = a_width / 8;
    const unsigned int chunks = chunks_a + b_width / 8;
    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        const uint4 *a8 = reinterpret_cast<const uint4 *>(a + (size_t)row * a_width);
        const uint4 *b8 = reinterpret_cast<const uint4 *>(b + (size_t)row * b_width);
        float m = 0.f;
        for (unsigned int i = threadIdx.x; i < chunks; i += blockDim.x) {
            m = fmaxf(m, absmax8(i < chunks_a ? a8[i] : b8[i - chunks_a]));
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        }
        if (lane == 0) {
            warp_max[warp] = m;
        }
        __syncthreads();
        if (warp == 0) {
            m = lane < blockDim.x / 32 ? warp_max[lane] : 0.f;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
            }
            if (lane == 0) {
                warp_max[0] = m;
            }
        }
        __syncthreads();
        const float amax = fmaxf(warp_max[0], 1e-12f);
        const float inv = E4M3_MAX / amax;
        if (threadIdx.x == 0) {
            scales[row] = amax / E4M3_MAX;
        }
        uint2 *o8 = reinterpret_cast<uint2 *>(out + (size_t)row * (a_width + b_width));
        for (unsigned int i = threadIdx.x; i < chunks; i += blockDim.x) {
            o8[i] = e4m3x8(i < chunks_a ? a8[i] : b8[i - chunks_a], inv);
        }
        // warp_max is read above by every thread before the next row overwrites it.
        __syncthreads();
    }
}
