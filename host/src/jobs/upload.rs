//! The store stage: upload each image through the storage circuit breaker, retrying as the
//! resilience policy decides; when storage stays down, keep the images on local disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use headshot_plugin_sdk::rules::breaker::{Admission, Breaker, CallResult, Outcome};
use headshot_plugin_sdk::rules::retry::{Attempt, RetryDecision};

use crate::error::{ErrorResponse, ErrorType};
use crate::pipeline::rng::Rng;
use crate::policy::Registry;
use crate::state::BreakerStore;
use crate::storage::{ImageStore, ObjectKey, Store, UploadOutcome};

/// Name of the storage breaker in the `breakers` tree.
pub const STORAGE_BREAKER: &str = "storage";

/// Unix ms now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Admission through a named breaker, persisting its next state.
pub fn admit(
    registry: &Registry,
    breakers: &BreakerStore,
    name: &str,
) -> Result<(), ErrorResponse> {
    let current = breakers.get(name).map_err(internal)?;
    let (decision, _) = registry.admit(&current, now_ms());
    match decision {
        Ok((Admission::Allow, next)) => {
            if next != current {
                breakers.put_durable(name, &next).map_err(internal)?;
            }
            Ok(())
        }
        Ok((Admission::Reject { retry_after_ms }, next)) => {
            if next != current {
                breakers.put_durable(name, &next).map_err(internal)?;
            }
            // A breaker an operator forced open stays open until they reset it: saying "try
            // again in N ms" alone would promise a recovery that no wait brings.
            let forced = current.state == headshot_plugin_sdk::rules::breaker::State::ForcedOpen;
            let message = if forced {
                format!(
                    "the {name} circuit breaker was forced open by an operator and stays open until POST /admin/breakers/{name}/reset"
                )
            } else {
                format!("the {name} circuit breaker is open; try again in {retry_after_ms} ms")
            };
            Err(ErrorResponse::new(
                ErrorType::CircuitOpen,
                message,
                serde_json::json!({ "breaker": name, "forced_open": forced, "retry_after_ms": retry_after_ms }),
            ))
        }
        Err(failure) => Err(ErrorResponse::new(
            ErrorType::PolicyError,
            format!("the resilience policy failed: {failure}"),
            serde_json::json!({ "policy": failure.kind, "sha256": failure.sha256, "error": failure.error.to_string() }),
        )),
    }
}

/// Records one call's outcome in a named breaker (flushing state changes).
pub fn record(registry: &Registry, breakers: &BreakerStore, name: &str, ok: bool, took: Duration) {
    let Ok(current) = breakers.get(name) else {
        return;
    };
    let seen = CallResult {
        outcome: if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        },
        duration_ms: took.as_millis() as u64,
    };
    if let (Ok(next), _) = registry.record_outcome(&current, &seen, now_ms()) {
        let changed_state = next.state != current.state;
        let stored = if changed_state {
            breakers.put_durable(name, &next)
        } else {
            breakers.put(name, &next)
        };
        if changed_state {
            tracing::warn!(breaker = name, from = ?current.state, to = ?next.state, "circuit breaker changed state");
        }
        if let Err(e) = stored {
            tracing::error!(breaker = name, error = %e, "could not store breaker state");
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(
        ErrorType::Internal,
        format!("state store: {e}"),
        serde_json::Value::Null,
    )
}

/// Uploads one image, retrying per the resilience policy. Returns the outcome or the final
/// error (already an `ErrorResponse`).
pub async fn upload_one(
    registry: &Registry,
    breakers: &BreakerStore,
    store: &Store,
    key: &ObjectKey,
    png: &[u8],
    rng: &mut Rng,
) -> Result<UploadOutcome, ErrorResponse> {
    let started = Instant::now();
    let mut previous_delay_ms = 0;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        admit(registry, breakers, STORAGE_BREAKER)?;
        let call = Instant::now();
        let result = store.upload(key, png.to_vec()).await;
        record(
            registry,
            breakers,
            STORAGE_BREAKER,
            result.is_ok(),
            call.elapsed(),
        );
        let err = match result {
            Ok(outcome) => return Ok(outcome),
            Err(e) => e,
        };
        let failed = Attempt {
            number: attempt,
            kind: err.kind(),
            status: err.status(),
            retry_after_ms: err.retry_after_ms(),
            elapsed_ms: started.elapsed().as_millis() as u64,
            previous_delay_ms,
        };
        let (decision, _) = registry.retry(&failed, rng.uniform());
        match decision {
            Ok(RetryDecision::RetryAfter(ms)) => {
                tracing::warn!(key = %key.path(), attempt, delay_ms = ms, error = %err, "upload failed; retrying");
                previous_delay_ms = ms;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(RetryDecision::GiveUp(reason)) => {
                return Err(ErrorResponse::new(
                    ErrorType::StorageError,
                    format!(
                        "uploading {} failed after {attempt} attempt(s): {err}",
                        key.path()
                    ),
                    serde_json::json!({ "attempts": attempt, "gave_up": format!("{reason:?}"), "error": err.to_string() }),
                ));
            }
            Err(failure) => {
                return Err(ErrorResponse::new(
                    ErrorType::StorageError,
                    format!(
                        "uploading {} failed: {err}; the resilience policy failed too: {failure}",
                        key.path()
                    ),
                    serde_json::json!({ "attempts": attempt, "error": err.to_string() }),
                ));
            }
        }
    }
}

/// Keeps images that could not be uploaded under `dir/{user}/{job}/{n}.png`; returns the
/// folder.
pub fn keep_locally(dir: &Path, keys: &[ObjectKey], pngs: &[&[u8]]) -> std::io::Result<PathBuf> {
    let mut folder = dir.to_path_buf();
    for (key, png) in keys.iter().zip(pngs) {
        let path = dir.join(key.path());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
            folder = parent.to_path_buf();
        }
        std::fs::write(&path, png)?;
    }
    Ok(folder)
}

/// A fresh, persisted breaker for `name` after an operator reset.
pub fn reset(breakers: &BreakerStore, name: &str) -> Result<Breaker, ErrorResponse> {
    let fresh = headshot_plugin_sdk::rules::breaker::reset();
    breakers.put_durable(name, &fresh).map_err(internal)?;
    Ok(fresh)
}

/// Forces a breaker open until reset.
pub fn force_open(breakers: &BreakerStore, name: &str) -> Result<Breaker, ErrorResponse> {
    let current = breakers.get(name).map_err(internal)?;
    let forced = headshot_plugin_sdk::rules::breaker::force_open(&current, now_ms());
    breakers.put_durable(name, &forced).map_err(internal)?;
    Ok(forced)
}
