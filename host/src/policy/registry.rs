//! The active policy of each slot: upload, activation, rollback, persistence, and the calls
//! the rest of the worker makes, with each slot's fail-open/fail-closed rule.
//!
//! A slot is an `ArcSwap<LoadedPolicy>`: a call loads the current `Arc` and keeps it for the
//! call's duration, so an activation never disturbs a call in flight; the old version is
//! freed when its last call ends. Every change is written to sled (flushed) before it takes
//! effect, so the active versions survive restarts and crashes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use headshot_plugin_sdk::rules::{breaker, request, retry, sanitize};
use serde::Serialize;

use super::builtin::builtin_bytes;
use super::compile::{CodeOrigin, Compiler, sha256_hex};
use super::conformance::{self, CaseResult};
use super::engine::PolicyEngine;
use super::error::{CallError, UploadError};
use super::inspect;
use super::kind::PolicyKind;
use super::loaded::{LoadedPolicy, PolicyMeta, PolicySource};
use super::settings::{OnError, PolicySettings};
use crate::state::{BlobMeta, PolicyEntry, PolicyStore, StateDb};

/// Which version answered a call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Used {
    /// Slot.
    pub kind: PolicyKind,
    /// Version that was called.
    pub sha256: String,
    /// True when the version failed and the native built-in rules answered (fail-open).
    pub fallback: bool,
}

/// A policy call that failed under a fail-closed slot.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{kind} policy {sha256} failed: {error}")]
pub struct PolicyFailure {
    /// Slot.
    pub kind: PolicyKind,
    /// Version that failed.
    pub sha256: String,
    /// What went wrong.
    pub error: CallError,
}

/// Why a validation did not produce a request.
#[derive(Clone, Debug, PartialEq)]
pub enum ValidateError {
    /// The input is invalid: every field error.
    Invalid(Vec<request::FieldError>),
    /// The validator itself failed (fail-closed).
    Policy(PolicyFailure),
}

/// Result of an upload: stored, not yet active.
#[derive(Clone, Debug, Serialize)]
pub struct UploadReport {
    /// What was stored.
    pub policy: PolicyMeta,
    /// Cache hit or fresh compile.
    pub code: CodeOrigin,
    /// Compile (or cache load) time, ms.
    pub compile_ms: f64,
    /// Conformance results.
    pub cases: Vec<CaseResult>,
    /// Whole upload, ms.
    pub total_ms: f64,
}

/// Result of an activation or rollback.
#[derive(Clone, Debug, Serialize)]
pub struct ActivationReport {
    /// Slot.
    pub kind: PolicyKind,
    /// Now active.
    pub active: PolicyMeta,
    /// Active before, if any.
    pub previous_sha256: Option<String>,
    /// True when the version was already active (nothing changed).
    pub unchanged: bool,
    /// Time from request to swap, ms (compile included when it was not cached).
    pub activation_ms: f64,
    /// Time until the old version had no calls in flight, ms (None: still busy after 1 s).
    pub drained_ms: Option<f64>,
}

