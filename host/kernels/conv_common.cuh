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

// What one thread of a THREADS-thread block copies per K step, for output pixels x0 … x0 +
// BM − 1 of row `row` and output channels n0 … n0 + 127: 16-byte chunk tid & 3 (8 input
// channels) of pixel rows tid / 4 + ROWS_PER_PASS·k (the BM + 2 the column taps reach; the
// last pass only for the 8 threads of the last two rows) and of weight rows likewise (the
// 3 · 128 of the three column taps). Everything but the step's row tap and channel slice is
// fixed, so it is computed once; each kernel says where in shared memory the rows go.
template <int BM, int THREADS> struct ConvCopies {
    static constexpr int ROWS_PER_PASS = THREADS / 4;
    static constexpr int A_PASSES = BM / ROWS_PER_PASS + 1;
    static constexpr int B_PASSES = 3 * CI_BN / ROWS_PER_PASS;
    static_assert(ROWS_PER_PASS % 8 == 0, "rows per pass keep a row's swizzle and core matrix");
    static_assert(BM % ROWS_PER_PASS == 0, "pixel rows in whole passes, plus two");
    static_assert(CI_BN % ROWS_PER_PASS == 0, "a weight pass within one column tap");

    const __nv_bfloat16 *xp;
    const __nv_bfloat16 *b_src;
    long long tap_stride;
    int a_src[A_PASSES];
    int row, wp, cin;
    bool last_rows; // this thread copies the last pass's pixel rows

    // xp: (h + 2) × (w + 2) × cin; wt: 9 × cout × cin.
    __device__ __forceinline__ ConvCopies(const __nv_bfloat16 *xp_, const __nv_bfloat16 *wt,
                                          int cin_, int cout, int w, int x0, int row_, int n0)
        : xp(xp_), row(row_), wp(w + 2), cin(cin_) {
        const int chunk = threadIdx.x & 3, first_row = threadIdx.x >> 2;
        // Pixel row k's column in the padded row. Columns past it feed only pixels past w,
        // which are not written: read the last column instead of leaving the row.
#pragma unroll
        for (int k = 0; k < A_PASSES; ++k) {
            a_src[k] = min(x0 + first_row + ROWS_PER_PASS * k, wp - 1) * cin + chunk * 8;
        }
        b_src = wt + (long long)(n0 + first_row) * cin + chunk * 8;
        tap_stride = (long long)cout * cin;
        last_rows = (int)threadIdx.x < 4 * 2;
    }

    // Step (dy, c0): pixel pass k to a + k·a_step, weight pass k to b + k·b_step (this
    // thread's shared-memory places of its first row's chunk and the step between passes).
    __device__ __forceinline__ void issue(int dy, int c0, unsigned char *a, int a_step,
                                          unsigned char *b, int b_step) const {
        const __nv_bfloat16 *src_row = xp + (long long)(row + dy) * wp * cin + c0;
#pragma unroll
        for (int k = 0; k < A_PASSES; ++k) {
            if (k < A_PASSES - 1 || last_rows) {
                cp_async_16(a + k * a_step, src_row + a_src[k], 16);
            }
        }
        const __nv_bfloat16 *b_tap = b_src + dy * 3 * tap_stride + c0;
#pragma unroll
        for (int k = 0; k < B_PASSES; ++k) {
            // Rows r = ROWS_PER_PASS·k + tid / 4: column tap r / 128, output channel r % 128.
            const int r0 = ROWS_PER_PASS * k;
            cp_async_16(b + k * b_step, b_tap + (r0 / CI_BN) * tap_stride + (r0 % CI_BN) * cin,
                        16);
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

// v[0..8) += the 8 bf16 values of the 16-byte vector at p (16-byte aligned).
__device__ __forceinline__ void add_bf16x8(float v[8], const __nv_bfloat16 *p) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *pairs = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(pairs[e]);
        v[2 * e] += f.x;
        v[2 * e + 1] += f.y;
    }
}

// v rounded to bf16 once and stored as one 16-byte vector at p (16-byte aligned).
__device__ __forceinline__ void store_bf16x8(__nv_bfloat16 *p, const float v[8]) {
    uint4 packed;
    __nv_bfloat162 *pairs = reinterpret_cast<__nv_bfloat162 *>(&packed);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        pairs[e] = __floats2bfloat162_rn(v[2 * e], v[2 * e + 1]);
    }
    *reinterpret_cast<uint4 *>(p) = packed;
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
            add_bf16x8(v, residual + at);
        }
        store_bf16x8(y + at, v);
    }
}
