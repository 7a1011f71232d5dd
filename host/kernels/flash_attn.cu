// Fused attention for FLUX on NVIDIA GPUs (sm_80+; built for the card's compute capability).
//
// softmax(q·kᵀ·scale)·v for bf16 q, k, v laid out (batch, tokens, heads, 128), written to o
// in the same layout, so the caller reshapes to (batch, tokens, heads·128) for free. The
// flash-attention-2 scheme: each warp owns 16 or 32 query rows, keys and values stream
// through shared memory 64 at a time, scores live only in registers (online softmax in f32,
// exp2 with the log2(e) factor folded into the scale), and both products run on tensor cores
// through mma.sync m16n8k16 (bf16 in, f32 accumulate). The score fragment of q·kᵀ is reused
// as the A operand of p·v without leaving registers.
//
// Five kernels, all checked by `headshot bench gpu --check` and timed by `--ops`
// (docs/BENCHMARKS.md, H100): pipe4 (16 rows a warp, Q in registers; 180 TFLOP/s), wide
// (32 rows a warp, Q in shared memory; 260 TFLOP/s, a few registers spilled) and wide32 (the
// same, 32 keys at a time: 255 TFLOP/s, no spills; the model's default), and both wide
// kernels again with a lazy softmax (wide_lazy, wide32_lazy: fewer non-mma instructions, see
// flash_wide; not yet run on a GPU). A first kernel with
// synchronous tile loads and scalar fragment loads (125 TFLOP/s) and an 8-warp pipe kernel
// (176 TFLOP/s) were measured and removed.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4·g + t.
//   A 16×16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16×8:  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16×8:  c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)

#include <cuda_bf16.h>
#include <stdint.h>

#include "ptx_common.cuh"
#include "lazy_softmax.cuh"

#define HEAD_DIM 128
#define BLOCK_K 64
// Shared-memory rows padded by 16 bytes so the fragment loads of the 4 lanes of a group fall
// in different banks.
#define KV_STRIDE (HEAD_DIM + 8)

__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16 *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}

// ---------------------------------------------------------------------------------------------
// Pipelined kernel: the costs of a plain tiled kernel removed.
// - K and V tiles arrive through cp.async into a two-stage ring (dynamic shared memory,
//   2 × 2 × 64 × 136 bf16 = 69 632 bytes), so the next tile loads while this one computes.
// - B fragments come from ldmatrix: x4 for K (four 8×8 matrices, two k-steps per instruction)
//   and x4.trans for V (the transpose puts the key pairs a B fragment wants in one register),
//   instead of 32-bit and 16-bit scalar shared loads plus packing.
// - WARPS warps share each K/V tile (16 query rows per warp), so a tile read from L2 feeds
//   WARPS·16 query rows.
// Rows of a tile are 272 bytes apart (16-byte padding), so the 8 row addresses of each
// ldmatrix matrix fall in distinct bank groups.

#define PIPE_TILE (BLOCK_K * KV_STRIDE)

