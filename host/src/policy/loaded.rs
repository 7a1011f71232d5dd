//! One compiled, type-checked policy version and the way it is called.
//!
//! Isolation: every call runs on an instance that has never served another call (fresh
//! linear memory, fresh globals), and the instance is thrown away afterwards. To keep that
//! cheap, a background thread pre-instantiates and configures a few instances per version
//! (`prewarm`), and disposes of used ones; a request only pops one and calls it. When the
//! pool is empty, the request instantiates inline — slower, never wrong.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use headshot_plugin_sdk::rules::{breaker, request, retry, sanitize};
use serde::Serialize;
use wasmtime::Store;
use wasmtime::component::Component;

use super::bindings::{resilience, sanitizer, validator};
use super::convert::{self, OutputLimits};
use super::engine::{HostState, PolicyEngine, classify, classify_in};
use super::error::{CallError, UploadError};
use super::kind::PolicyKind;

/// Where a stored policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// Embedded in this binary.
    Builtin,
    /// Uploaded by an operator (admin API or `headshot policy push`).
    Upload,
}

/// What a policy says about itself, plus what the host measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyMeta {
    /// Slot.
    pub kind: PolicyKind,
    /// Hex sha256 of the component bytes; the version's identity.
    pub sha256: String,
    /// From `meta.info()`.
    pub name: String,
    /// From `meta.info()`.
    pub version: String,
    /// From the `headshot:sdk-version` custom section (or `meta.info()` when absent).
    pub sdk_version: String,
    /// Built-in or uploaded.
    pub source: PolicySource,
    /// Component size.
    pub size_bytes: usize,
}

enum Pre {
    Validator(validator::ValidatorPre<HostState>),
    Sanitizer(sanitizer::SanitizerPre<HostState>),
    Resilience(resilience::ResiliencePre<HostState>),
}

enum Bound {
    Validator(validator::Validator),
    Sanitizer(sanitizer::Sanitizer),
    Resilience(resilience::Resilience),
}

/// A configured instance that has not served a call yet.
struct Ready {
    store: Store<HostState>,
    bound: Bound,
}

/// Call counters for status and metrics.
#[derive(Debug, Default)]
pub struct CallStats {
    /// Calls made.
    pub calls: AtomicU64,
    /// Calls that ended in a [`CallError`].
    pub failures: AtomicU64,
    /// Calls that found the prewarmed pool empty.
    pub cold_calls: AtomicU64,
    /// Wall time of all calls, microseconds (with `calls`, the mean latency).
    pub total_micros: AtomicU64,
    /// Last failure, for the admin API.
    pub last_error: Mutex<Option<String>>,
}

/// Settings a loaded version runs with.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// Wall-clock limit per call.
    pub deadline: Duration,
    /// The `configure` JSON envelope for this kind.
    pub config_json: String,
    /// Output caps.
    pub output: OutputLimits,
    /// Instances kept ready.
    pub prewarm: usize,
}

/// What it takes to make instances of one version.
struct Core {
    pre: Pre,
    engine: Arc<PolicyEngine>,
    settings: RunSettings,
    label: Arc<str>,
}

/// Canned inputs for warming a fresh instance.
const WARM_INPUT: &str = r#"{"prompt":"a warm-up portrait of a person in soft light","user_id":"warmup","width":512,"height":512}"#;
const WARM_PROMPT: &str = "a warm-up portrait of a person\u{200B} in soft   light";

impl Core {
    /// A fresh store and instance, configured with this slot's settings.
    fn instantiate(&self) -> Result<Ready, CallError> {
        let mut store = self.engine.store(Arc::clone(&self.label));
        self.engine.arm(
            &mut store,
            self.settings
                .deadline
                .saturating_mul(5)
                .max(Duration::from_millis(100)),
        )?;
        let bound = match &self.pre {
            Pre::Validator(p) => {
                Bound::Validator(p.instantiate(&mut store).map_err(|e| classify(&e))?)
            }
            Pre::Sanitizer(p) => {
                Bound::Sanitizer(p.instantiate(&mut store).map_err(|e| classify(&e))?)
            }
            Pre::Resilience(p) => {
                Bound::Resilience(p.instantiate(&mut store).map_err(|e| classify(&e))?)
            }
        };
        let config = &self.settings.config_json;
        let configured = match &bound {
            Bound::Validator(b) => b.headshot_policy_meta().call_configure(&mut store, config),
            Bound::Sanitizer(b) => b.headshot_policy_meta().call_configure(&mut store, config),
            Bound::Resilience(b) => b.headshot_policy_meta().call_configure(&mut store, config),
        };
        match configured {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(CallError::Configure(message)),
            Err(e) => return Err(classify_in(&e, store.data())),
        }
        // One canned call (no request data) touches the pages a real call needs — stack,
        // heap growth, lazily initialised tables — so the request that gets this instance
        // does not pay for page faults. The instance has still served no request.
        let (call, warmed) = match &bound {
            Bound::Validator(b) => (
                "validate of a standard 512x512 request",
                b.headshot_policy_validation()
                    .call_validate(&mut store, WARM_INPUT)
                    .map(drop),
            ),
            Bound::Sanitizer(b) => (
                "sanitize of a short portrait prompt",
                b.headshot_policy_sanitization()
                    .call_sanitize(&mut store, WARM_PROMPT)
                    .map(drop),
            ),
            Bound::Resilience(_) => ("none", Ok(())),
        };
        if let Err(e) = warmed {
            return Err(CallError::WarmUp {
                call,
                error: Box::new(classify_in(&e, store.data())),
            });
        }
        Ok(Ready { store, bound })
    }

