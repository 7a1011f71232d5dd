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
    /// FP8 e4m3 with one f32 scale per output channel (`model.fp8_scale = "row"`); on CUDA
    /// the activations get one per token, and the GEMM applies both (see
    /// `fp8_rows_cuda.rs`). Where the GPU's cuBLASLt refuses that, per tensor.
    Fp8Rows,
}

impl WeightFormat {
    /// The format the settings `model.fp8` and `model.fp8_scale` choose.
    pub fn from_settings(fp8: bool, scale: Fp8Scale) -> Self {
        match (fp8, scale) {
            (false, _) => Self::Full,
            (true, Fp8Scale::Tensor) => Self::Fp8,
            (true, Fp8Scale::Row | Fp8Scale::Auto) => Self::Fp8Rows,
        }
    }

    /// The format layers on `device` store: per-row FP8 stays per-tensor on a GPU whose
    /// cuBLASLt does not run it right (checked once, logged; see
    /// `fp8_rows_cuda::available`).
    pub fn on(self, device: &candle_core::Device) -> Self {
        if self == Self::Fp8Rows && fp8_rows_refused(device) {
            Self::Fp8
        } else {
            self
        }
    }
}

/// Whether `device` is a GPU that cannot run the per-row FP8 GEMM.
fn fp8_rows_refused(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    return device.is_cuda() && !super::fp8_rows_cuda::available(device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// How FP8 weights and activations are scaled (`model.fp8_scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Scale {
    /// `Row` with `model.fp8`, and nothing to scale without it (the default, so only an
    /// explicit scaling without FP8 weights is an error): on an H100 the FP8 step took
    /// 130.1 ms per row against 135.6 per tensor (same call; docs/BENCHMARKS.md).
    #[default]
    Auto,
    /// One scale per tensor.
    Tensor,
    /// One scale per output channel and per token: one pass fewer over the activations and
    /// finer rounding; needs cuBLAS 12.9 or later on the GPU (checked at load, else per
    /// tensor with a warning).
    Row,
}

impl Fp8Scale {
    /// The setting's value as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tensor => "tensor",
            Self::Row => "row",
        }
    }
}

impl std::str::FromStr for Fp8Scale {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [Self::Auto, Self::Tensor, Self::Row]
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                format!("unknown FP8 scaling {s:?}: expected \"auto\", \"tensor\" or \"row\"")
            })
    }
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
    /// e4m3 values with `values · scales ≈ weight` row by row, widened for the GEMM.
    Fp8Rows {
        /// The quantized weight (out × in), dtype F8E4M3.
        values: Tensor,
        /// One f32 scale per output channel (out).
        scales: Tensor,
    },
    /// e4m3 bits quantized on a GPU, for its FP8 GEMM only (see [`Dense::fp8_on_gpu`]).
    #[cfg(feature = "cuda")]
    Fp8Gpu {
        /// The e4m3 bits (out × in) as u8: candle 0.11.1 cannot cast to F8E4M3 on CUDA.
        bits: Tensor,
        /// `bits · scale ≈ weight`, one f32 on the device (the GEMM reads it there).
        scale: Tensor,
    },
    /// e4m3 rows with one scale per output channel, for the per-row FP8 GEMM only.
    #[cfg(feature = "cuda")]
    Fp8GpuRows(super::fp8_rows_cuda::QuantizedRows),
}

/// A projection's input, made ready once for every layer that reads it (the single block's
/// two halves of `linear1` share one): the values, or on CUDA for per-row FP8 layers their
/// e4m3 rows with one scale each.
#[derive(Debug, Clone)]
pub enum ProjectionInput {
    /// The values, in the activation dtype.
    Values(Tensor),
    /// Quantized for per-row FP8 layers.
    #[cfg(feature = "cuda")]
    Fp8Rows(super::fp8_rows_cuda::QuantizedRows),
    /// Two parts of a join left unjoined for a bf16 cuBLASLt layer, which multiplies each by
    /// its block of weight columns ([`super::gemm_cuda::linear_parts`]; the default, off with
    /// `HEADSHOT_SPLIT_GEMM=off`).
    #[cfg(feature = "cuda")]
    Parts(Tensor, Tensor),
}

/// Activation applied to a projection's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None.
    Identity,
    /// GELU, tanh approximation (FLUX's MLPs).
    GeluTanh,
}

