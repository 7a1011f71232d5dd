//! FLUX.1: the project's own transformer (model, blocks, layers, embeddings, attention) and
//! the text-to-image pipeline that runs it.

pub mod attention;
pub mod blocks;
pub mod check;
pub mod embed;
pub mod flash_cpu;
#[cfg(feature = "cuda")]
pub mod flash_cuda;
pub mod layers;
pub mod model;
mod pipeline;

pub use model::FluxModel;
pub use pipeline::{
    FluxPipeline, GeneratedImage, Generation, LoadOptions, StageTimings, StepProgress,
};
