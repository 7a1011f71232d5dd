//! Fused attention on CUDA: the host side of `host/kernels/flash_attn.cu` and, for Hopper,
//! `host/kernels/flash_wgmma.cu` (compiled to PTX by the build script when the `cuda` feature
//! is on, loaded by the driver on first use).
//!
//! Handles bf16 with head dim 128 (every FLUX.1 model); anything else takes the plain path.
//! The kernel writes `(batch, tokens, heads, head_dim)`, so the result reshapes to
//! `(batch, tokens, heads·head_dim)` without a copy.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cuda_util::{
    alloc_like, allow_dynamic_smem, contiguous_view, cuda_only_cpu_fwd, output,
};

/// PTX of `flash_attn.cu` for the compute capability the build targeted.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
/// PTX of `flash_wgmma.cu` for compute_90a; empty when the build targeted another card.
const WGMMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_wgmma.ptx"));
/// One stage of the wgmma kernels: a 64-key K tile and a 64-key Vᵀ tile (16 KiB each).
const WGMMA_STAGE_BYTES: u32 = 64 * 128 * 2 + 128 * 64 * 2;
/// The wgmma kernels' 128-row Q tile (32 KiB).
const WGMMA_Q_BYTES: u32 = 128 * 128 * 2;
/// Keys per tile of the wgmma kernels (Vᵀ is padded to a multiple).
const WGMMA_KEYS: usize = 64;
/// Head dimension the kernels are written for.
pub const HEAD_DIM: usize = 128;
/// Dynamic shared memory of the pipelined kernels: two stages of a K and a V tile, 64 keys ×
/// 136 bf16 (128 plus 8 of padding) each.
const PIPELINE_SMEM_BYTES: u32 = 2 * 2 * 64 * 136 * 2;
/// The wide kernels add the block's 128-row Q tile.
const WIDE_SMEM_BYTES: u32 = PIPELINE_SMEM_BYTES + 128 * 136 * 2;

/// The kernels of `flash_attn.cu` and `flash_wgmma.cu`. All compute the same thing; they
/// differ in how K and V reach the tensor cores, and `headshot bench gpu --ops` times each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKernel {
    /// 4 warps × 16 query rows, Q in registers, cp.async double buffering, ldmatrix
    /// fragments.
    Pipelined4,
    /// 4 warps × 32 query rows (the flash-attention-2 layout): each K/V fragment feeds two
    /// row tiles; Q waits in shared memory.
    Wide,
    /// `Wide`, taking 32 keys of each tile at a time (fewer registers, no spills).
    Wide32,
    /// `Wide32` with the lazy softmax: the accumulator rescaled only when a row's maximum
    /// grows by more than 2⁸, the scale folded into the exponent, masking only on the last
    /// keys, one-instruction exponentials (392 instructions per 32-key step in ptxas' SASS
    /// against 700).
    Wide32Lazy,
    /// `Wide` with the lazy softmax: the default (288 TFLOP/s on an H100).
    WideLazy,
    /// Hopper's warpgroup MMA (`flash_wgmma.cu`): two warpgroups × 64 rows, both products
    /// by wgmma reading K and Vᵀ from shared memory, the lazy softmax; V transposed first.
    /// Only in builds for compute capability 9.0, on a 9.0 card. Right on an H100 (`--check`)
    /// but slower there than `WideLazy` (193 against 288 TFLOP/s).
    Wgmma,
    /// `Wgmma` with three stages, the next tile's Q·Kᵀ on the tensor cores while the softmax
    /// of this one runs.
    WgmmaPipe,
}

impl FlashKernel {
    /// Every kernel, for `--check` and `--ops`.
    pub const ALL: [FlashKernel; 7] = [
        Self::Pipelined4,
        Self::Wide,
        Self::Wide32,
        Self::Wide32Lazy,
        Self::WideLazy,
        Self::Wgmma,
        Self::WgmmaPipe,
    ];
    /// The kernel the model runs unless `HEADSHOT_FLASH_KERNEL` names another: the fastest
    /// that passed `bench gpu --check` on an H100, alone (288 TFLOP/s against `wide32`'s 258)
    /// and in whole steps (156.7 ms against 160.8 in bf16, same call; docs/BENCHMARKS.md).
    pub const DEFAULT: FlashKernel = Self::WideLazy;