    fn info(&self, ready: &mut Ready) -> Result<super::bindings::PolicyInfo, CallError> {
        let store = &mut ready.store;
        let info = match &ready.bound {
            Bound::Validator(b) => b.headshot_policy_meta().call_info(&mut *store),
            Bound::Sanitizer(b) => b.headshot_policy_meta().call_info(&mut *store),
            Bound::Resilience(b) => b.headshot_policy_meta().call_info(&mut *store),
        }
        .map_err(|e| classify(&e))?;
        let limit = self.settings.output.max_label_bytes;
        for s in [&info.name, &info.version, &info.sdk_version] {
            if s.len() > limit {
                return Err(CallError::Output(format!(
                    "policy info field is {} bytes; the limit is {limit}",
                    s.len()
                )));
            }
        }
        Ok(info)
    }
}

/// A compiled, type-checked, configured-on-demand policy version.
pub struct LoadedPolicy {
    meta: PolicyMeta,
    core: Core,
    pool: Mutex<Vec<Ready>>,
    refilling: AtomicBool,
    inflight: AtomicUsize,
    /// Counters.
    pub stats: CallStats,
    me: Weak<LoadedPolicy>,
}

impl LoadedPolicy {
    /// Type-checks `component` against `meta.kind`'s world and reads `meta.info()` from a
    /// configured instance. `meta.name`/`version` are filled in from the guest.
    pub fn new(
        engine: Arc<PolicyEngine>,
        component: &Component,
        mut meta: PolicyMeta,
        settings: RunSettings,
    ) -> Result<Arc<Self>, UploadError> {
        let imports: Vec<String> = component
            .component_type()
            .imports(engine.engine())
            .map(|(name, _)| name.to_string())
            .collect();
        if let Some(bad) = super::inspect::forbidden_import(imports.iter().map(String::as_str)) {
            return Err(UploadError::ForbiddenImport(bad));
        }
        let linker = engine
            .linker(component)
            .map_err(|m| UploadError::WrongWorld {
                kind: meta.kind,
                message: m,
            })?;
        let wrong = |e: wasmtime::Error| UploadError::WrongWorld {
            kind: meta.kind,
            message: format!("{e:#}"),
        };
        let instance_pre = linker.instantiate_pre(component).map_err(wrong)?;
        let pre = match meta.kind {
            PolicyKind::Validator => {
                Pre::Validator(validator::ValidatorPre::new(instance_pre).map_err(wrong)?)
            }
            PolicyKind::Sanitizer => {
                Pre::Sanitizer(sanitizer::SanitizerPre::new(instance_pre).map_err(wrong)?)
            }
            PolicyKind::Resilience => {
                Pre::Resilience(resilience::ResiliencePre::new(instance_pre).map_err(wrong)?)
            }
        };
        let label: Arc<str> = format!(
            "{}:{}",
            meta.kind,
            &meta.sha256[..12.min(meta.sha256.len())]
        )
        .into();
        let core = Core {
            pre,
            engine,
            settings,
            label,
        };
        // One instance up front: proves instantiate + configure work and reads info().
        let mut ready = core
            .instantiate()
            .map_err(|e| UploadError::Start(e.to_string()))?;
        let info = core
            .info(&mut ready)
            .map_err(|e| UploadError::Start(e.to_string()))?;
        drop(ready);
        meta.name = info.name;
        meta.version = info.version;
        if meta.sdk_version.is_empty() {
            meta.sdk_version = info.sdk_version;
        }
        let policy = Arc::new_cyclic(|me| Self {
            meta,
            core,
            pool: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            stats: CallStats::default(),
            me: me.clone(),
        });
        let me = Arc::downgrade(&policy);
        policy.core.engine.chore(Box::new(move || {
            if let Some(p) = me.upgrade() {
                p.refill();
            }
        }));
        Ok(policy)
    }

    /// Identity and description.
    pub fn meta(&self) -> &PolicyMeta {
        &self.meta
    }

