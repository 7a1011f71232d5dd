//! Projections on CUDA through cuBLASLt with the bias, and the MLP's GELU, fused into the
//! GEMM's epilogue: one kernel where candle's `Linear` runs the GEMM, then a broadcast add
//! over the whole output, then GELU as a third pass.
//!
//! bf16 only (what the model runs on GPUs); the caller keeps the plain path for the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{
    Activation as LtActivation, CudaBlasLT, Matmul, MatmulConfig, result as lt, sys as lt_sys,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::{CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cuda_util::{alloc_like, contiguous_view, cuda_only_cpu_fwd, output};
use super::gemm_algo_cuda::{self, TuneKey};
use super::layers::{Activation, E4M3_MAX};

/// cuBLASLt's default minimum pointer alignment (256 bytes), in bf16 elements.
const LT_ALIGN_BF16: usize = 128;

/// Whether a bf16 tensor starts where cuBLASLt's default alignment assumption holds.
pub fn aligned(t: &Tensor) -> bool {
    t.layout().start_offset().is_multiple_of(LT_ALIGN_BF16)
}

/// Whether [`linear`] takes `x`: bf16 on CUDA, starting 256-byte aligned (FLUX's views all
/// do: their offsets are multiples of the hidden size, 3072).
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::BF16 && aligned(x)
}

/// cuBLASLt state of one device: cudarc's wrapper (bf16 GEMMs) and a raw handle with its
/// own workspace (FP8).
struct Lt {
    device: DeviceId,
    blas: Arc<CudaBlasLT>,
    raw: Arc<LtRaw>,
}

/// The device's cuBLASLt state, made on first use. One slot per GPU ordinal: when the
/// pipeline re-creates its device (a reload after an error gets a new `DeviceId`), the old
/// state is dropped first, so reloads do not pile up 32 MiB workspaces and streams.
fn cublaslt(dev: &CudaDevice) -> Result<(Arc<CudaBlasLT>, Arc<LtRaw>)> {
    static SLOTS: OnceLock<Mutex<HashMap<usize, Lt>>> = OnceLock::new();
    let mut slots = SLOTS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("the cuBLASLt handle cache is poisoned".into()))?;
    let ordinal = dev.cuda_stream().context().ordinal();
    if let Some(lt) = slots.get(&ordinal)
        && lt.device == dev.id()
    {
        return Ok((lt.blas.clone(), lt.raw.clone()));
    }
    slots.remove(&ordinal);
    // cudarc's constructor unwraps its workspace allocation: out of GPU memory it panics,
    // which must not take a request (or the worker) down.
    let blas = crate::panics::catch(|| CudaBlasLT::new(dev.cuda_stream()))
        .map_err(|message| {
            candle_core::Error::Msg(format!(
                "cuBLASLt could not allocate its 32 MiB workspace (out of GPU memory?): \
                 {message}"
            ))
        })?
        .map_err(|e| candle_core::Error::Msg(format!("creating a cuBLASLt handle: {e:?}")))?;
    let raw = LtRaw::new(dev)?;
    let lt = Lt {
        device: dev.id(),
        blas: Arc::new(blas),
        raw: Arc::new(raw),
    };
    let handles = (lt.blas.clone(), lt.raw.clone());
    slots.insert(ordinal, lt);
    Ok(handles)
}

/// `(m, n, k)` of `x (…, k) · w (n, k)ᵀ + b (n)`, with n and k multiples of `multiple`
/// (cuBLASLt's FP8 GEMM wants 16).
fn projection_dims(
    xl: &Layout,
    wl: &Layout,
    bl: &Layout,
    multiple: usize,
) -> Result<(usize, usize, usize)> {
    let (n, k) = wl.shape().dims2()?;
    if xl.shape().dims().last() != Some(&k)
        || bl.shape().dims() != [n]
        || !k.is_multiple_of(multiple)
        || !n.is_multiple_of(multiple)
    {
        candle_core::bail!(
            "projection shapes do not fit (widths must be multiples of {multiple}): x {:?}, \
             weight {:?}, bias {:?}",
            xl.shape(),
            wl.shape(),
            bl.shape()
        );
    }
    Ok((xl.shape().elem_count() / k, n, k))
}