impl ProjectionInput {
    /// A tensor that holds the prepared input (for unjoined parts, the second): what a
    /// benchmark waits on.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Self::Values(v) => v,
            #[cfg(feature = "cuda")]
            Self::Fp8Rows(q) => q.packed(),
            #[cfg(feature = "cuda")]
            Self::Parts(_, last) => last,
        }
    }
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
        let how = Projections {
            format: how.format.on(weight.device()),
            ..how
        };
        #[cfg(feature = "cuda")]
        if matches!(how.format, WeightFormat::Fp8 | WeightFormat::Fp8Rows)
            && weight.device().is_cuda()
        {
            return Self::fp8_on_gpu(weight, bias, how);
        }
        let weight = match how.format {
            WeightFormat::Full => Weight::Full(weight),
            WeightFormat::Fp8 => {
                let (values, scale) = quantize_e4m3(&weight)?;
                Weight::Fp8 { values, scale }
            }
            WeightFormat::Fp8Rows => {
                let (values, scales) = quantize_e4m3_rows(&weight)?;
                Weight::Fp8Rows { values, scales }
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
    /// projection runs the same GEMM. `how.format` is already what the GPU runs
    /// ([`WeightFormat::on`]).
    #[cfg(feature = "cuda")]
    fn fp8_on_gpu(weight: Tensor, bias: Option<Tensor>, how: Projections) -> Result<Self> {
        use super::{fp8_rows_cuda, gemm_cuda};
        let (output, _) = weight.dims2()?;
        if weight.dtype() != DType::BF16 || how.gemm != GemmKernel::Auto {
            candle_core::bail!(
                "FP8 weights on CUDA need bf16 activations (model.dtype) and model.gemm = \"auto\", \
                 got {:?} and {:?}",
                weight.dtype(),
                how.gemm
            );
        }
        if !gemm_cuda::fp8_fits(&weight) {
            candle_core::bail!(
                "the FP8 GEMM needs dimensions in multiples of 16, this weight is {:?}",
                weight.dims()
            );
        }
        let bias = match bias {
            Some(b) => b,
            None => Tensor::zeros(output, DType::BF16, weight.device())?,
        };
        // Both GPU quantizers would turn NaN or infinity into NaN values or scales, silently
        // (candle's max on CUDA skips NaN, so a range check cannot tell).
        ensure_finite(&weight)?;
        let weight = if how.format == WeightFormat::Fp8Rows {
            Weight::Fp8GpuRows(fp8_rows_cuda::QuantizedRows::quantize(&[&weight])?)
        } else {
            let (bits, scale) = gemm_cuda::quantize_weight(&weight)?;
            Weight::Fp8Gpu { bits, scale }
        };
        Ok(Self {
            weight,
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
    /// FP8 tensor cores (activations quantized per call, per tensor or per token as the
    /// weight is scaled). FP8 weights elsewhere are widened for the GEMM (e4m3 → f16 →
    /// activation dtype, both exact) and their scales are applied to the product, which saves
    /// memory, not time.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.apply(&self.prepare(&[x])?, act)
    }

    /// `parts` joined along their last dimension, made ready for this layer once, for
    /// [`Dense::apply`] here and on layers stored the same way. Per-row FP8 layers on CUDA
    /// quantize the parts straight from where they lie; otherwise they are joined (one part
    /// is taken as is).
    pub fn prepare(&self, parts: &[&Tensor]) -> Result<ProjectionInput> {
        #[cfg(feature = "cuda")]
        if self.takes_fp8_rows() {
            use super::fp8_rows_cuda::{QuantizedRows, supports};
            if supports(parts) {
                return QuantizedRows::quantize(parts).map(ProjectionInput::Fp8Rows);
            }
            // Parts the kernel cannot read where they lie (more than two, or widths not in
            // multiples of 8): joined first. What still does not fit is refused by `apply`.
            let joined = Tensor::cat(parts, D::Minus1)?;
            if supports(&[&joined]) {
                return QuantizedRows::quantize(&[&joined]).map(ProjectionInput::Fp8Rows);
            }
            return Ok(ProjectionInput::Values(joined));
        }
        #[cfg(feature = "cuda")]
        if let (Weight::Full(w), [x0, x1], GemmKernel::Auto, Some(b)) =
            (&self.weight, parts, self.gemm, &self.bias)
            && super::gemm_cuda::split_gemm()
            && super::gemm_cuda::supports_parts(x0, x1, w, b)
        {
            return Ok(ProjectionInput::Parts((*x0).clone(), (*x1).clone()));
        }
        match parts {
            [one] => Ok(ProjectionInput::Values((*one).clone())),
            _ => Tensor::cat(parts, D::Minus1).map(ProjectionInput::Values),
        }
    }

    /// Whether the layer multiplies per-row FP8 on the GPU (its input is best quantized by
    /// the kernel that produces it).
    #[cfg(feature = "cuda")]
    fn takes_fp8_rows(&self) -> bool {
        matches!(self.weight, Weight::Fp8GpuRows(_))
    }

    /// The per-row FP8 weight and the bias, for `--check`'s comparison of the GEMM's widened
    /// way out with the GEMM itself.
    #[cfg(feature = "cuda")]
    pub(super) fn fp8_rows_parts(&self) -> Option<(&super::fp8_rows_cuda::QuantizedRows, &Tensor)> {
        match (&self.weight, &self.bias) {
            (Weight::Fp8GpuRows(w), Some(b)) => Some((w, b)),
            _ => None,
        }
    }

    /// Applies the layer, then `act`, to an input from [`Dense::prepare`].
    pub fn apply(&self, input: &ProjectionInput, act: Activation) -> Result<Tensor> {
        match input {
            ProjectionInput::Values(x) => self.forward_values(x, act),
            #[cfg(feature = "cuda")]
            ProjectionInput::Fp8Rows(q) => match (&self.weight, &self.bias) {
                (Weight::Fp8GpuRows(w), Some(b)) => super::fp8_rows_cuda::linear(q, w, b, act),
                _ => candle_core::bail!(
                    "an input quantized by row feeds only per-row FP8 layers on the GPU"
                ),
            },
            #[cfg(feature = "cuda")]
            ProjectionInput::Parts(x0, x1) => match (&self.weight, &self.bias) {
                (Weight::Full(w), Some(b)) if super::gemm_cuda::supports_parts(x0, x1, w, b) => {
                    super::gemm_cuda::linear_parts(x0, x1, w, b, act)
                }
                _ => self.forward_values(&Tensor::cat(&[x0, x1], D::Minus1)?, act),
            },
        }
    }

    /// [`Dense::forward_act`] on values.
    fn forward_values(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.forward_cuda(x, act)? {
            return Ok(y);
        }
        let y = match &self.weight {
            Weight::Full(w) => x.broadcast_matmul(&w.t()?)?,
            #[cfg(feature = "cuda")]
            Weight::Fp8Gpu { .. } | Weight::Fp8GpuRows(_) => candle_core::bail!(
                "FP8 weights quantized on the GPU run only in its FP8 GEMM (bf16 input on the \
                 same device, widths in multiples of 16), got {:?} input {:?} on {:?}",
                x.dtype(),
                x.dims(),
                x.device().location()
            ),
            Weight::Fp8 { values, scale } => {
                let w = values.to_dtype(DType::F16)?.to_dtype(x.dtype())?;
                x.broadcast_matmul(&w.t()?)?.affine(*scale, 0.0)?
            }
            Weight::Fp8Rows { values, scales } => {
                // Dequantized in f32 before the GEMM: in f16 a row of small weights would lose
                // its scale (below f16's range), and 448-sized values could overflow the sums.
                let w = values
                    .to_dtype(DType::F16)?
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&scales.unsqueeze(1)?)?
                    .to_dtype(x.dtype())?;
                x.broadcast_matmul(&w.t()?)?
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
            Weight::Fp8 { .. } | Weight::Fp8Rows { .. } | Weight::Fp8GpuRows(_) => Ok(None),
        }
    }

    /// The weight's parameters and the bytes it occupies as stored (scales included).
    pub fn weight_size(&self) -> WeightSize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let (parameters, bytes) = match &self.weight {
            Weight::Full(w) => (w.elem_count(), bytes(w)),
            Weight::Fp8 { values, .. } => (values.elem_count(), bytes(values)),
            Weight::Fp8Rows { values, scales } => {
                (values.elem_count(), bytes(values) + bytes(scales))
            }
            #[cfg(feature = "cuda")]
            Weight::Fp8Gpu { bits, .. } => (bits.elem_count(), bytes(bits)),
            #[cfg(feature = "cuda")]
            Weight::Fp8GpuRows(rows) => (rows.values(), rows.bytes()),
        };
        WeightSize { parameters, bytes }
    }
}

/// What weights hold: their parameters, and the bytes those take as stored. The two differ
/// from `parameters · dtype size` once weights are quantized, which the pipeline's status
/// reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightSize {
    /// Parameters.
    pub parameters: usize,
    /// Bytes as stored.
    pub bytes: usize,
}

impl std::ops::Add for WeightSize {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            parameters: self.parameters + other.parameters,
            bytes: self.bytes + other.bytes,
        }
    }
}

