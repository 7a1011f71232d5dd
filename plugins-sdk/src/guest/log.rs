//! Logging through the `host.log` import; the host truncates and rate-limits these lines.

use super::bindings::validator_world::headshot::policy::host::{Level, log};

/// Logs a debug line through the host.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Logs an info line through the host.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs a warning through the host.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs an error through the host.
pub fn error(message: &str) {
    log(Level::Error, message);
}