/// One slot, for `policy list` and the admin API.
#[derive(Clone, Debug, Serialize)]
pub struct SlotStatus {
    /// Slot.
    pub kind: PolicyKind,
    /// Active version.
    pub active: PolicyMeta,
    /// Versions that rollback would return to, newest last.
    pub previous: Vec<PolicyEntry>,
    /// Calls made on the active version since it was loaded.
    pub calls: u64,
    /// Of which failed.
    pub failures: u64,
    /// Calls that had to instantiate inline.
    pub cold_calls: u64,
    /// Wall time of all calls on the active version, microseconds.
    pub total_micros: u64,
    /// Last failure.
    pub last_error: Option<String>,
    /// Behaviour on failure.
    pub on_error: OnError,
    /// Per-call deadline, ms.
    pub deadline_ms: u64,
    /// Why the built-in serves in place of the stored active version, when it does (the
    /// stored one failed to load at start); cleared by the next activation or rollback.
    pub fallback: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The three slots and what it takes to change them.
pub struct Registry {
    engine: Arc<PolicyEngine>,
    compiler: Compiler,
    store: PolicyStore,
    settings: PolicySettings,
    slots: [ArcSwap<LoadedPolicy>; 3],
    /// Recently loaded versions by sha256, so rollback and re-activation skip compiling.
    recent: Mutex<HashMap<String, Arc<LoadedPolicy>>>,
    change: Mutex<()>,
    native_sanitizer: sanitize::Sanitizer,
    /// Per slot, why the built-in stands in for the stored active version (see
    /// [`SlotStatus::fallback`]).
    fallbacks: Mutex<[Option<String>; 3]>,
}

impl Registry {
    /// Opens the registry: restores each slot's active version from `state` (compiled code
    /// from `cache_dir`), installing the built-in where there is none or it was upgraded.
    pub fn open(
        settings: PolicySettings,
        state: &StateDb,
        cache_dir: &Path,
    ) -> Result<Self, UploadError> {
        let engine = Arc::new(
            PolicyEngine::new(settings.engine.clone())
                .map_err(|e| UploadError::Start(e.to_string()))?,
        );
        let compiler = Compiler::new(Arc::clone(&engine), cache_dir)?;
        let store = state.policies()?;
        let mut loaded = Vec::with_capacity(3);
        let mut fallbacks: [Option<String>; 3] = Default::default();
        let mut partial = Partial {
            engine: &engine,
            compiler: &compiler,
            store: &store,
            settings: &settings,
        };
        for kind in PolicyKind::ALL {
            let (policy, fallback) = partial.restore(kind)?;
            loaded.push(policy);
            fallbacks[kind.index()] = fallback;
        }
        let [v, s, r]: [Arc<LoadedPolicy>; 3] = loaded
            .try_into()
            .map_err(|_| UploadError::Start("slot count".into()))?;
        let settings_sanitizer = settings.sanitizer.clone();
        let recent = [&v, &s, &r]
            .iter()
            .map(|p| (p.meta().sha256.clone(), Arc::clone(p)))
            .collect();
        Ok(Self {
            engine,
            compiler,
            store,
            settings,
            slots: [ArcSwap::new(v), ArcSwap::new(s), ArcSwap::new(r)],
            recent: Mutex::new(recent),
            change: Mutex::new(()),
            native_sanitizer: sanitize::Sanitizer::new(settings_sanitizer),
            fallbacks: Mutex::new(fallbacks),
        })
    }

    /// The active version of `kind`.
    pub fn active(&self, kind: PolicyKind) -> Arc<LoadedPolicy> {
        self.slots[kind.index()].load_full()
    }

    /// The settings the registry runs with.
    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// The shared engine.
    pub fn engine(&self) -> &Arc<PolicyEngine> {
        &self.engine
    }

    fn partial(&self) -> Partial<'_> {
        Partial {
            engine: &self.engine,
            compiler: &self.compiler,
            store: &self.store,
            settings: &self.settings,
        }
    }

    /// Checks and stores `bytes` for `kind` without activating them.
    pub fn upload(&self, kind: PolicyKind, bytes: &[u8]) -> Result<UploadReport, UploadError> {
        let (report, loaded) = self.partial().upload(kind, bytes, PolicySource::Upload)?;
        self.remember(&loaded);
        Ok(report)
    }

    /// Upload, then activate.
    pub fn push(
        &self,
        kind: PolicyKind,
        bytes: &[u8],
    ) -> Result<(UploadReport, ActivationReport), UploadError> {
        let upload = self.upload(kind, bytes)?;
        let activation = self.activate(kind, &upload.policy.sha256)?;
        Ok((upload, activation))
    }

