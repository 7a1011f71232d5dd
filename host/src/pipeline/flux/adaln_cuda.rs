//! adaLN on CUDA (`host/kernels/adaln.cu`): LayerNorm with the modulation's scale and shift in
//! one pass, and the gated residual add in one pass. candle's broadcast multiply and add over
//! `(batch, tokens, hidden)` by a `(batch, 1, hidden)` row run an order of magnitude below
//! memory bandwidth on an H100 (`headshot bench gpu --ops`: `modulate`, `gated_add`), and each
//! FLUX block runs these steps two to four times per stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cuda_util::{alloc_like, contiguous_view, cuda_only_cpu_fwd, output};
use super::fp8_rows_cuda::{QuantizedRows, write_packed};

/// PTX of `adaln.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adaln.ptx"));
/// Threads per block, as in the kernels.
const THREADS: usize = 256;
/// Widest row the norm kernel holds in registers (2 values × 8 pairs × 256 threads).
const MAX_HIDDEN: usize = 4096;
/// LayerNorm epsilon of FLUX's adaLN norms.
const EPS: f32 = 1e-6;

/// Whether the kernels take activations `x` `(batch, tokens, hidden)`.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.dims3().is_ok_and(|(b, n, h)| {
            b > 0 && n > 0 && h > 0 && h.is_multiple_of(2) && h <= MAX_HIDDEN
        })
}

/// A `(batch, 1, hidden)` modulation row: its slice from the first batch's row on, and the
/// distance between batches.
fn modulation<'a, T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    batch: usize,
    hidden: usize,
) -> Result<(CudaView<'a, T>, i64)> {
    let dims = l.shape().dims();
    let stride = l.stride();
    if dims != [batch, 1, hidden] || stride[2] != 1 || !l.start_offset().is_multiple_of(2) {
        candle_core::bail!(
            "adaLN wants a ({batch}, 1, {hidden}) modulation row with unit stride, got {:?} {:?}",
            dims,
            stride
        );
    }
    let batch_stride = if batch > 1 { stride[0] } else { hidden };
    if !batch_stride.is_multiple_of(2) {
        candle_core::bail!("adaLN wants modulation rows 4-byte aligned");
    }
    let start = l.start_offset();
    let end = start + (batch - 1) * batch_stride + hidden;
    Ok((s.slice(start..end), batch_stride as i64))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `LayerNorm(x) · (1 + scale) + shift`.
    NormModulate,
    /// The same, quantized row by row to e4m3 into a packed buffer of [`QuantizedRows`].
    NormModulateE4m3,
    /// `residual + gate · x`.
    GatedResidual,
}

struct AdaLn(Step);

