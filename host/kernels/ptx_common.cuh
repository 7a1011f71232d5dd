// The inline PTX both attention files use: dynamic shared memory, cp.async, one-instruction
// exp2. Under HEADSHOT_EMULATE the CPU emulator (kernels/emu/cuda_emu.h) provides these
// instead, and the dynamic shared memory is its guarded buffer.
#pragma once

#include <stdint.h>

#ifdef HEADSHOT_EMULATE
#define DYNAMIC_SMEM(name) unsigned char *name = emu_dynamic_smem()
#else
#define DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global → shared, bypassing L1; `bytes` 0 writes zeros (keys past the end).
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 2^x in one MUFU.EX2 (results below f32's normal range flush to 0, as they may for softmax
// weights). exp2f adds a range check and two multiplies around it for denormal results.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif
