//! The FLUX text-to-image pipeline on candle, and where its weights come from.

pub mod cache;
pub mod checkpoint;
pub mod demo;
pub mod device;
pub mod error;
pub mod flux;
pub mod image;
pub mod params;
pub mod random_weights;
pub mod retry;
pub mod rng;
pub mod source;
pub mod status;
pub mod style;
pub mod text;
pub mod variant;

pub use error::{GenerateError, LoadError};
pub use flux::{FluxPipeline, GeneratedImage, Generation, LoadOptions, StageTimings, StepProgress};
pub use params::{GenerationParams, Limits, ResolvedParams};
pub use source::ModelSource;
pub use status::PipelineStatus;
pub use variant::Variant;
