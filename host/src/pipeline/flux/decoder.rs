//! The FLUX autoencoder's decoder: latents to pixels, the last stage of every generation.
//!
//! Our own module (BFL's layout and tensor names, as candle's `AutoEncoder` reads them) for
//! two reasons. It loads only the decoder: a worker never encodes images, and candle's
//! `AutoEncoder` also builds the encoder, whose weights then sit in device memory unused.
//! And its steps can take faster paths per device: on an H100 candle's decode of a
//! 1024×1024 image took 634 ms against diffusers' 91 ms (docs/BENCHMARKS.md), with group
//! norms at ~31 GB/s among the costs. On CUDA with bf16 each group norm and the SiLU after it
//! runs as one kernel pair (`group_norm_cuda.rs`) and the convolutions take faster paths
//! ([`DecoderPaths::conv_default`]), both checked on an H100 by `bench gpu --check`; elsewhere
//! the steps are candle ops, the same as candle's decoder (the test below holds the two to each
//! other).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder, conv2d};
use candle_transformers::models::flux::autoencoder::Config;

use super::stage_profile;

/// Groups of every group norm in the autoencoder.
pub const GROUPS: usize = 32;
/// Where the decoder's tensors sit in the autoencoder's checkpoint: all the worker loads.
pub const PREFIX: &str = "decoder.";
/// Epsilon of every group norm in the autoencoder.
pub const EPS: f64 = 1e-6;

/// Which of the decoder's CUDA paths it takes (bf16 on CUDA only; elsewhere candle's ops).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderPaths {
    /// Group norm (+ SiLU) as one kernel pair (`group_norm_cuda.rs`).
    pub fused_norm: bool,
    /// Convolutions as cuBLASLt GEMMs (`conv_gemm_cuda.rs`).
    pub conv_gemm: bool,
    /// Convolutions through cuDNN with tensor-core math (`conv_cudnn_cuda.rs`, builds with
    /// the `cudnn` feature); before the GEMM path where both are on.
    pub conv_cudnn: bool,
    /// With `conv_cudnn`, handed to cuDNN in NHWC (transformed there and back by cuDNN).
    pub conv_cudnn_nhwc: bool,
    /// 3×3 convolutions as one implicit-GEMM kernel with the norm before them, the
    /// upsampling and the residual add folded in (`conv_implicit_cuda.rs`); the convolutions
    /// it does not take (too few channels) fall to the other paths.
    pub conv_implicit: bool,
    /// With `conv_implicit`, the kernel's 256-pixel tile where rows are that wide
    /// (`conv_implicit_cuda::Tile::Wide`).
    pub conv_implicit_wide: bool,
    /// With `conv_implicit`, the Hopper wgmma kernel (`conv_implicit_cuda::Tile::Wgmma`);
    /// where it cannot run (another card or build) the narrow tile, with a warning.
    pub conv_implicit_wgmma: bool,
    /// With `conv_implicit`, cuDNN convolves the prep pass's padded NHWC image in place of
    /// our kernel (`conv_implicit_cuda::Engine::Cudnn`; builds with the `cudnn` feature).
    pub conv_implicit_cudnn: bool,
}

impl DecoderPaths {
    /// The paths the environment asks for: the fused norm unless `HEADSHOT_GROUP_NORM=candle`,
    /// and `HEADSHOT_CONV`'s list ([`DecoderPaths::conv_from`]) or, unset,
    /// [`DecoderPaths::conv_default`]. None without the `cuda` feature.
    pub fn from_env() -> Self {
        #[cfg(feature = "cuda")]
        {
            let conv = conv_paths_from_env();
            Self {
                fused_norm: super::group_norm_cuda::enabled(),
                ..conv
            }
        }
        #[cfg(not(feature = "cuda"))]
        Self::default()
    }

    /// Every path of our own kernels (the implicit convolutions with the narrow tile, the
    /// GEMMs for the rest, the fused norm), for `--check`, which compares the wide tile and
    /// the cuDNN paths on their own.
    pub fn all() -> Self {
        Self {
            fused_norm: true,
            conv_gemm: true,
            conv_cudnn: false,
            conv_cudnn_nhwc: false,
            conv_implicit: true,
            conv_implicit_wide: false,
            conv_implicit_wgmma: false,
            conv_implicit_cudnn: false,
        }
    }

