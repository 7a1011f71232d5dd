//! `headshot bench`: timing harnesses whose output lines (`RESULT name: median X ms`) compare by
//! name with the PyTorch/diffusers twin in `shared/gpu/flux_bench_torch.py`.

use std::io::Write;
use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::WithForward;
use candle_transformers::models::flux::autoencoder::{AutoEncoder, Config as AeConfig};

use crate::pipeline::flux::decoder::Decoder;
use candle_transformers::models::flux::model::{Config as FluxConfig, Flux};
use candle_transformers::models::flux::sampling;

use crate::pipeline::demo::{demo_ae_config, demo_flux_config};
use crate::pipeline::device::{DTypeSpec, DeviceSpec, device_name};
use crate::pipeline::flux::attention::AttentionKernel;
use crate::pipeline::flux::check::{self, CheckShape};
use crate::pipeline::flux::layers::{Fp8Scale, GemmKernel, WeightFormat};
use crate::pipeline::flux::model::{FluxModel, ModelOptions};
use crate::pipeline::flux::stage_profile;
use crate::pipeline::random_weights::RandomWeights;
use crate::pipeline::rng::Rng;
use crate::pipeline::{
    FluxPipeline, GenerateError, GenerationParams, LoadError, LoadOptions, Variant,
};

mod ops;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Loading the pipeline failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// Writing the report failed.
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    /// The options make no sense.
    #[error("{0}")]
    Usage(String),
}

/// Median of a sample (mean of the middle two for an even count); NaN when empty. The one
/// median of the `RESULT` lines and the rates derived from them.
pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

/// Median, min and max of a sample, in the twin's `RESULT` format.
pub fn result_line(name: &str, samples: &[f64]) -> String {
    let median = median(samples);
    // NaN.min(x) is x: an empty sample stays NaN, any other gives its extremes.
    let min = samples.iter().copied().fold(f64::NAN, f64::min);
    let max = samples.iter().copied().fold(f64::NAN, f64::max);
    format!(
        "RESULT {name}: median {median:.3} ms (min {min:.3}, max {max:.3}, n={})",
        samples.len()
    )
}

fn time_ms(
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<(f64, Tensor)> {
    let t = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((t.elapsed().as_secs_f64() * 1e3, out))
}

/// Runs `f` `warmup` times untimed and `iters` times timed, writes the `RESULT` line, and
/// returns the last output with the timed samples (ms).
fn timed(
    device: &Device,
    warmup: usize,
    iters: usize,
    out: &mut dyn Write,
    name: &str,
    f: &dyn Fn() -> candle_core::Result<Tensor>,
) -> Result<(Tensor, Vec<f64>), BenchError> {
    let mut last = None;
    for _ in 0..warmup {
        last = Some(time_ms(device, f)?.1);
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let (ms, o) = time_ms(device, f)?;
        samples.push(ms);
        last = Some(o);
    }
    writeln!(out, "{}", result_line(name, &samples))?;
    let last = last.ok_or_else(|| BenchError::Usage("no runs".into()))?;
    Ok((last, samples))
}

/// Options of `headshot bench gpu`.
#[derive(Debug, Clone)]
pub struct GpuBenchOptions {
    /// Tiny configs in f32 (a smoke test that runs on the CPU).
    pub tiny: bool,
    /// Device to run on.
    pub device: DeviceSpec,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// T5 tokens.
    pub txt_len: usize,
    /// Timed runs per figure.
    pub iters: usize,
    /// Untimed runs first.
    pub warmup: usize,
    /// Skip the autoencoder figure.
    pub skip_vae: bool,
    /// Time the autoencoder's decode alone (random latents; no transformer is built).
    pub vae_only: bool,
    /// Leave out candle's `AutoEncoder` decode, the baseline after ours.
    pub no_candle_vae: bool,
    /// Which transformer implementation is timed.
    pub model: ModelImpl,
    /// Attention kernel of the project's model.
    pub attention: AttentionKernel,
    /// Compare every fast path against plain ops instead of timing.
    pub check: bool,
    /// Activation dtype; `auto` is f32 for `--tiny` or on the CPU, bf16 on CUDA.
    pub dtype: DTypeSpec,
    /// FP8 e4m3 weights for the blocks' projections (our model only).
    pub fp8: bool,
    /// How FP8 weights and activations are scaled.
    pub fp8_scale: Fp8Scale,
    /// Time the model's ops one by one instead of whole steps.
    pub ops: bool,
    /// GEMM implementation of our model's projections.
    pub gemm: GemmKernel,
}

/// The transformer implementation a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelImpl {
    /// `pipeline::flux::FluxModel`, what the worker runs.
    Ours,
    /// candle-transformers' stock `models::flux`, the starting point, for ratios.
    Stock,
}

