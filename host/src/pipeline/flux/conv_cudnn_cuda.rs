//! The decoder's convolutions through cuDNN, asked the way PyTorch asks it
//! (`HEADSHOT_CONV=cudnn` or `cudnn_nhwc`).
//!
//! candle hands bf16 NCHW convolutions to cuDNN with the descriptor's math type left at its
//! default and the first algorithm of cuDNN's heuristic; on an H100 they ran at 11–19
//! TFLOP/s (`headshot bench gpu --ops`, `vae_conv_*`), and a 1024×1024 decode took 634 ms
//! against diffusers' 91 ms. Two ways to ask better, compared on the GPU by `--ops` and
//! whole decodes:
//! - [`CudnnLayout::Nchw`]: the same NCHW call with `CUDNN_TENSOR_OP_MATH`, which PyTorch
//!   (like Paddle and OneFlow) sets on every fp16 and bf16 convolution descriptor. Whether
//!   cuDNN 9's default math already allows tensor cores for bf16 is what the figures say.
//! - [`CudnnLayout::Nhwc`]: cuDNN's tensor-core kernels are NHWC. cuDNN itself transforms the
//!   input to NHWC (`cudnnTransformTensor`), convolves with the weights stored KRSC (once,
//!   at load), and transforms the result back: two more passes over the activations, each
//!   memory-bound, for a convolution in cuDNN's native layout.
//!
//! bf16 in and out, f32 compute (cuDNN's only bf16 configuration), stride 1, "same" padding;
//! the algorithm from cuDNN's heuristic unless the caller names one: asked once per shape and
//! layout with tensor-op math allowed, the first candidate it says runs within 512 MiB of
//! workspace, run under the math type the heuristic rated it with (as PyTorch does). The bias is the caller's (one
//! broadcast add, as candle's `Conv2d` does it). Everything goes through cudarc's raw cuDNN
//! bindings: its safe wrappers keep their descriptors private, and the transforms need them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::result::{self as dnn, CudnnError};
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::cuda_util::{alloc_like, bf16_view, contiguous_view, cuda_only_cpu_fwd, output};

/// Elements per 16 bytes of bf16: where the input and weights must start (tensor-core
/// kernels load 16-byte vectors; every tensor the decoder makes starts there).
const ALIGN: usize = 8;

/// A cuDNN forward algorithm, for `bench gpu --ops` to time each where the heuristic's pick
/// is not the fastest.
pub type Algorithm = sys::cudnnConvolutionFwdAlgo_t;

/// The algorithms `--check` and `--ops` try one by one.
pub const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    Algorithm::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    Algorithm::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
];

/// `algorithm`'s name as check and bench rows carry it (`implicit_precomp_gemm`).
pub fn algorithm_name(algorithm: Algorithm) -> String {
    let name = format!("{algorithm:?}").to_lowercase();
    name.trim_start_matches("cudnn_convolution_fwd_algo_")
        .to_string()
}

/// The layout a convolution is handed to cuDNN in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CudnnLayout {
    /// NCHW, as the decoder holds its activations; weights `(C_out, C_in, k, k)`.
    Nchw,
    /// Transformed to NHWC and back around the convolution; weights `(C_out, k, k, C_in)`
    /// ([`weights_for`]).
    Nhwc,
}

impl CudnnLayout {
    /// `_nhwc` or nothing: how check and bench rows name the layout.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Nchw => "",
            Self::Nhwc => "_nhwc",
        }
    }
}

/// A convolution's weights `(C_out, C_in, k, k)` laid out for `layout` (for NHWC, KRSC:
/// `(C_out, k, k, C_in)`), bf16 and contiguous: made once when the decoder loads.
pub fn weights_for(layout: CudnnLayout, w: &Tensor) -> Result<Tensor> {
    let w = w.to_dtype(DType::BF16)?;
    match layout {
        CudnnLayout::Nchw => w.contiguous(),
        CudnnLayout::Nhwc => w.permute((0, 2, 3, 1))?.contiguous(),
    }
}

