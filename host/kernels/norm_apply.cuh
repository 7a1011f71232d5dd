// How a group norm (+ SiLU) is applied to one value, shared by the kernels that apply it
// (group_norm.cu's apply kernel, conv_implicit.cu's prep passes), so that every path rounds
// alike by construction: per channel, y = x · scale + shift with scale = weight · 1/std and
// shift = bias − mean · scale, in f32; SiLU as x / (1 + e^−x).
// No include guard, as lazy_softmax.cuh: the emulator's runner includes every kernel file in a
// namespace of its own, and each needs these definitions in its namespace.

// The channel's (scale, shift) for its group's mean and 1/std.
__device__ __forceinline__ float2 norm_scale_shift(__nv_bfloat16 weight, __nv_bfloat16 bias,
                                                   float mean, float rstd) {
    const float scale = __bfloat162float(weight) * rstd;
    return make_float2(scale, __bfloat162float(bias) - mean * scale);
}

// x normalized by (scale, shift), through SiLU when `silu`.
__device__ __forceinline__ float norm_apply(float x, float2 scale_shift, int silu) {
    const float y = x * scale_shift.x + scale_shift.y;
    return silu ? y / (1.f + __expf(-y)) : y;
}
