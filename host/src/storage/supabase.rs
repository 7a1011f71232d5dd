//! Supabase Storage over its REST API (`shared/ref/supabase.md`), with reqwest.
//!
//! What the server does that shapes this client:
//! - Almost every error is **HTTP 400** whose JSON body carries the real status as a
//!   *string*: `{"statusCode":"409","error":"Duplicate","message":"…","code":"KeyAlreadyExists"}`.
//!   Errors are classified on the body's `statusCode`/`code`; the HTTP status is only the
//!   fallback for bodies that are not the server's (gateway HTML, `{"message"}` from Kong).
//! - Uploads are create-only (`x-upsert: false`), and a duplicate is reported as
//!   [`UploadOutcome::AlreadyExisted`], so a retried job never uploads an image twice.
//! - `signedURL` comes back relative to the base URL and with its path *decoded*; it is
//!   re-encoded per segment and joined onto the base.
//! - Legacy keys are JWTs and go in `Authorization: Bearer` and `apikey`; the new
//!   `sb_secret_…` keys are not JWTs and go in `apikey` only (the gateway swaps them for a
//!   JWT). A publishable key cannot write and is refused up front.
//!
//! Nothing here retries: the caller runs every call under the resilience policy and uses
//! [`StorageError::kind`] and [`StorageError::retry_after_ms`] to decide.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

use super::{ImageStore, ObjectKey, SignedUrl, StorageError, UploadOutcome};
use crate::config::SupabaseStorageConfig;

/// Path every hosted project serves Storage under; appended to a bare project URL.
pub const STORAGE_PATH: &str = "/storage/v1";

/// Longest message kept from a service answer: enough to diagnose, short enough to log.
const MAX_MESSAGE_CHARS: usize = 300;

/// Longest bucket name the server accepts.
const MAX_BUCKET_CHARS: usize = 100;

/// Supabase Storage client for one bucket.
pub struct SupabaseStore {
    client: reqwest::Client,
    /// Base URL without a trailing `/`, e.g. `https://ref.supabase.co/storage/v1`.
    base: String,
    bucket: String,
    /// `bucket`, percent-encoded as one path segment.
    bucket_segment: String,
    timeout: Duration,
    cache_control: String,
    key_kind: KeyKind,
}

impl std::fmt::Debug for SupabaseStore {
    // By hand so the service key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupabaseStore")
            .field("base", &self.base)
            .field("bucket", &self.bucket)
            .field("timeout", &self.timeout)
            .field("key_kind", &self.key_kind)
            .finish_non_exhaustive()
    }
}

/// How the service key is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    /// Legacy `service_role` JWT: `Authorization: Bearer` and `apikey`.
    Jwt,
    /// `sb_secret_…`: `apikey` only.
    Secret,
}

impl SupabaseStore {
    /// Builds the client from `[storage.supabase]`, checking every setting first so a bad one
    /// fails at start-up, named, rather than on the first job.
    ///
    /// Base URL rule: when `url` has no path (`https://ref.supabase.co`, with or without a
    /// trailing `/`), [`STORAGE_PATH`] is appended, as every hosted project and `supabase
    /// start` serve Storage there. Any other path (`…/storage/v1`, a proxy prefix) is used as
    /// given, minus a trailing `/`. A bare storage server without a gateway therefore needs a
    /// path in front of it; it cannot be addressed at its root.
    pub fn new(cfg: &SupabaseStorageConfig) -> Result<Self, StorageError> {
        let base = normalize_base_url(&cfg.url)?;
        let key_kind = classify_key(&cfg.service_key)?;
        validate_bucket(&cfg.bucket)?;
        if cfg.timeout_ms == 0 {
            return Err(StorageError::Config(
                "storage.supabase.timeout_ms must be at least 1".into(),
            ));
        }
        let timeout = Duration::from_millis(cfg.timeout_ms);

        let mut headers = HeaderMap::new();
        let key = cfg.service_key.trim();
        let bad_key = |_| {
            StorageError::Config(
                "storage.supabase.service_key contains characters not allowed in a header".into(),
            )
        };
        let mut apikey = HeaderValue::from_str(key).map_err(bad_key)?;
        apikey.set_sensitive(true);
        headers.insert("apikey", apikey);
        if key_kind == KeyKind::Jwt {
            let mut bearer = HeaderValue::from_str(&format!("Bearer {key}")).map_err(bad_key)?;
            bearer.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, bearer);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("headshot-worker/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect means a wrong URL (http→https, a dashboard page); following it would
            // turn a POST into a GET. Report it instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                StorageError::Config(format!("building the HTTP client: {}", error_chain(&e)))
            })?;

