// Fused attention for Hopper (sm_90a) with warpgroup MMA: softmax(q·kᵀ·scale)·v for bf16 q, k, v
// (batch, tokens, heads, 128), written to o in the same layout. Not yet run on a GPU: opt-in
// (`HEADSHOT_FLASH_KERNEL=wgmma`), checked by `headshot bench gpu --check` like the mma.sync
// kernels of flash_attn.cu, and run on the CPU by host/kernels/emu.
//
// Why: the mma.sync kernels reach ~255 TFLOP/s on an H100, where PyTorch's SDPA reaches ~620
// (../shared/gpu/README.md): attention is ~52 ms of a 1024² step against ~21 ms. mma.sync
// issues a 16×8×16 product per warp instruction and every operand passes through registers;
// wgmma issues 64×N×16 per warpgroup instruction and reads its B operand (and here A of Q·Kᵀ)
// straight from shared memory, asynchronously.
//
// The scheme (flash-attention, as flash_attn.cu's wide32_lazy):
// - a block of 256 threads is two warpgroups of 64 query rows each; both read the same K and
//   V tiles of 64 keys, in a ring of two stages (three in the pipelined kernel) filled by
//   cp.async;
// - S = Q·Kᵀ: 8 × wgmma m64n64k16, Q and K from shared memory (both K-major);
// - the lazy softmax of wide32_lazy on S in registers (the accumulator's fragment layout is
//   mma.sync's, tiled over N);
// - O += P·V: 4 × wgmma m64n128k16 with P from registers (S's fragments packed to bf16 are
//   the A fragments) and V from shared memory. V must be K-major for that (keys contiguous),
//   so a first kernel writes Vᵀ (batch, heads, 128, keys_pad), zero-padded to whole tiles.
//
// Shared memory holds every operand in the canonical no-swizzle K-major layout of the PTX ISA
// ("matrix descriptor"): core matrices of 8 rows × 16 bytes (8 bf16 along K), each 128
// contiguous bytes; core matrices adjacent along K are 128 bytes apart (the descriptor's
// leading byte offset), adjacent 8-row groups `chunks`·128 bytes apart (its stride byte
// offset). A core matrix is read as one 128-byte line: no bank conflicts without a swizzle.
// cp.async writes each 16-byte chunk straight to its place; the 8 lanes of each quarter-warp
// write the 8 rows of one core matrix (conflict-free) while the warp reads 64 contiguous bytes
// from each of 8 rows of global memory.

#include <cuda_bf16.h>
#include <stdint.h>

#include "ptx_common.cuh"
#include "wgmma_common.cuh"
#include "lazy_softmax.cuh"

#define WG_HEAD_DIM 128
#define WG_KEYS 64
#define WG_ROWS 128
#define WG_THREADS 256
// Bytes of the Q tile (both warpgroups), a K tile, a Vᵀ tile; the block's dynamic shared
// memory is Q and two stages of K and Vᵀ: 98 304 bytes.
#define WG_Q_BYTES (WG_ROWS * WG_HEAD_DIM * 2)
#define WG_K_BYTES (WG_KEYS * WG_HEAD_DIM * 2)
#define WG_VT_BYTES (WG_HEAD_DIM * WG_KEYS * 2)
#define WG_STAGE_BYTES (WG_K_BYTES + WG_VT_BYTES)


// Byte offset of 16-byte chunk `c` (K elements 8c..8c+7) of row `r` in a K-major tile whose
// rows hold `chunks` chunks (the canonical no-swizzle layout above).
__device__ __forceinline__ uint32_t core_offset(int r, int c, int chunks) {
    return (uint32_t)((((r >> 3) * chunks + c) << 7) + ((r & 7) << 4));
}


