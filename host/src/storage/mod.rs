//! Where generated images go: the embedded local store (default) or Supabase Storage.
//!
//! Both sit behind [`ImageStore`]; [`Store`] picks one from the config. Keys are always
//! `{user_id}/{job_id}/{n}.png`, built through [`ObjectKey::new`], which refuses any user or
//! job id that could escape its folder — ids never reach a path or URL unvalidated.

pub mod local;
pub mod supabase;

use std::future::Future;
use std::time::Duration;

use headshot_plugin_sdk::rules::retry::ErrorKind;
use serde::Serialize;

pub use local::LocalStore;
pub use supabase::SupabaseStore;

/// Longest accepted job id in a storage key.
pub const MAX_JOB_ID_CHARS: usize = 128;

/// A validated storage key `{user_id}/{job_id}/{index}.png`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ObjectKey {
    user_id: String,
    job_id: String,
    index: u32,
}

impl ObjectKey {
    /// Checks both ids: `[A-Za-z0-9][A-Za-z0-9_-]*`, user ids up to `max_user_chars`, job ids
    /// up to [`MAX_JOB_ID_CHARS`].
    pub fn new(
        user_id: &str,
        job_id: &str,
        index: u32,
        max_user_chars: usize,
    ) -> Result<Self, StorageError> {
        if !headshot_plugin_sdk::rules::request::user_id_is_safe(user_id, max_user_chars) {
            return Err(StorageError::InvalidKey(format!(
                "user_id must match [A-Za-z0-9][A-Za-z0-9_-]* and be at most {max_user_chars} characters"
            )));
        }
        if !headshot_plugin_sdk::rules::request::user_id_is_safe(job_id, MAX_JOB_ID_CHARS) {
            return Err(StorageError::InvalidKey(format!(
                "job id must match [A-Za-z0-9][A-Za-z0-9_-]* and be at most {MAX_JOB_ID_CHARS} characters"
            )));
        }
        Ok(Self {
            user_id: user_id.into(),
            job_id: job_id.into(),
            index,
        })
    }

    /// The key as a relative path: `user/job/n.png`.
    pub fn path(&self) -> String {
        format!("{}/{}/{}.png", self.user_id, self.job_id, self.index)
    }

    /// User id part.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Job id part.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Image index within the job.
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// What an upload found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadOutcome {
    /// Stored now.
    Created,
    /// The key already held an object (a retried job): treated as done, never uploaded twice.
    AlreadyExisted,
}

/// A download URL that stops working at `expires_at_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignedUrl {
    /// Absolute URL.
    pub url: String,
    /// Unix ms.
    pub expires_at_ms: u64,
}

/// A storage failure, classified for the retry policy.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StorageError {
    /// A user or job id that may not become a key.
    #[error("invalid storage key: {0}")]
    InvalidKey(String),
    /// Missing or unusable settings (URL, key, bucket).
    #[error("storage is not configured: {0}")]
    Config(String),
    /// The service refused our credentials.
    #[error("storage refused the credentials ({status}): {message}")]
    Unauthorized {
        /// `statusCode` from the body (or the HTTP status).
        status: u16,
        /// The service's message.
        message: String,
    },
    /// No answer in time.
    #[error("storage timed out after {0:?}")]
    Timeout(Duration),
    /// Could not connect (refused, DNS, TLS).
    #[error("could not reach storage: {0}")]
    Connection(String),
    /// Too many requests.
    #[error("storage is rate limiting: {message}")]
    RateLimited {
        /// The service's message.
        message: String,
        /// From `Retry-After`, when given.
        retry_after_ms: Option<u64>,
    },
    /// A 5xx, or a non-JSON answer from a gateway.
    #[error("storage server error ({status}{}): {message}", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Server {
        /// HTTP status or body `statusCode`.
        status: u16,
        /// Body `code`, when present.
        code: Option<String>,
        /// The service's message (truncated).
        message: String,
    },
    /// A request the service refused for what it is (4xx other than the above).
    #[error("storage refused the request ({status}{}): {message}", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Client {
        /// Body `statusCode` (or HTTP status).
        status: u16,
        /// Body `code`.
        code: Option<String>,
        /// The service's message (truncated).
        message: String,
    },
    /// Local filesystem trouble.
    #[error("storage I/O: {0}")]
    Io(String),
}

impl StorageError {
    /// How the retry policy should see this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::Connection(_) => ErrorKind::Connection,
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::Server { .. } | Self::Io(_) => ErrorKind::ServerError,
            Self::InvalidKey(_)
            | Self::Config(_)
            | Self::Unauthorized { .. }
            | Self::Client { .. } => ErrorKind::ClientError,
        }
    }

    /// Status code for the retry policy, when there is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Unauthorized { status, .. }
            | Self::Server { status, .. }
            | Self::Client { status, .. } => Some(*status),
            Self::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// `Retry-After`, when the service sent one.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_ms, .. } => *retry_after_ms,
            _ => None,
        }
    }
}

/// An image store. Implementations must be idempotent per key: uploading to a key that
/// exists reports [`UploadOutcome::AlreadyExisted`] and does not overwrite.
pub trait ImageStore: Send + Sync {
    /// Stores one PNG.
    fn upload(
        &self,
        key: &ObjectKey,
        png: Vec<u8>,
    ) -> impl Future<Output = Result<UploadOutcome, StorageError>> + Send;
    /// Signs download URLs valid for `ttl`, one per key, in order.
    fn sign(
        &self,
        keys: &[ObjectKey],
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<SignedUrl>, StorageError>> + Send;
    /// Cheap reachability and credentials check (for `headshot check` and `/readyz`).
    fn health(&self) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// `local` or `supabase`.
    fn name(&self) -> &'static str;
}

/// The configured store.
pub enum Store {
    /// Files under the data dir, URLs served and verified by the local API.
    Local(LocalStore),
    /// Supabase Storage over its REST API.
    Supabase(SupabaseStore),
}

impl ImageStore for Store {
    async fn upload(&self, key: &ObjectKey, png: Vec<u8>) -> Result<UploadOutcome, StorageError> {
        match self {
            Self::Local(s) => s.upload(key, png).await,
            Self::Supabase(s) => s.upload(key, png).await,
        }
    }

    async fn sign(
        &self,
        keys: &[ObjectKey],
        ttl: Duration,
    ) -> Result<Vec<SignedUrl>, StorageError> {
        match self {
            Self::Local(s) => s.sign(keys, ttl).await,
            Self::Supabase(s) => s.sign(keys, ttl).await,
        }
    }

    async fn health(&self) -> Result<(), StorageError> {
        match self {
            Self::Local(s) => s.health().await,
            Self::Supabase(s) => s.health().await,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Local(s) => s.name(),
            Self::Supabase(s) => s.name(),
        }
    }
}
