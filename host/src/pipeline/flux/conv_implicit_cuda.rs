//! The decoder's 3×3 convolutions as one implicit-GEMM tensor-core kernel, with the group
//! norm + SiLU before them, the 2× upsampling and the resnet's residual add folded in
//! (`host/kernels/conv_implicit.cu`).
//!
//! The GEMM path (`conv_gemm_cuda.rs`) moves about ten times the image's bytes per
//! convolution (three padded copies, each read by a GEMM, an f32 accumulator read and written
//! three times); a 3×3 convolution at 128 channels is only ~190 multiply-adds per byte of
//! its input, so that traffic, not the arithmetic, would set its speed. Here a convolution is
//! two passes: the prep kernel reads the NCHW image once (normalizing it when asked) and
//! writes it padded in NHWC, and the convolution kernel reads that (from L2 for the row taps
//! after the first) and writes the NCHW output once, with the bias and the residual added.
//! The group norm's statistics take one more read (`group_norm_cuda::group_stats`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cuda_util::{
    alloc_like, allow_dynamic_smem, bf16_view, contiguous_view, cuda_only_cpu_fwd, output,
};

/// PTX of `conv_implicit.cu` (also the cuDNN path's epilogue kernels).
pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_implicit.ptx"));
/// PTX of `conv_wgmma.cu` for compute_90a; empty when the build targeted another card.
const WGMMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_wgmma.ptx"));
pub use super::conv_launch::Tile;
use super::conv_launch::{BLOCK_CHANNELS, Launch, SLICE, prep_launch};

impl Tile {
    /// Whether this tile's kernel runs on `device`: all but [`Tile::Wgmma`] on any CUDA
    /// device; that one where the build has its PTX and the card is compute capability 9.0.
    pub fn runs_on(self, device: &candle_core::Device) -> bool {
        match (self, device) {
            (Self::Wgmma, candle_core::Device::Cuda(dev)) => {
                super::cuda_util::runs_sm90a(dev, WGMMA_PTX)
            }
            (_, device) => device.is_cuda(),
        }
    }

    /// The kernel's module: its name and PTX.
    fn module(self) -> (&'static str, &'static str) {
        match self {
            Self::Narrow | Self::Wide => ("headshot_conv_implicit", PTX),
            Self::Wgmma => ("headshot_conv_wgmma", WGMMA_PTX),
        }
    }
}

/// What convolves the prep pass's zero-padded NHWC image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Our kernel of this tile (`conv_implicit.cu`, `conv_wgmma.cu`), weights from
    /// `decoder::implicit_taps`, the bias and residual added in its epilogue.
    Kernel(Tile),
    /// cuDNN in NHWC with no padding of its own (`conv_cudnn_cuda.rs`), weights KRSC
    /// (`conv_cudnn_cuda::weights_for` NHWC), then `headshot_conv_nhwc_out_bf16` back to
    /// NCHW with the bias and residual: the prep pass's savings with cuDNN's convolution.
    #[cfg(feature = "cudnn")]
    Cudnn,
}

impl Engine {
    /// `(9, C_out, C_in)` of this engine's weights (`(9, C_out, C_in)` taps, or KRSC `(C_out,
    /// 3, 3, C_in)`), if they have the engine's rank.
    fn taps(self, dims: &[usize]) -> Option<(usize, usize, usize)> {
        match (self, dims) {
            (Self::Kernel(_), &[nine, cout, cin]) => Some((nine, cout, cin)),
            #[cfg(feature = "cudnn")]
            (Self::Cudnn, &[cout, 3, 3, cin]) => Some((9, cout, cin)),
            _ => None,
        }
    }

    /// The weight shape this engine wants for `(9, C_out, C_in)`.
    fn weight_dims(self, (_, cout, cin): (usize, usize, usize)) -> Vec<usize> {
        match self {
            Self::Kernel(_) => vec![9, cout, cin],
            #[cfg(feature = "cudnn")]
            Self::Cudnn => vec![cout, 3, 3, cin],
        }
    }

    /// What C_out must be a multiple of: our kernels' blocks cover 128 output channels; cuDNN
    /// and the pass back from its output take any count (conv_out's 3 too).
    fn cout_granule(self) -> usize {
        match self {
            Self::Kernel(_) => BLOCK_CHANNELS,
            #[cfg(feature = "cudnn")]
            Self::Cudnn => 1,
        }
    }

