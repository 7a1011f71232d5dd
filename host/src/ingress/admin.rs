//! The admin API (its own port): policies, jobs, breakers, model, metrics. Every route
//! requires `Authorization: Bearer <token>`, compared in constant time.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::reply::{ApiError, JsonQuery, json_error, no_route, read_body, wrong_method};
use crate::error::{ErrorResponse, ErrorType};
use crate::jobs::upload;
use crate::jobs::{BREAKERS, GATING_BREAKERS, JobService};
use crate::policy::{PolicyKind, UploadError};
use crate::state::{Cursor, JobFilter, JobStatus};
use headshot_plugin_sdk::rules::request::FieldError;

/// Shared state of the admin API.
#[derive(Clone)]
pub struct AdminState {
    /// The job service (and through it policies, breakers, model).
    pub service: JobService,
    /// The bearer token.
    pub token: std::sync::Arc<str>,
}

/// The admin routes, all behind the token check.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/policies", get(policies))
        .route("/admin/policies/{kind}", post(upload_policy))
        .route("/admin/policies/{kind}/history", get(history))
        .route("/admin/policies/{kind}/activate/{sha256}", post(activate))
        .route("/admin/policies/{kind}/rollback", post(rollback))
        .route("/admin/jobs", get(jobs))
        .route("/admin/jobs/{id}", get(job))
        .route("/admin/breakers", get(breakers))
        .route("/admin/breakers/{name}/reset", post(breaker_reset))
        .route(
            "/admin/breakers/{name}/force-open",
            post(breaker_force_open),
        )
        .route("/admin/model", get(model))
        .route("/admin/model/reload", post(model_reload))
        .route("/admin/resources", get(resources))
        .route("/metrics", get(metrics))
        .route("/admin/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(super::openapi::admin_api()) }),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// The token of an `Authorization: Bearer <token>` value. The scheme name is
/// case-insensitive (RFC 9110 §11.1), so `bearer x` is accepted as clients send it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Constant-time equality (length leaks, content does not).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    if given.is_empty() || !constant_time_eq(given.as_bytes(), state.token.as_bytes()) {
        let mut resp = json_error(
            StatusCode::UNAUTHORIZED,
            ErrorResponse::new(
                ErrorType::ValidationError,
                "the admin API needs `Authorization: Bearer <token>` (server.admin_token, or data_dir/admin.token)",
                serde_json::Value::Null,
            ),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    next.run(req).await
}

fn kind(raw: &str) -> Result<PolicyKind, Response> {
    raw.parse::<PolicyKind>().map_err(|e| {
        ApiError(ErrorResponse::new(
            ErrorType::ValidationError,
            e,
            serde_json::Value::Null,
        ))
        .into_response()
    })
}

fn upload_error(e: UploadError) -> Response {
    let status = if e.is_client_error() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let status = match &e {
        UploadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        UploadError::UnknownHash { .. } => StatusCode::NOT_FOUND,
        UploadError::NoPrevious(_) => StatusCode::CONFLICT,
        _ => status,
    };
    let details = match &e {
        UploadError::Conformance { failed } => json!({ "failed_cases": failed }),
        _ => serde_json::Value::Null,
    };
    let error_type = if e.is_client_error() {
        ErrorType::ValidationError
    } else {
        ErrorType::Internal
    };
    json_error(
        status,
        ErrorResponse::new(error_type, format!("policy refused: {e}"), details),
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(ErrorType::Internal, e.to_string()).into_response())
}

async fn policies(State(s): State<AdminState>) -> Response {
    let registry = s.service.registry().clone();
    match blocking(move || registry.status()).await {
        Ok(Ok(status)) => axum::Json(json!({ "slots": status })).into_response(),
        Ok(Err(e)) => upload_error(e),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    activate: Option<bool>,
}

async fn upload_policy(
    State(s): State<AdminState>,
    Path(raw): Path<String>,
    JsonQuery(q): JsonQuery<UploadQuery>,
    body: Body,
) -> Response {
    let kind = match kind(&raw) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let limit = s.service.registry().settings().max_upload_bytes;
    // An oversized upload is a 413 naming the configured limit (reading one byte past it, as
    // this once did, named limit + 1 for every larger body).
    let bytes = match read_body(body, limit).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let registry = s.service.registry().clone();
    let activate = q.activate.unwrap_or(true);
    let result = blocking(move || {
        if activate {
            registry
                .push(kind, &bytes)
                .map(|(u, a)| json!({ "upload": u, "activation": a }))
        } else {
            registry
                .upload(kind, &bytes)
                .map(|u| json!({ "upload": u }))
        }
    })
    .await;
    match result {
        Ok(Ok(v)) => (StatusCode::CREATED, axum::Json(v)).into_response(),
        Ok(Err(e)) => upload_error(e),
        Err(r) => r,
    }
}

async fn history(State(s): State<AdminState>, Path(raw): Path<String>) -> Response {
    let kind = match kind(&raw) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let registry = s.service.registry().clone();
    match blocking(move || {
        registry
            .stored(kind)
            .and_then(|stored| Ok((stored, registry.status()?)))
    })
    .await
    {
        Ok(Ok((stored, status))) => {
            let slot = status.into_iter().find(|st| st.kind == kind);
            let stored: Vec<_> = stored
                .into_iter()
                .map(|(sha, meta)| json!({ "sha256": sha, "meta": meta }))
                .collect();
            axum::Json(json!({ "kind": kind, "slot": slot, "stored": stored })).into_response()
        }
        Ok(Err(e)) => upload_error(e),
        Err(r) => r,
    }
}

async fn activate(
    State(s): State<AdminState>,
    Path((raw, sha)): Path<(String, String)>,
) -> Response {
    let kind = match kind(&raw) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let registry = s.service.registry().clone();
    match blocking(move || registry.activate(kind, &sha)).await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => upload_error(e),
        Err(r) => r,
    }
}

async fn rollback(State(s): State<AdminState>, Path(raw): Path<String>) -> Response {
    let kind = match kind(&raw) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let registry = s.service.registry().clone();
    match blocking(move || registry.rollback(kind)).await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => upload_error(e),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    status: Option<String>,
    user_id: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn jobs(State(s): State<AdminState>, JsonQuery(q): JsonQuery<JobsQuery>) -> Response {
    let status = match q.status.as_deref().map(|v| JobStatus::parse(v).ok_or(v)) {
        None => None,
        Some(Ok(st)) => Some(st),
        Some(Err(bad)) => {
            return ApiError::new(
                ErrorType::ValidationError,
                format!("status `{bad}` is not one of IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED"),
            )
            .into_response();
        }
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return ApiError::new(
            ErrorType::ValidationError,
            format!("limit must be between 1 and 1000, got {limit}"),
        )
        .into_response();
    }
    let cursor = match q.cursor.as_deref().map(|c| Cursor::parse(c).ok_or(c)) {
        None => None,
        Some(Ok(cursor)) => Some(cursor),
        Some(Err(_)) => {
            return ApiError(ErrorResponse::validation(
                "invalid cursor",
                &[FieldError::new(
                    "?cursor",
                    "invalid",
                    "pass the `next_cursor` of the previous page as it came",
                )],
            ))
            .into_response();
        }
    };
    let filter = JobFilter {
        status,
        user_id: q.user_id,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
    };
    let service = s.service.clone();
    match blocking(move || service.list(&filter, cursor.as_ref(), limit)).await {
        Ok(Ok((jobs, next))) => {
            axum::Json(json!({ "jobs": jobs, "next_cursor": next })).into_response()
        }
        Ok(Err(e)) => ApiError(e).into_response(),
        Err(r) => r,
    }
}

async fn job(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    match s.service.get(&id) {
        Ok(Some((rec, progress))) => {
            axum::Json(json!({ "job": rec, "progress": progress })).into_response()
        }
        Ok(None) => ApiError::not_found(&format!("job {id}")),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn breakers(State(s): State<AdminState>) -> Response {
    let cfg = s.service.registry().settings().resilience.breaker.clone();
    match s.service.breakers().named(&BREAKERS) {
        Ok(all) => {
            let now = upload::now_ms();
            let list: Vec<_> = all
                .into_iter()
                .map(|(name, b)| {
                    let (calls, failure_rate, slow_rate) = headshot_plugin_sdk::rules::breaker::rates(&b, &cfg, now);
                    json!({ "name": name, "state": b.state, "calls": calls, "failure_rate": failure_rate, "slow_call_rate": slow_rate, "opened_at_ms": b.opened_at_ms })
                })
                .collect();
            axum::Json(json!({ "breakers": list })).into_response()
        }
        Err(e) => ApiError::new(ErrorType::Internal, e.to_string()).into_response(),
    }
}

fn breaker_name(name: &str) -> Result<(), Response> {
    if BREAKERS.contains(&name) {
        return Ok(());
    }
    let mut shown: String = name.chars().take(64).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    Err(json_error(
        StatusCode::NOT_FOUND,
        ErrorResponse::new(
            ErrorType::ValidationError,
            format!(
                "no breaker named `{shown}`; the breakers are {}",
                BREAKERS.join(", ")
            ),
            json!({ "breakers": BREAKERS }),
        ),
    ))
}

async fn breaker_reset(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    if let Err(r) = breaker_name(&name) {
        return r;
    }
    match upload::reset(s.service.breakers(), &name) {
        Ok(b) => axum::Json(json!({ "name": name, "state": b.state })).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn breaker_force_open(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    if let Err(r) = breaker_name(&name) {
        return r;
    }
    if !GATING_BREAKERS.contains(&name.as_str()) {
        return json_error(
            StatusCode::CONFLICT,
            ErrorResponse::new(
                ErrorType::ValidationError,
                format!(
                    "the {name} breaker only records attempts and no call waits on it, so forcing it open would change nothing; the breakers that can be forced open are {}",
                    GATING_BREAKERS.join(", ")
                ),
                json!({ "breakers": GATING_BREAKERS }),
            ),
        );
    }
    match upload::force_open(s.service.breakers(), &name) {
        Ok(b) => axum::Json(json!({ "name": name, "state": b.state })).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn model(State(s): State<AdminState>) -> Response {
    let m = &s.service.config().model;
    axum::Json(json!({ "state": s.service.inference().state(), "source": m.source.to_string(), "variant": m.variant.as_str() })).into_response()
}

async fn model_reload(State(s): State<AdminState>) -> Response {
    match s.service.inference().load(true).await {
        Ok(()) => axum::Json(json!({ "reloaded": true, "state": s.service.inference().state() }))
            .into_response(),
        Err(e) => ApiError::new(ErrorType::InitializationError, e.to_string()).into_response(),
    }
}

async fn resources(State(s): State<AdminState>) -> Response {
    axum::Json(json!({ "readings": s.service.monitor().read() })).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let text = super::server::metrics_text(&s.service);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_other_schemes_are_not() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
