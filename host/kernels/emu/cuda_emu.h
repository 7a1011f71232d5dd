// A CPU emulator for this repo's CUDA kernels, so their logic is tested on every machine,
// not only in the few sessions that are lent a GPU (host/tests/kernel_emulation.rs).
//
// The kernel sources compile unchanged as C++ (`-DHEADSHOT_EMULATE`, with `include/` first on
// the include path for the stand-in cuda_bf16.h / cuda_fp8.h). Each CUDA thread of a block
// runs as a fiber (ucontext) on one OS thread; `__syncthreads`, warp shuffles and the warp- and
// warpgroup-wide PTX the attention kernels use (mma.sync m16n8k16 bf16, ldmatrix x4 and
// x4.trans, cp.async, wgmma) switch fibers at their barriers, so their cross-lane semantics
// follow the PTX ISA:
// - mma, ldmatrix and wgmma gather the fragments of all lanes and hand each lane its own, by
//   the fragment layouts of the PTX ISA (not by calling the kernel's own index math);
// - cp.async copies land at the `cp.async.wait_group` that retires their group under the
//   forward schedule (a kernel that reads a tile before waiting reads stale data) and when
//   issued under the reverse and warps-ahead schedules (a kernel that refills a buffer others
//   still read corrupts it); runner.cpp says what each schedule exposes;
// - a barrier no fiber can complete, lanes that exit instead of joining a warp or warpgroup
//   collective, or a misaligned ldmatrix/cp.async address stops the run with the block and
//   thread named.
// What it cannot show: speed, races none of the three schedules exposes, and the hardware's
// exact rounding inside mma and wgmma (it accumulates in f32).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;
struct float2 {
    float x, y;
};
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
// CUDA's integer min and max (device built-ins).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

extern uint3 threadIdx, blockIdx, blockDim, gridDim;

// ---- bf16 -------------------------------------------------------------------------------
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline uint32_t emu_f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float emu_bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// Round to nearest even, NaN kept quiet: what __float2bfloat16 does.
inline __nv_bfloat16 __float2bfloat16(float f) {
    const uint32_t u = emu_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    }
    return __nv_bfloat16{(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return emu_bits_f32((uint32_t)b.bits << 16); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
    return float2{__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}

// ---- fp8 e4m3 ---------------------------------------------------------------------------
typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

void emu_fail(const char *what);

// e4m3 (bias 7, no infinities, 0x7f NaN) by round to nearest even; with __NV_SATFINITE
// anything past ±448 (inf included) becomes ±448.
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat,
                                                __nv_fp8_interpretation_t kind) {
    if (kind != __NV_E4M3 || sat != __NV_SATFINITE) {
        emu_fail("the emulator converts to e4m3 with __NV_SATFINITE only");
    }
    if (std::isnan(x)) {
        return 0x7f;
    }
    const unsigned sign = std::signbit(x) ? 0x80u : 0u;
    const double a = std::fabs((double)x);
    if (a < std::ldexp(1.0, -6)) {
        // Subnormals are multiples of 2^-9; 8 of them is the smallest normal, code 0x08.
        return (__nv_fp8_storage_t)(sign | (unsigned)std::nearbyint(a * 512.0));
    }
    int e;
    const double m = std::frexp(a, &e); // a = m·2^e, m in [0.5, 1)
    int exponent = e - 1;               // a = (2m)·2^exponent, 2m in [1, 2)
    unsigned mant = (unsigned)std::nearbyint((2.0 * m - 1.0) * 8.0);
    if (mant == 8) {
        mant = 0;
        exponent += 1;
    }
    if (exponent > 8 || (exponent == 8 && mant == 7)) {
        return (__nv_fp8_storage_t)(sign | 0x7e);
    }
    return (__nv_fp8_storage_t)(sign | (unsigned)(exponent + 7) << 3 | mant);
}
inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 v, __nv_saturation_t sat,
                                                     __nv_fp8_interpretation_t kind) {
    return (__nv_fp8x2_storage_t)(__nv_cvt_float_to_fp8(v.x, sat, kind) |
                                  __nv_cvt_float_to_fp8(v.y, sat, kind) << 8);
}

// ---- math and atomics (one OS thread runs every fiber, so plain updates are atomic) -----
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline int __float_as_int(float f) { return (int)emu_f32_bits(f); }
inline int atomicMax(int *p, int v) {
    const int old = *p;
    if (v > old) {
        *p = v;
    }
    return old;
}

// ---- block and warp synchronisation -----------------------------------------------------
void __syncthreads();
void emu_warp_exchange(unsigned mask, const uint32_t *mine, int words, uint32_t *all);
unsigned char *emu_dynamic_smem();
unsigned emu_lane();

// The warp's values of one 32-bit word per lane, gathered (mask must name every lane).
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
    uint32_t mine, all[32];
    std::memcpy(&mine, &v, 4);
    emu_warp_exchange(mask, &mine, 1, all);
    T out;
    std::memcpy(&out, &all[(emu_lane() ^ (unsigned)lane_mask) & 31], 4);
    return out;
}

// ---- the PTX flash_attn.cu issues through inline asm -------------------------------------
void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
void ldmatrix_x4(uint32_t r[4], const void *p);
void ldmatrix_x4_trans(uint32_t r[4], const void *p);
void cp_async_16(void *dst, const void *src, int bytes);
void cp_async_commit();
void emu_cp_async_wait(int keep);
template <int N> inline void cp_async_wait() { emu_cp_async_wait(N); }
// ex2.approx.ftz: denormal inputs and results flush to zero.
inline float fast_exp2(float x) {
    const float y = std::exp2(std::fpclassify(x) == FP_SUBNORMAL ? 0.f : x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// ---- the PTX the wgmma kernels issue (Hopper warpgroup MMA, wgmma_common.cuh) -------------
// Shared-memory addresses are offsets into the block's dynamic shared memory.
uint32_t smem_addr(const void *p);
void fence_proxy_async();
void wgmma_fence();
template <class T, int N> inline void fence_regs(T (&)[N]) {}
// wgmma.mma_async is recorded when issued and carried out when wgmma.wait_group retires its
// group, all 128 threads of the warpgroup together: a kernel that reads the accumulators
// before waiting reads the old values and fails its test. It stops the run when a wgmma is
// issued with no wgmma.fence since the thread's last wait, when it reads shared memory that
// cp.async wrote with no fence.proxy.async by the writer since, and when its shared-memory
// operands, A registers or accumulators change between issue and retire. Descriptors are
// decoded by the PTX ISA's matrix-descriptor layout (start address, leading byte offset = the
// next core matrix along K, stride byte offset = the next 8 rows, both >> 4; only the
// no-swizzle K-major form). Not checked: the asm strings themselves (the emulator stands in
// for them), and register writes between a wgmma.fence and the wgmma after it.
void wgmma_m64n64k16_ss(float d[32], uint64_t desc_a, uint64_t desc_b, int accumulate);
void wgmma_m64n128k16_rs(float d[64], const uint32_t a[4], uint64_t desc_b);
void wgmma_m64n128k16_ss(float d[64], uint64_t desc_a, uint64_t desc_b);
void wgmma_commit();
void emu_wgmma_wait(int keep);
template <int N> inline void wgmma_wait() { emu_wgmma_wait(N); }
