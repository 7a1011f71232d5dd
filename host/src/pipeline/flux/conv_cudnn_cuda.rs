//! The decoder's convolutions through cuDNN with tensor-core math (`HEADSHOT_CONV=cudnn`).
//!
//! candle hands bf16 convolutions to cuDNN without setting the convolution's math type, so
//! cuDNN runs them under `CUDNN_DEFAULT_MATH`; on an H100 they ran at 11–19 TFLOP/s
//! (`headshot bench gpu --ops`, `vae_conv_*`), CUDA-core speed, and a 1024×1024 decode took
//! 634 ms against diffusers' 91 ms. PyTorch (like Paddle and OneFlow) sets
//! `CUDNN_TENSOR_OP_MATH` on every fp16 and bf16 convolution descriptor. This is the same
//! cuDNN call with that math type: bf16 NCHW in and out, f32 compute (cuDNN's only bf16
//! configuration), stride 1, "same" padding, the algorithm from cuDNN's heuristic (asked once
//! per shape) unless the caller names one. The bias is the caller's (one broadcast add, as
//! candle's `Conv2d` does it).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys::{
    cudnnConvolutionFwdAlgo_t, cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use candle_core::cuda_backend::cudarc::cudnn::{ConvForward, Cudnn, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::cuda_util::{alloc_like, contiguous_view, cuda_only_cpu_fwd, output};

/// Elements per 16 bytes of bf16: where the input and weights must start (tensor-core
/// kernels load 16-byte vectors; every tensor the decoder makes starts there).
const ALIGN: usize = 8;

/// A cuDNN forward algorithm, for `bench gpu --ops` to time each where the heuristic's pick
/// is not the fastest.
pub type Algorithm = cudnnConvolutionFwdAlgo_t;

/// The algorithms `--ops` times one by one.
pub const ALGORITHMS: [Algorithm; 3] = [
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
];

/// Whether [`conv2d`] takes `x` `(batch, C_in, h, w)` with `weight` `(C_out, C_in, k, k)`:
/// both bf16 on the same CUDA device, contiguous from a 16-byte boundary, an odd square
/// kernel, and sizes within cuDNN's 32-bit dimensions.
pub fn supports(x: &Tensor, weight: &Tensor) -> bool {
    let (Ok((batch, cin, h, w)), Ok((cout, wcin, kh, kw))) = (x.dims4(), weight.dims4()) else {
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
        && kh == kw
        && kh % 2 == 1
        && [batch, cin, cout, h, w].iter().all(|&n| n > 0 && fits(n))
        && fits(batch * cin.max(cout) * h * w)
}

/// `x` convolved with `weight` (stride 1, padding `k / 2`), no bias, by cuDNN with
/// tensor-core math; `algorithm` `None` takes cuDNN's heuristic pick.
pub fn conv2d(x: &Tensor, weight: &Tensor, algorithm: Option<Algorithm>) -> Result<Tensor> {
    x.apply_op2_no_bwd(weight, &CudnnConv { algorithm })
}

struct CudnnConv {
    algorithm: Option<Algorithm>,
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "headshot-conv-cudnn"
    }

    cuda_only_cpu_fwd!(2);

    /// (x `(batch, C_in, h, w)`, weight `(C_out, C_in, k, k)`).
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, cin, h, w) = l1.shape().dims4()?;
        let (cout, wcin, kh, kw) = l2.shape().dims4()?;
        if wcin != cin || kh != kw || kh % 2 == 0 {
            candle_core::bail!(
                "cuDNN convolution: weight {:?} for {cin} input channels (want (C_out, {cin}, k, k), k odd)",
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
        let shape = Shape4 {
            batch,
            cin,
            cout,
            h,
            w,
            k: kh,
        };
        let y = run(dev, xs, &x, &weight, shape, self.algorithm)?;
        Ok(output(dev, CudaStorageSlice::BF16, y, (batch, cout, h, w)))
    }
}

/// A convolution's sizes: the key of the heuristic's cached pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape4 {
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    k: usize,
}

/// One device's cuDNN handle (bound to candle's stream) and the heuristic's picks so far.
struct Slot {
    device: DeviceId,
    cudnn: Arc<Cudnn>,
    picks: HashMap<Shape4, Algorithm>,
}

// cuDNN handles are neither Send nor Sync (candle keeps its own per thread, too): one per
// thread and GPU ordinal, replaced when the pipeline re-creates its device.
thread_local! {
    static SLOTS: RefCell<HashMap<usize, Slot>> = RefCell::new(HashMap::new());
}

/// Runs the convolution on `dev`'s stream into a fresh buffer (`like` gives its element
/// type).
fn run<T>(
    dev: &CudaDevice,
    like: &CudaSlice<T>,
    x: &CudaView<T>,
    weight: &CudaView<T>,
    s: Shape4,
    algorithm: Option<Algorithm>,
) -> Result<CudaSlice<T>>
where
    T: CudnnDataType + WithDType + DeviceRepr,
{
    let dim = |n: usize| -> Result<i32> {
        i32::try_from(n).map_err(|_| {
            candle_core::Error::Msg(format!("cuDNN convolution: size {n} exceeds 32 bits"))
        })
    };
    let pad = dim(s.k / 2)?;
    let ordinal = dev.cuda_stream().context().ordinal();
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        if slots
            .get(&ordinal)
            .is_none_or(|slot| slot.device != dev.id())
        {
            slots.remove(&ordinal);
            let cudnn = Cudnn::new(dev.cuda_stream())?;
            slots.insert(
                ordinal,
                Slot {
                    device: dev.id(),
                    cudnn,
                    picks: HashMap::new(),
                },
            );
        }
        let Some(slot) = slots.get_mut(&ordinal) else {
            candle_core::bail!("cuDNN convolution: no handle for GPU {ordinal}");
        };
        let cudnn = &slot.cudnn;
        let mut conv = cudnn.create_conv2d::<f32>(
            [pad, pad],
            [1, 1],
            [1, 1],
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        conv.set_math_type(cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let xd = cudnn
            .create_4d_tensor::<T>(nchw, [dim(s.batch)?, dim(s.cin)?, dim(s.h)?, dim(s.w)?])?;
        let wd =
            cudnn.create_4d_filter::<T>(nchw, [dim(s.cout)?, dim(s.cin)?, dim(s.k)?, dim(s.k)?])?;
        let yd = cudnn
            .create_4d_tensor::<T>(nchw, [dim(s.batch)?, dim(s.cout)?, dim(s.h)?, dim(s.w)?])?;
        let forward = ConvForward {
            conv: &conv,
            x: &xd,
            w: &wd,
            y: &yd,
        };
        let algorithm = match algorithm {
            Some(a) => a,
            None => match slot.picks.get(&s) {
                Some(&a) => a,
                None => {
                    // cudarc asserts that the heuristic returned a candidate: not a panic
                    // to let through a request.
                    let pick = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        forward.pick_algorithm()
                    }))
                    .map_err(|_| {
                        candle_core::Error::Msg(
                            "cuDNN's heuristic offered no convolution algorithm".into(),
                        )
                    })?;
                    let a = pick?;
                    slot.picks.insert(s, a);
                    a
                }
            },
        };
        let workspace_bytes = forward.get_workspace_size(algorithm)?;
        // SAFETY: scratch space cuDNN writes before it reads.
        let mut workspace = unsafe { dev.alloc::<u8>(workspace_bytes.max(1)) }?;
        let mut y = alloc_like(dev, like, s.batch * s.cout * s.h * s.w)?;
        // SAFETY: the descriptors describe exactly these buffers: x and weight are contiguous
        // NCHW views of batch·cin·h·w and cout·cin·k·k values (checked by the caller), y was
        // just allocated with batch·cout·h·w, all of element type T; cuDNN writes every value
        // of y (beta 0).
        unsafe {
            forward.launch(
                algorithm,
                Some(&mut workspace),
                (T::from_f64(1.0), T::from_f64(0.0)),
                x,
                weight,
                &mut y,
            )
        }?;
        Ok(y)
    })
}