/// The input's shape with the last dimension `n`.
fn projection_shape(xl: &Layout, n: usize) -> Shape {
    let mut dims = xl.shape().dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// cudarc's config for row-major `y (m×n) = x (m×k) · wᵀ (+ beta · y)` with w's rows `lda`
/// apart: column-major yᵀ (n×m) = w (n×k, stored as column-major k×n, so transposed) · xᵀ
/// (column-major k×m), the "TN" layout.
fn tn_config((m, n, k): (usize, usize, usize), lda: usize, beta: f32) -> MatmulConfig {
    MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: lda as i64,
        ldb: k as i64,
        beta,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    }
}

struct LtLinear {
    act: Activation,
}

impl CustomOp3 for LtLinear {
    fn name(&self) -> &'static str {
        "headshot-cublaslt-linear"
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
        let (m, n, k) = projection_dims(xl, wl, bl, 1)?;
        let (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w), CudaStorageSlice::BF16(b_all)) =
            (&xs.slice, &ws.slice, &bs.slice)
        else {
            candle_core::bail!("the cuBLASLt projection wants bf16 inputs");
        };
        // cuBLASLt picks kernels assuming 256-byte aligned pointers unless told otherwise.
        let (x, w, b) = (
            contiguous_view(x, xl, LT_ALIGN_BF16, "projection input")?,
            contiguous_view(w, wl, LT_ALIGN_BF16, "projection weight")?,
            contiguous_view(b_all, bl, LT_ALIGN_BF16, "projection bias")?,
        );
        let dev = xs.device();
        // The GEMM writes all m·n elements (beta is 0, so nothing is read first).
        let mut y = alloc_like(dev, b_all, m * n)?;
        let cfg = tn_config((m, n, k), k, 0.0);
        let act = match self.act {
            Activation::Identity => None,
            Activation::GeluTanh => Some(LtActivation::Gelu),
        };
        let (blas, _) = cublaslt(dev)?;
        // SAFETY: the layouts above describe exactly the views passed; the bias holds n
        // elements, one per row of the column-major result.
        unsafe { blas.matmul(cfg, &w, &x, &mut y, Some(&b), act.as_ref()) }
            .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt projection: {e:?}")))?;
        Ok(output(
            dev,
            CudaStorageSlice::BF16,
            y,
            projection_shape(xl, n),
        ))
    }
}

/// `act(x·wᵀ + b)` in one cuBLASLt call, for bf16 CUDA tensors: x `(…, k)`, w `(n, k)`, b `(n)`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &LtLinear { act })
}

/// `act(x0 · w[:, ..k0]ᵀ + x1 · w[:, k0..]ᵀ + b)`: the projection of `x0 (…, k0)` and
/// `x1 (…, k1)` joined along their last dimension, without the join (a copy of both, read
/// again by the GEMM). Two cuBLASLt GEMMs over column blocks of `w (n, k0 + k1)` (its leading
/// dimension stays k0 + k1, so nothing is copied); the second accumulates into the first's
/// output (beta 1) and applies the bias and activation in its epilogue. The partial sum
/// rounds to bf16 once in between.
struct LtLinearParts {
    act: Activation,
    /// The bias `(n)`, bf16 on the same device.
    bias: Tensor,
}