impl CustomOp3 for AdaLn {
    fn name(&self) -> &'static str {
        match self.0 {
            Step::NormModulate => "headshot-norm-modulate",
            Step::NormModulateE4m3 => "headshot-norm-modulate-e4m3",
            Step::GatedResidual => "headshot-gated-residual",
        }
    }

    cuda_only_cpu_fwd!(3);

    /// The norm steps: (x, scale, shift). GatedResidual: (residual, x, gate).
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, rows, hidden) = l1.shape().dims3()?;
        // Pairs of values per load; e4m3 rows also feed the FP8 GEMM (widths in 16s).
        let multiple = if self.0 == Step::NormModulateE4m3 {
            16
        } else {
            2
        };
        if !hidden.is_multiple_of(multiple) || hidden > MAX_HIDDEN {
            candle_core::bail!(
                "this adaLN kernel takes widths in multiples of {multiple} up to {MAX_HIDDEN}, \
                 got {hidden}"
            );
        }
        let (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b), CudaStorageSlice::BF16(c)) =
            (&s1.slice, &s2.slice, &s3.slice)
        else {
            candle_core::bail!("the adaLN kernels want bf16 inputs");
        };
        let dev = s1.device();
        let first = contiguous_view(a, l1, 2, "adaLN input")?;
        let (rows_i, hidden_i) = (rows as i32, hidden as i32);
        if self.0 == Step::GatedResidual {
            if l2.shape() != l1.shape() {
                candle_core::bail!(
                    "gated residual wants x shaped like the residual, got {:?} and {:?}",
                    l2.shape(),
                    l1.shape()
                );
            }
            let x = contiguous_view(b, l2, 2, "gated residual update")?;
            let (gate, vec_batch) = modulation(c, l3, batch, hidden)?;
            let func =
                dev.get_or_load_custom_func("headshot_gated_residual_bf16", "headshot_adaln", PTX)?;
            let pairs = rows * hidden / 2;
            let cfg = LaunchConfig {
                grid_dim: (
                    pairs.div_ceil(THREADS).clamp(1, 8192) as u32,
                    batch as u32,
                    1,
                ),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut y = alloc_like(dev, a, batch * rows * hidden)?;
            let rows_i64 = rows as i64;
            let mut builder = func.builder();
            builder.arg(&first);
            builder.arg(&x);
            builder.arg(&gate);
            builder.arg(&vec_batch);
            builder.arg(&mut y);
            builder.arg(&rows_i64);
            builder.arg(&hidden_i);
            // SAFETY: every pair index stays below batch·rows·hidden/2 for the activations
            // and below hidden/2 within each batch's gate row.
            unsafe { builder.launch(cfg) }.w()?;
            return Ok(output(dev, CudaStorageSlice::BF16, y, l1.shape().clone()));
        }
        let (scale, vec_batch) = modulation(b, l2, batch, hidden)?;
        let (shift, shift_batch) = modulation(c, l3, batch, hidden)?;
        if shift_batch != vec_batch {
            candle_core::bail!("adaLN wants scale and shift rows laid out alike");
        }
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, batch as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // Both norm kernels take (x, scale, shift, vec_batch, outputs…, rows, hidden, eps).
        if self.0 == Step::NormModulate {
            let func =
                dev.get_or_load_custom_func("headshot_norm_modulate_bf16", "headshot_adaln", PTX)?;
            let mut y = alloc_like(dev, a, batch * rows * hidden)?;
            let mut builder = func.builder();
            builder.arg(&first);
            builder.arg(&scale);
            builder.arg(&shift);
            builder.arg(&vec_batch);
            builder.arg(&mut y);
            builder.arg(&rows_i);
            builder.arg(&hidden_i);
            builder.arg(&EPS);
            // SAFETY: one block per row reads that row of x and the batch's modulation rows,
            // all inside the views above, and writes the same row of y.
            unsafe { builder.launch(cfg) }.w()?;
            return Ok(output(dev, CudaStorageSlice::BF16, y, l1.shape().clone()));
        }
        let func =
            dev.get_or_load_custom_func("headshot_norm_modulate_e4m3", "headshot_adaln", PTX)?;
        write_packed(dev, batch * rows, hidden, |values, row_scales| {
            let mut builder = func.builder();
            builder.arg(&first);
            builder.arg(&scale);
            builder.arg(&shift);
            builder.arg(&vec_batch);
            builder.arg(values);
            builder.arg(row_scales);
            builder.arg(&rows_i);
            builder.arg(&hidden_i);
            builder.arg(&EPS);
            // SAFETY: one block per row reads that row of x and the batch's modulation rows,
            // all inside the views above, and writes that row's hidden bytes and its scale.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        })
    }
}

/// `LayerNorm(x) · (1 + scale) + shift` for bf16 `x` `(batch, tokens, hidden)` and
/// modulation rows `(batch, 1, hidden)`.
pub fn norm_modulate(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(scale, shift, &AdaLn(Step::NormModulate))
}

/// `residual + gate · x` for bf16 `residual`, `x` `(batch, tokens, hidden)` and a gate row
/// `(batch, 1, hidden)`.
pub fn gated_residual(residual: &Tensor, x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    residual
        .contiguous()?
        .apply_op3_no_bwd(&x.contiguous()?, gate, &AdaLn(Step::GatedResidual))
}

/// `LayerNorm(x) · (1 + scale) + shift` as [`norm_modulate`], quantized row by row to e4m3
/// in the same kernel for a per-row FP8 projection: bit for bit [`norm_modulate`] followed by
/// [`QuantizedRows::quantize`], without the bf16 result in memory.
pub fn norm_modulate_rows(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<QuantizedRows> {
    let (batch, rows, hidden) = x.dims3()?;
    let packed = x
        .contiguous()?
        .apply_op3_no_bwd(scale, shift, &AdaLn(Step::NormModulateE4m3))?;
    QuantizedRows::from_packed(packed, &[batch, rows], hidden)
}
