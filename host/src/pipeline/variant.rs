//! The two FLUX.1 variants and what differs between them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// FLUX.1 variant. The variant decides step defaults, guidance, text length and schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Variant {
    /// FLUX.1-schnell: timestep-distilled, 4 steps, no guidance input (Apache-2.0).
    Schnell,
    /// FLUX.1-dev: guidance-distilled, ~28 steps with a resolution-shifted schedule.
    Dev,
}

impl Variant {
    /// Steps used when a request does not say.
    pub fn default_steps(self) -> u32 {
        match self {
            Variant::Schnell => 4,
            Variant::Dev => 28,
        }
    }

    /// Guidance used when a request does not say (`None`: the variant takes no guidance).
    pub fn default_guidance(self) -> Option<f64> {
        match self {
            Variant::Schnell => None,
            Variant::Dev => Some(3.5),
        }
    }

    /// T5 sequence length the variant was trained with (prompts are padded to it).
    pub fn t5_tokens(self) -> usize {
        match self {
            Variant::Schnell => 256,
            Variant::Dev => 512,
        }
    }

    /// Whether the sigma schedule is shifted by image size (dev) or linear (schnell).
    pub fn shifted_schedule(self) -> bool {
        matches!(self, Variant::Dev)
    }

    /// File name of the transformer checkpoint in the Black Forest Labs repo layout.
    pub fn transformer_file(self) -> &'static str {
        match self {
            Variant::Schnell => "flux1-schnell.safetensors",
            Variant::Dev => "flux1-dev.safetensors",
        }
    }

    /// Lower-case name used in config, cache keys and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Schnell => "schnell",
            Variant::Dev => "dev",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "schnell" | "flux.1-schnell" => Ok(Variant::Schnell),
            "dev" | "flux.1-dev" => Ok(Variant::Dev),
            other => Err(format!(
                "unknown FLUX variant `{other}` (expected `schnell` or `dev`)"
            )),
        }
    }
}

impl TryFrom<String> for Variant {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse().map_err(|e| format!("model.variant: {e}"))
    }
}

impl From<Variant> for String {
    fn from(v: Variant) -> Self {
        v.as_str().to_string()
    }
}