impl CustomOp3 for LtLinearParts {
    fn name(&self) -> &'static str {
        "headshot-cublaslt-linear-parts"
    }

    cuda_only_cpu_fwd!(3);

    /// (x0, x1, w).
    fn cuda_fwd(
        &self,
        s0: &CudaStorage,
        l0: &Layout,
        s1: &CudaStorage,
        l1: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let (k0, k1) = (
            l0.shape().dims().last().copied().unwrap_or(0),
            l1.shape().dims().last().copied().unwrap_or(0),
        );
        let m = l0.shape().elem_count() / k0.max(1);
        if k0 + k1 != k
            || k0 == 0
            || k1 == 0
            || l1.shape().elem_count() != m * k1
            || !k0.is_multiple_of(LT_ALIGN_BF16)
        {
            candle_core::bail!(
                "split projection shapes do not fit: parts {:?} and {:?}, weight {:?}",
                l0.shape(),
                l1.shape(),
                wl.shape()
            );
        }
        let (bias_storage, bias_layout) = self.bias.storage_and_layout();
        let candle_core::Storage::Cuda(bias_storage) = &*bias_storage else {
            candle_core::bail!("the split projection's bias is not on the GPU");
        };
        let (
            CudaStorageSlice::BF16(x0),
            CudaStorageSlice::BF16(x1),
            CudaStorageSlice::BF16(w),
            CudaStorageSlice::BF16(b_all),
        ) = (&s0.slice, &s1.slice, &ws.slice, &bias_storage.slice)
        else {
            candle_core::bail!("the split cuBLASLt projection wants bf16 inputs");
        };
        if bias_layout.shape().dims() != [n] {
            candle_core::bail!(
                "split projection bias {:?} for {n} outputs",
                bias_layout.shape()
            );
        }
        let (x0, x1, w, b) = (
            contiguous_view(x0, l0, LT_ALIGN_BF16, "split projection input (first part)")?,
            contiguous_view(
                x1,
                l1,
                LT_ALIGN_BF16,
                "split projection input (second part)",
            )?,
            contiguous_view(w, wl, LT_ALIGN_BF16, "split projection weight")?,
            contiguous_view(b_all, bias_layout, LT_ALIGN_BF16, "split projection bias")?,
        );
        let dev = s0.device();
        let mut y = alloc_like(dev, b_all, m * n)?;
        let cfg = |ki: usize, beta: f32| tn_config((m, n, ki), k, beta);
        let act = match self.act {
            Activation::Identity => None,
            Activation::GeluTanh => Some(LtActivation::Gelu),
        };
        let (blas, _) = cublaslt(dev)?;
        let w_rest = w.slice(k0..);
        // SAFETY: the first GEMM reads the first k0 columns of each of w's n rows (leading
        // dimension k) and x0 (m×k0), writing all of y; the second reads the k1 columns from
        // k0 on (a view starting there, 256-byte aligned as k0 is a multiple of 128) and x1
        // (m×k1), adding y, then the bias (n) and the activation.
        unsafe {
            blas.matmul(cfg(k0, 0.0), &w, &x0, &mut y, None, None)
                .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt projection: {e:?}")))?;
            blas.matmul(cfg(k1, 1.0), &w_rest, &x1, &mut y, Some(&b), act.as_ref())
                .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt projection: {e:?}")))?;
        }
        Ok(output(
            dev,
            CudaStorageSlice::BF16,
            y,
            projection_shape(l0, n),
        ))
    }
}

/// Whether the model's joined projection inputs go through [`linear_parts`]: on unless
/// `HEADSHOT_SPLIT_GEMM=off`, since `--check` (`gemm_bias_parts`) passed on an H100 and the
/// bf16 step took 153.9 ms with it against 160.8 without (same call; docs/BENCHMARKS.md).
pub fn split_gemm() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| super::cuda_util::opt_out("HEADSHOT_SPLIT_GEMM", "on", "off"))
}

/// Whether [`linear_parts`] takes `x0` and `x1` for weight `w` and bias `b`: bf16 CUDA
/// tensors, all 256-byte aligned, with equal leading dimensions, and a first part as wide as a multiple of 128
/// (where the weight's second column block starts aligned).
pub fn supports_parts(x0: &Tensor, x1: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    let lead = |t: &Tensor| t.dims().split_last().map(|(_, l)| l.to_vec());
    supports(x0)
        && supports(x1)
        && aligned(w)
        && aligned(b)
        && lead(x0).is_some()
        && lead(x0) == lead(x1)
        && x0
            .dims()
            .last()
            .is_some_and(|k0| k0.is_multiple_of(LT_ALIGN_BF16))
}

/// `act([x0, x1] · wᵀ + b)` for the join of `x0 (…, k0)` and `x1 (…, k1)` along the last
/// dimension, without making it (see [`supports_parts`]).
pub fn linear_parts(
    x0: &Tensor,
    x1: &Tensor,
    w: &Tensor,
    b: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let op = LtLinearParts {
        act,
        bias: b.contiguous()?,
    };
    x0.contiguous()?
        .apply_op3_no_bwd(&x1.contiguous()?, &w.contiguous()?, &op)
}

/// PTX of `fp8_quant.cu`: max |x| and per-tensor e4m3 quantization of activations.
pub(super) const FP8_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8_quant.ptx"));

