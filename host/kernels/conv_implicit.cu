// The decoder's 3×3 convolutions as one implicit-GEMM kernel on tensor cores (mma.sync
// m16n8k16, bf16 in, f32 accumulate), with what surrounds them folded into two passes:
//
//   headshot_conv_prep_nhwc_bf16:  one image's NCHW activations → zero-padded NHWC
//     ((h + 2) × (w + 2) × C), applying on the way, when asked, the group norm (per-group
//     mean and 1/std from group_norm.cu's stats and finalize launches, per-channel weight
//     and bias) and SiLU, and reading through 2× nearest upsampling. The norm's output and
//     the upsampled image are never written. headshot_conv_prep_nhwc_vec_bf16 is the same
//     pass with 16-byte loads and stores, where the source rows are whole 16-byte vectors.
//   headshot_conv3x3_nhwc_bf16:    y[o][r][c] = bias[o] + Σ_{dy,dx,i} w[dy][dx][o][i] ·
//     xp[r + dy][c + dx][i] (+ residual[o][r][c]), NCHW out. The padded input makes every
//     tap a plain load: no bounds tests in the inner loop.
//
// The convolution kernel: a block computes BM output pixels of one row × 128 output
// channels, warps of 64 pixels × 32 channels each (BM = 128, 8 warps, two blocks an SM; or
// the wide kernel's BM = 256, 16 warps, one block an SM). Its K loop runs over the row taps
// dy and 32-channel slices: per step the block loads BM + 2 input pixels (the BM plus the two
// columns the column taps reach) × 32 channels, and the weights of the three column taps for
// its 128 channels × 32; each column tap dx then reads the same pixel tile from row dx on.
// Loads are cp.async into a three-stage ring, so two steps load while one computes.
// Shared-memory rows are 64 bytes (32 channels); the 16-byte chunk c of row r is stored at
// chunk c ^ ((r >> 1) & 3), so the 8 rows of every ldmatrix, from any starting row, fall in
// 8 distinct bank groups.
// The epilogue stages the f32 tile in shared memory as [channel][pixel] and writes each
// channel's pixels as 16-byte runs of NCHW output, with the bias and the residual (the
// resnet's skip connection) added in f32 before the one rounding to bf16.

#include <cuda_bf16.h>
#include <stdint.h>

#include "conv_common.cuh"
#include "norm_apply.cuh"
#include "ptx_common.cuh"

// ---- prep ------------------------------------------------------------------------------------

// grid ((w + 2 + 31) / 32, h + 2, channels / 32), block 256. Block (bx, r, bz) writes
// padded row r, padded columns 32·bx…, channels 32·bz…: read as 32-column runs of each
// channel (coalesced in NCHW), transposed through shared memory, written as 32-channel runs
// of each pixel (coalesced in NHWC). `h`, `w`: the (upsampled) output size; x is
// channels × (h >> up) × (w >> up). With `norm`, stats holds (mean, 1/std) per group of this
// image and gamma/beta the norm's per-channel weight and bias; without it they are not read.
extern "C" __global__ void __launch_bounds__(256)
    headshot_conv_prep_nhwc_bf16(const __nv_bfloat16 *__restrict__ x, int channels, int h,
                                 int w, int up, int norm, const float *__restrict__ stats,
                                 const __nv_bfloat16 *__restrict__ gamma,
                                 const __nv_bfloat16 *__restrict__ beta, int groups, int silu,
                                 __nv_bfloat16 *__restrict__ out) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int r = blockIdx.y;
    const int col0 = blockIdx.x * 32;
    const int c0 = blockIdx.z * 32;
    const int hs = h >> up, ws = w >> up;
    const int sr = r - 1, sc = col0 + tx - 1;
    const bool inside = sr >= 0 && sr < h && sc >= 0 && sc < w;
    const int per_group = channels / groups;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int cl = ty + 8 * i;
        const int c = c0 + cl;
        float v = 0.f;
        if (inside) {
            v = __bfloat162float(x[((long long)c * hs + (sr >> up)) * ws + (sc >> up)]);
            if (norm) {
                const int g = c / per_group;
                const float2 scale_shift =
                    norm_scale_shift(gamma[c], beta[c], stats[2 * g], stats[2 * g + 1]);
                v = norm_apply(v, scale_shift, silu);
            }
        }
        tile[cl][tx] = v;
    }
    __syncthreads();
    const int wp = w + 2;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int col = col0 + ty + 8 * i;
        if (col < wp) {
            out[((long long)r * wp + col) * channels + c0 + tx] =
                __float2bfloat16(tile[tx][ty + 8 * i]);
        }
    }
}

