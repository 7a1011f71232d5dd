// The decoder's 3×3 convolution for Hopper (sm_90a) with warpgroup MMA: the kernel of
// conv_implicit.cu (same inputs: the prep pass's zero-padded NHWC image, weights 9 × cout ×
// cin, bias, optional residual; same NCHW output) with its mma.sync inner loop replaced by
// wgmma. Not yet run on a GPU: opt-in (`HEADSHOT_CONV=implicit_wgmma`), checked by
// `headshot bench gpu --check`, and run on the CPU by host/kernels/emu.
//
// Why: mma.sync issues a 16×8×16 product per warp instruction with both operands passing
// through registers (ldmatrix first); wgmma issues 64×128×16 per warpgroup instruction and
// reads both operands from shared memory, asynchronously.
//
// A block (256 threads, two warpgroups) computes 128 output pixels of one row × 128 output
// channels; warpgroup wg takes pixels 64·wg … 64·wg + 63, all 128 channels (64 f32
// accumulators a thread, the wgmma m64n128 fragment layout: mma.sync's, tiled over N). Per K
// step (a row tap dy and 32 input channels) the block loads 130 input pixels and the three
// column taps' weights, into a three-stage ring by cp.async, and each warpgroup issues 6
// wgmma m64n128k16 (3 column taps dx × 2 halves of the 32 channels).
//
// Shared memory: each operand in the no-swizzle K-major layout of the PTX ISA with the
// 16-byte chunk (8 channels) outermost: chunk c of row r at c · ROWS · 16 + r · 16. A core
// matrix (8 rows × 16 bytes) is then 128 contiguous bytes starting at any row, so the column
// tap dx is only a start address 16·dx further on: leading byte offset (the next core matrix
// along K) ROWS · 16, stride byte offset (the next 8 rows) 128.
//
// The step loop: wait for this step's copies, make them visible to the async proxy, wait for
// this warpgroup's wgmma of the previous step, barrier (every warpgroup is done with the
// stage the refill overwrites), refill, issue this step's wgmma. Two blocks an SM (98 688 bytes
// of ring each), so one block's wgmma run while the other waits at its barrier.

#include <cuda_bf16.h>
#include <stdint.h>

#include "conv_common.cuh"
#include "ptx_common.cuh"
#include "wgmma_common.cuh"

#define CW_BM 128                        // output pixels per block
#define CW_THREADS 256                   // two warpgroups
#define CW_STAGES 3                      // cp.async ring depth
#define CW_A_ROWS (CW_BM + 2)            // input pixels per K step
#define CW_B_ROWS (3 * CI_BN)            // weight rows per K step: 3 column taps × 128
#define CW_CHUNKS (CI_BK / 8)            // 16-byte chunks per row and K step
#define CW_A_BYTES (CW_CHUNKS * CW_A_ROWS * 16)
#define CW_B_BYTES (CW_CHUNKS * CW_B_ROWS * 16)
#define CW_STAGE_BYTES (CW_A_BYTES + CW_B_BYTES)
#define CW_OUT_STRIDE (CW_BM + 4)        // f32 epilogue row, as conv_implicit.cu's
// Dynamic shared memory: the ring (98 688 bytes), which the epilogue's f32 tile (128 × 132 ×
// 4 = 67 584 bytes) reuses.
#define CW_SMEM_BYTES (CW_STAGES * CW_STAGE_BYTES)

