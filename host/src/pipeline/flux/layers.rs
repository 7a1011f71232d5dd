//! The small layers FLUX blocks are made of, loading the BFL checkpoint's tensor names.
//!
//! Norms go through candle's fused kernels (`ops::layer_norm`, `ops::rms_norm`: one kernel
//! each) where the stock module's bias-free LayerNorm falls back to eight separate ops.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Largest finite e4m3 value: per-tensor scales map each weight's max |w| onto it.
const E4M3_MAX: f64 = 448.0;

/// How a [`Dense`] layer stores its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// The checkpoint's values in the activation dtype.
    #[default]
    Full,
    /// FP8 e4m3 with one f32 scale per tensor (`model.fp8`): half the bytes of bf16.
    Fp8,
}

/// A linear layer `y = x·Wᵀ + b` (`weight`, `bias`): the one place a quantized or fused GEMM
/// slots in for every projection of the model.
#[derive(Debug, Clone)]
pub enum Dense {
    /// The checkpoint's weight in the activation dtype.
    Full(candle_nn::Linear),
    /// e4m3 values with `values · scale ≈ weight`.
    Fp8 {
        /// The quantized weight (out × in).
        values: Tensor,
        /// Per-tensor scale.
        scale: f64,
        /// Bias in the activation dtype.
        bias: Option<Tensor>,
    },
}

impl Dense {
    /// Loads `weight` (out × in) and, when `bias`, `bias` (out), in full precision.
    pub fn new(input: usize, output: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Self::load(input, output, bias, WeightFormat::Full, vb)
    }

    /// Loads the layer, quantizing the weight to `format`.
    pub fn load(
        input: usize,
        output: usize,
        bias: bool,
        format: WeightFormat,
        vb: VarBuilder,
    ) -> Result<Self> {
        let linear = candle_nn::linear_b(input, output, bias, vb)?;
        Ok(match format {
            WeightFormat::Full => Self::Full(linear),
            WeightFormat::Fp8 => {
                let (values, scale) = quantize_e4m3(linear.weight())?;
                Self::Fp8 {
                    values,
                    scale,
                    bias: linear.bias().cloned(),
                }
            }
        })
    }

    /// Applies the layer. FP8 weights are widened for the GEMM (e4m3 → f16 → activation dtype,
    /// both exact) and the per-tensor scale is applied to the product, which is smaller than
    /// the weight. This saves memory, not time: an FP8 tensor-core GEMM is the GPU fast path
    /// still to come behind this seam.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Full(linear) => linear.forward(x),
            Self::Fp8 {
                values,
                scale,
                bias,
            } => {
                let w = values.to_dtype(DType::F16)?.to_dtype(x.dtype())?;
                let y = candle_nn::Linear::new(w, None)
                    .forward(x)?
                    .affine(*scale, 0.0)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// Bytes the weight occupies as stored.
    pub fn weight_bytes(&self) -> usize {
        let w = match self {
            Self::Full(linear) => linear.weight(),
            Self::Fp8 { values, .. } => values,
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
    /// `x · (1 + scale) + shift`.
    pub fn scale_shift(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&(&self.scale + 1.0)?)?
            .broadcast_add(&self.shift)
    }

    /// `residual + gate · x`.
    pub fn gated_add(&self, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
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
    /// Loads the two projections in `format`.
    pub fn new(hidden: usize, inner: usize, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: Dense::load(hidden, inner, true, format, vb.pp("0"))?,
            lin2: Dense::load(inner, hidden, true, format, vb.pp("2"))?,
        })
    }

    /// Applies the MLP.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lin2.forward(&self.lin1.forward(x)?.gelu()?)
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
