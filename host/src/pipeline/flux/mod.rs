//! FLUX.1: the project's own transformer (model, blocks, layers, embeddings, attention) and
//! the text-to-image pipeline that runs it.

#[cfg(feature = "cuda")]
pub mod adaln_cuda;
pub mod attention;
pub mod blocks;
pub mod check;
#[cfg(feature = "cudnn")]
pub mod conv_cudnn_cuda;
#[cfg(feature = "cuda")]
pub mod conv_gemm_cuda;
#[cfg(feature = "cuda")]
pub mod conv_implicit_cuda;
pub mod conv_launch;
#[cfg(feature = "cuda")]
mod cuda_util;
pub mod decoder;
pub mod embed;
pub mod flash_cpu;
#[cfg(feature = "cuda")]
pub mod flash_cuda;
#[cfg(feature = "cuda")]
pub mod fp8_rows_cuda;
pub mod fp8_widen;
#[cfg(feature = "cuda")]
pub mod gemm_algo_cuda;
#[cfg(feature = "cuda")]
pub mod gemm_cuda;
#[cfg(feature = "cuda")]
pub mod group_norm_cuda;
pub mod layers;
pub mod mismatch;
pub mod model;
pub mod modulation_bank;
#[cfg(feature = "cuda")]
pub mod norm_rope_cuda;
mod pipeline;
pub mod stage_profile;

pub use model::FluxModel;
pub use pipeline::{
    FluxPipeline, GeneratedImage, Generation, LoadOptions, StageTimings, StepProgress,
};
