//! The headshot worker: FLUX text-to-image on candle behind a fail-soft job pipeline.
//!
//! `main.rs` is the CLI; everything it runs lives here so tests and benches use the same code.

pub mod bench;
pub mod config;
pub mod error;
pub mod heap;
pub mod ingress;
pub mod jobs;
pub mod panics;
pub mod percent;
pub mod pipeline;
pub mod policy;
pub mod resources;
pub mod state;
pub mod storage;