    /// The model's kernel: `HEADSHOT_FLASH_KERNEL` (a [`FlashKernel::name`], read once; a
    /// benchmarking knob for comparing whole steps) or [`FlashKernel::DEFAULT`].
    pub fn selected() -> Result<FlashKernel> {
        static SELECTED: std::sync::OnceLock<std::result::Result<FlashKernel, String>> =
            std::sync::OnceLock::new();
        SELECTED
            .get_or_init(|| match std::env::var("HEADSHOT_FLASH_KERNEL") {
                Err(_) => Ok(Self::DEFAULT),
                Ok(name) => Self::from_name(&name).ok_or_else(|| {
                    format!(
                        "HEADSHOT_FLASH_KERNEL={name:?} is none of {:?}",
                        Self::names()
                    )
                }),
            })
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    /// The kernel of this [`FlashKernel::name`].
    pub fn from_name(name: &str) -> Option<FlashKernel> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Every kernel's [`FlashKernel::name`], for errors that list them.
    fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.name()).collect()
    }

    /// Whether this is one of the Hopper warpgroup-MMA kernels (`flash_wgmma.cu`).
    fn is_wgmma(self) -> bool {
        matches!(self, Self::Wgmma | Self::WgmmaPipe)
    }

    /// Short name for check and bench output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pipelined4 => "pipe4",
            Self::Wide => "wide",
            Self::Wide32 => "wide32",
            Self::Wide32Lazy => "wide32_lazy",
            Self::WideLazy => "wide_lazy",
            Self::Wgmma => "wgmma",
            Self::WgmmaPipe => "wgmma_pipe",
        }
    }

    /// Whether this kernel runs on `device`: the wgmma kernels need a build for compute
    /// capability 9.0 and a 9.0 card (their instructions exist on Hopper only); the others
    /// run on every card the build targets.
    pub fn available(self, device: &candle_core::Device) -> bool {
        match device {
            candle_core::Device::Cuda(dev) if self.is_wgmma() => wgmma_runs_on(dev),
            device => device.is_cuda(),
        }
    }

    /// The kernels `--check` and `--ops` run: those [`FlashKernel::available`] on `device`,
    /// or of those only the ones `HEADSHOT_FLASH_KERNELS` names (comma-separated), so a
    /// kernel that has never run can be checked in a process of its own: a kernel that
    /// faults leaves the CUDA context unusable for everything after it.
    pub fn usable(device: &candle_core::Device) -> Result<Vec<FlashKernel>> {
        let available = Self::ALL.into_iter().filter(|k| k.available(device));
        let Ok(names) = std::env::var("HEADSHOT_FLASH_KERNELS") else {
            return Ok(available.collect());
        };
        let wanted: Vec<&str> = names.split(',').map(str::trim).collect();
        if let Some(unknown) = wanted.iter().find(|n| Self::from_name(n).is_none()) {
            candle_core::bail!(
                "HEADSHOT_FLASH_KERNELS names {unknown:?}, none of {:?}",
                Self::names()
            );
        }
        let available: Vec<FlashKernel> = available.collect();
        if let Some(missing) = wanted
            .iter()
            .find(|n| !available.iter().any(|k| k.name() == **n))
        {
            candle_core::bail!(
                "HEADSHOT_FLASH_KERNELS names {missing:?}, which this build or card cannot run \
                 (the wgmma kernels need CUDA_COMPUTE_CAP=90 and a compute capability 9.0 GPU)"
            );
        }
        Ok(available
            .into_iter()
            .filter(|k| wanted.contains(&k.name()))
            .collect())
    }

    fn entry(self) -> &'static str {
        match self {
            Self::Pipelined4 => "headshot_flash_attn_pipe4_bf16_d128",
            Self::Wide => "headshot_flash_attn_wide_bf16_d128",
            Self::Wide32 => "headshot_flash_attn_wide32_bf16_d128",
            Self::Wide32Lazy => "headshot_flash_attn_wide32_lazy_bf16_d128",
            Self::WideLazy => "headshot_flash_attn_wide_lazy_bf16_d128",
            Self::Wgmma => "headshot_flash_attn_wgmma_bf16_d128",
            Self::WgmmaPipe => "headshot_flash_attn_wgmma_pipe_bf16_d128",
        }
    }

    /// Query rows per block (4 warps a block, 8 for the wgmma kernels).
    fn rows(self) -> usize {
        match self {
            Self::Pipelined4 => 64,
            Self::Wide
            | Self::Wide32
            | Self::Wide32Lazy
            | Self::WideLazy
            | Self::Wgmma
            | Self::WgmmaPipe => 128,
        }
    }

    fn dynamic_smem(self) -> u32 {
        match self {
            Self::Pipelined4 => PIPELINE_SMEM_BYTES,
            Self::Wide | Self::Wide32 | Self::Wide32Lazy | Self::WideLazy => WIDE_SMEM_BYTES,
            Self::Wgmma => WGMMA_Q_BYTES + 2 * WGMMA_STAGE_BYTES,
            Self::WgmmaPipe => WGMMA_Q_BYTES + 3 * WGMMA_STAGE_BYTES,
        }
    }
}

