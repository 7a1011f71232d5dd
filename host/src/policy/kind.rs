//! The three policy slots.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which world a policy implements, and so which slot it fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Job input JSON → typed request.
    Validator,
    /// Prompt → cleaned prompt or rejection.
    Sanitizer,
    /// Circuit-breaker and retry decisions.
    Resilience,
}

impl PolicyKind {
    /// Every kind, in slot order.
    pub const ALL: [PolicyKind; 3] = [Self::Validator, Self::Sanitizer, Self::Resilience];

    /// The name used in URLs, sled keys and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validator => "validator",
            Self::Sanitizer => "sanitizer",
            Self::Resilience => "resilience",
        }
    }

    /// Index into per-kind arrays.
    pub fn index(self) -> usize {
        match self {
            Self::Validator => 0,
            Self::Sanitizer => 1,
            Self::Resilience => 2,
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "validator" => Ok(Self::Validator),
            "sanitizer" => Ok(Self::Sanitizer),
            "resilience" => Ok(Self::Resilience),
            other => Err(format!(
                "unknown policy kind `{other}`; expected validator, sanitizer or resilience"
            )),
        }
    }
}