template <int WARPS>
__device__ __forceinline__ void flash_pipelined(const __nv_bfloat16 *__restrict__ q,
                                                const __nv_bfloat16 *__restrict__ k,
                                                const __nv_bfloat16 *__restrict__ v,
                                                __nv_bfloat16 *__restrict__ o, int tokens,
                                                int heads, float scale_log2) {
    constexpr int threads = WARPS * 32;
    DYNAMIC_SMEM(pipe_smem);
    __nv_bfloat16 *ring = reinterpret_cast<__nv_bfloat16 *>(pipe_smem);

    const int b = blockIdx.y / heads;
    const int h = blockIdx.y % heads;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane >> 2;
    const int t = lane & 3;
    const size_t token_stride = (size_t)heads * HEAD_DIM;
    const size_t base = ((size_t)b * tokens * heads + h) * HEAD_DIM;
    const int row0 = blockIdx.x * (WARPS * 16) + warp * 16 + g;
    const int row1 = row0 + 8;
    const bool in0 = row0 < tokens;
    const bool in1 = row1 < tokens;

    // Stage s holds K at ring + 2·s·PIPE_TILE and V right after it.
    auto load_tile = [&](int stage, int kb) {
        __nv_bfloat16 *kt = ring + stage * 2 * PIPE_TILE;
        __nv_bfloat16 *vt = kt + PIPE_TILE;
        for (int i = threadIdx.x; i < BLOCK_K * (HEAD_DIM / 8); i += threads) {
            const int r = i / (HEAD_DIM / 8);
            const int chunk = i % (HEAD_DIM / 8);
            const int key = kb + r;
            const int bytes = key < tokens ? 16 : 0;
            const size_t src = base + (size_t)(key < tokens ? key : 0) * token_stride + chunk * 8;
            cp_async_16(kt + r * KV_STRIDE + chunk * 8, k + src, bytes);
            cp_async_16(vt + r * KV_STRIDE + chunk * 8, v + src, bytes);
        }
        cp_async_commit();
    };

    const int tiles = (tokens + BLOCK_K - 1) / BLOCK_K;
    load_tile(0, 0);

    uint32_t qf[8][4];
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
        const int c = ks * 16 + 2 * t;
        qf[ks][0] = in0 ? load_pair(q + base + row0 * token_stride + c) : 0u;
        qf[ks][1] = in1 ? load_pair(q + base + row1 * token_stride + c) : 0u;
        qf[ks][2] = in0 ? load_pair(q + base + row0 * token_stride + c + 8) : 0u;
        qf[ks][3] = in1 ? load_pair(q + base + row1 * token_stride + c + 8) : 0u;
    }

    float acc[16][4];
#pragma unroll
    for (int n = 0; n < 16; ++n) {
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    }
    float max0 = -INFINITY, max1 = -INFINITY;
    float sum0 = 0.f, sum1 = 0.f;

    // ldmatrix row addresses: lane L feeds row (L & 7) of matrix (L >> 3).
    const int mat = lane >> 3;
    const int mrow = lane & 7;

    for (int it = 0; it < tiles; ++it) {
        const int kb = it * BLOCK_K;
        if (it + 1 < tiles) {
            load_tile((it + 1) & 1, kb + BLOCK_K);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16 *kt = ring + (it & 1) * 2 * PIPE_TILE;
        const __nv_bfloat16 *vt = kt + PIPE_TILE;

        // S = Q·Kᵀ: matrix m of the x4 load covers head dims p·32 + m·8, so its registers
        // are b0, b1 of k-step 2p and b0, b1 of k-step 2p+1.
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                uint32_t kf[4];
                ldmatrix_x4(kf, kt + (j * 8 + mrow) * KV_STRIDE + p * 32 + mat * 8);
                mma_bf16_16816(s[j], qf[2 * p], kf[0], kf[1]);
                mma_bf16_16816(s[j], qf[2 * p + 1], kf[2], kf[3]);
            }
        }

        float tile_max0 = -INFINITY, tile_max1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool valid = kb + j * 8 + 2 * t + e < tokens;
                s[j][e] = valid ? s[j][e] * scale_log2 : -INFINITY;
                s[j][2 + e] = valid ? s[j][2 + e] * scale_log2 : -INFINITY;
                tile_max0 = fmaxf(tile_max0, s[j][e]);
                tile_max1 = fmaxf(tile_max1, s[j][2 + e]);
            }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, off));
            tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, off));
        }
        const float new0 = fmaxf(max0, tile_max0);
        const float new1 = fmaxf(max1, tile_max1);
        const float corr0 = exp2f(max0 - new0);
        const float corr1 = exp2f(max1 - new1);
        max0 = new0;
        max1 = new1;
        sum0 *= corr0;
        sum1 *= corr1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = exp2f(s[j][0] - new0);
            s[j][1] = exp2f(s[j][1] - new0);
            s[j][2] = exp2f(s[j][2] - new1);
            s[j][3] = exp2f(s[j][3] - new1);
            sum0 += s[j][0] + s[j][1];
            sum1 += s[j][2] + s[j][3];
        }
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            acc[n][0] *= corr0;
            acc[n][1] *= corr0;
            acc[n][2] *= corr1;
            acc[n][3] *= corr1;
        }

        // O += P·V: matrix m of the x4.trans load covers keys kk·16 + (m & 1)·8 and head
        // dims np·16 + (m >> 1)·8, so its registers are b0, b1 of column block 2np and b0, b1
        // of column block 2np+1.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const int key = kk * 16 + (mat & 1) * 8 + mrow;