    /// Makes the stored version `sha256` active in `kind`'s slot. The hash is hex in either
    /// case, as tools print it.
    pub fn activate(
        &self,
        kind: PolicyKind,
        sha256: &str,
    ) -> Result<ActivationReport, UploadError> {
        let sha256 = self.resolve(kind, &sha256.to_ascii_lowercase())?;
        let sha256 = sha256.as_str();
        let start = Instant::now();
        let _guard = self
            .change
            .lock()
            .map_err(|_| UploadError::Start("activation lock poisoned".into()))?;
        let current = self.active(kind);
        // Served and stored active differ only while the built-in stands in (see `restore`).
        let stored_current = self.store.active(kind)?.map(|r| r.current.sha256);
        let stored = stored_current.as_deref() == Some(sha256);
        // Unchanged only when the version is both served and stored: standing in, activating
        // the built-in makes it the stored active version too.
        if current.meta().sha256 == sha256 && stored {
            return Ok(ActivationReport {
                kind,
                active: current.meta().clone(),
                previous_sha256: None,
                unchanged: true,
                activation_ms: ms(start.elapsed()),
                drained_ms: Some(0.0),
            });
        }
        let next = self.version(kind, sha256)?;
        // Standing in, the stored active version may be the one asked for (it loads now): it
        // is served again without a history entry pointing at itself.
        if !stored {
            self.store.activate(
                kind,
                PolicyEntry {
                    sha256: sha256.into(),
                    source: next.meta().source,
                    activated_at_ms: now_ms(),
                },
            )?;
        }
        Ok(self.swap(kind, next, start))
    }