/// A cuBLASLt handle and workspace of our own for the FP8 GEMM (the safe wrapper's workspace
/// is not reachable from outside cudarc).
struct LtRaw {
    handle: lt_sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: a cuBLASLt handle may be used from any thread; calls are serialised on the one
// stream candle uses per device.
unsafe impl Send for LtRaw {}
// SAFETY: as above; the handle is never mutated after creation.
unsafe impl Sync for LtRaw {}

/// Workspace cuBLASLt may use: NVIDIA's recommendation for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

impl LtRaw {
    fn new(dev: &CudaDevice) -> Result<Self> {
        let handle = lt::create_handle().map_err(lt_error("creating a cuBLASLt handle"))?;
        match dev.alloc_zeros::<u8>(WORKSPACE_BYTES) {
            Ok(workspace) => Ok(Self { handle, workspace }),
            Err(e) => {
                // SAFETY: created just above and not shared.
                let _ = unsafe { lt::destroy_handle(handle) };
                Err(e)
            }
        }
    }
}

impl Drop for LtRaw {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `LtRaw::new` and is destroyed once, after the
        // last `Arc` holding it (so after the last GEMM that used it was enqueued).
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn lt_error(what: &'static str) -> impl Fn(lt::CublasError) -> candle_core::Error {
    move |e| candle_core::Error::Msg(format!("{what}: {e:?}"))
}

/// Owns a cuBLASLt descriptor and destroys it on drop.
struct Owned<T: Copy> {
    raw: T,
    destroy: unsafe fn(T) -> std::result::Result<(), lt::CublasError>,
}

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `raw` was created by the matching create call and is destroyed once.
        let _ = unsafe { (self.destroy)(self.raw) };
    }
}

fn layout(
    dtype: lt_sys::cudaDataType,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<Owned<lt_sys::cublasLtMatrixLayout_t>> {
    let raw = lt::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64)
        .map_err(lt_error("cuBLASLt matrix layout"))?;
    Ok(Owned {
        raw,
        destroy: lt::destroy_matrix_layout,
    })
}

/// Sets one matmul-descriptor attribute from a plain value.
///
/// # Safety
/// `T` must be the type cuBLASLt documents for `attr`.
unsafe fn set<T>(
    desc: lt_sys::cublasLtMatmulDesc_t,
    attr: lt_sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: the pointer and size describe `value`, whose type the caller vouches for.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            (value as *const T).cast(),
            std::mem::size_of::<T>(),
        )
    }
    .map_err(lt_error("cuBLASLt matmul attribute"))
}

/// FP8 projection: the e4m3 weight (with its per-tensor scale on the device) times the
/// activations quantized to e4m3 on the fly (per-tensor scale from their max |x|), f32
/// accumulation, bf16 output with the bias (and GELU) in the epilogue.
struct LtFp8Linear {
    act: Activation,
    /// `scale` of the weight, one f32 on the same device.
    weight_scale: Tensor,
}