    /// What these paths ask to convolve the implicit path's padded image with on `device`:
    /// cuDNN, or our kernel of a tile.
    #[cfg(feature = "cuda")]
    fn implicit_engine(&self, device: &candle_core::Device) -> super::conv_implicit_cuda::Engine {
        use super::conv_implicit_cuda::{Engine, Tile};
        #[cfg(feature = "cudnn")]
        if self.conv_implicit_cudnn {
            return Engine::Cudnn;
        }
        if self.conv_implicit_wgmma {
            if Tile::Wgmma.runs_on(device) {
                return Engine::Kernel(Tile::Wgmma);
            }
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    var = "HEADSHOT_CONV",
                    "implicit_wgmma needs a compute capability 9.0 card and a build for it \
                     (CUDA_COMPUTE_CAP=90); the implicit convolutions take the mma.sync kernel"
                );
            });
        }
        Engine::Kernel(if self.conv_implicit_wide {
            Tile::Wide
        } else {
            Tile::Narrow
        })
    }

    /// The convolution paths taken when `HEADSHOT_CONV` is unset: the fastest that passed
    /// `bench gpu --check` on an H100 (docs/BENCHMARKS.md). With cuDNN in the build, the
    /// implicit path's prep pass with cuDNN convolving its image, cuDNN for the rest (a
    /// 1024×1024 decode in 39.6 ms against diffusers' 91.2 ms and candle's 596 ms, same call);
    /// without, our implicit kernel with the wide tile and the GEMMs for the rest (44.8 ms).
    pub fn conv_default() -> Self {
        if cfg!(feature = "cudnn") {
            Self::conv_from("implicit_cudnn,cudnn")
        } else {
            Self::conv_from("implicit_wide,gemm")
        }
    }

    /// The convolution paths `HEADSHOT_CONV` names (`candle`: none, candle's convolutions;
    /// `gemm`, `cudnn`, `cudnn_nhwc`: cuDNN in
    /// NHWC, `implicit`, `implicit_wide`: the implicit one with the wide tile,
    /// `implicit_wgmma`: with the Hopper kernel, `implicit_cudnn`: with cuDNN convolving the
    /// prep pass's image; comma-separated, any case). A word it does not know is logged as a warning naming the
    /// accepted ones, not taken silently as "off".
    pub fn conv_from(value: &str) -> Self {
        let mut paths = Self::default();
        for word in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if word.eq_ignore_ascii_case("candle") {
                continue;
            } else if word.eq_ignore_ascii_case("gemm") {
                paths.conv_gemm = true;
            } else if word.eq_ignore_ascii_case("cudnn") || word.eq_ignore_ascii_case("cudnn_nhwc")
            {
                if cfg!(feature = "cudnn") {
                    paths.conv_cudnn = true;
                    paths.conv_cudnn_nhwc |= word.eq_ignore_ascii_case("cudnn_nhwc");
                } else {
                    tracing::warn!(
                        var = "HEADSHOT_CONV",
                        "the cudnn path needs a build with --features cudnn; it stays off"
                    );
                }
            } else if word.eq_ignore_ascii_case("implicit") {
                paths.conv_implicit = true;
            } else if word.eq_ignore_ascii_case("implicit_wide") {
                paths.conv_implicit = true;
                paths.conv_implicit_wide = true;
            } else if word.eq_ignore_ascii_case("implicit_wgmma") {
                paths.conv_implicit = true;
                paths.conv_implicit_wgmma = true;
            } else if word.eq_ignore_ascii_case("implicit_cudnn") {
                if cfg!(feature = "cudnn") {
                    paths.conv_implicit = true;
                    paths.conv_implicit_cudnn = true;
                } else {
                    tracing::warn!(
                        var = "HEADSHOT_CONV",
                        "implicit_cudnn needs a build with --features cudnn; it stays off"
                    );
                }
            } else {
                tracing::warn!(
                    var = "HEADSHOT_CONV",
                    value = %word,
                    accepted = "candle, gemm, cudnn, cudnn_nhwc, implicit, implicit_wide, \
                                implicit_wgmma, implicit_cudnn",
                    "unknown convolution path; it stays off"
                );
            }
        }
        paths
    }
}

/// `HEADSHOT_CONV`'s paths, or the defaults where it is unset or blank; read once.
#[cfg(feature = "cuda")]
fn conv_paths_from_env() -> DecoderPaths {
    static PATHS: std::sync::OnceLock<DecoderPaths> = std::sync::OnceLock::new();
    *PATHS.get_or_init(|| match std::env::var("HEADSHOT_CONV") {
        Ok(v) if !v.trim().is_empty() => DecoderPaths::conv_from(&v),
        _ => DecoderPaths::conv_default(),
    })
}