/// `(C_out, C_in, k)` of `weight` as [`weights_for`] lays it out for `layout`, if square.
fn weight_dims(layout: CudnnLayout, dims: &[usize]) -> Option<(usize, usize, usize)> {
    match (layout, dims) {
        (CudnnLayout::Nchw, &[cout, cin, kh, kw]) | (CudnnLayout::Nhwc, &[cout, kh, kw, cin])
            if kh == kw =>
        {
            Some((cout, cin, kh))
        }
        _ => None,
    }
}

/// Whether [`conv2d`] takes `x` `(batch, C_in, h, w)` with `weight` from [`weights_for`]:
/// both bf16 on the same CUDA device, contiguous from a 16-byte boundary, an odd square
/// kernel, and sizes within cuDNN's 32-bit dimensions.
pub fn supports(x: &Tensor, weight: &Tensor, layout: CudnnLayout) -> bool {
    let Ok((batch, cin, h, w)) = x.dims4() else {
        return false;
    };
    let Some((cout, wcin, k)) = weight_dims(layout, weight.dims()) else {
        return false;
    };
    let starts_aligned =
        |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(ALIGN);
    let fits = |n: usize| i32::try_from(n).is_ok();
    x.device().is_cuda()
        && x.device().same_device(weight.device())
        && x.dtype() == DType::BF16
        && weight.dtype() == DType::BF16
        && starts_aligned(x)
        && starts_aligned(weight)
        && wcin == cin
        && k % 2 == 1
        && [batch, cin, cout, h, w].iter().all(|&n| n > 0)
        && fits(batch * cin.max(cout) * h * w)
}

/// `x` convolved with `weight` (from [`weights_for`]; stride 1, padding `k / 2`), no bias,
/// by cuDNN with tensor-core math in `layout`; `algorithm` `None` takes cuDNN's heuristic
/// pick.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    layout: CudnnLayout,
    algorithm: Option<Algorithm>,
) -> Result<Tensor> {
    x.apply_op2_no_bwd(
        weight,
        &CudnnConv {
            layout,
            algorithm,
            bias: None,
            residual: None,
        },
    )
}

/// Whether [`conv2d_bias`] takes the output epilogue for input `x` (its output's planes in
/// whole 16-byte vectors) and `residual` (the output's shape, `(batch, C_out, h, w)`, bf16,
/// contiguous from a 16-byte boundary), beside what [`supports`] asks.
pub fn takes_epilogue(x: &Tensor, cout: usize, residual: Option<&Tensor>) -> bool {
    let Ok((batch, _, h, w)) = x.dims4() else {
        return false;
    };
    (h * w).is_multiple_of(ALIGN)
        && residual.is_none_or(|r| {
            r.dims() == [batch, cout, h, w]
                && r.dtype() == DType::BF16
                && r.is_contiguous()
                && r.layout().start_offset().is_multiple_of(ALIGN)
                && r.device().same_device(x.device())
        })
}

/// [`conv2d`] with the heuristic's algorithm, plus `bias` `(C_out)` and, when given,
/// `residual` (the output's shape), added in f32 in one pass after the convolution: in NCHW
/// by `headshot_bias_residual_nchw_bf16` over cuDNN's output, in NHWC by
/// `headshot_conv_nhwc_out_bf16` on the way back from NHWC (in place of cuDNN's transform).
/// candle's broadcast add of the bias and its add of the residual would be two more passes,
/// the first on its strided slow path. Shapes as [`takes_epilogue`] says.
pub fn conv2d_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    layout: CudnnLayout,
) -> Result<Tensor> {
    x.apply_op2_no_bwd(
        weight,
        &CudnnConv {
            layout,
            algorithm: None,
            bias: Some(bias.contiguous()?),
            residual: residual.map(Tensor::contiguous).transpose()?,
        },
    )
}

struct CudnnConv {
    layout: CudnnLayout,
    algorithm: Option<Algorithm>,
    /// The epilogue's bias `(C_out)`: with it, the output gets the bias and the residual.
    bias: Option<Tensor>,
    /// The epilogue's residual, the output's shape.
    residual: Option<Tensor>,
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "headshot-conv-cudnn"
    }

    cuda_only_cpu_fwd!(2);

    /// (x `(batch, C_in, h, w)`, weight as [`weights_for`] lays it out).
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        guarded(|| self.convolve(s1, l1, s2, l2))
    }
}

