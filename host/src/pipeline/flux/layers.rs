//! The small layers FLUX blocks are made of, loading the BFL checkpoint's tensor names.
//!
//! Norms go through candle's fused kernels (`ops::layer_norm`, `ops::rms_norm`: one kernel
//! each) where the stock module's bias-free LayerNorm falls back to eight separate ops.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

/// Largest finite e4m3 value: per-tensor scales map each weight's max |w| onto it.
pub(crate) const E4M3_MAX: f64 = 448.0;

/// How a [`Dense`] layer stores its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// The checkpoint's values in the activation dtype.
    #[default]
    Full,
    /// FP8 e4m3 with one f32 scale per tensor (`model.fp8`): half the bytes of bf16.
    Fp8,
}

/// Which GEMM runs a projection (`model.gemm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmKernel {
    /// On CUDA in bf16: cuBLASLt with the bias, and the MLP's GELU, fused into the GEMM's
    /// epilogue. Elsewhere: `plain`.
    #[default]
    Auto,
    /// candle's matmul, then the bias add and the activation as separate passes.
    Plain,
}

impl std::str::FromStr for GemmKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "plain" => Ok(Self::Plain),
            other => Err(format!(
                "unknown gemm kernel {other:?}: expected \"auto\" or \"plain\""
            )),
        }
    }
}

/// How the blocks' projections are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Projections {
    /// Storage of the weight.
    pub format: WeightFormat,
    /// GEMM implementation.
    pub gemm: GemmKernel,
}

impl From<WeightFormat> for Projections {
    fn from(format: WeightFormat) -> Self {
        Self {
            format,
            gemm: GemmKernel::default(),
        }
    }
}

/// The weight of a [`Dense`] layer as stored.
#[derive(Debug, Clone)]
enum Weight {
    /// The checkpoint's values in the activation dtype.
    Full(Tensor),
    /// e4m3 values with `values · scale ≈ weight`, widened for the GEMM.
    Fp8 {
        /// The quantized weight (out × in), dtype F8E4M3.
        values: Tensor,
        /// Per-tensor scale.
        scale: f64,
    },
    /// e4m3 bits quantized on a GPU, for its FP8 GEMM only (see [`Dense::fp8_on_gpu`]).
    #[cfg(feature = "cuda")]
    Fp8Gpu {
        /// The e4m3 bits (out × in) as u8: candle 0.11.1 cannot cast to F8E4M3 on CUDA.
        bits: Tensor,
        /// `bits · scale ≈ weight`, one f32 on the device (the GEMM reads it there).
        scale: Tensor,
    },
}

/// Activation applied to a projection's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None.
    Identity,
    /// GELU, tanh approximation (FLUX's MLPs).
    GeluTanh,
}

/// A linear layer `y = x·Wᵀ + b` (`weight`, `bias`): the one place a quantized or fused GEMM
/// slots in for every projection of the model.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Weight,
    bias: Option<Tensor>,
    #[cfg_attr(
        not(feature = "cuda"),
        expect(dead_code, reason = "only CUDA has a second GEMM")
    )]
    gemm: GemmKernel,
}

impl Dense {
    /// Loads `weight` (out × in) and, when `bias`, `bias` (out), in full precision.
    pub fn new(input: usize, output: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Self::load(input, output, bias, Projections::default(), vb)
    }

    /// Loads the layer, quantizing the weight to `how.format`.
    pub fn load(
        input: usize,
        output: usize,
        bias: bool,
        how: impl Into<Projections>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let how = how.into();
        let weight = vb.get((output, input), "weight")?;
        let bias = if bias {
            Some(vb.get(output, "bias")?)
        } else {
            None
        };
        Self::from_parts(weight, bias, how)
    }

