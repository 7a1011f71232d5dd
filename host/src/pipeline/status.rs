//! What the pipeline reports about itself: components, device, dtype, memory.

use std::path::PathBuf;

use candle_core::DType;
use serde::Serialize;

use super::checkpoint::Checkpoint;
use super::variant::Variant;

/// One loaded model component.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentStatus {
    /// `t5`, `clip`, `transformer` or `autoencoder`.
    pub name: String,
    /// The checkpoint files it came from.
    pub files: Vec<PathBuf>,
    /// Parameter count.
    pub parameters: u64,
    /// Bytes its weights take as loaded (the pipeline's dtype; FP8 projections at one byte).
    pub bytes: u64,
}

impl ComponentStatus {
    /// Describes a checkpoint as loaded at `dtype`.
    pub fn of(name: &str, ckpt: &Checkpoint, dtype: DType) -> Self {
        Self::of_part(name, ckpt, "", dtype)
    }

    /// Figures for the tensors named `prefix…` of `ckpt`: what a component that loads only
    /// part of its file holds.
    pub fn of_part(name: &str, ckpt: &Checkpoint, prefix: &str, dtype: DType) -> Self {
        let parameters = ckpt.parameters_under(prefix);
        Self {
            name: name.to_string(),
            files: ckpt.files().to_vec(),
            parameters,
            bytes: parameters * dtype.size_in_bytes() as u64,
        }
    }
}

/// Prompt-embedding cache figures.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CacheStatus {
    /// Entries held.
    pub entries: usize,
    /// Entries allowed.
    pub capacity: usize,
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that had to encode.
    pub misses: u64,
}

/// The pipeline as loaded: for `/readyz`, the admin API, logs and admission estimates.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineStatus {
    /// FLUX variant.
    pub variant: Variant,
    /// Source as configured (`demo`, `hub:…`, `dir:…`).
    pub source: String,
    /// Where the files were found (folder or hub repo).
    pub location: String,
    /// Device name (`cpu`, `cuda:0`).
    pub device: String,
    /// Weight and activation dtype.
    pub dtype: String,
    /// Each loaded component.
    pub components: Vec<ComponentStatus>,
    /// Sum of the components' weight bytes (the resident estimate).
    pub weight_bytes: u64,
    /// Time the load took.
    pub load_ms: f64,
    /// Prompt-embedding cache.
    pub embedding_cache: CacheStatus,
}