// grid ((w + 127) / 128, h, cout / 128), block 256, dynamic shared memory CW_SMEM_BYTES.
// Arguments as headshot_conv3x3_nhwc_bf16's.
extern "C" __global__ void __launch_bounds__(CW_THREADS, 2)
    headshot_conv3x3_wgmma_nhwc_bf16(const __nv_bfloat16 *__restrict__ xp,
                                     const __nv_bfloat16 *__restrict__ wt,
                                     const __nv_bfloat16 *__restrict__ bias,
                                     const __nv_bfloat16 *__restrict__ residual,
                                     int has_residual, int cin, int cout, int h, int w,
                                     __nv_bfloat16 *__restrict__ y) {
    DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int warp = (tid >> 5) & 3;
    const int lane = tid & 31;
    const int x0 = blockIdx.x * CW_BM;
    const int row = blockIdx.y;
    const int n0 = blockIdx.z * CI_BN;
    const int steps = 3 * (cin / CI_BK);

    // Chunk c of row r is at c · rows · 16 + r · 16, so a pass of 64 rows is 64 · 16 bytes on.
    const ConvCopies<CW_BM, CW_THREADS> copies(xp, wt, cin, cout, w, x0, row, n0);
    const int chunk = tid & 3, first_row = tid >> 2;
    constexpr int PASS_BYTES = ConvCopies<CW_BM, CW_THREADS>::ROWS_PER_PASS * 16;
    auto load = [&](int dy, int c0, int stage) {
        unsigned char *ring = smem + stage * CW_STAGE_BYTES + first_row * 16;
        copies.issue(dy, c0, ring + chunk * CW_A_ROWS * 16, PASS_BYTES,
                     ring + CW_A_BYTES + chunk * CW_B_ROWS * 16, PASS_BYTES);
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        acc[i] = 0.f;
    }

    ConvStep next{0, 0, cin};
#pragma unroll
    for (int s = 0; s < CW_STAGES - 1; ++s) {
        conv_load_step(load, next, s, steps, s);
    }

    for (int t = 0; t < steps; ++t) {
        cp_async_wait<CW_STAGES - 2>();
        fence_proxy_async();
        // This warpgroup's products of step t - 1 are done (they read the stage the refill
        // below overwrites); the barrier then covers the other warpgroup's too.
        wgmma_wait<0>();
        __syncthreads();
        conv_load_step(load, next, t + CW_STAGES - 1, steps, (t + CW_STAGES - 1) % CW_STAGES);
        const unsigned char *a = smem + (t % CW_STAGES) * CW_STAGE_BYTES + (64 * wg) * 16;
        const unsigned char *b = smem + (t % CW_STAGES) * CW_STAGE_BYTES + CW_A_BYTES;
        fence_regs(acc);
        wgmma_fence();
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                // K elements 16·ks … of this step: chunks 2·ks and 2·ks + 1.
                wgmma_m64n128k16_ss(
                    acc,
                    smem_desc_lbo(a + dx * 16 + 2 * ks * CW_A_ROWS * 16, CW_A_ROWS * 16, 128),
                    smem_desc_lbo(b + dx * CI_BN * 16 + 2 * ks * CW_B_ROWS * 16, CW_B_ROWS * 16,
                                  128));
            }
        }
        wgmma_commit();
    }
    wgmma_wait<0>();
    fence_regs(acc);
    cp_async_wait<0>();
    __syncthreads();

    // Accumulators → f32 tile [channel][pixel]: warp `warp` of the warpgroup holds pixels
    // 64·wg + 16·warp + g (and + 8), lane 4g + q channels 8j + 2q, + 1 of each n8 block j.
    float *tile = reinterpret_cast<float *>(smem);
    const int g = lane >> 2, q = lane & 3;
    const int m = 64 * wg + 16 * warp + g;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int n = 8 * j + 2 * q;
        tile[n * CW_OUT_STRIDE + m] = acc[4 * j];
        tile[(n + 1) * CW_OUT_STRIDE + m] = acc[4 * j + 1];
        tile[n * CW_OUT_STRIDE + m + 8] = acc[4 * j + 2];
        tile[(n + 1) * CW_OUT_STRIDE + m + 8] = acc[4 * j + 3];
    }
    __syncthreads();
    conv_store_tile<CW_BM, CW_THREADS>(tile, CW_OUT_STRIDE, bias, residual, has_residual, n0, x0,
                                       row, h, w, y);
}