/// Whether a decoder layer's weight `w` can take a CUDA path.
#[cfg(feature = "cuda")]
fn on_cuda_bf16(w: &Tensor) -> bool {
    w.device().is_cuda() && w.dtype() == candle_core::DType::BF16
}

/// A group norm over `(batch, channels, height, width)`, optionally followed by SiLU (the
/// decoder always applies one after a norm, except in its attention block).
struct GroupNorm {
    /// candle's norm: the path off CUDA, and the reference the fused kernel is checked against.
    inner: candle_nn::GroupNorm,
    /// Weight and bias for the fused kernel, when the decoder takes that path.
    #[cfg(feature = "cuda")]
    fused: Option<(Tensor, Tensor)>,
    /// The norm as the implicit convolution's prep applies it (SiLU on), when the decoder
    /// takes that path.
    #[cfg(feature = "cuda")]
    implicit: Option<super::conv_implicit_cuda::InputNorm>,
}

impl GroupNorm {
    fn new(channels: usize, paths: DecoderPaths, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        #[cfg(feature = "cuda")]
        let fused =
            (paths.fused_norm && on_cuda_bf16(&weight)).then(|| (weight.clone(), bias.clone()));
        #[cfg(feature = "cuda")]
        let implicit = (paths.conv_implicit && on_cuda_bf16(&weight)).then(|| {
            super::conv_implicit_cuda::InputNorm {
                weight: weight.clone(),
                bias: bias.clone(),
                groups: GROUPS,
                eps: EPS as f32,
                silu: true,
            }
        });
        #[cfg(not(feature = "cuda"))]
        let _ = paths;
        Ok(Self {
            inner: candle_nn::GroupNorm::new(weight, bias, channels, GROUPS, EPS)?,
            #[cfg(feature = "cuda")]
            fused,
            #[cfg(feature = "cuda")]
            implicit,
        })
    }

    fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some((weight, bias)) = &self.fused
            && super::group_norm_cuda::supports(x, GROUPS)
        {
            return super::group_norm_cuda::group_norm(x, weight, bias, GROUPS, EPS as f32, silu);
        }
        let y = x.apply(&self.inner)?;
        if silu { y.silu() } else { Ok(y) }
    }
}

/// A convolution of the decoder (3×3 with padding 1, or 1×1), run as cuBLASLt GEMMs on CUDA
/// with [`DecoderPaths::conv_gemm`] (`conv_gemm_cuda.rs`), else by candle.
struct Conv {
    inner: Conv2d,
    /// Weights as [`gemm_taps`] lays them out, and the bias, for the GEMM path.
    #[cfg(feature = "cuda")]
    gemm: Option<(Tensor, Tensor)>,
    /// For the implicit path (3×3): what convolves (a kernel's tile, or cuDNN), its weights as
    /// [`super::conv_implicit_cuda::weights_for`] lays them out for it, and the bias.
    #[cfg(feature = "cuda")]
    implicit: Option<(super::conv_implicit_cuda::Engine, Tensor, Tensor)>,
    /// For the cuDNN path (tensor-core math): the weights as its layout wants them (for NCHW
    /// candle's tensor itself) and the layout.
    #[cfg(feature = "cudnn")]
    cudnn: Option<(Tensor, super::conv_cudnn_cuda::CudnnLayout)>,
}

