//! Whole-pipeline tests on the demo model: real safetensors on disk, the real loader, real
//! tokenizers, candle's FLUX code on the CPU.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use headshot_host::pipeline::demo::{demo_tensors, ensure_demo_weights, write_demo_weights};
use headshot_host::pipeline::device::{DTypeSpec, DeviceSpec};
use headshot_host::pipeline::flux::attention::AttentionKernel;
use headshot_host::pipeline::flux::decoder;
use headshot_host::pipeline::flux::layers::{Fp8Scale, GemmKernel};
use headshot_host::pipeline::{
    FluxPipeline, GenerateError, Generation, GenerationParams, Limits, LoadError, LoadOptions,
    ModelSource, StepProgress, Variant,
};

fn options(source: ModelSource, data_dir: &Path, variant: Variant) -> LoadOptions {
    LoadOptions {
        source,
        variant,
        device: DeviceSpec::Cpu,
        dtype: DTypeSpec::Auto,
        data_dir: data_dir.to_path_buf(),
        limits: Limits::default(),
        embedding_cache_size: 8,
        load_attempts: 3,
        load_backoff: Duration::from_millis(1),
        attention: AttentionKernel::Auto,
        fp8: false,
        fp8_scale: Fp8Scale::Tensor,
        gemm: GemmKernel::Auto,
    }
}

fn demo(data_dir: &Path, variant: Variant) -> FluxPipeline {
    FluxPipeline::load(&options(ModelSource::Demo, data_dir, variant)).expect("demo pipeline loads")
}

fn run(p: &mut FluxPipeline, params: &GenerationParams) -> Result<Generation, GenerateError> {
    p.generate(params, &mut |_| ControlFlow::Continue(()))
}

fn seeded(prompt: &str, seed: u64) -> GenerationParams {
    GenerationParams {
        seed: Some(seed),
        ..GenerationParams::new(prompt, 64, 64)
    }
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("valid PNG");
    (reader.info().width, reader.info().height)
}

#[test]
fn demo_weights_round_trip_through_safetensors_and_the_real_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("weights");
    std::fs::create_dir_all(&dir).unwrap();
    write_demo_weights(&dir).unwrap();
    // Every tensor on disk equals the one generated in memory from the same seed.
    for (rel, tensors) in demo_tensors().unwrap() {
        let on_disk =
            candle_core::safetensors::load(dir.join(rel), &candle_core::Device::Cpu).unwrap();
        assert_eq!(on_disk.len(), tensors.len(), "{rel}");
        for (name, t) in &tensors {
            let d = &on_disk[name];
            assert_eq!(d.dims(), t.dims(), "{rel}:{name}");
            let diff = (d - t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{rel}:{name}");
        }
    }
    // The folder loads as a plain `dir:` source, through the loader real weights use.
    let mut p = FluxPipeline::load(&options(
        ModelSource::Dir(dir.clone()),
        tmp.path(),
        Variant::Schnell,
    ))
    .unwrap();
    let g = run(&mut p, &seeded("a founder in a navy blazer", 1)).unwrap();
    assert_eq!(png_size(&g.images[0].png), (64, 64));
    let status = p.status();
    let names: Vec<_> = status.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["t5", "clip", "transformer", "autoencoder"]);
    assert_eq!(status.device, "cpu");
    assert_eq!(status.dtype, "f32");
    assert_eq!(
        status.weight_bytes,
        status.components.iter().map(|c| c.bytes).sum::<u64>()
    );
    assert!(status.weight_bytes > 1_000_000);
    // Only the autoencoder's decoder loads, and only it is counted.
    let ae = status
        .components
        .iter()
        .find(|c| c.name == "autoencoder")
        .unwrap();
    let (_, ae_tensors) = demo_tensors()
        .unwrap()
        .into_iter()
        .find(|(rel, _)| *rel == "ae.safetensors")
        .unwrap();
    let parameters = |decoder_only: bool| -> u64 {
        ae_tensors
            .iter()
            .filter(|(name, _)| !decoder_only || name.starts_with(decoder::PREFIX))
            .map(|(_, t)| t.elem_count() as u64)
            .sum()
    };
    assert_eq!(ae.parameters, parameters(true));
    assert!(
        ae.parameters < parameters(false),
        "the encoder is not counted"
    );
    assert_eq!(ae.bytes, ae.parameters * 4, "f32");
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Schnell);
    let a = run(&mut p, &seeded("studio portrait", 42)).unwrap();
    let b = run(&mut p, &seeded("studio portrait", 42)).unwrap();
    let c = run(&mut p, &seeded("studio portrait", 43)).unwrap();
    assert_eq!(a.images[0].png, b.images[0].png);
    assert_ne!(a.images[0].png, c.images[0].png);
    assert_eq!((a.images[0].seed, c.images[0].seed), (42, 43));
    // A second pipeline (fresh process state) reproduces the image too.
    let mut q = demo(tmp.path(), Variant::Schnell);
    assert_eq!(
        run(&mut q, &seeded("studio portrait", 42)).unwrap().images[0].png,
        a.images[0].png
    );
}