impl CustomOp3 for LtFp8Linear {
    fn name(&self) -> &'static str {
        "headshot-cublaslt-fp8-linear"
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
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, PushKernelArg};

        let (m, n, k) = projection_dims(xl, wl, bl, 16)?;
        let (CudaStorageSlice::BF16(x), CudaStorageSlice::U8(w), CudaStorageSlice::BF16(b)) =
            (&xs.slice, &ws.slice, &bs.slice)
        else {
            candle_core::bail!(
                "the FP8 projection wants bf16 x and bias and e4m3 weight bits (from quantize_weight)"
            );
        };
        let (xv, wv, bv) = (
            contiguous_view(x, xl, 8, "FP8 projection input")?,
            contiguous_view(w, wl, 2 * LT_ALIGN_BF16, "FP8 projection weight")?,
            contiguous_view(b, bl, LT_ALIGN_BF16, "FP8 projection bias")?,
        );
        let dev = xs.device();
        let stream = dev.cuda_stream();

        // 1. Quantize the activations: max |x|, then scale and convert.
        let mut amax = dev.alloc_zeros::<f32>(1)?;
        let f = dev.get_or_load_custom_func("headshot_amax_bf16", "headshot_fp8", FP8_PTX)?;
        let elems = (m * k) as u64;
        let mut builder = f.builder();
        builder.arg(&xv);
        builder.arg(&elems);
        builder.arg(&mut amax);
        // SAFETY: reads `elems` bf16 of x (16-byte aligned, checked above), writes one f32.
        unsafe { builder.launch(elementwise(m * k)) }.w()?;
        let (xq, x_scale) = quantize(dev, &xv, &amax.slice(0..1))?;

        // 2. The GEMM, laid out as in `LtLinear` ("TN", column-major yᵀ = w · xᵀ).
        let (scale_storage, scale_layout) = self.weight_scale.storage_and_layout();
        let candle_core::Storage::Cuda(scale_storage) = &*scale_storage else {
            candle_core::bail!("the FP8 weight scale is not on the GPU");
        };
        let CudaStorageSlice::F32(w_scale) = &scale_storage.slice else {
            candle_core::bail!("the FP8 weight scale is not f32");
        };
        let start = scale_layout.start_offset();
        let w_scale = w_scale.slice(start..start + 1);
        let y = alloc_like(dev, b, m * n)?;
        let (w_ptr, _w_guard) = wv.device_ptr(&stream);
        let (x_ptr, _x_guard) = xq.device_ptr(&stream);
        let (b_ptr, _b_guard) = bv.device_ptr(&stream);
        let (ws_ptr, _ws_guard) = w_scale.device_ptr(&stream);
        let (xs_ptr, _xs_guard) = x_scale.device_ptr(&stream);
        let (y_ptr, _y_guard) = y.device_ptr(&stream);
        // SAFETY: w holds n×k e4m3, xq m×k e4m3, b n bf16 and y m×n bf16; each scale is one
        // f32; all are on `dev` and held by the guards until the GEMM is enqueued.
        unsafe {
            fp8_gemm(
                dev,
                Fp8Operands {
                    weight: (w_ptr, ws_ptr),
                    input: (x_ptr, xs_ptr),
                    bias: b_ptr,
                    out: y_ptr,
                },
                (m, n, k),
                self.act,
                Fp8Scales::PerTensor,
            )?;
        }
        drop((_w_guard, _x_guard, _b_guard, _ws_guard, _xs_guard, _y_guard));
        Ok(output(
            dev,
            CudaStorageSlice::BF16,
            y,
            projection_shape(xl, n),
        ))
    }
}

/// `CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F` (an int32 attribute value). cudarc names it
/// only in its CUDA 12.9+ bindings, and the build picks the bindings of the toolkit it finds:
/// with the raw value a 12.8 build compiles too, and its cuBLASLt refuses the mode at run
/// time, which the load-time probe turns into per-tensor scales.
const OUTER_VEC_32F: i32 = 3;

/// How the FP8 GEMM reads its two scale pointers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fp8Scales {
    /// One f32 each for the weight and the activations.
    PerTensor,
    /// One f32 per output channel (n) for the weight and per token (m) for the activations:
    /// cuBLASLt's "outer vector" scaling (cuBLAS 12.9 and later).
    PerRow,
}

/// Device addresses of one FP8 projection's buffers: `(values, scales)` of the e4m3 weight
/// (n×k) and activations (m×k), the bf16 bias (n) and the bf16 output (m×n).
pub(super) struct Fp8Operands {
    /// The weight's e4m3 values (n×k) and its scale(s).
    pub weight: (u64, u64),
    /// The activations' e4m3 values (m×k) and their scale(s).
    pub input: (u64, u64),
    /// The bias, n bf16.
    pub bias: u64,
    /// The output, m×n bf16.
    pub out: u64,
}

