//! FP8 projections with one scale per token and one per output channel (cuBLASLt's "outer
//! vector" scaling, `model.fp8_scale = "row"`).
//!
//! The per-tensor path reads its activations twice before the GEMM (max |x|, then the
//! conversion) and needs the single block's second projection input joined into one tensor
//! first. Per row, one kernel does both passes over a row the block holds in its caches, and
//! reads a joined input from its two parts directly: about half the memory traffic around
//! each FP8 GEMM. A token's scale no longer depends on the largest value elsewhere in the
//! image either, so the rounding error follows each token's own range.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::cuda_util::{alloc_like, contiguous_view, cuda_only_cpu_fwd, output};
use super::gemm_cuda::{FP8_PTX, Fp8Operands, Fp8Scales, fp8_gemm};
use super::layers::Activation;

/// Rows of e4m3 values with one f32 scale each (`values · scale ≈ row`), in one u8 buffer:
/// the values (rows × width), then the scales from the next 256-byte boundary. One buffer,
/// because a candle op returns one tensor and both halves must live exactly as long.
#[derive(Debug, Clone)]
pub struct QuantizedRows {
    packed: Tensor,
    rows: usize,
    width: usize,
    /// The input's dimensions but the last (a projection's output keeps them).
    lead: Vec<usize>,
    /// The rows widened to bf16, made on first need: a weight's, kept for the shapes
    /// cuBLASLt refuses with per-row scales ([`linear`]).
    widened: Arc<OnceLock<Tensor>>,
}

/// Byte offset of the scales in a packed buffer (256-byte aligned, as cuBLASLt prefers).
fn scales_offset(rows: usize, width: usize) -> usize {
    (rows * width).next_multiple_of(256)
}

/// Bytes of a packed buffer.
fn packed_len(rows: usize, width: usize) -> usize {
    scales_offset(rows, width) + 4 * rows
}

/// A packed buffer for `rows` × `width` values written by `fill`, which gets the value bytes
/// and the row scales as two views (and must write all of both before the kernel it enqueues
/// reads nothing else of the buffer), and the candle storage and shape that hold it.
pub(super) fn write_packed(
    dev: &CudaDevice,
    rows: usize,
    width: usize,
    fill: impl FnOnce(&mut CudaViewMut<'_, u8>, &mut CudaViewMut<'_, f32>) -> Result<()>,
) -> Result<(CudaStorage, Shape)> {
    // SAFETY: `fill`'s kernel writes every value byte and every scale; the padding between
    // them is never read.
    let mut packed = unsafe { dev.alloc::<u8>(packed_len(rows, width)) }?;
    {
        // The views borrow `packed` until the kernel is enqueued.
        let (mut values, mut tail) = packed.split_at_mut(scales_offset(rows, width));
        // SAFETY: the tail holds 4·rows bytes from a 256-byte aligned offset: rows f32.
        let mut scales = unsafe { tail.transmute_mut::<f32>(rows) }.ok_or_else(|| {
            candle_core::Error::Msg("packed FP8 rows: scale buffer too small".into())
        })?;
        fill(&mut values, &mut scales)?;
    }
    let len = packed.len();
    Ok(output(dev, CudaStorageSlice::U8, packed, Shape::from(len)))
}

/// Whether [`QuantizedRows::quantize`] takes `parts`: one or two bf16 CUDA tensors with the
/// same leading dimensions, each as wide as a multiple of 8 (the kernel loads 8 values at a
/// time) and together a multiple of 16 (cuBLASLt's FP8 GEMM), starting 16-byte aligned
/// when contiguous.
pub fn supports(parts: &[&Tensor]) -> bool {
    let Some(first) = parts.first() else {
        return false;
    };
    let lead = |t: &Tensor| t.dims().split_last().map(|(_, l)| l.to_vec());
    let width: usize = parts
        .iter()
        .map(|p| p.dims().last().copied().unwrap_or(0))
        .sum();
    parts.len() <= 2
        && width > 0
        && width.is_multiple_of(16)
        && parts.iter().all(|p| {
            p.device().is_cuda()
                && p.dtype() == DType::BF16
                && p.rank() >= 1
                && p.dims().last().is_some_and(|w| w.is_multiple_of(8))
                // A view that is not contiguous is copied (to offset 0) before the kernel.
                && (!p.is_contiguous() || p.layout().start_offset().is_multiple_of(8))
                && lead(p) == lead(first)
        })
}

