//! HTTP surfaces: the Runpod-compatible local API, the admin API, and the server that runs
//! both (`headshot serve`).

pub mod admin;
pub mod api;
pub mod openapi;
pub mod reply;
pub mod server;