impl Conv {
    fn new(
        in_c: usize,
        out_c: usize,
        size: usize,
        paths: DecoderPaths,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: size / 2,
            ..Default::default()
        };
        let inner = conv2d(in_c, out_c, size, cfg, vb)?;
        #[cfg(feature = "cuda")]
        let gemm = match inner.bias() {
            Some(bias) if paths.conv_gemm && on_cuda_bf16(inner.weight()) => {
                Some((gemm_taps(inner.weight())?, bias.clone()))
            }
            _ => None,
        };
        // Only for convolutions whose channels the engine takes (not conv_in's 16 in; for our
        // kernels not conv_out's 3 out either): the taps are another copy of the weights.
        // The engine is asked only where the implicit path may be taken (its warning is about
        // that path).
        #[cfg(feature = "cuda")]
        let implicit = match inner.bias() {
            Some(bias) if size == 3 && paths.conv_implicit && on_cuda_bf16(inner.weight()) => {
                let engine = paths.implicit_engine(inner.weight().device());
                if super::conv_implicit_cuda::takes_channels(in_c, out_c, engine) {
                    let taps = super::conv_implicit_cuda::weights_for(engine, inner.weight())?;
                    Some((engine, taps, bias.clone()))
                } else {
                    None
                }
            }
            _ => None,
        };
        #[cfg(feature = "cudnn")]
        let cudnn = if paths.conv_cudnn && on_cuda_bf16(inner.weight()) {
            use super::conv_cudnn_cuda::{CudnnLayout, weights_for};
            let layout = if paths.conv_cudnn_nhwc {
                CudnnLayout::Nhwc
            } else {
                CudnnLayout::Nchw
            };
            Some((weights_for(layout, inner.weight())?, layout))
        } else {
            None
        };
        #[cfg(not(feature = "cuda"))]
        let _ = paths;
        Ok(Self {
            #[cfg(feature = "cudnn")]
            cudnn,
            inner,
            #[cfg(feature = "cuda")]
            gemm,
            #[cfg(feature = "cuda")]
            implicit,
        })
    }

    /// `residual + conv(upsample?(silu(norm(x))))`, each part only when given: as one
    /// implicit-GEMM pass pair where that path takes it, else as the separate steps.
    fn forward_with(
        &self,
        x: &Tensor,
        norm: Option<&GroupNorm>,
        upsample: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some((engine, taps, bias)) = &self.implicit {
            let input_norm = match norm {
                Some(n) => n.implicit.as_ref(),
                None => None,
            };
            // A norm the path cannot apply (not set up for it) sends the whole step the
            // separate way.
            let norm_fits = norm.is_none() || input_norm.is_some();
            if norm_fits
                && super::conv_implicit_cuda::supports(
                    x, taps, bias, upsample, input_norm, residual, *engine,
                )
            {
                return super::conv_implicit_cuda::conv3x3(
                    x, taps, bias, input_norm, upsample, residual, *engine,
                );
            }
        }
        let normed;
        let x = match norm {
            Some(n) => {
                normed = n.forward(x, true)?;
                &normed
            }
            None => x,
        };
        #[cfg(feature = "cudnn")]
        if let Some(y) = self.forward_cudnn(x, upsample, residual)? {
            return Ok(y);
        }
        let y = if upsample {
            self.forward_upsampled(x)?
        } else {
            self.forward_plain(x)?
        };
        match residual {
            Some(r) => r + y,
            None => Ok(y),
        }
    }

    /// The convolution of `x` alone, by whichever path takes it.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, false, None)
    }

    /// The convolution of `x` by the GEMM path where it is on and takes `x`, else candle's.
    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some((taps, bias)) = &self.gemm
            && super::conv_gemm_cuda::supports(x, taps, false)
        {
            return super::conv_gemm_cuda::conv2d(x, taps, bias);
        }
        self.inner.forward(x)
    }

    /// This (3×3) convolution of `x` upsampled 2× by nearest neighbour; the GEMM path reads
    /// through the upsampling instead of writing the 4× larger image first.
    fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some((taps, bias)) = &self.gemm
            && super::conv_gemm_cuda::supports(x, taps, true)
        {
            return super::conv_gemm_cuda::upsample_conv2d(x, taps, bias);
        }
        let (_, _, h, w) = x.dims4()?;
        self.inner.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }

    /// `residual +` the convolution (of `x` upsampled 2× by nearest neighbour when
    /// `upsample`) through cuDNN with tensor-core math, with the bias, where that path is on
    /// for it and takes `x`; `None` sends it another way. The bias and the residual are added
    /// in one pass after cuDNN where the shapes allow (`conv2d_bias`), else by candle's ops.
    #[cfg(feature = "cudnn")]
    fn forward_cudnn(
        &self,
        x: &Tensor,
        upsample: bool,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        use super::conv_cudnn_cuda::{conv2d, conv2d_bias, supports, takes_epilogue};
        let Some((weight, layout)) = &self.cudnn else {
            return Ok(None);
        };
        if !supports(x, weight, *layout) {
            return Ok(None);
        }
        let upsampled;
        let x = if upsample {
            let (_, _, h, w) = x.dims4()?;
            upsampled = x.upsample_nearest2d(2 * h, 2 * w)?;
            if !supports(&upsampled, weight, *layout) {
                return Ok(None);
            }
            &upsampled
        } else {
            x
        };
        let cout = weight.dim(0)?;
        if let Some(bias) = self.inner.bias()
            && takes_epilogue(x, cout, residual)
        {
            return conv2d_bias(x, weight, bias, residual, *layout).map(Some);
        }
        let mut y = conv2d(x, weight, *layout, None)?;
        if let Some(b) = self.inner.bias() {
            y = y.broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
        }
        match residual {
            Some(r) => (r + y).map(Some),
            None => Ok(Some(y)),
        }
    }
}

