//! Typed configuration, layered as defaults < file < environment < CLI flags.
//!
//! `config/default.toml` is compiled in and *is* the defaults, so the documented file and the
//! behaviour cannot drift apart. Layers are merged as TOML tables before deserialising; the
//! merge refuses keys the defaults do not have and values of the wrong type, naming the key and
//! where it came from, so a typo in a file or an environment variable never passes silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

use headshot_plugin_sdk::rules::breaker::BreakerConfig;
use headshot_plugin_sdk::rules::retry::RetryConfig;

use crate::pipeline::device::{DTypeSpec, DeviceSpec};
use crate::pipeline::params::Limits;
use crate::pipeline::source::ModelSource;
use crate::pipeline::variant::Variant;
use crate::policy::OnError;

/// The documented defaults, exactly as shipped in `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of environment variables that override config keys (`HEADSHOT__MODEL__SOURCE`).
pub const ENV_PREFIX: &str = "HEADSHOT__";

/// Tables whose keys are user-defined (so new keys are allowed there).
const FREEFORM_TABLES: &[&str] = &[
    "styles",
    "policies.validator.custom",
    "policies.sanitizer.custom",
    "policies.resilience.custom",
];

fn is_freeform(prefix: &str) -> bool {
    FREEFORM_TABLES.iter().any(|t| {
        prefix == *t
            || prefix
                .strip_prefix(t)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// Why a configuration could not be used. Every variant names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {}: {source}", path.display())]
    Read {
        /// The file given with `--config`.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {origin} is not valid TOML: {message}")]
    Syntax {
        /// Where the text came from.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key that the configuration does not have.
    #[error("unknown config key `{key}` (from {origin}); see config/default.toml for every key")]
    UnknownKey {
        /// Dotted key path.
        key: String,
        /// File or environment variable it came from.
        origin: String,
    },
    /// A value of the wrong TOML type.
    #[error("config key `{key}` (from {origin}) must be {expected}, got {found}")]
    WrongType {
        /// Dotted key path.
        key: String,
        /// File or environment variable it came from.
        origin: String,
        /// The type the defaults have.
        expected: &'static str,
        /// What was given.
        found: String,
    },
    /// A value of the right type that is out of range or malformed.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// As `Invalid`, for a key a file or environment variable set: naming which one saves the
    /// operator a search through every layer.
    #[error("config key `{key}` (from {origin}): {message}")]
    InvalidFrom {
        /// Dotted key path.
        key: String,
        /// File or environment variable it came from.
        origin: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// The whole worker configuration. Later sections (server, storage, policies) join here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Folder for demo weights, state and local images.
    pub data_dir: PathBuf,
    /// The `[model]` section.
    pub model: ModelConfig,
    /// Named prompt templates with a `{subject}` placeholder.
    pub styles: BTreeMap<String, String>,
    /// The `[policies]` section.
    pub policies: PoliciesConfig,
    /// The `[server]` section.
    pub server: ServerConfig,
    /// The `[jobs]` section.
    pub jobs: JobsConfig,
    /// The `[storage]` section.
    pub storage: StorageConfig,
    /// The `[resources]` section.
    pub resources: ResourcesConfig,
}

/// `[resources]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesConfig {
    /// GPU working memory per pixel per image.
    pub gpu_bytes_per_pixel: u64,
    /// CPU working memory per pixel per image.
    pub cpu_bytes_per_pixel: u64,
    /// Fixed working memory per request.
    pub base_bytes: u64,
    /// Memory always left free.
    pub margin_bytes: u64,
    /// Suggested wait when refusing, ms.
    pub retry_after_ms: u64,
}

/// When the model loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadMode {
    /// On the first job.
    Lazy,
    /// At start, in the background.
    Eager,
}

/// Result delivery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// Signed URLs.
    Url,
    /// PNG bytes inline, base64.
    Base64,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    pub host: String,
    /// Local API port.
    pub port: u16,
    /// Admin API port.
    pub admin_port: u16,
    /// Admin token; empty = generated.
    pub admin_token: String,
    /// Body cap on job routes.
    pub max_body_bytes: usize,
    /// Accepted endpoint id (`*` = any).
    pub endpoint_id: String,
    /// Longest runsync wait, ms.
    pub runsync_wait_ms: u64,
    /// Result delivery.
    pub output: OutputMode,
}

/// What to do with jobs a crash left unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRestart {
    /// Run them again.
    Requeue,
    /// Mark them failed, with the reason.
    Fail,
}

/// `[jobs]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Waiting jobs beyond which /run answers 503.
    pub queue_capacity: usize,
    /// Crash recovery.
    pub on_restart: OnRestart,
    /// History count cap.
    pub retention_count: usize,
    /// History age cap, hours.
    pub retention_hours: u64,
    /// Finished jobs whose progress stream stays in memory for a late `/stream` reader.
    pub stream_keep_finished: usize,
}

/// Storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// Files under the data dir.
    Local,
    /// Supabase Storage.
    Supabase,
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Which backend.
    pub backend: StorageBackend,
    /// Signed URL lifetime, seconds.
    pub url_ttl_secs: u64,
    /// `[storage.local]`.
    pub local: LocalStorageConfig,
    /// `[storage.supabase]`.
    pub supabase: SupabaseStorageConfig,
}

/// `[storage.local]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalStorageConfig {
    /// URL base; empty = from `[server]`.
    pub public_base_url: String,
    /// HMAC key; empty = generated.
    pub signing_key: String,
}

/// `[storage.supabase]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupabaseStorageConfig {
    /// Project URL.
    pub url: String,
    /// Service key.
    pub service_key: String,
    /// Bucket.
    pub bucket: String,
    /// Request timeout, ms.
    pub timeout_ms: u64,
    /// Cache-Control max-age, seconds.
    pub cache_max_age_secs: u64,
}

/// The `[policies]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesConfig {
    /// Largest accepted upload, bytes.
    pub max_upload_bytes: usize,
    /// Memory cap per instance, bytes.
    pub memory_limit_bytes: usize,
    /// Fuel per call; 0 = off.
    pub fuel: u64,
    /// Live instance ceiling.
    pub max_instances: u32,
    /// Ready instances per version.
    pub prewarm: usize,
    /// Parallel Cranelift compilation.
    pub parallel_compile: bool,
    /// Log lines per call.
    pub log_lines_per_call: u32,
    /// `[policies.validator]`.
    pub validator: ValidatorSlotConfig,
    /// `[policies.sanitizer]`.
    pub sanitizer: SanitizerSlotConfig,
    /// `[policies.resilience]`.
    pub resilience: ResilienceSlotConfig,
}

/// `[policies.validator]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidatorSlotConfig {
    /// Per-call deadline, ms.
    pub deadline_ms: u64,
    /// Failure behaviour.
    pub on_error: OnError,
    /// Longest user id.
    pub max_user_id_chars: u32,
    /// Settings for a custom validator.
    pub custom: toml::Table,
}

/// `[policies.sanitizer]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SanitizerSlotConfig {
    /// Per-call deadline, ms.
    pub deadline_ms: u64,
    /// Failure behaviour.
    pub on_error: OnError,
    /// Refused terms.
    pub blocked_terms: Vec<String>,
    /// Settings for a custom sanitizer.
    pub custom: toml::Table,
}

/// `[policies.resilience]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResilienceSlotConfig {
    /// Per-call deadline, ms.
    pub deadline_ms: u64,
    /// Failure behaviour.
    pub on_error: OnError,
    /// Breaker thresholds.
    pub breaker: BreakerConfig,
    /// Retry schedule.
    pub retry: RetryConfig,
    /// Settings for a custom resilience policy.
    pub custom: toml::Table,
}

