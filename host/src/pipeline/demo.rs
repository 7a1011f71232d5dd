//! The `demo` model: tiny FLUX-architecture weights (transformer, autoencoder, T5, CLIP and
//! their tokenizers) generated from a fixed seed and written in the real repo layout, so they
//! load through exactly the loader real weights use.
//!
//! The networks are untrained, so images are abstract patterns, not faces; what the demo proves
//! is the code path (tokenize → encode → denoise → decode → PNG), end to end, in milliseconds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::flux::autoencoder::{AutoEncoder, Config as AeConfig};
use candle_transformers::models::flux::model::{Config as FluxConfig, Flux};
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};
use serde_json::{Value, json};

use super::error::LoadError;
use super::random_weights::RandomWeights;
use super::text::{CLIP_BOS, CLIP_EOS};
use super::variant::Variant;

/// Seed of every demo tensor ("HEADSHOT" in ASCII).
pub const DEMO_SEED: u64 = 0x4845_4144_5348_4f54;
/// Folder name under `data_dir/models`; bump it when the demo weights change.
pub const DEMO_DIR: &str = "demo-v1";

/// Tiny transformer: 2 double + 2 single blocks, hidden 64, 2 heads of 32.
pub fn demo_flux_config(variant: Variant) -> FluxConfig {
    FluxConfig {
        in_channels: 64,
        vec_in_dim: 32,
        context_in_dim: 32,
        hidden_size: 64,
        mlp_ratio: 4.0,
        num_heads: 2,
        depth: 2,
        depth_single_blocks: 2,
        axes_dim: vec![4, 14, 14],
        theta: 10_000,
        qkv_bias: true,
        guidance_embed: variant == Variant::Dev,
    }
}

/// Tiny autoencoder: FLUX's 16 latent channels and 8× upsampling, 32 channels throughout.
pub fn demo_ae_config() -> AeConfig {
    AeConfig {
        resolution: 256,
        in_channels: 3,
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 1, 1, 1],
        num_res_blocks: 1,
        z_channels: 16,
        scale_factor: 0.3611,
        shift_factor: 0.1159,
    }
}

fn t5_config_json(vocab_size: usize) -> Value {
    json!({
        "architectures": ["T5EncoderModel"],
        "vocab_size": vocab_size, "d_model": 32, "d_kv": 8, "d_ff": 64,
        "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
        "is_encoder_decoder": true, "use_cache": true,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0
    })
}

fn clip_config_json(vocab_size: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
        "max_position_embeddings": 77, "num_hidden_layers": 2, "num_attention_heads": 4,
        "projection_dim": 32, "hidden_act": "quick_gelu",
        "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1
    })
}

/// T5-style tokenizer: Metaspace + unigram over characters and a few words, with byte
/// fallback so any text encodes. Ids 0/1/2 are `<pad>`, `</s>`, `<unk>` as in T5.
fn t5_tokenizer_json() -> Value {
    let mut vocab: Vec<(String, f64)> = vec![
        ("<pad>".into(), 0.0),
        ("</s>".into(), 0.0),
        ("<unk>".into(), 0.0),
        ("▁".into(), -2.0),
    ];
    for c in (33u8..=126).map(char::from) {
        vocab.push((c.to_string(), -4.0));
    }
    for w in [
        "a",
        "the",
        "of",
        "in",
        "and",
        "with",
        "headshot",
        "portrait",
        "photo",
        "studio",
        "professional",
        "corporate",
        "founder",
        "light",
        "background",
        "smile",
    ] {
        vocab.push((format!("▁{w}"), -6.0));
    }
    for b in 0..=255u8 {
        vocab.push((format!("<0x{b:02X}>"), -10.0));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let metaspace =
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
        ]},
        "pre_tokenizer": metaspace,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": true}
    })
}

