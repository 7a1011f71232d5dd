//! Turning results and errors into HTTP responses: every error is the JSON `ErrorResponse`
//! with the status its category maps to.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ErrorResponse, ErrorType};

/// An error as an HTTP response.
pub struct ApiError(pub ErrorResponse);

impl From<ErrorResponse> for ApiError {
    fn from(e: ErrorResponse) -> Self {
        Self(e)
    }
}

impl ApiError {
    /// A plain error of `error_type`.
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> Self {
        Self(ErrorResponse::new(
            error_type,
            message,
            serde_json::Value::Null,
        ))
    }

    /// 404 for an id nobody knows.
    pub fn not_found(what: &str) -> Response {
        json_error(
            StatusCode::NOT_FOUND,
            ErrorResponse::new(
                ErrorType::ValidationError,
                format!("{what} not found"),
                serde_json::Value::Null,
            ),
        )
    }
}

/// A JSON error body with an explicit status.
pub fn json_error(status: StatusCode, body: ErrorResponse) -> Response {
    let retry_after = body.details.get("retry_after_ms").and_then(|v| v.as_u64());
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(ms) = retry_after
        && let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.error_type.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_error(status, self.0)
    }
}

/// Reads a request body up to `limit` bytes; a larger one is a 413 naming the limit.
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        // The rest of the body is never read, so the connection cannot carry another
        // request: say so, or a keep-alive client reuses it and fails its next request.
        let mut resp = json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorResponse::new(
                ErrorType::ValidationError,
                format!("the request body is larger than the limit of {limit} bytes"),
                serde_json::json!({ "limit_bytes": limit }),
            ),
        );
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    })
}

/// 404 for routes that do not exist, as JSON.
pub async fn no_route(uri: axum::http::Uri) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        ErrorResponse::new(
            ErrorType::ValidationError,
            format!("no route {}", uri.path()),
            serde_json::Value::Null,
        ),
    )
}
