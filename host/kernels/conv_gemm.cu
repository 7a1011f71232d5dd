// The two memory passes around a 3x3 convolution run as GEMMs (conv_gemm_cuda.rs), on bf16
// NCHW activations of one image:
//
//   headshot_conv_pad3_bf16:  three copies of the zero-padded image, the copy for column
//     tap dx shifted left by dx: out[dx][c][r][col] = x[c][r - 1][col + dx - 1] (0 outside),
//     rows r < H + 2, columns col < wp (wp ≥ W + 2, a multiple of 8 so every row starts
//     16-byte aligned). Read as a column-major matrix (pixels × 3·C, leading dimension
//     (H + 2)·wp) from row dy·wp on, it is the operand of row tap dy: the GEMM for dy
//     multiplies it by that tap's weights (3·C × Cout) and adds into the f32 result.
//
//   headshot_conv_crop_bias_bf16:  the f32 result (Cout planes of H·wp, the last wp - W
//     columns of each row unused) with the bias added, cropped to W columns, as bf16.

#include <cuda_bf16.h>
#include <stdint.h>

// grid (x: over one plane, y: 3 · channels planes, the copy dx · channels + c), block 256.
// `up` = 1 reads x at half the size (h/2 × w/2) through nearest 2× upsampling, so the
// decoder's upsample-then-convolve never writes the upsampled image. A plane,
// (h + 2) · wp values, fits 32 bits (the wrapper checks): no 64-bit division per value.
extern "C" __global__ void headshot_conv_pad3_bf16(const __nv_bfloat16 *__restrict__ x,
                                                   int channels, int h, int w, int wp, int up,
                                                   __nv_bfloat16 *__restrict__ out) {
    const unsigned plane = (unsigned)(h + 2) * (unsigned)wp;
    const int copy = blockIdx.y;
    const int dx = copy / channels;
    const int c = copy - dx * channels;
    const __nv_bfloat16 *src = x + (long long)c * (h >> up) * (w >> up);
    __nv_bfloat16 *dst = out + (long long)copy * plane;
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (unsigned at = blockIdx.x * blockDim.x + threadIdx.x; at < plane;
         at += gridDim.x * blockDim.x) {
        const int r = (int)(at / (unsigned)wp) - 1;
        const int col = (int)(at % (unsigned)wp) + dx - 1;
        dst[at] = (r >= 0 && r < h && col >= 0 && col < w)
                      ? src[(r >> up) * (w >> up) + (col >> up)]
                      : zero;
    }
}

// grid (x: over one channel's h · w outputs, y: the output channel o), block 256.
extern "C" __global__ void headshot_conv_crop_bias_bf16(const float *__restrict__ acc,
                                                        const __nv_bfloat16 *__restrict__ bias,
                                                        int h, int w, int wp,
                                                        __nv_bfloat16 *__restrict__ y) {
    const int o = blockIdx.y;
    const unsigned pixels = (unsigned)h * (unsigned)w;
    const float b = __bfloat162float(bias[o]);
    const float *src = acc + (long long)o * h * wp;
    __nv_bfloat16 *dst = y + (long long)o * pixels;
    for (unsigned at = blockIdx.x * blockDim.x + threadIdx.x; at < pixels;
         at += gridDim.x * blockDim.x) {
        const unsigned r = at / (unsigned)w;
        const unsigned col = at - r * (unsigned)w;
        dst[at] = __float2bfloat16(src[r * (unsigned)wp + col] + b);
    }
}
