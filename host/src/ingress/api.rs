//! The Runpod-compatible local API (DESIGN §5, ref/runpod.md §3): `/v2/{ep}/run|runsync|
//! status|stream|cancel|health|purge-queue`, the SDK-style un-prefixed routes, signed image
//! downloads for the local store, health and readiness probes, and `/openapi.json`.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::reply::{ApiError, JsonQuery, json_error, no_route, read_body, wrong_method};
use crate::error::{ErrorResponse, ErrorType};
use crate::jobs::{JobService, Submitted};
use crate::state::{JobRecord, JobStatus};
use crate::storage::{ImageStore, Store};

/// Shared state of the local API.
#[derive(Clone)]
pub struct ApiState {
    /// The job service.
    pub service: JobService,
}

/// The local API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v2/{ep}/run", post(run))
        .route("/v2/{ep}/runsync", post(runsync))
        .route("/v2/{ep}/status/{id}", get(status).post(status))
        .route("/v2/{ep}/stream/{id}", get(stream).post(stream))
        .route("/v2/{ep}/cancel/{id}", post(cancel))
        .route("/v2/{ep}/health", get(health))
        .route("/v2/{ep}/purge-queue", post(purge))
        .route("/run", post(run_plain))
        .route("/runsync", post(runsync_plain))
        .route("/status/{id}", get(status_plain).post(status_plain))
        .route("/stream/{id}", get(stream_plain).post(stream_plain))
        .route("/files/{user}/{job}/{file}", get(file))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(super::openapi::local_api()) }),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

fn check_endpoint(state: &ApiState, ep: &str) -> Result<(), Response> {
    let want = &state.service.config().server.endpoint_id;
    if want == "*" || want == ep {
        Ok(())
    } else {
        Err(ApiError::not_found(&format!("endpoint `{ep}`")))
    }
}

/// Top-level keys a run body may carry.
const BODY_KEYS: &[&str] = &["input", "id"];

async fn parse_submission(
    state: &ApiState,
    body: Body,
) -> Result<(Option<String>, Value), Response> {
    let limit = state.service.config().server.max_body_bytes;
    let bytes = read_body(body, limit).await?;
    let invalid = |field: &str, code: &str, msg: String| {
        ApiError(ErrorResponse::validation(
            msg.clone(),
            &[headshot_plugin_sdk::rules::request::FieldError::new(
                field, code, msg,
            )],
        ))
        .into_response()
    };
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(
            "",
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut map) = value else {
        return Err(invalid(
            "",
            "not_object",
            "the body must be a JSON object: {\"input\": {...}}".into(),
        ));
    };
    for key in map.keys() {
        if !BODY_KEYS.contains(&key.as_str()) {
            let why = match key.as_str() {
                "webhook" | "policy" | "s3Config" => format!(
                    "`{key}` is a Runpod platform option this worker does not support; remove it"
                ),
                _ => format!("unknown field `{key}`; a run body has `input` and optionally `id`"),
            };
            return Err(invalid(&format!("/{key}"), "unknown_field", why));
        }
    }
    let input = map
        .remove("input")
        .ok_or_else(|| invalid("/input", "required", "`input` is required".into()))?;
    let id = match map.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(invalid(
                "/id",
                "invalid_type",
                "`id` must be a string".into(),
            ));
        }
    };
    Ok((id, input))
}

/// A job in Runpod's response shape.
pub fn job_json(rec: &JobRecord, progress: Option<Value>, worker_id: &str) -> Value {
    let mut out = json!({ "id": rec.id, "status": rec.status.as_str(), "workerId": worker_id });
    if let Some(started) = rec.started_ms {
        out["delayTime"] = json!(started.saturating_sub(rec.created_ms));
        if let Some(finished) = rec.finished_ms {
            out["executionTime"] = json!(finished.saturating_sub(started));
        }
    }
    match rec.status {
        JobStatus::Completed => out["output"] = rec.output.clone().unwrap_or(Value::Null),
        JobStatus::Failed | JobStatus::Cancelled => {
            if let Some(err) = &rec.error {
                out["error"] =
                    json!(serde_json::to_string(err).unwrap_or_else(|_| err.message.clone()));
            }
        }
        JobStatus::InProgress => {
            if let Some(p) = progress {
                out["output"] = p;
            }
        }
        JobStatus::InQueue => {}
    }
    out
}

