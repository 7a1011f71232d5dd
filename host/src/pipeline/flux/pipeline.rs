//! The FLUX.1 text-to-image pipeline: T5 + CLIP conditioning, the rectified-flow transformer
//! stepped with Euler, the autoencoder decode, and PNG encoding.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::sampling;
use serde::Serialize;

use super::attention::AttentionKernel;
use super::decoder::Decoder;
use super::layers::{Fp8Scale, GemmKernel, WeightFormat};
use super::model::{FluxModel, ModelOptions};
use crate::config::Config;
use crate::pipeline::cache::LruCache;
use crate::pipeline::checkpoint::Checkpoint;
use crate::pipeline::device::{DTypeSpec, DeviceSpec, device_name};
use crate::pipeline::error::{GenerateError, LoadError, at};
use crate::pipeline::image;
use crate::pipeline::params::{GenerationParams, Limits, ResolvedParams};
use crate::pipeline::retry::retry_transient;
use crate::pipeline::rng::Rng;
use crate::pipeline::source::{ModelFiles, ModelSource};
use crate::pipeline::status::{ComponentStatus, PipelineStatus};
use crate::pipeline::text::{PromptEmbedding, TextEncoders};
use crate::pipeline::variant::Variant;

/// FLUX latents have 16 channels at 1/8 of the image size.
const LATENT_CHANNELS: usize = 16;

/// Everything needed to load a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the weights come from.
    pub source: ModelSource,
    /// FLUX variant.
    pub variant: Variant,
    /// Compute device.
    pub device: DeviceSpec,
    /// Compute dtype.
    pub dtype: DTypeSpec,
    /// Data folder (demo weights are written under it).
    pub data_dir: PathBuf,
    /// Request limits.
    pub limits: Limits,
    /// Prompt-embedding cache entries.
    pub embedding_cache_size: usize,
    /// Attempts in all for transient failures.
    pub load_attempts: u32,
    /// First wait between attempts.
    pub load_backoff: Duration,
    /// Attention kernel of the transformer.
    pub attention: AttentionKernel,
    /// FP8 weights for the transformer blocks' projections.
    pub fp8: bool,
    /// How FP8 weights and activations are scaled.
    pub fp8_scale: Fp8Scale,
    /// GEMM implementation of the blocks' projections.
    pub gemm: GemmKernel,
}

impl LoadOptions {
    /// The options a configuration describes.
    pub fn from_config(config: &Config) -> Self {
        let m = &config.model;
        Self {
            source: m.source.clone(),
            variant: m.variant,
            device: m.device,
            dtype: m.dtype,
            data_dir: config.data_dir.clone(),
            limits: m.limits(),
            embedding_cache_size: m.embedding_cache_size,
            load_attempts: m.load_attempts,
            load_backoff: Duration::from_millis(m.load_backoff_ms),
            attention: m.attention,
            fp8: m.fp8,
            fp8_scale: m.fp8_scale,
            gemm: m.gemm,
        }
    }
}

/// Reported after each denoising step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepProgress {
    /// Steps done (1-based).
    pub step: u32,
    /// Steps in all.
    pub total: u32,
    /// Time since generation began.
    pub elapsed_ms: f64,
}

/// Wall time of each stage of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTimings {
    /// Tokenize + T5 + CLIP (near zero on a cache hit).
    pub encode_ms: f64,
    /// All denoising steps.
    pub denoise_ms: f64,
    /// Each denoising step.
    pub step_ms: Vec<f64>,
    /// Autoencoder decode.
    pub decode_ms: f64,
    /// PNG encoding of every image.
    pub png_ms: f64,
    /// From call to return.
    pub total_ms: f64,
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// PNG bytes.
    pub png: Vec<u8>,
    /// The seed that reproduces this image on its own.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The images, in seed order.
    pub images: Vec<GeneratedImage>,
    /// The parameters as run (defaults filled, seed fixed).
    pub params: ResolvedParams,
    /// Stage timings.
    pub timings: StageTimings,
    /// Whether the prompt embedding came from the cache.
    pub embedding_cached: bool,
    /// Prompt tokens cut to fit T5's window.
    pub t5_truncated: usize,
    /// Prompt tokens cut to fit CLIP's window.
    pub clip_truncated: usize,
}

