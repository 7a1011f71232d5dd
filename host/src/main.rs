//! `headshot`: the command-line entry point.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

/// `println!` for command output that stops quietly when its reader has gone
/// (`headshot check | head -1`): Rust ignores SIGPIPE, and `println!` panicked on the closed
/// pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::print_line(format_args!($($arg)*))
    };
}

/// One line of command output (see [`outln!`]); other write errors are said on stderr.
fn print_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n"))
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing to stdout: {e}");
    }
}

mod check_cmd;
mod policy_cmd;
mod runpod_log;

use headshot_host::bench;
use headshot_host::config::Config;
use headshot_host::pipeline::device::DeviceSpec;
use headshot_host::pipeline::style::apply_style;
use headshot_host::pipeline::{FluxPipeline, GenerationParams, LoadOptions, ModelSource, Variant};

#[derive(Parser)]
#[command(
    name = "headshot",
    version,
    about = "AI headshot worker: FLUX on candle, fail-soft"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// TOML config file layered over the defaults (see config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data folder (demo weights, state, local images); overrides `data_dir`.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate headshot images from a prompt and write them as PNG files.
    Generate(GenerateArgs),
    /// Benchmarks (figures print as `RESULT name: median X ms`).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve the Runpod-compatible local API and the admin API.
    Serve(ServeArgs),
    /// Check the setup: config, model source, storage, GPU and memory; lists every problem.
    Check,
    /// Run as a Runpod serverless worker (job-take loop), or one job locally when
    /// RUNPOD_WEBHOOK_GET_JOB is unset (from --test-input or ./test_input.json).
    Worker(WorkerArgs),
    /// WebAssembly policies in the local state: test, list, push, activate, rollback.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Listen address; overrides server.host.
    #[arg(long)]
    host: Option<String>,
    /// Local API port (0 = any free port); overrides server.port.
    #[arg(long)]
    port: Option<u16>,
    /// Admin API port (0 = any free port); overrides server.admin_port.
    #[arg(long)]
    admin_port: Option<u16>,
}