/// The `[model]` section: which weights, on which device, and the request limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Where weights come from (`demo`, `hub:…`, `dir:…`).
    pub source: ModelSource,
    /// FLUX.1 variant.
    pub variant: Variant,
    /// Compute device.
    pub device: DeviceSpec,
    /// Activation and weight dtype.
    pub dtype: DTypeSpec,
    /// Smallest accepted side, pixels.
    pub min_size: u32,
    /// Largest accepted width, pixels.
    pub max_width: u32,
    /// Largest accepted height, pixels.
    pub max_height: u32,
    /// Width used when a job gives none.
    pub default_width: u32,
    /// Height used when a job gives none.
    pub default_height: u32,
    /// Largest accepted step count.
    pub max_steps: u32,
    /// Largest accepted batch.
    pub max_num_images: u32,
    /// Largest accepted guidance (dev only).
    pub max_guidance: f64,
    /// Longest accepted prompt, characters.
    pub max_prompt_chars: usize,
    /// Entries in the prompt-embedding LRU cache.
    pub embedding_cache_size: usize,
    /// Attempts in all for transient load failures.
    pub load_attempts: u32,
    /// First backoff between load attempts, doubled each time.
    pub load_backoff_ms: u64,
    /// When the model loads.
    pub load: LoadMode,
    /// Retry failed loads in the background.
    pub reinit: bool,
    /// Attention implementation of the transformer.
    pub attention: crate::pipeline::flux::attention::AttentionKernel,
    /// FP8 e4m3 weights for the transformer blocks' projections.
    pub fp8: bool,
    /// How FP8 weights and activations are scaled: per tensor, per row, or `auto` (per row
    /// with `fp8`).
    pub fp8_scale: crate::pipeline::flux::layers::Fp8Scale,
    /// GEMM implementation of the transformer blocks' projections.
    pub gemm: crate::pipeline::flux::layers::GemmKernel,
}

