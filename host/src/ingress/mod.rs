//! HTTP surfaces: the Runpod-compatible local API, the admin API, and the server that runs
//! both (`headshot serve`).

// Handlers return `Result<_, Response>` to answer early with a ready HTTP error; the size of
// `Response` is irrelevant on that path.
#[allow(clippy::result_large_err)]
pub mod admin;
#[allow(clippy::result_large_err)]
pub mod api;
pub mod http_serve;
pub mod openapi;
pub mod reply;
pub mod runpod;
pub mod server;
