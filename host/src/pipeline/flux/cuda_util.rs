//! What every CUDA custom op of the model needs: fresh output buffers, contiguous aligned
//! views of its inputs, and a clear error when candle offers it CPU tensors.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{Layout, Result, Shape};

/// Lets `func` launch with `smem` bytes of dynamic shared memory: past 48 KiB that needs an
/// opt-in per function (a cheap driver call; made per launch, since a function handle and
/// its attributes go with the context the pipeline may re-create).
pub fn allow_dynamic_smem(func: &CudaFunction, smem: u32) -> Result<()> {
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()
}

/// Whether sm_90a code (wgmma) compiled into `ptx` runs on `dev`: the build compiled it
/// (`ptx` is empty unless `CUDA_COMPUTE_CAP` was 90 or 90a) and the card is compute capability
/// 9.0. The capability is read from the driver once per device ordinal: this is asked on
/// every launch of a wgmma kernel.
pub fn runs_sm90a(dev: &CudaDevice, ptx: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static HOPPER: OnceLock<Mutex<HashMap<usize, bool>>> = OnceLock::new();
    if ptx.is_empty() {
        return false;
    }
    let context = dev.cuda_stream().context().clone();
    let mut known = HOPPER
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *known
        .entry(context.ordinal())
        .or_insert_with(|| context.compute_capability().ok() == Some((9, 0)))
}

/// A fresh device buffer of `len` elements of the same type as `_like` (naming the element
/// type is not possible from outside candle for bf16 and e4m3).
pub fn alloc_like<T: DeviceRepr>(
    dev: &CudaDevice,
    _like: &CudaSlice<T>,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: every caller's kernel writes all `len` elements before the tensor is read.
    unsafe { dev.alloc::<T>(len) }
}

/// A custom op's result: `slice` on `dev`, wrapped as its candle variant (`variant` is e.g.
/// `CudaStorageSlice::BF16`, whose element type cannot be named from outside candle), with
/// `shape`.
pub fn output<T>(
    dev: &CudaDevice,
    variant: fn(CudaSlice<T>) -> CudaStorageSlice,
    slice: CudaSlice<T>,
    shape: impl Into<Shape>,
) -> (CudaStorage, Shape) {
    let storage = CudaStorage {
        slice: variant(slice),
        device: dev.clone(),
    };
    (storage, shape.into())
}

/// The contiguous part of `x` that `l` describes, starting at a multiple of `align`
/// elements (the kernels load 2, 4 or 8 values at a time); `what` names the input in the error.
pub fn contiguous_view<'a, T: DeviceRepr>(
    x: &'a CudaSlice<T>,
    l: &Layout,
    align: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) if start.is_multiple_of(align) => Ok(x.slice(start..end)),
        Some(_) => candle_core::bail!(
            "{what} must start at a multiple of {align} elements for its CUDA kernel"
        ),
        None => candle_core::bail!("{what} must be contiguous for its CUDA kernel"),
    }
}

/// Whether the switch `var` leaves a default-on CUDA path on: `off` (the switch's word for
/// the path before it), or `off`, `0`, `false` (any case) turn it off; `on` (its word for the
/// path), `on`, `1`, `true` or unset keep it. Another value is logged as a warning naming the
/// accepted ones and keeps the default, not silently taken as either. For paths that have
/// passed `--check` on a GPU and beat the path before them there; callers read it once and
/// keep the answer.
pub fn opt_out(var: &str, on: &str, off: &str) -> bool {
    let is = |v: &str, words: [&str; 4]| words.iter().any(|w| v.trim().eq_ignore_ascii_case(w));
    match std::env::var(var) {
        Ok(v) if is(&v, [off, "off", "0", "false"]) => false,
        Ok(v) if is(&v, [on, "on", "1", "true"]) || v.trim().is_empty() => true,
        Ok(v) => {
            tracing::warn!(
                %var,
                value = %v,
                accepted = %format!("{off}, off, 0, false (off); {on}, on, 1, true (on)"),
                "unknown value; the path stays on (the default)"
            );
            true
        }
        Err(_) => true,
    }
}

/// Whether the opt-in switch `var` is set to `on` (any case), for CUDA paths that stay off
/// until verified on a GPU. Another value is not silently taken as "off": it is logged as a
/// warning naming the one accepted. Callers read it once and keep the answer.
pub fn opt_in(var: &str, on: &str) -> bool {
    match std::env::var(var) {
        Ok(v) if v.eq_ignore_ascii_case(on) => true,
        Ok(v) if !v.is_empty() => {
            tracing::warn!(%var, value = %v, accepted = %on, "unknown value; the path stays off");
            false
        }
        _ => false,
    }
}

/// `cpu_fwd` of a CUDA-only custom op with 1, 2 or 3 inputs: an error naming the op.
macro_rules! cuda_only_cpu_fwd {
    (1) => {
        $crate::pipeline::flux::cuda_util::cuda_only_cpu_fwd!(CustomOp1; _s1 _l1);
    };
    (2) => {
        $crate::pipeline::flux::cuda_util::cuda_only_cpu_fwd!(CustomOp2; _s1 _l1, _s2 _l2);
    };
    (3) => {
        $crate::pipeline::flux::cuda_util::cuda_only_cpu_fwd!(CustomOp3; _s1 _l1, _s2 _l2, _s3 _l3);
    };
    ($op:ident; $($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(
                "{} takes CUDA tensors only",
                <Self as candle_core::$op>::name(self)
            )
        }
    };
}
pub(crate) use cuda_only_cpu_fwd;

/// The contiguous bf16 CUDA view of an input candle does not hand a custom op itself (a norm's
/// weight and bias, a residual), from its `storage_and_layout()` guard, starting at a
/// multiple of `$align` elements. A macro: the view's element type (`half::bf16`) cannot be
/// named from this crate.
macro_rules! bf16_view {
    ($guard:expr, $align:expr, $what:expr) => {{
        let (storage, layout) = &$guard;
        let candle_core::Storage::Cuda(cuda) = &**storage else {
            candle_core::bail!("{} is not on the GPU", $what);
        };
        let candle_core::cuda_backend::CudaStorageSlice::BF16(slice) = &cuda.slice else {
            candle_core::bail!("{} is not bf16", $what);
        };
        $crate::pipeline::flux::cuda_util::contiguous_view(slice, layout, $align, $what)?
    }};
}
pub(crate) use bf16_view;
