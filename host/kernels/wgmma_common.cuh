// The Hopper warpgroup-MMA PTX the wgmma kernels share (flash_wgmma.cu, conv_wgmma.cu):
// proxy and register fences, wgmma issue/commit/wait, and shared-memory matrix descriptors.
// Under HEADSHOT_EMULATE the CPU emulator (kernels/emu/cuda_emu.h) provides the instructions
// instead; the descriptor encoding below is shared with it.
// No include guard, as lazy_softmax.cuh: the emulator's runner includes every kernel file in a
// namespace of its own, and each needs these definitions in its namespace.

#include <stdint.h>

#include "ptx_common.cuh"

#ifndef HEADSHOT_EMULATE
// cp.async writes through the generic proxy, wgmma reads through the async proxy: this
// makes the writes (completed by cp.async.wait_group) visible to it.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Orders register writes (accumulators, A fragments) before the wgmma instructions that read
// them.
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The accumulator operands of a wgmma: D's registers in the instruction ("{%0, …}") and as
// asm operands read and written ("+f"), 32 of them for N = 64, 64 for N = 128.
#define WGMMA_D32_REGS \
    "%0, %1, %2, %3, %4, %5, %6, %7, " \
    "%8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_D64_REGS \
    WGMMA_D32_REGS ", " \
    "%32, %33, %34, %35, %36, %37, %38, %39, " \
    "%40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, " \
    "%56, %57, %58, %59, %60, %61, %62, %63"
#define WGMMA_D32_OPERANDS(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), \
    "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
    "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), \
    "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), \
    "+f"(d[30]), "+f"(d[31])
#define WGMMA_D64_OPERANDS(d) \
    WGMMA_D32_OPERANDS(d), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), \
    "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), \
    "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
    "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), \
    "+f"(d[62]), "+f"(d[63])

// D (64×64 f32, 32 registers a thread) (+)= A (64×16, shared memory) · B (16×64, shared
// memory), both K-major, given by descriptors; `accumulate` 0 overwrites D.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float d[32], uint64_t desc_a, uint64_t desc_b,
                                                   int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{" WGMMA_D32_REGS "}, "
                 "%32, %33, p, 1, 1, 0, 0;\n}\n"
                 : WGMMA_D32_OPERANDS(d)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D (64×128 f32, 64 registers a thread) += A (64×16 bf16 from registers, the mma.sync A
// fragment layout per warp) · B (16×128, shared memory, K-major descriptor).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float d[64], const uint32_t a[4],
                                                    uint64_t desc_b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{" WGMMA_D64_REGS "}, "
                 "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : WGMMA_D64_OPERANDS(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// D (64×128 f32, 64 registers a thread) += A (64×16, shared memory) · B (16×128, shared
// memory), both K-major, given by descriptors.
__device__ __forceinline__ void wgmma_m64n128k16_ss(float d[64], uint64_t desc_a,
                                                    uint64_t desc_b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{" WGMMA_D64_REGS "}, "
                 "%64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WGMMA_D64_OPERANDS(d)
                 : "l"(desc_a), "l"(desc_b), "r"(1));
}

// Ties registers to this point of the program: wgmma writes its accumulators asynchronously,
// so every read of them must stay after the wait (and every write before the fence), which
// the compiler cannot see from the asm statements' operands alone.
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        asm volatile("" : "+f"(r[i])::"memory");
    }
}

template <int M, int N> __device__ __forceinline__ void fence_regs(float (&r)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i) {
        fence_regs(r[i]);
    }
}

template <int N> __device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        asm volatile("" : "+r"(r[i])::"memory");
    }
}
#endif

// The wgmma descriptor of a K-major no-swizzle operand starting at `p`: start address,
// leading byte offset `lbo` (the next core matrix along K), stride byte offset `sbo` (the next
// 8 rows), base offset 0, no swizzle. Addresses and offsets are stored divided by 16.
__device__ __forceinline__ uint64_t smem_desc_lbo(const unsigned char *p, uint32_t lbo,
                                                  uint32_t sbo) {
    const uint32_t addr = smem_addr(p);
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
           ((uint64_t)(sbo >> 4) << 32);
}

// The same with core matrices adjacent along K packed together (leading byte offset 128).
__device__ __forceinline__ uint64_t smem_desc(const unsigned char *p, uint32_t sbo) {
    return smem_desc_lbo(p, 128, sbo);
}