#[derive(Args)]
struct WorkerArgs {
    /// Run this one job (`{"input": {...}}`) and exit: 0 when it completes, 1 when it fails.
    #[arg(long = "test-input", alias = "test_input", value_name = "JSON")]
    test_input: Option<String>,
    /// Serve the local API instead of taking jobs from Runpod (like the Python SDK's flag).
    #[arg(long = "rp_serve_api", alias = "rp-serve-api")]
    rp_serve_api: bool,
    /// Local API host with --rp_serve_api.
    #[arg(long = "rp_api_host", alias = "rp-api-host", requires = "rp_serve_api")]
    rp_api_host: Option<String>,
    /// Local API port with --rp_serve_api.
    #[arg(long = "rp_api_port", alias = "rp-api-port", requires = "rp_serve_api")]
    rp_api_port: Option<u16>,
    /// Admin API port with --rp_serve_api, which serves the admin API too (0 = any free
    /// port); overrides server.admin_port.
    #[arg(long = "admin-port", alias = "admin_port", requires = "rp_serve_api")]
    admin_port: Option<u16>,
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt, or the subject when --style is given.
    #[arg(long)]
    prompt: String,
    /// Named style template from the config (corporate, casual, studio, outdoor, …).
    #[arg(long)]
    style: Option<String>,
    /// Weight source: demo, hub:<repo>[@rev] or dir:<path>; overrides model.source.
    #[arg(long)]
    model: Option<String>,
    /// FLUX variant: schnell or dev; overrides model.variant.
    #[arg(long)]
    variant: Option<String>,
    /// Device: auto, cpu, cuda or cuda:N; overrides model.device.
    #[arg(long)]
    device: Option<String>,
    /// Image width in pixels (multiple of 16; default: model.default_width).
    #[arg(long)]
    width: Option<u32>,
    /// Image height in pixels (multiple of 16; default: model.default_height).
    #[arg(long)]
    height: Option<u32>,
    /// Denoising steps (default: 4 for schnell, 28 for dev).
    #[arg(long)]
    steps: Option<u32>,
    /// Guidance (dev only; default 3.5).
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed of the first image (random when absent; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Images to generate in one batch.
    #[arg(long, default_value_t = 1)]
    num_images: u32,
    /// Output folder for the PNG files.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Per-stage timings of the demo model (encode, step, decode, PNG).
    Demo {
        /// Timed generations (each also runs once more with a cached prompt).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 64)]
        width: u32,
        #[arg(long, default_value_t = 64)]
        height: u32,
        #[arg(long, default_value_t = 1)]
        num_images: u32,
    },
    /// Full-size FLUX.1-schnell transformer and autoencoder with random bf16 weights on the GPU.
    Gpu {
        /// Tiny f32 configs (runs anywhere; a smoke test of the harness).
        #[arg(long)]
        tiny: bool,
        /// Device: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        #[arg(long, default_value_t = 256)]
        txt_len: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long)]
        skip_vae: bool,
        /// Time the autoencoder's decode alone, on random latents (no transformer is built).
        #[arg(long, conflicts_with_all = ["skip_vae", "check", "ops"])]
        vae_only: bool,
        /// Leave out candle's `AutoEncoder` decode after ours (the same in every run; a
        /// device session times it once).
        #[arg(long, conflicts_with = "skip_vae")]
        no_candle_vae: bool,
        /// Transformer to time: "ours" (what the worker runs) or "stock" (candle-transformers).
        #[arg(long, default_value = "ours")]
        model: String,
        /// Attention kernel of our model: auto, plain or fused.
        #[arg(long, default_value = "auto")]
        attention: String,
        /// Compare every fast path with plain ops (max relative error) instead of timing.
        #[arg(long)]
        check: bool,
        /// Activation dtype: auto (f32 with --tiny or on the CPU, bf16 on CUDA), f32, bf16, f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// FP8 e4m3 weights for the transformer blocks' projections.
        #[arg(long)]
        fp8: bool,
        /// FP8 scaling with --fp8: row (per output channel and per token; on CUDA where
        /// cuBLASLt runs it, else tensor with a warning), tensor (one scale per tensor) or
        /// auto (row, the default).
        #[arg(long, default_value = "auto", requires = "fp8")]
        fp8_scale: String,
        /// Time the model's ops one by one (attention kernels, GEMMs, norms) instead of steps.
        #[arg(long, conflicts_with = "check")]
        ops: bool,
        /// GEMM of our model's projections: auto (cuBLASLt with fused bias/GELU on CUDA bf16)
        /// or plain (candle matmul, then separate ops).
        #[arg(long, default_value = "auto")]
        gemm: String,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // A malformed setting is said once logging is up, not dropped silently.
    let mut unheeded = Vec::new();
    let filter = match std::env::var("HEADSHOT_LOG") {
        Err(_) => EnvFilter::new("info"),
        Ok(raw) => EnvFilter::try_new(&raw).unwrap_or_else(|e| {
            unheeded.push(format!(
                "HEADSHOT_LOG `{raw}` is not a log filter ({e}); logging at info"
            ));
            EnvFilter::new("info")
        }),
    };
    let json = match std::env::var("HEADSHOT_LOG_FORMAT").ok().as_deref() {
        Some("json") => true,
        Some("pretty") => false,
        None => !std::io::stderr().is_terminal(),
        Some(other) => {
            unheeded.push(format!(
                "HEADSHOT_LOG_FORMAT `{other}` is neither json nor pretty; choosing by the terminal"
            ));
            !std::io::stderr().is_terminal()
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("RUNPOD_ENDPOINT_ID").is_ok_and(|v| !v.is_empty()) {
        builder.event_format(runpod_log::RunpodFormat).init();
    } else if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    for warning in unheeded {
        tracing::warn!("{warning}");
    }
}

fn load_config(common: &Common) -> Result<Config> {
    let mut config = Config::load(common.config.as_deref(), std::env::vars())?;
    if let Some(dir) = &common.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

fn generate(mut config: Config, args: GenerateArgs) -> Result<()> {
    if let Some(m) = &args.model {
        config.model.source = m
            .parse::<ModelSource>()
            .map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    }
    if let Some(v) = &args.variant {
        config.model.variant = v
            .parse::<Variant>()
            .map_err(|e| anyhow::anyhow!("--variant: {e}"))?;
    }
    if let Some(d) = &args.device {
        config.model.device = d
            .parse::<DeviceSpec>()
            .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    }
    config.validate()?;
    let prompt = apply_style(&config.styles, args.style.as_deref(), &args.prompt)?;
    let params = GenerationParams {
        prompt,
        width: args.width.unwrap_or(config.model.default_width),
        height: args.height.unwrap_or(config.model.default_height),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        num_images: args.num_images,
    };
    // Refuse bad parameters before spending time on loading weights.
    params.resolve(config.model.variant, &config.model.limits())?;

    let mut pipeline = FluxPipeline::load(&LoadOptions::from_config(&config))?;
    let mut on_step = |p: headshot_host::pipeline::StepProgress| {
        tracing::debug!(
            step = p.step,
            total = p.total,
            elapsed_ms = p.elapsed_ms,
            "denoising"
        );
        ControlFlow::Continue(())
    };
    let generation = pipeline.generate(&params, &mut on_step)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut written = Vec::new();
    for (i, img) in generation.images.iter().enumerate() {
        let path = args.out.join(format!("headshot-{}-{i}.png", img.seed));
        std::fs::write(&path, &img.png).with_context(|| format!("writing {}", path.display()))?;
        written.push((path, img));
    }
    let t = &generation.timings;
    if args.json {
        let summary = serde_json::json!({
            "images": written.iter().map(|(p, img)| serde_json::json!({
                "path": p, "seed": img.seed, "width": img.width, "height": img.height})).collect::<Vec<_>>(),
            "prompt": generation.params.prompt,
            "steps": generation.params.steps,
            "guidance": generation.params.guidance,
            "timings_ms": t,
            "model": pipeline.status(),
            "prompt_truncated_tokens": { "t5": generation.t5_truncated, "clip": generation.clip_truncated },
        });
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for (path, img) in &written {
            outln!(
                "wrote {} ({}x{}, seed {})",
                path.display(),
                img.width,
                img.height,
                img.seed
            );
        }
        if generation.t5_truncated + generation.clip_truncated > 0 {
            outln!(
                "note: the prompt is longer than the encoders' windows: {} T5 and {} CLIP tokens were cut",
                generation.t5_truncated,
                generation.clip_truncated
            );
        }
        let per_step = t.step_ms.iter().sum::<f64>() / t.step_ms.len().max(1) as f64;
        outln!(
            "timings: encode {:.1} ms, denoise {:.1} ms ({} steps, {:.1} ms/step), decode {:.1} ms, png {:.1} ms, total {:.1} ms",
            t.encode_ms,
            t.denoise_ms,
            t.step_ms.len(),
            per_step,
            t.decode_ms,
            t.png_ms,
            t.total_ms
        );
    }
    Ok(())
}

/// The multi-threaded Tokio runtime `serve` and `worker` run on.
fn async_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(mut config: Config, args: ServeArgs) -> Result<()> {
    if let Some(h) = args.host {
        config.server.host = h;
    }
    if let Some(p) = args.port {
        config.server.port = p;
    }
    if let Some(p) = args.admin_port {
        config.server.admin_port = p;
    }
    config.validate()?;
    async_runtime()?.block_on(async move {
        let running = headshot_host::ingress::server::start(config).await?;
        // One line on stdout that scripts (and tests) can read.
        outln!(
            "{}",
            serde_json::json!({
                "api": format!("http://{}", running.api_addr),
                "admin": format!("http://{}", running.admin_addr),
                "admin_token_file": running.admin_token_file,
            })
        );
        wait_for_shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        running.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })
}

fn worker(config: Config, args: WorkerArgs) -> Result<()> {
    use headshot_host::ingress::runpod::{RunpodEnv, Worker, WorkerOptions};
    if args.rp_serve_api {
        // Checked here, not as a clap conflict: a conflict would lift the other worker flags'
        // `requires = "rp_serve_api"`.
        if args.test_input.is_some() {
            bail!("--test-input runs one job and exits; it cannot be combined with --rp_serve_api");
        }
        let serve_args = ServeArgs {
            host: args.rp_api_host,
            port: args.rp_api_port,
            admin_port: args.admin_port,
        };
        return serve(config, serve_args);
    }
    let env = RunpodEnv::from_vars(|k| std::env::var(k).ok());
    if let Some(env) = &env {
        env.check().map_err(|e| anyhow::anyhow!(e))?;
    }
    // The local store's signed URLs are served by the local API, which this mode does not
    // run: a client would get links to nothing.
    if config.storage.backend == headshot_host::config::StorageBackend::Local
        && config.server.output == headshot_host::config::OutputMode::Url
    {
        tracing::warn!(
            base = %format!("http://{}:{}", config.server.host, config.server.port),
            "images go to the local folder and their URLs point at a local API that `headshot worker` does not serve; set storage.backend = \"supabase\" or server.output = \"base64\" for URLs or images a client can use"
        );
    }
    let one_shot = match (&args.test_input, &env) {
        (Some(text), _) => Some(text.clone()),
        (None, None) => match std::fs::read_to_string("test_input.json") {
            Ok(text) => Some(text),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                bail!("reading ./test_input.json: {e}");
            }
            Err(_) => {
                tracing::warn!("test_input.json not found, exiting.");
                bail!(
                    "RUNPOD_WEBHOOK_GET_JOB is unset and there is no --test-input or ./test_input.json"
                );
            }
        },
        (None, Some(_)) => None,
    };
    config.validate()?;
    async_runtime()?.block_on(async move {
        let (state, registry) = headshot_host::ingress::server::open_state(&config).await?;
        let base = format!("http://{}:{}", config.server.host, config.server.port);
        let service = headshot_host::ingress::server::open_service(config, &state, registry, base)?;
        if let Some(text) = one_shot {
            let job: serde_json::Value =
                serde_json::from_str(&text).context("the test input is not valid JSON")?;
            let Some(input) = job.get("input").cloned() else {
                bail!("the test input has no `input` field");
            };
            // A given id is an idempotency key like any other; without one, every run is new.
            let id = job
                .get("id")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| format!("local_test-{}", headshot_host::jobs::new_job_id()));
            let submitted = service.submit(Some(id.clone()), input).map_err(|e| {
                anyhow::anyhow!("{}", serde_json::to_string(&e).unwrap_or(e.message))
            })?;
            let id = submitted.record().id.clone();
            let record = service
                .wait(&id, std::time::Duration::from_secs(24 * 3600))
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            service.stop().await;
            let Some(record) = record else {
                bail!("job {id} vanished")
            };
            let result = match (&record.output, &record.error) {
                (Some(out), _) => serde_json::json!({ "output": out }),
                (None, Some(err)) => serde_json::json!({ "error": err }),
                (None, None) => serde_json::json!({ "status": record.status }),
            };
            outln!("{}", serde_json::to_string(&result)?);
            if record.status != headshot_host::state::JobStatus::Completed {
                bail!("job {id} ended {}", record.status.as_str());
            }
            return Ok(());
        }
        let Some(env) = env else {
            bail!("RUNPOD_WEBHOOK_GET_JOB is unset")
        };
        let worker = Worker::new(env, WorkerOptions::default(), service.clone())?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_shutdown_signal().await;
            tracing::info!("shutdown requested: no new jobs; finishing the one in flight");
            stop_tx.send_replace(true);
        });
        let exit = worker.run(stop_rx).await;
        service.stop().await;
        tracing::info!(?exit, "worker stopped");
        Ok::<(), anyhow::Error>(())
    })
}