impl QuantizedRows {
    /// Quantizes the rows of `parts` joined along their last dimension (see [`supports`]),
    /// each row with its own scale.
    pub fn quantize(parts: &[&Tensor]) -> Result<Self> {
        if !supports(parts) {
            candle_core::bail!(
                "per-row FP8 quantization takes one or two bf16 CUDA tensors with equal leading \
                 dimensions and widths in multiples of 8 (16 together), got {:?}",
                parts
                    .iter()
                    .map(|p| (p.dims().to_vec(), p.dtype()))
                    .collect::<Vec<_>>()
            );
        }
        let first = parts[0];
        let (&a_width, lead) = first
            .dims()
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("a projection input has no features".into()))?;
        let rows: usize = lead.iter().product();
        let b_width = parts
            .get(1)
            .map_or(0, |p| p.dims().last().copied().unwrap_or(0));
        let op = QuantizeRows {
            rows,
            a_width,
            b_width,
        };
        let packed = match parts {
            [a] => a.contiguous()?.apply_op1_no_bwd(&op)?,
            [a, b] => a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &op)?,
            _ => candle_core::bail!("per-row FP8 quantization joins at most two tensors"),
        };
        Ok(Self {
            packed,
            rows,
            width: a_width + b_width,
            lead: lead.to_vec(),
            widened: Arc::default(),
        })
    }

    /// Rows quantized by another kernel into a packed buffer laid out as [`packed_len`]
    /// describes (the adaLN kernel's FP8 variant), for an input shaped `lead` × `width`.
    pub(super) fn from_packed(packed: Tensor, lead: &[usize], width: usize) -> Result<Self> {
        let rows = lead.iter().product();
        if packed.dtype() != DType::U8 || packed.dims() != [packed_len(rows, width)] {
            candle_core::bail!(
                "a packed FP8 buffer for {rows}×{width} holds {} bytes, got {:?} {:?}",
                packed_len(rows, width),
                packed.dims(),
                packed.dtype()
            );
        }
        Ok(Self {
            packed,
            rows,
            width,
            lead: lead.to_vec(),
            widened: Arc::default(),
        })
    }

    /// The packed device buffer (values, then scales).
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// The values and the scales' bytes, without the (unwritten) padding between them: what
    /// two quantizations of the same rows must agree on.
    pub fn contents(&self) -> Result<Tensor> {
        let values = self.packed.narrow(0, 0, self.rows * self.width)?;
        let scales = self
            .packed
            .narrow(0, scales_offset(self.rows, self.width), 4 * self.rows)?;
        Tensor::cat(&[&values, &scales], 0)
    }

    /// The rows in bf16 (values times their row's scale), shaped as the input was.
    pub fn widen(&self) -> Result<Tensor> {
        let mut dims = self.lead.clone();
        dims.push(self.width);
        super::fp8_widen::widen_packed_rows(
            &self.packed,
            self.rows,
            self.width,
            scales_offset(self.rows, self.width),
            DType::BF16,
        )?
        .reshape(dims)
    }

    /// [`QuantizedRows::widen`], kept after the first call (for weights).
    fn widened(&self) -> Result<Tensor> {
        if let Some(t) = self.widened.get() {
            return Ok(t.clone());
        }
        let t = self.widen()?;
        Ok(self.widened.get_or_init(|| t).clone())
    }

    /// Values held (rows × width).
    pub fn values(&self) -> usize {
        self.rows * self.width
    }

    /// Bytes held on the device: one per value and four per row.
    pub fn bytes(&self) -> usize {
        self.packed.elem_count()
    }
}

/// The kernel behind [`QuantizedRows::quantize`]: input `a`, or `a` and `b` joined.
struct QuantizeRows {
    rows: usize,
    a_width: usize,
    b_width: usize,
}

