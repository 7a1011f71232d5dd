//! An in-process Supabase Storage for tests, speaking the REST API exactly as
//! `shared/ref/supabase.md` records the real server (v1.70.6) and hosted gateway answering:
//!
//! - served under `/storage/v1`, like the hosted gateway; other paths get the gateway's 404;
//! - the gateway wants `apikey` (401 `{"message"}` without one, or for an unknown `sb_` key)
//!   and swaps the configured `sb_secret_` key for the service JWT when no `Authorization` is
//!   sent; the storage server then wants `Authorization: Bearer <the JWT>` and answers
//!   anything else with HTTP 400 + `statusCode` "403" / `AccessDenied` (`Invalid Compact JWS`
//!   for a non-JWT, `signature verification failed` for another JWT);
//! - errors are HTTP 400 with `{"statusCode":"<string>","error","message","code"}`;
//! - uploads are create-only unless `x-upsert: true`; signing needs an existing object and
//!   returns a relative, decoded `signedURL` carrying a token that the download route checks
//!   (expiry, signature, and that it was issued for that object).
//!
//! Faults are injected at runtime with [`FakeSupabase::fail_next`]; counters and recorded
//! requests let tests assert what reached the "server" (e.g. no image uploaded twice).
//! Every response carries `Connection: close`, so every request opens its own connection and
//! [`Fault::Refuse`] can drop exactly one request's connection.

#![allow(dead_code)] // Each test binary uses part of the fake.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The path the hosted gateway serves Storage under.
pub const PREFIX: &str = "/storage/v1";

/// The service-role JWT the fake accepts.
pub const SERVICE_JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIiwiaXNzIjoic3VwYWJhc2UifQ.ZmFrZS1zaWduYXR1cmU";

/// The new-style secret key the fake's gateway accepts in `apikey`.
pub const SECRET_KEY: &str = "sb_secret_fake0123456789abcdef";

/// The bucket that exists from the start.
pub const BUCKET: &str = "headshots";

/// A failure to inject, one request each.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// HTTP 500 with the server's JSON error body.
    Status500Json,
    /// HTTP 502 with a gateway's HTML page.
    Gateway502Html,
    /// Wait this long, then handle the request normally (the work may still happen after
    /// the client gave up, as on a real server).
    Slow(Duration),
    /// Accept the connection and close it without reading or answering.
    Refuse,
    /// HTTP 429 with `Retry-After` and the server's `SlowDown` body.
    Status429 {
        /// `Retry-After` in seconds.
        retry_after_secs: u64,
    },
}