    /// The engine's suffix in check and bench row names.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Kernel(tile) => tile.suffix(),
            #[cfg(feature = "cudnn")]
            Self::Cudnn => "_on_cudnn",
        }
    }
}

/// A 3×3 convolution's weights `(C_out, C_in, 3, 3)` laid out as `engine` reads them: the
/// kernels' taps (`decoder::implicit_taps`) or cuDNN's KRSC. Made once, when the decoder
/// loads.
pub fn weights_for(engine: Engine, w: &Tensor) -> Result<Tensor> {
    match engine {
        Engine::Kernel(_) => super::decoder::implicit_taps(w),
        #[cfg(feature = "cudnn")]
        Engine::Cudnn => {
            super::conv_cudnn_cuda::weights_for(super::conv_cudnn_cuda::CudnnLayout::Nhwc, w)
        }
    }
}

/// Output width granule: the epilogue writes runs of 8 bf16 (16 bytes).
const WIDTH_GRANULE: usize = 8;
/// CUDA's limit on a grid's y and z dimensions.
const MAX_GRID_YZ: usize = 65_535;

/// The group norm (+ SiLU) the prep pass applies to the convolution's input.
#[derive(Clone)]
pub struct InputNorm {
    /// Per-channel weight and bias, bf16.
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

/// Whether `engine` takes a convolution of `cin` → `cout` channels at all (C_in a multiple
/// of 32 for the prep pass; for our kernels C_out of 128), before any image is seen: the
/// decoder lays out the weights for this path only for those.
pub fn takes_channels(cin: usize, cout: usize, engine: Engine) -> bool {
    cin > 0 && cout > 0 && cin.is_multiple_of(SLICE) && cout.is_multiple_of(engine.cout_granule())
}

/// The shapes `engine` takes, for input `(cin, h0, w0)` (upsampled 2× when `upsample`),
/// `taps` `(9, cout, cin)`: cin a multiple of 32, cout of the engine's granule (128 for our
/// kernels), the output width of 8, grids within CUDA's limits, a padded image within 32-bit
/// element offsets per row tap, and with a norm, a shape its kernels take. Returns the
/// output's `(h, w)`.
fn check_shapes(
    (cin, h0, w0): (usize, usize, usize),
    taps: (usize, usize, usize),
    upsample: bool,
    groups: Option<usize>,
    engine: Engine,
) -> Result<(usize, usize)> {
    let granule = engine.cout_granule();
    let up = usize::from(upsample);
    let (h, w) = (h0 << up, w0 << up);
    let (nine, cout, k) = taps;
    if nine != 9 || k != cin {
        candle_core::bail!(
            "implicit convolution: taps {taps:?} for {cin} input channels (want (9, C_out, {cin}))"
        );
    }
    if !cin.is_multiple_of(SLICE)
        || cout == 0
        || !cout.is_multiple_of(granule)
        || !w.is_multiple_of(WIDTH_GRANULE)
        || w == 0
        || h == 0
    {
        candle_core::bail!(
            "implicit convolution wants C_in a multiple of {SLICE}, C_out of {granule} \
             and an output width of {WIDTH_GRANULE}: {cin} -> {cout} channels, {h}x{w}"
        );
    }
    if h + 2 > MAX_GRID_YZ
        || cout / BLOCK_CHANNELS > MAX_GRID_YZ
        || cin / SLICE > MAX_GRID_YZ
        || (w + 2) * cin > i32::MAX as usize
    {
        candle_core::bail!(
            "implicit convolution: {cin} -> {cout} channels over {h}x{w} exceed its grid or \
             32-bit row offsets"
        );
    }
    if let Some(groups) = groups {
        super::group_norm_cuda::check_shape(cin, h0, w0, groups)?;
    }
    Ok((h, w))
}

/// Whether [`conv3x3`] takes these inputs with `engine`, so that a caller falls back instead
/// of meeting an error: bf16 NCHW `x` on CUDA starting 16-byte aligned, at least one image;
/// bf16 `taps` as the engine wants them ([`Engine`]) and `bias` `(C_out)`; shapes
/// [`check_shapes`] accepts; a norm's weight and bias bf16 `(C_in)`; a residual of the
/// output's shape, bf16, starting 16-byte aligned; everything on `x`'s device.
pub fn supports(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    upsample: bool,
    norm: Option<&InputNorm>,
    residual: Option<&Tensor>,
    engine: Engine,
) -> bool {
    let (Ok((batch, cin, h0, w0)), Some(taps_dims)) = (x.dims4(), engine.taps(taps.dims())) else {
        return false;
    };
    let Ok((h, w)) = check_shapes(
        (cin, h0, w0),
        taps_dims,
        upsample,
        norm.map(|n| n.groups),
        engine,
    ) else {
        return false;
    };
    let on_x = |t: &Tensor, dims: &[usize]| {
        t.dims() == dims && t.dtype() == DType::BF16 && t.device().same_device(x.device())
    };
    batch > 0
        && x.device().is_cuda()
        && x.dtype() == DType::BF16
        && x.layout().start_offset().is_multiple_of(WIDTH_GRANULE)
        && on_x(taps, &engine.weight_dims(taps_dims))
        && on_x(bias, &[taps_dims.1])
        && norm.is_none_or(|n| on_x(&n.weight, &[cin]) && on_x(&n.bias, &[cin]))
        && residual.is_none_or(|r| {
            on_x(r, &[batch, taps_dims.1, h, w])
                && r.layout().start_offset().is_multiple_of(WIDTH_GRANULE)
        })
}

struct ConvImplicit {
    upsample: bool,
    norm: Option<InputNorm>,
    residual: Option<Tensor>,
    /// The engine asked for (for a kernel, [`Tile::for_width`] decides the tile per call).
    engine: Engine,
}

/// cudarc's launch config for `launch`.
pub(super) fn config(launch: &Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: launch.grid,
        block_dim: (launch.threads, 1, 1),
        shared_mem_bytes: launch.smem,
    }
}

