//! `headshot bench gpu --check`: every fused or rewritten op of the model against plain candle
//! ops on random inputs, as the max relative error of the fast path (in the run dtype) from
//! the plain path computed in f32 on the same device.

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::WithForward;
use candle_transformers::models::flux::model::{Config, Flux};
use candle_transformers::models::flux::sampling::State;

use super::attention::{AttentionKernel, plain};
use super::embed::RopeTable;
use super::layers::{Dense, WeightFormat};
use super::model::{FluxModel, ModelOptions};
use crate::pipeline::random_weights::RandomWeights;
use crate::pipeline::rng::Rng;

/// Largest relative error a bf16 fast path may show against its f32 plain twin.
pub const BF16_TOLERANCE: f64 = 1e-2;
/// Bound on the deviation FP8 weights may cause. e4m3 keeps 3 mantissa bits (each weight
/// rounds by up to 6%), so FP8 is a stated deviation, not a rounding-level match: this bound
/// only catches a broken FP8 path (a wrong scale is off by orders of magnitude).
pub const FP8_TOLERANCE: f64 = 0.1;

/// One comparison.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// What was compared.
    pub name: String,
    /// max |fast − plain| / max |plain|.
    pub max_rel_error: f64,
    /// Whether the fast path produced NaN or infinity.
    pub non_finite: bool,
    /// The bound this comparison is held to.
    pub tolerance: f64,
}

impl CheckResult {
    /// Within its tolerance and finite.
    pub fn passes(&self) -> bool {
        !self.non_finite && self.max_rel_error <= self.tolerance
    }
}

/// Sizes the checks run at.
#[derive(Debug, Clone)]
pub struct CheckShape {
    /// Model config whose widths the ops use (depth is cut to one block of each kind for the
    /// whole-model comparison).
    pub config: Config,
    /// Image tokens (height/16 × width/16).
    pub image_tokens: (usize, usize),
    /// Text tokens.
    pub text_tokens: usize,
}

/// max |fast − reference| / max |reference|, both taken in f32: the one error measure of the
/// checks and of the model's tests.
pub fn max_rel_error(fast: &Tensor, reference: &Tensor) -> Result<f64> {
    let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all();
    let (fast, reference) = (flat(fast)?, flat(reference)?);
    let max_abs =
        |t: &Tensor| -> Result<f64> { Ok(f64::from(t.abs()?.max(0)?.to_scalar::<f32>()?)) };
    let scale = max_abs(&reference)?.max(f64::MIN_POSITIVE);
    Ok(max_abs(&(&fast - &reference)?)? / scale)
}

fn compare(name: &str, fast: &Tensor, reference: &Tensor, tolerance: f64) -> Result<CheckResult> {
    let values: Vec<f32> = fast.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(CheckResult {
        name: name.to_string(),
        max_rel_error: max_rel_error(fast, reference)?,
        non_finite: values.iter().any(|v| !v.is_finite()),
        tolerance,
    })
}