impl CudnnConv {
    /// [`CustomOp2::cuda_fwd`], unguarded.
    fn convolve(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, cin, h, w) = l1.shape().dims4()?;
        let Some((cout, wcin, k)) = weight_dims(self.layout, l2.shape().dims()) else {
            candle_core::bail!(
                "cuDNN convolution ({:?}): weight {:?} is not a square kernel",
                self.layout,
                l2.shape()
            );
        };
        if wcin != cin || k % 2 == 0 {
            candle_core::bail!(
                "cuDNN convolution: weight {:?} for {cin} input channels (odd kernels only)",
                l2.shape()
            );
        }
        let (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(ws)) = (&s1.slice, &s2.slice)
        else {
            candle_core::bail!("the cuDNN convolution path takes bf16 input and weights");
        };
        let dev = s1.device();
        let x = contiguous_view(xs, l1, ALIGN, "convolution input")?;
        let weight = contiguous_view(ws, l2, ALIGN, "convolution weights")?;
        let dims = ConvDims {
            batch,
            cin,
            cout,
            h,
            w,
            k,
            pre_padded: false,
        };
        let stream = dev.cuda_stream();
        let handle = handle(dev)?;
        let plan = Plan::new(handle, dims, self.layout)?;
        // A named algorithm runs with tensor-op math; the heuristic's with the math type it
        // rated the algorithm under.
        let algorithm = match self.algorithm {
            Some(a) => a,
            None => {
                let choice = pick(dev, &plan, dims, self.layout)?;
                plan.set_math(choice.math)?;
                choice.algorithm
            }
        };
        let workspace_bytes = plan.workspace(algorithm)?;
        // SAFETY (allocations below): scratch and outputs cuDNN writes in full (beta 0)
        // before anything reads them.
        let mut workspace = unsafe { dev.alloc::<u8>(workspace_bytes.max(1)) }?;
        let (hw, n_out) = (h * w, batch * cout * h * w);
        let mut y = alloc_like(dev, xs, n_out)?;
        // The epilogue's inputs, checked before anything runs.
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let residual_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        if let Some(b) = &self.bias
            && b.dims() != [cout]
        {
            candle_core::bail!("cuDNN convolution bias {:?} for {cout} channels", b.dims());
        }
        if let Some(r) = &self.residual
            && (r.dims() != [batch, cout, h, w] || self.bias.is_none())
        {
            candle_core::bail!(
                "cuDNN convolution residual {:?} for output {:?} (and only with a bias)",
                r.dims(),
                [batch, cout, h, w]
            );
        }
        if self.bias.is_some() && !hw.is_multiple_of(ALIGN) {
            candle_core::bail!(
                "cuDNN convolution epilogue: {h}x{w} planes are not whole 16-byte vectors"
            );
        }
        // cuDNN's own output: y itself unless an epilogue reads it (NCHW) or the way back
        // reads it (NHWC).
        let mut staged = if self.bias.is_some() || self.layout == CudnnLayout::Nhwc {
            Some(alloc_like(dev, xs, n_out)?)
        } else {
            None
        };
        {
            let (x_ptr, _x_guard) = x.device_ptr(&stream);
            let (w_ptr, _w_guard) = weight.device_ptr(&stream);
            let (ws_ptr, _ws_guard) = workspace.device_ptr_mut(&stream);
            let workspace = (ws_ptr, workspace_bytes);
            let target = staged.as_mut().unwrap_or(&mut y);
            let (t_ptr, _t_guard) = target.device_ptr_mut(&stream);
            match self.layout {
                CudnnLayout::Nchw => plan.convolve(algorithm, x_ptr, w_ptr, workspace, t_ptr)?,
                CudnnLayout::Nhwc => {
                    let mut x_nhwc = alloc_like(dev, xs, batch * cin * h * w)?;
                    let (xn_ptr, _xn_guard) = x_nhwc.device_ptr_mut(&stream);
                    plan.transform(&plan.nchw()?.0, x_ptr, &plan.x, xn_ptr)?;
                    plan.convolve(algorithm, xn_ptr, w_ptr, workspace, t_ptr)?;
                }
            }
        }
        let Some(staged) = staged else {
            return Ok(output(dev, CudaStorageSlice::BF16, y, (batch, cout, h, w)));
        };
        let Some(bias_guard) = &bias_guard else {
            // NHWC without an epilogue: cuDNN's transform back.
            let (s_ptr, _s_guard) = staged.device_ptr(&stream);
            let (y_ptr, _y_guard) = y.device_ptr_mut(&stream);
            plan.transform(&plan.y, s_ptr, &plan.nchw()?.1, y_ptr)?;
            drop((_s_guard, _y_guard));
            return Ok(output(dev, CudaStorageSlice::BF16, y, (batch, cout, h, w)));
        };
        let bias = bf16_view!(bias_guard, 1, "convolution bias");
        let residual = match &residual_guard {
            Some(g) => bf16_view!(g, ALIGN, "convolution residual"),
            None => bias.slice(0..cout),
        };
        let has_residual = i32::from(self.residual.is_some());
        let cout_i = i32::try_from(cout)
            .map_err(|_| candle_core::Error::Msg(format!("cuDNN convolution: {cout} channels")))?;
        let ptx = super::conv_implicit_cuda::PTX;
        match self.layout {
            CudnnLayout::Nchw => {
                let launch = super::conv_launch::bias_residual_launch(n_out);
                let f = dev.get_or_load_custom_func(launch.entry, "headshot_conv_implicit", ptx)?;
                let (hw_l, n_l) = (hw as i64, n_out as i64);
                let mut builder = f.builder();
                builder.arg(&staged);
                builder.arg(&bias);
                builder.arg(&residual);
                builder.arg(&has_residual);
                builder.arg(&cout_i);
                builder.arg(&hw_l);
                builder.arg(&n_l);
                builder.arg(&mut y);
                // SAFETY: reads n_out values of cuDNN's output (and of the residual), cout
                // biases; writes n_out; every buffer starts 16-byte aligned and hw is a
                // multiple of 8 (checked above).
                unsafe { builder.launch(super::conv_implicit_cuda::config(&launch)) }.w()?;
            }
            CudnnLayout::Nhwc => {
                let image = cout * hw;
                for img in 0..batch {
                    let part = img * image..(img + 1) * image;
                    let residual_img = if self.residual.is_some() {
                        residual.slice(part.clone())
                    } else {
                        residual.slice(0..cout)
                    };
                    nhwc_out(
                        dev,
                        (&staged.slice(part.clone()), &bias, &residual_img),
                        self.residual.is_some(),
                        (cout, hw),
                        &mut y.slice_mut(part),
                    )?;
                }
            }
        }
        Ok(output(dev, CudaStorageSlice::BF16, y, (batch, cout, h, w)))
    }
}