// Where the source rows are whole 16-byte vectors ((w >> up) a multiple of 8), the same pass
// with 16-byte loads and stores: grid ((w + 63) / 64, h + 2, channels / 32), block 256. Block
// (bx, r, bz) writes padded row r, image columns 64·bx … 64·bx + 63 (padded columns one
// further on), channels 32·bz …, and the blocks at either end the zero border columns. Load:
// warp v, lane c reads source pixels 8v … 8v + 7 of the block's columns (the first 32 source
// pixels with upsampling, 64 output columns) of channel c, normalized in f32, into a bf16
// tile [column][channel] (64-byte rows: a warp's 2-byte stores of one column fill one row).
// Store: thread j·4 + v writes 16 bytes, channels 8v … 8v + 7 of column j.
extern "C" __global__ void __launch_bounds__(256)
    headshot_conv_prep_nhwc_vec_bf16(const __nv_bfloat16 *__restrict__ x, int channels, int h,
                                     int w, int up, int norm, const float *__restrict__ stats,
                                     const __nv_bfloat16 *__restrict__ gamma,
                                     const __nv_bfloat16 *__restrict__ beta, int groups,
                                     int silu, __nv_bfloat16 *__restrict__ out) {
    __shared__ __align__(16) __nv_bfloat16 tile[64][32];
    const int tid = threadIdx.x;
    const int r = blockIdx.y;
    const int col0 = blockIdx.x * 64;
    const int c0 = blockIdx.z * 32;
    const int hs = h >> up, ws = w >> up;
    const int sr = r - 1;
    {
        const int v = tid >> 5, cl = tid & 31, c = c0 + cl;
        const int src = (col0 >> up) + 8 * v; // first source pixel of this vector
        if (v < (8 >> up)) {
            float vals[8];
            const bool inside = sr >= 0 && sr < h && src < ws;
            if (inside) {
                const uint4 raw = *reinterpret_cast<const uint4 *>(
                    x + ((long long)c * hs + (sr >> up)) * ws + src);
                const __nv_bfloat162 *pairs = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __bfloat1622float2(pairs[e]);
                    vals[2 * e] = f.x;
                    vals[2 * e + 1] = f.y;
                }
                if (norm) {
                    const int g = c / (channels / groups);
                    const float2 scale_shift =
                        norm_scale_shift(gamma[c], beta[c], stats[2 * g], stats[2 * g + 1]);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        vals[e] = norm_apply(vals[e], scale_shift, silu);
                    }
                }
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    vals[e] = 0.f;
                }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const __nv_bfloat16 b = __float2bfloat16(vals[e]);
                const int col = ((8 * v + e) << up);
                tile[col][cl] = b;
                if (up) {
                    tile[col + 1][cl] = b;
                }
            }
        }
    }
    __syncthreads();
    const int wp = w + 2;
    __nv_bfloat16 *row_out = out + (long long)r * wp * channels + c0;
    {
        const int j = tid >> 2, v = tid & 3;
        if (col0 + j < w) {
            *reinterpret_cast<uint4 *>(row_out + (long long)(col0 + j + 1) * channels + 8 * v) =
                *reinterpret_cast<const uint4 *>(&tile[j][8 * v]);
        }
    }
    // The border columns: padded column 0 by the first block of the row, w + 1 by the last.
    const uint4 zero = {0u, 0u, 0u, 0u};
    if (tid < 4 && blockIdx.x == 0) {
        *reinterpret_cast<uint4 *>(row_out + 8 * tid) = zero;
    }
    if (tid >= 4 && tid < 8 && col0 + 64 >= w) {
        *reinterpret_cast<uint4 *>(row_out + (long long)(w + 1) * channels + 8 * (tid - 4)) = zero;
    }
}