impl std::iter::Sum for WeightSize {
    fn sum<I: Iterator<Item = Self>>(sizes: I) -> Self {
        sizes.fold(Self::default(), |a, b| a + b)
    }
}

/// An error unless every value of `w` is finite. (candle's max skips NaN, so the range alone
/// cannot tell: w · 0 is 0 for finite values and NaN otherwise, and a sum keeps NaN.)
fn ensure_finite(w: &Tensor) -> Result<()> {
    let bad = (w * 0.0)?
        .abs()?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if bad != 0.0 {
        candle_core::bail!("cannot quantize a weight holding NaN or infinity to FP8");
    }
    Ok(())
}

/// Per-tensor e4m3 quantization: `values · scale ≈ w`, with max |w| mapped to 448.
pub fn quantize_e4m3(w: &Tensor) -> Result<(Tensor, f64)> {
    let w = w.to_dtype(DType::F32)?;
    ensure_finite(&w)?;
    let amax = f64::from(w.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
    Ok((w.affine(1.0 / scale, 0.0)?.to_dtype(DType::F8E4M3)?, scale))
}

/// Per-row e4m3 quantization: `values · scales ≈ w` row by row, each row's max |w| mapped to
/// 448, `scales` f32 `(rows)`.
pub fn quantize_e4m3_rows(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let w = w.to_dtype(DType::F32)?;
    ensure_finite(&w)?;
    let amax = w.abs()?.max_keepdim(D::Minus1)?;
    // An all-zero row keeps zeros under any scale; 1e-12 only avoids dividing by zero.
    let scales = (amax.maximum(1e-12)? / E4M3_MAX)?;
    let values = w.broadcast_div(&scales)?.to_dtype(DType::F8E4M3)?;
    Ok((values, scales.squeeze(D::Minus1)?))
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

    /// Shift, scale and gate, for tests that compare modulations.
    #[cfg(test)]
    pub fn parts(&self) -> [&Tensor; 3] {
        [&self.shift, &self.scale, &self.gate]
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

    /// [`Modulation::norm_scale_shift`] made ready for `layer` ([`Dense::prepare`]). For a
    /// per-row FP8 layer on CUDA the norm kernel quantizes its output itself: one pass, and
    /// no bf16 copy of the activations in memory.
    pub fn norm_scale_shift_for(
        &self,
        norm: &PlainLayerNorm,
        x: &Tensor,
        layer: &Dense,
    ) -> Result<ProjectionInput> {
        #[cfg(feature = "cuda")]
        if layer.takes_fp8_rows()
            && super::adaln_cuda::supports(x)
            && x.dim(D::Minus1)?.is_multiple_of(16)
        {
            return super::adaln_cuda::norm_modulate_rows(x, &self.scale, &self.shift)
                .map(ProjectionInput::Fp8Rows);
        }
        layer.prepare(&[&self.norm_scale_shift(norm, x)?])
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

    /// Applies the MLP to `norm(x) · (1 + scale) + shift` of `m`, made ready for its first
    /// projection by [`Modulation::norm_scale_shift_for`].
    pub fn forward_modulated(
        &self,
        m: &Modulation,
        norm: &PlainLayerNorm,
        x: &Tensor,
    ) -> Result<Tensor> {
        let input = m.norm_scale_shift_for(norm, x, &self.lin1)?;
        self.lin2
            .forward(&self.lin1.apply(&input, Activation::GeluTanh)?)
    }

    /// The two projection weights.
    pub fn weight_size(&self) -> WeightSize {
        self.lin1.weight_size() + self.lin2.weight_size()
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A (4, 32) weight of positive values (no cancellation in the products, so errors are
    /// the quantization's) whose rows span six orders of magnitude.
    fn uneven_weight() -> Tensor {
        let wave = Tensor::arange(0u32, 128, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| ((t * 0.7)?.sin()? * 0.5)? + 1.0)
            .and_then(|t| t.reshape((4, 32)))
            .expect("wave");
        let range = Tensor::new(&[[1e-5f32], [1e-3], [0.1], [10.0]], &Device::Cpu).expect("range");
        wave.broadcast_mul(&range).expect("weight")
    }

    #[test]
    fn row_quantization_maps_each_rows_max_to_448_and_keeps_zero_rows() {
        let w = Tensor::cat(
            &[
                &uneven_weight(),
                &Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap(),
            ],
            0,
        )
        .unwrap();
        let (values, scales) = quantize_e4m3_rows(&w).unwrap();
        assert_eq!(values.dtype(), DType::F8E4M3);
        assert_eq!(scales.dims(), [5]);
        let row_max: Vec<f32> = values
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .max(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row_max, [448.0, 448.0, 448.0, 448.0, 0.0]);
        // Dequantized, every row is within e4m3's rounding (2⁻⁴) of its own range.
        let back = values
            .to_dtype(DType::F32)
            .unwrap()
            .broadcast_mul(&scales.unsqueeze(1).unwrap())
            .unwrap();
        for r in 0..4 {
            let err = crate::pipeline::flux::check::max_rel_error(
                &back.get(r).unwrap(),
                &w.get(r).unwrap(),
            )
            .unwrap();
            assert!(err <= 1.0 / 16.0, "row {r}: {err}");
        }
        for bad in [f32::NAN, f32::INFINITY] {
            let w = Tensor::new(&[[1f32, bad]], &Device::Cpu).unwrap();
            assert!(quantize_e4m3_rows(&w).is_err(), "{bad}");
            assert!(quantize_e4m3(&w).is_err(), "{bad}");
        }
    }

    #[test]
    fn per_row_fp8_keeps_small_output_channels_that_per_tensor_rounds_away() {
        let w = uneven_weight();
        let x = Tensor::arange(0u32, 64, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| ((t * 0.3)?.cos()? * 0.5)? + 1.0)
            .and_then(|t| t.reshape((1, 2, 32)))
            .unwrap();
        let layer =
            |format: WeightFormat| Dense::from_parts(w.clone(), None, format.into()).unwrap();
        let full = layer(WeightFormat::Full).forward(&x).unwrap();
        let rows = layer(WeightFormat::Fp8Rows).forward(&x).unwrap();
        let tensor = layer(WeightFormat::Fp8).forward(&x).unwrap();
        // The smallest channel (w's row scaled by 1e-5: below e4m3's smallest subnormal under
        // the one scale that fits the 10× row), relative to its own size.
        let channel = |y: &Tensor| y.narrow(2, 0, 1).unwrap();
        let err = |y: &Tensor| {
            crate::pipeline::flux::check::max_rel_error(&channel(y), &channel(&full)).unwrap()
        };
        let (row_err, tensor_err) = (err(&rows), err(&tensor));
        assert!(row_err < 0.05, "per-row: {row_err}");
        assert!(tensor_err > 0.5, "per-tensor: {tensor_err}");
        // One byte per weight and one f32 per output channel.
        assert_eq!(
            layer(WeightFormat::Fp8Rows).weight_size(),
            WeightSize {
                parameters: 4 * 32,
                bytes: 4 * 32 + 4 * 4
            }
        );
    }

    #[test]
    fn settings_choose_the_weight_format() {
        assert_eq!(
            WeightFormat::from_settings(false, Fp8Scale::Row),
            WeightFormat::Full
        );
        assert_eq!(
            WeightFormat::from_settings(true, Fp8Scale::Tensor),
            WeightFormat::Fp8
        );
        assert_eq!(
            WeightFormat::from_settings(true, Fp8Scale::Row),
            WeightFormat::Fp8Rows
        );
        // Auto, the default, is per row with FP8 and nothing without it.
        assert_eq!(
            WeightFormat::from_settings(true, Fp8Scale::default()),
            WeightFormat::Fp8Rows
        );
        assert_eq!(
            WeightFormat::from_settings(false, Fp8Scale::default()),
            WeightFormat::Full
        );
        assert_eq!("row".parse::<Fp8Scale>(), Ok(Fp8Scale::Row));
        assert_eq!("auto".parse::<Fp8Scale>(), Ok(Fp8Scale::Auto));
        let err = "channel".parse::<Fp8Scale>().unwrap_err();
        assert!(
            err.contains("\"channel\"") && err.contains("\"row\""),
            "{err}"
        );
    }
}