/// One request as it reached the fake (before faults, after the prefix).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Full path as sent (still percent-encoded), with the prefix.
    pub path: String,
    /// `Authorization`, as sent by the client.
    pub authorization: Option<String>,
    /// `apikey`.
    pub apikey: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Cache-Control`.
    pub cache_control: Option<String>,
    /// `x-upsert`.
    pub x_upsert: Option<String>,
    /// Body length.
    pub body_len: usize,
}

/// A stored object.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredObject {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// `Content-Type` given at upload (default `application/octet-stream`).
    pub content_type: String,
    /// `Cache-Control` given at upload, verbatim (default `no-cache`).
    pub cache_control: String,
    /// The object id (kept by an upsert).
    pub id: String,
}

#[derive(Clone, Debug)]
struct Bucket {
    id: String,
    file_size_limit: Option<usize>,
}

#[derive(Default)]
struct Inner {
    buckets: BTreeMap<String, Bucket>,
    objects: HashMap<(String, String), StoredObject>,
    faults: VecDeque<Fault>,
    uploads_received: usize,
    requests: Vec<RecordedRequest>,
    next_id: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Key for the download tokens.
    token_secret: Vec<u8>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the fake's state from the others.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fake; dropping it stops the server.
pub struct FakeSupabase {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeSupabase {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSupabase {
    /// Starts a fake on 127.0.0.1 with the bucket [`BUCKET`].
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake");
        let addr = listener.local_addr().expect("fake address");
        let mut inner = Inner::default();
        inner.buckets.insert(
            BUCKET.into(),
            Bucket {
                id: BUCKET.into(),
                file_size_limit: None,
            },
        );
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            token_secret: b"fake-url-signing-key".to_vec(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = FaultyListener {
            inner: listener,
            shared: shared.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`, without the `/storage/v1` prefix (a "project URL").
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/storage/v1`.
    pub fn storage_url(&self) -> String {
        format!("{}{PREFIX}", self.base_url())
    }

    /// The service-role JWT it accepts.
    pub fn jwt(&self) -> &'static str {
        SERVICE_JWT
    }

    /// The `sb_secret_` key its gateway accepts.
    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// The next `n` requests fail with `fault` (queued after faults already pending).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut inner = self.shared.lock();
        inner.faults.extend(std::iter::repeat_n(fault, n));
    }

    /// Faults not yet used.
    pub fn pending_faults(&self) -> usize {
        self.shared.lock().faults.len()
    }

    /// Creates a bucket, optionally with a `file_size_limit` in bytes.
    pub fn create_bucket(&self, name: &str, file_size_limit: Option<usize>) {
        self.shared.lock().buckets.insert(
            name.into(),
            Bucket {
                id: name.into(),
                file_size_limit,
            },
        );
    }

    /// Upload requests that reached the storage server (after faults and the gateway),
    /// duplicates and refusals included.
    pub fn uploads_received(&self) -> usize {
        self.shared.lock().uploads_received
    }

    /// Objects stored, in all buckets.
    pub fn objects_stored(&self) -> usize {
        self.shared.lock().objects.len()
    }

    /// One stored object.
    pub fn object(&self, bucket: &str, key: &str) -> Option<StoredObject> {
        self.shared
            .lock()
            .objects
            .get(&(bucket.to_string(), key.to_string()))
            .cloned()
    }

    /// Every request received so far, in order (refused connections never get this far).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }
}

/// Accepts connections, dropping one per pending [`Fault::Refuse`] at the head of the queue.
struct FaultyListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for FaultyListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            let refuse = {
                let mut inner = self.shared.lock();
                if inner.faults.front() == Some(&Fault::Refuse) {
                    inner.faults.pop_front();
                    true
                } else {
                    false
                }
            };
            if refuse {
                // Closed without reading: the kernel resets a socket closed with unread data,
                // so the client sees the connection die mid-request.
                drop(stream);
                continue;
            }
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let mut response = route(&shared, request).await;
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn route(shared: &Shared, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 512 * 1024 * 1024)
        .await
        .unwrap_or_default()
        .to_vec();
    let raw_path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let headers = parts.headers;
    let method = parts.method;

    let fault = {
        let mut inner = shared.lock();
        inner.requests.push(RecordedRequest {
            method: method.to_string(),
            path: raw_path.clone(),
            authorization: header_str(&headers, "authorization"),
            apikey: header_str(&headers, "apikey"),
            content_type: header_str(&headers, "content-type"),
            cache_control: header_str(&headers, "cache-control"),
            x_upsert: header_str(&headers, "x-upsert"),
            body_len: body.len(),
        });
        match inner.faults.front() {
            Some(Fault::Refuse) | None => None,
            Some(_) => inner.faults.pop_front(),
        }
    };
    match fault {
        Some(Fault::Status500Json) => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"statusCode":"500","code":"InternalError","error":"internal","message":"Internal Server Error"}),
            );
        }
        Some(Fault::Gateway502Html) => {
            return (
                StatusCode::BAD_GATEWAY,
                [(header::CONTENT_TYPE, "text/html")],
                "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n",
            )
                .into_response();
        }
        Some(Fault::Status429 { retry_after_secs }) => {
            let mut r = json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"statusCode":"429","error":"too_many_connections","message":"Too many connections issued to the database","code":"SlowDown"}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            return r;
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Refuse) | None => {}
    }

    let Some(rest) = raw_path.strip_prefix(PREFIX).filter(|r| r.starts_with('/')) else {
        // Kong's answer for a path no route matches.
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"message":"no Route matched with those values"}),
        );
    };
    let rest = percent_decode(rest);
    let segments: Vec<&str> = rest.trim_start_matches('/').splitn(4, '/').collect();

    // Downloads through a signed URL need no credentials at all.
    if method == Method::GET
        && segments.len() >= 4
        && segments[0] == "object"
        && segments[1] == "sign"
    {
        return download(shared, segments[2], segments[3], &query);
    }

    // The gateway.
    let apikey = header_str(&headers, "apikey");
    let mut authorization = header_str(&headers, "authorization");
    match apikey.as_deref() {
        None => {
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"message":"No API key found in request"}),
            );
        }
        Some(k) if k.starts_with("sb_") && k != SECRET_KEY => {
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"message":"Invalid API key"}),
            );
        }
        Some(k) if k == SECRET_KEY && authorization.is_none() => {
            authorization = Some(format!("Bearer {SERVICE_JWT}"))
        }
        Some(_) => {}
    }

    // The storage server's JWT check.
    let Some(authorization) = authorization else {
        return storage_error(
            "400",
            "Error",
            "headers must have required property 'authorization'",
            "InvalidRequest",
        );
    };
    let token = authorization.strip_prefix("Bearer ").unwrap_or("").trim();
    let jws_parts: Vec<&str> = token.split('.').collect();
    if jws_parts.len() != 3 || jws_parts.iter().any(|p| p.is_empty()) {
        return storage_error("403", "Unauthorized", "Invalid Compact JWS", "AccessDenied");
    }
    if token != SERVICE_JWT {
        return storage_error(
            "403",
            "Unauthorized",
            "signature verification failed",
            "AccessDenied",
        );
    }

    match (&method, segments.as_slice()) {
        (&Method::GET, ["bucket", id]) => get_bucket(shared, id),
        (&Method::POST, ["object", "sign", bucket]) => sign_batch(shared, bucket, &body),
        (&Method::POST, ["object", "sign", bucket, key]) => sign_one(shared, bucket, key, &body),
        (&Method::POST, ["object", bucket, key @ ..]) if !key.is_empty() => {
            upload(shared, bucket, &key.join("/"), &headers, body)
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({"message": format!("Route {method}:{rest} not found"), "error":"Not Found", "statusCode":404}),
        ),
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

/// The server's usual error: HTTP 400, the real status as a string in the body.
fn storage_error(status_code: &str, error: &str, message: &str, code: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"statusCode": status_code, "error": error, "message": message, "code": code}),
    )
}

fn get_bucket(shared: &Shared, id: &str) -> Response {
    let inner = shared.lock();
    match inner.buckets.get(id) {
        Some(b) => json_response(
            StatusCode::OK,
            json!({
                "id": b.id, "name": b.id, "owner": "", "public": false,
                "file_size_limit": b.file_size_limit, "allowed_mime_types": null,
                "created_at": "2026-01-01T00:00:00.000Z", "updated_at": "2026-01-01T00:00:00.000Z"
            }),
        ),
        None => storage_error(
            "404",
            "Bucket not found",
            "Bucket not found",
            "NoSuchBucket",
        ),
    }
}

fn key_is_valid(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_/!.*'() &$=@;:+,?-".contains(c))
}

fn upload(
    shared: &Shared,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Response {
    let mut inner = shared.lock();
    inner.uploads_received += 1;
    let Some(b) = inner.buckets.get(bucket).cloned() else {
        return storage_error(
            "404",
            "Bucket not found",
            "Bucket not found",
            "NoSuchBucket",
        );
    };
    if !key_is_valid(key) {
        return storage_error(
            "400",
            "InvalidKey",
            &format!("Invalid key: {key}"),
            "InvalidKey",
        );
    }
    if b.file_size_limit.is_some_and(|limit| body.len() > limit) {
        return storage_error(
            "413",
            "Payload too large",
            "The object exceeded the maximum allowed size",
            "EntityTooLarge",
        );
    }
    let upsert = header_str(headers, "x-upsert").as_deref() == Some("true");
    let slot = (bucket.to_string(), key.to_string());
    let existing_id = inner.objects.get(&slot).map(|o| o.id.clone());
    if existing_id.is_some() && !upsert {
        return storage_error(
            "409",
            "Duplicate",
            "The resource already exists",
            "KeyAlreadyExists",
        );
    }
    let id = existing_id.unwrap_or_else(|| {
        inner.next_id += 1;
        format!("00000000-0000-4000-8000-{:012x}", inner.next_id)
    });
    inner.objects.insert(
        slot,
        StoredObject {
            bytes: body,
            content_type: header_str(headers, "content-type")
                .unwrap_or_else(|| "application/octet-stream".into()),
            cache_control: header_str(headers, "cache-control")
                .unwrap_or_else(|| "no-cache".into()),
            id: id.clone(),
        },
    );
    json_response(
        StatusCode::OK,
        json!({"Key": format!("{bucket}/{key}"), "Id": id}),
    )
}

/// Reads `expiresIn` the way Fastify coerces it (number or numeric string, integer ≥ 1).
fn expires_in(body: &Value) -> Result<u64, Box<Response>> {
    let Some(v) = body.get("expiresIn") else {
        return Err(Box::new(storage_error(
            "400",
            "Error",
            "body must have required property 'expiresIn'",
            "InvalidRequest",
        )));
    };
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n >= 1 => Ok(n.unsigned_abs()),
        Some(_) => Err(Box::new(storage_error(
            "400",
            "Error",
            "body/expiresIn must be >= 1",
            "InvalidRequest",
        ))),
        None => Err(Box::new(storage_error(
            "400",
            "Error",
            "body/expiresIn must be integer",
            "InvalidRequest",
        ))),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, Box<Response>> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            Box::new(storage_error(
                "400",
                "Error",
                "body must be object",
                "InvalidRequest",
            ))
        })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn token_mac(shared: &Shared, payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&shared.token_secret).expect("hmac takes any key");
    mac.update(payload);
    mac
}

/// A JWT-shaped token (hex instead of base64url) with the real token's claims.
fn make_token(shared: &Shared, bucket: &str, key: &str, expires_in: u64) -> String {
    let now = now_secs();
    let claims = json!({"url": format!("{bucket}/{key}"), "scope": "download", "iat": now, "exp": now + expires_in});
    let payload = hex(claims.to_string().as_bytes());
    let sig = hex(&token_mac(shared, payload.as_bytes())
        .finalize()
        .into_bytes());
    format!("{}.{payload}.{sig}", hex(br#"{"alg":"HS256","typ":"JWT"}"#))
}

/// The JSON body of a sign request and its `expiresIn`, or the server's error answer.
fn sign_request(body: &[u8]) -> Result<(Value, u64), Box<Response>> {
    let body = parse_body(body)?;
    let secs = expires_in(&body)?;
    Ok((body, secs))
}

fn sign_one(shared: &Shared, bucket: &str, key: &str, body: &[u8]) -> Response {
    let (_, secs) = match sign_request(body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    // A missing bucket answers NoSuchKey too, as the real server does.
    if !shared
        .lock()
        .objects
        .contains_key(&(bucket.to_string(), key.to_string()))
    {
        return storage_error("404", "not_found", "Object not found", "NoSuchKey");
    }
    let token = make_token(shared, bucket, key, secs);
    json_response(
        StatusCode::OK,
        json!({"signedURL": format!("/object/sign/{bucket}/{key}?token={token}")}),
    )
}

fn sign_batch(shared: &Shared, bucket: &str, body: &[u8]) -> Response {
    let (body, secs) = match sign_request(body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(paths) = body.get("paths").and_then(Value::as_array) else {
        return storage_error(
            "400",
            "Error",
            "body must have required property 'paths'",
            "InvalidRequest",
        );
    };
    let mut items = Vec::new();
    for p in paths {
        let Some(path) = p.as_str() else {
            return storage_error(
                "400",
                "Error",
                "body/paths/0 must be string",
                "InvalidRequest",
            );
        };
        let exists = shared
            .lock()
            .objects
            .contains_key(&(bucket.to_string(), path.to_string()));
        if exists {
            let token = make_token(shared, bucket, path, secs);
            items.push(json!({"error": null, "path": path, "signedURL": format!("/object/sign/{bucket}/{path}?token={token}")}));
        } else {
            items.push(json!({
                "error": "Either the object does not exist or you do not have access to it",
                "path": path,
                "signedURL": null
            }));
        }
    }
    json_response(StatusCode::OK, Value::Array(items))
}

fn download(shared: &Shared, bucket: &str, key: &str, query: &str) -> Response {
    let token = query.split('&').find_map(|kv| kv.strip_prefix("token="));
    let Some(token) = token else {
        return storage_error(
            "400",
            "Error",
            "querystring must have required property 'token'",
            "InvalidRequest",
        );
    };
    let invalid_jwt = |message: &str| storage_error("400", "Error", message, "InvalidJWT");
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return invalid_jwt("Invalid Compact JWS");
    }
    let Some(sig) = unhex(parts[2]) else {
        return invalid_jwt("signature verification failed");
    };
    if token_mac(shared, parts[1].as_bytes())
        .verify_slice(&sig)
        .is_err()
    {
        return invalid_jwt("signature verification failed");
    }
    let Some(claims) = unhex(parts[1]).and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return invalid_jwt("Invalid Compact JWS");
    };
    if claims["exp"].as_u64().is_none_or(|exp| exp <= now_secs()) {
        return invalid_jwt("\"exp\" claim timestamp check failed");
    }
    if claims["url"].as_str() != Some(&format!("{bucket}/{key}")) {
        return storage_error(
            "400",
            "Error",
            "The url do not match the signature",
            "InvalidSignature",
        );
    }
    let object = shared
        .lock()
        .objects
        .get(&(bucket.to_string(), key.to_string()))
        .cloned();
    let Some(object) = object else {
        return storage_error("404", "not_found", "Object not found", "NoSuchKey");
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, object.content_type)
        .header(header::CACHE_CONTROL, object.cache_control)
        .header("x-robots-tag", "none")
        .body(Body::from(object.bytes))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Decodes `%XX` the way the server decodes route paths (`+` stays a plus).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