/// The smallest decoder that has every part of the real one: two levels of different widths
/// (resnet shortcuts, one upsample), the attention block, widths in multiples of the 32
/// groups. Tests and `--check` compare decoders of this shape.
pub fn two_level_config() -> Config {
    Config {
        resolution: 64,
        in_channels: 3,
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        z_channels: 16,
        scale_factor: 0.3611,
        shift_factor: 0.1159,
    }
}

/// A convolution's weights `(C_out, C_in, k, k)` laid out for the GEMM path: `(taps, C_out,
/// taps·C_in)` bf16, row tap `dy` holding `w[o, c, dy, dx]` at `[dy, o, dx·C_in + c]` (one
/// tap for 1×1). Row tap `dy` is then the right operand of its GEMM, column-major
/// `(taps·C_in) × C_out`.
pub fn gemm_taps(w: &Tensor) -> Result<Tensor> {
    let (cout, cin, kh, kw) = w.dims4()?;
    match (kh, kw) {
        (3, 3) => w
            .permute((2, 0, 3, 1))?
            .contiguous()?
            .reshape((3, cout, 3 * cin))?
            .to_dtype(candle_core::DType::BF16),
        (1, 1) => w
            .reshape((1, cout, cin))?
            .to_dtype(candle_core::DType::BF16),
        _ => candle_core::bail!("convolution GEMMs take 3x3 or 1x1 kernels, got {kh}x{kw}"),
    }
}

/// A 3×3 convolution's weights `(C_out, C_in, 3, 3)` laid out for the implicit-GEMM kernel
/// (`conv_implicit_cuda.rs`): `(9, C_out, C_in)` bf16, tap `dy·3 + dx` holding `w[o, c, dy,
/// dx]` at `[dy·3 + dx, o, c]`, so each tap's block of output channels is one run of rows
/// with the input channels contiguous, as the kernel's B operand wants them.
pub fn implicit_taps(w: &Tensor) -> Result<Tensor> {
    let (cout, cin, kh, kw) = w.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("the implicit-GEMM convolution takes 3x3 kernels, got {kh}x{kw}");
    }
    w.permute((2, 3, 0, 1))?
        .contiguous()?
        .reshape((9, cout, cin))?
        .to_dtype(candle_core::DType::BF16)
}

fn conv3x3(in_c: usize, out_c: usize, paths: DecoderPaths, vb: VarBuilder) -> Result<Conv> {
    Conv::new(in_c, out_c, 3, paths, vb)
}

fn conv1x1(in_c: usize, out_c: usize, paths: DecoderPaths, vb: VarBuilder) -> Result<Conv> {
    Conv::new(in_c, out_c, 1, paths, vb)
}

