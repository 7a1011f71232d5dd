//! Text conditioning: T5-XXL (per-token embeddings) and CLIP-L (pooled embedding), with their
//! tokenizers, as FLUX consumes them.

use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::t5::T5EncoderModel;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::checkpoint::{self, Checkpoint};
use super::error::{GenerateError, LoadError, at};
use super::source::ModelFiles;
use super::status::ComponentStatus;

/// CLIP's token-splitting pattern (words, numbers, punctuation, and the two special tokens).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// CLIP's start-of-text token.
pub const CLIP_BOS: &str = "<|startoftext|>";
/// CLIP's end-of-text token; the pooled embedding is read at its position.
pub const CLIP_EOS: &str = "<|endoftext|>";

/// A `tokenizer.json` document equivalent to transformers' CLIPTokenizerFast for the given BPE
/// vocab and merges. Used for CLIP folders that ship only `vocab.json` + `merges.txt` (as the
/// FLUX repos do) and for the demo tokenizer.
pub fn clip_tokenizer_json(
    vocab: &serde_json::Map<String, Value>,
    merges: &[String],
) -> Result<Value, String> {
    let id = |t: &str| {
        vocab
            .get(t)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("the vocab has no `{t}` token"))
    };
    let (bos, eos) = (id(CLIP_BOS)?, id(CLIP_EOS)?);
    let added = |id: u64, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": true, "special": true})
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(bos, CLIP_BOS), added(eos, CLIP_EOS)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [CLIP_EOS, eos], "cls": [CLIP_BOS, bos],
                           "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": CLIP_EOS,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

fn load_tokenizer_file(path: &Path, expected: &str) -> Result<Tokenizer, LoadError> {
    Tokenizer::from_file(path)
        .map(without_word_cache)
        .map_err(|e| LoadError::Corrupt {
            file: path.to_path_buf(),
            expected: expected.to_string(),
            reason: e.to_string(),
        })
}

/// Turns off the tokenizer's per-word cache. The `tokenizers` models (unigram, BPE) keep
/// every word they have split, up to 10 000 words, and never evict: a worker that sees new
/// words in every prompt (names, numbers) grows by a few hundred bytes per job until the
/// cache is full, which the soak bench showed as resident memory creeping over its first
/// 10 000 jobs (docs/RELIABILITY.md), and users' prompt words stay in memory. Splitting a
/// prompt's few dozen words again on every job is small next to a generation's seconds (not
/// timed on the real T5/CLIP vocabularies, which the development machine cannot download).
fn without_word_cache(mut tokenizer: Tokenizer) -> Tokenizer {
    // Cloning the model starts it on a fresh cache; capacity 0 then keeps it empty.
    let mut model = tokenizer.get_model().clone();
    model.resize_cache(0);
    tokenizer.with_model(model);
    tokenizer
}

/// The CLIP tokenizer: `tokenizer/tokenizer.json`, or built from `vocab.json` + `merges.txt`.
fn load_clip_tokenizer(files: &ModelFiles) -> Result<Tokenizer, LoadError> {
    const EXPECTED: &str = "the CLIP-L tokenizer (tokenizer.json, or vocab.json + merges.txt)";
    if files.has("tokenizer/tokenizer.json") || !files.has("tokenizer/vocab.json") {
        let path = files.get("tokenizer/tokenizer.json", EXPECTED)?;
        return load_tokenizer_file(&path, EXPECTED);
    }
    let vocab_path = files.get("tokenizer/vocab.json", EXPECTED)?;
    let merges_path = files.get("tokenizer/merges.txt", EXPECTED)?;
    let vocab: serde_json::Map<String, Value> =
        checkpoint::read_json(&vocab_path, "a BPE vocab (token → id)")?;
    let merges_text = std::fs::read_to_string(&merges_path).map_err(|source| LoadError::Io {
        file: merges_path.clone(),
        source,
    })?;
    let merges: Vec<String> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let doc = clip_tokenizer_json(&vocab, &merges).map_err(|reason| LoadError::Corrupt {
        file: vocab_path.clone(),
        expected: EXPECTED.into(),
        reason,
    })?;
    Tokenizer::from_bytes(doc.to_string())
        .map(without_word_cache)
        .map_err(|e| LoadError::Corrupt {
            file: vocab_path,
            expected: EXPECTED.into(),
            reason: e.to_string(),
        })
}