// ---- convolution -----------------------------------------------------------------------------

#define CI_STAGES 3                        // cp.async ring depth
#define CI_ROW_BYTES (CI_BK * 2)           // one shared-memory row: 32 bf16
#define CI_B_BYTES (3 * CI_BN * CI_ROW_BYTES)

// Byte offset of 16-byte chunk `chunk` of shared-memory row `row` (the swizzle above).
__device__ __forceinline__ int ci_swizzle(int row, int chunk) {
    return row * CI_ROW_BYTES + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// The sizes of a block of WARPS_M × 4 warps: BM = 64 · WARPS_M output pixels of one row ×
// 128 output channels, each warp 64 pixels × 32 channels.
template <int WARPS_M> struct ConvTile {
    static constexpr int BM = 64 * WARPS_M;
    static constexpr int THREADS = 128 * WARPS_M;
    static constexpr int A_ROWS = BM + 2; // input pixels per K step
    static constexpr int A_BYTES = A_ROWS * CI_ROW_BYTES;
    static constexpr int STAGE_BYTES = A_BYTES + CI_B_BYTES;
    static constexpr int RING_BYTES = CI_STAGES * STAGE_BYTES;
    static constexpr int OUT_STRIDE = BM + 4; // f32 epilogue row: 16-byte runs, conflict-free
    static constexpr int OUT_BYTES = CI_BN * OUT_STRIDE * 4;
    // Dynamic shared memory: the ring, which the epilogue's f32 tile then reuses.
    static constexpr int SMEM_BYTES = RING_BYTES > OUT_BYTES ? RING_BYTES : OUT_BYTES;
    // Rows one pass of the block's threads copies (16-byte chunk tid & 3 of row tid / 4).
    static constexpr int ROWS_PER_PASS = THREADS / 4;
};

// One block of the convolution: grid ((w + BM - 1) / BM, h, cout / 128), block THREADS,
// dynamic shared memory SMEM_BYTES. xp: (h + 2) × (w + 2) × cin; wt: 9 × cout × cin (tap
// dy·3 + dx, then output channel, then input channel); bias: cout; residual (read when
// has_residual): cout × h × w; y: cout × h × w. cin a multiple of 32, cout of 128, w of 8
// (the wrapper checks).
template <int WARPS_M>
__device__ __forceinline__ void conv3x3_block(const __nv_bfloat16 *__restrict__ xp,
                                              const __nv_bfloat16 *__restrict__ wt,
                                              const __nv_bfloat16 *__restrict__ bias,
                                              const __nv_bfloat16 *__restrict__ residual,
                                              int has_residual, int cin, int cout, int h, int w,
                                              __nv_bfloat16 *__restrict__ y) {
    using T = ConvTile<WARPS_M>;
    DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int wm = warp % WARPS_M; // pixels wm·64 …
    const int wn = warp / WARPS_M; // channels wn·32 …
    const int x0 = blockIdx.x * T::BM;
    const int row = blockIdx.y;
    const int n0 = blockIdx.z * CI_BN;
    const int steps = 3 * (cin / CI_BK);

    // Rows ROWS_PER_PASS apart (a multiple of 8) have the swizzle of row tid / 4, so one
    // shared offset serves every pass.
    const ConvCopies<T::BM, T::THREADS> copies(xp, wt, cin, cout, w, x0, row, n0);
    const int dst0 = ci_swizzle(tid >> 2, tid & 3);
    constexpr int PASS_BYTES = T::ROWS_PER_PASS * CI_ROW_BYTES;
    auto load = [&](int dy, int c0, int stage) {
        unsigned char *a = smem + stage * T::STAGE_BYTES + dst0;
        copies.issue(dy, c0, a, PASS_BYTES, a + T::A_BYTES, PASS_BYTES);
    };

    float acc[4][4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[mt][nt][e] = 0.f;
            }
        }
    }

    // Steps run over (dy, channel slice), slices fastest; `next` is the next step to load.
    ConvStep next{0, 0, cin};