    /// A layer from its tensors (the single block splits its fused projection this way).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, how: Projections) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if how.format == WeightFormat::Fp8 && weight.device().is_cuda() {
            return Self::fp8_on_gpu(weight, bias, how);
        }
        let weight = match how.format {
            WeightFormat::Full => Weight::Full(weight),
            WeightFormat::Fp8 => {
                let (values, scale) = quantize_e4m3(&weight)?;
                Weight::Fp8 { values, scale }
            }
        };
        Ok(Self {
            weight,
            bias,
            gemm: how.gemm,
        })
    }

    /// FP8 weights on a GPU: quantized there, for the FP8 GEMM only (candle cannot widen e4m3
    /// on CUDA, so there is no plain fallback). A missing bias becomes zeros, so every FP8
    /// projection runs the same GEMM.
    #[cfg(feature = "cuda")]
    fn fp8_on_gpu(weight: Tensor, bias: Option<Tensor>, how: Projections) -> Result<Self> {
        use super::gemm_cuda;
        let (output, _) = weight.dims2()?;
        if weight.dtype() != DType::BF16 || how.gemm != GemmKernel::Auto {
            candle_core::bail!(
                "FP8 weights on CUDA need bf16 activations (model.dtype) and model.gemm = \"auto\", \
                 got {:?} and {:?}",
                weight.dtype(),
                how.gemm
            );
        }
        let (bits, scale) = gemm_cuda::quantize_weight(&weight)?;
        if !gemm_cuda::fp8_fits(&bits) {
            candle_core::bail!(
                "the FP8 GEMM needs dimensions in multiples of 16, this weight is {:?}",
                weight.dims()
            );
        }
        let bias = match bias {
            Some(b) => b,
            None => Tensor::zeros(output, DType::BF16, weight.device())?,
        };
        Ok(Self {
            weight: Weight::Fp8Gpu { bits, scale },
            bias: Some(bias),
            gemm: how.gemm,
        })
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }

    /// Applies the layer, then `act`. With `model.gemm = auto` on CUDA in bf16 the bias and
    /// the activation run inside the GEMM (cuBLASLt epilogue), and FP8 weights multiply on
    /// FP8 tensor cores (activations quantized per call, per-tensor scale). FP8 weights
    /// elsewhere are widened for the GEMM (e4m3 → f16 → activation dtype, both exact) and the
    /// per-tensor scale is applied to the product, which saves memory, not time.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.forward_cuda(x, act)? {
            return Ok(y);
        }
        let y = match &self.weight {
            Weight::Full(w) => x.broadcast_matmul(&w.t()?)?,
            #[cfg(feature = "cuda")]
            Weight::Fp8Gpu { .. } => candle_core::bail!(
                "FP8 weights quantized on the GPU run only in its FP8 GEMM (bf16 input on the \
                 same device), got {:?} input on {:?}",
                x.dtype(),
                x.device().location()
            ),
            Weight::Fp8 { values, scale } => {
                let w = values.to_dtype(DType::F16)?.to_dtype(x.dtype())?;
                x.broadcast_matmul(&w.t()?)?.affine(*scale, 0.0)?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match act {
            Activation::Identity => Ok(y),
            Activation::GeluTanh => y.gelu(),
        }
    }

    /// The cuBLASLt path, where it applies.
    #[cfg(feature = "cuda")]
    fn forward_cuda(&self, x: &Tensor, act: Activation) -> Result<Option<Tensor>> {
        use super::gemm_cuda;
        if self.gemm != GemmKernel::Auto || !gemm_cuda::supports(x) {
            return Ok(None);
        }
        let Some(b) = &self.bias else {
            return Ok(None);
        };
        match &self.weight {
            Weight::Full(w) if !gemm_cuda::aligned(w) || !gemm_cuda::aligned(b) => Ok(None),
            Weight::Full(w) => gemm_cuda::linear(x, w, b, act).map(Some),
            Weight::Fp8Gpu { bits, scale } => {
                gemm_cuda::fp8_linear(x, bits, scale, b, act).map(Some)
            }
            Weight::Fp8 { .. } => Ok(None),
        }
    }

    /// Bytes the weight occupies as stored.
    pub fn weight_bytes(&self) -> usize {
        let w = match &self.weight {
            Weight::Full(w) => w,
            Weight::Fp8 { values, .. } => values,
            #[cfg(feature = "cuda")]
            Weight::Fp8Gpu { bits, .. } => bits,
        };
        w.elem_count() * w.dtype().size_in_bytes()
    }
}

/// Per-tensor e4m3 quantization: `values · scale ≈ w`, with max |w| mapped to 448.
pub fn quantize_e4m3(w: &Tensor) -> Result<(Tensor, f64)> {
    let w = w.to_dtype(DType::F32)?;
    let amax = f64::from(w.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    if !amax.is_finite() {
        candle_core::bail!("cannot quantize a weight holding NaN or infinity to FP8");
    }
    let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
    Ok((w.affine(1.0 / scale, 0.0)?.to_dtype(DType::F8E4M3)?, scale))
}

/// LayerNorm over the last dimension without learned scale or bias (eps 1e-6), as FLUX uses
/// before every modulation.
#[derive(Debug, Clone)]
pub struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl PlainLayerNorm {
    /// A norm over `dim` features in the builder's dtype and device.
    pub fn new(dim: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, vb.dtype(), vb.device())?,
            zeros: Tensor::zeros(dim, vb.dtype(), vb.device())?,
        })
    }

    /// Normalises `x` (made contiguous first: the fused kernel needs it).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.ones, &self.zeros, 1e-6)
    }
}

/// RMSNorm with a learned `scale`, applied to queries and keys per head.
#[derive(Debug, Clone)]
pub struct ScaledRmsNorm {
    scale: Tensor,
}

impl ScaledRmsNorm {
    /// Loads `scale` (dim).
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            scale: vb.get(dim, "scale")?,
        })
    }

    /// The learned scale (fused kernels apply it themselves).
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.scale, 1e-6)
    }
}

