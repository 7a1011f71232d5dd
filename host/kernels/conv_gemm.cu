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

// `up` = 1 reads x at half the size (h/2 × w/2) through nearest 2× upsampling, so the
// decoder's upsample-then-convolve never writes the upsampled image.
extern "C" __global__ void headshot_conv_pad3_bf16(const __nv_bfloat16 *__restrict__ x,
                                                   int channels, int h, int w, int wp, int up,
                                                   __nv_bfloat16 *__restrict__ out) {
    const long long plane = (long long)(h + 2) * wp;
    const long long total = 3 * (long long)channels * plane;
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long copy = i / plane; // dx · channels + c
        const long long at = i - copy * plane;
        const int dx = (int)(copy / channels);
        const int c = (int)(copy - (long long)dx * channels);
        const int r = (int)(at / wp) - 1;
        const int col = (int)(at % wp) + dx - 1;
        out[i] = (r >= 0 && r < h && col >= 0 && col < w)
                     ? x[((long long)c * (h >> up) + (r >> up)) * (w >> up) + (col >> up)]
                     : zero;
    }
}

extern "C" __global__ void headshot_conv_crop_bias_bf16(const float *__restrict__ acc,
                                                        const __nv_bfloat16 *__restrict__ bias,
                                                        int channels, int h, int w, int wp,
                                                        __nv_bfloat16 *__restrict__ y) {
    const long long total = (long long)channels * h * w;
    const long long pixels = (long long)h * w;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int o = (int)(i / pixels);
        const long long at = i - (long long)o * pixels;
        const int r = (int)(at / w);
        const int col = (int)(at - (long long)r * w);
        const float v = acc[(long long)o * h * wp + (long long)r * wp + col];
        y[i] = __float2bfloat16(v + __bfloat162float(bias[o]));
    }
}