#pragma unroll
    for (int s = 0; s < CI_STAGES - 1; ++s) {
        conv_load_step(load, next, s, steps, s);
    }
    // ldmatrix rows of this lane: A row (pixel) lane & 15 of a 16-pixel tile, chunk lane >> 4
    // within a 16-channel half; B row (channel) (lane & 7) + 8·(lane >> 4) of a 16-channel
    // pair of n8 tiles, chunk (lane >> 3) & 1.
    const int a_row = wm * 64 + (lane & 15);
    const int a_chunk = lane >> 4;
    const int b_row = wn * 32 + (lane & 7) + ((lane >> 4) << 3);
    const int b_chunk = (lane >> 3) & 1;

    for (int t = 0; t < steps; ++t) {
        cp_async_wait<CI_STAGES - 2>();
        __syncthreads();
        // The stage step t - 1 read is free now (every warp is past the barrier).
        conv_load_step(load, next, t + CI_STAGES - 1, steps, (t + CI_STAGES - 1) % CI_STAGES);
        const unsigned char *a = smem + (t % CI_STAGES) * T::STAGE_BYTES;
        const unsigned char *b = a + T::A_BYTES;
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                // B for the warp's 32 channels first, then each 16-pixel A tile and its four
                // mma: one A fragment live at a time (the 64 accumulators leave little room).
                uint32_t bf[2][4];
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    ldmatrix_x4(bf[np],
                                b + ci_swizzle(dx * CI_BN + b_row + np * 16, ks * 2 + b_chunk));
                }
#pragma unroll
                for (int mt = 0; mt < 4; ++mt) {
                    uint32_t af[4];
                    ldmatrix_x4(af, a + ci_swizzle(a_row + mt * 16 + dx, ks * 2 + a_chunk));
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) {
                        mma_bf16_16816(acc[mt][nt], af, bf[nt >> 1][(nt & 1) * 2],
                                       bf[nt >> 1][(nt & 1) * 2 + 1]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // Accumulators → f32 tile [channel][pixel]: lane 4g + q holds pixels g, g + 8 of each
    // m16 tile at channels 2q, 2q + 1 of each n8 tile.
    float *tile = reinterpret_cast<float *>(smem);
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int m = wm * 64 + mt * 16 + g;
            const int n = wn * 32 + nt * 8 + 2 * q;
            tile[n * T::OUT_STRIDE + m] = acc[mt][nt][0];
            tile[(n + 1) * T::OUT_STRIDE + m] = acc[mt][nt][1];
            tile[n * T::OUT_STRIDE + m + 8] = acc[mt][nt][2];
            tile[(n + 1) * T::OUT_STRIDE + m + 8] = acc[mt][nt][3];
        }
    }
    __syncthreads();

    conv_store_tile<T::BM, T::THREADS>(tile, T::OUT_STRIDE, bias, residual, has_residual, n0, x0,
                                       row, h, w, y);
}

// 128 pixels × 128 channels a block, 8 warps, two blocks an SM (98 688 bytes of ring each,
// 128 registers a thread).
extern "C" __global__ void __launch_bounds__(256, 2)
    headshot_conv3x3_nhwc_bf16(const __nv_bfloat16 *__restrict__ xp,
                               const __nv_bfloat16 *__restrict__ wt,
                               const __nv_bfloat16 *__restrict__ bias,
                               const __nv_bfloat16 *__restrict__ residual, int has_residual,
                               int cin, int cout, int h, int w, __nv_bfloat16 *__restrict__ y) {
    conv3x3_block<2>(xp, wt, bias, residual, has_residual, cin, cout, h, w, y);
}