/// One image's `headshot_conv_nhwc_out_bf16`: cuDNN's NHWC output `y_nhwc` (`hw` pixels ×
/// `cout` channels) into NCHW `y`, with `bias` and, when `has_residual`, `residual` (NCHW)
/// added; the implicit path's cuDNN engine and [`conv2d_bias`] in NHWC end with it.
pub(super) fn nhwc_out<T: DeviceRepr>(
    dev: &CudaDevice,
    (y_nhwc, bias, residual): (&CudaView<T>, &CudaView<T>, &CudaView<T>),
    has_residual: bool,
    (cout, hw): (usize, usize),
    y: &mut CudaViewMut<T>,
) -> Result<()> {
    let launch = super::conv_launch::nhwc_out_launch(cout, hw);
    let ptx = super::conv_implicit_cuda::PTX;
    let f = dev.get_or_load_custom_func(launch.entry, "headshot_conv_implicit", ptx)?;
    let int = |n: usize| {
        i32::try_from(n)
            .map_err(|_| candle_core::Error::Msg(format!("NHWC output pass: {n} exceeds 32 bits")))
    };
    let (has_residual, cout_i, hw_i) = (i32::from(has_residual), int(cout)?, int(hw)?);
    let mut builder = f.builder();
    builder.arg(y_nhwc);
    builder.arg(bias);
    builder.arg(residual);
    builder.arg(&has_residual);
    builder.arg(&cout_i);
    builder.arg(&hw_i);
    builder.arg(y);
    // SAFETY: reads hw·cout NHWC values (and with the residual cout·hw of it), cout biases;
    // writes cout·hw outputs: the caller passes views of those lengths.
    unsafe { builder.launch(super::conv_implicit_cuda::config(&launch)) }.w()?;
    Ok(())
}