#pragma unroll
            for (int np = 0; np < 8; ++np) {
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, vt + key * KV_STRIDE + np * 16 + (mat >> 1) * 8);
                mma_bf16_16816(acc[2 * np], a, vf[0], vf[1]);
                mma_bf16_16816(acc[2 * np + 1], a, vf[2], vf[3]);
            }
        }
        __syncthreads(); // this stage is refilled two iterations on
    }

#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        sum0 += __shfl_xor_sync(0xffffffffu, sum0, off);
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, off);
    }
    const float inv0 = 1.f / sum0;
    const float inv1 = 1.f / sum1;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
        const int d = n * 8 + 2 * t;
        if (in0) {
            *reinterpret_cast<uint32_t *>(o + base + row0 * token_stride + d) =
                pack_bf16(acc[n][0] * inv0, acc[n][1] * inv0);
        }
        if (in1) {
            *reinterpret_cast<uint32_t *>(o + base + row1 * token_stride + d) =
                pack_bf16(acc[n][2] * inv1, acc[n][3] * inv1);
        }
    }
}

// grid (ceil(tokens / 64), batch·heads), block 128 threads, 69 632 bytes dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128)
    headshot_flash_attn_pipe4_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                        const __nv_bfloat16 *__restrict__ k,
                                        const __nv_bfloat16 *__restrict__ v,
                                        __nv_bfloat16 *__restrict__ o, int tokens, int heads,
                                        float scale_log2) {
    flash_pipelined<4>(q, k, v, o, tokens, heads, scale_log2);
}

// ---------------------------------------------------------------------------------------------
// Wide variant (the flash-attention-2 layout): 4 warps × 32 query rows = 128 rows per block.
// Each K or V fragment loaded from shared memory now feeds two 16-row tiles, halving the
// shared-memory traffic per multiply, which bounds the kernels above (one ldmatrix.x4 per two
// mma). Q no longer fits in registers next to twice the accumulators, so it waits in shared
// memory and its fragments are reloaded per key tile. Dynamic shared memory: Q tile plus the
// two-stage K/V ring, (128 + 2·2·64) × 136 bf16 = 104 448 bytes.

#define WIDE_ROWS 128
#define WIDE_SMEM_Q (WIDE_ROWS * KV_STRIDE)

// STEP keys of the shared tile go through scores, softmax and P·V at a time: 64 keeps the
// most work per rescale, 32 halves the score registers (255 → fewer, no spills).
//
// LAZY trims the softmax's non-tensor-core work, which competes with the mma instructions for
// issue slots (per 32-key step a warp issues 128 mma next to ~300 other instructions): see
// lazy_softmax.cuh, which flash_wgmma.cu's kernels share.