impl QuantizeRows {
    /// Launches the kernel on `a` (rows × a_width) and `b` (rows × b_width, unread when
    /// b_width is 0) into a packed buffer.
    fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (rows, width) = (self.rows, self.a_width + self.b_width);
        if a.len() != rows * self.a_width || b.len() < rows * self.b_width {
            candle_core::bail!("per-row FP8 quantization: the inputs do not hold {rows} rows");
        }
        let narrow = |v: usize| {
            u32::try_from(v).map_err(|_| {
                candle_core::Error::Msg(format!("per-row FP8 quantization: {v} exceeds u32"))
            })
        };
        let (a_width, b_width, rows32) =
            (narrow(self.a_width)?, narrow(self.b_width)?, narrow(rows)?);
        let f =
            dev.get_or_load_custom_func("headshot_quantize_rows_e4m3", "headshot_fp8", FP8_PTX)?;
        write_packed(dev, rows, width, |values, scales| {
            let mut builder = f.builder();
            builder.arg(a);
            builder.arg(&a_width);
            builder.arg(b);
            builder.arg(&b_width);
            builder.arg(&rows32);
            builder.arg(values);
            builder.arg(scales);
            let cfg = LaunchConfig {
                grid_dim: (rows32.clamp(1, 1 << 16), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: reads rows·a_width and rows·b_width bf16 (lengths checked above, both
            // 16-byte aligned by `supports`), writes rows·width bytes and rows f32, sized so.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        })
    }
}

impl CustomOp1 for QuantizeRows {
    fn name(&self) -> &'static str {
        "headshot-quantize-rows-e4m3"
    }

    cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let CudaStorageSlice::BF16(a) = &s.slice else {
            candle_core::bail!("per-row FP8 quantization takes bf16");
        };
        let a = contiguous_view(a, l, 8, "per-row FP8 input")?;
        self.launch(s.device(), &a, &a)
    }
}

impl CustomOp2 for QuantizeRows {
    fn name(&self) -> &'static str {
        "headshot-quantize-rows-e4m3-joined"
    }

    cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) = (&s1.slice, &s2.slice) else {
            candle_core::bail!("per-row FP8 quantization takes bf16");
        };
        let a = contiguous_view(a, l1, 8, "per-row FP8 input (first part)")?;
        let b = contiguous_view(b, l2, 8, "per-row FP8 input (second part)")?;
        self.launch(s1.device(), &a, &b)
    }
}

/// The per-row FP8 GEMM: packed activations (m rows), packed weight (n rows), bf16 bias.
struct RowScaledLinear {
    act: Activation,
    m: usize,
    n: usize,
    k: usize,
    out_shape: Shape,
}

impl CustomOp3 for RowScaledLinear {
    fn name(&self) -> &'static str {
        "headshot-cublaslt-fp8-rows-linear"
    }

    cuda_only_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let (m, n, k) = (self.m, self.n, self.k);
        let (CudaStorageSlice::U8(x), CudaStorageSlice::U8(w), CudaStorageSlice::BF16(b_all)) =
            (&xs.slice, &ws.slice, &bs.slice)
        else {
            candle_core::bail!("the per-row FP8 projection wants packed e4m3 rows and a bf16 bias");
        };
        let x = contiguous_view(x, xl, 256, "packed FP8 activations")?;
        let w = contiguous_view(w, wl, 256, "packed FP8 weight")?;
        let b = contiguous_view(b_all, bl, 128, "FP8 projection bias")?;
        if x.len() != packed_len(m, k) || w.len() != packed_len(n, k) || b.len() != n {
            candle_core::bail!(
                "per-row FP8 projection: buffers do not match m {m}, n {n}, k {k} ({} / {} / {} \
                 bytes or values)",
                x.len(),
                w.len(),
                b.len()
            );
        }
        let dev = xs.device();
        let stream = dev.cuda_stream();
        let mut y = alloc_like(dev, b_all, m * n)?;
        let (x_ptr, _x_guard) = x.device_ptr(&stream);
        let (w_ptr, _w_guard) = w.device_ptr(&stream);
        let (b_ptr, _b_guard) = b.device_ptr(&stream);
        let (y_ptr, _y_guard) = y.device_ptr_mut(&stream);
        let (x_scales, w_scales) = (
            x_ptr + scales_offset(m, k) as u64,
            w_ptr + scales_offset(n, k) as u64,
        );
        // SAFETY: the packed buffers hold m×k and n×k e4m3 values and m and n f32 scales at
        // the offsets used (lengths checked above), the bias n bf16, y m×n bf16; the guards
        // hold them until the GEMM is enqueued.
        unsafe {
            fp8_gemm(
                dev,
                Fp8Operands {
                    weight: (w_ptr, w_scales),
                    input: (x_ptr, x_scales),
                    bias: b_ptr,
                    out: y_ptr,
                },
                (m, n, k),
                self.act,
                Fp8Scales::PerRow,
            )?;
        }
        drop((_x_guard, _w_guard, _b_guard, _y_guard));
        Ok(output(
            dev,
            CudaStorageSlice::BF16,
            y,
            self.out_shape.clone(),
        ))
    }
}

