//! Queries and keys on CUDA in one kernel per source (`host/kernels/norm_rope.cu`): RMSNorm
//! with the learned scale, then the rotary embedding, read straight from the QKV projection and
//! written contiguous, so neither the strided copy, the separate norm, nor the rotation's f32
//! passes run. A double block's text and image projections land in one joined tensor, the
//! concatenation for free.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

use super::cuda_util::{alloc_like, cuda_only_cpu_fwd, output};
use super::embed::RopeTable;

/// PTX of `norm_rope.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm_rope.ptx"));
/// Head dimension the kernel is written for.
const HEAD_DIM: usize = 128;
/// Warps (one per token and head) per block, as in the kernel.
const WARPS: usize = 8;
/// RMSNorm epsilon of FLUX's query and key norms.
const EPS: f32 = 1e-6;

/// Whether the kernel takes a projection `(batch, tokens, width)` with this many heads.
pub fn supports(qkv: &Tensor, heads: usize) -> bool {
    qkv.device().is_cuda()
        && qkv.dtype() == DType::BF16
        && qkv
            .dims3()
            .is_ok_and(|(_, _, width)| width == 3 * heads * HEAD_DIM)
}

/// One source: a `(batch, tokens, 3·heads·128)` QKV projection and the learned RMSNorm scale
/// (128, bf16) of its stream.
struct Source<'a> {
    storage: &'a CudaStorage,
    layout: &'a Layout,
    scale: &'a Tensor,
}

struct NormRope {
    /// 0 for queries, 1 for keys: which third of the projection is read.
    part: usize,
    heads: usize,
    scales: Vec<Tensor>,
    cos: Tensor,
    sin: Tensor,
}

/// The f32 slice of a CUDA tensor and its start offset, for passing to a kernel.
fn f32_storage(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, usize)> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        candle_core::bail!("the rotary table must be contiguous");
    }
    Ok((storage, layout.start_offset()))
}

