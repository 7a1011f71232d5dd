// What the implicit-GEMM convolution kernels share (conv_implicit.cu with mma.sync,
// conv_wgmma.cu with Hopper's wgmma): the block's output channels and K step, the K loop's
// step cursor and refill, and the store of the output tile. The store writes the f32 tile the
// accumulators were staged into (shared memory, [channel][pixel], row stride `stride`
// floats) as NCHW bf16, with the bias and the residual added in f32 before the one rounding.
// No include guard, as lazy_softmax.cuh: the emulator's runner includes every kernel file in a
// namespace of its own, and each needs these definitions in its namespace.

#include <cuda_bf16.h>
#include <stdint.h>

#include "ptx_common.cuh"

#define CI_BN 128 // output channels per block
#define CI_BK 32  // input channels per K step

// The next K step to load: row tap dy and the first of 32 input channels (slices fastest).
struct ConvStep {
    int dy;
    int c0;
    int cin;
    __device__ __forceinline__ void advance() {
        c0 += CI_BK;
        if (c0 == cin) {
            c0 = 0;
            ++dy;
        }
    }
};

// Loads step `next` into ring stage `stage` by `load(dy, c0, stage)` and moves on, if a step
// is left (`loaded` of `steps` issued so far), then commits a cp.async group either way (the
// wait depths count groups, empty ones included).
template <class Load>
__device__ __forceinline__ void conv_load_step(Load &load, ConvStep &next, int loaded, int steps,
                                               int stage) {
    if (loaded < steps) {
        load(next.dy, next.c0, stage);
        next.advance();
    }
    cp_async_commit();
}

// 128 channels × BM / 8 runs of 8 pixels of row `row`, from pixel x0 on, by THREADS threads;
// runs past w (a multiple of 8) are skipped. y and residual (read when has_residual) are
// cout × h × w, 16-byte aligned.
template <int BM, int THREADS>
__device__ __forceinline__ void conv_store_tile(const float *tile, int stride,
                                                const __nv_bfloat16 *__restrict__ bias,
                                                const __nv_bfloat16 *__restrict__ residual,
                                                int has_residual, int n0, int x0, int row, int h,
                                                int w, __nv_bfloat16 *__restrict__ y) {
    constexpr int RUNS = BM / 8;
    const long long plane = (long long)h * w;
    for (int i = threadIdx.x; i < CI_BN * RUNS; i += THREADS) {
        const int n = i / RUNS, run = i % RUNS;
        const int px = x0 + run * 8;
        if (px >= w) {
            continue;
        }
        const float *src = tile + n * stride + run * 8;
        const float b = __bfloat162float(bias[n0 + n]);
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            v[e] = src[e] + b;
        }
        const long long at = (long long)(n0 + n) * plane + (long long)row * w + px;
        if (has_residual) {
            const uint4 raw = *reinterpret_cast<const uint4 *>(residual + at);
            const __nv_bfloat162 *pairs = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = __bfloat1622float2(pairs[e]);
                v[2 * e] += f.x;
                v[2 * e + 1] += f.y;
            }
        }
        uint4 packed;
        __nv_bfloat162 *out_pairs = reinterpret_cast<__nv_bfloat162 *>(&packed);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            out_pairs[e] = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
        }
        *reinterpret_cast<uint4 *>(y + at) = packed;
    }
}