async fn submit(state: &ApiState, body: Body) -> Result<Submitted, Response> {
    let (id, input) = parse_submission(state, body).await?;
    let service = state.service.clone();
    // Acceptance flushes sled: keep it off the async workers.
    tokio::task::spawn_blocking(move || service.submit(id, input))
        .await
        .map_err(|e| {
            ApiError::new(ErrorType::Internal, format!("accepting the job: {e}")).into_response()
        })?
        .map_err(|e| ApiError(e).into_response())
}

async fn run(State(state): State<ApiState>, Path(ep): Path<String>, body: Body) -> Response {
    if let Err(r) = check_endpoint(&state, &ep) {
        return r;
    }
    run_plain(State(state), body).await
}

async fn run_plain(State(state): State<ApiState>, body: Body) -> Response {
    match submit(&state, body).await {
        Ok(s) => {
            let r = s.record();
            let status = if matches!(s, Submitted::Accepted(_)) {
                JobStatus::InQueue
            } else {
                r.status
            };
            axum::Json(json!({ "id": r.id, "status": status.as_str() })).into_response()
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

async fn runsync(
    State(state): State<ApiState>,
    Path(ep): Path<String>,
    q: JsonQuery<WaitQuery>,
    body: Body,
) -> Response {
    if let Err(r) = check_endpoint(&state, &ep) {
        return r;
    }
    runsync_plain(State(state), q, body).await
}

async fn runsync_plain(
    State(state): State<ApiState>,
    JsonQuery(q): JsonQuery<WaitQuery>,
    body: Body,
) -> Response {
    let submitted = match submit(&state, body).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let max = state.service.config().server.runsync_wait_ms;
    let wait = Duration::from_millis(q.wait.unwrap_or(max).min(max));
    let id = submitted.record().id.clone();
    match state.service.wait(&id, wait).await {
        Ok(Some(rec)) => {
            let progress = state.service.get(&id).ok().flatten().and_then(|(_, p)| p);
            axum::Json(job_json(&rec, progress, state.service.worker_id())).into_response()
        }
        Ok(None) => ApiError::not_found(&format!("job {id}")),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn status(State(state): State<ApiState>, Path((ep, id)): Path<(String, String)>) -> Response {
    if let Err(r) = check_endpoint(&state, &ep) {
        return r;
    }
    status_plain(State(state), Path(id)).await
}

async fn status_plain(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    match state.service.get(&id) {
        Ok(Some((rec, progress))) => {
            axum::Json(job_json(&rec, progress, state.service.worker_id())).into_response()
        }
        Ok(None) => ApiError::not_found(&format!("job {id}")),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn stream(State(state): State<ApiState>, Path((ep, id)): Path<(String, String)>) -> Response {
    if let Err(r) = check_endpoint(&state, &ep) {
        return r;
    }
    stream_plain(State(state), Path(id)).await
}

async fn stream_plain(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    match state.service.get(&id) {
        Ok(Some((rec, _))) => {
            // Read the status first: chunks produced after it are drained next time.
            let chunks = state.service.drain_stream(&id);
            let mut out = json!({ "id": rec.id, "status": rec.status.as_str() });
            out["stream"] =
                Value::Array(chunks.into_iter().map(|c| json!({ "output": c })).collect());
            axum::Json(out).into_response()
        }
        Ok(None) => ApiError::not_found(&format!("job {id}")),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn cancel(State(state): State<ApiState>, Path((ep, id)): Path<(String, String)>) -> Response {
    if let Err(r) = check_endpoint(&state, &ep) {
        return r;
    }
    let service = state.service.clone();
    let id2 = id.clone();
    match tokio::task::spawn_blocking(move || service.cancel(&id2)).await {
        Ok(Ok(Some(rec))) => {
            // A running job stops at its next step; report it as cancelled once asked.
            let status = if rec.status.is_terminal() {
                rec.status
            } else {
                JobStatus::Cancelled
            };
            axum::Json(json!({ "id": rec.id, "status": status.as_str() })).into_response()
        }
        Ok(Ok(None)) => ApiError::not_found(&format!("job {id}")),
        Ok(Err(e)) => ApiError(e).into_response(),
        Err(e) => ApiError::new(ErrorType::Internal, e.to_string()).into_response(),
    }
}

async fn health(State(state): State<ApiState>, Path(ep): Path<String>) -> Response {
    if let Err(r) = check_endpoint(&state, &ep) {
        return r;
    }
    match state.service.counts() {
        Ok(c) => {
            let busy = state.service.inference().state().busy;
            axum::Json(json!({
                "jobs": c,
                "workers": { "idle": u32::from(!busy), "running": u32::from(busy) },
            }))
            .into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

async fn purge(State(state): State<ApiState>, Path(ep): Path<String>) -> Response {
    if let Err(r) = check_endpoint(&state, &ep) {
        return r;
    }
    let service = state.service.clone();
    match tokio::task::spawn_blocking(move || service.purge_queue()).await {
        Ok(Ok(n)) => axum::Json(json!({ "removed": n, "status": "completed" })).into_response(),
        Ok(Err(e)) => ApiError(e).into_response(),
        Err(e) => ApiError::new(ErrorType::Internal, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct Signed {
    expires: Option<u64>,
    sig: Option<String>,
}

async fn file(
    State(state): State<ApiState>,
    Path((user, job, file)): Path<(String, String, String)>,
    JsonQuery(q): JsonQuery<Signed>,
) -> Response {
    let Store::Local(local) = state.service.store().as_ref() else {
        return ApiError::not_found("file (images are stored in Supabase)");
    };
    let forbidden = |msg: String| {
        json_error(
            StatusCode::FORBIDDEN,
            ErrorResponse::new(ErrorType::ValidationError, msg, Value::Null),
        )
    };
    let (Some(expires), Some(sig)) = (q.expires, q.sig) else {
        return forbidden("this URL is not signed (expires and sig are required)".into());
    };
    let now = crate::jobs::upload::now_ms() / 1000;
    let path = format!("{user}/{job}/{file}");
    match local.verify(&path, expires, &sig, now) {
        Ok(file_path) => match tokio::fs::read(&file_path).await {
            Ok(bytes) => (
                [
                    (header::CONTENT_TYPE, "image/png"),
                    (header::CACHE_CONTROL, "private, max-age=3600"),
                ],
                bytes,
            )
                .into_response(),
            Err(_) => ApiError::not_found("file"),
        },
        Err(crate::storage::local::UrlError::NotFound) => ApiError::not_found("file"),
        Err(e) => forbidden(format!("refused: {e}")),
    }
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let model = state.service.inference().state();
    let storage = state.service.store().health().await;
    let slots = state.service.registry().status();
    // A built-in standing in for a stored version that did not load: the worker serves, but
    // not with the policy the operator activated.
    let warnings: Vec<String> = slots
        .iter()
        .flatten()
        .filter_map(|p| {
            p.fallback
                .as_ref()
                .map(|why| format!("{} policy: {why}", p.kind))
        })
        .collect();
    let policies = slots.map(|s| {
        s.into_iter()
            .map(|p| json!({ "kind": p.kind, "name": p.active.name, "sha256": p.active.sha256, "fallback": p.fallback }))
            .collect::<Vec<_>>()
    });
    let mut problems = Vec::new();
    if let Some(e) = &model.last_error {
        problems.push(format!("model: {e}"));
    }
    if let Err(e) = &storage {
        problems.push(format!("storage: {e}"));
    }
    // Storage may answer its health check while an operator keeps its breaker forced open:
    // every job would still fail, so the worker is not ready.
    let breaker = state
        .service
        .breakers()
        .get(crate::jobs::upload::STORAGE_BREAKER)
        .map(|b| b.state);
    // Only where jobs store through it: inline (base64) output never consults it.
    let forced_open = state.service.config().server.output == crate::config::OutputMode::Url
        && matches!(
            breaker,
            Ok(headshot_plugin_sdk::rules::breaker::State::ForcedOpen)
        );
    if forced_open {
        problems.push(
            "storage: its circuit breaker is forced open (POST /admin/breakers/storage/reset)"
                .into(),
        );
    }
    if let Err(e) = &policies {
        problems.push(format!("policies: {e}"));
    }
    let body = json!({
        "ready": problems.is_empty(),
        "problems": problems,
        "warnings": warnings,
        "model": { "loaded": model.loaded, "busy": model.busy, "last_error": model.last_error, "load_failures": model.load_failures },
        "storage": { "backend": state.service.store().name(), "ok": storage.is_ok() && !forced_open, "breaker": breaker.ok() },
        "policies": policies.unwrap_or_default(),
        "queue": { "waiting": state.service.queued() },
        "resources": state.service.monitor().read(),
    });
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