    /// The full hash of the stored `kind` version that `given` names: the whole hash, or a
    /// prefix of at least 8 hex digits that one stored version starts with (as `policy list`
    /// and logs show hashes, and as people copy them).
    fn resolve(&self, kind: PolicyKind, given: &str) -> Result<String, UploadError> {
        if given.len() >= 64 || given.len() < 8 || !given.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(given.to_string());
        }
        let mut matches: Vec<String> = self
            .store
            .stored(kind)?
            .into_iter()
            .map(|(sha, _)| sha)
            .filter(|sha| sha.starts_with(given))
            .collect();
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(UploadError::UnknownHash {
                kind,
                sha256: given.to_string(),
            }),
            _ => Err(UploadError::AmbiguousHash {
                kind,
                prefix: given.to_string(),
                matches,
            }),
        }
    }

    /// Returns `kind`'s slot to the version active before the current one.
    pub fn rollback(&self, kind: PolicyKind) -> Result<ActivationReport, UploadError> {
        let start = Instant::now();
        let _guard = self
            .change
            .lock()
            .map_err(|_| UploadError::Start("activation lock poisoned".into()))?;
        let record = self
            .store
            .active(kind)?
            .ok_or(UploadError::NoPrevious(kind))?;
        let target = record
            .previous
            .last()
            .ok_or(UploadError::NoPrevious(kind))?
            .sha256
            .clone();
        let next = self.version(kind, &target)?;
        self.store
            .roll_back(kind, now_ms())?
            .ok_or(UploadError::NoPrevious(kind))?;
        Ok(self.swap(kind, next, start))
    }

    fn swap(&self, kind: PolicyKind, next: Arc<LoadedPolicy>, start: Instant) -> ActivationReport {
        let old = self.slots[kind.index()].swap(Arc::clone(&next));
        if let Ok(mut fallbacks) = self.fallbacks.lock() {
            fallbacks[kind.index()] = None;
        }
        let activation_ms = ms(start.elapsed());
        // The same version again (a stand-in made the stored one active): nothing to drain.
        let drained_ms = if Arc::ptr_eq(&old, &next) {
            Some(0.0)
        } else {
            old.drain(Duration::from_secs(1)).map(ms)
        };
        tracing::info!(kind = %kind, from = %old.meta().sha256, to = %next.meta().sha256, activation_ms, "policy activated");
        ActivationReport {
            kind,
            active: next.meta().clone(),
            previous_sha256: Some(old.meta().sha256.clone()),
            unchanged: false,
            activation_ms,
            drained_ms,
        }
    }

    /// A loaded version: from memory, else from sled (+ code cache), conformance-checked.
    fn version(&self, kind: PolicyKind, sha256: &str) -> Result<Arc<LoadedPolicy>, UploadError> {
        if let Some(p) = self.recent.lock().ok().and_then(|r| r.get(sha256).cloned())
            && p.meta().kind == kind
        {
            return Ok(p);
        }
        let unknown = || UploadError::UnknownHash {
            kind,
            sha256: sha256.into(),
        };
        let meta = self.store.blob_meta(sha256)?.ok_or_else(unknown)?;
        if meta.kind != kind {
            return Err(unknown());
        }
        let bytes = self.store.blob(sha256)?.ok_or_else(unknown)?;
        let (_, loaded) = self.partial().upload(kind, &bytes, meta.source)?;
        self.remember(&loaded);
        Ok(loaded)
    }

    fn remember(&self, loaded: &Arc<LoadedPolicy>) {
        if let Ok(mut recent) = self.recent.lock() {
            let active: Vec<String> = self
                .slots
                .iter()
                .map(|s| s.load().meta().sha256.clone())
                .collect();
            // Keep the active versions and a few others for quick rollback.
            if recent.len() >= 12 {
                recent.retain(|sha, _| active.contains(sha));
            }
            recent.insert(loaded.meta().sha256.clone(), Arc::clone(loaded));
        }
    }

    /// Every slot's state.
    pub fn status(&self) -> Result<Vec<SlotStatus>, UploadError> {
        PolicyKind::ALL
            .iter()
            .map(|&kind| {
                let p = self.active(kind);
                let previous = self
                    .store
                    .active(kind)?
                    .map(|r| r.previous)
                    .unwrap_or_default();
                let slot = self.settings.slot(kind);
                Ok(SlotStatus {
                    kind,
                    active: p.meta().clone(),
                    previous,
                    calls: p.stats.calls.load(std::sync::atomic::Ordering::Relaxed),
                    failures: p.stats.failures.load(std::sync::atomic::Ordering::Relaxed),
                    cold_calls: p
                        .stats
                        .cold_calls
                        .load(std::sync::atomic::Ordering::Relaxed),
                    total_micros: p
                        .stats
                        .total_micros
                        .load(std::sync::atomic::Ordering::Relaxed),
                    last_error: p.stats.last_error.lock().ok().and_then(|e| e.clone()),
                    on_error: slot.on_error,
                    deadline_ms: slot.deadline.as_millis() as u64,
                    fallback: self
                        .fallbacks
                        .lock()
                        .ok()
                        .and_then(|f| f[kind.index()].clone()),
                })
            })
            .collect()
    }

    /// Stored versions of `kind`.
    pub fn stored(&self, kind: PolicyKind) -> Result<Vec<(String, BlobMeta)>, UploadError> {
        Ok(self.store.stored(kind)?)
    }

    /// Calls the active policy of `kind`; when the call fails, applies the slot's `on_error`:
    /// fail-closed returns the failure, fail-open answers with the built-in rules (`native`).
    fn guarded<T>(
        &self,
        kind: PolicyKind,
        call: impl FnOnce(&LoadedPolicy) -> Result<T, CallError>,
        native: impl FnOnce() -> T,
    ) -> (Result<T, PolicyFailure>, Used) {
        let p = self.active(kind);
        let used = |fallback| Used {
            kind,
            sha256: p.meta().sha256.clone(),
            fallback,
        };
        match call(&p) {
            Ok(v) => (Ok(v), used(false)),
            Err(error) => match self.settings.slot(kind).on_error {
                OnError::FailClosed => (
                    Err(PolicyFailure {
                        kind,
                        sha256: p.meta().sha256.clone(),
                        error,
                    }),
                    used(false),
                ),
                OnError::FailOpen => (Ok(native()), used(true)),
            },
        }
    }

    /// Validates a job's `input` JSON with the active validator. Its answer is checked
    /// against the worker's own limits, so a custom validator can never widen them.
    pub fn validate(&self, input_json: &str) -> (Result<request::Request, ValidateError>, Used) {
        let limits = &self.settings.validator;
        let (outcome, used) = self.guarded(
            PolicyKind::Validator,
            |p| {
                let answer = p.validate(input_json)?;
                if let Ok(req) = &answer {
                    let problems = request::check_request(req, limits);
                    if !problems.is_empty() {
                        let named: Vec<String> = problems
                            .iter()
                            .map(|e| format!("{}: {}", e.field, e.message))
                            .collect();
                        return Err(CallError::Output(format!(
                            "returned a request outside the worker's limits ({})",
                            named.join("; ")
                        )));
                    }
                }
                Ok(answer)
            },
            || request::validate_input(input_json, limits),
        );
        let result = match outcome {
            Ok(answer) => answer.map_err(ValidateError::Invalid),
            Err(failure) => Err(ValidateError::Policy(failure)),
        };
        (result, used)
    }

    /// Sanitizes a prompt with the active sanitizer.
    pub fn sanitize(&self, prompt: &str) -> (Result<sanitize::Sanitized, PolicyFailure>, Used) {
        self.guarded(
            PolicyKind::Sanitizer,
            |p| p.sanitize(prompt),
            || self.native_sanitizer.sanitize(prompt),
        )
    }

    /// Circuit-breaker admission with the active resilience policy.
    pub fn admit(
        &self,
        current: &breaker::Breaker,
        now_ms: u64,
    ) -> (
        Result<(breaker::Admission, breaker::Breaker), PolicyFailure>,
        Used,
    ) {
        self.guarded(
            PolicyKind::Resilience,
            |p| p.admit(current, now_ms),
            || breaker::admit(current, &self.settings.resilience.breaker, now_ms),
        )
    }

    /// Circuit-breaker bookkeeping with the active resilience policy.
    pub fn record_outcome(
        &self,
        current: &breaker::Breaker,
        seen: &breaker::CallResult,
        now_ms: u64,
    ) -> (Result<breaker::Breaker, PolicyFailure>, Used) {
        self.guarded(
            PolicyKind::Resilience,
            |p| p.record_outcome(current, seen, now_ms),
            || breaker::record_outcome(current, &self.settings.resilience.breaker, seen, now_ms),
        )
    }

    /// Retry decision with the active resilience policy.
    pub fn retry(
        &self,
        failed: &retry::Attempt,
        jitter: f64,
    ) -> (Result<retry::RetryDecision, PolicyFailure>, Used) {
        self.guarded(
            PolicyKind::Resilience,
            |p| p.retry(failed, jitter),
            || retry::decide(failed, jitter, &self.settings.resilience.retry),
        )
    }
}