/// Norm, SiLU, 3×3 conv, twice, around a residual (a 1×1 conv on it where widths change).
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(in_c: usize, out_c: usize, paths: DecoderPaths, vb: VarBuilder) -> Result<Self> {
        let shortcut = if in_c == out_c {
            None
        } else {
            Some(conv1x1(in_c, out_c, paths, vb.pp("nin_shortcut"))?)
        };
        Ok(Self {
            norm1: GroupNorm::new(in_c, paths, vb.pp("norm1"))?,
            conv1: conv3x3(in_c, out_c, paths, vb.pp("conv1"))?,
            norm2: GroupNorm::new(out_c, paths, vb.pp("norm2"))?,
            conv2: conv3x3(out_c, out_c, paths, vb.pp("conv2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward_with(x, Some(&self.norm1), false, None)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2
            .forward_with(&h, Some(&self.norm2), false, Some(&skip))
    }
}

/// Single-head self-attention over every latent position, in the decoder's middle.
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn new(c: usize, paths: DecoderPaths, vb: VarBuilder) -> Result<Self> {
        let one = |name: &str| conv1x1(c, c, paths, vb.pp(name));
        Ok(Self {
            norm: GroupNorm::new(c, paths, vb.pp("norm"))?,
            q: one("q")?,
            k: one("k")?,
            v: one("v")?,
            proj_out: one("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(x, false)?;
        let (b, c, hh, ww) = h.dims4()?;
        // (batch, channels, h, w) -> (batch, positions, 1 head, channels).
        let tokens = |t: Tensor| t.flatten_from(2)?.transpose(1, 2)?.unsqueeze(2);
        let att = super::attention::plain(
            &tokens(self.q.forward(&h)?)?,
            &tokens(self.k.forward(&h)?)?,
            &tokens(self.v.forward(&h)?)?,
        )?;
        let att = att.transpose(1, 2)?.reshape((b, c, hh, ww))?;
        self.proj_out.forward_with(&att, None, false, Some(x))
    }
}

/// One resolution level: its resnet blocks, then (except at the top) a 2× upsample and conv.
struct UpLevel {
    /// The level's index in the checkpoint (`up.{index}`): its name in a decode's trace.
    index: usize,
    blocks: Vec<ResnetBlock>,
    upsample: Option<Conv>,
}

/// The decoder, with the latent scale and shift the transformer's latents are in.
pub struct Decoder {
    conv_in: Conv,
    mid_block_1: ResnetBlock,
    mid_attn: AttnBlock,
    mid_block_2: ResnetBlock,
    /// Lowest resolution first, as they run.
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv,
    scale_factor: f64,
    shift_factor: f64,
}

impl Decoder {
    /// Builds the decoder from `vb` at the autoencoder's root (tensors under [`PREFIX`]), with
    /// the CUDA paths the environment turns on ([`DecoderPaths::from_env`]).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_paths(cfg, DecoderPaths::from_env(), vb)
    }

    /// [`Decoder::new`] with the CUDA paths chosen by the caller (`--check` takes both).
    pub fn with_paths(cfg: &Config, paths: DecoderPaths, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp(PREFIX.trim_end_matches('.'));
        let Some(&top_mult) = cfg.ch_mult.last() else {
            candle_core::bail!("the autoencoder config has no resolution levels (ch_mult)");
        };
        let mut width = cfg.ch * top_mult;
        let conv_in = conv3x3(cfg.z_channels, width, paths, vb.pp("conv_in"))?;
        let mid_block_1 = ResnetBlock::new(width, width, paths, vb.pp("mid.block_1"))?;
        let mid_attn = AttnBlock::new(width, paths, vb.pp("mid.attn_1"))?;
        let mid_block_2 = ResnetBlock::new(width, width, paths, vb.pp("mid.block_2"))?;
        let mut up = Vec::with_capacity(cfg.ch_mult.len());
        for (level, mult) in cfg.ch_mult.iter().enumerate().rev() {
            let vb_level = vb.pp("up").pp(level);
            let out = cfg.ch * mult;
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks + 1);
            for i in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    width,
                    out,
                    paths,
                    vb_level.pp("block").pp(i),
                )?);
                width = out;
            }
            let upsample = if level == 0 {
                None
            } else {
                Some(conv3x3(
                    width,
                    width,
                    paths,
                    vb_level.pp("upsample").pp("conv"),
                )?)
            };
            up.push(UpLevel {
                index: level,
                blocks,
                upsample,
            });
        }
        Ok(Self {
            conv_in,
            mid_block_1,
            mid_attn,
            mid_block_2,
            up,
            norm_out: GroupNorm::new(width, paths, vb.pp("norm_out"))?,
            conv_out: conv3x3(width, cfg.out_ch, paths, vb.pp("conv_out"))?,
            scale_factor: cfg.scale_factor,
            shift_factor: cfg.shift_factor,
        })
    }

    /// Latents `(batch, z_channels, h, w)` to images `(batch, out_ch, 8h, 8w)` in about [-1, 1].
    ///
    /// Each stage ends with a [`stage_profile::mark`] named by its checkpoint prefix
    /// (`conv_in`, `mid.block_1`, `mid.attn_1`, `mid.block_2`, `up.{level}.block.{i}`,
    /// `up.{level}.upsample`, `norm_out+conv_out`), so `bench gpu` can split a decode's time
    /// by stage and name the next kernel worth writing.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / self.scale_factor)? + self.shift_factor)?;
        let mut h = self.conv_in.forward(&z)?;
        stage_profile::mark("conv_in", &h)?;
        h = self.mid_block_1.forward(&h)?;
        stage_profile::mark("mid.block_1", &h)?;
        h = self.mid_attn.forward(&h)?;
        stage_profile::mark("mid.attn_1", &h)?;
        h = self.mid_block_2.forward(&h)?;
        stage_profile::mark("mid.block_2", &h)?;
        for level in &self.up {
            for (i, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h)?;
                if stage_profile::active() {
                    stage_profile::mark(&format!("up.{}.block.{i}", level.index), &h)?;
                }
            }
            if let Some(conv) = &level.upsample {
                h = conv.forward_with(&h, None, true, None)?;
                if stage_profile::active() {
                    stage_profile::mark(&format!("up.{}.upsample", level.index), &h)?;
                }
            }
        }
        let image = self
            .conv_out
            .forward_with(&h, Some(&self.norm_out), false, None)?;
        stage_profile::mark("norm_out+conv_out", &image)?;
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::demo::record;
    use crate::pipeline::flux::check::max_rel_error;
    use candle_core::{DType, Device};
    use candle_transformers::models::flux::autoencoder::AutoEncoder;

    #[test]
    fn decodes_as_candles_autoencoder_does() {
        let cfg = two_level_config();
        let tensors = record(7, |vb| AutoEncoder::new(&cfg, vb)).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let reference = AutoEncoder::new(&cfg, vb.clone()).unwrap();
        let ours = Decoder::new(&cfg, vb).unwrap();

        let latents = Tensor::randn(0f32, 1.0, (2, 16, 6, 5), &Device::Cpu).unwrap();
        let want = reference.decode(&latents).unwrap();
        let got = ours.decode(&latents).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_eq!(got.dims(), &[2, 3, 12, 10], "one upsample: 2x");
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            scale > 0.1,
            "the reference decode is degenerate: max {scale}"
        );
        let error = max_rel_error(&got, &want).unwrap();
        assert!(error <= 1e-4, "max relative difference {error}");
    }

    #[test]
    fn a_profiled_decode_names_each_stage_in_order_and_decodes_the_same() {
        let cfg = two_level_config();
        let tensors = record(8, |vb| AutoEncoder::new(&cfg, vb)).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let ours = Decoder::new(&cfg, vb).unwrap();
        let latents = Tensor::randn(0f32, 1.0, (1, 16, 4, 6), &Device::Cpu).unwrap();

        let (profiled, stages) =
            stage_profile::profile(&Device::Cpu, || ours.decode(&latents)).unwrap();
        let stages: Vec<(String, Vec<usize>)> = stages
            .into_iter()
            .inspect(|s| assert_eq!(s.runs, 1, "{s:?}"))
            .map(|s| (s.name, s.dims))
            .collect();
        let want: Vec<(String, Vec<usize>)> = [
            ("conv_in", [1, 64, 4, 6]),
            ("mid.block_1", [1, 64, 4, 6]),
            ("mid.attn_1", [1, 64, 4, 6]),
            ("mid.block_2", [1, 64, 4, 6]),
            ("up.1.block.0", [1, 64, 4, 6]),
            ("up.1.block.1", [1, 64, 4, 6]),
            ("up.1.upsample", [1, 64, 8, 12]),
            ("up.0.block.0", [1, 32, 8, 12]),
            ("up.0.block.1", [1, 32, 8, 12]),
            ("norm_out+conv_out", [1, 3, 8, 12]),
        ]
        .into_iter()
        .map(|(name, dims)| (name.to_string(), dims.to_vec()))
        .chain([(stage_profile::TAIL.to_string(), Vec::new())])
        .collect();
        assert_eq!(stages, want);
        let plain = ours.decode(&latents).unwrap();
        assert_eq!(max_rel_error(&profiled, &plain).unwrap(), 0.0);
    }

    #[test]
    fn gemm_taps_are_laid_out_by_row_tap_then_column_tap_then_channel() {
        let (cout, cin) = (2, 3);
        let w = Tensor::arange(0f32, (cout * cin * 9) as f32, &Device::Cpu)
            .unwrap()
            .reshape((cout, cin, 3, 3))
            .unwrap();
        let taps = gemm_taps(&w).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(taps.dims(), &[3, cout, 3 * cin]);
        let taps = taps.to_vec3::<f32>().unwrap();
        for (dy, tap) in taps.iter().enumerate() {
            for (o, row) in tap.iter().enumerate() {
                for c in 0..cin {
                    for dx in 0..3 {
                        let want = (((o * cin + c) * 3 + dy) * 3 + dx) as f32;
                        assert_eq!(row[dx * cin + c], want, "o{o} c{c} dy{dy} dx{dx}");
                    }
                }
            }
        }
        let one = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 1, 1))
            .unwrap();
        let taps = gemm_taps(&one).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(
            taps.to_vec3::<f32>().unwrap(),
            vec![vec![vec![0., 1., 2.], vec![3., 4., 5.]]]
        );
    }

    #[test]
    fn implicit_taps_are_laid_out_by_tap_then_output_then_input_channel() {
        let (cout, cin) = (2, 3);
        let w = Tensor::arange(0f32, (cout * cin * 9) as f32, &Device::Cpu)
            .unwrap()
            .reshape((cout, cin, 3, 3))
            .unwrap();
        let taps = implicit_taps(&w).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(taps.dims(), &[9, cout, cin]);
        let taps = taps.to_vec3::<f32>().unwrap();
        for (tap, rows) in taps.iter().enumerate() {
            let (dy, dx) = (tap / 3, tap % 3);
            for (o, row) in rows.iter().enumerate() {
                for (c, &got) in row.iter().enumerate() {
                    let want = (((o * cin + c) * 3 + dy) * 3 + dx) as f32;
                    assert_eq!(got, want, "o{o} c{c} dy{dy} dx{dx}");
                }
            }
        }
        let one = Tensor::zeros((2, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(implicit_taps(&one).is_err(), "1x1 weights are refused");
    }

    #[test]
    fn conv_paths_are_read_from_a_comma_separated_list() {
        let paths = DecoderPaths::conv_from(" Implicit ,gemm");
        assert!(paths.conv_implicit && paths.conv_gemm && !paths.fused_norm);
        let paths = DecoderPaths::conv_from("implicit");
        assert!(paths.conv_implicit && !paths.conv_gemm && !paths.conv_implicit_wide);
        let paths = DecoderPaths::conv_from("implicit_wide,gemm");
        assert!(paths.conv_implicit && paths.conv_implicit_wide && paths.conv_gemm);
        let paths = DecoderPaths::conv_from("IMPLICIT_WGMMA");
        assert!(paths.conv_implicit && paths.conv_implicit_wgmma && !paths.conv_implicit_wide);
        assert_eq!(DecoderPaths::conv_from(""), DecoderPaths::default());
        assert_eq!(
            DecoderPaths::conv_from("winograd"),
            DecoderPaths::default(),
            "an unknown word turns nothing on"
        );
        // cuDNN only in builds that have it; elsewhere a warning, and the rest still applies.
        let paths = DecoderPaths::conv_from("cudnn,implicit");
        assert_eq!(paths.conv_cudnn, cfg!(feature = "cudnn"));
        assert!(paths.conv_implicit && !paths.conv_gemm && !paths.conv_cudnn_nhwc);
        let paths = DecoderPaths::conv_from("CUDNN_NHWC");
        assert_eq!(paths.conv_cudnn, cfg!(feature = "cudnn"));
        assert_eq!(paths.conv_cudnn_nhwc, cfg!(feature = "cudnn"));
        let paths = DecoderPaths::conv_from("implicit_cudnn");
        assert_eq!(paths.conv_implicit, cfg!(feature = "cudnn"));
        assert_eq!(paths.conv_implicit_cudnn, cfg!(feature = "cudnn"));
        assert!(!paths.conv_cudnn);
        // `candle` asks for none of them, explicitly (unset means the defaults).
        assert_eq!(DecoderPaths::conv_from("Candle"), DecoderPaths::default());
        // The defaults: the implicit prep pass on cuDNN in cuDNN builds, else the wide tile
        // with the GEMMs; either way the implicit path with a path for what it does not take.
        let d = DecoderPaths::conv_default();
        assert!(d.conv_implicit && !d.conv_implicit_wgmma && !d.fused_norm);
        assert_eq!(d.conv_implicit_cudnn, cfg!(feature = "cudnn"));
        assert_eq!(d.conv_cudnn, cfg!(feature = "cudnn"));
        assert_eq!(d.conv_implicit_wide, !cfg!(feature = "cudnn"));
        assert_eq!(d.conv_gemm, !cfg!(feature = "cudnn"));
    }

    #[test]
    fn reads_every_decoder_weight_and_nothing_else() {
        let cfg = two_level_config();
        let ours = record(7, |vb| Decoder::new(&cfg, vb)).unwrap();
        let all = record(7, |vb| AutoEncoder::new(&cfg, vb)).unwrap();
        let mut read: Vec<&String> = ours.keys().collect();
        let mut decoder: Vec<&String> = all.keys().filter(|n| n.starts_with(PREFIX)).collect();
        read.sort();
        decoder.sort();
        assert!(!read.is_empty());
        assert_eq!(read, decoder);
        assert!(
            decoder.len() < all.len(),
            "the autoencoder holds an encoder too"
        );
    }
}