/// Most scratch memory a heuristic pick may ask for (FFT algorithms ask for gigabytes at
/// the decoder's top level; PyTorch likewise skips candidates it cannot allocate).
const WORKSPACE_CAP: usize = 512 << 20;

/// An algorithm with the math type cuDNN rated it under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Choice {
    algorithm: Algorithm,
    math: sys::cudnnMathType_t,
}

/// cuDNN's 3×3 convolution of one image zero-padded in NHWC, `(h + 2) × (w + 2) × C_in` at
/// `padded` (the implicit path's prep pass writes it, with the norm and the upsampling
/// applied), with KRSC `weight` (`(C_out, 3, 3, C_in)`, [`weights_for`] NHWC), into NHWC `y`
/// (`h × w × C_out`), on `dev`'s stream. Device pointers: the caller holds the buffers and
/// their stream guards across the call. `HEADSHOT_CONV=implicit_cudnn`.
pub fn conv3x3_prepadded_nhwc(
    dev: &CudaDevice,
    (padded, weight, y): (u64, u64, u64),
    (cin, cout, h, w): (usize, usize, usize, usize),
) -> Result<()> {
    guarded(|| {
        let dims = ConvDims {
            batch: 1,
            cin,
            cout,
            h,
            w,
            k: 3,
            pre_padded: true,
        };
        let layout = CudnnLayout::Nhwc;
        let plan = Plan::new(handle(dev)?, dims, layout)?;
        let choice = pick(dev, &plan, dims, layout)?;
        plan.set_math(choice.math)?;
        let bytes = plan.workspace(choice.algorithm)?;
        // SAFETY: scratch cuDNN writes before it reads.
        let mut workspace = unsafe { dev.alloc::<u8>(bytes.max(1)) }?;
        let stream = dev.cuda_stream();
        let (ws_ptr, _ws_guard) = workspace.device_ptr_mut(&stream);
        plan.convolve(choice.algorithm, padded, weight, (ws_ptr, bytes), y)
    })
}

/// `f`'s result, or an error where it panicked: cudarc loads each cuDNN symbol on first use
/// and panics where the library lacks one, which is an error of this convolution, not a
/// panic in a request.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    crate::panics::catch(f).map_err(|message| {
        candle_core::Error::Msg(format!(
            "cuDNN convolution panicked (a cuDNN library without a function it needs?): \
             {message}"
        ))
    })?
}

/// A convolution's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConvDims {
    batch: usize,
    cin: usize,
    cout: usize,
    /// The output's size (the input's too, unless `pre_padded`).
    h: usize,
    w: usize,
    k: usize,
    /// The input is already zero-padded by `k / 2` on every side (the implicit path's prep
    /// pass): cuDNN pads nothing more.
    pre_padded: bool,
}

/// A cuDNN handle, destroyed with its owner.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed only here.
        let _ = unsafe { dnn::destroy_handle(self.0) };
    }
}

/// A tensor descriptor, destroyed with its owner.
struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    /// bf16 `(n, c, h, w)` stored in `format`.
    fn new(format: sys::cudnnTensorFormat_t, dims: [i32; 4]) -> Result<Self> {
        let desc = Self(dnn::create_tensor_descriptor().map_err(dnn_error)?);
        // SAFETY: a descriptor just created, not yet destroyed.
        unsafe { dnn::set_tensor4d_descriptor(desc.0, format, BF16, dims) }.map_err(dnn_error)?;
        Ok(desc)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created above and destroyed only here.
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}

/// A filter descriptor, destroyed with its owner.
struct FilterDesc(sys::cudnnFilterDescriptor_t);

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created in `Plan::new` and destroyed only here.
        let _ = unsafe { dnn::destroy_filter_descriptor(self.0) };
    }
}

/// A convolution descriptor, destroyed with its owner.
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created in `Plan::new` and destroyed only here.
        let _ = unsafe { dnn::destroy_convolution_descriptor(self.0) };
    }
}

