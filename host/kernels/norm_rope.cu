// Query/key preparation for FLUX attention in one pass: RMSNorm over each head's 128 values
// (with the learned scale), then the rotary embedding, read straight out of the QKV
// projection's output and written as contiguous (batch, tokens, heads, 128) bf16. With plain
// candle ops this is a strided copy, the norm, and about ten f32 passes for the rotation.
//
// One warp per (token, head): lane l holds values 4l..4l+3, i.e. rotary pairs 2l and 2l+1.
// Math in f32; the rotary table is f32 (batch, tokens, 64).

#include <cuda_bf16.h>
#include <stdint.h>

#define NR_HEAD_DIM 128
#define NR_WARPS 8

// grid (ceil(rows·heads / 8), batch), block 256.
// src: this source's rows; element (b, t, h, i) at src[b·src_batch + t·src_token + h·128 + i]
//      (src already points at the q or k part of the projection).
// dst: (batch, dst_tokens, heads, 128); this source's row t lands at token dst_offset + t,
//      which is also its row in the rotary table (batch, dst_tokens, 64).
extern "C" __global__ void __launch_bounds__(NR_WARPS * 32)
    headshot_rmsnorm_rope_bf16(const __nv_bfloat16 *__restrict__ src, long long src_batch,
                               long long src_token, int rows, int heads,
                               const __nv_bfloat16 *__restrict__ scale,
                               const float *__restrict__ cos_table,
                               const float *__restrict__ sin_table,
                               __nv_bfloat16 *__restrict__ dst, int dst_tokens, int dst_offset,
                               float eps) {
    const int lane = threadIdx.x & 31;
    const long long item = (long long)blockIdx.x * NR_WARPS + (threadIdx.x >> 5);
    if (item >= (long long)rows * heads) {
        return;
    }
    const int t = (int)(item / heads);
    const int h = (int)(item % heads);
    const int b = blockIdx.y;

    const __nv_bfloat16 *x = src + b * src_batch + t * src_token + h * NR_HEAD_DIM + lane * 4;
    const uint2 raw = *reinterpret_cast<const uint2 *>(x);
    const __nv_bfloat162 *pair = reinterpret_cast<const __nv_bfloat162 *>(&raw);
    const float2 p0 = __bfloat1622float2(pair[0]);
    const float2 p1 = __bfloat1622float2(pair[1]);

    float ss = p0.x * p0.x + p0.y * p0.y + p1.x * p1.x + p1.y * p1.y;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, off);
    }
    const float r = rsqrtf(ss / NR_HEAD_DIM + eps);

    const uint2 sraw = *reinterpret_cast<const uint2 *>(scale + lane * 4);
    const __nv_bfloat162 *spair = reinterpret_cast<const __nv_bfloat162 *>(&sraw);
    const float2 s0 = __bfloat1622float2(spair[0]);
    const float2 s1 = __bfloat1622float2(spair[1]);
    const float a0 = p0.x * r * s0.x, a1 = p0.y * r * s0.y;
    const float c0 = p1.x * r * s1.x, c1 = p1.y * r * s1.y;

    const long long row = (long long)b * dst_tokens + dst_offset + t;
    const float2 cs = *reinterpret_cast<const float2 *>(cos_table + row * (NR_HEAD_DIM / 2) + lane * 2);
    const float2 sn = *reinterpret_cast<const float2 *>(sin_table + row * (NR_HEAD_DIM / 2) + lane * 2);
    // pair 2l: (a0, a1) with angle index 2l; pair 2l+1: (c0, c1) with index 2l+1.
    const float r0 = a0 * cs.x - a1 * sn.x;
    const float r1 = a0 * sn.x + a1 * cs.x;
    const float r2 = c0 * cs.y - c1 * sn.y;
    const float r3 = c0 * sn.y + c1 * cs.y;

    __nv_bfloat162 o[2];
    o[0] = __floats2bfloat162_rn(r0, r1);
    o[1] = __floats2bfloat162_rn(r2, r3);
    __nv_bfloat16 *y = dst + (row * heads + h) * NR_HEAD_DIM + lane * 4;
    *reinterpret_cast<uint2 *>(y) = *reinterpret_cast<const uint2 *>(o);
}