impl NormRope {
    fn run(&self, sources: &[Source]) -> Result<(CudaStorage, Shape)> {
        let first = sources
            .first()
            .ok_or_else(|| candle_core::Error::Msg("norm_rope needs a source".into()))?;
        let dev = first.storage.device().clone();
        let (batch, _, width) = first.layout.shape().dims3()?;
        let mut total = 0;
        for s in sources {
            let (b, n, w) = s.layout.shape().dims3()?;
            if b != batch || w != width || w != 3 * self.heads * HEAD_DIM {
                candle_core::bail!(
                    "norm_rope sources do not fit: {:?} with {} heads",
                    s.layout.shape(),
                    self.heads
                );
            }
            total += n;
        }
        let (cos_guard, cos_start) = f32_storage(&self.cos)?;
        let (sin_guard, sin_start) = f32_storage(&self.sin)?;
        let (Storage::Cuda(cos), Storage::Cuda(sin)) = (&*cos_guard, &*sin_guard) else {
            candle_core::bail!("the rotary table is not on the GPU");
        };
        let (CudaStorageSlice::F32(cos), CudaStorageSlice::F32(sin)) = (&cos.slice, &sin.slice)
        else {
            candle_core::bail!("the rotary table is not f32");
        };
        let table_len = batch * total * (HEAD_DIM / 2);
        if self.cos.elem_count() != table_len || self.sin.elem_count() != table_len {
            candle_core::bail!(
                "the rotary table holds {} values, {batch}×{total} tokens need {table_len}",
                self.cos.elem_count()
            );
        }
        // The kernel reads cos/sin as float2, the projection and the scale as 4 bf16 at a time.
        if !cos_start.is_multiple_of(2) || !sin_start.is_multiple_of(2) {
            candle_core::bail!("the rotary table must start 8-byte aligned");
        }
        let cos = cos.slice(cos_start..cos_start + table_len);
        let sin = sin.slice(sin_start..sin_start + table_len);

        let CudaStorageSlice::BF16(like) = &first.storage.slice else {
            candle_core::bail!("norm_rope wants a bf16 projection");
        };
        let mut dst = alloc_like(&dev, like, batch * total * self.heads * HEAD_DIM)?;
        let mut offset = 0usize;
        let func =
            dev.get_or_load_custom_func("headshot_rmsnorm_rope_bf16", "headshot_norm_rope", PTX)?;
        for s in sources {
            let CudaStorageSlice::BF16(whole) = &s.storage.slice else {
                candle_core::bail!("norm_rope wants a bf16 projection");
            };
            let (start, end) = s.layout.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("norm_rope wants a contiguous projection".into())
            })?;
            if !start.is_multiple_of(4) {
                candle_core::bail!("norm_rope wants the projection 8-byte aligned");
            }
            let (_, rows, _) = s.layout.shape().dims3()?;
            let part = self.part * self.heads * HEAD_DIM;
            let src = whole.slice(start + part..end);
            let (scale_guard, scale_layout) = s.scale.storage_and_layout();
            let Storage::Cuda(scale) = &*scale_guard else {
                candle_core::bail!("the norm scale is not on the GPU");
            };
            let CudaStorageSlice::BF16(scale) = &scale.slice else {
                candle_core::bail!("the norm scale is not bf16");
            };
            let scale_start = scale_layout.start_offset();
            if !scale_start.is_multiple_of(4) {
                candle_core::bail!("the norm scale must start 8-byte aligned");
            }
            if s.scale.elem_count() != HEAD_DIM || !scale_layout.is_contiguous() {
                candle_core::bail!("the norm scale must hold {HEAD_DIM} contiguous values");
            }
            let scale = scale.slice(scale_start..scale_start + HEAD_DIM);
            let items = rows * self.heads;
            let cfg = LaunchConfig {
                grid_dim: (items.div_ceil(WARPS) as u32, batch as u32, 1),
                block_dim: (32 * WARPS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let src_batch = (rows * width) as i64;
            let src_token = width as i64;
            let (rows_i, heads_i) = (rows as i32, self.heads as i32);
            let (total_i, offset_i) = (total as i32, offset as i32);
            let mut builder = func.builder();
            builder.arg(&src);
            builder.arg(&src_batch);
            builder.arg(&src_token);
            builder.arg(&rows_i);
            builder.arg(&heads_i);
            builder.arg(&scale);
            builder.arg(&cos);
            builder.arg(&sin);
            builder.arg(&mut dst);
            builder.arg(&total_i);
            builder.arg(&offset_i);
            builder.arg(&EPS);
            // SAFETY: the kernel reads rows·heads·128 values of the source at the strides
            // given (inside the contiguous projection), 128 scale values and the table rows of
            // this source; it writes only this source's rows of `dst`, sized batch·total.
            unsafe { builder.launch(cfg) }.w()?;
            offset += rows;
        }
        Ok(output(
            &dev,
            CudaStorageSlice::BF16,
            dst,
            Shape::from((batch, total, self.heads, HEAD_DIM)),
        ))
    }
}

impl CustomOp1 for NormRope {
    fn name(&self) -> &'static str {
        "headshot-norm-rope"
    }

    cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let scale = self.scales.first().ok_or_else(|| {
            candle_core::Error::Msg("norm_rope needs one scale per source".into())
        })?;
        self.run(&[Source {
            storage: s,
            layout: l,
            scale,
        }])
    }
}

impl CustomOp2 for NormRope {
    fn name(&self) -> &'static str {
        "headshot-norm-rope-joined"
    }

    cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let [a, b] = self.scales.as_slice() else {
            candle_core::bail!("norm_rope needs one scale per source");
        };
        self.run(&[
            Source {
                storage: s1,
                layout: l1,
                scale: a,
            },
            Source {
                storage: s2,
                layout: l2,
                scale: b,
            },
        ])
    }
}

/// Which third of the projection [`norm_rope`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Queries.
    Query,
    /// Keys.
    Key,
}

/// RMSNorm (each source with its stream's `scale`) and rotary embedding of the queries or
/// keys of one or two `(batch, tokens, 3·heads·128)` bf16 projections, joined along tokens
/// in the order given: `(batch, Σ tokens, heads, 128)`. The rotary table covers the joined
/// tokens.
pub fn norm_rope(
    sources: &[(&Tensor, &Tensor)],
    part: Part,
    heads: usize,
    rope: &RopeTable,
) -> Result<Tensor> {
    let (cos, sin) = rope.cos_sin();
    let op = NormRope {
        part: match part {
            Part::Query => 0,
            Part::Key => 1,
        },
        heads,
        scales: sources.iter().map(|(_, s)| (*s).clone()).collect(),
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
    };
    match sources {
        [(x, _)] => x.contiguous()?.apply_op1_no_bwd(&op),
        [(a, _), (b, _)] => a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &op),
        _ => candle_core::bail!("norm_rope takes one or two sources"),
    }
}