const BF16: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
const NCHW: sys::cudnnTensorFormat_t = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
const NHWC: sys::cudnnTensorFormat_t = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;

fn dnn_error(e: CudnnError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

/// One convolution's descriptors: input and output in the layout cuDNN convolves in (and
/// for NHWC from NCHW, their NCHW twins, the transforms' other ends), the filter and the
/// convolution with tensor-core math.
struct Plan {
    handle: sys::cudnnHandle_t,
    x: TensorDesc,
    y: TensorDesc,
    /// NCHW input and output, where cuDNN transforms to and from NHWC.
    nchw: Option<(TensorDesc, TensorDesc)>,
    filter: FilterDesc,
    conv: ConvDesc,
}

impl Plan {
    fn new(handle: sys::cudnnHandle_t, d: ConvDims, layout: CudnnLayout) -> Result<Self> {
        let int = |n: usize| -> Result<i32> {
            i32::try_from(n).map_err(|_| {
                candle_core::Error::Msg(format!("cuDNN convolution: size {n} exceeds 32 bits"))
            })
        };
        let (batch, cin, cout, h, w, k) = (
            int(d.batch)?,
            int(d.cin)?,
            int(d.cout)?,
            int(d.h)?,
            int(d.w)?,
            int(d.k)?,
        );
        let (pad, border) = if d.pre_padded { (0, k - 1) } else { (k / 2, 0) };
        let format = match layout {
            CudnnLayout::Nchw => NCHW,
            CudnnLayout::Nhwc => NHWC,
        };
        let filter = FilterDesc(dnn::create_filter_descriptor().map_err(dnn_error)?);
        // SAFETY: a descriptor just created. Dimensions are (K, C, R, S) in either format;
        // the format says how the values lie.
        unsafe { dnn::set_filter4d_descriptor(filter.0, BF16, format, [cout, cin, k, k]) }
            .map_err(dnn_error)?;
        let conv = ConvDesc(dnn::create_convolution_descriptor().map_err(dnn_error)?);
        // SAFETY: a descriptor just created.
        unsafe {
            dnn::set_convolution2d_descriptor(
                conv.0,
                pad,
                pad,
                1,
                1,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
        }
        .map_err(dnn_error)?;
        // SAFETY: the descriptor set above.
        unsafe {
            dnn::set_convolution_math_type(conv.0, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
        }
        .map_err(dnn_error)?;
        let nchw = if layout == CudnnLayout::Nhwc && !d.pre_padded {
            Some((
                TensorDesc::new(NCHW, [batch, cin, h, w])?,
                TensorDesc::new(NCHW, [batch, cout, h, w])?,
            ))
        } else {
            None
        };
        Ok(Self {
            handle,
            x: TensorDesc::new(format, [batch, cin, h + border, w + border])?,
            y: TensorDesc::new(format, [batch, cout, h, w])?,
            nchw,
            filter,
            conv,
        })
    }

    /// The NCHW twins of the input and output, for the transforms.
    fn nchw(&self) -> Result<&(TensorDesc, TensorDesc)> {
        self.nchw.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("cuDNN convolution: this plan has no NCHW side".into())
        })
    }

    /// The heuristic's candidates, best first: the first it says runs within
    /// [`WORKSPACE_CAP`], with the math type it was rated under (which the convolution must
    /// then run with: cuDNN picks its kernels by the pair, so PyTorch sets it back too).
    fn heuristic(&self) -> Result<Choice> {
        const ASKED: usize = 8;
        let mut returned = 0i32;
        // SAFETY: cuDNN writes at most ASKED plain-data records, and the count it wrote.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; ASKED] = unsafe { std::mem::zeroed() };
        // SAFETY: every descriptor and the handle are live; the array holds ASKED records.
        unsafe {
            dnn::get_convolution_forward_algorithm(
                self.handle,
                self.x.0,
                self.filter.0,
                self.conv.0,
                self.y.0,
                ASKED as i32,
                &mut returned,
                perf.as_mut_ptr(),
            )
        }
        .map_err(dnn_error)?;
        let returned = usize::try_from(returned).unwrap_or(0).min(ASKED);
        perf[..returned]
            .iter()
            .find(|p| {
                p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= WORKSPACE_CAP
            })
            .map(|p| Choice {
                algorithm: p.algo,
                math: p.mathType,
            })
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "cuDNN's heuristic offered no convolution algorithm that runs within {} MiB \
                     of workspace",
                    WORKSPACE_CAP >> 20
                ))
            })
    }

    /// Runs the convolution under `math` from here on.
    fn set_math(&self, math: sys::cudnnMathType_t) -> Result<()> {
        // SAFETY: the plan's live convolution descriptor.
        unsafe { dnn::set_convolution_math_type(self.conv.0, math) }.map_err(dnn_error)
    }

    /// Workspace bytes `algorithm` needs.
    fn workspace(&self, algorithm: Algorithm) -> Result<usize> {
        // SAFETY: every descriptor and the handle are live.
        unsafe {
            dnn::get_convolution_forward_workspace_size(
                self.handle,
                self.x.0,
                self.filter.0,
                self.conv.0,
                self.y.0,
                algorithm,
            )
        }
        .map_err(dnn_error)
    }

    /// y = conv(x, w) in the plan's layout, on the handle's stream.
    fn convolve(
        &self,
        algorithm: Algorithm,
        x: u64,
        w: u64,
        (workspace, workspace_bytes): (u64, usize),
        y: u64,
    ) -> Result<()> {
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: x, w and y hold the values the plan's descriptors describe (the caller
        // allocated or checked them), the workspace has the bytes cuDNN asked for, all on
        // the handle's stream; the scaling factors are f32, as for every bf16 configuration.
        unsafe {
            dnn::convolution_forward(
                self.handle,
                (&alpha as *const f32).cast(),
                self.x.0,
                x as *const c_void,
                self.filter.0,
                w as *const c_void,
                self.conv.0,
                algorithm,
                workspace as *mut c_void,
                workspace_bytes,
                (&beta as *const f32).cast(),
                self.y.0,
                y as *mut c_void,
            )
        }
        .map_err(dnn_error)
    }

    /// `to` = `from` in the other layout (same sizes), by cuDNN.
    fn transform(
        &self,
        from_desc: &TensorDesc,
        from: u64,
        to_desc: &TensorDesc,
        to: u64,
    ) -> Result<()> {
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: both buffers hold the values their descriptors describe, on the handle's
        // stream; f32 scaling factors.
        unsafe {
            sys::cudnnTransformTensor(
                self.handle,
                (&alpha as *const f32).cast(),
                from_desc.0,
                from as *const c_void,
                (&beta as *const f32).cast(),
                to_desc.0,
                to as *mut c_void,
            )
        }
        .result()
        .map_err(dnn_error)
    }
}