fn pixels(png_bytes: &[u8]) -> Vec<u8> {
    let mut reader = png::Decoder::new(png_bytes).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// `model.attention = "fused"` runs the memory-bounded kernel and draws the same picture as
/// plain ops (f32 rounding may move a pixel by one level); `model.fp8` a close one.
#[test]
fn fused_attention_draws_the_same_image_and_fp8_a_close_one() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |attention| {
        FluxPipeline::load(&LoadOptions {
            attention,
            ..options(ModelSource::Demo, tmp.path(), Variant::Schnell)
        })
        .unwrap()
    };
    let params = GenerationParams {
        width: 128,
        height: 96,
        ..seeded("studio portrait", 7)
    };
    let mut plain_pipeline = load(AttentionKernel::Plain);
    let plain = run(&mut plain_pipeline, &params).unwrap();
    let fused = run(&mut load(AttentionKernel::Fused), &params).unwrap();
    let (a, b) = (pixels(&plain.images[0].png), pixels(&fused.images[0].png));
    assert_eq!(a.len(), 128 * 96 * 3);
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(worst <= 1, "pixels differ by up to {worst} levels");

    // FP8 weights change the picture slightly, not wholesale.
    let mut fp8 = FluxPipeline::load(&LoadOptions {
        fp8: true,
        ..options(ModelSource::Demo, tmp.path(), Variant::Schnell)
    })
    .unwrap();
    let c = pixels(&run(&mut fp8, &params).unwrap().images[0].png);
    // Its status reports the smaller resident transformer.
    let bytes = |p: &FluxPipeline| {
        let status = p.status();
        let tf = status
            .components
            .iter()
            .find(|c| c.name == "transformer")
            .unwrap();
        (tf.bytes, tf.parameters)
    };
    let (full_bytes, params_count) = bytes(&plain_pipeline);
    let (fp8_bytes, _) = bytes(&fp8);
    assert_eq!(full_bytes, params_count * 4, "demo weights load as f32");
    assert!(
        fp8_bytes < full_bytes * 6 / 10,
        "fp8 {fp8_bytes} vs f32 {full_bytes}"
    );
    let mean = |x: &[u8], y: &[u8]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| f64::from(p.abs_diff(*q)))
            .sum::<f64>()
            / x.len() as f64
    };
    let fp8_drift = mean(&a, &c);
    assert!(fp8_drift > 0.0, "FP8 weights should not be bit-identical");
    assert!(
        fp8_drift < 8.0,
        "FP8 moved pixels by {fp8_drift:.2} levels on average"
    );

    // Per-row scales (`model.fp8_scale = "row"`) reach the weights: another close picture,
    // not the per-tensor one, in the same one byte per weight (plus one scale per row).
    let mut rows = FluxPipeline::load(&LoadOptions {
        fp8: true,
        fp8_scale: Fp8Scale::Row,
        ..options(ModelSource::Demo, tmp.path(), Variant::Schnell)
    })
    .unwrap();
    let r = pixels(&run(&mut rows, &params).unwrap().images[0].png);
    let row_drift = mean(&a, &r);
    assert!(
        row_drift > 0.0 && row_drift < 8.0,
        "per-row FP8 moved pixels by {row_drift:.2} levels on average"
    );
    assert_ne!(r, c, "per-row and per-tensor scales drew the same picture");
    let (row_bytes, _) = bytes(&rows);
    assert!(
        row_bytes < full_bytes * 6 / 10,
        "per-row fp8 {row_bytes} vs f32 {full_bytes}"
    );
    // The same bytes per value as per-tensor, plus one f32 scale per output channel.
    assert!(
        row_bytes > fp8_bytes && row_bytes - fp8_bytes < full_bytes / 100,
        "per-row fp8 {row_bytes} vs per-tensor {fp8_bytes}"
    );
}