/// Runs every check on `device`, fast paths in `dtype` (held to [`BF16_TOLERANCE`], or
/// f32 rounding when `dtype` is f32), then the FP8 deviations (held to [`FP8_TOLERANCE`]).
pub fn run(
    device: &Device,
    dtype: DType,
    shape: &CheckShape,
    kernel: AttentionKernel,
) -> Result<Vec<CheckResult>> {
    let tolerance = if dtype == DType::F32 {
        1e-4
    } else {
        BF16_TOLERANCE
    };
    let cfg = &shape.config;
    let mut rng = Rng::new(42);
    let mut randn = |dims: &[usize]| rng.normal_tensor(dims, device);
    let (gh, gw) = shape.image_tokens;
    let tokens = shape.text_tokens + gh * gw;
    let heads = cfg.num_heads;
    let head_dim = cfg.hidden_size / heads;
    let mut out = Vec::new();

    // Attention: the configured kernel against matmul-softmax-matmul in f32.
    let qkv: Vec<Tensor> = (0..3)
        .map(|_| randn(&[1, tokens, heads, head_dim]))
        .collect::<Result<_>>()?;
    let attention = kernel.resolve(device);
    let cast = |t: &Tensor| t.to_dtype(dtype);
    let fast = attention.run(&cast(&qkv[0])?, &cast(&qkv[1])?, &cast(&qkv[2])?)?;
    let reference = plain(&qkv[0], &qkv[1], &qkv[2])?;
    let name = format!("attention_{}", attention.name());
    out.push(compare(&name, &fast, &reference, tolerance)?);

    // Norms: candle's fused kernels against the formula in plain ops.
    let x = randn(&[1, tokens, cfg.hidden_size])?;
    let ones = Tensor::ones(cfg.hidden_size, dtype, device)?;
    let zeros = Tensor::zeros(cfg.hidden_size, dtype, device)?;
    let fast = candle_nn::ops::layer_norm(&cast(&x)?, &ones, &zeros, 1e-6)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let reference =
        centred.broadcast_div(&(centred.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?;
    out.push(compare("layer_norm", &fast, &reference, tolerance)?);

    let q = randn(&[1, tokens, heads, head_dim])?;
    let scale = randn(&[head_dim])?.affine(0.1, 1.0)?;
    let fast = candle_nn::ops::rms_norm(&cast(&q)?, &cast(&scale)?, 1e-6)?;
    let reference = q
        .broadcast_div(&(q.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?
        .broadcast_mul(&scale)?;
    out.push(compare("rms_norm", &fast, &reference, tolerance)?);

    // Rotary embedding: our f32 table fed ids in the run dtype (as the sampler builds them)
    // against the same rotation with f32 ids.
    let noise = Tensor::zeros((1, 16, gh * 2, gw * 2), DType::F32, device)?;
    let t5 = Tensor::zeros(
        (1, shape.text_tokens, cfg.context_in_dim),
        DType::F32,
        device,
    )?;
    let clip = Tensor::zeros((1, cfg.vec_in_dim), DType::F32, device)?;
    let ids32 = State::new(&t5, &clip, &noise)?;
    let ids_cat = |s: &State| Tensor::cat(&[&s.txt_ids, &s.img_ids], 1);
    let ids_run = ids_cat(&ids32)?.to_dtype(dtype)?;
    let fast = RopeTable::new(&ids_run, &cfg.axes_dim, cfg.theta as f64)?.apply(&cast(&q)?)?;
    let reference =
        RopeTable::new(&ids_cat(&ids32)?, &cfg.axes_dim, cfg.theta as f64)?.apply(&q)?;
    out.push(compare("rope", &fast, &reference, tolerance)?);

    // Whole model, one block of each kind at full width: ours in the run dtype against
    // candle's stock module in f32, same weights.
    let mut small = cfg.clone();
    small.depth = 1;
    small.depth_single_blocks = 1;
    let (weights, recording) = RandomWeights::seeded(9);
    let stock = Flux::new(
        &small,
        VarBuilder::from_backend(Box::new(weights), DType::F32, device.clone()),
    )?;
    let tensors = recording.take();
    let load = |weights: WeightFormat| {
        let options = ModelOptions {
            attention: kernel,
            weights,
        };
        FluxModel::with_options(
            &small,
            VarBuilder::from_tensors(tensors.clone(), dtype, device),
            options,
        )
    };
    let ours = load(WeightFormat::Full)?;
    let img = randn(&[1, 16, gh * 2, gw * 2])?;
    let txt = randn(&[1, shape.text_tokens, small.context_in_dim])?;
    let vec = randn(&[1, small.vec_in_dim])?;
    let s32 = State::new(&txt, &vec, &img)?;
    let s = State::new(&cast(&txt)?, &cast(&vec)?, &cast(&img)?)?;
    let t = Tensor::new(&[0.6f32], device)?;
    let g = Tensor::new(&[3.5f32], device)?;
    let g = small.guidance_embed.then_some(&g);
    let fast = ours.forward(&s.img, &s.img_ids, &s.txt, &s.txt_ids, &t, &s.vec, g)?;
    let reference = stock.forward(
        &s32.img,
        &s32.img_ids,
        &s32.txt,
        &s32.txt_ids,
        &t,
        &s32.vec,
        g,
    )?;
    out.push(compare("model_vs_stock_f32", &fast, &reference, tolerance)?);

    // FP8 weights against the same layer and model in full precision (the run dtype): the
    // deviation FP8 adds on top of bf16.
    let fp8 = load(WeightFormat::Fp8)?;
    let fast8 = fp8.forward(&s.img, &s.img_ids, &s.txt, &s.txt_ids, &t, &s.vec, g)?;
    out.push(compare("model_fp8_vs_full", &fast8, &fast, FP8_TOLERANCE)?);
    let x = cast(&randn(&[1, tokens, cfg.hidden_size])?)?;
    let w = (randn(&[4 * cfg.hidden_size, cfg.hidden_size])? / (cfg.hidden_size as f64).sqrt())?;
    let dense = |format| {
        let weights = [("weight".to_string(), w.clone())].into_iter().collect();
        let vb = VarBuilder::from_tensors(weights, dtype, device);
        Dense::load(cfg.hidden_size, 4 * cfg.hidden_size, false, format, vb)?.forward(&x)
    };
    let full = dense(WeightFormat::Full)?;
    out.push(compare(
        "fp8_linear_vs_full",
        &dense(WeightFormat::Fp8)?,
        &full,
        FP8_TOLERANCE,
    )?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::demo::demo_flux_config;
    use crate::pipeline::variant::Variant;

    #[test]
    fn every_check_passes_on_the_cpu_in_f32_and_bf16() {
        for variant in [Variant::Schnell, Variant::Dev] {
            let shape = CheckShape {
                config: demo_flux_config(variant),
                image_tokens: (6, 5),
                text_tokens: 7,
            };
            for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, BF16_TOLERANCE)] {
                let results =
                    run(&Device::Cpu, dtype, &shape, AttentionKernel::Fused).expect("checks");
                let names: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
                assert_eq!(
                    names,
                    [
                        "attention_fused-cpu",
                        "layer_norm",
                        "rms_norm",
                        "rope",
                        "model_vs_stock_f32",
                        "model_fp8_vs_full",
                        "fp8_linear_vs_full"
                    ]
                );
                for r in &results {
                    let bound = if r.name.contains("fp8") {
                        FP8_TOLERANCE
                    } else {
                        tolerance
                    };
                    assert_eq!(r.tolerance, bound, "{r:?}");
                    assert!(r.passes(), "{variant} {dtype:?}: {r:?}");
                    // FP8 really quantizes: it is not bit-identical to full precision.
                    if r.name.contains("fp8") {
                        assert!(r.max_rel_error > 1e-3, "{r:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_wrong_fast_path_is_caught() {
        let a = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).expect("a");
        let b = Tensor::new(&[1f32, 2.0, 3.1], &Device::Cpu).expect("b");
        let r = compare("x", &a, &b, 1e-2).expect("compare");
        assert!(!r.passes(), "{r:?}");
        let nan = Tensor::new(&[f32::NAN, 2.0, 3.0], &Device::Cpu).expect("nan");
        let r = compare("nan", &nan, &a, 1.0).expect("compare");
        assert!(r.non_finite && !r.passes());
    }
}