template <int STEP, bool LAZY>
__device__ __forceinline__ void flash_wide(const __nv_bfloat16 *__restrict__ q,
                                           const __nv_bfloat16 *__restrict__ k,
                                           const __nv_bfloat16 *__restrict__ v,
                                           __nv_bfloat16 *__restrict__ o, int tokens, int heads,
                                           float scale_log2) {
    constexpr int GROUPS = STEP / 8;
    DYNAMIC_SMEM(wide_smem);
    __nv_bfloat16 *q_tile = reinterpret_cast<__nv_bfloat16 *>(wide_smem);
    __nv_bfloat16 *ring = q_tile + WIDE_SMEM_Q;

    const int b = blockIdx.y / heads;
    const int h = blockIdx.y % heads;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int mat = lane >> 3;
    const int mrow = lane & 7;
    const size_t token_stride = (size_t)heads * HEAD_DIM;
    const size_t base = ((size_t)b * tokens * heads + h) * HEAD_DIM;
    const int block_row = blockIdx.x * WIDE_ROWS;

    // Q tile (rows past the end are zeros) joins the first K/V group.
    for (int i = threadIdx.x; i < WIDE_ROWS * (HEAD_DIM / 8); i += 128) {
        const int r = i / (HEAD_DIM / 8);
        const int chunk = i % (HEAD_DIM / 8);
        const int row = block_row + r;
        const size_t src = base + (size_t)(row < tokens ? row : 0) * token_stride + chunk * 8;
        cp_async_16(q_tile + r * KV_STRIDE + chunk * 8, q + src, row < tokens ? 16 : 0);
    }
    auto load_tile = [&](int stage, int kb) {
        __nv_bfloat16 *kt = ring + stage * 2 * PIPE_TILE;
        __nv_bfloat16 *vt = kt + PIPE_TILE;
        for (int i = threadIdx.x; i < BLOCK_K * (HEAD_DIM / 8); i += 128) {
            const int r = i / (HEAD_DIM / 8);
            const int chunk = i % (HEAD_DIM / 8);
            const int key = kb + r;
            const int bytes = key < tokens ? 16 : 0;
            const size_t src = base + (size_t)(key < tokens ? key : 0) * token_stride + chunk * 8;
            cp_async_16(kt + r * KV_STRIDE + chunk * 8, k + src, bytes);
            cp_async_16(vt + r * KV_STRIDE + chunk * 8, v + src, bytes);
        }
        cp_async_commit();
    };
    const int tiles = (tokens + BLOCK_K - 1) / BLOCK_K;
    load_tile(0, 0);

    float acc[2][16][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
        }
    }
    // Row statistics: [m-tile][0: row g, 1: row g+8].
    float row_max[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
    float row_sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    // This warp's rows in the Q tile: m-tile mt covers warp·32 + mt·16 .. +15.
    const __nv_bfloat16 *q_warp = q_tile + (warp * 32) * KV_STRIDE;

    for (int it = 0; it < tiles; ++it) {
        const int kb = it * BLOCK_K;
        if (it + 1 < tiles) {
            load_tile((it + 1) & 1, kb + BLOCK_K);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const __nv_bfloat16 *kt = ring + (it & 1) * 2 * PIPE_TILE;
        const __nv_bfloat16 *vt = kt + PIPE_TILE;

#pragma unroll 1
        for (int step = 0; step < BLOCK_K / STEP; ++step) {
        const int k0 = step * STEP;
        float s[2][GROUPS][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int j = 0; j < GROUPS; ++j) {
                s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
            }
        }
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            // A fragments of k-steps 2p and 2p+1 for both m-tiles: matrix m of the x4 load
            // holds rows (m & 1)·8.., head dims (m >> 1)·8.. of the 16×16 block.
            uint32_t qa[2][2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    ldmatrix_x4(qa[mt][e], q_warp + (mt * 16 + (mat & 1) * 8 + mrow) * KV_STRIDE +
                                               (2 * p + e) * 16 + (mat >> 1) * 8);
                }
            }
#pragma unroll
            for (int j = 0; j < GROUPS; ++j) {
                uint32_t kf[4];
                ldmatrix_x4(kf, kt + (k0 + j * 8 + mrow) * KV_STRIDE + p * 32 + mat * 8);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_bf16_16816(s[mt][j], qa[mt][0], kf[0], kf[1]);
                    mma_bf16_16816(s[mt][j], qa[mt][1], kf[2], kf[3]);
                }
            }
        }

        if constexpr (LAZY) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                lazy_softmax_rows(s[mt], acc[mt], row_max[mt], row_sum[mt], kb + k0, tokens, t,
                                  scale_log2);
            }
        } else {
    #pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                float tile_max0 = -INFINITY, tile_max1 = -INFINITY;
    #pragma unroll
                for (int j = 0; j < GROUPS; ++j) {
    #pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const bool valid = kb + k0 + j * 8 + 2 * t + e < tokens;
                        s[mt][j][e] = valid ? s[mt][j][e] * scale_log2 : -INFINITY;
                        s[mt][j][2 + e] = valid ? s[mt][j][2 + e] * scale_log2 : -INFINITY;
                        tile_max0 = fmaxf(tile_max0, s[mt][j][e]);
                        tile_max1 = fmaxf(tile_max1, s[mt][j][2 + e]);
                    }
                }
    #pragma unroll
                for (int off = 1; off <= 2; off <<= 1) {
                    tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, off));
                    tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, off));
                }
                const float new0 = fmaxf(row_max[mt][0], tile_max0);
                const float new1 = fmaxf(row_max[mt][1], tile_max1);
                const float corr0 = exp2f(row_max[mt][0] - new0);
                const float corr1 = exp2f(row_max[mt][1] - new1);
                row_max[mt][0] = new0;
                row_max[mt][1] = new1;
                row_sum[mt][0] *= corr0;
                row_sum[mt][1] *= corr1;
    #pragma unroll
                for (int j = 0; j < GROUPS; ++j) {
                    s[mt][j][0] = exp2f(s[mt][j][0] - new0);
                    s[mt][j][1] = exp2f(s[mt][j][1] - new0);
                    s[mt][j][2] = exp2f(s[mt][j][2] - new1);
                    s[mt][j][3] = exp2f(s[mt][j][3] - new1);
                    row_sum[mt][0] += s[mt][j][0] + s[mt][j][1];
                    row_sum[mt][1] += s[mt][j][2] + s[mt][j][3];
                }
    #pragma unroll
                for (int n = 0; n < 16; ++n) {
                    acc[mt][n][0] *= corr0;
                    acc[mt][n][1] *= corr0;
                    acc[mt][n][2] *= corr1;
                    acc[mt][n][3] *= corr1;
                }
            }
        }