impl std::str::FromStr for ModelImpl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ours" => Ok(Self::Ours),
            "stock" => Ok(Self::Stock),
            other => Err(format!(
                "unknown model {other:?}: expected \"ours\" or \"stock\""
            )),
        }
    }
}

/// Full-size FLUX.1-schnell transformer and autoencoder with random bf16 weights (or tiny f32
/// ones): one step, four steps and one decode, like the diffusers twin.
pub fn gpu(opts: &GpuBenchOptions, out: &mut dyn Write) -> Result<(), BenchError> {
    if !opts.width.is_multiple_of(16) || !opts.height.is_multiple_of(16) || opts.iters == 0 {
        return Err(BenchError::Usage(
            "width and height must be multiples of 16 and iters at least 1".into(),
        ));
    }
    let device = opts.device.open()?;
    let dtype = match opts.dtype {
        DTypeSpec::Auto if opts.tiny || !device.is_cuda() => DType::F32,
        spec => spec.resolve(&device),
    };
    let (flux_cfg, ae_cfg) = if opts.tiny {
        (demo_flux_config(Variant::Schnell), demo_ae_config())
    } else {
        (FluxConfig::schnell(), AeConfig::schnell())
    };
    writeln!(
        out,
        "candle {} device {} dtype {dtype:?} {}x{} image tokens {} text tokens {}",
        if opts.tiny { "tiny" } else { "full" },
        device_name(&device),
        opts.height,
        opts.width,
        (opts.height / 16) * (opts.width / 16),
        opts.txt_len
    )?;

    if opts.check {
        return check(opts, &device, dtype, flux_cfg, out);
    }
    if opts.ops {
        return ops::run(opts, &device, dtype, &flux_cfg, out);
    }

    let latents = if opts.vae_only {
        // The decoder alone: random latents of the image's shape (the decode's time does not
        // depend on their values), without building the transformer.
        Rng::new(0)
            .normal_tensor(
                &[1, ae_cfg.z_channels, opts.height / 8, opts.width / 8],
                &device,
            )?
            .to_dtype(dtype)?
    } else {
        time_steps(opts, &device, dtype, &flux_cfg, out)?
    };
    if !opts.skip_vae {
        let t = Instant::now();
        let vb =
            VarBuilder::from_backend(Box::new(RandomWeights::on_device()), dtype, device.clone());
        let vae = Decoder::new(&ae_cfg, vb.clone())?;
        device.synchronize()?;
        writeln!(
            out,
            "RESULT build_vae: {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        )?;
        // The decoder the pipeline runs, then candle's autoencoder (random weights of its own:
        // the time does not depend on the values) as the baseline in the same process.
        let img = bench_figure(opts, &device, out, "vae_decode", &|| vae.decode(&latents))?;
        writeln!(out, "decoded image {:?}", img.dims())?;
        profile_figure(&device, out, "vae_decode", &|| vae.decode(&latents))?;
        drop(vae);
        if !opts.no_candle_vae {
            let stock = AutoEncoder::new(&ae_cfg, vb)?;
            bench_figure(opts, &device, out, "vae_decode_candle", &|| {
                stock.decode(&latents)
            })?;
        }
    }
    Ok(())
}

/// One more run of `pass` (a figure's), profiled ([`stage_profile::profile`]): `PROFILE
/// {figure}` lines with each stage's time, runs, output shape and share of the sum, slowest
/// first, then the sum, so a device session's figures say which part to work on next. The
/// device is synchronized at every stage (a launch's latency or so each): compare the sum
/// with the figure's median.
fn profile_figure(
    device: &Device,
    out: &mut dyn Write,
    figure: &str,
    pass: &dyn Fn() -> candle_core::Result<Tensor>,
) -> Result<(), BenchError> {
    let (_, mut stages) = stage_profile::profile(device, pass)?;
    let total: f64 = stages.iter().map(|s| s.ms).sum();
    let count = stages.len();
    stages.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    for s in &stages {
        let runs = if s.runs > 1 {
            format!(" x{}", s.runs)
        } else {
            String::new()
        };
        writeln!(
            out,
            "PROFILE {figure} {}{runs} {:?}: {:.2} ms ({:.0}%)",
            s.name,
            s.dims,
            s.ms,
            100.0 * s.ms / total.max(f64::MIN_POSITIVE)
        )?;
    }
    writeln!(out, "PROFILE {figure} sum of {count} stages: {total:.2} ms")?;
    Ok(())
}

/// One `RESULT` figure of `bench gpu`: [`timed`] with `opts`' warm-up and iterations, the
/// last run's output.
fn bench_figure(
    opts: &GpuBenchOptions,
    device: &Device,
    out: &mut dyn Write,
    name: &str,
    f: &dyn Fn() -> candle_core::Result<Tensor>,
) -> Result<Tensor, BenchError> {
    timed(device, opts.warmup, opts.iters, out, name, f).map(|(last, _)| last)
}

/// One step and four steps of the transformer `opts` picks, timed; the four steps' latents,
/// unpacked for the decoder.
fn time_steps(
    opts: &GpuBenchOptions,
    device: &Device,
    dtype: DType,
    flux_cfg: &FluxConfig,
    out: &mut dyn Write,
) -> Result<Tensor, BenchError> {
    let t = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights::on_device()), dtype, device.clone());
    let model: Box<dyn WithForward> = match opts.model {
        ModelImpl::Ours => {
            let weights = WeightFormat::from_settings(opts.fp8, opts.fp8_scale);
            let options = ModelOptions::new(opts.attention, weights, opts.gemm);
            let m = FluxModel::with_options(flux_cfg, vb, options)?;
            writeln!(
                out,
                "model: ours, attention {}, weights {:?}, gemm {:?}, block projections {:.1} MiB",
                m.attention().name(),
                options.weights.on(device),
                options.gemm,
                m.projection_size().bytes as f64 / (1u64 << 20) as f64
            )?;
            Box::new(m)
        }
        ModelImpl::Stock => {
            writeln!(out, "model: candle-transformers stock")?;
            Box::new(Flux::new(flux_cfg, vb)?)
        }
    };
    device.synchronize()?;
    writeln!(
        out,
        "RESULT build_transformer: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    )?;

    let mut rng = Rng::new(0);
    let mut randn = |shape: &[usize]| -> candle_core::Result<Tensor> {
        rng.normal_tensor(shape, device)?.to_dtype(dtype)
    };
    let noise = randn(&[1, 16, opts.height / 8, opts.width / 8])?;
    let txt = randn(&[1, opts.txt_len, flux_cfg.context_in_dim])?;
    let pooled = randn(&[1, flux_cfg.vec_in_dim])?;
    let state = sampling::State::new(&txt, &pooled, &noise)?;
    let forward = |x: &Tensor, t: f32| -> candle_core::Result<Tensor> {
        let tt = Tensor::full(t, 1, device)?;
        model.forward(
            x,
            &state.img_ids,
            &state.txt,
            &state.txt_ids,
            &tt,
            &state.vec,
            None,
        )
    };
    let four_steps = || -> candle_core::Result<Tensor> {
        let sigmas = [1.0f32, 0.75, 0.5, 0.25, 0.0];
        let mut x = state.img.clone();
        for w in sigmas.windows(2) {
            x = (&x + (forward(&x, w[0])? * f64::from(w[1] - w[0]))?)?;
        }
        Ok(x)
    };

    let bench = |out: &mut dyn Write, name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| {
        bench_figure(opts, device, out, name, f)
    };
    bench(out, "one_step", &|| forward(&state.img, 1.0))?;
    if opts.model == ModelImpl::Ours {
        profile_figure(device, out, "one_step", &|| forward(&state.img, 1.0))?;
    }
    let latents = bench(out, "four_steps", &four_steps)?;
    if let Some(mib) = crate::heap::proc_status_mib("VmHWM") {
        writeln!(out, "MEMORY peak resident after the steps: {mib:.0} MiB")?;
    }
    let latents = sampling::unpack(&latents, opts.height, opts.width)?;
    drop(state);
    drop(model);
    Ok(latents)
}