/// `act(x · wᵀ + b)` on FP8 tensor cores, x and w quantized by row ([`QuantizedRows`]; w's
/// rows are its output channels), b bf16 `(n)`. The result keeps x's leading dimensions.
/// A shape cuBLASLt refuses with per-row scales runs widened to bf16 instead (the weight's
/// widening kept: 2 bytes a weight more), logged once per shape.
pub fn linear(x: &QuantizedRows, w: &QuantizedRows, b: &Tensor, act: Activation) -> Result<Tensor> {
    let op = row_scaled(x, w, b, act)?;
    let shape = (x.packed.device().location(), op.m, op.n, op.k, act as u32);
    if !refused().lock().is_ok_and(|r| r.contains(&shape)) {
        match x.packed.apply_op3_no_bwd(&w.packed, &b.contiguous()?, &op) {
            Err(e) if super::gemm_algo_cuda::is_refusal(&e) => {
                tracing::warn!(
                    m = op.m,
                    n = op.n,
                    k = op.k,
                    error = %e.to_string().lines().next().unwrap_or_default(),
                    "cuBLASLt refuses this projection's shape with per-row FP8 scales; it runs \
                     widened to bf16 (the weight kept widened: 2 bytes a weight more)"
                );
                if let Ok(mut r) = refused().lock() {
                    r.insert(shape);
                }
            }
            other => return other,
        }
    }
    linear_widened(x, w, b, act)
}

/// [`linear`] without the widened way out: cuBLASLt's refusal is an error. What the load-time
/// probe asks, so a GPU that refuses per-row scales altogether keeps per-tensor ones.
fn linear_fp8_only(
    x: &QuantizedRows,
    w: &QuantizedRows,
    b: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let op = row_scaled(x, w, b, act)?;
    x.packed.apply_op3_no_bwd(&w.packed, &b.contiguous()?, &op)
}

/// The per-row FP8 GEMM op for these operands, their widths checked.
fn row_scaled(
    x: &QuantizedRows,
    w: &QuantizedRows,
    b: &Tensor,
    act: Activation,
) -> Result<RowScaledLinear> {
    if x.width != w.width || b.dims() != [w.rows] {
        candle_core::bail!(
            "per-row FP8 projection: input width {} against weight {}×{} and bias {:?}",
            x.width,
            w.rows,
            w.width,
            b.dims()
        );
    }
    let mut out = x.lead.clone();
    out.push(w.rows);
    Ok(RowScaledLinear {
        act,
        m: x.rows,
        n: w.rows,
        k: x.width,
        out_shape: Shape::from(out),
    })
}

/// A per-row FP8 GEMM's device, m, n, k and activation.
type GemmShape = (candle_core::DeviceLocation, usize, usize, usize, u32);

/// Shapes cuBLASLt refused with per-row scales: asked once each.
fn refused() -> &'static Mutex<HashSet<GemmShape>> {
    static REFUSED: OnceLock<Mutex<HashSet<GemmShape>>> = OnceLock::new();
    REFUSED.get_or_init(Default::default)
}

/// [`linear`] on the rows widened back to bf16 (the weight's kept), as a full-precision
/// [`Dense`](super::layers::Dense) layer runs it (the bf16 cuBLASLt GEMM with the bias and
/// activation in its epilogue where it applies): the same numbers the FP8 GEMM multiplies,
/// summed in f32 from bf16 products. Public for `--check`, which holds it to the FP8 GEMM on
/// a shape cuBLASLt takes.
pub fn linear_widened(
    x: &QuantizedRows,
    w: &QuantizedRows,
    b: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let layer = super::layers::Dense::from_parts(
        w.widened()?,
        Some(b.clone()),
        super::layers::Projections::default(),
    )?;
    layer.forward_act(&x.widen()?, act)
}

