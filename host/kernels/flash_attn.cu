// Fused attention for FLUX on NVIDIA GPUs (sm_80+; built for the card's compute capability).
//
// softmax(q·kᵀ·scale)·v for bf16 q, k, v laid out (batch, tokens, heads, 128), written to o
// in the same layout, so the caller reshapes to (batch, tokens, heads·128) for free. The
// flash-attention-2 scheme: each warp owns 16 query rows, keys and values stream through
// shared memory 64 at a time, scores live only in registers (online softmax in f32, exp2 with
// the log2(e) factor folded into the scale), and both products run on tensor cores through
// mma.sync m16n8k16 (bf16 in, f32 accumulate). The score fragment of q·kᵀ is reused as the A
// operand of p·v without leaving registers.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4·g + t.
//   A 16×16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16×8:  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16×8:  c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)

#include <cuda_bf16.h>
#include <stdint.h>

#define HEAD_DIM 128
#define BLOCK_Q 64
#define BLOCK_K 64
#define THREADS 128
// Shared-memory rows padded by 16 bytes so the fragment loads of the 4 lanes of a group fall
// in different banks.
#define KV_STRIDE (HEAD_DIM + 8)

__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ uint32_t pack_raw(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16 *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}

__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// grid (ceil(tokens / 64), batch·heads), block 128 threads. Pointers 16-byte aligned.
extern "C" __global__ void __launch_bounds__(THREADS)
    headshot_flash_attn_bf16_d128(const __nv_bfloat16 *__restrict__ q,
                                  const __nv_bfloat16 *__restrict__ k,
                                  const __nv_bfloat16 *__restrict__ v,
                                  __nv_bfloat16 *__restrict__ o, int tokens, int heads,
                                  float scale_log2) {
    __shared__ __align__(16) __nv_bfloat16 k_tile[BLOCK_K * KV_STRIDE];
    __shared__ __align__(16) __nv_bfloat16 v_tile[BLOCK_K * KV_STRIDE];

    const int b = blockIdx.y / heads;
    const int h = blockIdx.y % heads;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane >> 2;
    const int t = lane & 3;
    const size_t token_stride = (size_t)heads * HEAD_DIM;
    const size_t base = ((size_t)b * tokens * heads + h) * HEAD_DIM;
    const int row0 = blockIdx.x * BLOCK_Q + warp * 16 + g;
    const int row1 = row0 + 8;
    const bool in0 = row0 < tokens;
    const bool in1 = row1 < tokens;

    // This lane's part of the warp's 16 query rows, as A fragments for the 8 k-steps.
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
    float sum0 = 0.f, sum1 = 0.f; // this lane's share of the row sums

    for (int kb = 0; kb < tokens; kb += BLOCK_K) {
        __syncthreads(); // everyone is done with the previous tile
        for (int i = threadIdx.x; i < BLOCK_K * (HEAD_DIM / 8); i += THREADS) {
            const int r = i / (HEAD_DIM / 8);
            const int chunk = i % (HEAD_DIM / 8);
            const int key = kb + r;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u);
            uint4 vv = make_uint4(0u, 0u, 0u, 0u);
            if (key < tokens) {
                kv = *reinterpret_cast<const uint4 *>(k + base + key * token_stride + chunk * 8);
                vv = *reinterpret_cast<const uint4 *>(v + base + key * token_stride + chunk * 8);
            }
            *reinterpret_cast<uint4 *>(&k_tile[r * KV_STRIDE + chunk * 8]) = kv;
            *reinterpret_cast<uint4 *>(&v_tile[r * KV_STRIDE + chunk * 8]) = vv;
        }
        __syncthreads();

        // Scores for 16 rows × 64 keys: 8 C fragments of 8 keys.
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                const __nv_bfloat16 *kr = &k_tile[(j * 8 + g) * KV_STRIDE + ks * 16 + 2 * t];
                mma_bf16_16816(s[j], qf[ks], load_pair(kr), load_pair(kr + 8));
            }
        }

        // Online softmax (base 2): mask keys past the end, find the new row maxima.
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
        // Every tile holds at least one valid key, so the new maxima are finite.
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

        // acc += p · v: the score fragments become A operands (16 keys per k-step).
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t a[4];
            a[0] = pack_floats(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_floats(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_floats(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_floats(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            const int key = kk * 16 + 2 * t;
#pragma unroll
            for (int n = 0; n < 16; ++n) {
                const int d = n * 8 + g;
                const uint32_t b0 =
                    pack_raw(v_tile[key * KV_STRIDE + d], v_tile[(key + 1) * KV_STRIDE + d]);
                const uint32_t b1 = pack_raw(v_tile[(key + 8) * KV_STRIDE + d],
                                             v_tile[(key + 9) * KV_STRIDE + d]);
                mma_bf16_16816(acc[n], a, b0, b1);
            }
        }
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
                pack_floats(acc[n][0] * inv0, acc[n][1] * inv0);
        }
        if (in1) {
            *reinterpret_cast<uint32_t *>(o + base + row1 * token_stride + d) =
                pack_floats(acc[n][2] * inv1, acc[n][3] * inv1);
        }
    }
}