// 256 pixels × 128 channels a block, 16 warps, one block an SM: the weights, which every
// block reads from L2 per step, feed twice the pixels (153 against 95 multiply-add FLOP per
// byte loaded), for rows at least 256 wide.
extern "C" __global__ void __launch_bounds__(512, 1)
    headshot_conv3x3_wide_nhwc_bf16(const __nv_bfloat16 *__restrict__ xp,
                                    const __nv_bfloat16 *__restrict__ wt,
                                    const __nv_bfloat16 *__restrict__ bias,
                                    const __nv_bfloat16 *__restrict__ residual,
                                    int has_residual, int cin, int cout, int h, int w,
                                    __nv_bfloat16 *__restrict__ y) {
    conv3x3_block<4>(xp, wt, bias, residual, has_residual, cin, cout, h, w, y);
}

// ---- cuDNN's NHWC output back to NCHW --------------------------------------------------------

// HEADSHOT_CONV=implicit_cudnn: cuDNN convolves the prep pass's padded NHWC image, and this
// pass turns its NHWC output (hw pixels × cout channels, one image) into the decoder's NCHW,
// adding the bias and, when has_residual, the residual (cout × hw) in f32 before rounding.
// grid ((hw + 31) / 32, (cout + 31) / 32), block 256. Block (bx, by) moves pixels 32·bx…,
// channels 32·by…: read as 32-channel runs of each pixel (coalesced in NHWC), transposed
// through shared memory, written as 32-pixel runs of each channel (coalesced in NCHW).
extern "C" __global__ void __launch_bounds__(256)
    headshot_conv_nhwc_out_bf16(const __nv_bfloat16 *__restrict__ y_nhwc,
                                const __nv_bfloat16 *__restrict__ bias,
                                const __nv_bfloat16 *__restrict__ residual, int has_residual,
                                int cout, int hw, __nv_bfloat16 *__restrict__ y) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int p = p0 + ty + 8 * i, c = c0 + tx;
        if (p < hw && c < cout) {
            tile[ty + 8 * i][tx] = __bfloat162float(y_nhwc[(long long)p * cout + c]);
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = c0 + ty + 8 * i, p = p0 + tx;
        if (p < hw && c < cout) {
            const long long at = (long long)c * hw + p;
            float v = tile[tx][ty + 8 * i] + __bfloat162float(bias[c]);
            if (has_residual) {
                v += __bfloat162float(residual[at]);
            }
            y[at] = __float2bfloat16(v);
        }
    }
}

// ---- the bias and the residual on an NCHW output ---------------------------------------------

// HEADSHOT_CONV=cudnn: cuDNN's NCHW convolution output x (n values, channels planes of hw per
// image) plus the per-channel bias and, when has_residual, the residual (same shape), in f32
// before one rounding, into y: one pass where candle's broadcast add and then its add would
// take two. hw a multiple of 8, so each thread's 8 values (16 bytes) share a channel; n is
// the whole batch. grid (n / 8 + 255) / 256, block 256.
extern "C" __global__ void __launch_bounds__(256)
    headshot_bias_residual_nchw_bf16(const __nv_bfloat16 *__restrict__ x,
                                     const __nv_bfloat16 *__restrict__ bias,
                                     const __nv_bfloat16 *__restrict__ residual, int has_residual,
                                     int channels, long long hw, long long n,
                                     __nv_bfloat16 *__restrict__ y) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= n) {
        return;
    }
    const int c = (int)((i / hw) % channels);
    const float b = __bfloat162float(bias[c]);
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        v[e] = b;
    }
    add_bf16x8(v, x + i);
    if (has_residual) {
        add_bf16x8(v, residual + i);
    }
    store_bf16x8(y + i, v);
}
