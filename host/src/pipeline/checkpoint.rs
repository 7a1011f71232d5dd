//! Safetensors checkpoints: opened with their headers checked, so a truncated or foreign file
//! fails fast naming the file; component configs read from the files themselves.
//!
//! The FLUX transformer and autoencoder ship as bare safetensors with no config, so their
//! shapes are read from the tensors (hidden size, depth, heads, channels). That way the same
//! loader serves the full-size checkpoints and the tiny demo ones.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig};
use candle_transformers::models::flux::autoencoder::Config as AeConfig;
use candle_transformers::models::flux::model::Config as FluxConfig;
use candle_transformers::models::t5::Config as T5Config;
use serde::Deserialize;

use super::error::LoadError;

/// An opened (memory-mapped) set of safetensors files holding one component.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    expected: String,
    tensors: MmapedSafetensors,
}

fn corrupt(file: &Path, expected: &str, reason: impl Into<String>) -> LoadError {
    LoadError::Corrupt {
        file: file.to_path_buf(),
        expected: expected.to_string(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Opens and checks every file; `expected` describes the component for error messages.
    pub fn open(files: Vec<PathBuf>, expected: &str) -> Result<Self, LoadError> {
        let expected = format!("safetensors with {expected}");
        for file in &files {
            if !file.is_file() {
                return Err(LoadError::Missing {
                    file: file.clone(),
                    expected,
                });
            }
            // SAFETY: the mapping is read-only and the files are model weights that nothing
            // rewrites while the worker runs (demo weights are written once, atomically).
            if let Err(e) = unsafe { MmapedSafetensors::new(file) } {
                return Err(corrupt(file, &expected, e.to_string()));
            }
        }
        // SAFETY: as above.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| corrupt(&files[0], &expected, e.to_string()))?;
        Ok(Self {
            files,
            expected,
            tensors,
        })
    }

    /// The files, for reports.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn main_file(&self) -> &Path {
        self.files
            .first()
            .map(PathBuf::as_path)
            .unwrap_or(Path::new("(none)"))
    }

    /// Whether a tensor is present.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    /// A tensor's shape, or an error naming the file and the tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        self.tensors
            .get(name)
            .map(|t| t.shape().to_vec())
            .map_err(|_| {
                corrupt(
                    self.main_file(),
                    &self.expected,
                    format!("tensor `{name}` is missing"),
                )
            })
    }

    fn dim(&self, name: &str, axis: usize) -> Result<usize, LoadError> {
        let shape = self.shape(name)?;
        shape.get(axis).copied().ok_or_else(|| {
            corrupt(
                self.main_file(),
                &self.expected,
                format!(
                    "tensor `{name}` has shape {shape:?}, expected at least {} dims",
                    axis + 1
                ),
            )
        })
    }

    fn count(&self, pattern: impl Fn(usize) -> String) -> usize {
        (0..).take_while(|i| self.has(&pattern(*i))).count()
    }

    /// Number of parameters in the tensors named `prefix…` (all of them for `""`; a prefix for
    /// a component that loads only part of its file, as the decoder of the autoencoder).
    pub fn parameters_under(&self, prefix: &str) -> u64 {
        self.tensors
            .tensors()
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
            .sum()
    }

    /// Builds a model component over these tensors (converted to `dtype` on `device` as they
    /// load); a failure (usually a missing tensor or a shape mismatch) names the file.
    pub fn build<M>(
        self,
        component: &'static str,
        dtype: DType,
        device: &Device,
        f: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<M, LoadError> {
        let file = self.main_file().to_path_buf();
        let vb = VarBuilder::from_backend(Box::new(self.tensors), dtype, device.clone());
        f(vb).map_err(|e| LoadError::Build {
            component,
            file,
            reason: e.to_string(),
        })
    }

    /// FLUX transformer config read from tensor shapes (BFL naming).
    pub fn flux_config(&self) -> Result<FluxConfig, LoadError> {
        let hidden_size = self.dim("img_in.weight", 0)?;
        let in_channels = self.dim("img_in.weight", 1)?;
        let context_in_dim = self.dim("txt_in.weight", 1)?;
        let vec_in_dim = self.dim("vector_in.in_layer.weight", 1)?;
        let depth = self.count(|i| format!("double_blocks.{i}.img_attn.qkv.weight"));
        let depth_single_blocks = self.count(|i| format!("single_blocks.{i}.linear1.weight"));
        if depth == 0 || depth_single_blocks == 0 {
            return Err(corrupt(
                self.main_file(),
                &self.expected,
                format!(
                    "found {depth} double and {depth_single_blocks} single blocks; a FLUX transformer has both"
                ),
            ));
        }
        let head_dim = self.dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)?;
        if head_dim == 0 || head_dim % 32 != 0 || hidden_size % head_dim != 0 {
            return Err(corrupt(
                self.main_file(),
                &self.expected,
                format!(
                    "head dim {head_dim} must be a multiple of 32 dividing the hidden size {hidden_size}"
                ),
            ));
        }
        let mlp_hidden = self.dim("double_blocks.0.img_mlp.0.weight", 0)?;
        Ok(FluxConfig {
            in_channels,
            vec_in_dim,
            context_in_dim,
            hidden_size,
            mlp_ratio: mlp_hidden as f64 / hidden_size as f64,
            num_heads: hidden_size / head_dim,
            depth,
            depth_single_blocks,
            // FLUX splits each head's RoPE over (index, row, column) as 1/8, 7/16, 7/16.
            axes_dim: vec![head_dim / 8, head_dim * 7 / 16, head_dim * 7 / 16],
            theta: 10_000,
            qkv_bias: self.has("double_blocks.0.img_attn.qkv.bias"),
            guidance_embed: self.has("guidance_in.in_layer.weight"),
        })
    }

    /// FLUX autoencoder config read from tensor shapes (BFL `ae.safetensors` naming).
    pub fn autoencoder_config(&self) -> Result<AeConfig, LoadError> {
        let z_channels = self.dim("decoder.conv_in.weight", 1)?;
        let levels = self.count(|i| format!("decoder.up.{i}.block.0.conv1.weight"));
        if levels == 0 {
            return Err(corrupt(
                self.main_file(),
                &self.expected,
                "no decoder.up.* blocks",
            ));
        }
        let ch = self.dim("encoder.conv_in.weight", 0)?;
        let in_channels = self.dim("encoder.conv_in.weight", 1)?;
        let mut ch_mult = Vec::with_capacity(levels);
        for i in 0..levels {
            let c = self.dim(&format!("decoder.up.{i}.block.0.conv1.weight"), 0)?;
            if c % ch != 0 {
                return Err(corrupt(
                    self.main_file(),
                    &self.expected,
                    format!("decoder level {i} has {c} channels, not a multiple of {ch}"),
                ));
            }
            ch_mult.push(c / ch);
        }
        let num_res_blocks = self
            .count(|j| format!("decoder.up.0.block.{j}.conv1.weight"))
            .saturating_sub(1)
            .max(1);
        Ok(AeConfig {
            resolution: 256,
            in_channels,
            ch,
            out_ch: self.dim("decoder.conv_out.weight", 0)?,
            ch_mult,
            num_res_blocks,
            z_channels,
            // The FLUX autoencoder's latent normalisation (same for schnell and dev).
            scale_factor: 0.3611,
            shift_factor: 0.1159,
        })
    }
}