impl CustomOp3 for ConvImplicit {
    fn name(&self) -> &'static str {
        "headshot-conv-implicit"
    }

    cuda_only_cpu_fwd!(3);

    /// (x `(batch, C_in, h0, w0)`, taps `(9, C_out, C_in)`, bias `(C_out)`).
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, cin, h0, w0) = l1.shape().dims4()?;
        let Some(taps) = self.engine.taps(l2.shape().dims()) else {
            candle_core::bail!(
                "implicit convolution: weights {:?} are not the shape its engine ({:?}) takes",
                l2.shape(),
                self.engine
            );
        };
        let cout = taps.1;
        let groups = self.norm.as_ref().map(|n| n.groups);
        // Checked before anything is allocated (the padded image runs to hundreds of MB).
        let (h, w) = check_shapes((cin, h0, w0), taps, self.upsample, groups, self.engine)?;
        if batch == 0 {
            candle_core::bail!("implicit convolution of an empty batch");
        }
        if l3.shape().dims() != [cout] {
            candle_core::bail!(
                "implicit convolution bias {:?} for {cout} output channels",
                l3.shape()
            );
        }
        let (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(ts), CudaStorageSlice::BF16(bs)) =
            (&s1.slice, &s2.slice, &s3.slice)
        else {
            candle_core::bail!("the implicit convolution wants bf16 input, weights and bias");
        };
        let dev = s1.device();
        let x = contiguous_view(xs, l1, WIDTH_GRANULE, "convolution input")?;
        let weights = contiguous_view(ts, l2, WIDTH_GRANULE, "convolution weights")?;
        let bias = contiguous_view(bs, l3, 1, "convolution bias")?;

        let norm_guards = self
            .norm
            .as_ref()
            .map(|n| (n.weight.storage_and_layout(), n.bias.storage_and_layout()));
        let residual_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let out_len = cout * h * w;
        if let Some(r) = &self.residual
            && r.dims() != [batch, cout, h, w]
        {
            candle_core::bail!(
                "implicit convolution residual {:?} for output {:?}",
                r.dims(),
                [batch, cout, h, w]
            );
        }
        // Statistics of every image's groups, (mean, 1/std) pairs; a placeholder the prep
        // kernel does not read without a norm.
        let stats = match &self.norm {
            Some(n) => {
                if n.weight.dims() != [cin] || n.bias.dims() != [cin] {
                    candle_core::bail!(
                        "implicit convolution norm weight {:?} and bias {:?} for {cin} channels",
                        n.weight.dims(),
                        n.bias.dims()
                    );
                }
                super::group_norm_cuda::group_stats(dev, &x, (batch, cin, h0, w0), n.groups, n.eps)?
            }
            None => dev.alloc_zeros::<f32>(2)?,
        };
        let groups = groups.unwrap_or(1);
        let mut y = alloc_like(dev, xs, batch * out_len)?;
        let padded_len = (h + 2) * (w + 2) * cin;
        // SAFETY: each image's prep launch writes all padded_len values before its
        // convolution reads them.
        let mut padded = alloc_like(dev, xs, padded_len)?;

        let prep_shape = prep_launch(cin, h, w, w0);
        let prep = dev.get_or_load_custom_func(prep_shape.entry, "headshot_conv_implicit", PTX)?;
        // Our convolution kernel (none with the cuDNN engine: cuDNN, then the pass back from its
        // NHWC output).
        let kernel = match self.engine {
            Engine::Kernel(preferred) => {
                let launch = preferred.launch(cout, h, w);
                let tile = Tile::for_width(w, preferred);
                if tile == Tile::Wgmma && !super::cuda_util::runs_sm90a(dev, WGMMA_PTX) {
                    candle_core::bail!(
                        "the wgmma convolution runs only on a compute capability 9.0 card, in a \
                         build for it (CUDA_COMPUTE_CAP 90 or 90a)"
                    );
                }
                let (module, ptx) = tile.module();
                let f = dev.get_or_load_custom_func(launch.entry, module, ptx)?;
                allow_dynamic_smem(&f, launch.smem)?;
                Some((f, launch))
            }
            #[cfg(feature = "cudnn")]
            Engine::Cudnn => None,
        };
        // cuDNN's NHWC output of one image at a time.
        #[cfg(feature = "cudnn")]
        let mut y_nhwc = match self.engine {
            Engine::Cudnn => Some(alloc_like(dev, xs, out_len)?),
            Engine::Kernel(_) => None,
        };
        let (cin_i, cout_i, h_i, w_i) = (cin as i32, cout as i32, h as i32, w as i32);
        let up_i = i32::from(self.upsample);
        let norm_i = i32::from(self.norm.is_some());
        let silu_i = i32::from(self.norm.as_ref().is_some_and(|n| n.silu));
        let groups_i = groups as i32;
        let has_residual_i = i32::from(self.residual.is_some());
        let image = cin * h0 * w0;
        for img in 0..batch {
            let x_img = x.slice(img * image..(img + 1) * image);
            let stats_img = if self.norm.is_some() {
                stats.slice(2 * groups * img..2 * groups * (img + 1))
            } else {
                stats.slice(0..2)
            };
            let (gamma, beta) = match &norm_guards {
                Some((wg, bg)) => (
                    bf16_view!(wg, 1, "group norm weight"),
                    bf16_view!(bg, 1, "group norm bias"),
                ),
                None => (bias.slice(0..cout), bias.slice(0..cout)),
            };
            let mut builder = prep.builder();
            builder.arg(&x_img);
            builder.arg(&cin_i);
            builder.arg(&h_i);
            builder.arg(&w_i);
            builder.arg(&up_i);
            builder.arg(&norm_i);
            builder.arg(&stats_img);
            builder.arg(&gamma);
            builder.arg(&beta);
            builder.arg(&groups_i);
            builder.arg(&silu_i);
            builder.arg(&mut padded);
            // SAFETY: reads this image's cin·h0·w0 values (and with the norm its groups'
            // stats and cin weights and biases), writes (h+2)·(w+2)·cin.
            unsafe { builder.launch(config(&prep_shape)) }.w()?;

            let residual = match &residual_guard {
                Some(g) => {
                    let r = bf16_view!(g, WIDTH_GRANULE, "convolution residual");
                    r.slice(img * out_len..(img + 1) * out_len)
                }
                None => bias.slice(0..cout),
            };
            let mut y_img = y.slice_mut(img * out_len..(img + 1) * out_len);
            #[cfg(feature = "cudnn")]
            if let Some(y_nhwc) = y_nhwc.as_mut() {
                use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
                {
                    let stream = dev.cuda_stream();
                    let (xp, _x_guard) = padded.device_ptr(&stream);
                    let (wp, _w_guard) = weights.device_ptr(&stream);
                    let (yp, _y_guard) = y_nhwc.device_ptr_mut(&stream);
                    super::conv_cudnn_cuda::conv3x3_prepadded_nhwc(
                        dev,
                        (xp, wp, yp),
                        (cin, cout, h, w),
                    )?;
                }
                super::conv_cudnn_cuda::nhwc_out(
                    dev,
                    (&y_nhwc.slice(0..out_len), &bias, &residual),
                    self.residual.is_some(),
                    (cout, h * w),
                    &mut y_img,
                )?;
                continue;
            }
            let Some((conv, conv_shape)) = &kernel else {
                candle_core::bail!("implicit convolution: no kernel for {:?}", self.engine);
            };
            let mut builder = conv.builder();
            builder.arg(&padded);
            builder.arg(&weights);
            builder.arg(&bias);
            builder.arg(&residual);
            builder.arg(&has_residual_i);
            builder.arg(&cin_i);
            builder.arg(&cout_i);
            builder.arg(&h_i);
            builder.arg(&w_i);
            builder.arg(&mut y_img);
            // SAFETY: reads the padded image, 9·cout·cin weights, cout biases (and with the
            // residual cout·h·w values of it), writes this image's cout·h·w outputs; the
            // residual and y start 16-byte aligned (offsets in multiples of 8 bf16, h·w too).
            unsafe { builder.launch(config(conv_shape)) }.w()?;
        }
        Ok(output(
            dev,
            CudaStorageSlice::BF16,
            y,
            Shape::from((batch, cout, h, w)),
        ))
    }
}

