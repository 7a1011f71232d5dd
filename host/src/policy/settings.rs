//! What the registry needs from the configuration, in one place.

use std::time::Duration;

use headshot_plugin_sdk::envelope::{ConfigEnvelope, ResilienceConfig};
use headshot_plugin_sdk::rules::request::ValidatorConfig;
use headshot_plugin_sdk::rules::sanitize::SanitizerConfig;
use serde::{Deserialize, Serialize};

use super::conformance::StandardSettings;
use super::convert::OutputLimits;
use super::engine::EngineLimits;
use super::kind::PolicyKind;
use super::loaded::RunSettings;

/// What a caller sees when a policy call fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Refuse: the job fails with `policy_error`.
    FailClosed,
    /// Carry on with the built-in rules, run natively.
    FailOpen,
}

/// One slot's settings.
#[derive(Clone, Debug)]
pub struct SlotSettings {
    /// Wall-clock limit per call.
    pub deadline: Duration,
    /// Behaviour when the policy fails.
    pub on_error: OnError,
    /// Operator settings for a custom policy (`[policies.<kind>.custom]`).
    pub custom: serde_json::Value,
}

/// Everything the registry needs.
#[derive(Clone, Debug)]
pub struct PolicySettings {
    /// Engine-wide limits.
    pub engine: EngineLimits,
    /// Largest accepted upload.
    pub max_upload_bytes: usize,
    /// Instances kept ready per active version.
    pub prewarm: usize,
    /// Built-in validation limits (from `[model]` and `[styles]`).
    pub validator: ValidatorConfig,
    /// Built-in sanitizer settings.
    pub sanitizer: SanitizerConfig,
    /// Built-in breaker and retry settings.
    pub resilience: ResilienceConfig,
    /// Per-slot settings, indexed by [`PolicyKind::index`].
    pub slots: [SlotSettings; 3],
}

impl Default for PolicySettings {
    fn default() -> Self {
        let slot = |ms, on_error| SlotSettings {
            deadline: Duration::from_millis(ms),
            on_error,
            custom: serde_json::Value::Null,
        };
        Self {
            engine: EngineLimits::default(),
            max_upload_bytes: 10 << 20,
            prewarm: 4,
            validator: ValidatorConfig::default(),
            sanitizer: SanitizerConfig::default(),
            resilience: ResilienceConfig::default(),
            slots: [
                slot(20, OnError::FailClosed),
                slot(50, OnError::FailOpen),
                slot(20, OnError::FailOpen),
            ],
        }
    }
}

impl PolicySettings {
    /// The slot's settings.
    pub fn slot(&self, kind: PolicyKind) -> &SlotSettings {
        &self.slots[kind.index()]
    }

    /// The standard settings of `kind`, for conformance cases.
    pub fn standard(&self, kind: PolicyKind) -> StandardSettings {
        match kind {
            PolicyKind::Validator => StandardSettings::Validator(self.validator.clone()),
            PolicyKind::Sanitizer => StandardSettings::Sanitizer(self.sanitizer.clone()),
            PolicyKind::Resilience => StandardSettings::Resilience(self.resilience.clone()),
        }
    }

    /// The `configure` JSON for `kind`.
    pub fn envelope_json(&self, kind: PolicyKind) -> String {
        let custom = self.slot(kind).custom.clone();
        let json = match kind {
            PolicyKind::Validator => serde_json::to_string(&ConfigEnvelope {
                standard: &self.validator,
                custom,
            }),
            PolicyKind::Sanitizer => serde_json::to_string(&ConfigEnvelope {
                standard: &self.sanitizer,
                custom,
            }),
            PolicyKind::Resilience => serde_json::to_string(&ConfigEnvelope {
                standard: &self.resilience,
                custom,
            }),
        };
        // Serializing plain structs of strings and numbers cannot fail; an empty object keeps
        // the guest's defaults if it ever did.
        json.unwrap_or_else(|_| "{}".into())
    }

    /// How instances of `kind` run.
    pub fn run_settings(&self, kind: PolicyKind) -> RunSettings {
        RunSettings {
            deadline: self.slot(kind).deadline,
            config_json: self.envelope_json(kind),
            output: OutputLimits::for_prompt_chars(self.validator.max_prompt_chars as usize),
            prewarm: self.prewarm,
        }
    }
}

impl PolicySettings {
    /// The settings `config` describes: limits from `[model]` and `[styles]`, the rest from
    /// `[policies]`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let m = &config.model;
        let p = &config.policies;
        let json = |t: &toml::Table| {
            if t.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::to_value(t).unwrap_or(serde_json::Value::Null)
            }
        };
        let slot = |ms: u64, on_error, custom| SlotSettings {
            deadline: Duration::from_millis(ms),
            on_error,
            custom,
        };
        Self {
            engine: EngineLimits {
                memory_bytes: p.memory_limit_bytes,
                fuel: p.fuel,
                max_instances: p.max_instances,
                parallel_compile: p.parallel_compile,
                log_lines_per_call: p.log_lines_per_call,
                ..EngineLimits::default()
            },
            max_upload_bytes: p.max_upload_bytes,
            prewarm: p.prewarm,
            validator: ValidatorConfig {
                variant: m.variant.as_str().into(),
                min_size: m.min_size,
                max_width: m.max_width,
                max_height: m.max_height,
                default_width: m.default_width,
                default_height: m.default_height,
                max_steps: m.max_steps,
                max_num_images: m.max_num_images,
                max_guidance: m.max_guidance as f32,
                max_prompt_chars: m.max_prompt_chars.min(u32::MAX as usize) as u32,
                styles: config.styles.keys().cloned().collect(),
                max_user_id_chars: p.validator.max_user_id_chars,
            },
            sanitizer: SanitizerConfig {
                max_chars: m.max_prompt_chars.min(u32::MAX as usize) as u32,
                blocked_terms: p.sanitizer.blocked_terms.clone(),
            },
            resilience: ResilienceConfig {
                breaker: p.resilience.breaker.clone(),
                retry: p.resilience.retry.clone(),
            },
            slots: [
                slot(
                    p.validator.deadline_ms,
                    p.validator.on_error,
                    json(&p.validator.custom),
                ),
                slot(
                    p.sanitizer.deadline_ms,
                    p.sanitizer.on_error,
                    json(&p.sanitizer.custom),
                ),
                slot(
                    p.resilience.deadline_ms,
                    p.resilience.on_error,
                    json(&p.resilience.custom),
                ),
            ],
        }
    }
}
