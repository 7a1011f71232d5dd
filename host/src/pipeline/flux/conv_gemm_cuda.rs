//! The decoder's 3×3 and 1×1 convolutions as cuBLASLt GEMMs (`host/kernels/conv_gemm.cu`).
//!
//! candle hands bf16 NCHW convolutions to cuDNN's heuristic pick, measured at 11–19 TFLOP/s
//! on an H100 (`headshot bench gpu --ops`: `vae_conv_*`), where the decoder's convolutions
//! at 512² and 1024² hold most of its ~5 TFLOP. A 3×3 convolution over one image is three
//! GEMMs instead: with three copies of the zero-padded image, each shifted by one column tap,
//! row tap `dy` is the matrix (pixels × 3·C_in) that starts `dy` padded rows in, times that
//! tap's weights (3·C_in × C_out), accumulated in f32. The padded rows are computed too (a
//! few percent more work), then one pass adds the bias and crops them away. A 1×1
//! convolution is one GEMM on the image as it is.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cuda_util::{alloc_like, contiguous_view, cuda_only_cpu_fwd, output};

/// PTX of `conv_gemm.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_gemm.ptx"));
/// Elements per 16 bytes of bf16: row and operand alignment the GEMMs are promised.
const ALIGN: usize = 8;

/// Whether [`conv2d`] (or with `upsample`, [`upsample_conv2d`]) takes `x` with `taps` from
/// `decoder::gemm_taps`: bf16 NCHW on CUDA starting 16-byte aligned, in the shapes
/// [`check_shapes`] accepts.
pub fn supports(x: &Tensor, taps: &Tensor, upsample: bool) -> bool {
    let (Ok((_, cin, h, w)), Ok(taps_dims)) = (x.dims4(), taps.dims3()) else {
        return false;
    };
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.layout().start_offset().is_multiple_of(ALIGN)
        && check_shapes((cin, h, w), taps_dims, upsample).is_ok()
}

/// The shapes the kernels take: `taps` `(1 or 3, C_out, taps·C_in)` for input `(C_in, h, w)`
/// (upsampled 2× only for 3×3), C_in in multiples of 8, for 1×1 a pixel count too (channel
/// planes stay aligned), and grids within CUDA's limits. Returns the output's `(h, w)`.
fn check_shapes(
    (cin, h0, w0): (usize, usize, usize),
    (taps, cout, k): (usize, usize, usize),
    upsample: bool,
) -> Result<(usize, usize)> {
    let up = usize::from(upsample);
    let (h, w) = (h0 << up, w0 << up);
    if k != taps * cin || !matches!(taps, 1 | 3) || (upsample && taps != 3) {
        candle_core::bail!(
            "convolution GEMM shapes do not fit: {cin} channels in, taps {:?}",
            (taps, cout, k)
        );
    }
    if !cin.is_multiple_of(ALIGN) || (taps == 1 && !(h * w).is_multiple_of(ALIGN)) {
        candle_core::bail!(
            "convolution GEMMs want C_in (and for 1x1, h·w) multiples of {ALIGN}: \
             {cin} channels, {h}x{w}"
        );
    }
    if !fits(cin, cout, h, w) {
        candle_core::bail!(
            "convolution GEMMs: {cin} -> {cout} channels over {h}x{w} exceed the kernels' grid"
        );
    }
    Ok((h, w))
}

/// Padded row length for a 3×3 convolution over width `w`.
fn padded_width(w: usize) -> usize {
    (w + 2).div_ceil(ALIGN) * ALIGN
}