/// The parts of a registry needed before the slots exist (startup) and after.
struct Partial<'a> {
    engine: &'a Arc<PolicyEngine>,
    compiler: &'a Compiler,
    store: &'a PolicyStore,
    settings: &'a PolicySettings,
}

impl Partial<'_> {
    /// Size cap → sha256 → inspect → compile (or cache) → type-check → conformance → store.
    fn upload(
        &self,
        kind: PolicyKind,
        bytes: &[u8],
        source: PolicySource,
    ) -> Result<(UploadReport, Arc<LoadedPolicy>), UploadError> {
        let (report, loaded) = prepare(
            self.engine,
            self.compiler,
            self.settings,
            kind,
            bytes,
            source,
            true,
        )?;
        let m = loaded.meta();
        self.store.put_blob(
            &m.sha256,
            bytes,
            &BlobMeta {
                record_version: 1,
                kind,
                name: m.name.clone(),
                version: m.version.clone(),
                source,
                stored_at_ms: now_ms(),
                size_bytes: bytes.len(),
            },
        )?;
        Ok((report, loaded))
    }

    /// The version to serve at startup, and why the built-in stands in for the stored active
    /// version when it does. A stored version that fails to load (settings its `configure`
    /// refuses today, say) stays the stored active one, so the next start tries it again:
    /// recording the built-in in its place would switch the operator's policy off for good
    /// on one bad start.
    fn restore(
        &mut self,
        kind: PolicyKind,
    ) -> Result<(Arc<LoadedPolicy>, Option<String>), UploadError> {
        let builtin = builtin_bytes(kind);
        let builtin_sha = sha256_hex(builtin);
        let record = self.store.active(kind)?;
        let mut fallback = None;
        if let Some(rec) = &record {
            let upgraded_builtin =
                rec.current.source == PolicySource::Builtin && rec.current.sha256 != builtin_sha;
            if !upgraded_builtin {
                match self.store.blob(&rec.current.sha256)? {
                    // It passed conformance when it was activated, and `configure` still
                    // checks today's settings: skip the cases so restarts stay fast.
                    Some(bytes) => match prepare(
                        self.engine,
                        self.compiler,
                        self.settings,
                        kind,
                        &bytes,
                        rec.current.source,
                        false,
                    ) {
                        Ok((_, loaded)) => return Ok((loaded, None)),
                        Err(e) => {
                            tracing::error!(
                                kind = %kind, sha256 = %rec.current.sha256, error = %e,
                                "the stored active policy does not load; the built-in serves until it does (next start) or another version is activated"
                            );
                            fallback = Some(format!(
                                "the active version {} does not load ({e}); the built-in serves until it loads at a later start or another version is activated",
                                rec.current.sha256
                            ));
                        }
                    },
                    None => {
                        tracing::error!(kind = %kind, sha256 = %rec.current.sha256, "the active policy's bytes are missing; serving the built-in");
                        fallback = Some(format!(
                            "the active version {}'s bytes are missing from the state database; the built-in serves until another version is activated",
                            rec.current.sha256
                        ));
                    }
                }
            }
        }
        let (_, loaded) = self.upload(kind, builtin, PolicySource::Builtin)?;
        if fallback.is_some() {
            return Ok((loaded, fallback));
        }
        if record.as_ref().map(|r| r.current.sha256.as_str()) != Some(builtin_sha.as_str()) {
            self.store.activate(
                kind,
                PolicyEntry {
                    sha256: builtin_sha,
                    source: PolicySource::Builtin,
                    activated_at_ms: now_ms(),
                },
            )?;
        }
        Ok((loaded, None))
    }
}