/// The 3×3 convolution (stride 1, padding 1) of bf16 NCHW `x`, normalized first by `norm`
/// when given and upsampled 2× (nearest) when `upsample`, with `taps` as `engine` wants them
/// (for a kernel from `decoder::implicit_taps`) and `bias` `(C_out)`, plus `residual` (the
/// output's shape) when given: `(batch, C_out, h, w)` at the (upsampled) input size. A
/// kernel's tile is [`Tile::for_width`]'s pick; [`Tile::Wgmma`] only where [`Tile::runs_on`].
pub fn conv3x3(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    norm: Option<&InputNorm>,
    upsample: bool,
    residual: Option<&Tensor>,
    engine: Engine,
) -> Result<Tensor> {
    let contiguous = |t: &Tensor| t.contiguous();
    let norm = match norm {
        Some(n) => Some(InputNorm {
            weight: contiguous(&n.weight)?,
            bias: contiguous(&n.bias)?,
            ..n.clone()
        }),
        None => None,
    };
    let residual = residual.map(contiguous).transpose()?;
    x.contiguous()?.apply_op3_no_bwd(
        &taps.contiguous()?,
        &bias.contiguous()?,
        &ConvImplicit {
            upsample,
            norm,
            residual,
            engine,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NARROW: Engine = Engine::Kernel(Tile::Narrow);

    #[test]
    fn shapes_outside_the_kernels_are_refused_with_the_limit_named() {
        // The decoder's shapes pass, upsampled or not.
        assert_eq!(
            check_shapes((128, 128, 128), (9, 128, 128), true, Some(32), NARROW).unwrap(),
            (256, 256)
        );
        assert_eq!(
            check_shapes((512, 96, 128), (9, 512, 512), false, None, NARROW).unwrap(),
            (96, 128)
        );
        for ((cin, h0, w0), taps, why) in [
            ((16, 8, 8), (9, 128, 16), "C_in a multiple of 32"),
            ((128, 8, 8), (9, 3, 128), "C_out of 128"),
            ((128, 8, 12), (9, 128, 128), "an output width of 8"),
            ((128, 8, 8), (3, 128, 384), "want (9, C_out, 128)"),
        ] {
            let err = check_shapes((cin, h0, w0), taps, false, None, NARROW)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{err}");
        }
        assert!(check_shapes((128, 8, 8), (9, 128, 128), false, Some(3), NARROW).is_err());
        assert!(takes_channels(128, 128, NARROW) && takes_channels(512, 256, NARROW));
        assert!(!takes_channels(16, 128, NARROW) && !takes_channels(128, 3, NARROW));
        assert!(!takes_channels(0, 128, NARROW));
        // cuDNN convolves any output count (conv_out's 3), but the prep pass still wants
        // input channels in 32s.
        #[cfg(feature = "cudnn")]
        {
            assert!(takes_channels(128, 3, Engine::Cudnn));
            assert!(!takes_channels(16, 128, Engine::Cudnn));
            assert_eq!(
                check_shapes((128, 8, 8), (9, 3, 128), false, Some(32), Engine::Cudnn).unwrap(),
                (8, 8)
            );
        }
    }

    #[test]
    fn only_cuda_devices_run_the_kernels() {
        assert!(!Tile::Narrow.runs_on(&candle_core::Device::Cpu));
        assert!(!Tile::Wgmma.runs_on(&candle_core::Device::Cpu));
    }
}