impl ModelConfig {
    /// The request limits this section sets, in the form the pipeline checks them.
    pub fn limits(&self) -> Limits {
        Limits {
            min_size: self.min_size,
            max_width: self.max_width,
            max_height: self.max_height,
            max_steps: self.max_steps,
            max_num_images: self.max_num_images,
            max_guidance: self.max_guidance,
            max_prompt_chars: self.max_prompt_chars,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        // The compiled-in defaults are checked by a unit test, so this cannot fail at run time
        // unless the binary itself was built from a broken default.toml.
        Self::from_layers(None, std::iter::empty()).unwrap_or_else(|e| {
            panic!("config/default.toml compiled into this binary is invalid: {e}")
        })
    }
}

impl Config {
    /// Loads defaults, then `file` if given, then `HEADSHOT__*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file_layer = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some((text, path.display().to_string()))
            }
            None => None,
        };
        Self::from_layers(
            file_layer.as_ref().map(|(t, o)| (t.as_str(), o.as_str())),
            env,
        )
    }

    /// Merges the defaults with an optional TOML text (and its origin) and env overrides.
    pub fn from_layers(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut merged = parse_table(DEFAULT_TOML, "config/default.toml")?;
        // Which layer set each key last, for errors found after the merge.
        let mut origins = Origins::new();
        if let Some((text, origin)) = file {
            let layer = parse_table(text, origin)?;
            merge_into(&mut merged, layer, "", origin, &mut origins)?;
        }
        // Well-known names (SUPABASE_URL, ...) first, so HEADSHOT__* overrides them.
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort_by_key(|(name, _)| name.starts_with(ENV_PREFIX));
        for (name, raw) in env {
            let well_known = match name.as_str() {
                "SUPABASE_URL" => Some("HEADSHOT__STORAGE__SUPABASE__URL"),
                "SUPABASE_SERVICE_ROLE_KEY" => Some("HEADSHOT__STORAGE__SUPABASE__SERVICE_KEY"),
                "SUPABASE_BUCKET" => Some("HEADSHOT__STORAGE__SUPABASE__BUCKET"),
                _ => None,
            };
            // Errors name the variable as the operator set it (SUPABASE_URL, not its mapping).
            let origin = format!("environment variable {name}");
            let name = match well_known {
                Some(mapped) => mapped.to_string(),
                None => name,
            };
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            let layer = env_layer(&merged, &path, &raw, &name)?;
            merge_into(&mut merged, layer, "", &origin, &mut origins)?;
        }
        let config = Config::deserialize(Value::Table(merged))
            .map_err(|e| deserialize_error(&e.to_string(), &origins))?;
        config.validate().map_err(|e| with_origin(e, &origins))?;
        Ok(config)
    }

    /// Checks ranges and relations between keys; run again after CLI flags change fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        if m.min_size < 16 || !m.min_size.is_multiple_of(16) {
            return Err(invalid(
                "model.min_size",
                format!(
                    "must be a multiple of 16 and at least 16, got {}",
                    m.min_size
                ),
            ));
        }
        for (key, v) in [
            ("model.max_width", m.max_width),
            ("model.max_height", m.max_height),
        ] {
            if !v.is_multiple_of(16) || v < m.min_size || v > 8192 {
                return Err(invalid(
                    key,
                    format!(
                        "must be a multiple of 16 between model.min_size ({}) and 8192, got {v}",
                        m.min_size
                    ),
                ));
            }
        }
        for (key, v, max) in [
            ("model.default_width", m.default_width, m.max_width),
            ("model.default_height", m.default_height, m.max_height),
        ] {
            if !v.is_multiple_of(16) || v < m.min_size || v > max {
                return Err(invalid(
                    key,
                    format!(
                        "must be a multiple of 16 between model.min_size ({}) and {max}, got {v}",
                        m.min_size
                    ),
                ));
            }
        }
        if !(1..=1000).contains(&m.max_steps) {
            return Err(invalid(
                "model.max_steps",
                format!("must be between 1 and 1000, got {}", m.max_steps),
            ));
        }
        if !(1..=16).contains(&m.max_num_images) {
            return Err(invalid(
                "model.max_num_images",
                format!("must be between 1 and 16, got {}", m.max_num_images),
            ));
        }
        if !(m.max_guidance.is_finite() && m.max_guidance >= 0.0) {
            return Err(invalid(
                "model.max_guidance",
                format!("must be a finite number >= 0, got {}", m.max_guidance),
            ));
        }
        if m.max_prompt_chars == 0 {
            return Err(invalid(
                "model.max_prompt_chars",
                "must be at least 1".into(),
            ));
        }
        if m.load_attempts == 0 {
            return Err(invalid("model.load_attempts", "must be at least 1".into()));
        }
        // A scaling for FP8 weights that are not FP8 would be silently ignored: say so.
        // (Before "auto" became the default, "tensor" was it and shipped in default.toml: a
        // config copied from that file says so, and gets told what changed.)
        if !m.fp8 && m.fp8_scale != crate::pipeline::flux::layers::Fp8Scale::Auto {
            return Err(invalid(
                "model.fp8_scale",
                format!(
                    "{:?} applies only with model.fp8 = true; set that, or remove the line (the \
                     default is now \"auto\": per row with FP8 weights, nothing without)",
                    m.fp8_scale.name()
                ),
            ));
        }
        // FP8 weights on a GPU run only in the FP8 GEMM (bf16 activations, `gemm = "auto"`).
        // With the device named, say so now rather than after reading the checkpoint.
        if m.fp8 && matches!(m.device, crate::pipeline::device::DeviceSpec::Cuda(_)) {
            use crate::pipeline::device::DTypeSpec;
            if m.gemm == crate::pipeline::flux::layers::GemmKernel::Plain {
                return Err(invalid(
                    "model.gemm",
                    "must be \"auto\" with model.fp8 on CUDA: FP8 weights run only in the FP8 GEMM"
                        .into(),
                ));
            }
            if !matches!(m.dtype, DTypeSpec::Auto | DTypeSpec::Bf16) {
                return Err(invalid(
                    "model.dtype",
                    "must be \"auto\" or \"bf16\" with model.fp8 on CUDA: the FP8 GEMM takes \
                     bf16 activations"
                        .into(),
                ));
            }
        }
        self.validate_policies()?;
        self.validate_service()?;
        for (name, template) in &self.styles {
            let key = format!("styles.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                return Err(invalid(
                    &key,
                    "style names use only a-z, 0-9, '_' and '-'".into(),
                ));
            }
            if !template.contains("{subject}") {
                return Err(invalid(
                    &key,
                    "the template must contain `{subject}`".into(),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_service(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        let s = &self.server;
        if s.host.trim().is_empty() {
            return Err(invalid("server.host", "must not be empty".into()));
        }
        if s.port != 0 && s.port == s.admin_port {
            return Err(invalid(
                "server.admin_port",
                format!("must differ from server.port ({})", s.port),
            ));
        }
        if !(1024..=256 << 20).contains(&s.max_body_bytes) {
            return Err(invalid(
                "server.max_body_bytes",
                format!(
                    "must be between 1 KiB and 256 MiB, got {}",
                    s.max_body_bytes
                ),
            ));
        }
        if s.endpoint_id.is_empty() {
            return Err(invalid(
                "server.endpoint_id",
                "use \"*\" to accept any".into(),
            ));
        }
        if !s.admin_token.is_empty() && s.admin_token.len() < 16 {
            // Short tokens are guessable.
            return Err(invalid(
                "server.admin_token",
                "must be at least 16 characters (or empty to generate one)".into(),
            ));
        }
        let j = &self.jobs;
        if j.queue_capacity == 0 {
            return Err(invalid("jobs.queue_capacity", "must be at least 1".into()));
        }
        if j.retention_count == 0 || j.retention_hours == 0 {
            return Err(invalid(
                "jobs.retention_count",
                "retention_count and retention_hours must be at least 1".into(),
            ));
        }
        let st = &self.storage;
        if !(1..=7 * 24 * 3600).contains(&st.url_ttl_secs) {
            return Err(invalid(
                "storage.url_ttl_secs",
                format!("must be between 1 and 604800, got {}", st.url_ttl_secs),
            ));
        }
        if st.supabase.timeout_ms == 0 {
            return Err(invalid(
                "storage.supabase.timeout_ms",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn validate_policies(&self) -> Result<(), ConfigError> {
        let p = &self.policies;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        if !(1 << 20..=4 << 30).contains(&p.memory_limit_bytes) {
            return Err(invalid(
                "policies.memory_limit_bytes",
                format!(
                    "must be between 1 MiB and 4 GiB, got {}",
                    p.memory_limit_bytes
                ),
            ));
        }
        if !(4..=10_000).contains(&p.max_instances) {
            return Err(invalid(
                "policies.max_instances",
                format!("must be between 4 and 10000, got {}", p.max_instances),
            ));
        }
        if p.prewarm > 64 {
            return Err(invalid(
                "policies.prewarm",
                format!("must be at most 64, got {}", p.prewarm),
            ));
        }
        if !(1024..=100 << 20).contains(&p.max_upload_bytes) {
            return Err(invalid(
                "policies.max_upload_bytes",
                format!(
                    "must be between 1 KiB and 100 MiB, got {}",
                    p.max_upload_bytes
                ),
            ));
        }
        for (key, ms) in [
            ("policies.validator.deadline_ms", p.validator.deadline_ms),
            ("policies.sanitizer.deadline_ms", p.sanitizer.deadline_ms),
            ("policies.resilience.deadline_ms", p.resilience.deadline_ms),
        ] {
            if !(1..=10_000).contains(&ms) {
                return Err(invalid(
                    key,
                    format!("must be between 1 and 10000, got {ms}"),
                ));
            }
        }
        if !(1..=256).contains(&p.validator.max_user_id_chars) {
            return Err(invalid(
                "policies.validator.max_user_id_chars",
                format!(
                    "must be between 1 and 256, got {}",
                    p.validator.max_user_id_chars
                ),
            ));
        }
        if let Some(bad) = p
            .sanitizer
            .blocked_terms
            .iter()
            .find(|t| t.trim().is_empty())
        {
            return Err(invalid(
                "policies.sanitizer.blocked_terms",
                format!("terms must not be blank, got {bad:?}"),
            ));
        }
        p.resilience
            .breaker
            .check()
            .map_err(|e| invalid("policies.resilience.breaker", e))?;
        p.resilience
            .retry
            .check()
            .map_err(|e| invalid("policies.resilience.retry", e))?;
        Ok(())
    }
}

fn parse_table(text: &str, origin: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// Dotted key → the file or environment variable that set it last.
type Origins = BTreeMap<String, String>;

/// A value serde refused after the merge (an unknown enum variant, a port past 65535). toml
/// ends its message with "in `dotted.key`" (after a space or a newline); the key and the layer
/// that set it are named.
fn deserialize_error(message: &str, origins: &Origins) -> ConfigError {
    let located = message
        .trim_end()
        .rsplit_once("in `")
        .filter(|(what, _)| what.ends_with(char::is_whitespace))
        .and_then(|(what, rest)| Some((what.trim_end(), rest.strip_suffix('`')?)));
    match located {
        Some((what, key)) => with_origin(
            ConfigError::Invalid {
                key: key.into(),
                message: what.into(),
            },
            origins,
        ),
        None => ConfigError::Invalid {
            key: "(config)".into(),
            message: message.into(),
        },
    }
}

/// Names the layer that set an invalid key, when one did (a default has no layer to name). A
/// key inside a table set whole (a freeform one) takes the table's layer.
fn with_origin(error: ConfigError, origins: &Origins) -> ConfigError {
    let origin_of = |key: &str| {
        let mut at = Some(key);
        while let Some(k) = at {
            if let Some(origin) = origins.get(k) {
                return Some(origin);
            }
            at = k.rsplit_once('.').map(|(parent, _)| parent);
        }
        None
    };
    match error {
        ConfigError::Invalid { key, message } => match origin_of(&key) {
            Some(origin) => ConfigError::InvalidFrom {
                key,
                origin: origin.clone(),
                message,
            },
            None => ConfigError::Invalid { key, message },
        },
        other => other,
    }
}

/// Overlays `over` onto `base`, refusing unknown keys and type changes.
fn merge_into(
    base: &mut Table,
    over: Table,
    prefix: &str,
    origin: &str,
    origins: &mut Origins,
) -> Result<(), ConfigError> {
    let freeform = is_freeform(prefix);
    for (k, v) in over {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match base.get_mut(&k) {
            None if freeform => {
                origins.insert(key, origin.into());
                base.insert(k, v);
            }
            None => {
                return Err(ConfigError::UnknownKey {
                    key,
                    origin: origin.into(),
                });
            }
            Some(slot) => match (slot, v) {
                (Value::Table(b), Value::Table(o)) => merge_into(b, o, &key, origin, origins)?,
                (slot @ Value::Float(_), Value::Integer(i)) => {
                    origins.insert(key, origin.into());
                    *slot = Value::Float(i as f64)
                }
                (slot, v) if std::mem::discriminant(slot) == std::mem::discriminant(&v) => {
                    origins.insert(key, origin.into());
                    *slot = v
                }
                (slot, v) => {
                    return Err(ConfigError::WrongType {
                        key,
                        origin: origin.into(),
                        expected: type_name(slot),
                        found: format!("{} ({v})", type_name(&v)),
                    });
                }
            },
        }
    }
    Ok(())
}

/// Builds a one-key table from an environment variable, typed like the default at that path.
fn env_layer(base: &Table, path: &[String], raw: &str, var: &str) -> Result<Table, ConfigError> {
    let key = path.join(".");
    let origin = format!("environment variable {var}");
    let mut cursor = Some(base);
    let mut default: Option<&Value> = None;
    for (i, part) in path.iter().enumerate() {
        let table = cursor.take();
        let found = table.and_then(|t| t.get(part));
        if i + 1 == path.len() {
            default = found;
        } else {
            cursor = found.and_then(Value::as_table);
        }
    }
    let parent = path[..path.len().saturating_sub(1)].join(".");
    let value = match default {
        Some(Value::String(_)) => Value::String(raw.to_string()),
        None if is_freeform(&parent) => Value::String(raw.to_string()),
        None => {
            return Err(ConfigError::UnknownKey { key, origin });
        }
        Some(Value::Integer(_)) => {
            raw.trim()
                .parse::<i64>()
                .map(Value::Integer)
                .map_err(|_| ConfigError::WrongType {
                    key: key.clone(),
                    origin: origin.clone(),
                    expected: "an integer",
                    found: format!("`{raw}`"),
                })?
        }
        Some(Value::Float(_)) => {
            raw.trim()
                .parse::<f64>()
                .map(Value::Float)
                .map_err(|_| ConfigError::WrongType {
                    key: key.clone(),
                    origin: origin.clone(),
                    expected: "a number",
                    found: format!("`{raw}`"),
                })?
        }
        Some(Value::Boolean(_)) => match raw.trim() {
            "true" | "1" => Value::Boolean(true),
            "false" | "0" => Value::Boolean(false),
            _ => {
                return Err(ConfigError::WrongType {
                    key,
                    origin,
                    expected: "a boolean (true/false)",
                    found: format!("`{raw}`"),
                });
            }
        },
        Some(other) => {
            // Arrays and tables: accept a TOML literal.
            let parsed = format!("v = {raw}")
                .parse::<Table>()
                .ok()
                .and_then(|mut t| t.remove("v"));
            match parsed {
                Some(v) => v,
                None => {
                    return Err(ConfigError::WrongType {
                        key,
                        origin,
                        expected: type_name(other),
                        found: format!("`{raw}`"),
                    });
                }
            }
        }
    };
    let mut layer = Table::new();
    let mut current = &mut layer;
    for part in &path[..path.len() - 1] {
        current = current
            .entry(part.clone())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .ok_or_else(|| ConfigError::Invalid {
                key: key.clone(),
                message: "conflicting path".into(),
            })?;
    }
    if let Some(last) = path.last() {
        current.insert(last.clone(), value);
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_defaults_parse_and_validate() {
        let c = Config::from_layers(None, env(&[])).unwrap();
        assert_eq!(c.model.source, ModelSource::Demo);
        assert_eq!(c.model.variant, Variant::Schnell);
        for style in ["corporate", "casual", "studio", "outdoor"] {
            assert!(c.styles[style].contains("{subject}"), "{style}");
        }
        assert_eq!(c, Config::default());
    }

    #[test]
    fn file_layer_overrides_and_keeps_other_defaults() {
        let c = Config::from_layers(
            Some(("[model]\nmax_steps = 8\nmax_guidance = 7\n", "test.toml")),
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.model.max_steps, 8);
        assert_eq!(c.model.max_guidance, 7.0);
        assert_eq!(c.model.max_width, 1536);
    }

    #[test]
    fn unknown_key_is_named_with_its_origin() {
        let e = Config::from_layers(Some(("[model]\nmax_stpes = 8\n", "my.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.max_stpes") && e.contains("my.toml"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let e = Config::from_layers(Some(("[model]\nmax_width = \"big\"\n", "f.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.max_width") && e.contains("integer"),
            "{e}"
        );
    }

    #[test]
    fn values_refused_after_the_merge_name_their_key_and_the_layer_that_set_them() {
        let cases = [
            ("HEADSHOT__JOBS__ON_RESTART", "maybe", "`jobs.on_restart`"),
            ("HEADSHOT__SERVER__PORT", "70000", "`server.port`"),
            (
                "HEADSHOT__SERVER__ADMIN_TOKEN",
                "short",
                "`server.admin_token`",
            ),
        ];
        for (var, value, key) in cases {
            let e = Config::from_layers(None, env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(key) && e.contains(&format!("environment variable {var}")),
                "{var}: {e}"
            );
        }
        let e = Config::from_layers(
            Some(("[jobs]\non_restart = \"maybe\"\n", "f.toml")),
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`jobs.on_restart` (from f.toml)"), "{e}");
        // A relation between a set key and a default names the set one's layer only where
        // the blamed key was set.
        let e = Config::from_layers(None, env(&[("HEADSHOT__MODEL__MIN_SIZE", "2000")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.min_size (2000)"), "{e}");
    }

    #[test]
    fn env_overrides_file_and_names_bad_values() {
        let c = Config::from_layers(
            Some(("[model]\nmax_steps = 8\n", "f.toml")),
            env(&[("HEADSHOT__MODEL__MAX_STEPS", "9"), ("UNRELATED", "x")]),
        )
        .unwrap();
        assert_eq!(c.model.max_steps, 9);
        let c = Config::from_layers(None, env(&[("HEADSHOT__MODEL__SOURCE", "dir:/w")])).unwrap();
        assert_eq!(c.model.source, ModelSource::Dir("/w".into()));
        let e = Config::from_layers(None, env(&[("HEADSHOT__MODEL__MAX_STEPS", "many")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.max_steps") && e.contains("HEADSHOT__MODEL__MAX_STEPS"),
            "{e}"
        );
        let e = Config::from_layers(None, env(&[("HEADSHOT__MODEL__NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.nope"), "{e}");
    }

    #[test]
    fn bad_enum_values_name_the_key() {
        for (toml, key) in [
            ("[model]\ndevice = \"tpu\"\n", "model.device"),
            ("[model]\nvariant = \"pro\"\n", "model.variant"),
            ("[model]\nsource = \"s3:x\"\n", "model.source"),
            ("[model]\ndtype = \"int4\"\n", "model.dtype"),
            ("[model]\nattention = \"sparse\"\n", "model.attention"),
            ("[model]\ngemm = \"tensorrt\"\n", "model.gemm"),
            ("[model]\nfp8_scale = \"channel\"\n", "model.fp8_scale"),
            (
                "[jobs]\nstream_keep_finished = -1\n",
                "jobs.stream_keep_finished",
            ),
        ] {
            let e = Config::from_layers(Some((toml, "f.toml")), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn fp8_on_a_named_gpu_needs_the_fp8_gemm_and_bf16() {
        for (toml, key) in [
            (
                "[model]\ndevice = \"cuda\"\nfp8 = true\ngemm = \"plain\"\n",
                "model.gemm",
            ),
            (
                "[model]\ndevice = \"cuda:0\"\nfp8 = true\ndtype = \"f32\"\n",
                "model.dtype",
            ),
            ("[model]\nfp8_scale = \"row\"\n", "model.fp8_scale"),
            ("[model]\nfp8_scale = \"tensor\"\n", "model.fp8_scale"),
        ] {
            let e = Config::from_layers(Some((toml, "f.toml")), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        // A config copied from the old default.toml (which shipped "tensor") is told what
        // changed, whichever layer set it.
        let e = Config::from_layers(None, env(&[("HEADSHOT__MODEL__FP8_SCALE", "tensor")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"tensor\" applies only with model.fp8 = true")
                && e.contains("now \"auto\""),
            "{e}"
        );
        // The same settings are fine on the CPU (weights widened for candle's matmul), and
        // FP8 with bf16 and the fused GEMM is fine on CUDA.
        for toml in [
            "[model]\ndevice = \"cpu\"\nfp8 = true\ngemm = \"plain\"\ndtype = \"f32\"\n",
            "[model]\ndevice = \"cuda\"\nfp8 = true\ndtype = \"bf16\"\n",
        ] {
            Config::from_layers(Some((toml, "f.toml")), env(&[])).unwrap();
        }
    }

    #[test]
    fn attention_kernel_and_stream_ring_are_settable() {
        let c = Config::from_layers(
            Some((
                "[model]\nattention = \"fused\"\nfp8 = true\nfp8_scale = \"row\"\ngemm = \"plain\"\n[jobs]\nstream_keep_finished = 8\n",
                "f.toml",
            )),
            env(&[]),
        )
        .unwrap();
        assert_eq!(
            c.model.attention,
            crate::pipeline::flux::attention::AttentionKernel::Fused
        );
        assert_eq!(c.jobs.stream_keep_finished, 8);
        // The pipeline is loaded with them.
        let load = crate::pipeline::LoadOptions::from_config(&c);
        assert_eq!(
            load.attention,
            crate::pipeline::flux::attention::AttentionKernel::Fused
        );
        assert!(load.fp8);
        assert_eq!(load.fp8_scale, crate::pipeline::flux::layers::Fp8Scale::Row);
        assert_eq!(load.gemm, crate::pipeline::flux::layers::GemmKernel::Plain);
        let d = Config::from_layers(None, env(&[])).unwrap();
        assert_eq!(
            d.model.gemm,
            crate::pipeline::flux::layers::GemmKernel::Auto
        );
        assert_eq!(
            d.model.attention,
            crate::pipeline::flux::attention::AttentionKernel::Auto
        );
        assert_eq!(d.jobs.stream_keep_finished, 1024);
        assert!(!d.model.fp8);
        assert_eq!(
            d.model.fp8_scale,
            crate::pipeline::flux::layers::Fp8Scale::Auto
        );
    }

    #[test]
    fn range_checks_name_the_key() {
        for (toml, key) in [
            ("[model]\nmin_size = 20\n", "model.min_size"),
            ("[model]\nmax_width = 1000\n", "model.max_width"),
            ("[model]\nmax_num_images = 0\n", "model.max_num_images"),
            ("[model]\nload_attempts = 0\n", "model.load_attempts"),
            ("[styles]\nplain = \"no placeholder\"\n", "styles.plain"),
        ] {
            let e = Config::from_layers(Some((toml, "f.toml")), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
            assert!(e.contains("(from f.toml)"), "{toml}: {e}");
        }
    }

    #[test]
    fn styles_accept_new_keys() {
        let c = Config::from_layers(
            Some((
                "[styles]\nnoir = \"black and white photo of {subject}\"\n",
                "f.toml",
            )),
            env(&[("HEADSHOT__STYLES__BEACH", "beach photo of {subject}")]),
        )
        .unwrap();
        assert!(c.styles.contains_key("noir") && c.styles.contains_key("beach"));
        assert!(c.styles.contains_key("corporate"));
    }
}
