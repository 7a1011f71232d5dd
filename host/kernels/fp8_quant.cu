// Per-tensor FP8 (e4m3) quantization of bf16 activations for the FP8 GEMM: one pass for
// max |x|, one pass to scale and convert. The scale (amax / 448, so the largest value maps to
// e4m3's largest finite value) stays on the device: cuBLASLt reads it through its
// B_SCALE_POINTER, and nothing waits for the host.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#define E4M3_MAX 448.f

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
        uint4 v = x8[i];
        const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(p[j]);
            m = fmaxf(m, fmaxf(fabsf(f.x), fabsf(f.y)));
        }
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
        uint4 v = x8[i];
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
        out8[i] = make_uint2(packed[0], packed[1]);
    }
    for (unsigned long long i = chunks * 8 + first; i < n; i += stride) {
        out[i] = __nv_cvt_float_to_fp8(__bfloat162float(x[i]) * inv, __NV_SATFINITE, __NV_E4M3);
    }
}