/// CLIP-style byte-level BPE vocab: every byte symbol, alone and as a word end (`</w>`), then
/// the start/end tokens with the two highest ids (as in CLIP, where end-of-text is the largest).
fn clip_vocab() -> serde_json::Map<String, Value> {
    let mut symbols: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    symbols.sort_unstable();
    let mut vocab = serde_json::Map::new();
    for c in &symbols {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    for c in &symbols {
        vocab.insert(format!("{c}</w>"), json!(vocab.len()));
    }
    for merged in clip_merges().iter().map(|m| m.replace(' ', "")) {
        vocab.insert(merged, json!(vocab.len()));
    }
    vocab.insert(CLIP_BOS.into(), json!(vocab.len()));
    vocab.insert(CLIP_EOS.into(), json!(vocab.len()));
    vocab
}

/// A few merges so common words become single tokens, as in a trained BPE.
fn clip_merges() -> Vec<String> {
    vec![
        "h e".into(),
        "he a".into(),
        "hea d".into(),
        "t h".into(),
        "th e</w>".into(),
    ]
}

fn io_err(file: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        file: file.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), LoadError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| LoadError::Io {
        file: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(io_err(path))
}

/// The tensors `build` asks a seeded random `VarBuilder` for: weights for any module, by name.
pub(crate) fn record<M>(
    seed: u64,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let (weights, recording) = RandomWeights::seeded(seed);
    let vb = VarBuilder::from_backend(Box::new(weights), DType::F32, Device::Cpu);
    drop(build(vb)?);
    Ok(recording.take())
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), LoadError> {
    candle_core::safetensors::save(tensors, path).map_err(|e| LoadError::Io {
        file: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Every demo tensor by file (relative path → tensors), generated in memory.
pub fn demo_tensors() -> candle_core::Result<Vec<(&'static str, HashMap<String, Tensor>)>> {
    let t5_cfg: T5Config = serde_json::from_value(t5_config_json(t5_vocab_size()))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let clip_cfg = ClipTextConfig {
        vocab_size: clip_vocab().len(),
        embed_dim: 32,
        activation: Activation::QuickGelu,
        intermediate_size: 64,
        max_position_embeddings: 77,
        pad_with: None,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        projection_dim: 32,
    };
    let schnell = demo_flux_config(Variant::Schnell);
    let dev = demo_flux_config(Variant::Dev);
    let ae = demo_ae_config();
    Ok(vec![
        (
            Variant::Schnell.transformer_file(),
            record(DEMO_SEED ^ 1, |vb| Flux::new(&schnell, vb))?,
        ),
        (
            Variant::Dev.transformer_file(),
            record(DEMO_SEED ^ 2, |vb| Flux::new(&dev, vb))?,
        ),
        (
            "ae.safetensors",
            record(DEMO_SEED ^ 3, |vb| AutoEncoder::new(&ae, vb))?,
        ),
        (
            "text_encoder_2/model.safetensors",
            record(DEMO_SEED ^ 4, |vb| T5EncoderModel::load(vb, &t5_cfg))?,
        ),
        (
            "text_encoder/model.safetensors",
            record(DEMO_SEED ^ 5, |vb| {
                ClipTextTransformer::new(vb.pp("text_model"), &clip_cfg)
            })?,
        ),
    ])
}

fn t5_vocab_size() -> usize {
    t5_tokenizer_json()["model"]["vocab"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default()
}

/// Writes the complete demo model into `dir` (which must exist and be empty).
pub fn write_demo_weights(dir: &Path) -> Result<(), LoadError> {
    for sub in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    let tensors = demo_tensors().map_err(|e| LoadError::Io {
        file: dir.to_path_buf(),
        source: std::io::Error::other(format!("generating demo weights: {e}")),
    })?;
    for (rel, t) in &tensors {
        save(t, &dir.join(rel))?;
    }
    write_json(
        &dir.join("text_encoder_2/config.json"),
        &t5_config_json(t5_vocab_size()),
    )?;
    write_json(
        &dir.join("text_encoder/config.json"),
        &clip_config_json(clip_vocab().len()),
    )?;
    write_json(
        &dir.join("tokenizer_2/tokenizer.json"),
        &t5_tokenizer_json(),
    )?;
    // CLIP ships as vocab.json + merges.txt, like the FLUX repos, so that path is exercised too.
    write_json(
        &dir.join("tokenizer/vocab.json"),
        &Value::Object(clip_vocab()),
    )?;
    let merges = format!("#version: 0.2\n{}\n", clip_merges().join("\n"));
    let merges_path = dir.join("tokenizer/merges.txt");
    std::fs::write(&merges_path, merges).map_err(io_err(&merges_path))?;
    let readme = dir.join("README.txt");
    std::fs::write(
        &readme,
        "Demo weights for the headshot worker: tiny, untrained, FLUX-architecture networks\n\
         generated from a fixed seed. They exercise the real pipeline and produce abstract\n\
         images. Delete this folder to regenerate it.\n",
    )
    .map_err(io_err(&readme))
}

/// The demo model folder under `data_dir`, generated on first use.
///
/// Generation happens in a private temporary folder that is renamed into place, so concurrent
/// first uses (threads or processes) never see a half-written model.
pub fn ensure_demo_weights(data_dir: &Path) -> Result<PathBuf, LoadError> {
    let models = data_dir.join("models");
    let dir = models.join(DEMO_DIR);
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&models).map_err(io_err(&models))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let tmp = models.join(format!(".{DEMO_DIR}.tmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    tracing::info!(dir = %dir.display(), "writing demo weights (first use)");
    let written = write_demo_weights(&tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another writer got there first: its folder is complete by construction.
        if !dir.is_dir() {
            return Err(LoadError::Io {
                file: dir,
                source: e,
            });
        }
    }
    Ok(dir)
}