/// The T5 shard files: `model.safetensors.index.json` and its shards, or `model.safetensors`.
fn t5_weight_files(files: &ModelFiles) -> Result<Vec<std::path::PathBuf>, LoadError> {
    const EXPECTED: &str = "the T5-XXL encoder weights (model.safetensors or an index with shards)";
    if files.has("text_encoder_2/model.safetensors.index.json") {
        let index = files.get("text_encoder_2/model.safetensors.index.json", EXPECTED)?;
        checkpoint::shards_from_index(&index)?
            .iter()
            .map(|s| files.get(&format!("text_encoder_2/{s}"), EXPECTED))
            .collect()
    } else {
        Ok(vec![
            files.get("text_encoder_2/model.safetensors", EXPECTED)?,
        ])
    }
}

/// A prompt's conditioning, batch size 1, on the pipeline's device and dtype.
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    /// T5 per-token embeddings, `[1, t5_tokens, d_model]`.
    pub t5: Tensor,
    /// CLIP pooled embedding, `[1, embed_dim]`.
    pub clip: Tensor,
    /// Tokens dropped because the prompt was longer than the T5 window.
    pub t5_truncated: usize,
    /// Tokens dropped because the prompt was longer than CLIP's 77.
    pub clip_truncated: usize,
}

/// The two text encoders with their tokenizers.
pub struct TextEncoders {
    t5: T5EncoderModel,
    t5_tokenizer: Tokenizer,
    t5_pad: u32,
    t5_eos: u32,
    clip: ClipTextTransformer,
    clip_tokenizer: Tokenizer,
    clip_eos: u32,
    clip_max: usize,
    t5_dim: usize,
    clip_dim: usize,
}

impl TextEncoders {
    /// Loads both encoders and tokenizers from the model layout.
    pub fn load(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, Vec<ComponentStatus>), LoadError> {
        let t5_tokenizer = load_tokenizer_file(
            &files.get(
                "tokenizer_2/tokenizer.json",
                "the T5 tokenizer (tokenizer.json)",
            )?,
            "the T5 tokenizer (tokenizer.json)",
        )?;
        let clip_tokenizer = load_clip_tokenizer(files)?;

        let t5_cfg_path = files.get("text_encoder_2/config.json", "the T5 encoder config")?;
        let t5_cfg = checkpoint::t5_config(&t5_cfg_path)?;
        let t5_ckpt = Checkpoint::open(t5_weight_files(files)?, "the T5-XXL text encoder")?;
        let t5_status = ComponentStatus::of("t5", &t5_ckpt, dtype);
        let t5 = t5_ckpt.build("T5 encoder", dtype, device, |vb| {
            T5EncoderModel::load(vb, &t5_cfg)
        })?;

        let clip_cfg_path =
            files.get("text_encoder/config.json", "the CLIP text encoder config")?;
        let clip_cfg = checkpoint::clip_config(&clip_cfg_path)?;
        let clip_ckpt = Checkpoint::open(
            vec![files.get(
                "text_encoder/model.safetensors",
                "the CLIP-L text encoder weights",
            )?],
            "the CLIP-L text encoder",
        )?;
        let clip_status = ComponentStatus::of("clip", &clip_ckpt, dtype);
        let clip = clip_ckpt.build("CLIP text encoder", dtype, device, |vb| {
            ClipTextTransformer::new(vb.pp("text_model"), &clip_cfg)
        })?;

        let clip_eos = clip_tokenizer
            .token_to_id(CLIP_EOS)
            .ok_or_else(|| LoadError::Corrupt {
                file: clip_cfg_path.clone(),
                expected: "a CLIP tokenizer".into(),
                reason: format!("the tokenizer has no `{CLIP_EOS}` token"),
            })?;
        let encoders = Self {
            t5,
            t5_tokenizer,
            t5_pad: t5_cfg.pad_token_id as u32,
            t5_eos: t5_cfg.eos_token_id as u32,
            clip,
            clip_tokenizer,
            clip_eos,
            clip_max: clip_cfg.max_position_embeddings,
            t5_dim: t5_cfg.d_model,
            clip_dim: clip_cfg.embed_dim,
        };
        Ok((encoders, vec![t5_status, clip_status]))
    }