/// One device's cuDNN handle (on candle's stream) and the heuristic's picks so far.
struct Slot {
    device: DeviceId,
    handle: Handle,
    picks: HashMap<(ConvDims, CudnnLayout), Choice>,
}

// cuDNN handles are not to be shared between threads (candle keeps its own per thread too):
// one per thread and GPU ordinal, replaced when the pipeline re-creates its device.
thread_local! {
    static SLOTS: RefCell<HashMap<usize, Slot>> = RefCell::new(HashMap::new());
}

/// This thread's cuDNN handle for `dev`, bound to its stream, made on first use.
fn handle(dev: &CudaDevice) -> Result<sys::cudnnHandle_t> {
    let ordinal = dev.cuda_stream().context().ordinal();
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        if let Some(slot) = slots.get(&ordinal)
            && slot.device == dev.id()
        {
            return Ok(slot.handle.0);
        }
        slots.remove(&ordinal);
        dev.cuda_stream().context().bind_to_thread().map_err(|e| {
            candle_core::Error::Msg(format!("binding the CUDA context for cuDNN: {e:?}"))
        })?;
        let handle = Handle(dnn::create_handle().map_err(dnn_error)?);
        // SAFETY: a live handle and candle's live stream (cuDNN's stream type is the driver's).
        unsafe { dnn::set_stream(handle.0, dev.cuda_stream().cu_stream() as sys::cudaStream_t) }
            .map_err(dnn_error)?;
        let raw = handle.0;
        slots.insert(
            ordinal,
            Slot {
                device: dev.id(),
                handle,
                picks: HashMap::new(),
            },
        );
        Ok(raw)
    })
}

