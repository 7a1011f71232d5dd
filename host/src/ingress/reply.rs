//! Turning results and errors into HTTP responses: every error is the JSON `ErrorResponse`
//! with the status its category maps to.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use headshot_plugin_sdk::rules::request::FieldError;
use serde::de::DeserializeOwned;

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

/// How long a request body may take to arrive in full: the header read timeout bounds a
/// client that never finishes its headers, this one a client that trickles its body.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads a request body up to `limit` bytes; a larger one is a 413 naming the limit, one that
/// takes longer than [`BODY_READ_TIMEOUT`] a 408.
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, Response> {
    read_body_within(body, limit, BODY_READ_TIMEOUT).await
}

/// [`read_body`] with another time limit (tests).
pub async fn read_body_within(
    body: axum::body::Body,
    limit: usize,
    within: std::time::Duration,
) -> Result<axum::body::Bytes, Response> {
    let (status, error) =
        match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(bytes)) => return Ok(bytes),
            Ok(Err(_)) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorResponse::new(
                    ErrorType::ValidationError,
                    format!("the request body is larger than the limit of {limit} bytes"),
                    serde_json::json!({ "limit_bytes": limit }),
                ),
            ),
            Err(_) => (
                StatusCode::REQUEST_TIMEOUT,
                ErrorResponse::new(
                    ErrorType::ValidationError,
                    format!(
                        "the request body did not arrive within {} s",
                        within.as_secs_f64()
                    ),
                    serde_json::json!({ "timeout_ms": within.as_millis() as u64 }),
                ),
            ),
        };
    // The rest of the body is never read, so the connection cannot carry another request:
    // say so, or a keep-alive client reuses it and fails its next request.
    let mut resp = json_error(status, error);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Err(resp)
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

/// 405 for a route that exists under other methods, as JSON (axum adds the `Allow` header).
pub async fn wrong_method(method: Method, uri: Uri) -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorResponse::new(
            ErrorType::ValidationError,
            format!(
                "{method} is not allowed on {} (the Allow header lists what is)",
                uri.path()
            ),
            serde_json::Value::Null,
        ),
    )
}

/// A query string read into `T`. axum's own `Query` answers a malformed one with a plain-text
/// 400; every error of this worker is the JSON `ErrorResponse`, so this one is a 422 naming the
/// parameter (as `?name` in `details.fields`) and what is wrong with it.
pub struct JsonQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for JsonQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_error(&rejection.body_text())),
        }
    }
}

/// The 422 for a query string serde could not read: `text` is axum's message, such as
/// "Failed to deserialize query string: wait: invalid digit found in string".
fn query_error(text: &str) -> Response {
    let detail = text
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(text);
    let named = detail.split_once(": ").filter(|(name, _)| {
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    let fields = match named {
        Some((name, problem)) => vec![FieldError::new(format!("?{name}"), "invalid", problem)],
        None => Vec::new(),
    };
    json_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorResponse::validation(format!("invalid query string: {detail}"), &fields),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_body_that_trickles_past_the_limit_gets_a_408_and_a_closed_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(|body: axum::body::Body| async move {
                match read_body_within(body, 1 << 10, std::time::Duration::from_millis(300)).await {
                    Ok(bytes) => bytes.len().to_string().into_response(),
                    Err(resp) => resp,
                }
            }),
        );
        let server = super::super::http_serve::TestServer::start(
            app,
            super::super::http_serve::HEADER_READ_TIMEOUT,
        )
        .await;
        let mut client = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        client
            .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_to_string(&mut answer),
        )
        .await
        .expect("the server answered and closed")
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("did not arrive within"), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_malformed_query_names_its_parameter_and_an_unreadable_one_says_why() {
        let resp =
            query_error("Failed to deserialize query string: wait: invalid digit found in string");
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = body_of(resp).await;
        assert_eq!(body["error_type"], "validation_error");
        assert_eq!(body["details"]["fields"][0]["field"], "?wait", "{body}");
        assert_eq!(
            body["details"]["fields"][0]["message"],
            "invalid digit found in string"
        );
        let body = body_of(query_error(
            "Failed to deserialize query string: unknown field `foo`, expected `status` or `limit`",
        ))
        .await;
        assert_eq!(body["details"]["fields"], serde_json::json!([]), "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("unknown field `foo`"),
            "{body}"
        );
    }
}