/// Whether the wgmma kernels run on `dev`: a build for compute capability 9.0 (else their PTX
/// is empty) and a 9.0 card.
fn wgmma_runs_on(dev: &CudaDevice) -> bool {
    super::cuda_util::runs_sm90a(dev, WGMMA_PTX)
}

/// Whether the kernel handles these inputs.
pub fn supports(q: &Tensor) -> bool {
    q.device().is_cuda() && q.dtype() == DType::BF16 && q.dims().last() == Some(&HEAD_DIM)
}

struct FlashAttentionCuda {
    scale_log2: f32,
    kernel: FlashKernel,
}

impl CustomOp3 for FlashAttentionCuda {
    fn name(&self) -> &'static str {
        "headshot-flash-attention-cuda"
    }

    cuda_only_cpu_fwd!(3);

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
        let view = |x, l| contiguous_view(x, l, 8, "flash attention input");
        let (q, k, v) = (view(qs, l1)?, view(ks, l2)?, view(vs, l3)?);
        let dev = s1.device();
        let out = alloc_like(dev, qs, b * n * h * d)?;
        let kernel = self.kernel;
        if kernel.is_wgmma() {
            let out = self.wgmma(dev, (&q, &k, &v), out, (b, n, h))?;
            return Ok(output(
                dev,
                CudaStorageSlice::BF16,
                out,
                Shape::from((b, n, h, d)),
            ));
        }
        let func = dev.get_or_load_custom_func(kernel.entry(), "headshot_flash_attn", PTX)?;
        let smem = kernel.dynamic_smem();
        // Every kernel uses more than 48 KiB of dynamic shared memory.
        allow_dynamic_smem(&func, smem)?;
        let rows = kernel.rows();
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(rows) as u32, (b * h) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
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
        Ok(output(
            dev,
            CudaStorageSlice::BF16,
            out,
            Shape::from((b, n, h, d)),
        ))
    }
}

impl FlashAttentionCuda {
    /// The wgmma kernels' path: Vᵀ `(batch, heads, 128, keys_pad)` with keys zero-padded to
    /// whole tiles, then the Hopper kernel.
    fn wgmma<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        (q, k, v): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
        mut out: CudaSlice<T>,
        (b, n, h): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        if !wgmma_runs_on(dev) {
            candle_core::bail!(
                "the wgmma attention kernel needs a build for compute capability 9.0 \
                 (CUDA_COMPUTE_CAP=90) and a Hopper GPU"
            );
        }
        let keys_pad = n.div_ceil(WGMMA_KEYS) * WGMMA_KEYS;
        // SAFETY: the transpose writes every value of vt, padding included.
        let mut vt = unsafe { dev.alloc::<T>(b * h * HEAD_DIM * keys_pad) }?;
        let (tokens, heads, keys_pad_i) = (n as i32, h as i32, keys_pad as i32);
        let transpose = dev.get_or_load_custom_func(
            "headshot_transpose_v_bf16",
            "headshot_flash_wgmma",
            WGMMA_PTX,
        )?;
        let mut builder = transpose.builder();
        builder.arg(v);
        builder.arg(&mut vt);
        builder.arg(&tokens);
        builder.arg(&heads);
        builder.arg(&keys_pad_i);
        let cfg = LaunchConfig {
            grid_dim: ((keys_pad / WGMMA_KEYS) as u32, (b * h) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block (t, bh) reads keys [64t, 64t + 64) ∩ [0, n) of head bh of v (b·n·h·128
        // values) and writes 128 rows × 64 keys of vt (b·h·128·keys_pad values).
        unsafe { builder.launch(cfg) }.w()?;

        let func =
            dev.get_or_load_custom_func(self.kernel.entry(), "headshot_flash_wgmma", WGMMA_PTX)?;
        let smem = self.kernel.dynamic_smem();
        allow_dynamic_smem(&func, smem)?;
        let mut builder = func.builder();
        builder.arg(q);
        builder.arg(k);
        builder.arg(&vt);
        builder.arg(&mut out);
        builder.arg(&tokens);
        builder.arg(&heads);
        builder.arg(&keys_pad_i);
        builder.arg(&self.scale_log2);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(128) as u32, (b * h) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: reads b·n·h·128 values of q and k and the vt written above, writes as many
        // to `out`; the parameters match the kernel's declaration.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

/// Attention for bf16 CUDA tensors `(batch, tokens, heads, 128)` → `(batch, tokens,
/// heads·128)`, with the model's kernel.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    attention_with(FlashKernel::selected()?, q, k, v)
}

/// [`attention`] with a chosen kernel (check and bench compare them).
pub fn attention_with(kernel: FlashKernel, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, n, h, d) = q.dims4()?;
    let op = FlashAttentionCuda {
        scale_log2: ((d as f64).sqrt().recip() * std::f64::consts::LOG2_E) as f32,
        kernel,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?
        .reshape((b, n, h * d))
}