/// The heuristic's pick for this shape and layout, asked once per device.
fn pick(dev: &CudaDevice, plan: &Plan, dims: ConvDims, layout: CudnnLayout) -> Result<Choice> {
    let ordinal = dev.cuda_stream().context().ordinal();
    let known = SLOTS.with(|slots| {
        slots
            .borrow()
            .get(&ordinal)
            .and_then(|slot| slot.picks.get(&(dims, layout)).copied())
    });
    if let Some(choice) = known {
        return Ok(choice);
    }
    let choice = plan.heuristic()?;
    SLOTS.with(|slots| {
        if let Some(slot) = slots.borrow_mut().get_mut(&ordinal) {
            slot.picks.insert((dims, layout), choice);
        }
    });
    Ok(choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhwc_weights_are_krsc_and_shapes_are_read_per_layout() {
        let w = Tensor::arange(0f32, 2.0 * 3.0 * 9.0, &candle_core::Device::Cpu)
            .and_then(|t| t.reshape((2, 3, 3, 3)))
            .expect("weights");
        let krsc = weights_for(CudnnLayout::Nhwc, &w).expect("krsc");
        assert_eq!(krsc.dims(), &[2, 3, 3, 3]);
        let values = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("values")
        };
        let (orig, krsc) = (values(&w), values(&krsc));
        // krsc[o][dy][dx][c] == w[o][c][dy][dx]
        for (o, dy, dx, c) in [(0, 0, 0, 1), (1, 2, 1, 0), (1, 1, 2, 2)] {
            assert_eq!(
                krsc[((o * 3 + dy) * 3 + dx) * 3 + c],
                orig[((o * 3 + c) * 3 + dy) * 3 + dx]
            );
        }
        assert_eq!(
            weight_dims(CudnnLayout::Nchw, &[8, 4, 3, 3]),
            Some((8, 4, 3))
        );
        assert_eq!(
            weight_dims(CudnnLayout::Nhwc, &[8, 3, 3, 4]),
            Some((8, 4, 3))
        );
        assert_eq!(weight_dims(CudnnLayout::Nhwc, &[8, 3, 1, 4]), None);
        let names: Vec<String> = ALGORITHMS.into_iter().map(algorithm_name).collect();
        assert_eq!(
            names,
            [
                "implicit_gemm",
                "implicit_precomp_gemm",
                "winograd_nonfused"
            ]
        );
        // CPU tensors are never taken.
        let x = Tensor::zeros((1, 4, 8, 8), DType::BF16, &candle_core::Device::Cpu).expect("x");
        let w = Tensor::zeros((8, 4, 3, 3), DType::BF16, &candle_core::Device::Cpu).expect("w");
        assert!(!supports(&x, &w, CudnnLayout::Nchw));
    }

    #[test]
    fn the_epilogue_takes_whole_vector_planes_and_a_residual_of_the_output_shape() {
        let cpu = candle_core::Device::Cpu;
        let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::BF16, &cpu).expect("zeros");
        let x = zeros(&[2, 4, 4, 6]);
        // 24-value planes are whole 16-byte vectors; 3 output channels.
        assert!(takes_epilogue(&x, 3, None));
        assert!(takes_epilogue(&x, 3, Some(&zeros(&[2, 3, 4, 6]))));
        // A residual of another shape, dtype, or not contiguous, is refused.
        assert!(!takes_epilogue(&x, 3, Some(&zeros(&[2, 4, 4, 6]))));
        let f32_residual = Tensor::zeros((2, 3, 4, 6), DType::F32, &cpu).expect("zeros");
        assert!(!takes_epilogue(&x, 3, Some(&f32_residual)));
        let strided = zeros(&[2, 3, 6, 4]).transpose(2, 3).expect("transpose");
        assert!(!takes_epilogue(&x, 3, Some(&strided)));
        // Planes of 5 × 3 = 15 values are not.
        assert!(!takes_epilogue(&zeros(&[1, 4, 5, 3]), 3, None));
    }
}