#pragma unroll
        for (int kk = 0; kk < STEP / 16; ++kk) {
            uint32_t a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                a[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
            const int key = k0 + kk * 16 + (mat & 1) * 8 + mrow;
#pragma unroll
            for (int np = 0; np < 8; ++np) {
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, vt + key * KV_STRIDE + np * 16 + (mat >> 1) * 8);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_bf16_16816(acc[mt][2 * np], a[mt], vf[0], vf[1]);
                    mma_bf16_16816(acc[mt][2 * np + 1], a[mt], vf[2], vf[3]);
                }
            }
        }
        }
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
        float sum0 = row_sum[mt][0], sum1 = row_sum[mt][1];
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, off);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, off);
        }
        const float inv0 = 1.f / sum0;
        const float inv1 = 1.f / sum1;
        const int row0 = block_row + warp * 32 + mt * 16 + g;
        const int row1 = row0 + 8;
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            const int d = n * 8 + 2 * t;
            if (row0 < tokens) {
                *reinterpret_cast<uint32_t *>(o + base + row0 * token_stride + d) =
                    pack_bf16(acc[mt][n][0] * inv0, acc[mt][n][1] * inv0);
            }
            if (row1 < tokens) {
                *reinterpret_cast<uint32_t *>(o + base + row1 * token_stride + d) =
                    pack_bf16(acc[mt][n][2] * inv1, acc[mt][n][3] * inv1);
            }
        }
    }
}

// grid (ceil(tokens / 128), batch·heads), block 128 threads, 104 448 bytes dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128)
    headshot_flash_attn_wide_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                       const __nv_bfloat16 *__restrict__ k,
                                       const __nv_bfloat16 *__restrict__ v,
                                       __nv_bfloat16 *__restrict__ o, int tokens, int heads,
                                       float scale_log2) {
    flash_wide<64, false>(q, k, v, o, tokens, heads, scale_log2);
}

// As above, 32 keys at a time.
extern "C" __global__ void __launch_bounds__(128)
    headshot_flash_attn_wide32_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                         const __nv_bfloat16 *__restrict__ k,
                                         const __nv_bfloat16 *__restrict__ v,
                                         __nv_bfloat16 *__restrict__ o, int tokens, int heads,
                                         float scale_log2) {
    flash_wide<32, false>(q, k, v, o, tokens, heads, scale_log2);
}

// wide32 with the lazy softmax (see flash_wide).
extern "C" __global__ void __launch_bounds__(128)
    headshot_flash_attn_wide32_lazy_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                              const __nv_bfloat16 *__restrict__ k,
                                              const __nv_bfloat16 *__restrict__ v,
                                              __nv_bfloat16 *__restrict__ o, int tokens,
                                              int heads, float scale_log2) {
    flash_wide<32, true>(q, k, v, o, tokens, heads, scale_log2);
}

// wide (64 keys a step) with the lazy softmax.
extern "C" __global__ void __launch_bounds__(128)
    headshot_flash_attn_wide_lazy_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                            const __nv_bfloat16 *__restrict__ k,
                                            const __nv_bfloat16 *__restrict__ v,
                                            __nv_bfloat16 *__restrict__ o, int tokens,
                                            int heads, float scale_log2) {
    flash_wide<64, true>(q, k, v, o, tokens, heads, scale_log2);
}