/// Two-layer SiLU MLP embedding the timestep, guidance and pooled CLIP vectors.
#[derive(Debug, Clone)]
pub struct MlpEmbedder {
    in_layer: Dense,
    out_layer: Dense,
}

impl MlpEmbedder {
    /// Loads `in_layer` and `out_layer`.
    pub fn new(input: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_layer: Dense::new(input, hidden, true, vb.pp("in_layer"))?,
            out_layer: Dense::new(hidden, hidden, true, vb.pp("out_layer"))?,
        })
    }

    /// Embeds `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
    }
}

/// Shift, scale and gate for one adaLN-modulated sub-layer, each `(batch, 1, hidden)`.
#[derive(Debug, Clone)]
pub struct Modulation {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl Modulation {
    /// A modulation from its rows, each `(batch, 1, hidden)`.
    pub fn from_parts(shift: Tensor, scale: Tensor, gate: Tensor) -> Self {
        Self { shift, scale, gate }
    }

    /// `x · (1 + scale) + shift`.
    pub fn scale_shift(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&(&self.scale + 1.0)?)?
            .broadcast_add(&self.shift)
    }

    /// `norm(x) · (1 + scale) + shift`: one kernel on CUDA in bf16.
    pub fn norm_scale_shift(&self, norm: &PlainLayerNorm, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::adaln_cuda::supports(x) {
            return super::adaln_cuda::norm_modulate(x, &self.scale, &self.shift);
        }
        self.scale_shift(&norm.forward(x)?)
    }

    /// `residual + gate · x`: one kernel on CUDA in bf16.
    pub fn gated_add(&self, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::adaln_cuda::supports(residual) {
            return super::adaln_cuda::gated_residual(residual, x, &self.gate);
        }
        residual + x.broadcast_mul(&self.gate)?
    }
}

/// The projection producing `count` modulations from the conditioning vector.
#[derive(Debug, Clone)]
pub struct Modulator {
    lin: Dense,
    count: usize,
}

impl Modulator {
    /// Loads `lin` (hidden → 3 × count × hidden: shift, scale and gate per modulation).
    pub fn new(hidden: usize, count: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin: Dense::new(hidden, 3 * count * hidden, true, vb.pp("lin"))?,
            count,
        })
    }

    /// Modulations from `silu(vec)` (computed once per forward pass by the caller).
    pub fn forward(&self, silu_vec: &Tensor) -> Result<Vec<Modulation>> {
        let out = self.lin.forward(silu_vec)?.unsqueeze(1)?;
        let width = out.dim(D::Minus1)? / (3 * self.count);
        (0..self.count)
            .map(|m| {
                let part = |i: usize| out.narrow(D::Minus1, (3 * m + i) * width, width);
                Ok(Modulation {
                    shift: part(0)?,
                    scale: part(1)?,
                    gate: part(2)?,
                })
            })
            .collect()
    }
}

/// Feed-forward `lin2(gelu_tanh(lin1(x)))` (checkpoint names `0` and `2`).
#[derive(Debug, Clone)]
pub struct FeedForward {
    lin1: Dense,
    lin2: Dense,
}

impl FeedForward {
    /// Loads the two projections as `how` says.
    pub fn new(hidden: usize, inner: usize, how: Projections, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: Dense::load(hidden, inner, true, how, vb.pp("0"))?,
            lin2: Dense::load(inner, hidden, true, how, vb.pp("2"))?,
        })
    }

    /// Applies the MLP.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lin2
            .forward(&self.lin1.forward_act(x, Activation::GeluTanh)?)
    }

    /// Bytes of the two projection weights.
    pub fn weight_bytes(&self) -> usize {
        self.lin1.weight_bytes() + self.lin2.weight_bytes()
    }
}

/// The output layer: final norm, adaLN shift/scale, projection to latent patches.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    norm: PlainLayerNorm,
    linear: Dense,
    modulation: Dense,
}

impl FinalLayer {
    /// Loads `linear` and `adaLN_modulation.1`.
    pub fn new(hidden: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: PlainLayerNorm::new(hidden, &vb)?,
            linear: Dense::new(hidden, out, true, vb.pp("linear"))?,
            modulation: Dense::new(hidden, 2 * hidden, true, vb.pp("adaLN_modulation.1"))?,
        })
    }

    /// Projects image tokens `x` to patches under conditioning `silu(vec)`.
    pub fn forward(&self, x: &Tensor, silu_vec: &Tensor) -> Result<Tensor> {
        let m = self.modulation.forward(silu_vec)?.unsqueeze(1)?;
        let hidden = m.dim(D::Minus1)? / 2;
        let (shift, scale) = (
            m.narrow(D::Minus1, 0, hidden)?,
            m.narrow(D::Minus1, hidden, hidden)?,
        );
        let x = self
            .norm
            .forward(x)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        self.linear.forward(&x)
    }
}