/// Whether this GPU runs the per-row FP8 GEMM, and runs it right: checked once per GPU on a
/// small projection at FLUX's input width (3072, quantized from two parts) whose rows span
/// three orders of magnitude, with and without GELU, against the same projection in f32. cuBLAS before 12.9 (or a GPU before Hopper) refuses
/// the scaling mode; either failure is logged once and the caller keeps per-tensor scales.
pub fn available(device: &Device) -> bool {
    static PROBED: OnceLock<Mutex<HashMap<usize, bool>>> = OnceLock::new();
    let Device::Cuda(dev) = device else {
        return false;
    };
    let ordinal = dev.cuda_stream().context().ordinal();
    let Ok(mut probed) = PROBED.get_or_init(Default::default).lock() else {
        tracing::warn!("per-row FP8 probe state is poisoned; keeping per-tensor scales");
        return false;
    };
    *probed.entry(ordinal).or_insert_with(|| match probe(device) {
        Ok(err) if err <= PROBE_TOLERANCE => true,
        Ok(err) => {
            tracing::warn!(
                max_rel_error = err,
                bound = PROBE_TOLERANCE,
                "per-row FP8 GEMM gives wrong results on this GPU; keeping per-tensor scales"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "per-row FP8 GEMM unavailable on this GPU; keeping per-tensor scales");
            false
        }
    })
}

/// Largest relative error the probe accepts: e4m3 keeps 3 mantissa bits (2⁻⁴ relative
/// rounding per factor), and the sums over 64 products average it down.
const PROBE_TOLERANCE: f32 = 0.1;

/// The probe's worst relative error (per row and per column) over both activations;
/// infinite when the GEMM's output is not finite.
fn probe(device: &Device) -> Result<f32> {
    // FLUX's projection input width, as the single block's linear2 gets it: two parts.
    let (m, n, k, split) = (64usize, 64usize, 3072usize, 1024usize);
    // Positive values (no cancellation in the sums, so errors are the quantization's); row i
    // spans (1 + i)³/1000 × 0.5…1.5: one scale for all would round the small rows to nothing.
    let rows = |count: usize, phase: f64| -> Result<Tensor> {
        let grid = Tensor::arange(0u32, (count * k) as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((count, k))?;
        let wave = ((((grid * 0.37)? + phase)?.sin()? * 0.5)? + 1.0)?;
        let range = Tensor::arange(1u32, count as u32 + 1, device)?
            .to_dtype(DType::F32)?
            .powf(3.0)?
            .affine(1e-3, 0.0)?
            .reshape((count, 1))?;
        wave.broadcast_mul(&range)
    };
    let x = rows(m, 0.0)?;
    let w = (rows(n, 1.0)? / (k as f64).sqrt())?;
    let b = (Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)? * 0.01)?;
    let x16 = x.to_dtype(DType::BF16)?;
    let (left, right) = (x16.narrow(1, 0, split)?, x16.narrow(1, split, k - split)?);
    let xq = QuantizedRows::quantize(&[&left, &right])?;
    let wq = QuantizedRows::quantize(&[&w.to_dtype(DType::BF16)?])?;
    let b16 = b.to_dtype(DType::BF16)?;
    let plain = x.matmul(&w.t()?)?.broadcast_add(&b)?;
    let mut worst = 0f32;
    for act in [Activation::Identity, Activation::GeluTanh] {
        let fast = linear_fp8_only(&xq, &wq, &b16, act)?.to_dtype(DType::F32)?;
        // candle's max skips NaN: a sum does not (w · 0 is 0 only for finite w).
        if (&fast * 0.0)?.abs()?.sum_all()?.to_scalar::<f32>()? != 0.0 {
            return Ok(f32::INFINITY);
        }
        let reference = match act {
            Activation::Identity => plain.clone(),
            Activation::GeluTanh => plain.gelu()?,
        };
        // Rows and columns each span three orders of magnitude: relative to its own row, and
        // to its own column, so a wrong scale for a small row or channel is not hidden.
        let diff = (&fast - &reference)?.abs()?;
        let magnitude = reference.abs()?;
        for dim in [0, 1] {
            let rel = diff
                .max_keepdim(dim)?
                .broadcast_div(&magnitude.max_keepdim(dim)?.maximum(1e-30)?)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            worst = worst.max(rel);
        }
    }
    Ok(worst)
}