// Copies ROWS × CHUNKS 16-byte chunks into a K-major tile: chunk (r, c) of the source comes
// from `src(r, c)` (a pointer and a byte count, 0 for zeros). Chunk i of the block's pass goes
// to lane i % 32 of warp-step i / 32, which covers rows 8·(step / (CHUNKS/4)) + lane % 8 and
// chunk 4·(step % (CHUNKS/4)) + lane / 8. Unrolled: a thread's chunk stays the same and its
// row steps by a constant, so each copy is a few instructions.
template <int ROWS, int CHUNKS, class Src>
__device__ __forceinline__ void load_tile(unsigned char *tile, Src src) {
    static_assert(ROWS * CHUNKS % WG_THREADS == 0 && CHUNKS % 4 == 0, "whole passes");
    constexpr int quads = CHUNKS / 4;
#pragma unroll
    for (int pass = 0; pass < ROWS * CHUNKS / WG_THREADS; ++pass) {
        const int i = threadIdx.x + pass * WG_THREADS;
        const int step = i >> 5, lane = i & 31;
        const int r = (step / quads) * 8 + (lane & 7);
        const int c = (step % quads) * 4 + (lane >> 3);
        int bytes;
        const void *from = src(r, c, bytes);
        cp_async_16(tile + core_offset(r, c, CHUNKS), from, bytes);
    }
}

// Vᵀ for the wgmma kernels: v (batch, tokens, heads, 128) → vt (batch, heads, 128, keys_pad),
// keys past `tokens` zero (keys_pad a multiple of 64). Grid (keys_pad / 64, batch·heads),
// 256 threads; one 64-key tile through shared memory, read and written along rows. Tile rows
// are 130 values (65 words) apart, so the column reads of a warp (rows 2l, l = lane) fall in
// 16 banks, not the 4 that a 16-byte-aligned padding allows; the row writes go as 4-byte words.
#define VT_STRIDE (WG_HEAD_DIM + 2)
extern "C" __global__ void __launch_bounds__(256)
    headshot_transpose_v_bf16(const __nv_bfloat16 *__restrict__ v, __nv_bfloat16 *__restrict__ vt,
                              int tokens, int heads, int keys_pad) {
    __shared__ __align__(16) __nv_bfloat16 tile[WG_KEYS * VT_STRIDE];
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int kb = blockIdx.x * WG_KEYS;
    for (int i = threadIdx.x; i < WG_KEYS * (WG_HEAD_DIM / 8); i += 256) {
        const int r = i / (WG_HEAD_DIM / 8), c = i % (WG_HEAD_DIM / 8);
        const int key = kb + r;
        uint4 value = {0u, 0u, 0u, 0u};
        if (key < tokens) {
            value = *reinterpret_cast<const uint4 *>(
                v + (((size_t)b * tokens + key) * heads + h) * WG_HEAD_DIM + c * 8);
        }
        uint32_t *row = reinterpret_cast<uint32_t *>(tile + r * VT_STRIDE + c * 8);
        row[0] = value.x;
        row[1] = value.y;
        row[2] = value.z;
        row[3] = value.w;
    }
    __syncthreads();
    __nv_bfloat16 *out = vt + ((size_t)b * heads + h) * WG_HEAD_DIM * keys_pad + kb;
    for (int i = threadIdx.x; i < WG_HEAD_DIM * (WG_KEYS / 2); i += 256) {
        const int d = i / (WG_KEYS / 2), pair = i % (WG_KEYS / 2);
        __nv_bfloat162 two;
        two.x = tile[2 * pair * VT_STRIDE + d];
        two.y = tile[(2 * pair + 1) * VT_STRIDE + d];
        *reinterpret_cast<__nv_bfloat162 *>(out + (size_t)d * keys_pad + 2 * pair) = two;
    }
}

// P as the A fragments of P·V, from the exponentials lazy_softmax_rows left in S: k-step ks
// covers keys 16ks.., column groups 2ks and 2ks + 1.
__device__ __forceinline__ void pack_p(const float (&s)[8][4], uint32_t (&p)[4][4]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        p[j >> 1][(j & 1) * 2] = pack_bf16(s[j][0], s[j][1]);
        p[j >> 1][(j & 1) * 2 + 1] = pack_bf16(s[j][2], s[j][3]);
    }
}

