//! Fused attention on CUDA: the host side of `host/kernels/flash_attn.cu` (compiled to PTX by
//! the build script when the `cuda` feature is on, loaded by the driver on first use).
//!
//! Handles bf16 with head dim 128 (every FLUX.1 model); anything else takes the plain path.
//! The kernel writes `(batch, tokens, heads, head_dim)`, so the result reshapes to
//! `(batch, tokens, heads·head_dim)` without a copy.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// PTX of `flash_attn.cu` for the compute capability the build targeted.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
/// Query rows per thread block (4 warps × 16), as in the kernel.
const BLOCK_Q: usize = 64;
/// Head dimension the kernel is written for.
pub const HEAD_DIM: usize = 128;

/// Whether the kernel handles these inputs.
pub fn supports(q: &Tensor) -> bool {
    q.device().is_cuda() && q.dtype() == DType::BF16 && q.dims().last() == Some(&HEAD_DIM)
}

struct FlashAttentionCuda {
    scale_log2: f32,
}

/// A fresh device buffer of the same element type as `_like`.
fn alloc_like<T: DeviceRepr>(
    dev: &CudaDevice,
    _like: &CudaSlice<T>,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel before the tensor is read.
    unsafe { dev.alloc::<T>(len) }
}

/// The contiguous part of `x` that `l` describes; its start must be 16-byte aligned (the
/// kernel moves 8 bf16 at a time).
fn view<'a, T: DeviceRepr>(x: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) if start % 8 == 0 => Ok(x.slice(start..end)),
        _ => candle_core::bail!("flash attention wants contiguous, 16-byte aligned inputs"),
    }
}

impl CustomOp3 for FlashAttentionCuda {
    fn name(&self) -> &'static str {
        "headshot-flash-attention-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the CUDA flash attention kernel takes CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, n, h, d) = l1.shape().dims4()?;
        if d != HEAD_DIM || l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "flash attention wants q, k, v of one shape with head dim {HEAD_DIM}, got {:?} {:?} {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (CudaStorageSlice::BF16(qs), CudaStorageSlice::BF16(ks), CudaStorageSlice::BF16(vs)) =
            (&s1.slice, &s2.slice, &s3.slice)
        else {
            candle_core::bail!("flash attention wants bf16 inputs");
        };
        let (q, k, v) = (view(qs, l1)?, view(ks, l2)?, view(vs, l3)?);
        let dev = s1.device();
        let out = alloc_like(dev, qs, b * n * h * d)?;
        let func = dev.get_or_load_custom_func(
            "headshot_flash_attn_bf16_d128",
            "headshot_flash_attn",
            PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(BLOCK_Q) as u32, (b * h) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        let (tokens, heads) = (n as i32, h as i32);
        builder.arg(&tokens);
        builder.arg(&heads);
        builder.arg(&self.scale_log2);
        // SAFETY: the kernel reads b·n·h·d elements of q, k, v and writes as many to `out`,
        // all sized so above; launch parameters match its declaration.
        unsafe { builder.launch(cfg) }.w()?;
        let storage = CudaStorage {
            slice: CudaStorageSlice::BF16(out),
            device: dev.clone(),
        };
        Ok((storage, Shape::from((b, n, h, d))))
    }
}

/// Attention for bf16 CUDA tensors `(batch, tokens, heads, 128)` → `(batch, tokens,
/// heads·128)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, n, h, d) = q.dims4()?;
    let op = FlashAttentionCuda {
        scale_log2: ((d as f64).sqrt().recip() * std::f64::consts::LOG2_E) as f32,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?
        .reshape((b, n, h * d))
}
