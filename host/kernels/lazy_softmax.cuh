// What both attention files share (flash_attn.cu, flash_wgmma.cu): the bf16 pair packing of
// their fragments, and the lazy online softmax (flash_attn.cu's *_lazy kernels and
// flash_wgmma.cu's), on one 16-row slab of scores in the mma/wgmma accumulator layout:
// `s[j][c]` is row g (c < 2) or g + 8, key first_key + 8j + 2t + (c & 1), and `acc[n][c]` the
// same rows of the output's 16 column groups.
//
// What makes it lazy (it trims the non-tensor-core work that competes with the mma
// instructions for issue slots):
// - the accumulator is rescaled only when a row's maximum grows by more than LAZY_SLACK (log2
//   units) over the one its exponentials are taken against, not at every step: the result is
//   the same (numerator and denominator share the stale maximum), probabilities stay
//   ≤ 2^LAZY_SLACK, well inside bf16 and f32;
// - the scale folds into the exponent's argument (one fma instead of a multiply and an add);
// - key masking runs only on steps that reach past the last key;
// - exponentials in one instruction each (fast_exp2).
//
// No include guard on purpose: the CPU emulator includes each kernel file in a namespace of its
// own, and each needs its own copy of this function (every .cu includes it once).

#define LAZY_SLACK 8.f

// Two floats as a bf16 pair in one register (an mma/wgmma A fragment word, or two outputs).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

template <int GROUPS>
__device__ __forceinline__ void lazy_softmax_rows(float (&s)[GROUPS][4], float (&acc)[16][4],
                                                  float (&row_max)[2], float (&row_sum)[2],
                                                  int first_key, int tokens, int t,
                                                  float scale_log2) {
    const bool partial = first_key + GROUPS * 8 > tokens;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (partial && first_key + j * 8 + 2 * t + e >= tokens) {
                s[j][e] = -INFINITY;
                s[j][2 + e] = -INFINITY;
            }
            tile_max[0] = fmaxf(tile_max[0], s[j][e]);
            tile_max[1] = fmaxf(tile_max[1], s[j][2 + e]);
        }
    }
    float neg[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], off));
        }
        // scale_log2 > 0, so the scaled maximum is the maximum of the scaled scores.
        tile_max[r] *= scale_log2;
        // The four lanes of a row agree on its maximum, so they branch alike.
        if (tile_max[r] > row_max[r] + LAZY_SLACK) {
            const float corr = fast_exp2(row_max[r] - tile_max[r]);
            row_max[r] = tile_max[r];
            row_sum[r] *= corr;
#pragma unroll
            for (int n = 0; n < 16; ++n) {
                acc[n][2 * r] *= corr;
                acc[n][2 * r + 1] *= corr;
            }
        }
        // A row that has seen no key yet (only fully masked steps) keeps -inf: its
        // exponentials must come out 0, not exp2(-inf + inf).
        neg[r] = row_max[r] == -INFINITY ? 0.f : -row_max[r];
    }
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            s[j][c] = fast_exp2(fmaf(s[j][c], scale_log2, neg[c >> 1]));
        }
        row_sum[0] += s[j][0] + s[j][1];
        row_sum[1] += s[j][2] + s[j][3];
    }
}