/// Everything an activation checks, without storing anything.
fn prepare(
    engine: &Arc<PolicyEngine>,
    compiler: &Compiler,
    settings: &PolicySettings,
    kind: PolicyKind,
    bytes: &[u8],
    source: PolicySource,
    conformance_cases: bool,
) -> Result<(UploadReport, Arc<LoadedPolicy>), UploadError> {
    let start = Instant::now();
    if bytes.len() > settings.max_upload_bytes {
        return Err(UploadError::TooLarge {
            size: bytes.len(),
            limit: settings.max_upload_bytes,
        });
    }
    let sha256 = sha256_hex(bytes);
    let inspection = inspect::inspect(bytes)?;
    let compiled = compiler.load(&sha256, bytes)?;
    let meta = PolicyMeta {
        kind,
        sha256,
        name: String::new(),
        version: String::new(),
        sdk_version: inspection.sdk_version.unwrap_or_default(),
        source,
        size_bytes: bytes.len(),
    };
    let loaded = LoadedPolicy::new(
        Arc::clone(engine),
        &compiled.component,
        meta,
        settings.run_settings(kind),
    )?;
    let cases = if conformance_cases {
        conformance::run(&loaded, &settings.standard(kind))
    } else {
        Vec::new()
    };
    let failed = conformance::failures(&cases);
    if !failed.is_empty() {
        return Err(UploadError::Conformance { failed });
    }
    let report = UploadReport {
        policy: loaded.meta().clone(),
        code: compiled.origin,
        compile_ms: ms(compiled.elapsed),
        cases,
        total_ms: ms(start.elapsed()),
    };
    Ok((report, loaded))
}

/// `headshot policy test`: the checks an activation runs (limits, type check, conformance),
/// with nothing stored. Compiled code is cached in `cache_dir` like the worker's.
pub fn test_component(
    settings: &PolicySettings,
    cache_dir: &Path,
    kind: PolicyKind,
    bytes: &[u8],
) -> Result<UploadReport, UploadError> {
    let engine = Arc::new(
        PolicyEngine::new(settings.engine.clone())
            .map_err(|e| UploadError::Start(e.to_string()))?,
    );
    let compiler = Compiler::new(Arc::clone(&engine), cache_dir)?;
    prepare(
        &engine,
        &compiler,
        settings,
        kind,
        bytes,
        PolicySource::Upload,
        true,
    )
    .map(|(report, _)| report)
}