/// A loaded FLUX pipeline. Not `Sync`: it is owned by the one inference thread.
pub struct FluxPipeline {
    variant: Variant,
    device: Device,
    dtype: DType,
    limits: Limits,
    text: TextEncoders,
    transformer: FluxModel,
    decoder: Decoder,
    cache: LruCache<(String, Variant), PromptEmbedding>,
    source: String,
    location: String,
    components: Vec<ComponentStatus>,
    load_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl FluxPipeline {
    /// Loads every component, retrying transient failures with backoff.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        retry_transient(opts.load_attempts, opts.load_backoff, |_| {
            Self::load_once(opts)
        })
    }

    fn load_once(opts: &LoadOptions) -> Result<Self, LoadError> {
        let started = Instant::now();
        let device = opts.device.open()?;
        let dtype = opts.dtype.resolve(&device);
        let files = ModelFiles::resolve(&opts.source, &opts.data_dir)?;
        tracing::info!(source = %opts.source, location = %files.describe(), variant = %opts.variant,
            device = %device_name(&device), ?dtype, "loading FLUX pipeline");

        let (text, mut components) = TextEncoders::load(&files, dtype, &device)?;

        let tf_file = files.get(
            opts.variant.transformer_file(),
            &format!("the FLUX.1-{} transformer weights", opts.variant),
        )?;
        let tf = Checkpoint::open(
            vec![tf_file.clone()],
            "the FLUX.1 transformer (BFL tensor names)",
        )?;
        let tf_cfg = tf.flux_config()?;
        let wants_guidance = opts.variant.default_guidance().is_some();
        if tf_cfg.guidance_embed != wants_guidance {
            return Err(LoadError::Corrupt {
                file: tf_file,
                expected: format!("a FLUX.1-{} transformer", opts.variant),
                reason: if tf_cfg.guidance_embed {
                    "it has a guidance embedding (a FLUX.1-dev checkpoint); set model.variant = \"dev\"".into()
                } else {
                    "it has no guidance embedding (a FLUX.1-schnell checkpoint); set model.variant = \"schnell\"".into()
                },
            });
        }
        let (t5_dim, clip_dim) = text.dims();
        if tf_cfg.context_in_dim != t5_dim || tf_cfg.vec_in_dim != clip_dim {
            return Err(LoadError::Corrupt {
                file: tf_file,
                expected: format!(
                    "a transformer taking T5 width {t5_dim} and CLIP width {clip_dim}"
                ),
                reason: format!(
                    "it takes T5 width {} and CLIP width {}: the text encoders belong to another model",
                    tf_cfg.context_in_dim, tf_cfg.vec_in_dim
                ),
            });
        }
        let mut tf_status = ComponentStatus::of("transformer", &tf, dtype);
        let transformer = tf.build("FLUX transformer", dtype, &device, |vb| {
            let weights = WeightFormat::from_settings(opts.fp8, opts.fp8_scale);
            let options = ModelOptions::new(opts.attention, weights, opts.gemm);
            FluxModel::with_options(&tf_cfg, vb, options)
        })?;
        if opts.fp8 {
            // FP8 projections (and their scales) take less than the checkpoint estimate's
            // dtype size per parameter: report what is resident, for admission estimates and
            // /readyz.
            let size = transformer.projection_size();
            let as_dtype = (size.parameters * dtype.size_in_bytes()) as u64;
            tf_status.bytes = tf_status
                .bytes
                .saturating_sub(as_dtype.saturating_sub(size.bytes as u64));
        }
        components.push(tf_status);

        let ae = Checkpoint::open(
            vec![files.get("ae.safetensors", "the FLUX autoencoder weights")?],
            "the FLUX autoencoder (BFL tensor names)",
        )?;
        let ae_cfg = ae.autoencoder_config()?;
        // Only the decoder loads (a worker never encodes images): count what is resident.
        components.push(ComponentStatus::of_part(
            "autoencoder",
            &ae,
            super::decoder::PREFIX,
            dtype,
        ));
        let decoder = ae.build("FLUX autoencoder decoder", dtype, &device, |vb| {
            Decoder::new(&ae_cfg, vb)
        })?;

        let load_ms = ms(started.elapsed());
        tracing::info!(
            load_ms,
            attention = transformer.attention().name(),
            fp8 = opts.fp8,
            fp8_scale = ?opts.fp8_scale,
            "FLUX pipeline ready"
        );
        Ok(Self {
            variant: opts.variant,
            device,
            dtype,
            limits: opts.limits.clone(),
            text,
            transformer,
            decoder,
            cache: LruCache::new(opts.embedding_cache_size),
            source: opts.source.to_string(),
            location: files.describe(),
            components,
            load_ms,
        })
    }

    /// The variant this pipeline runs.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The device the pipeline runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Components, device, dtype, weight memory and cache figures.
    pub fn status(&self) -> PipelineStatus {
        PipelineStatus {
            variant: self.variant,
            source: self.source.clone(),
            location: self.location.clone(),
            device: device_name(&self.device),
            dtype: format!("{:?}", self.dtype).to_lowercase(),
            weight_bytes: self.components.iter().map(|c| c.bytes).sum(),
            components: self.components.clone(),
            load_ms: self.load_ms,
            embedding_cache: self.cache.status(),
        }
    }

    /// Drops cached embeddings (after a device error, or to free memory).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Generates `num_images` images for one prompt in one batch. `on_step` runs after every
    /// denoising step; returning `Break` cancels the generation.
    pub fn generate(
        &mut self,
        params: &GenerationParams,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        let started = Instant::now();
        let p = params.resolve(self.variant, &self.limits)?;
        let mut timings = StageTimings::default();

        let t = Instant::now();
        let key = (p.prompt.clone(), self.variant);
        let (embedding, cached) = match self.cache.get(&key) {
            Some(e) => (e, true),
            None => {
                let e = self.text.encode(
                    &p.prompt,
                    self.variant.t5_tokens(),
                    &self.device,
                    self.dtype,
                )?;
                self.cache.insert(key, e.clone());
                (e, false)
            }
        };
        timings.encode_ms = ms(t.elapsed());

        let t = Instant::now();
        let latents = self.denoise(&p, &embedding, started, &mut timings.step_ms, on_step)?;
        timings.denoise_ms = ms(t.elapsed());

        let t = Instant::now();
        let rgb = (|| {
            let decoded = self.decoder.decode(&latents)?;
            image::batch_to_rgb(&decoded)
        })()
        .map_err(at("decode"))?;
        drop(latents);
        timings.decode_ms = ms(t.elapsed());

        let t = Instant::now();
        let seeds = p.seeds();
        let mut images = Vec::with_capacity(rgb.len());
        for (pixels, seed) in rgb.iter().zip(seeds) {
            images.push(GeneratedImage {
                png: image::encode_png(pixels, p.width, p.height)?,
                seed,
                width: p.width,
                height: p.height,
            });
        }
        timings.png_ms = ms(t.elapsed());
        self.release();
        timings.total_ms = ms(started.elapsed());
        Ok(Generation {
            images,
            timings,
            embedding_cached: cached,
            t5_truncated: embedding.t5_truncated,
            clip_truncated: embedding.clip_truncated,
            params: p,
        })
    }

    /// Initial noise: each image's latents come from its own seed, on the CPU, so a seed gives
    /// the same image on any device and alone or in a batch.
    fn noise(&self, p: &ResolvedParams) -> candle_core::Result<Tensor> {
        let (h, w) = (p.height as usize / 8, p.width as usize / 8);
        let per = LATENT_CHANNELS * h * w;
        let mut values = Vec::with_capacity(per * p.num_images as usize);
        for seed in p.seeds() {
            values.extend(Rng::new(seed).normals(per));
        }
        Tensor::from_vec(
            values,
            (p.num_images as usize, LATENT_CHANNELS, h, w),
            &Device::Cpu,
        )?
        .to_dtype(self.dtype)?
        .to_device(&self.device)
    }

    fn denoise(
        &self,
        p: &ResolvedParams,
        emb: &PromptEmbedding,
        started: Instant,
        step_ms: &mut Vec<f64>,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor, GenerateError> {
        let stage = at("denoise");
        let prepared = (|| {
            let noise = self.noise(p)?;
            let state = sampling::State::new(&emb.t5, &emb.clip, &noise)?;
            let image_tokens = state.img.dim(1)?;
            let shift = self
                .variant
                .shifted_schedule()
                .then_some((image_tokens, 0.5, 1.15));
            let timesteps = sampling::get_schedule(p.steps as usize, shift);
            let batch = p.num_images as usize;
            let guidance = match p.guidance {
                Some(g) => Some(Tensor::full(g as f32, batch, &self.device)?),
                None => None,
            };
            // Positions are the same every step: one rotary table per generation.
            let rope = self.transformer.rope(&state.img_ids, &state.txt_ids)?;
            Ok((state, rope, timesteps, guidance))
        })();
        let (state, rope, timesteps, guidance) = prepared.map_err(stage)?;
        let batch = p.num_images as usize;
        let mut img = state.img.clone();
        for (i, window) in timesteps.windows(2).enumerate() {
            let t = Instant::now();
            let (t_curr, t_prev) = (window[0], window[1]);
            img = (|| {
                let t_vec = Tensor::full(t_curr as f32, batch, &self.device)?;
                let velocity = self.transformer.forward_with_rope(
                    &img,
                    &state.txt,
                    &rope,
                    &t_vec,
                    &state.vec,
                    guidance.as_ref(),
                )?;
                let next = (&img + (velocity * (t_prev - t_curr))?)?;
                self.device.synchronize()?;
                Ok(next)
            })()
            .map_err(at("denoise"))?;
            step_ms.push(ms(t.elapsed()));
            let progress = StepProgress {
                step: i as u32 + 1,
                total: p.steps,
                elapsed_ms: ms(started.elapsed()),
            };
            if on_step(progress).is_break() {
                drop(img);
                self.release();
                return Err(GenerateError::Cancelled {
                    completed: progress.step,
                    total: p.steps,
                });
            }
        }
        sampling::unpack(&img, p.height as usize, p.width as usize).map_err(at("denoise"))
    }

    /// Waits for queued device work so freed buffers are really released before the next job.
    fn release(&self) {
        if let Err(e) = self.device.synchronize() {
            tracing::warn!(error = %e, "device synchronize after generation failed");
        }
    }
}