#[test]
fn a_missing_seed_is_drawn_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Schnell);
    let g = run(&mut p, &GenerationParams::new("casual photo", 64, 64)).unwrap();
    let seed = g.images[0].seed;
    assert_eq!(g.params.seed, seed);
    let again = run(&mut p, &seeded("casual photo", seed)).unwrap();
    assert_eq!(again.images[0].png, g.images[0].png);
}

#[test]
fn a_batch_of_two_gives_two_images_with_consecutive_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Schnell);
    let params = GenerationParams {
        num_images: 2,
        width: 96,
        height: 64,
        ..seeded("two founders", 10)
    };
    let g = run(&mut p, &params).unwrap();
    assert_eq!(g.images.len(), 2);
    assert_eq!((g.images[0].seed, g.images[1].seed), (10, 11));
    assert_ne!(g.images[0].png, g.images[1].png);
    for img in &g.images {
        assert_eq!(png_size(&img.png), (96, 64));
    }
    // The batch runs as one forward per step.
    assert_eq!(g.timings.step_ms.len(), 4);
}

#[test]
fn invalid_parameters_are_refused_naming_field_and_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Schnell);
    let base = seeded("x", 1);
    for (params, field, limit) in [
        (
            GenerationParams {
                width: 70,
                ..base.clone()
            },
            "width",
            "multiple of 16",
        ),
        (
            GenerationParams {
                height: 2048,
                ..base.clone()
            },
            "height",
            "1536",
        ),
        (
            GenerationParams {
                steps: Some(500),
                ..base.clone()
            },
            "steps",
            "between 1 and 50",
        ),
        (
            GenerationParams {
                num_images: 9,
                ..base.clone()
            },
            "num_images",
            "between 1 and 4",
        ),
    ] {
        match run(&mut p, &params) {
            Err(GenerateError::InvalidParam { field: f, message }) => {
                assert_eq!(f, field);
                assert!(message.contains(limit), "{field}: {message}");
            }
            other => panic!("{field}: expected InvalidParam, got {other:?}"),
        }
    }
    // The pipeline is unharmed.
    assert!(run(&mut p, &base).is_ok());
}

#[test]
fn dev_variant_runs_its_guidance_path() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Dev);
    let with = |g: f64| GenerationParams {
        guidance: Some(g),
        steps: Some(3),
        ..seeded("guided portrait", 5)
    };
    let low = run(&mut p, &with(1.0)).unwrap();
    let high = run(&mut p, &with(8.0)).unwrap();
    assert_eq!(low.params.guidance, Some(1.0));
    assert_ne!(
        low.images[0].png, high.images[0].png,
        "guidance must change the output"
    );
    let default = run(&mut p, &seeded("guided portrait", 5)).unwrap();
    assert_eq!(
        (default.params.steps, default.params.guidance),
        (28, Some(3.5))
    );
}

#[test]
fn schnell_weights_refused_as_dev() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ensure_demo_weights(tmp.path()).unwrap();
    std::fs::copy(
        dir.join("flux1-schnell.safetensors"),
        dir.join("flux1-dev.safetensors"),
    )
    .unwrap();
    let err = FluxPipeline::load(&options(ModelSource::Dir(dir), tmp.path(), Variant::Dev))
        .err()
        .expect("must refuse")
        .to_string();
    assert!(
        err.contains("flux1-dev.safetensors") && err.contains("variant = \"schnell\""),
        "{err}"
    );
}