    /// Embedding widths `(T5 d_model, CLIP hidden)`, which the transformer must accept.
    pub fn dims(&self) -> (usize, usize) {
        (self.t5_dim, self.clip_dim)
    }

    /// Encodes one prompt. T5 ids are padded (or cut) to `t5_tokens`; CLIP ids are cut at 77.
    pub fn encode(
        &mut self,
        prompt: &str,
        t5_tokens: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<PromptEmbedding, GenerateError> {
        let tokenize = |tok: &Tokenizer, encoder: &'static str| {
            tok.encode(prompt, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| GenerateError::Tokenize {
                    encoder,
                    reason: e.to_string(),
                })
        };
        let mut t5_ids = tokenize(&self.t5_tokenizer, "T5")?;
        let t5_truncated = fit(&mut t5_ids, t5_tokens, self.t5_eos);
        t5_ids.resize(t5_tokens, self.t5_pad);
        let mut clip_ids = tokenize(&self.clip_tokenizer, "CLIP")?;
        let clip_truncated = fit(&mut clip_ids, self.clip_max, self.clip_eos);

        let t5 = (|| {
            let ids = Tensor::new(t5_ids.as_slice(), device)?.unsqueeze(0)?;
            self.t5.forward(&ids)?.to_dtype(dtype)
        })()
        .map_err(at("T5 encode"))?;
        let clip = (|| {
            let ids = Tensor::new(clip_ids.as_slice(), device)?.unsqueeze(0)?;
            let hidden = self.clip.forward_with_mask(&ids, usize::MAX)?;
            // Pooled output: the final-norm hidden state at the end-of-text token (the last id).
            let last = hidden.dim(D::Minus2)? - 1;
            hidden.i((.., last))?.to_dtype(dtype)
        })()
        .map_err(at("CLIP encode"))?;
        if t5_truncated > 0 || clip_truncated > 0 {
            tracing::warn!(
                t5_truncated,
                clip_truncated,
                "prompt longer than the text encoders' windows; the end was cut"
            );
        }
        Ok(PromptEmbedding {
            t5,
            clip,
            t5_truncated,
            clip_truncated,
        })
    }
}

/// Cuts `ids` to `max` keeping a final `eos`; returns how many tokens were dropped.
fn fit(ids: &mut Vec<u32>, max: usize, eos: u32) -> usize {
    if ids.len() <= max {
        return 0;
    }
    let dropped = ids.len() - max;
    ids.truncate(max);
    if let Some(last) = ids.last_mut() {
        *last = eos;
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_eos_and_counts() {
        let mut v = vec![5, 6, 7, 8, 1];
        assert_eq!(fit(&mut v, 3, 1), 2);
        assert_eq!(v, vec![5, 6, 1]);
        let mut v = vec![5, 1];
        assert_eq!(fit(&mut v, 3, 1), 0);
        assert_eq!(v, vec![5, 1]);
    }

    #[test]
    fn clip_tokenizer_from_vocab_and_merges() {
        let mut vocab = serde_json::Map::new();
        for (i, t) in [
            "c",
            "a",
            "t",
            "t</w>",
            "ca",
            "cat</w>",
            "<|startoftext|>",
            "<|endoftext|>",
        ]
        .iter()
        .enumerate()
        {
            vocab.insert(t.to_string(), json!(i));
        }
        let merges = vec!["c a".to_string(), "ca t</w>".to_string()];
        let doc = clip_tokenizer_json(&vocab, &merges).unwrap();
        let tok = Tokenizer::from_bytes(doc.to_string()).unwrap();
        let ids = tok.encode("CAT", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![6, 5, 7]);
        vocab.remove(CLIP_EOS);
        assert!(
            clip_tokenizer_json(&vocab, &merges)
                .unwrap_err()
                .contains("endoftext")
        );
    }
}