    /// Calls currently running on this version.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Instances ready in the pool.
    pub fn pooled(&self) -> usize {
        self.pool.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Fills the pool up to `prewarm` on the calling thread (the engine's chore thread).
    fn refill(&self) {
        let target = self.core.settings.prewarm;
        loop {
            let have = self.pooled();
            if have >= target {
                break;
            }
            match self.core.instantiate() {
                Ok(ready) => {
                    if let Ok(mut pool) = self.pool.lock() {
                        pool.push(ready);
                    }
                }
                Err(e) => {
                    tracing::warn!(policy = &*self.core.label, error = %e, "could not prewarm a policy instance");
                    break;
                }
            }
        }
        self.refilling.store(false, Ordering::Release);
    }

    /// Runs `f` on a never-used instance under the call deadline, then disposes of it.
    fn with_instance<R>(
        &self,
        f: impl FnOnce(&mut Store<HostState>, &Bound) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.call_once(f);
        self.stats
            .total_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        self.noted(result)
    }

    /// Counts and logs a failed call (a trap, a limit, or an answer refused by the checks).
    fn noted<T>(&self, result: Result<T, CallError>) -> Result<T, CallError> {
        if let Err(e) = &result {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = self.stats.last_error.lock() {
                *last = Some(e.to_string());
            }
            tracing::warn!(policy = &*self.core.label, error = %e, "policy call failed");
        }
        result
    }

    fn call_once<R>(
        &self,
        f: impl FnOnce(&mut Store<HostState>, &Bound) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let (popped, remaining) = match self.pool.lock() {
            Ok(mut pool) => {
                let r = pool.pop();
                (r, pool.len())
            }
            Err(_) => (None, 0),
        };
        if self.core.settings.prewarm > 0
            && remaining <= self.core.settings.prewarm / 2
            && !self.refilling.swap(true, Ordering::AcqRel)
        {
            let me = self.me.clone();
            self.core.engine.chore(Box::new(move || {
                if let Some(p) = me.upgrade() {
                    p.refill();
                }
            }));
        }
        let mut ready = match popped {
            Some(r) => r,
            None => {
                self.stats.cold_calls.fetch_add(1, Ordering::Relaxed);
                self.core.instantiate()?
            }
        };
        self.core
            .engine
            .arm(&mut ready.store, self.core.settings.deadline)?;
        let result =
            f(&mut ready.store, &ready.bound).map_err(|e| classify_in(&e, ready.store.data()));
        // Dropping a store returns its slot to the pool allocator (memory reset): off the
        // request path.
        self.core.engine.chore(Box::new(move || drop(ready)));
        result
    }

    /// `validation.validate` with output checks.
    pub fn validate(
        &self,
        input_json: &str,
    ) -> Result<Result<request::Request, Vec<request::FieldError>>, CallError> {
        let answer = self.with_instance(|store, bound| match bound {
            Bound::Validator(b) => b
                .headshot_policy_validation()
                .call_validate(store, input_json),
            _ => Err(wasmtime::Error::msg("not a validator")),
        })?;
        self.noted(convert::validation(answer, &self.core.settings.output))
    }

    /// `sanitization.sanitize` with output checks.
    pub fn sanitize(&self, prompt: &str) -> Result<sanitize::Sanitized, CallError> {
        let answer = self.with_instance(|store, bound| match bound {
            Bound::Sanitizer(b) => b
                .headshot_policy_sanitization()
                .call_sanitize(store, prompt),
            _ => Err(wasmtime::Error::msg("not a sanitizer")),
        })?;
        self.noted(convert::sanitized(
            answer,
            prompt.len(),
            &self.core.settings.output,
        ))
    }

    /// `decisions.admit` with output checks.
    pub fn admit(
        &self,
        current: &breaker::Breaker,
        now_ms: u64,
    ) -> Result<(breaker::Admission, breaker::Breaker), CallError> {
        let input = convert::breaker_in(current);
        let answer = self.with_instance(|store, bound| match bound {
            Bound::Resilience(b) => b
                .headshot_policy_decisions()
                .call_admit(store, &input, now_ms),
            _ => Err(wasmtime::Error::msg("not a resilience policy")),
        })?;
        let next = self.noted(convert::breaker_out(
            answer.next,
            &self.core.settings.output,
        ))?;
        Ok((convert::admission(answer.decision), next))
    }

    /// `decisions.record-outcome` with output checks.
    pub fn record_outcome(
        &self,
        current: &breaker::Breaker,
        seen: &breaker::CallResult,
        now_ms: u64,
    ) -> Result<breaker::Breaker, CallError> {
        let input = convert::breaker_in(current);
        let seen = convert::call_result(seen);
        let answer = self.with_instance(|store, bound| match bound {
            Bound::Resilience(b) => b
                .headshot_policy_decisions()
                .call_record_outcome(store, &input, seen, now_ms),
            _ => Err(wasmtime::Error::msg("not a resilience policy")),
        })?;
        self.noted(convert::breaker_out(answer, &self.core.settings.output))
    }

    /// `decisions.retry`.
    pub fn retry(
        &self,
        failed: &retry::Attempt,
        jitter: f64,
    ) -> Result<retry::RetryDecision, CallError> {
        let input = convert::attempt(failed);
        let answer = self.with_instance(|store, bound| match bound {
            Bound::Resilience(b) => b
                .headshot_policy_decisions()
                .call_retry(store, input, jitter),
            _ => Err(wasmtime::Error::msg("not a resilience policy")),
        })?;
        Ok(convert::retry_decision(answer))
    }

    /// Waits until no call runs on this version (after a swap), up to `timeout`.
    pub fn drain(&self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        while self.inflight() > 0 {
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Some(start.elapsed())
    }
}