        Ok(Self {
            client,
            bucket_segment: encode_segment(&cfg.bucket),
            bucket: cfg.bucket.clone(),
            base,
            timeout,
            cache_control: format!("max-age={}", cfg.cache_max_age_secs),
            key_kind,
        })
    }

    /// The base URL requests go to (after the rule in [`SupabaseStore::new`]), for
    /// `headshot check` and logs.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The bucket images go to.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn object_url(&self, route: &str, key: &ObjectKey) -> String {
        // Keys are built from [A-Za-z0-9_-] and '/', so they need no encoding.
        format!(
            "{}/{route}/{}/{}",
            self.base,
            self.bucket_segment,
            key.path()
        )
    }

    /// Sends a request and reads the whole answer, mapping transport failures.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, StorageError> {
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e))?;
        Ok(Answer {
            status,
            headers,
            body: body.to_vec(),
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> StorageError {
        if e.is_timeout() {
            StorageError::Timeout(self.timeout)
        } else {
            // Refused, reset, DNS, TLS, or the connection dropped mid-answer: all mean "the
            // service could not be reached properly", which the policy may retry.
            StorageError::Connection(truncate(&error_chain(e)))
        }
    }

    async fn sign_one(&self, key: &ObjectKey, expires_in: u64) -> Result<String, StorageError> {
        let answer = self
            .send(
                self.client
                    .post(self.object_url("object/sign", key))
                    .json(&serde_json::json!({ "expiresIn": expires_in })),
            )
            .await?;
        if !answer.status.is_success() {
            return Err(answer.failure().into_error(&self.bucket, Some(&key.path())));
        }
        let signed: SignOne =
            serde_json::from_slice(&answer.body).map_err(|_| answer.unexpected("signing"))?;
        let url = signed
            .signed_url
            .ok_or_else(|| answer.unexpected("signing"))?;
        self.absolute(&url)
            .ok_or_else(|| answer.unexpected("signing"))
    }

    async fn sign_batch(
        &self,
        keys: &[ObjectKey],
        expires_in: u64,
    ) -> Result<Vec<String>, StorageError> {
        let paths: Vec<String> = keys.iter().map(ObjectKey::path).collect();
        let url = format!("{}/object/sign/{}", self.base, self.bucket_segment);
        let answer = self
            .send(
                self.client
                    .post(url)
                    .json(&serde_json::json!({ "expiresIn": expires_in, "paths": paths })),
            )
            .await?;
        if !answer.status.is_success() {
            return Err(answer.failure().into_error(&self.bucket, None));
        }
        let items: Vec<SignItem> =
            serde_json::from_slice(&answer.body).map_err(|_| answer.unexpected("batch signing"))?;
        // Match by path, not position: the answer names each item.
        let mut out = Vec::with_capacity(paths.len());
        for path in &paths {
            let item = items
                .iter()
                .find(|i| i.path.as_deref() == Some(path.as_str()));
            match item {
                Some(SignItem {
                    signed_url: Some(url),
                    error: None,
                    ..
                }) => {
                    out.push(
                        self.absolute(url)
                            .ok_or_else(|| answer.unexpected("batch signing"))?,
                    );
                }
                Some(SignItem { error, .. }) => {
                    let failed = items
                        .iter()
                        .filter(|i| i.error.is_some() || i.signed_url.is_none())
                        .count();
                    return Err(StorageError::Client {
                        status: 404,
                        code: Some("NoSuchKey".into()),
                        message: truncate(&format!(
                            "could not sign {path} in bucket {:?} ({failed} of {} failed): {}",
                            self.bucket,
                            paths.len(),
                            error.as_deref().unwrap_or("no signedURL returned")
                        )),
                    });
                }
                None => {
                    return Err(StorageError::Server {
                        status: answer.status.as_u16(),
                        code: None,
                        message: truncate(&format!(
                            "batch signing answered without an item for {path}"
                        )),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Joins a `signedURL` (relative, path decoded) onto the base, re-encoding the path and
    /// keeping the query (the token) exactly as given. `None` for something that is not a
    /// relative URL.
    fn absolute(&self, signed: &str) -> Option<String> {
        let (path, query) = match signed.find('?') {
            Some(i) => (&signed[..i], Some(&signed[i + 1..])),
            None => (signed, None),
        };
        if !path.starts_with('/') || path.starts_with("//") {
            return None;
        }
        let encoded: Vec<String> = path.split('/').map(encode_segment).collect();
        let mut url = format!("{}{}", self.base, encoded.join("/"));
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        Url::parse(&url).ok().map(String::from)
    }
}

impl ImageStore for SupabaseStore {
    async fn upload(&self, key: &ObjectKey, png: Vec<u8>) -> Result<UploadOutcome, StorageError> {
        let path = key.path();
        let bytes = png.len();
        let request = self
            .client
            .post(self.object_url("object", key))
            .header(header::CONTENT_TYPE, "image/png")
            .header(header::CACHE_CONTROL, &self.cache_control)
            .header("x-upsert", "false")
            .body(png);
        let answer = self.send(request).await?;
        if answer.status.is_success() {
            tracing::debug!(key = %path, bytes, "uploaded image to supabase");
            return Ok(UploadOutcome::Created);
        }
        let failure = answer.failure();
        if failure.is_duplicate() {
            tracing::info!(key = %path, "image already in supabase; kept the existing object");
            return Ok(UploadOutcome::AlreadyExisted);
        }
        let err = failure.into_error(&self.bucket, Some(&path));
        tracing::debug!(key = %path, error = %err, "supabase upload failed");
        Err(err)
    }

    async fn sign(
        &self,
        keys: &[ObjectKey],
        ttl: Duration,
    ) -> Result<Vec<SignedUrl>, StorageError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // The server computes exp from its own clock after receiving the request; taking ours
        // first keeps `expires_at_ms` on the safe side.
        let expires_in = ttl_secs(ttl);
        let expires_at_ms = now_ms().saturating_add(expires_in.saturating_mul(1000));
        let urls = if keys.len() == 1 {
            vec![self.sign_one(&keys[0], expires_in).await?]
        } else {
            self.sign_batch(keys, expires_in).await?
        };
        Ok(urls
            .into_iter()
            .map(|url| SignedUrl { url, expires_at_ms })
            .collect())
    }

    async fn health(&self) -> Result<(), StorageError> {
        // Reading the bucket needs valid credentials and an existing bucket, and moves no data.
        let url = format!("{}/bucket/{}", self.base, self.bucket_segment);
        let answer = self.send(self.client.get(url)).await?;
        if answer.status.is_success() {
            return Ok(());
        }
        Err(answer.failure().into_error(&self.bucket, None))
    }

    fn name(&self) -> &'static str {
        "supabase"
    }
}

/// A whole HTTP answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    /// A 2xx answer whose body is not what the API documents.
    fn unexpected(&self, what: &str) -> StorageError {
        StorageError::Server {
            status: self.status.as_u16(),
            code: None,
            message: truncate(&format!(
                "unexpected answer to {what}: {}",
                snippet(&self.body)
            )),
        }
    }

    /// Reads an error answer the way the ref (§1.6) says to: the body's `statusCode` and
    /// `code` first, the HTTP status only when the body is not the storage server's.
    fn failure(&self) -> Failure {
        let http = self.status.as_u16();
        let retry_after_ms = self
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| secs.saturating_mul(1000));
        let parsed: Option<ErrorBody> = serde_json::from_slice::<Value>(&self.body)
            .ok()
            .filter(Value::is_object)
            .and_then(|v| serde_json::from_value(v).ok());
        let (status, code, message) = match parsed {
            Some(body) => {
                let status = body
                    .status_code
                    .as_ref()
                    .and_then(status_from_json)
                    .unwrap_or(http);
                let message = match (body.message, body.error) {
                    (Some(m), _) if !m.is_empty() => m,
                    (_, Some(e)) if !e.is_empty() => e,
                    _ => format!("HTTP {http}"),
                };
                (status, body.code.filter(|c| !c.is_empty()), message)
            }
            None if self.body.iter().all(u8::is_ascii_whitespace) => {
                (http, None, format!("HTTP {http} with an empty body"))
            }
            None => (
                http,
                None,
                format!("HTTP {http} with a non-JSON body: {}", snippet(&self.body)),
            ),
        };
        let message = if self.status.is_redirection() {
            let to = self
                .headers
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?");
            format!("unexpected redirect to {to}; check storage.supabase.url ({message})")
        } else {
            message
        };
        Failure {
            http,
            status,
            code,
            message,
            retry_after_ms,
        }
    }
}

/// An error answer, read.
#[derive(Debug)]
struct Failure {
    http: u16,
    /// Body `statusCode`, else the HTTP status.
    status: u16,
    code: Option<String>,
    message: String,
    retry_after_ms: Option<u64>,
}

impl Failure {
    fn is_duplicate(&self) -> bool {
        self.status == 409 || self.http == 409 || self.code.as_deref() == Some("KeyAlreadyExists")
    }

    /// Classifies for the retry policy; `bucket` and `object` make "not found" say what.
    fn into_error(self, bucket: &str, object: Option<&str>) -> StorageError {
        let Self {
            http,
            status,
            code,
            message,
            retry_after_ms,
        } = self;
        if status == 429 || http == 429 || code.as_deref() == Some("SlowDown") {
            return StorageError::RateLimited {
                message: truncate(&message),
                retry_after_ms,
            };
        }
        match status {
            401 | 403 => StorageError::Unauthorized {
                status,
                message: truncate(&message),
            },
            404 => {
                let message = match (code.as_deref(), object) {
                    (Some("NoSuchBucket"), _) => {
                        format!(
                            "bucket {bucket:?} does not exist ({message}); create it or set storage.supabase.bucket"
                        )
                    }
                    (Some("NoSuchKey"), Some(object)) => {
                        format!(
                            "no object {object} in bucket {bucket:?} ({message}); a missing bucket answers the same"
                        )
                    }
                    (None, _) => format!(
                        "{message}; is storage.supabase.url right (it should end in {STORAGE_PATH})?"
                    ),
                    _ => message,
                };
                StorageError::Client {
                    status,
                    code,
                    message: truncate(&message),
                }
            }
            300..=499 => StorageError::Client {
                status,
                code,
                message: truncate(&message),
            },
            // 5xx, the server's 544 DB timeout, and anything odd (a 2xx we could not read).
            _ => StorageError::Server {
                status,
                code,
                message: truncate(&message),
            },
        }
    }
}

/// The storage server's error body. `statusCode` is a string from the server and a number
/// from Fastify's not-found handler, so it is read as any JSON value.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "statusCode")]
    status_code: Option<Value>,
    error: Option<String>,
    message: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct SignOne {
    #[serde(rename = "signedURL")]
    signed_url: Option<String>,
}

#[derive(Deserialize)]
struct SignItem {
    error: Option<String>,
    path: Option<String>,
    #[serde(rename = "signedURL")]
    signed_url: Option<String>,
}

fn status_from_json(v: &Value) -> Option<u16> {
    match v {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
}

/// Applies the base-URL rule documented on [`SupabaseStore::new`].
fn normalize_base_url(raw: &str) -> Result<String, StorageError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(StorageError::Config(
            "storage.supabase.url is empty; set it to https://<ref>.supabase.co (or SUPABASE_URL)"
                .into(),
        ));
    }
    let bad = |why: &str| StorageError::Config(format!("storage.supabase.url {raw:?} {why}"));
    let mut url = Url::parse(raw).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(
            "must start with https:// (or http:// for a local stack)",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "must not carry credentials; use storage.supabase.service_key",
        ));
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path(STORAGE_PATH);
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn classify_key(raw: &str) -> Result<KeyKind, StorageError> {
    let key = raw.trim();
    if key.is_empty() {
        return Err(StorageError::Config(
            "storage.supabase.service_key is empty; set the service_role JWT or an sb_secret_ key (or SUPABASE_SERVICE_ROLE_KEY)"
                .into(),
        ));
    }
    if key.starts_with("sb_publishable_") {
        return Err(StorageError::Config(
            "storage.supabase.service_key is a publishable key, which cannot write to a private bucket; use the service_role JWT or an sb_secret_ key".into(),
        ));
    }
    if key.starts_with("sb_secret_") {
        return Ok(KeyKind::Secret);
    }
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() == 3 && parts.iter().all(|p| !p.is_empty()) {
        return Ok(KeyKind::Jwt);
    }
    Err(StorageError::Config(
        "storage.supabase.service_key is neither a JWT (three dot-separated parts) nor an sb_secret_ key".into(),
    ))
}

fn validate_bucket(bucket: &str) -> Result<(), StorageError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_!.*'() &$=@;:+,-".contains(c);
    if bucket.is_empty() {
        return Err(StorageError::Config(
            "storage.supabase.bucket is empty (or set SUPABASE_BUCKET)".into(),
        ));
    }
    if bucket.chars().count() > MAX_BUCKET_CHARS
        || !bucket.chars().all(allowed)
        || bucket == "."
        || bucket == ".."
    {
        return Err(StorageError::Config(format!(
            "storage.supabase.bucket {bucket:?} is not a usable bucket name: at most {MAX_BUCKET_CHARS} of \
             A-Z a-z 0-9 and _!.*'() &$=@;:+,- (a '?' is refused too: the server mis-signs such paths)"
        )));
    }
    Ok(())
}

/// Percent-encodes everything a URL path segment may not hold literally (RFC 3986 `pchar`).
fn encode_segment(segment: &str) -> String {
    crate::percent::percent_encode(segment, b"-._~!$&'()*+,;=:@")
}

/// A body fit for a one-line message: lossy UTF-8, whitespace collapsed, truncated.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4 * MAX_MESSAGE_CHARS)]);
    truncate(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// An error and its causes on one line (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Whole seconds, rounded up, at least 1 (the server refuses `expiresIn` < 1).
fn ttl_secs(ttl: Duration) -> u64 {
    (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2ln";

    fn cfg(url: &str, key: &str, bucket: &str) -> SupabaseStorageConfig {
        SupabaseStorageConfig {
            url: url.into(),
            service_key: key.into(),
            bucket: bucket.into(),
            timeout_ms: 1000,
            cache_max_age_secs: 3600,
        }
    }

    fn config_error(c: SupabaseStorageConfig) -> String {
        match SupabaseStore::new(&c) {
            Err(StorageError::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn base_url_rule() {
        for (given, expected) in [
            (
                "https://abc.supabase.co",
                "https://abc.supabase.co/storage/v1",
            ),
            (
                "https://abc.supabase.co/",
                "https://abc.supabase.co/storage/v1",
            ),
            (
                "  https://abc.supabase.co/storage/v1  ",
                "https://abc.supabase.co/storage/v1",
            ),
            (
                "https://abc.supabase.co/storage/v1/",
                "https://abc.supabase.co/storage/v1",
            ),
            (
                "http://127.0.0.1:54321",
                "http://127.0.0.1:54321/storage/v1",
            ),
            (
                "http://127.0.0.1:5000/custom/prefix/",
                "http://127.0.0.1:5000/custom/prefix",
            ),
            (
                "https://abc.storage.supabase.co/v1",
                "https://abc.storage.supabase.co/v1",
            ),
        ] {
            assert_eq!(normalize_base_url(given).unwrap(), expected, "{given}");
        }
        for bad in [
            "",
            "abc.supabase.co",
            "ftp://x",
            "https://x/?a=1",
            "https://u:p@x",
            "https://x/#f",
            "http://",
        ] {
            assert!(
                matches!(normalize_base_url(bad), Err(StorageError::Config(m)) if m.contains("storage.supabase.url")),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_are_classified_and_bad_ones_named() {
        assert_eq!(classify_key(JWT).unwrap(), KeyKind::Jwt);
        assert_eq!(classify_key("sb_secret_abc123").unwrap(), KeyKind::Secret);
        for bad in ["", "  ", "sb_publishable_abc", "not-a-jwt", "a..b", "a.b"] {
            let m = config_error(cfg("https://x.supabase.co", bad, "headshots"));
            assert!(m.contains("storage.supabase.service_key"), "{bad}: {m}");
        }
        let m = config_error(cfg("https://x.supabase.co", "a.b.c\u{7f}", "headshots"));
        assert!(m.contains("header"), "{m}");
    }

    #[test]
    fn buckets_and_timeouts_are_checked() {
        for bad in ["", "a?b", "a/b", "é", ".."] {
            let m = config_error(cfg("https://x.supabase.co", JWT, bad));
            assert!(m.contains("storage.supabase.bucket"), "{bad}: {m}");
        }
        let m = config_error(cfg("https://x.supabase.co", JWT, &"b".repeat(101)));
        assert!(m.contains("storage.supabase.bucket"), "{m}");
        let mut c = cfg("https://x.supabase.co", JWT, "headshots");
        c.timeout_ms = 0;
        assert!(config_error(c).contains("storage.supabase.timeout_ms"));
        let s = SupabaseStore::new(&cfg("https://x.supabase.co", JWT, "my photos")).unwrap();
        assert_eq!(s.bucket_segment, "my%20photos");
        assert_eq!(s.name(), "supabase");
        assert!(!format!("{s:?}").contains(JWT), "Debug hides the key");
    }

    #[test]
    fn signed_urls_are_joined_and_re_encoded() {
        let s = SupabaseStore::new(&cfg("https://x.supabase.co", JWT, "headshots")).unwrap();
        assert_eq!(
            s.absolute("/object/sign/headshots/u/j/0.png?token=a.b-c_d")
                .unwrap(),
            "https://x.supabase.co/storage/v1/object/sign/headshots/u/j/0.png?token=a.b-c_d"
        );
        assert_eq!(
            s.absolute("/object/sign/my photos/u/j/0.png?token=t")
                .unwrap(),
            "https://x.supabase.co/storage/v1/object/sign/my%20photos/u/j/0.png?token=t"
        );
        assert!(s.absolute("object/sign/x?token=t").is_none());
        assert!(s.absolute("//evil.example/x?token=t").is_none());
    }

    fn answer(status: u16, headers: &[(&'static str, &str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: body.as_bytes().to_vec(),
        }
    }

    fn error_of(status: u16, headers: &[(&'static str, &str)], body: &str) -> StorageError {
        answer(status, headers, body)
            .failure()
            .into_error("headshots", Some("u/j/0.png"))
    }

    #[test]
    fn errors_branch_on_the_body_status_code() {
        let dup = answer(
            400,
            &[],
            r#"{"statusCode":"409","error":"Duplicate","message":"The resource already exists","code":"KeyAlreadyExists"}"#,
        );
        assert!(dup.failure().is_duplicate());
        assert!(answer(409, &[], "").failure().is_duplicate());
        assert!(
            !answer(400, &[], r#"{"statusCode":"404","code":"NoSuchBucket"}"#)
                .failure()
                .is_duplicate()
        );

        let e = error_of(
            400,
            &[],
            r#"{"statusCode":"403","error":"Unauthorized","message":"signature verification failed","code":"AccessDenied"}"#,
        );
        assert_eq!(
            e,
            StorageError::Unauthorized {
                status: 403,
                message: "signature verification failed".into()
            }
        );

        let e = error_of(
            400,
            &[],
            r#"{"statusCode":"404","error":"Bucket not found","message":"Bucket not found","code":"NoSuchBucket"}"#,
        );
        assert!(
            matches!(&e, StorageError::Client { status: 404, code: Some(c), message } if c == "NoSuchBucket" && message.contains("\"headshots\"")),
            "{e:?}"
        );

        let e = error_of(
            400,
            &[],
            r#"{"statusCode":"413","error":"Payload too large","message":"The object exceeded the maximum allowed size","code":"EntityTooLarge"}"#,
        );
        assert!(
            matches!(&e, StorageError::Client { status: 413, .. }),
            "{e:?}"
        );

        let e = error_of(
            500,
            &[],
            r#"{"statusCode":"500","error":"internal","message":"Internal Server Error","code":"InternalError"}"#,
        );
        assert!(
            matches!(
                &e,
                StorageError::Server {
                    status: 500,
                    code: Some(_),
                    ..
                }
            ),
            "{e:?}"
        );

        let e = error_of(
            544,
            &[],
            r#"{"statusCode":"544","error":"DatabaseTimeout","message":"timeout","code":"DatabaseTimeout"}"#,
        );
        assert!(
            matches!(&e, StorageError::Server { status: 544, .. }),
            "{e:?}"
        );

        let e = error_of(
            429,
            &[("retry-after", "3")],
            r#"{"statusCode":"429","error":"too_many_connections","message":"slow down","code":"SlowDown"}"#,
        );
        assert_eq!(
            e,
            StorageError::RateLimited {
                message: "slow down".into(),
                retry_after_ms: Some(3000)
            }
        );
        let e = error_of(429, &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")], "");
        assert!(
            matches!(
                e,
                StorageError::RateLimited {
                    retry_after_ms: None,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn foreign_bodies_fall_back_to_the_http_status() {
        let html = format!(
            "<html>\n<head><title>502 Bad Gateway</title></head>{}</html>",
            "x".repeat(2000)
        );
        let e = error_of(502, &[], &html);
        match &e {
            StorageError::Server {
                status: 502,
                code: None,
                message,
            } => {
                assert!(
                    message.contains("502 Bad Gateway") && message.contains("non-JSON"),
                    "{message}"
                );
                assert!(
                    message.chars().count() <= MAX_MESSAGE_CHARS + 1,
                    "{}",
                    message.len()
                );
            }
            other => panic!("{other:?}"),
        }
        // Kong's own answers carry only a message.
        let e = error_of(401, &[], r#"{"message":"Invalid API key"}"#);
        assert_eq!(
            e,
            StorageError::Unauthorized {
                status: 401,
                message: "Invalid API key".into()
            }
        );
        // Fastify's unknown-route answer: a real 404 with a numeric statusCode.
        let e = error_of(
            404,
            &[],
            r#"{"message":"Route GET:/x not found","error":"Not Found","statusCode":404}"#,
        );
        assert!(
            matches!(&e, StorageError::Client { status: 404, code: None, message } if message.contains("storage.supabase.url")),
            "{e:?}"
        );
        let e = error_of(504, &[], "");
        assert!(
            matches!(&e, StorageError::Server { status: 504, message, .. } if message.contains("empty")),
            "{e:?}"
        );
        let e = error_of(413, &[], "<html>413 Request Entity Too Large</html>");
        assert!(matches!(e, StorageError::Client { status: 413, .. }));
        let e = error_of(301, &[("location", "https://x/")], "");
        assert!(
            matches!(&e, StorageError::Client { status: 301, message, .. } if message.contains("redirect")),
            "{e:?}"
        );
        // A JSON array or string is not the server's error body either.
        let e = error_of(503, &[], r#""busy""#);
        assert!(matches!(e, StorageError::Server { status: 503, .. }));
    }

    #[test]
    fn helpers() {
        assert_eq!(ttl_secs(Duration::ZERO), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(3600)), 3600);
        assert_eq!(
            truncate(&"é".repeat(400)).chars().count(),
            MAX_MESSAGE_CHARS + 1
        );
        assert_eq!(truncate("short"), "short");
        assert_eq!(encode_segment("a b?c/é"), "a%20b%3Fc%2F%C3%A9");
        assert_eq!(snippet(b"  a \n\t b  "), "a b");
    }
}