/// Reads a JSON config file, naming the file on failure.
pub fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    expected: &str,
) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| corrupt(path, expected, e.to_string()))
}

/// The fields of a transformers `CLIPTextConfig` that the text model needs.
#[derive(Debug, Deserialize)]
struct HfClipTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    projection_dim: Option<usize>,
    #[serde(default)]
    hidden_act: Option<String>,
}

/// CLIP text config from a diffusers `text_encoder/config.json`.
pub fn clip_config(path: &Path) -> Result<ClipTextConfig, LoadError> {
    const EXPECTED: &str = "a CLIPTextConfig JSON (vocab_size, hidden_size, num_hidden_layers, …)";
    let c: HfClipTextConfig = read_json(path, EXPECTED)?;
    match c.hidden_act.as_deref() {
        None | Some("quick_gelu") => {}
        Some(other) => {
            return Err(corrupt(
                path,
                EXPECTED,
                format!("hidden_act `{other}` is not supported (CLIP-L uses quick_gelu)"),
            ));
        }
    }
    Ok(ClipTextConfig {
        vocab_size: c.vocab_size,
        embed_dim: c.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: c.intermediate_size,
        max_position_embeddings: c.max_position_embeddings,
        pad_with: None,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        projection_dim: c.projection_dim.unwrap_or(c.hidden_size),
    })
}

/// T5 encoder config from a diffusers `text_encoder_2/config.json`.
pub fn t5_config(path: &Path) -> Result<T5Config, LoadError> {
    read_json(
        path,
        "a T5Config JSON (d_model, num_layers, feed_forward_proj, …)",
    )
}

/// The shard files named by a `model.safetensors.index.json`, in order.
pub fn shards_from_index(index: &Path) -> Result<Vec<String>, LoadError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: Index = read_json(index, "a safetensors index with a weight_map")?;
    let mut shards: Vec<String> = idx.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    for s in &shards {
        if s.contains('/') || s.contains("..") {
            return Err(corrupt(
                index,
                "a safetensors index naming shard files beside it",
                format!("shard name `{s}` is not a plain file name"),
            ));
        }
    }
    Ok(shards)
}
