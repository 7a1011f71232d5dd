//! The JSON the host passes to `meta.configure`.
//!
//! One shape for every policy kind: `standard` holds the settings of the built-in rules (so a
//! custom policy calling [`crate::rules`] sees the same limits as the host), `custom` holds the
//! operator's free-form settings for a custom policy (`[policies.<kind>.custom]` in the host's
//! TOML).

use serde::{Deserialize, Serialize};

use crate::rules::breaker::BreakerConfig;
use crate::rules::request::ValidatorConfig;
use crate::rules::retry::RetryConfig;
use crate::rules::sanitize::SanitizerConfig;

/// What `configure` receives, as JSON text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigEnvelope<T> {
    /// Settings of the built-in rules for this kind.
    pub standard: T,
    /// Operator settings for a custom policy; `null` when none are configured.
    #[serde(default)]
    pub custom: serde_json::Value,
}

/// Settings of the built-in resilience policy: one breaker shape and one retry shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Circuit-breaker thresholds and windows.
    pub breaker: BreakerConfig,
    /// Retry schedule.
    pub retry: RetryConfig,
}

impl ResilienceConfig {
    /// Refuses nonsensical settings, naming the key.
    pub fn check(&self) -> Result<(), String> {
        self.breaker.check().map_err(|e| format!("breaker.{e}"))?;
        self.retry.check().map_err(|e| format!("retry.{e}"))
    }
}

/// Validator settings as they travel to `configure`.
pub type ValidatorEnvelope = ConfigEnvelope<ValidatorConfig>;
/// Sanitizer settings as they travel to `configure`.
pub type SanitizerEnvelope = ConfigEnvelope<SanitizerConfig>;
/// Resilience settings as they travel to `configure`.
pub type ResilienceEnvelope = ConfigEnvelope<ResilienceConfig>;

/// Parses an envelope and checks its standard part, so a bad host setting is refused at
/// activation with the key named.
pub fn parse<T>(
    json: &str,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<ConfigEnvelope<T>, String>
where
    T: for<'de> Deserialize<'de>,
{
    let envelope: ConfigEnvelope<T> =
        serde_json::from_str(json).map_err(|e| format!("policy config: {e}"))?;
    check(&envelope.standard).map_err(|e| format!("policy config: standard.{e}"))?;
    Ok(envelope)
}
