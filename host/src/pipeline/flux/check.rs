//! `headshot bench gpu --check`: every fused or rewritten op of the model against plain candle
//! ops on random inputs, as the max relative error of the fast path (in the run dtype) from
//! the plain path computed in f32 on the same device.

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::WithForward;
use candle_transformers::models::flux::model::{Config, Flux};
use candle_transformers::models::flux::sampling::State;

use super::attention::{AttentionKernel, plain};
use super::blocks::joined_qkv;
use super::embed::RopeTable;
use super::layers::{
    Activation, Dense, GemmKernel, Modulation, PlainLayerNorm, Projections, ScaledRmsNorm,
    WeightFormat,
};
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
    /// For a comparison that fails, where its wrong values lie
    /// ([`super::mismatch::describe`]): what the next session debugs from.
    pub mismatch: Option<String>,
}

impl CheckResult {
    /// Within its tolerance and finite.
    pub fn passes(&self) -> bool {
        !self.non_finite && self.max_rel_error <= self.tolerance
    }

    /// A comparison whose fast path returned `error` instead of a result: failed, with the
    /// error where the mismatch would be. For library paths (cuDNN) that report what they
    /// cannot do as errors, so one refusal does not end the checks after it.
    #[cfg(any(feature = "cudnn", test))]
    fn failed(name: &str, tolerance: f64, error: &candle_core::Error) -> Self {
        Self {
            name: name.to_string(),
            max_rel_error: f64::INFINITY,
            non_finite: false,
            tolerance,
            mismatch: Some(format!("the fast path failed: {error}")),
        }
    }
}

/// The comparisons of a check run as they complete: kept, and each handed to a reporter the
/// moment it is pushed, so a run cut short (a kernel fault, a device call's time limit) has
/// printed every row before it.
pub struct CheckLog<'a> {
    results: Vec<CheckResult>,
    report: Box<dyn FnMut(&CheckResult) + 'a>,
}

impl<'a> CheckLog<'a> {
    /// A log that hands each comparison to `report` as it is pushed.
    pub fn new(report: impl FnMut(&CheckResult) + 'a) -> Self {
        Self {
            results: Vec::new(),
            report: Box::new(report),
        }
    }

    /// Records `result` after reporting it.
    pub fn push(&mut self, result: CheckResult) {
        (self.report)(&result);
        self.results.push(result);
    }

    /// The comparisons so far, in order.
    pub fn results(&self) -> &[CheckResult] {
        &self.results
    }