// S = Q·Kᵀ for this warpgroup's 64 rows and a 64-key K tile, issued and committed (not waited
// for).
__device__ __forceinline__ void issue_scores(float (&s)[8][4], const unsigned char *q_tile,
                                             const unsigned char *kt) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    }
    fence_regs(s);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < WG_HEAD_DIM / 16; ++ks) {
        wgmma_m64n64k16_ss(s[0], smem_desc(q_tile + ks * 256, 16 * 128),
                           smem_desc(kt + ks * 256, 16 * 128), 1);
    }
    wgmma_commit();
}

// O += P·V for a 64-key Vᵀ tile (its rows are the 128 output columns, its K-major chunks the
// keys), issued and committed.
__device__ __forceinline__ void issue_pv(float (&acc)[16][4], uint32_t (&p)[4][4],
                                         const unsigned char *vtt) {
    fence_regs(acc);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        fence_regs(p[ks]);
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < WG_KEYS / 16; ++ks) {
        wgmma_m64n128k16_rs(acc[0], p[ks], smem_desc(vtt + ks * 256, 8 * 128));
    }
    wgmma_commit();
}

// The two kernels below. STAGES 2: each tile's S, softmax and P·V in turn, the next tile's
// loads in flight. STAGES 3 (PIPE): S of tile i+1 runs on the tensor cores while the softmax of
// tile i runs on the others (both warpgroups reach the softmax together, so without this the
// tensor cores idle through it), with tile i+2 loading; one more register set for S.
template <int STAGES>
__device__ __forceinline__ void flash_wgmma(const __nv_bfloat16 *__restrict__ q,
                                            const __nv_bfloat16 *__restrict__ k,
                                            const __nv_bfloat16 *__restrict__ vt,
                                            __nv_bfloat16 *__restrict__ o, int tokens, int heads,
                                            int keys_pad, float scale_log2) {
    DYNAMIC_SMEM(smem);
    unsigned char *ring = smem + WG_Q_BYTES;

    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int wg = threadIdx.x >> 7;
    const int warp = (threadIdx.x >> 5) & 3;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const size_t token_stride = (size_t)heads * WG_HEAD_DIM;
    const size_t base = ((size_t)b * tokens * heads + h) * WG_HEAD_DIM;
    const __nv_bfloat16 *vt_head = vt + ((size_t)b * heads + h) * WG_HEAD_DIM * keys_pad;
    const int first_row = blockIdx.x * WG_ROWS;

    // Tile `tile` lives in stage tile % STAGES: K, then Vᵀ.
    auto stage_of = [&](int tile) { return ring + (tile % STAGES) * WG_STAGE_BYTES; };
    auto load_kv = [&](int tile) {
        unsigned char *kt = stage_of(tile);
        const int kb = tile * WG_KEYS;
        load_tile<WG_KEYS, WG_HEAD_DIM / 8>(kt, [&](int r, int c, int &bytes) {
            const int key = kb + r;
            bytes = key < tokens ? 16 : 0;
            return (const void *)(k + base + (size_t)(key < tokens ? key : 0) * token_stride + c * 8);
        });
        load_tile<WG_HEAD_DIM, WG_KEYS / 8>(kt + WG_K_BYTES, [&](int r, int c, int &bytes) {
            bytes = 16;
            return (const void *)(vt_head + (size_t)r * keys_pad + kb + c * 8);
        });
    };

    // Q (both warpgroups' 64 rows, rows past the end zero) and the first K/Vᵀ stage: one group.
    load_tile<WG_ROWS, WG_HEAD_DIM / 8>(smem, [&](int r, int c, int &bytes) {
        const int row = first_row + r;
        bytes = row < tokens ? 16 : 0;
        return (const void *)(q + base + (size_t)(row < tokens ? row : 0) * token_stride + c * 8);
    });
    load_kv(0);
    cp_async_commit();

    // This warpgroup's Q rows: 64 rows = 8 row groups of 16 chunks each.
    const unsigned char *q_tile = smem + wg * (WG_Q_BYTES / 2);
    float acc[16][4];
#pragma unroll
    for (int n = 0; n < 16; ++n) {
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    }
    // Rows g and g + 8 of this warp's 16: their maxima (log2 units, scaled) and sums.
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    uint32_t p[4][4];
    float s[8][4];

    const int tiles = (tokens + WG_KEYS - 1) / WG_KEYS;
    if (STAGES == 2) {
        for (int it = 0; it < tiles; ++it) {
            if (it + 1 < tiles) {
                load_kv(it + 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            fence_proxy_async();
            __syncthreads();
            issue_scores(s, q_tile, stage_of(it));
            wgmma_wait<0>();
            fence_regs(s);
            lazy_softmax_rows(s, acc, row_max, row_sum, it * WG_KEYS, tokens, t, scale_log2);
            pack_p(s, p);
            issue_pv(acc, p, stage_of(it) + WG_K_BYTES);
            wgmma_wait<0>();
            fence_regs(acc);
            // Both warpgroups are done with this stage before the next iteration refills it.
            __syncthreads();
        }
    } else {
        if (tiles > 1) {
            load_kv(1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_proxy_async();
        __syncthreads();
        issue_scores(s, q_tile, stage_of(0));
        wgmma_wait<0>();
        fence_regs(s);
        float s_next[8][4];
        for (int it = 0; it < tiles; ++it) {
            // Every warpgroup has retired P·V of tile it - 1: its stage takes tile it + 2.
            __syncthreads();
            if (it + 2 < tiles) {
                load_kv(it + 2);
                cp_async_commit();
            }
            if (it + 1 < tiles) {
                if (it + 2 < tiles) {
                    cp_async_wait<1>();
                } else {
                    cp_async_wait<0>();
                }
                fence_proxy_async();
                __syncthreads();
                issue_scores(s_next, q_tile, stage_of(it + 1));
            }
            lazy_softmax_rows(s, acc, row_max, row_sum, it * WG_KEYS, tokens, t, scale_log2);
            pack_p(s, p);
            issue_pv(acc, p, stage_of(it) + WG_K_BYTES);
            wgmma_wait<0>();
            fence_regs(acc);
            fence_regs(s_next);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    s[j][c] = s_next[j][c];
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], off);
        }
    }
    const float inv0 = 1.f / row_sum[0], inv1 = 1.f / row_sum[1];
    const int row0 = first_row + wg * 64 + warp * 16 + g;
    const int row1 = row0 + 8;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
        const int d = n * 8 + 2 * t;
        if (row0 < tokens) {
            *reinterpret_cast<uint32_t *>(o + base + row0 * token_stride + d) =
                pack_bf16(acc[n][0] * inv0, acc[n][1] * inv0);
        }
        if (row1 < tokens) {
            *reinterpret_cast<uint32_t *>(o + base + row1 * token_stride + d) =
                pack_bf16(acc[n][2] * inv1, acc[n][3] * inv1);
        }
    }
}

// Grid (ceil(tokens / 128), batch·heads), 256 threads, 98 304 bytes of dynamic shared memory
// (Q and two stages). vt from headshot_transpose_v_bf16; scale_log2 = log2(e)/√128.
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    headshot_flash_attn_wgmma_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                        const __nv_bfloat16 *__restrict__ k,
                                        const __nv_bfloat16 *__restrict__ vt,
                                        __nv_bfloat16 *__restrict__ o, int tokens, int heads,
                                        int keys_pad, float scale_log2) {
    flash_wgmma<2>(q, k, vt, o, tokens, heads, keys_pad, scale_log2);
}

// As above with three stages and S of the next tile overlapping the softmax: 131 072 bytes of
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    headshot_flash_attn_wgmma_pipe_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                             const __nv_bfloat16 *__restrict__ k,
                                             const __nv_bfloat16 *__restrict__ vt,
                                             __nv_bfloat16 *__restrict__ o, int tokens,
                                             int heads, int keys_pad, float scale_log2) {
    flash_wgmma<3>(q, k, vt, o, tokens, heads, keys_pad, scale_log2);
}