/// Enqueues `out = act(input · weightᵀ, scaled + bias)` on `dev`'s stream: the FP8 GEMM
/// in the "TN" layout of `LtLinear` (column-major outᵀ = weight · inputᵀ), f32 accumulation
/// with fast accumulation, bias and GELU in the epilogue.
///
/// # Safety
/// Every address is a live buffer on `dev` of the size `(m, n, k)` and `scales` imply, held
/// until the GEMM is enqueued; the bits start 256-byte aligned.
pub(super) unsafe fn fp8_gemm(
    dev: &CudaDevice,
    ops: Fp8Operands,
    (m, n, k): (usize, usize, usize),
    act: Activation,
    scales: Fp8Scales,
) -> Result<()> {
    use lt_sys::{cublasLtMatmulDescAttributes_t as Attr, cudaDataType_t as Ty};
    let stream = dev.cuda_stream();
    let (_, ctx) = cublaslt(dev)?;
    let desc = matmul_desc()?;
    let epilogue = match act {
        Activation::Identity => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        Activation::GeluTanh => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
    };
    // SAFETY: each value has the type cuBLASLt documents for its attribute (transpose and
    // scale mode: int32, epilogue: its enum, pointers: device addresses, fast accumulation:
    // int8).
    unsafe {
        set(desc.raw, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
        set(desc.raw, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
        set(desc.raw, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        set(desc.raw, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ops.bias)?;
        if scales == Fp8Scales::PerRow {
            set(
                desc.raw,
                Attr::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                &OUTER_VEC_32F,
            )?;
            set(
                desc.raw,
                Attr::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                &OUTER_VEC_32F,
            )?;
        }
        set(
            desc.raw,
            Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            &ops.weight.1,
        )?;
        set(
            desc.raw,
            Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            &ops.input.1,
        )?;
        set(desc.raw, Attr::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
    }
    let a_layout = layout(Ty::CUDA_R_8F_E4M3, k, n, k)?;
    let b_layout = layout(Ty::CUDA_R_8F_E4M3, k, m, k)?;
    let d_layout = layout(Ty::CUDA_R_16BF, n, m, n)?;
    // SAFETY: the layouts describe the caller's buffers (weight n×k, input m×k, out m×n,
    // written with beta 0); the pointers set on `desc` are the caller's, live for the call.
    unsafe {
        run_matmul(
            &ctx,
            &stream,
            &desc,
            (ops.weight.0, &a_layout),
            (ops.input.0, &b_layout),
            (ops.out, &d_layout),
            0.0,
            None,
            match scales {
                Fp8Scales::PerTensor => "cuBLASLt FP8 GEMM",
                Fp8Scales::PerRow => "cuBLASLt FP8 GEMM with per-row scales",
            },
            Some(TuneKey {
                ordinal: stream.context().ordinal(),
                what: match scales {
                    Fp8Scales::PerTensor => "fp8-tensor",
                    Fp8Scales::PerRow => "fp8-rows",
                },
                variant: act as u32,
                dims: [n, m, k, k, k, n],
            }),
        )
    }
}

/// Column-major `D (m×n, f32, leading dimension ldd) = A (m×k, bf16, lda) · B (k×n, bf16,
/// ldb) + beta · D` through cuBLASLt on `dev`'s stream, with every pointer assumed only
/// 16-byte aligned (the convolution GEMMs start their operands at row offsets).
///
/// # Safety
/// The pointers are device addresses on `dev` of buffers at least as large as the layouts
/// describe, alive until the GEMM has run on the stream (the caller holds their guards), and
/// 16-byte aligned, as are `lda`, `ldb` (in bf16) and `ldd` (in f32) in bytes.
pub(super) unsafe fn gemm_bf16_f32(
    dev: &CudaDevice,
    (a, lda): (u64, usize),
    (b, ldb): (u64, usize),
    (d, ldd): (u64, usize),
    (m, n, k): (usize, usize, usize),
    beta: f32,
) -> Result<()> {
    use lt_sys::cudaDataType_t as Ty;
    let stream = dev.cuda_stream();
    let (_, ctx) = cublaslt(dev)?;
    let desc = matmul_desc()?;
    let a_layout = layout(Ty::CUDA_R_16BF, m, k, lda)?;
    let b_layout = layout(Ty::CUDA_R_16BF, k, n, ldb)?;
    let d_layout = layout(Ty::CUDA_R_32F, m, n, ldd)?;
    // SAFETY: the layouts and pointers are the caller's contract, 16-byte alignment included.
    unsafe {
        run_matmul(
            &ctx,
            &stream,
            &desc,
            (a, &a_layout),
            (b, &b_layout),
            (d, &d_layout),
            beta,
            Some(16),
            "cuBLASLt convolution GEMM",
            Some(TuneKey {
                ordinal: stream.context().ordinal(),
                what: "conv-bf16-f32",
                variant: 0,
                dims: [m, n, k, lda, ldb, ldd],
            }),
        )
    }
}

/// A matmul descriptor with f32 compute and f32 scale type, the raw GEMMs' common setting.
fn matmul_desc() -> Result<Owned<lt_sys::cublasLtMatmulDesc_t>> {
    let raw = lt::create_matmul_desc(
        lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        lt_sys::cudaDataType_t::CUDA_R_32F,
    )
    .map_err(lt_error("cuBLASLt matmul descriptor"))?;
    Ok(Owned {
        raw,
        destroy: lt::destroy_matmul_desc,
    })
}

/// Runs `D = A · B + beta · D` (alpha 1, D also as C) with the algorithm
/// [`gemm_algo_cuda::choose`] picks for `desc` and the layouts (cuBLASLt's heuristic, or
/// with tuning on the fastest of its picks for `tune`; never tuned when beta is not 0, as the
/// timing runs would accumulate), using `ctx`'s workspace, on `stream`. `min_alignment`
/// (bytes) tells cuBLASLt how aligned every pointer is when it is less than the 256 bytes it
/// assumes otherwise. `what` names the GEMM in errors.
///
/// # Safety
/// Each pointer is a device address on `stream`'s device of a buffer at least as large as
/// its layout describes, alive until the GEMM has run (the caller holds the guards), and
/// aligned to `min_alignment` (or 256) bytes; every pointer set on `desc` is live likewise.
#[allow(clippy::too_many_arguments)]
unsafe fn run_matmul(
    ctx: &LtRaw,
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    desc: &Owned<lt_sys::cublasLtMatmulDesc_t>,
    (a, a_layout): (u64, &Owned<lt_sys::cublasLtMatrixLayout_t>),
    (b, b_layout): (u64, &Owned<lt_sys::cublasLtMatrixLayout_t>),
    (d, d_layout): (u64, &Owned<lt_sys::cublasLtMatrixLayout_t>),
    beta: f32,
    min_alignment: Option<u32>,
    what: &'static str,
    tune: Option<TuneKey>,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use lt_sys::cublasLtMatmulPreferenceAttributes_t as Pref;
    let pref = Owned {
        raw: lt::create_matmul_pref().map_err(lt_error("cuBLASLt preference"))?,
        destroy: lt::destroy_matmul_pref,
    };
    let (work_ptr, _work_guard) = ctx.workspace.device_ptr(stream);
    let alpha = 1f32;
    // SAFETY: each preference value has the type cuBLASLt documents (workspace: size_t,
    // alignments: uint32); the layouts and pointers are the caller's contract; the workspace
    // is as large as declared and lives in `ctx`, held until the call is enqueued.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.raw,
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&WORKSPACE_BYTES as *const usize).cast(),
            std::mem::size_of::<usize>(),
        )
        .map_err(lt_error("cuBLASLt workspace preference"))?;
        if tune.is_some() && gemm_algo_cuda::tuning() {
            // Tuning may pick a split-K candidate the heuristic ranked lower: only those that
            // add their partial sums in f32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE, a uint32
            // mask), not in the bf16 output.
            let mask: u32 = 2;
            lt::set_matmul_pref_attribute(
                pref.raw,
                Pref::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                (&mask as *const u32).cast(),
                std::mem::size_of::<u32>(),
            )
            .map_err(lt_error("cuBLASLt reduction preference"))?;
        }
        if let Some(bytes) = min_alignment {
            for attr in [
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                lt::set_matmul_pref_attribute(
                    pref.raw,
                    attr,
                    (&bytes as *const u32).cast(),
                    std::mem::size_of::<u32>(),
                )
                .map_err(lt_error("cuBLASLt alignment preference"))?;
            }
        }
    }
    let matmul = |algo: &lt_sys::cublasLtMatmulAlgo_t| -> Result<()> {
        // SAFETY: the layouts and pointers are the caller's contract; the workspace is as
        // large as declared and lives in `ctx`; `algo` comes from cuBLASLt for this GEMM.
        unsafe {
            lt::matmul(
                ctx.handle,
                desc.raw,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a as *const _,
                a_layout.raw,
                b as *const _,
                b_layout.raw,
                d as *const _,
                d_layout.raw,
                d as *mut _,
                d_layout.raw,
                algo,
                work_ptr as *mut _,
                WORKSPACE_BYTES,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(lt_error(what))
    };
    // SAFETY: the handle, descriptor, layouts and preference are live; `matmul` runs exactly
    // this GEMM.
    let algo = unsafe {
        gemm_algo_cuda::choose(
            ctx.handle,
            desc.raw,
            (a_layout.raw, b_layout.raw, d_layout.raw),
            pref.raw,
            tune.filter(|_| beta == 0.0),
            stream,
            &matmul,
        )
    }?;
    matmul(&algo)
}

/// `act(x·(values·scale)ᵀ + b)` with e4m3 `values` `(n, k)`, `scale` one f32 on the device,
/// bf16 x `(…, k)` and b `(n)`; the activations are quantized per call.
pub fn fp8_linear(
    x: &Tensor,
    values: &Tensor,
    scale: &Tensor,
    b: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let op = LtFp8Linear {
        act,
        weight_scale: scale.clone(),
    };
    let (values, b) = (values.contiguous()?, b.contiguous()?);
    // One activation scale per image: quantized together, each image's result would depend on
    // the others in its batch (the largest value sets everyone's resolution).
    let images = if x.rank() >= 3 { x.dim(0)? } else { 1 };
    if images > 1 {
        let parts = (0..images)
            .map(|i| {
                x.narrow(0, i, 1)?
                    .contiguous()?
                    .apply_op3_no_bwd(&values, &b, &op)
            })
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 0);
    }
    x.contiguous()?.apply_op3_no_bwd(&values, &b, &op)
}

/// Launch shape of the FP8 helper kernels over `n` values (8 per thread per step).
fn elementwise(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: ((n / 8).div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// e4m3 bits of `x` (bf16 values: callers pass the views of `CudaStorageSlice::BF16`) scaled
/// by 448 / `amax`, and the scale `amax / 448` (one f32), both on the device. `x` must start
/// 16-byte aligned.
fn quantize<T: DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    amax: &CudaView<'_, f32>,
) -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    let n = x.len();
    // SAFETY: the kernel writes every one of the n bytes and the scale.
    let mut bits = unsafe { dev.alloc::<u8>(n) }?;
    let mut scale = unsafe { dev.alloc::<f32>(1) }?;
    let f = dev.get_or_load_custom_func("headshot_quantize_e4m3", "headshot_fp8", FP8_PTX)?;
    let elems = n as u64;
    let mut builder = f.builder();
    builder.arg(x);
    builder.arg(&elems);
    builder.arg(amax);
    builder.arg(&mut bits);
    builder.arg(&mut scale);
    // SAFETY: reads n bf16 and one f32, writes n bytes and one f32, all sized so above.
    unsafe { builder.launch(elementwise(n)) }.w()?;
    Ok((bits, scale))
}

struct QuantizeWeight {
    amax: f32,
}

impl CustomOp1 for QuantizeWeight {
    fn name(&self) -> &'static str {
        "headshot-quantize-e4m3"
    }

    cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let CudaStorageSlice::BF16(w) = &s.slice else {
            candle_core::bail!("FP8 weights on CUDA are quantized from bf16");
        };
        let w = contiguous_view(w, l, 8, "weight to quantize")?;
        let dev = s.device();
        let amax = dev.clone_htod(std::slice::from_ref(&self.amax))?;
        let (bits, _) = quantize(dev, &w, &amax.slice(0..1))?;
        Ok(output(dev, CudaStorageSlice::U8, bits, l.shape().clone()))
    }
}

/// Per-tensor e4m3 quantization of a bf16 CUDA weight on the GPU: the bits as a u8 tensor
/// and the scale (`bits · scale ≈ w`) as one f32 on the device, where the GEMM reads it.
/// candle 0.11.1 cannot cast to F8E4M3 on CUDA (its cast kernels are looked up as
/// `cast_*_f8e4m3` but built as `cast_*_f8_e4m3`), so the weight never becomes that dtype here.
/// `w` must be finite (the caller checks: the max on CUDA skips NaN).
pub fn quantize_weight(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let amax = w
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let bits = w.contiguous()?.apply_op1_no_bwd(&QuantizeWeight { amax })?;
    let scale = f64::from(amax.max(1e-12)) / E4M3_MAX;
    Ok((bits, Tensor::new(&[scale as f32], w.device())?))
}

/// Whether the FP8 GEMM takes this weight: cuBLASLt wants FP8 dimensions in multiples of 16.
pub fn fp8_fits(values: &Tensor) -> bool {
    values.device().is_cuda()
        && values
            .dims2()
            .is_ok_and(|(n, k)| n.is_multiple_of(16) && k.is_multiple_of(16))
}