/// `--check`: every fast path against plain ops; an error when one is off by more than bf16
/// tolerance or is not finite.
fn check(
    opts: &GpuBenchOptions,
    device: &Device,
    dtype: DType,
    config: FluxConfig,
    out: &mut dyn Write,
) -> Result<(), BenchError> {
    let shape = CheckShape {
        config,
        image_tokens: (opts.height / 16, opts.width / 16),
        text_tokens: opts.txt_len,
    };
    // Each row is printed as its comparison completes: a run cut short (a fault, the device
    // call's time limit) keeps every row before it.
    let mut write_error = None;
    let (stopped, results) = {
        let mut log = check::CheckLog::new(|r: &check::CheckResult| {
            if write_error.is_none()
                && let Err(e) = write_check_row(out, r)
            {
                write_error = Some(e);
            }
        });
        let stopped = check::run_into(device, dtype, &shape, opts.attention, &mut log).err();
        (stopped, log.into_results())
    };
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passes())
        .map(|r| r.name.clone())
        .collect();
    if let Some(e) = stopped {
        // The comparisons before the failing op are reported above; this one could not run.
        writeln!(
            out,
            "CHECK stopped after {} comparisons: {e}",
            results.len()
        )?;
        return Err(e.into());
    }
    if failed.is_empty() {
        writeln!(
            out,
            "RESULT check: {} comparisons within their bounds",
            results.len()
        )?;
        Ok(())
    } else {
        Err(BenchError::Usage(format!(
            "check failed for {} (see the CHECK lines)",
            failed.join(", ")
        )))
    }
}