async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> std::process::ExitCode {
    headshot_host::heap::tune_allocator();
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once. The library's errors put their cause in their
/// own message (`{0}`, `{source}`) so they read whole wherever they are shown; anyhow's `{:#}`
/// appends every cause again, which printed "(os error 2): No such file or directory (os
/// error 2)". A cause whose text the message already holds is left out.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    let config = load_config(&cli.common)?;
    match cli.command {
        Command::Generate(args) => generate(config, args),
        Command::Policy(cmd) => policy_cmd::run(&config, cmd),
        Command::Serve(args) => serve(config, args),
        Command::Check => check_cmd::run(&config),
        Command::Worker(args) => worker(config, args),
        Command::Bench(BenchCommand::Demo {
            iters,
            width,
            height,
            num_images,
        }) => {
            let mut load = LoadOptions::from_config(&config);
            load.source = ModelSource::Demo;
            let opts = bench::DemoBenchOptions {
                load,
                width,
                height,
                num_images,
                iters,
            };
            bench::demo(&opts, &mut std::io::stdout())?;
            Ok(())
        }
        Command::Bench(BenchCommand::Gpu {
            tiny,
            device,
            width,
            height,
            txt_len,
            iters,
            warmup,
            skip_vae,
            vae_only,
            no_candle_vae,
            model,
            attention,
            check,
            dtype,
            fp8,
            fp8_scale,
            ops,
            gemm,
        }) => {
            let fp8_scale = fp8_scale
                .parse::<headshot_host::pipeline::flux::layers::Fp8Scale>()
                .map_err(|e| anyhow::anyhow!("--fp8-scale: {e}"))?;
            let gemm = gemm
                .parse::<headshot_host::pipeline::flux::layers::GemmKernel>()
                .map_err(|e| anyhow::anyhow!("--gemm: {e}"))?;
            let dtype = dtype
                .parse::<headshot_host::pipeline::device::DTypeSpec>()
                .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
            let model = model
                .parse::<bench::ModelImpl>()
                .map_err(|e| anyhow::anyhow!("--model: {e}"))?;
            let attention = attention
                .parse::<headshot_host::pipeline::flux::attention::AttentionKernel>()
                .map_err(|e| anyhow::anyhow!("--attention: {e}"))?;
            let device = device
                .parse::<DeviceSpec>()
                .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
            let side = if tiny { 64 } else { 1024 };
            let opts = bench::GpuBenchOptions {
                tiny,
                device,
                width: width.unwrap_or(side),
                height: height.unwrap_or(side),
                txt_len: if tiny { txt_len.min(16) } else { txt_len },
                iters,
                warmup,
                skip_vae,
                vae_only,
                no_candle_vae,
                model,
                attention,
                check,
                dtype,
                fp8,
                fp8_scale,
                ops,
                gemm,
            };
            if !tiny && matches!(device, DeviceSpec::Cpu) {
                bail!(
                    "a full-size benchmark on the CPU would take hours; use --tiny or a CUDA device"
                );
            }
            bench::gpu(&opts, &mut std::io::stdout())?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("opening the state database: {0}")]
    struct Embeds(#[from] std::io::Error);

    #[test]
    fn each_cause_is_said_once_and_a_context_keeps_its_cause() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::from(Embeds(io()));
        assert_eq!(describe(&e), "opening the state database: no such file");
        let e = anyhow::Error::from(io()).context("reading weights");
        assert_eq!(describe(&e), "reading weights: no such file");
    }
}