#[test]
fn progress_is_reported_per_step_and_can_cancel() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Schnell);
    let mut seen = Vec::new();
    let g = p
        .generate(&seeded("p", 1), &mut |s: StepProgress| {
            seen.push((s.step, s.total));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert_eq!(g.timings.step_ms.len(), 4);
    let err = p
        .generate(&seeded("p", 1), &mut |s: StepProgress| {
            if s.step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            GenerateError::Cancelled {
                completed: 2,
                total: 4
            }
        ),
        "{err}"
    );
    assert!(run(&mut p, &seeded("p", 1)).is_ok());
}

#[test]
fn prompt_embeddings_are_cached_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Schnell);
    assert!(
        !run(&mut p, &seeded("cached prompt", 1))
            .unwrap()
            .embedding_cached
    );
    assert!(
        run(&mut p, &seeded("cached prompt", 2))
            .unwrap()
            .embedding_cached
    );
    assert!(
        !run(&mut p, &seeded("another prompt", 2))
            .unwrap()
            .embedding_cached
    );
    let s = p.status().embedding_cache;
    assert_eq!((s.entries, s.hits, s.misses), (2, 1, 2));
}

#[test]
fn long_prompts_are_cut_to_the_encoder_windows_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = demo(tmp.path(), Variant::Schnell);
    let long = "ab ".repeat(600);
    let g = run(&mut p, &seeded(long.trim(), 1)).unwrap();
    assert!(g.t5_truncated > 0 && g.clip_truncated > 0);
}

#[test]
fn truncated_safetensors_fails_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ensure_demo_weights(tmp.path()).unwrap();
    let ae = dir.join("ae.safetensors");
    let len = std::fs::metadata(&ae).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&ae).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let mut attempts = 0;
    let opts = options(ModelSource::Dir(dir), tmp.path(), Variant::Schnell);
    let err = headshot_host::pipeline::retry::retry_transient(3, Duration::from_millis(1), |_| {
        attempts += 1;
        FluxPipeline::load(&LoadOptions {
            load_attempts: 1,
            ..opts.clone()
        })
    })
    .err()
    .expect("must fail");
    assert!(matches!(err, LoadError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("ae.safetensors") && msg.contains("autoencoder"),
        "{msg}"
    );
    assert_eq!(attempts, 1, "a corrupt file is not retried");
}

#[test]
fn missing_tokenizer_fails_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ensure_demo_weights(tmp.path()).unwrap();
    std::fs::remove_file(dir.join("tokenizer_2/tokenizer.json")).unwrap();
    let err = FluxPipeline::load(&options(
        ModelSource::Dir(dir),
        tmp.path(),
        Variant::Schnell,
    ))
    .err()
    .expect("must fail");
    assert!(matches!(err, LoadError::Missing { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer_2/tokenizer.json") && msg.contains("T5 tokenizer"),
        "{msg}"
    );
}

#[test]
fn a_missing_transformer_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ensure_demo_weights(tmp.path()).unwrap();
    let path = dir.join("flux1-schnell.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    tensors.remove("final_layer.linear.weight").unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let msg = FluxPipeline::load(&options(
        ModelSource::Dir(dir),
        tmp.path(),
        Variant::Schnell,
    ))
    .err()
    .expect("must fail")
    .to_string();
    assert!(
        msg.contains("flux1-schnell.safetensors") && msg.contains("final_layer.linear"),
        "{msg}"
    );
}

#[test]
fn demo_weights_are_written_once_even_when_raced() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..4)
        .map(|_| {
            let root = tmp.path().to_path_buf();
            std::thread::spawn(move || ensure_demo_weights(&root).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(dirs.windows(2).all(|w| w[0] == w[1]));
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("demo-v1")]);
    demo(tmp.path(), Variant::Schnell);
}
