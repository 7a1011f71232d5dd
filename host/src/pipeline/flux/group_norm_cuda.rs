//! Group norm with an optional SiLU on CUDA (`host/kernels/group_norm.cu`), for the
//! autoencoder's decoder. candle's group norm runs as a chain of f32 kernels at ~31 GB/s on an
//! H100 (`headshot bench gpu --ops`: `vae_group_norm_*`), and at a 1024² image the decoder
//! norms 128-channel activations of 256 MiB a dozen times per decode; this is two launches
//! over many blocks (partial sums, then normalize) and three passes over memory.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cuda_util::{alloc_like, contiguous_view, cuda_only_cpu_fwd, output};

/// PTX of `group_norm.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
/// Threads per block, as in the kernels.
const THREADS: u32 = 256;
/// Smallest chunk of a group one block takes (values).
const MIN_CHUNK: usize = 8192;
/// Most chunks a group is split into: with 32 groups, up to 1024 blocks per image.
const MAX_CHUNKS: usize = 32;
/// Most values in one group: the apply kernel finds a value's channel in 32-bit arithmetic.
/// (A 4096² image with 128 channels in 32 groups has 2²⁶.)
const MAX_GROUP_LEN: usize = u32::MAX as usize;

/// Whether the decoder runs its group norms through these kernels: on by default since they
/// passed `headshot bench gpu --check` on an H100 (which compares them with candle's group norm
/// whatever this says) and beat candle's norm there; `HEADSHOT_GROUP_NORM=candle` turns them
/// off (`fused` is the default). Read once.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| super::cuda_util::opt_out("HEADSHOT_GROUP_NORM", "fused", "candle"))
}

/// Whether the kernels take `x`: bf16 `(batch, channels, height, width)` on CUDA, channels
/// divisible by `groups`, and an even `height · width` (values go in pairs).
pub fn supports(x: &Tensor, groups: usize) -> bool {
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.layout().start_offset().is_multiple_of(2)
        && x.dims4()
            .is_ok_and(|(_, c, h, w)| check_shape(c, h, w, groups).is_ok())
}

/// The shapes the kernels take: channels divisible into `groups`, an even `height · width`,
/// a group of at most [`MAX_GROUP_LEN`] values.
pub(super) fn check_shape(channels: usize, h: usize, w: usize, groups: usize) -> Result<()> {
    if groups == 0
        || !channels.is_multiple_of(groups)
        || !(h * w).is_multiple_of(2)
        || channels / groups * h * w > MAX_GROUP_LEN
    {
        candle_core::bail!(
            "group norm kernel: {channels} channels in {groups} groups over {h}x{w} \
             (channels must divide into groups, height·width must be even, a group at most \
             {MAX_GROUP_LEN} values)"
        );
    }
    Ok(())
}

/// How a group of `group_len` values is split: `(chunk_len, chunks)`, chunk_len even.
fn chunking(group_len: usize) -> (usize, usize) {
    let chunk = group_len.div_ceil(MAX_CHUNKS).max(MIN_CHUNK);
    let chunk = chunk + chunk % 2;
    (chunk, group_len.div_ceil(chunk).max(1))
}

/// The launch of both chunked kernels: a block per (chunk, group).
fn chunk_grid(chunks: usize, all_groups: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks as u32, all_groups as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The partial sums of every group of bf16 `x` (`batch · channels · h · w` values, NCHW):
/// `(partials, chunks, chunk_len)`, the stats launch's output that the apply and finalize
/// launches read. The shape must have passed [`check_shape`].
fn partial_sums<T: DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    all_groups: usize,
    group_len: usize,
) -> Result<(CudaSlice<f64>, usize, usize)> {
    let (chunk_len, chunks) = chunking(group_len);
    // SAFETY: the stats launch writes every (group, chunk) pair of partials: one block
    // per pair, its thread 0 writes both values.
    let mut partials = unsafe { dev.alloc::<f64>(2 * all_groups * chunks) }?;
    let stats =
        dev.get_or_load_custom_func("headshot_group_stats_bf16", "headshot_group_norm", PTX)?;
    let (group_len_i, chunk_len_i) = (group_len as i64, chunk_len as i64);
    let mut builder = stats.builder();
    builder.arg(x);
    builder.arg(&group_len_i);
    builder.arg(&chunk_len_i);
    builder.arg(&mut partials);
    // SAFETY: block (k, g) reads values [k·chunk_len, (k+1)·chunk_len) ∩ [0, group_len)
    // of group g, inside x's all_groups·group_len values, and writes partials[g][k].
    unsafe { builder.launch(chunk_grid(chunks, all_groups)) }.w()?;
    Ok((partials, chunks, chunk_len))
}