/// Blocks of 256 threads over `n` values of each of `planes` planes (grid-stride within one).
fn grid(n: usize, planes: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, planes as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether the kernels' grids and 32-bit plane indexing hold `3·c_in` padded planes of
/// `(h+2)·wp` values and `c_out` output planes.
fn fits(cin: usize, cout: usize, h: usize, w: usize) -> bool {
    3 * cin <= MAX_GRID_Y && cout <= MAX_GRID_Y && (h + 2) * padded_width(w) <= u32::MAX as usize
}

/// CUDA's limit on a grid's y dimension (planes per launch).
const MAX_GRID_Y: usize = 65_535;

struct ConvGemm {
    /// Convolve the input upsampled 2× (nearest), read through the padding pass.
    upsample: bool,
}

impl CustomOp3 for ConvGemm {
    fn name(&self) -> &'static str {
        "headshot-conv-gemm"
    }

    cuda_only_cpu_fwd!(3);

    /// (x `(batch, C_in, h, w)`, taps `(taps, C_out, taps·C_in)`, bias `(C_out)`).
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, cin, h0, w0) = l1.shape().dims4()?;
        let up = usize::from(self.upsample);
        let (taps, cout, k) = l2.shape().dims3()?;
        // Checked before anything is allocated (the padded copies run to gigabytes).
        let (h, w) = check_shapes((cin, h0, w0), (taps, cout, k), self.upsample)?;
        if l3.shape().dims() != [cout] {
            candle_core::bail!(
                "convolution GEMM bias {:?} for {cout} output channels",
                l3.shape()
            );
        }
        let (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(ts), CudaStorageSlice::BF16(bs)) =
            (&s1.slice, &s2.slice, &s3.slice)
        else {
            candle_core::bail!("convolution GEMMs want bf16 input, weights and bias");
        };
        let dev = s1.device();
        let stream = dev.cuda_stream();
        let x = contiguous_view(xs, l1, ALIGN, "convolution input")?;
        let weights = contiguous_view(ts, l2, ALIGN, "convolution weights")?;
        let bias = contiguous_view(bs, l3, 1, "convolution bias")?;
        let wp = if taps == 3 { padded_width(w) } else { w };
        let plane = if taps == 3 { (h + 2) * wp } else { h * w };
        let rows = h * wp;
        let image = cin * h0 * w0;
        let mut y = alloc_like(dev, xs, batch * cout * h * w)?;
        // SAFETY: for each image the GEMMs write all cout·rows values (the first with beta 0)
        // before the crop reads them.
        let acc = unsafe { dev.alloc::<f32>(cout * rows) }?;
        // SAFETY: the pad kernel writes all 3·cin·plane values before a GEMM reads them.
        let mut padded = if taps == 3 {
            Some(alloc_like(dev, xs, 3 * cin * plane)?)
        } else {
            None
        };
        let pad = dev.get_or_load_custom_func("headshot_conv_pad3_bf16", "headshot_conv", PTX)?;
        let crop =
            dev.get_or_load_custom_func("headshot_conv_crop_bias_bf16", "headshot_conv", PTX)?;
        let (cin_i, h_i, w_i, wp_i, up_i) = (cin as i32, h as i32, w as i32, wp as i32, up as i32);
        for img in 0..batch {
            let x_img = x.slice(img * image..(img + 1) * image);
            if let Some(padded) = padded.as_mut() {
                let mut builder = pad.builder();
                builder.arg(&x_img);
                builder.arg(&cin_i);
                builder.arg(&h_i);
                builder.arg(&w_i);
                builder.arg(&wp_i);
                builder.arg(&up_i);
                builder.arg(padded);
                // SAFETY: reads this image's cin·(h>>up)·(w>>up) values, writes
                // 3·cin·(h+2)·wp.
                unsafe { builder.launch(grid(plane, 3 * cin)) }.w()?;
            }
            {
                let (a_base, _a_guard) = match padded.as_ref() {
                    Some(p) => p.device_ptr(&stream),
                    None => x_img.device_ptr(&stream),
                };
                let (w_base, _w_guard) = weights.device_ptr(&stream);
                let (d, _d_guard) = acc.device_ptr(&stream);
                for dy in 0..taps {
                    let a = a_base + (dy * wp * 2) as u64;
                    let b = w_base + (dy * cout * k * 2) as u64;
                    let beta = if dy == 0 { 0.0 } else { 1.0 };
                    // SAFETY: A is `rows` pixels × k (3·cin padded planes from row dy, or
                    // the image's cin planes) with leading dimension `plane`, inside the
                    // buffer (dy·wp + rows ≤ plane); B is tap dy's k × cout weights; D is
                    // rows × cout f32. Offsets and leading dimensions are multiples of 8
                    // bf16 (16 bytes): wp, plane and k are, and both bases are aligned.
                    unsafe {
                        super::gemm_cuda::gemm_bf16_f32(
                            dev,
                            (a, plane),
                            (b, k),
                            (d, rows),
                            (rows, cout, k),
                            beta,
                        )?;
                    }
                }
            }
            let mut y_img = y.slice_mut(img * cout * h * w..(img + 1) * cout * h * w);
            let mut builder = crop.builder();
            builder.arg(&acc);
            builder.arg(&bias);
            builder.arg(&h_i);
            builder.arg(&w_i);
            builder.arg(&wp_i);
            builder.arg(&mut y_img);
            // SAFETY: reads cout·h·wp f32 and cout bias values, writes this image's cout·h·w.
            unsafe { builder.launch(grid(h * w, cout)) }.w()?;
        }
        Ok(output(
            dev,
            CudaStorageSlice::BF16,
            y,
            Shape::from((batch, cout, h, w)),
        ))
    }
}

/// The convolution (stride 1; padding 1 for 3×3, 0 for 1×1) of bf16 NCHW `x` with `taps`
/// from `decoder::gemm_taps` and `bias` `(C_out)`.
pub fn conv2d(x: &Tensor, taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &taps.contiguous()?,
        &bias.contiguous()?,
        &ConvGemm { upsample: false },
    )
}

/// [`conv2d`] (3×3) of `x` upsampled 2× by nearest neighbour, without writing the upsampled
/// image: `(batch, C, h, w)` in, `(batch, C_out, 2h, 2w)` out.
pub fn upsample_conv2d(x: &Tensor, taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &taps.contiguous()?,
        &bias.contiguous()?,
        &ConvGemm { upsample: true },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_rows_are_aligned_and_hold_the_border() {
        for w in [1, 6, 7, 8, 64, 128, 1024] {
            let wp = padded_width(w);
            assert!(wp >= w + 2 && wp.is_multiple_of(ALIGN), "{w} -> {wp}");
        }
    }
}