/// One comparison's `CHECK` line, and where it failed, the `CHECK … where:` line.
fn write_check_row(out: &mut dyn Write, r: &check::CheckResult) -> std::io::Result<()> {
    writeln!(
        out,
        "CHECK {}: max relative error {:.3e}{} (bound {:e}) {}",
        r.name,
        r.max_rel_error,
        if r.non_finite { ", NaN/inf" } else { "" },
        r.tolerance,
        if r.passes() { "ok" } else { "FAIL" }
    )?;
    if let Some(mismatch) = &r.mismatch {
        writeln!(out, "CHECK {} where: {mismatch}", r.name)?;
    }
    Ok(())
}

/// Options of `headshot bench demo`.
#[derive(Debug, Clone)]
pub struct DemoBenchOptions {
    /// How the pipeline loads (normally the demo source on the CPU).
    pub load: LoadOptions,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Images per generation.
    pub num_images: u32,
    /// Timed generations.
    pub iters: usize,
}

/// Per-stage timings of demo-model generations, so regressions in the pipeline's own code show.
pub fn demo(opts: &DemoBenchOptions, out: &mut dyn Write) -> Result<(), BenchError> {
    if opts.iters == 0 {
        // Medians of no samples would print as NaN.
        return Err(BenchError::Usage("iters must be at least 1".into()));
    }
    let t = Instant::now();
    let mut pipeline = FluxPipeline::load(&opts.load)?;
    let status = pipeline.status();
    writeln!(
        out,
        "demo pipeline: variant {} device {} dtype {} weights {} bytes, loaded in {:.1} ms ({:.1} ms in all, which includes writing the demo weights when they were not on disk yet)",
        status.variant,
        status.device,
        status.dtype,
        status.weight_bytes,
        status.load_ms,
        t.elapsed().as_secs_f64() * 1e3
    )?;
    let params = |prompt: String, seed: u64| GenerationParams {
        seed: Some(seed),
        num_images: opts.num_images,
        ..GenerationParams::new(prompt, opts.width, opts.height)
    };
    let mut none = |_| ControlFlow::Continue(());
    for i in 0..2 {
        pipeline.generate(&params(format!("warm-up {i}"), i), &mut none)?;
    }
    let mut encode_new = Vec::new();
    let mut encode_cached = Vec::new();
    let (mut step, mut decode, mut png, mut total, mut total_cached) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..opts.iters {
        let prompt = format!("portrait of founder number {i} in a navy blazer");
        let fresh = pipeline.generate(&params(prompt.clone(), i as u64), &mut none)?;
        let again = pipeline.generate(&params(prompt, i as u64 + 1), &mut none)?;
        encode_new.push(fresh.timings.encode_ms);
        encode_cached.push(again.timings.encode_ms);
        for g in [&fresh, &again] {
            step.extend(g.timings.step_ms.iter().copied());
            decode.push(g.timings.decode_ms);
            png.push(g.timings.png_ms);
        }
        total.push(fresh.timings.total_ms);
        total_cached.push(again.timings.total_ms);
    }
    let size = format!("{}x{}x{}", opts.width, opts.height, opts.num_images);
    for (name, samples) in [
        ("encode", &encode_new),
        ("encode_cached", &encode_cached),
        ("denoise_step", &step),
        ("decode", &decode),
        ("png", &png),
        ("total", &total),
        ("total_cached_prompt", &total_cached),
    ] {
        writeln!(
            out,
            "{}",
            result_line(&format!("demo_{name}_{size}"), samples)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_reports_median() {
        assert_eq!(
            result_line("x", &[3.0, 1.0, 2.0]),
            "RESULT x: median 2.000 ms (min 1.000, max 3.000, n=3)"
        );
        assert!(result_line("y", &[1.0, 2.0]).contains("median 1.500"));
    }
}