    /// The comparisons, in order.
    pub fn into_results(self) -> Vec<CheckResult> {
        self.results
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

/// [`compare`] of a fast path's result, or [`CheckResult::failed`] where it is an error.
#[cfg(any(feature = "cudnn", test))]
fn compare_or_fail(
    name: &str,
    fast: Result<Tensor>,
    reference: &Tensor,
    tolerance: f64,
) -> Result<CheckResult> {
    match fast {
        Ok(fast) => compare(name, &fast, reference, tolerance),
        Err(e) => Ok(CheckResult::failed(name, tolerance, &e)),
    }
}

fn compare(name: &str, fast: &Tensor, reference: &Tensor, tolerance: f64) -> Result<CheckResult> {
    let values: Vec<f32> = fast.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut result = CheckResult {
        name: name.to_string(),
        max_rel_error: max_rel_error(fast, reference)?,
        non_finite: values.iter().any(|v| !v.is_finite()),
        tolerance,
        mismatch: None,
    };
    if !result.passes() {
        let want: Vec<f32> = reference.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        result.mismatch = Some(super::mismatch::describe(
            &values,
            &want,
            fast.dims(),
            tolerance,
        ));
    }
    Ok(result)
}

/// Runs every check on `device`, fast paths in `dtype` (held to [`BF16_TOLERANCE`], or
/// f32 rounding when `dtype` is f32), then the FP8 deviations (held to [`FP8_TOLERANCE`]).
pub fn run(
    device: &Device,
    dtype: DType,
    shape: &CheckShape,
    kernel: AttentionKernel,
) -> Result<Vec<CheckResult>> {
    let mut out = CheckLog::new(|_| {});
    run_into(device, dtype, shape, kernel, &mut out)?;
    Ok(out.into_results())
}

/// [`run`], pushing each comparison to `out` as it completes, so a failing op leaves the
/// results before it reported.
pub fn run_into(
    device: &Device,
    dtype: DType,
    shape: &CheckShape,
    kernel: AttentionKernel,
    out: &mut CheckLog,
) -> Result<()> {
    // HEADSHOT_CHECK_ONLY=attention stops after the attention comparisons: a kernel that has
    // never run gets a process of its own (a fault leaves the CUDA context unusable), without
    // repeating every other check. HEADSHOT_CHECK_ONLY=decoder_full compares only whole
    // decoders at the image size. Read before any work, so a wrong value costs nothing.
    let attention_only = match std::env::var("HEADSHOT_CHECK_ONLY").as_deref() {
        Err(_) => false,
        Ok("attention") => true,
        Ok("decoder_full") => return full_decoders(device, dtype, shape, out),
        Ok(other) => candle_core::bail!(
            "HEADSHOT_CHECK_ONLY={other:?}: the values are \"attention\" and \"decoder_full\""
        ),
    };
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
    #[cfg(feature = "cuda")]
    if device.is_cuda() && dtype == DType::BF16 && head_dim == super::flash_cuda::HEAD_DIM {
        cuda_kernels(&qkv, &reference, tolerance, out)?;
    }
    if attention_only {
        return Ok(());
    }

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

    // adaLN: LayerNorm with the modulation's scale and shift, and the gated residual (one
    // kernel each on CUDA in bf16), against the same formulas in f32. The rows are views into
    // one projection output, as the modulator makes them.
    let rows = (randn(&[1, 1, 3 * cfg.hidden_size])? * 0.5)?;
    let modulation = |dtype: DType| -> Result<(Modulation, PlainLayerNorm)> {
        let rows = rows.to_dtype(dtype)?;
        let part = |i: usize| rows.narrow(2, i * cfg.hidden_size, cfg.hidden_size);
        let norm = PlainLayerNorm::new(cfg.hidden_size, &VarBuilder::zeros(dtype, device))?;
        Ok((Modulation::from_parts(part(0)?, part(1)?, part(2)?), norm))
    };
    let ((fast_mod, fast_norm), (plain_mod, plain_norm)) =
        (modulation(dtype)?, modulation(DType::F32)?);
    let update = randn(&[1, tokens, cfg.hidden_size])?;
    let fast = fast_mod.norm_scale_shift(&fast_norm, &cast(&x)?)?;
    let reference = plain_mod.norm_scale_shift(&plain_norm, &x)?;
    out.push(compare(
        "adaln_norm_modulate",
        &fast,
        &reference,
        tolerance,
    )?);
    let fast = fast_mod.gated_add(&cast(&x)?, &cast(&update)?)?;
    let reference = plain_mod.gated_add(&x, &update)?;
    out.push(compare(
        "adaln_gated_residual",
        &fast,
        &reference,
        tolerance,
    )?);

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

    // Queries and keys of a double block: text and image projections joined, normalised with
    // each stream's own scales and rotated (on CUDA in bf16, one kernel each for q and k),
    // against the same steps in f32.
    let table = RopeTable::new(&ids_cat(&ids32)?, &cfg.axes_dim, cfg.theta as f64)?;
    let projections = [
        randn(&[1, shape.text_tokens, 3 * cfg.hidden_size])?,
        randn(&[1, gh * gw, 3 * cfg.hidden_size])?,
    ];
    let scales = (0..4)
        .map(|_| randn(&[head_dim])?.affine(0.1, 1.0))
        .collect::<Result<Vec<_>>>()?;
    let norm = |i: usize, dtype: DType| {
        let tensors = [("scale".to_string(), scales[i].clone())]
            .into_iter()
            .collect();
        ScaledRmsNorm::new(head_dim, VarBuilder::from_tensors(tensors, dtype, device))
    };
    let (fast_norms, plain_norms) = (
        (0..4).map(|i| norm(i, dtype)).collect::<Result<Vec<_>>>()?,
        (0..4)
            .map(|i| norm(i, DType::F32))
            .collect::<Result<Vec<_>>>()?,
    );
    let fast_in = [cast(&projections[0])?, cast(&projections[1])?];
    let fast = joined_qkv(
        &[
            (&fast_in[0], &fast_norms[0], &fast_norms[1]),
            (&fast_in[1], &fast_norms[2], &fast_norms[3]),
        ],
        heads,
        &table,
    )?;
    let reference = joined_qkv(
        &[
            (&projections[0], &plain_norms[0], &plain_norms[1]),
            (&projections[1], &plain_norms[2], &plain_norms[3]),
        ],
        heads,
        &table,
    )?;
    out.push(compare("norm_rope_q", &fast.0, &reference.0, tolerance)?);
    out.push(compare("norm_rope_k", &fast.1, &reference.1, tolerance)?);
    out.push(compare("joined_v", &fast.2, &reference.2, tolerance)?);

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
            ..ModelOptions::default()
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
    // One projection with bias: FP8 weights (on CUDA the FP8 GEMM, activations quantized too)
    // against full precision in the run dtype; then the model's GEMM path (on CUDA in bf16 the
    // cuBLASLt epilogue), with bias and with bias then GELU, against matmul, add and GELU as
    // separate f32 ops.
    let w = (randn(&[4 * cfg.hidden_size, cfg.hidden_size])? / (cfg.hidden_size as f64).sqrt())?;
    let b = randn(&[4 * cfg.hidden_size])?;
    let x32 = randn(&[1, tokens, cfg.hidden_size])?;
    let layer = |dtype: DType, format: WeightFormat, gemm: GemmKernel| {
        let how = Projections { format, gemm };
        Dense::from_parts(w.to_dtype(dtype)?, Some(b.to_dtype(dtype)?), how)
    };
    let x = cast(&x32)?;
    let full = layer(dtype, WeightFormat::Full, GemmKernel::Plain)?.forward(&x)?;
    let fp8 = layer(dtype, WeightFormat::Fp8, GemmKernel::Auto)?.forward(&x)?;
    out.push(compare("fp8_linear_vs_full", &fp8, &full, FP8_TOLERANCE)?);
    // An image's FP8 result does not depend on the other images of its batch (activations
    // are quantized per image), even next to one with ten times its range.
    let fp8_layer = layer(dtype, WeightFormat::Fp8, GemmKernel::Auto)?;
    let pair = Tensor::cat(&[&x, &(&x * 10.0)?], 0)?;
    let in_pair = fp8_layer.forward(&pair)?.narrow(0, 0, 1)?;
    out.push(compare(
        "fp8_batch_independent",
        &in_pair,
        &fp8_layer.forward(&x)?,
        1e-6,
    )?);
    // Per-row FP8 (`model.fp8_scale = "row"`): the model and one projection against full
    // precision, then an input quantized from two parts where they lie (the single block's
    // linear2) against the same input joined first: equal by construction. On a GPU whose
    // cuBLASLt refuses per-row scales the layers fall back to per-tensor, and the names say so.
    let rows_name = |base: &str| match WeightFormat::Fp8Rows.on(device) {
        WeightFormat::Fp8Rows => base.to_string(),
        _ => format!("{base}_fell_back_to_tensor"),
    };
    let rows_model = load(WeightFormat::Fp8Rows)?;
    let fast_rows = rows_model.forward(&s.img, &s.img_ids, &s.txt, &s.txt_ids, &t, &s.vec, g)?;
    out.push(compare(
        &rows_name("model_fp8_rows_vs_full"),
        &fast_rows,
        &fast,
        FP8_TOLERANCE,
    )?);
    let rows_layer = layer(dtype, WeightFormat::Fp8Rows, GemmKernel::Auto)?;
    let rows_out = rows_layer.forward(&x)?;
    out.push(compare(
        &rows_name("fp8_rows_linear_vs_full"),
        &rows_out,
        &full,
        FP8_TOLERANCE,
    )?);
    // Two parts of x, as the single block's linear2 gets attention output and MLP hidden.
    let split = cfg.hidden_size / 4;
    let x_parts = [
        x.narrow(2, 0, split)?.contiguous()?,
        x.narrow(2, split, cfg.hidden_size - split)?.contiguous()?,
    ];
    let from_parts = rows_layer.apply(
        &rows_layer.prepare(&[&x_parts[0], &x_parts[1]])?,
        Activation::Identity,
    )?;
    out.push(compare(
        &rows_name("fp8_rows_joined_parts"),
        &from_parts,
        &rows_out,
        1e-6,
    )?);
    // The quantized input widened back to bf16 (the path of shapes cuBLASLt refuses with
    // per-row scales, `fp8_widen.rs`) against the input: e4m3's rounding only.
    // Then the projection on the widened rows against the FP8 GEMM on a shape it takes: the
    // same e4m3 numbers, the widened ones rounded to bf16 once.
    #[cfg(feature = "cuda")]
    if let (super::layers::ProjectionInput::Fp8Rows(q), Some((w, b))) =
        (rows_layer.prepare(&[&x])?, rows_layer.fp8_rows_parts())
    {
        out.push(compare(
            "fp8_rows_widened_vs_input",
            &q.widen()?,
            &x,
            FP8_TOLERANCE,
        )?);
        out.push(compare(
            "fp8_rows_widened_linear_vs_fp8",
            &super::fp8_rows_cuda::linear_widened(&q, w, b, Activation::Identity)?,
            &rows_out,
            tolerance,
        )?);
    }
    // The norm kernel quantizing its own output for a per-row FP8 projection, against its
    // bf16 output quantized afterwards: the prepared inputs (on CUDA the e4m3 bytes and row
    // scales) equal bit for bit.
    let fused = fast_mod.norm_scale_shift_for(&fast_norm, &x, &rows_layer)?;
    let unfused = rows_layer.prepare(&[&fast_mod.norm_scale_shift(&fast_norm, &x)?])?;
    let bytes = |input: &super::layers::ProjectionInput| -> Result<Tensor> {
        match input {
            #[cfg(feature = "cuda")]
            super::layers::ProjectionInput::Fp8Rows(q) => q.contents()?.to_dtype(DType::F32),
            other => other.tensor().to_dtype(DType::F32),
        }
    };
    out.push(compare(
        &rows_name("adaln_fp8_rows_fused"),
        &bytes(&fused)?,
        &bytes(&unfused)?,
        0.0,
    )?);
    let fast_layer = layer(dtype, WeightFormat::Full, GemmKernel::Auto)?;
    let plain_layer = layer(DType::F32, WeightFormat::Full, GemmKernel::Plain)?;
    for (name, act) in [
        ("gemm_bias", Activation::Identity),
        ("gemm_bias_gelu", Activation::GeluTanh),
    ] {
        let fast = fast_layer.forward_act(&x, act)?;
        let reference = plain_layer.forward_act(&x32, act)?;
        out.push(compare(name, &fast, &reference, tolerance)?);
    }
    // The same GEMMs fed a join's two parts unjoined (the single block's linear2): on CUDA in
    // bf16 one GEMM per part over its weight columns, the second accumulating, checked here
    // whether or not `HEADSHOT_SPLIT_GEMM` sends the model through it; elsewhere joined.
    for (name, act) in [
        ("gemm_bias_parts", Activation::Identity),
        ("gemm_bias_gelu_parts", Activation::GeluTanh),
    ] {
        let joined = || fast_layer.apply(&fast_layer.prepare(&[&x_parts[0], &x_parts[1]])?, act);
        #[cfg(feature = "cuda")]
        let (fast, name) = {
            let (w, b) = (w.to_dtype(dtype)?, b.to_dtype(dtype)?);
            if super::gemm_cuda::supports_parts(&x_parts[0], &x_parts[1], &w, &b) {
                let fast = super::gemm_cuda::linear_parts(&x_parts[0], &x_parts[1], &w, &b, act)?;
                (fast, name.to_string())
            } else if device.is_cuda() {
                // Named for the path it took, so a passing row cannot hide an untested one.
                (joined()?, format!("{name}_joined"))
            } else {
                (joined()?, name.to_string())
            }
        };
        #[cfg(not(feature = "cuda"))]
        let (fast, name) = (joined()?, name.to_string());
        let reference = plain_layer.forward_act(&x32, act)?;
        out.push(compare(&name, &fast, &reference, tolerance)?);
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() && dtype == DType::BF16 {
        // The implicit convolutions last: a kernel that faults leaves the CUDA context
        // unusable, and the results before it are still printed.
        // The wgmma kernel, never run on a GPU yet, after everything else.
        use super::conv_implicit_cuda::{Engine, Tile};
        use super::decoder::DecoderPaths;
        group_norms(device, tolerance, out)?;
        convolutions(device, tolerance, out)?;
        // cuDNN with tensor-core math and the fused norm, as `HEADSHOT_CONV=cudnn` runs it.
        #[cfg(feature = "cudnn")]
        let cudnn = DecoderPaths {
            fused_norm: true,
            conv_cudnn: true,
            ..DecoderPaths::default()
        };
        let small = DecoderCase::new(device, false, out)?;
        small.compare(DecoderPaths::all(), "", out)?;
        #[cfg(feature = "cudnn")]
        let cudnn_nhwc = DecoderPaths {
            conv_cudnn_nhwc: true,
            ..cudnn
        };
        #[cfg(feature = "cudnn")]
        small.compare_soft(cudnn, "_cudnn", out)?;
        #[cfg(feature = "cudnn")]
        small.compare_soft(cudnn_nhwc, "_cudnn_nhwc", out)?;
        let wide = DecoderCase::new(device, true, out)?;
        #[cfg(feature = "cudnn")]
        {
            wide.compare_soft(cudnn, "_cudnn", out)?;
            wide.compare_soft(cudnn_nhwc, "_cudnn_nhwc", out)?;
            // The prep pass with cuDNN convolving its image: no convolution kernel of ours.
            implicit_convolutions(device, tolerance, &[Engine::Cudnn], out)?;
            wide.compare_engine(Engine::Cudnn, out)?;
        }
        let kernels = [Engine::Kernel(Tile::Narrow), Engine::Kernel(Tile::Wide)];
        implicit_convolutions(device, tolerance, &kernels, out)?;
        for engine in kernels {
            wide.compare_engine(engine, out)?;
        }
        // The implicit kernel where it takes a convolution, cuDNN for the others.
        #[cfg(feature = "cudnn")]
        wide.compare(
            DecoderPaths {
                conv_implicit: true,
                ..cudnn
            },
            "_implicit_and_cudnn",
            out,
        )?;
        if Tile::Wgmma.runs_on(device) {
            let wgmma = Engine::Kernel(Tile::Wgmma);
            implicit_convolutions(device, tolerance, &[wgmma], out)?;
            wide.compare_engine(wgmma, out)?;
        }
    }
    Ok(())
}

/// `HEADSHOT_CHECK_ONLY=decoder_full`: FLUX's whole decoder (random weights) at the image
/// size of `shape`, in bf16 with each decoder path, against candle's ops in f32
/// (`decoder_full_bf16_cuda_paths*_vs_f32`). The small cases of the main `--check` cannot
/// show what only full sizes reach: grids over a thousand rows, cuDNN's picks for large
/// images, offsets near 32 bits. cuDNN's paths first, then ours, the Hopper kernel last (a
/// kernel that faults ends the process).
fn full_decoders(
    device: &Device,
    dtype: DType,
    shape: &CheckShape,
    out: &mut CheckLog,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() && dtype == DType::BF16 {
        use super::conv_implicit_cuda::{Engine, Tile};
        use super::decoder::DecoderPaths;
        let (gh, gw) = shape.image_tokens;
        let case = DecoderCase::build(
            device,
            candle_transformers::models::flux::autoencoder::Config::schnell(),
            [1, 16, 2 * gh, 2 * gw],
            "_full",
            out,
        )?;
        let fused = DecoderPaths {
            fused_norm: true,
            ..DecoderPaths::default()
        };
        case.compare(fused, "_fused_norm", out)?;
        #[cfg(feature = "cudnn")]
        {
            let cudnn = DecoderPaths {
                conv_cudnn: true,
                ..fused
            };
            case.compare_soft(cudnn, "_cudnn", out)?;
            let cudnn_nhwc = DecoderPaths {
                conv_cudnn_nhwc: true,
                ..cudnn
            };
            case.compare_soft(cudnn_nhwc, "_cudnn_nhwc", out)?;
            case.compare_engine(Engine::Cudnn, out)?;
        }
        for tile in [Tile::Narrow, Tile::Wide] {
            case.compare_engine(Engine::Kernel(tile), out)?;
        }
        if Tile::Wgmma.runs_on(device) {
            case.compare_engine(Engine::Kernel(Tile::Wgmma), out)?;
        }
        return Ok(());
    }
    let _ = (shape, out);
    candle_core::bail!(
        "HEADSHOT_CHECK_ONLY=decoder_full compares the decoder's CUDA paths: it needs a CUDA \
         device and bf16 (device {device:?}, dtype {dtype:?})"
    )
}

/// A whole (small) decoder, to decode with the CUDA paths as the pipeline runs them (every
/// norm with and without SiLU, the upsampling convolution, the attention block's 1×1
/// convolutions) against the same weights decoding in f32 with candle's ops. bf16 through a
/// dozen layers strays further than one op does, so the bound is set by candle's own ops in
/// bf16 on the same input: the fast paths may be at most twice as far off (and within 1e-2
/// in any case).
#[cfg(feature = "cuda")]
struct DecoderCase<'a> {
    device: &'a Device,
    cfg: candle_transformers::models::flux::autoencoder::Config,
    tensors: std::collections::HashMap<String, Tensor>,
    /// bf16, as the fast paths take them.
    latents: Tensor,
    reference: Tensor,
    bound: f64,
    /// Name part after `decoder`.
    tag: &'static str,
}

#[cfg(feature = "cuda")]
impl<'a> DecoderCase<'a> {
    /// The reference decode and the bound, pushing candle's bf16 ops against it as the
    /// baseline row. 16 latent channels. The small case: the two-level decoder at 32 and 64
    /// channels on 12x10 latents (pixel counts in multiples of 8, as the 1x1 GEMMs want),
    /// which takes the GEMM convolutions only. `implicit`: at 128 and 256 channels on 4x128
    /// latents (rows of 128, then 256 after the upsampling), where the implicit kernel takes
    /// every 3x3 convolution but conv_in and conv_out.
    fn new(device: &'a Device, implicit: bool, out: &mut CheckLog) -> Result<Self> {
        use super::decoder::two_level_config;
        if implicit {
            let cfg = candle_transformers::models::flux::autoencoder::Config {
                ch: 128,
                ..two_level_config()
            };
            Self::build(device, cfg, [1, 16, 4, 128], "_128ch", out)
        } else {
            Self::build(device, two_level_config(), [1, 16, 12, 10], "", out)
        }
    }

    /// A case of decoder `cfg` (random weights) on random latents `latent_dims`, named by
    /// `tag`: the f32 reference decode, and candle's bf16 ops against it as the baseline row.
    fn build(
        device: &'a Device,
        cfg: candle_transformers::models::flux::autoencoder::Config,
        latent_dims: [usize; 4],
        tag: &'static str,
        out: &mut CheckLog,
    ) -> Result<Self> {
        use super::decoder::{Decoder, DecoderPaths};
        // The decoder's weights only (the worker never loads the encoder).
        let tensors = crate::pipeline::demo::record(45, |vb| {
            Decoder::with_paths(&cfg, DecoderPaths::default(), vb)
        })?;
        let f32_latents = Rng::new(46).normal_tensor(&latent_dims, device)?;
        let mut case = Self {
            device,
            cfg,
            tensors,
            latents: bf16(&f32_latents)?,
            reference: Tensor::zeros(1, DType::F32, device)?,
            bound: BF16_TOLERANCE,
            tag,
        };
        case.reference = case.decode(DType::F32, DecoderPaths::default(), &f32_latents)?;
        let candle_ops = case.decode(DType::BF16, DecoderPaths::default(), &case.latents)?;
        let baseline = compare(
            &format!("decoder{tag}_bf16_candle_ops_vs_f32"),
            &candle_ops,
            &case.reference,
            0.1,
        )?;
        case.bound = (2.0 * baseline.max_rel_error).max(BF16_TOLERANCE);
        out.push(baseline);
        Ok(case)
    }

    /// `latents` decoded by this case's weights in `dtype` with `paths`.
    fn decode(
        &self,
        dtype: DType,
        paths: super::decoder::DecoderPaths,
        latents: &Tensor,
    ) -> Result<Tensor> {
        let vb = VarBuilder::from_tensors(self.tensors.clone(), dtype, self.device);
        super::decoder::Decoder::with_paths(&self.cfg, paths, vb)?.decode(latents)
    }

    /// [`DecoderCase::compare`] for paths only cuDNN adds to (no kernel of ours that could
    /// leave the context unusable): a decode that fails is a failed row, not the end of the
    /// checks.
    #[cfg(feature = "cudnn")]
    fn compare_soft(
        &self,
        paths: super::decoder::DecoderPaths,
        suffix: &str,
        out: &mut CheckLog,
    ) -> Result<()> {
        let name = format!("decoder{}_bf16_cuda_paths{suffix}_vs_f32", self.tag);
        let fast = self.decode(DType::BF16, paths, &self.latents);
        out.push(compare_or_fail(&name, fast, &self.reference, self.bound)?);
        Ok(())
    }

    /// The decode with `paths` in bf16 against the reference, as
    /// `decoder{tag}_bf16_cuda_paths{suffix}_vs_f32`.
    fn compare(
        &self,
        paths: super::decoder::DecoderPaths,
        suffix: &str,
        out: &mut CheckLog,
    ) -> Result<()> {
        let fast = self.decode(DType::BF16, paths, &self.latents)?;
        out.push(compare(
            &format!("decoder{}_bf16_cuda_paths{suffix}_vs_f32", self.tag),
            &fast,
            &self.reference,
            self.bound,
        )?);
        Ok(())
    }

    /// [`DecoderCase::compare`] with every path on and the implicit convolutions on
    /// `engine` (the wide tile only where rows reach 256).
    fn compare_engine(
        &self,
        engine: super::conv_implicit_cuda::Engine,
        out: &mut CheckLog,
    ) -> Result<()> {
        use super::conv_implicit_cuda::{Engine, Tile};
        let paths = super::decoder::DecoderPaths {
            conv_implicit_wide: engine == Engine::Kernel(Tile::Wide),
            conv_implicit_wgmma: engine == Engine::Kernel(Tile::Wgmma),
            #[cfg(feature = "cudnn")]
            conv_implicit_cudnn: engine == Engine::Cudnn,
            ..super::decoder::DecoderPaths::all()
        };
        match engine {
            Engine::Kernel(_) => self.compare(paths, engine.suffix(), out),
            #[cfg(feature = "cudnn")]
            Engine::Cudnn => self.compare_soft(paths, engine.suffix(), out),
        }
    }
}

/// The implicit-GEMM 3×3 convolution against candle's ops in f32: plain, with the group norm
/// and SiLU before it, through 2× upsampling, and with the residual added; two images in a
/// batch, widths that leave the last pixel block part-empty, two output-channel blocks; with
/// each of `tiles` (the wide one only on output rows at least 256 wide).
#[cfg(feature = "cuda")]
fn implicit_convolutions(
    device: &Device,
    tolerance: f64,
    engines: &[super::conv_implicit_cuda::Engine],
    out: &mut CheckLog,
) -> Result<()> {
    use super::conv_implicit_cuda::{
        Engine, InputNorm, Tile, conv3x3, takes_channels, weights_for,
    };
    use super::decoder::{EPS, GROUPS};
    let mut rng = Rng::new(47);
    let shapes = [
        (1, 128, 128, 16, 136, false, false, false),
        (2, 64, 256, 9, 16, true, false, true),
        (1, 256, 128, 12, 24, true, true, false),
        (1, 512, 512, 8, 8, false, true, true),
        (1, 128, 128, 6, 264, false, false, true),
        (2, 256, 256, 5, 136, true, true, true),
        // A source width of 12: the scalar prep kernel (the others take the vector one).
        (1, 128, 128, 6, 12, true, true, false),
        // conv_out's 3 output channels (only engines that take them: cuDNN).
        (1, 128, 3, 8, 16, true, false, false),
    ];
    let cases = engines
        .iter()
        .flat_map(|&engine| shapes.map(|shape| (engine, shape)));
    for (engine, (batch, cin, cout, h, w, norm, upsample, residual)) in cases {
        if engine == Engine::Kernel(Tile::Wide) && (w << usize::from(upsample)) < 256
            || !takes_channels(cin, cout, engine)
        {
            continue;
        }
        let x = bf16_values(&((rng.normal_tensor(&[batch, cin, h, w], device)? * 0.5)? + 0.3)?)?;
        let weight = bf16_values(
            &(rng.normal_tensor(&[cout, cin, 3, 3], device)? / ((9 * cin) as f64).sqrt())?,
        )?;
        let bias = bf16_values(&rng.normal_tensor(&[cout], device)?)?;
        let gamma = bf16_values(&(rng.normal_tensor(&[cin], device)? + 1.0)?)?;
        let beta = bf16_values(&rng.normal_tensor(&[cin], device)?)?;
        let up = usize::from(upsample);
        let skip = bf16_values(&rng.normal_tensor(&[batch, cout, h << up, w << up], device)?)?;
        let mut input = x.clone();
        if norm {
            let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), cin, GROUPS, EPS)?;
            input = candle_core::Module::forward(&gn, &input)?.silu()?;
        }
        if upsample {
            input = input.upsample_nearest2d(h << 1, w << 1)?;
        }
        let mut reference = input
            .conv2d(&weight, 1, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
        if residual {
            reference = (reference + &skip)?;
        }
        let input_norm = InputNorm {
            weight: bf16(&gamma)?,
            bias: bf16(&beta)?,
            groups: GROUPS,
            eps: EPS as f32,
            silu: true,
        };
        let skip = bf16(&skip)?;
        let fast = conv3x3(
            &bf16(&x)?,
            &weights_for(engine, &weight)?,
            &bf16(&bias)?,
            norm.then_some(&input_norm),
            upsample,
            residual.then_some(&skip),
            engine,
        );
        let name = format!(
            "conv3x3_implicit{}_cuda_{batch}x{cin}x{h}x{w}_to_{cout}{}{}{}",
            engine.suffix(),
            if norm { "_norm_silu" } else { "" },
            if upsample { "_upsampled" } else { "" },
            if residual { "_residual" } else { "" },
        );
        // An error of our kernels ends the checks (a fault leaves the context unusable);
        // cuDNN's is a failed row.
        out.push(match engine {
            Engine::Kernel(_) => compare(&name, &fast?, &reference, tolerance)?,
            #[cfg(feature = "cudnn")]
            Engine::Cudnn => compare_or_fail(&name, fast, &reference, tolerance)?,
        });
    }
    Ok(())
}

/// The decoder's convolutions as GEMMs (and 3×3 ones through 2× upsampling) against candle's
/// convolution in f32.
#[cfg(feature = "cuda")]
fn convolutions(device: &Device, tolerance: f64, out: &mut CheckLog) -> Result<()> {
    use super::conv_gemm_cuda::{conv2d, upsample_conv2d};
    use super::decoder::gemm_taps;
    let mut rng = Rng::new(44);
    // Shapes the decoder has: conv_in (16 channels in), conv_out (3 out), a channel change,
    // 1x1 shortcuts (one with a batch of two), and widths that need row padding.
    for (batch, cin, cout, size, h, w) in [
        (1, 64, 64, 3, 13, 21),
        (1, 128, 64, 3, 32, 30),
        (1, 16, 64, 3, 12, 10),
        (1, 64, 3, 3, 20, 18),
        (1, 64, 32, 1, 16, 12),
        (2, 32, 48, 1, 8, 10),
        (2, 32, 32, 3, 9, 16),
    ] {
        let x = bf16_values(&rng.normal_tensor(&[batch, cin, h, w], device)?)?;
        let weight = bf16_values(
            &(rng.normal_tensor(&[cout, cin, size, size], device)?
                / ((cin * size * size) as f64).sqrt())?,
        )?;
        let bias = bf16_values(&rng.normal_tensor(&[cout], device)?)?;
        let reference = x
            .conv2d(&weight, size / 2, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
        let fast = conv2d(&bf16(&x)?, &gemm_taps(&weight)?, &bf16(&bias)?)?;
        let name = format!("conv{size}x{size}_gemm_cuda_{batch}x{cin}x{h}x{w}_to_{cout}");
        out.push(compare(&name, &fast, &reference, tolerance)?);
        #[cfg(feature = "cudnn")]
        cudnn_convolution(&x, &weight, &bias, &reference, tolerance, out)?;
        if size == 3 {
            let reference = x
                .upsample_nearest2d(2 * h, 2 * w)?
                .conv2d(&weight, 1, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            let fast = upsample_conv2d(&bf16(&x)?, &gemm_taps(&weight)?, &bf16(&bias)?)?;
            let name = format!("upsample_{name}");
            out.push(compare(&name, &fast, &reference, tolerance)?);
        }
    }
    Ok(())
}

/// The cuDNN path with tensor-core math (`HEADSHOT_CONV=cudnn`, `cudnn_nhwc`) on `x` (f32
/// holding bf16 values) against `reference`, candle's f32 convolution plus `bias`, in each
/// layout: with cuDNN's heuristic pick, then with each algorithm `--ops` times (named for
/// it; one cuDNN refuses for the shape is skipped, since the path itself never asks for it).
#[cfg(feature = "cudnn")]
fn cudnn_convolution(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    reference: &Tensor,
    tolerance: f64,
    out: &mut CheckLog,
) -> Result<()> {
    use super::conv_cudnn_cuda::{
        ALGORITHMS, CudnnLayout, algorithm_name, conv2d, conv2d_bias, supports, takes_epilogue,
        weights_for,
    };
    let (x, b) = (bf16(x)?, bf16(bias)?);
    let (batch, cin, h, wd) = x.dims4()?;
    let (cout, _, size, _) = weight.dims4()?;
    let with_bias = |y: Tensor| y.broadcast_add(&b.reshape((1, cout, 1, 1))?);
    // The epilogue's residual, and the reference with it added.
    let skip = bf16_values(&Rng::new(48).normal_tensor(&[batch, cout, h, wd], x.device())?)?;
    let with_skip = (reference + &skip)?;
    let skip = bf16(&skip)?;
    for layout in [CudnnLayout::Nchw, CudnnLayout::Nhwc] {
        let w = weights_for(layout, weight)?;
        let name = format!(
            "conv{size}x{size}_cudnn{}_cuda_{batch}x{cin}x{h}x{wd}_to_{cout}",
            layout.suffix()
        );
        let fast = if supports(&x, &w, layout) {
            conv2d(&x, &w, layout, None).and_then(with_bias)
        } else {
            Err(candle_core::Error::Msg(
                "the cuDNN path does not take the shape".into(),
            ))
        };
        out.push(compare_or_fail(&name, fast, reference, tolerance)?);
        // The bias and residual added in one pass after cuDNN (what the decoder runs).
        if supports(&x, &w, layout) && takes_epilogue(&x, cout, Some(&skip)) {
            let fast = conv2d_bias(&x, &w, &b, Some(&skip), layout);
            let name = format!("{name}_bias_residual");
            out.push(compare_or_fail(&name, fast, &with_skip, tolerance)?);
        }
        for algorithm in ALGORITHMS {
            if let Ok(y) = conv2d(&x, &w, layout, Some(algorithm)) {
                let tag = algorithm_name(algorithm);
                out.push(compare(
                    &format!("{name}_{tag}"),
                    &with_bias(y)?,
                    reference,
                    tolerance,
                )?);
            }
        }
    }
    Ok(())
}

/// `t` (f32) rounded to bf16 and back: inputs a bf16 kernel and its f32 reference share.
#[cfg(feature = "cuda")]
fn bf16_values(t: &Tensor) -> Result<Tensor> {
    bf16(t)?.to_dtype(DType::F32)
}

/// `t` in bf16, as the CUDA kernels take it.
#[cfg(feature = "cuda")]
fn bf16(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)
}

/// The decoder's fused group norm (+ SiLU) against candle's group norm in f32: a group that
/// fits one block's chunk and one split over several, on activations whose mean is far from
/// zero (where a sum-of-squares variance loses precision first).
#[cfg(feature = "cuda")]
fn group_norms(device: &Device, tolerance: f64, out: &mut CheckLog) -> Result<()> {
    use super::decoder::{EPS, GROUPS};
    use super::group_norm_cuda::group_norm;
    let mut rng = Rng::new(43);
    for dims in [[2, 64, 12, 10], [1, 128, 64, 66]] {
        let c = dims[1];
        // Mean 40 times the spread: a variance from plain sums of x and x² would be off.
        // Inputs rounded to bf16 first, so the reference sees what the kernel sees.
        let x = bf16_values(&((rng.normal_tensor(&dims, device)? * 0.5)? + 20.0)?)?;
        let weight = bf16_values(&(rng.normal_tensor(&[c], device)? + 1.0)?)?;
        let bias = bf16_values(&rng.normal_tensor(&[c], device)?)?;
        let norm = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, GROUPS, EPS)?;
        let reference = candle_core::Module::forward(&norm, &x)?;
        for silu in [false, true] {
            let fast = group_norm(
                &bf16(&x)?,
                &bf16(&weight)?,
                &bf16(&bias)?,
                GROUPS,
                EPS as f32,
                silu,
            )?;
            let want = if silu {
                reference.silu()?
            } else {
                reference.clone()
            };
            let name = format!(
                "group_norm{}_cuda_{}",
                if silu { "_silu" } else { "" },
                dims.map(|d| d.to_string()).join("x")
            );
            out.push(compare(&name, &fast, &want, tolerance)?);
        }
    }
    Ok(())
}

/// Every CUDA attention kernel on the full token count, and again on a count that is no
/// multiple of any block size, so the masked tail of the last key tile and the partial last
/// query block are compared too.
#[cfg(feature = "cuda")]
fn cuda_kernels(
    qkv: &[Tensor],
    reference: &Tensor,
    tolerance: f64,
    out: &mut CheckLog,
) -> Result<()> {
    use super::flash_cuda::{FlashKernel, attention_with};
    let tokens = qkv[0].dim(1)?;
    let ragged = tokens.saturating_sub(37).max(1);
    let cut: Vec<Tensor> = qkv
        .iter()
        .map(|t| t.narrow(1, 0, ragged))
        .collect::<Result<_>>()?;
    let cut_reference = plain(&cut[0], &cut[1], &cut[2])?;
    // Two images of different content in one batch.
    let pair = |a: usize, b: usize| Tensor::cat(&[&qkv[a], &qkv[b]], 0);
    let batch = [pair(0, 1)?, pair(1, 2)?, pair(2, 0)?];
    let batch_reference = plain(&batch[0], &batch[1], &batch[2])?;
    // Keys near the end scaled 4×: most rows' maximum jumps by ~11 (log2 units) after most of
    // the tiles, past a lazy softmax's 2⁸ slack (random keys alone move it less after the
    // first tile), while the earlier keys keep about a quarter of the weight, so a wrong
    // rescale factor shows. At the ragged length, so the last tile is masked too. The
    // reference takes the same bf16-rounded inputs: peaked scores magnify input rounding.
    let late = ragged.min(100);
    let peaked_k = Tensor::cat(
        &[
            qkv[1].narrow(1, 0, ragged - late)?,
            (qkv[1].narrow(1, ragged - late, late)? * 4.0)?,
        ],
        1,
    )?;
    let peak_inputs = [
        bf16_values(&cut[0])?,
        bf16_values(&peaked_k)?,
        bf16_values(&cut[2])?,
    ];
    let peak_reference = plain(&peak_inputs[0], &peak_inputs[1], &peak_inputs[2])?;
    for kernel in FlashKernel::usable(qkv[0].device())? {
        let fast = attention_with(
            kernel,
            &bf16(&batch[0])?,
            &bf16(&batch[1])?,
            &bf16(&batch[2])?,
        )?;
        let name = format!("attention_cuda_{}_batch_2", kernel.name());
        out.push(compare(&name, &fast, &batch_reference, tolerance)?);
        let fast = attention_with(kernel, &bf16(&qkv[0])?, &bf16(&qkv[1])?, &bf16(&qkv[2])?)?;
        let name = format!("attention_cuda_{}", kernel.name());
        out.push(compare(&name, &fast, reference, tolerance)?);
        let fast = attention_with(kernel, &bf16(&cut[0])?, &bf16(&cut[1])?, &bf16(&cut[2])?)?;
        let name = format!("attention_cuda_{}_{ragged}_tokens", kernel.name());
        out.push(compare(&name, &fast, &cut_reference, tolerance)?);
        let fast = attention_with(
            kernel,
            &bf16(&peak_inputs[0])?,
            &bf16(&peak_inputs[1])?,
            &bf16(&peak_inputs[2])?,
        )?;
        let name = format!("attention_cuda_{}_{ragged}_tokens_late_peak", kernel.name());
        out.push(compare(&name, &fast, &peak_reference, tolerance)?);
    }
    Ok(())
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
                        "adaln_norm_modulate",
                        "adaln_gated_residual",
                        "rope",
                        "norm_rope_q",
                        "norm_rope_k",
                        "joined_v",
                        "model_vs_stock_f32",
                        "model_fp8_vs_full",
                        "fp8_linear_vs_full",
                        "fp8_batch_independent",
                        "model_fp8_rows_vs_full",
                        "fp8_rows_linear_vs_full",
                        "fp8_rows_joined_parts",
                        "adaln_fp8_rows_fused",
                        "gemm_bias",
                        "gemm_bias_gelu",
                        "gemm_bias_parts",
                        "gemm_bias_gelu_parts"
                    ]
                );
                for r in &results {
                    let against_full = r.name.contains("fp8") && r.name.ends_with("full");
                    let bound = match r.name.as_str() {
                        "fp8_batch_independent" | "fp8_rows_joined_parts" => 1e-6,
                        "adaln_fp8_rows_fused" => 0.0,
                        _ if against_full => FP8_TOLERANCE,
                        _ => tolerance,
                    };
                    assert_eq!(r.tolerance, bound, "{r:?}");
                    assert!(r.passes(), "{variant} {dtype:?}: {r:?}");
                    // FP8 really quantizes: it is not bit-identical to full precision.
                    if against_full {
                        assert!(r.max_rel_error > 1e-3, "{r:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_log_reports_each_comparison_as_it_is_pushed() {
        let a = Tensor::new(&[1f32, 2.0], &Device::Cpu).expect("a");
        let mut seen = Vec::new();
        let results = {
            let mut log = CheckLog::new(|r: &CheckResult| seen.push(r.name.clone()));
            log.push(compare("first", &a, &a, 1e-2).expect("compare"));
            log.push(compare("second", &a, &a, 1e-2).expect("compare"));
            assert_eq!(log.results().len(), 2);
            log.into_results()
        };
        assert_eq!(seen, ["first", "second"]);
        assert_eq!(results[1].name, "second");
    }

    #[test]
    fn a_wrong_fast_path_is_caught() {
        let a = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).expect("a");
        let b = Tensor::new(&[1f32, 2.0, 3.1], &Device::Cpu).expect("b");
        let r = compare("x", &a, &b, 1e-2).expect("compare");
        assert!(!r.passes(), "{r:?}");
        // A failure says where its wrong values lie; a pass carries no such line.
        let mismatch = r.mismatch.as_deref().unwrap_or_default();
        assert!(
            mismatch.starts_with("1 of 3 values") && mismatch.contains("worst at [2]"),
            "{mismatch}"
        );
        assert!(
            compare("same", &a, &a, 1e-2)
                .expect("compare")
                .mismatch
                .is_none()
        );
        let nan = Tensor::new(&[f32::NAN, 2.0, 3.0], &Device::Cpu).expect("nan");
        let r = compare("nan", &nan, &a, 1.0).expect("compare");
        assert!(r.non_finite && !r.passes());
        assert!(r.mismatch.is_some_and(|m| m.contains("worst at [0]: NaN")));
        // A fast path that returned an error is a failed row carrying the error.
        let refused = Err(candle_core::Error::Msg("CUDNN_STATUS_NOT_SUPPORTED".into()));
        let r = compare_or_fail("refused", refused, &a, 1e-2).expect("compare");
        assert!(!r.passes(), "{r:?}");
        assert!(
            r.mismatch
                .is_some_and(|m| m.contains("failed") && m.contains("NOT_SUPPORTED"))
        );
        let r = compare_or_fail("same", Ok(a.clone()), &a, 1e-2).expect("compare");
        assert!(r.passes(), "{r:?}");
    }
}