/// Mean and 1/std of each group of bf16 `x` (`batch · channels · h · w` values, NCHW), as
/// `(mean, 1/std)` f32 pairs in group order, batch-major: for kernels that apply the norm as
/// they read their input (`conv_implicit_cuda.rs`). The shape must have passed
/// [`check_shape`].
pub(super) fn group_stats<T: DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    (batch, channels, h, w): (usize, usize, usize, usize),
    groups: usize,
    eps: f32,
) -> Result<CudaSlice<f32>> {
    let all_groups = batch * groups;
    let group_len = channels / groups * h * w;
    let (partials, chunks, _) = partial_sums(dev, x, all_groups, group_len)?;
    // SAFETY: the finalize launch writes both values of every group below all_groups.
    let mut stats = unsafe { dev.alloc::<f32>(2 * all_groups) }?;
    let finalize =
        dev.get_or_load_custom_func("headshot_group_finalize_bf16", "headshot_group_norm", PTX)?;
    let (chunks_i, all_groups_i, group_len_i) =
        (chunks as i32, all_groups as i32, group_len as i64);
    let mut builder = finalize.builder();
    builder.arg(x);
    builder.arg(&partials);
    builder.arg(&chunks_i);
    builder.arg(&all_groups_i);
    builder.arg(&group_len_i);
    builder.arg(&eps);
    builder.arg(&mut stats);
    let cfg = LaunchConfig {
        grid_dim: (all_groups.div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: thread g < all_groups reads group g's first value and `chunks` partials and
    // writes stats[2g], stats[2g + 1].
    unsafe { builder.launch(cfg) }.w()?;
    Ok(stats)
}

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        if self.silu {
            "headshot-group-norm-silu"
        } else {
            "headshot-group-norm"
        }
    }

    cuda_only_cpu_fwd!(3);

    /// (x, weight, bias).
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, channels, h, w) = l1.shape().dims4()?;
        let groups = self.groups;
        check_shape(channels, h, w, groups)?;
        if l2.shape().dims() != [channels] || l3.shape().dims() != [channels] {
            candle_core::bail!(
                "group norm kernel: weight and bias must be ({channels},), got {:?} and {:?}",
                l2.shape(),
                l3.shape()
            );
        }
        let (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(ws), CudaStorageSlice::BF16(bs)) =
            (&s1.slice, &s2.slice, &s3.slice)
        else {
            candle_core::bail!("the group norm kernel wants bf16 input, weight and bias");
        };
        let dev = s1.device();
        let x = contiguous_view(xs, l1, 2, "group norm input")?;
        let weight = contiguous_view(ws, l2, 1, "group norm weight")?;
        let bias = contiguous_view(bs, l3, 1, "group norm bias")?;
        let channel_len = h * w;
        let group_len = channels / groups * channel_len;
        let all_groups = batch * groups;
        let (partials, chunks, chunk_len) = partial_sums(dev, &x, all_groups, group_len)?;
        let mut y = alloc_like(dev, xs, batch * channels * channel_len)?;
        let cfg = chunk_grid(chunks, all_groups);
        let (group_len_i, chunk_len_i, channel_len_i) =
            (group_len as i64, chunk_len as i64, channel_len as i64);

        let apply =
            dev.get_or_load_custom_func("headshot_group_apply_bf16", "headshot_group_norm", PTX)?;
        let (chunks_i, groups_i, silu_i) = (chunks as i32, groups as i32, i32::from(self.silu));
        let mut builder = apply.builder();
        builder.arg(&x);
        builder.arg(&partials);
        builder.arg(&chunks_i);
        builder.arg(&weight);
        builder.arg(&bias);
        builder.arg(&groups_i);
        builder.arg(&group_len_i);
        builder.arg(&chunk_len_i);
        builder.arg(&channel_len_i);
        builder.arg(&self.eps);
        builder.arg(&silu_i);
        builder.arg(&mut y);
        // SAFETY: as the stats launch for x and y (same extents); each block reads its
        // group's `chunks` partials and weight/bias at channels below `channels`.
        unsafe { builder.launch(cfg) }.w()?;

        Ok(output(dev, CudaStorageSlice::BF16, y, l1.shape().clone()))
    }
}

/// Group norm of bf16 `x` `(batch, channels, height, width)` with per-channel `weight` and
/// `bias`, through SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &GroupNorm { groups, eps, silu },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_each_group_with_even_chunks() {
        for group_len in [2, 64, 8192, 8194, 262_144, 4 << 20, 16 * 129 * 130] {
            let (chunk, chunks) = chunking(group_len);
            assert!(chunk.is_multiple_of(2), "{group_len}: odd chunk {chunk}");
            assert!(chunks <= MAX_CHUNKS, "{group_len}: {chunks} chunks");
            assert!(chunk * chunks >= group_len, "{group_len} not covered");
            assert!(
                chunk * (chunks - 1) < group_len,
                "{group_len}: an empty chunk"
            );
        }
    }
}
