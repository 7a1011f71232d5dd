//! The orchestrator: one job through accept → validate → sanitize → admit → generate →
//! store → finish (DESIGN §3), with per-stage timings and the policy versions used.
//!
//! Jobs are accepted durably (flushed to sled) before the caller hears "IN_QUEUE", run one at
//! a time by a dispatcher task (generation itself happens on the inference thread), and
//! recorded durably when they end. A job id seen before returns its record and never runs
//! twice; storage keys are per job, so a job rerun after a crash never uploads twice either.

pub mod inference;
pub mod live;
pub mod upload;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use headshot_plugin_sdk::rules::request::{FieldError, Request};
use headshot_plugin_sdk::rules::sanitize::Sanitized;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::config::{Config, LoadMode, OnRestart, OutputMode};
use crate::error::{ErrorResponse, ErrorType};
use crate::pipeline::rng::Rng;
use crate::pipeline::style::apply_style;
use crate::pipeline::{GenerateError, GenerationParams, LoadOptions};
use crate::policy::{Registry, ValidateError};
use crate::resources::{AdmissionConfig, Monitor, SystemProbe};
use crate::state::{BreakerStore, JobFilter, JobRecord, JobStatus, JobStore, StateDb};
use crate::storage::{ImageStore, ObjectKey, Store};
use inference::{InferError, Inference};
use live::LiveJobs;
use upload::now_ms;

/// Longest accepted job id (also a storage path segment).
pub const MAX_JOB_ID_CHARS: usize = 128;

/// Answer to a submission.
#[derive(Debug)]
pub enum Submitted {
    /// Stored and queued now.
    Accepted(JobRecord),
    /// The id was seen before: its record, untouched.
    Existing(JobRecord),
}

impl Submitted {
    /// The record either way.
    pub fn record(&self) -> &JobRecord {
        match self {
            Self::Accepted(r) | Self::Existing(r) => r,
        }
    }
}

/// A repeated id answers with its recorded job only when it carries the same input: an id
/// reused for another request (another user's, say) would otherwise hand that caller the first
/// job's images and signed URLs. The error names neither the first job's input nor its user.
fn reused(existing: JobRecord, input: &Value) -> Result<Submitted, ErrorResponse> {
    if existing.input == *input {
        return Ok(Submitted::Existing(existing));
    }
    Err(ErrorResponse::validation(
        "this job id was already used for a different input",
        &[FieldError::new(
            "/id",
            "id_reused",
            format!(
                "job `{}` exists with another input; a repeated id must carry the same input (it is an idempotency key), or leave `id` out for a new job",
                existing.id
            ),
        )],
    ))
}

/// Job counts in Runpod's `/health` shape.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counts {
    /// Finished successfully.
    pub completed: u64,
    /// Finished with an error.
    pub failed: u64,
    /// Running.
    #[serde(rename = "inProgress")]
    pub in_progress: u64,
    /// Waiting.
    #[serde(rename = "inQueue")]
    pub in_queue: u64,
    /// Runs restarted after a crash.
    pub retried: u64,
    /// Cancelled.
    pub cancelled: u64,
}

struct Inner {
    config: Arc<Config>,
    jobs: JobStore,
    breakers: BreakerStore,
    registry: Arc<Registry>,
    store: Arc<Store>,
    inference: Inference,
    live: LiveJobs,
    queue: mpsc::UnboundedSender<String>,
    queued: AtomicUsize,
    retried: AtomicUsize,
    worker_id: String,
    unsent_dir: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    dispatcher: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    monitor: Arc<Monitor>,
    supervising: std::sync::atomic::AtomicBool,
    /// When the supervisor tries loading again (Unix ms; 0 before its first wait, and past
    /// while it loads): the retry-after a job refused meanwhile is told.
    next_load_ms: std::sync::atomic::AtomicU64,
    metrics: JobMetrics,
}

/// Aggregates for `/metrics`: stage durations (sum and count, a Prometheus summary without
/// quantiles) and errors by category.
#[derive(Default)]
pub struct JobMetrics {
    stages: std::sync::Mutex<std::collections::BTreeMap<String, (f64, u64)>>,
    errors: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl JobMetrics {
    fn observe(&self, rec: &JobRecord) {
        if let Ok(mut st) = self.stages.lock() {
            for (k, v) in &rec.timings {
                if let Some(stage) = k.strip_suffix("_ms") {
                    let e = st.entry(stage.to_string()).or_insert((0.0, 0));
                    e.0 += v;
                    e.1 += 1;
                }
            }
        }
        if let (Some(err), Ok(mut errors)) = (&rec.error, self.errors.lock()) {
            *errors.entry(err.error_type.as_str()).or_insert(0) += 1;
        }
    }

    /// `(stage, total ms, count)` per stage.
    pub fn stages(&self) -> Vec<(String, f64, u64)> {
        self.stages
            .lock()
            .map(|m| m.iter().map(|(k, (s, n))| (k.clone(), *s, *n)).collect())
            .unwrap_or_default()
    }

    /// `(error_type, count)`.
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        self.errors
            .lock()
            .map(|m| m.iter().map(|(k, n)| (*k, *n)).collect())
            .unwrap_or_default()
    }
}

/// Name of the model-loading breaker in the `breakers` tree.
pub const MODEL_BREAKER: &str = "model";

/// Every breaker the worker keeps. The admin API resets only these: a mistyped name must be
/// an error, not a new breaker that nothing reads.
pub const BREAKERS: [&str; 2] = [upload::STORAGE_BREAKER, MODEL_BREAKER];

/// The breakers that calls wait on, and so the ones forcing open means something for. The
/// model breaker only records the background loader's attempts.
pub const GATING_BREAKERS: [&str; 1] = [upload::STORAGE_BREAKER];

/// The job service; cheap to clone.
#[derive(Clone)]
pub struct JobService {
    inner: Arc<Inner>,
}

impl JobService {
    /// Starts the dispatcher (on the current Tokio runtime) and the inference thread, and
    /// deals with jobs a previous run left unfinished (`jobs.on_restart`).
    pub fn start(
        config: Arc<Config>,
        state: &StateDb,
        registry: Arc<Registry>,
        store: Arc<Store>,
    ) -> Result<Self, ErrorResponse> {
        let device = config.model.device;
        let probe = Arc::new(SystemProbe::new(device.is_cuda(), device.cuda_index()));
        let on_gpu = crate::resources::admits_on_gpu(device, probe.as_ref());
        let monitor = Arc::new(Monitor::new(probe, admission_config(&config), on_gpu));
        Self::start_with_monitor(config, state, registry, store, monitor)
    }

    /// As [`JobService::start`], with a given resource monitor (tests inject readings).
    pub fn start_with_monitor(
        config: Arc<Config>,
        state: &StateDb,
        registry: Arc<Registry>,
        store: Arc<Store>,
        monitor: Arc<Monitor>,
    ) -> Result<Self, ErrorResponse> {
        let init = |what: &str, e: String| {
            ErrorResponse::new(
                ErrorType::InitializationError,
                format!("{what}: {e}"),
                Value::Null,
            )
        };
        let jobs = state
            .jobs()
            .map_err(|e| init("opening the job store", e.to_string()))?;
        let breakers = state
            .breakers()
            .map_err(|e| init("opening the breaker store", e.to_string()))?;
        let inference = Inference::start(LoadOptions::from_config(&config))
            .map_err(|e| init("starting the inference thread", e.to_string()))?;
        let (queue, rx) = mpsc::unbounded_channel();
        let worker_id = std::env::var("RUNPOD_POD_ID").unwrap_or_else(|_| "local".into());
        let unsent_dir = config.data_dir.join("unsent");
        let live = LiveJobs::new(config.jobs.stream_keep_finished);
        let service = Self {
            inner: Arc::new(Inner {
                config,
                jobs,
                breakers,
                registry,
                store,
                inference,
                live,
                queue,
                queued: AtomicUsize::new(0),
                retried: AtomicUsize::new(0),
                worker_id,
                unsent_dir,
                stop: tokio::sync::watch::channel(false).0,
                dispatcher: std::sync::Mutex::new(None),
                monitor,
                supervising: std::sync::atomic::AtomicBool::new(false),
                next_load_ms: std::sync::atomic::AtomicU64::new(0),
                metrics: JobMetrics::default(),
            }),
        };
        service.recover()?;
        let dispatcher = service.clone();
        let handle = tokio::spawn(async move { dispatcher.dispatch(rx).await });
        if let Ok(mut slot) = service.inner.dispatcher.lock() {
            *slot = Some(handle);
        }
        if service.inner.config.model.load == LoadMode::Eager {
            service.supervise_model();
        }
        Ok(service)
    }

    /// Stage and error aggregates.
    pub fn metrics(&self) -> &JobMetrics {
        &self.inner.metrics
    }

    /// The resource monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.inner.monitor
    }

    /// Loads the model in the background, retrying failures as the resilience policy says
    /// (and, once it gives up, every `breaker.wait_in_open_ms`) while `model.reinit` is on.
    /// At most one supervisor runs.
    pub fn supervise_model(&self) {
        if self.inner.supervising.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let i = &me.inner;
            let mut stop = i.stop.subscribe();
            let mut rng = Rng::new(now_ms());
            let (mut attempt, mut previous_delay_ms, mut round_start) =
                (0u32, 0u64, Instant::now());
            loop {
                attempt += 1;
                let t = Instant::now();
                let result = i.inference.load(false).await;
                upload::record(
                    &i.registry,
                    &i.breakers,
                    MODEL_BREAKER,
                    result.is_ok(),
                    t.elapsed(),
                );
                let Err(err) = result else {
                    tracing::info!(attempts = attempt, "model loaded");
                    break;
                };
                if !i.config.model.reinit {
                    tracing::error!(error = %err, "model load failed; model.reinit is off");
                    break;
                }
                if matches!(
                    err,
                    InferError::Load {
                        permanent: true,
                        ..
                    }
                ) {
                    tracing::error!(error = %err, "model load failed and no retry can succeed with this configuration; not retrying");
                    break;
                }
                let failed = headshot_plugin_sdk::rules::retry::Attempt {
                    number: attempt,
                    kind: headshot_plugin_sdk::rules::retry::ErrorKind::ServerError,
                    status: None,
                    retry_after_ms: None,
                    elapsed_ms: round_start.elapsed().as_millis() as u64,
                    previous_delay_ms,
                };
                let delay = match i.registry.retry(&failed, rng.uniform()).0 {
                    Ok(headshot_plugin_sdk::rules::retry::RetryDecision::RetryAfter(ms)) => ms,
                    _ => {
                        // The schedule is exhausted: keep trying, slowly.
                        attempt = 0;
                        round_start = Instant::now();
                        i.config.policies.resilience.breaker.wait_in_open_ms
                    }
                };
                previous_delay_ms = delay;
                i.next_load_ms.store(now_ms() + delay, Ordering::Release);
                tracing::warn!(error = %err, retry_in_ms = delay, "model load failed; retrying in the background");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            i.supervising.store(false, Ordering::Release);
        });
    }

    /// Stops taking queued jobs, lets the running one finish and be recorded, and flushes.
    /// Jobs still queued stay in sled and run after the next start.
    pub async fn stop(&self) {
        self.inner.stop.send_replace(true);
        let handle = self.inner.dispatcher.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.await;
        }
        if let Err(e) = self.inner.jobs.flush_now() {
            tracing::error!(error = %e, "flushing jobs at shutdown failed");
        }
    }

    fn recover(&self) -> Result<(), ErrorResponse> {
        let i = &self.inner;
        let ids = i.jobs.unfinished().map_err(internal)?;
        for id in ids {
            let Some(mut rec) = i.jobs.get(&id).map_err(internal)? else {
                continue;
            };
            if rec.status.is_terminal() {
                i.jobs.put(&rec, false).map_err(internal)?;
                continue;
            }
            match i.config.jobs.on_restart {
                OnRestart::Requeue => {
                    if rec.status == JobStatus::InProgress {
                        i.retried.fetch_add(1, Ordering::Relaxed);
                    }
                    rec.status = JobStatus::InQueue;
                    i.jobs.put(&rec, false).map_err(internal)?;
                    i.live.entry(&id);
                    i.queued.fetch_add(1, Ordering::AcqRel);
                    let _ = i.queue.send(id.clone());
                    tracing::info!(job = %id, "re-queued a job left unfinished by the previous run");
                }
                OnRestart::Fail => {
                    let err = ErrorResponse::new(
                        ErrorType::Internal,
                        "the worker stopped while this job was unfinished (jobs.on_restart = \"fail\")",
                        Value::Null,
                    );
                    finish(&mut rec, JobStatus::Failed, None, Some(err));
                    i.jobs.put(&rec, true).map_err(internal)?;
                }
            }
        }
        i.jobs.flush_now().map_err(internal)?;
        let c = &i.config.jobs;
        if let Err(e) = i.jobs.prune(
            c.retention_count,
            c.retention_hours.saturating_mul(3_600_000),
            now_ms(),
        ) {
            tracing::warn!(error = %e, "job history pruning failed");
        }
        Ok(())
    }

    /// The registry (admin API).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// The job store (admin API).
    pub fn jobs(&self) -> &JobStore {
        &self.inner.jobs
    }

    /// The breaker store (admin API).
    pub fn breakers(&self) -> &BreakerStore {
        &self.inner.breakers
    }

    /// The model thread (admin API, readiness).
    pub fn inference(&self) -> &Inference {
        &self.inner.inference
    }

    /// The image store.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// This worker's id in responses.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.inner.queued.load(Ordering::Acquire)
    }

    /// Accepts a job: stored and flushed before this returns. `id` is the caller's
    /// idempotency key (generated when absent).
    pub fn submit(&self, id: Option<String>, input: Value) -> Result<Submitted, ErrorResponse> {
        let i = &self.inner;
        if !input.is_object() {
            return Err(ErrorResponse::validation(
                "`input` must be a JSON object",
                &[FieldError::new(
                    "/input",
                    "not_object",
                    "`input` must be a JSON object such as {\"prompt\": \"...\", \"user_id\": \"...\"}",
                )],
            ));
        }
        let id = match id {
            Some(id) => {
                if !headshot_plugin_sdk::rules::request::user_id_is_safe(&id, MAX_JOB_ID_CHARS) {
                    return Err(ErrorResponse::validation(
                        "invalid job id",
                        &[FieldError::new(
                            "/id",
                            "invalid_format",
                            format!(
                                "job ids use [A-Za-z0-9][A-Za-z0-9_-]* and at most {MAX_JOB_ID_CHARS} characters"
                            ),
                        )],
                    ));
                }
                id
            }
            None => new_job_id(),
        };
        if let Some(existing) = i.jobs.get(&id).map_err(internal)? {
            return reused(existing, &input);
        }
        if i.queued.load(Ordering::Acquire) >= i.config.jobs.queue_capacity {
            return Err(ErrorResponse::new(
                ErrorType::ResourceExhausted,
                format!(
                    "the queue is full ({} jobs waiting; jobs.queue_capacity)",
                    i.config.jobs.queue_capacity
                ),
                json!({ "retry_after_ms": 1000 }),
            ));
        }
        match i.jobs.accept(&id, input, now_ms()).map_err(internal)? {
            // A concurrent submission of this id stored first.
            Err(taken) => reused(taken.existing, &taken.input),
            Ok(record) => {
                i.live.entry(&id);
                i.queued.fetch_add(1, Ordering::AcqRel);
                if i.queue.send(id).is_err() {
                    return Err(ErrorResponse::new(
                        ErrorType::Internal,
                        "the job dispatcher has stopped",
                        Value::Null,
                    ));
                }
                Ok(Submitted::Accepted(record))
            }
        }
    }

    /// A job's record and, while it runs, its latest progress.
    pub fn get(&self, id: &str) -> Result<Option<(JobRecord, Option<Value>)>, ErrorResponse> {
        let rec = self.inner.jobs.get(id).map_err(internal)?;
        Ok(rec.map(|r| {
            let progress = self.inner.live.get(id).and_then(|l| l.latest());
            (r, progress)
        }))
    }

    /// Progress chunks not handed out yet (each chunk is returned once).
    pub fn drain_stream(&self, id: &str) -> Vec<Value> {
        self.inner
            .live
            .get(id)
            .map(|l| l.drain())
            .unwrap_or_default()
    }

    /// Waits until the job is finished or `timeout` passes; returns the latest record.
    pub async fn wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<JobRecord>, ErrorResponse> {
        let mut rx = self.inner.live.get(id).map(|l| l.subscribe());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rec = self.inner.jobs.get(id).map_err(internal)?;
            match &rec {
                Some(r) if !r.status.is_terminal() => {}
                _ => return Ok(rec),
            }
            let Some(rx) = rx.as_mut() else {
                // No live state (e.g. after eviction): poll.
                if tokio::time::Instant::now() >= deadline {
                    return Ok(rec);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if *rx.borrow() {
                continue;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return self.inner.jobs.get(id).map_err(internal),
                Err(_) => return self.inner.jobs.get(id).map_err(internal),
            }
        }
    }

    /// Cancels a job: a queued one at once, a running one at its next step. Returns the
    /// record (unchanged when already finished), or `None` for an unknown id.
    pub fn cancel(&self, id: &str) -> Result<Option<JobRecord>, ErrorResponse> {
        let i = &self.inner;
        let Some((mut rec, read)) = i.jobs.get_versioned(id).map_err(internal)? else {
            return Ok(None);
        };
        if rec.status.is_terminal() {
            return Ok(Some(rec));
        }
        let live = i.live.entry(id);
        live.cancel.store(true, Ordering::Release);
        if rec.status == JobStatus::InQueue {
            if !self.end_before_start(&mut rec, &read)? {
                // The dispatcher started it since the read: the flag set above stops it at
                // its next step, and the run records (and counts) the end.
                return i.jobs.get(id).map_err(internal);
            }
            i.live.finish(id);
        }
        Ok(Some(rec))
    }

    /// Cancels every queued job; returns how many.
    pub fn purge_queue(&self) -> Result<usize, ErrorResponse> {
        let ids = self.inner.jobs.unfinished().map_err(internal)?;
        let mut removed = 0;
        for id in ids {
            if let Some(rec) = self.inner.jobs.get(&id).map_err(internal)?
                && rec.status == JobStatus::InQueue
            {
                self.cancel(&id)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Counts by state.
    pub fn counts(&self) -> Result<Counts, ErrorResponse> {
        let c = self.inner.jobs.counts().map_err(internal)?;
        let get = |s| c.get(&s).copied().unwrap_or(0);
        Ok(Counts {
            completed: get(JobStatus::Completed),
            failed: get(JobStatus::Failed),
            in_progress: get(JobStatus::InProgress),
            in_queue: get(JobStatus::InQueue),
            retried: self.inner.retried.load(Ordering::Relaxed) as u64,
            cancelled: get(JobStatus::Cancelled),
        })
    }

    /// History page (admin API).
    pub fn list(
        &self,
        filter: &JobFilter,
        cursor: Option<&crate::state::Cursor>,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, Option<String>), ErrorResponse> {
        self.inner
            .jobs
            .list(filter, cursor, limit)
            .map_err(internal)
    }

    async fn dispatch(self, mut rx: mpsc::UnboundedReceiver<String>) {
        let mut since_prune = 0u32;
        let mut stop = self.inner.stop.subscribe();
        loop {
            let id = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                next = rx.recv() => match next {
                    Some(id) => id,
                    None => break,
                },
            };
            self.inner.queued.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = self.run(&id).await {
                tracing::error!(job = %id, error = %e.message, "job could not be recorded");
            }
            self.inner.live.finish(&id);
            since_prune += 1;
            if since_prune >= 256 {
                since_prune = 0;
                let c = &self.inner.config.jobs;
                if let Err(e) = self.inner.jobs.prune(
                    c.retention_count,
                    c.retention_hours.saturating_mul(3_600_000),
                    now_ms(),
                ) {
                    tracing::warn!(error = %e, "job history pruning failed");
                }
            }
        }
    }

    /// Ends a queued job as cancelled before it started, over the record as `read`: returns
    /// false, writing nothing, when someone wrote the job since (the dispatcher started it, or
    /// a cancel ended it). Counted in `/metrics` before the flush, so `/metrics` agrees with
    /// `/health` as soon as the record reads CANCELLED.
    fn end_before_start(
        &self,
        rec: &mut JobRecord,
        read: &crate::state::Version,
    ) -> Result<bool, ErrorResponse> {
        let i = &self.inner;
        let err = ErrorResponse::new(
            ErrorType::Cancelled,
            "cancelled before it started",
            Value::Null,
        );
        finish(rec, JobStatus::Cancelled, None, Some(err));
        if !i.jobs.replace(read, rec, false).map_err(internal)? {
            return Ok(false);
        }
        i.metrics.observe(rec);
        i.jobs.flush_now().map_err(internal)?;
        Ok(true)
    }

    /// Runs one job to its end and records the result.
    async fn run(&self, id: &str) -> Result<(), ErrorResponse> {
        let i = &self.inner;
        let Some((mut rec, read)) = i.jobs.get_versioned(id).map_err(internal)? else {
            return Ok(());
        };
        if rec.status.is_terminal() {
            return Ok(());
        }
        let live = i.live.entry(id);
        if live.cancel.load(Ordering::Acquire) {
            // A cancel is recording this job's end, or has: whichever of the two writes
            // first, the job ends (and is counted) once.
            self.end_before_start(&mut rec, &read)?;
            return Ok(());
        }
        rec.status = JobStatus::InProgress;
        rec.attempts += 1;
        let started = now_ms();
        rec.started_ms = Some(started);
        rec.timings.insert(
            "queue_ms".into(),
            started.saturating_sub(rec.created_ms) as f64,
        );
        // Flushed, as is the request with its seed below: a run that a crash or a power loss
        // interrupts counts as an attempt and reruns with the same seed (two fsyncs per job).
        // Only over the record as read: a cancel that recorded the job's end since wins.
        if !i.jobs.replace(&read, &rec, true).map_err(internal)? {
            return Ok(());
        }
        let t0 = Instant::now();
        let outcome = self.stages(&mut rec, &live).await;
        rec.timings.insert("total_ms".into(), ms(t0.elapsed()));
        match outcome {
            Ok(output) => finish(&mut rec, JobStatus::Completed, Some(output), None),
            Err(err) if err.error_type == ErrorType::Cancelled => {
                finish(&mut rec, JobStatus::Cancelled, None, Some(err))
            }
            Err(err) => finish(&mut rec, JobStatus::Failed, None, Some(err)),
        }
        i.metrics.observe(&rec);
        tracing::info!(job = %rec.id, status = rec.status.as_str(), total_ms = rec.timings.get("total_ms").copied().unwrap_or(0.0), "job finished");
        i.jobs.put(&rec, true).map_err(internal)
    }

    async fn stages(&self, rec: &mut JobRecord, live: &live::Live) -> Result<Value, ErrorResponse> {
        let i = &self.inner;
        // validate
        let t = Instant::now();
        let request = match rec
            .request
            .clone()
            .and_then(|v| serde_json::from_value::<Request>(v).ok())
        {
            // A rerun after a crash: the request (with its seed) was fixed by the first run.
            Some(r) => r,
            None => {
                let input = rec.input.to_string();
                let (result, used) = i.registry.validate(&input);
                record_used(rec, used);
                let mut req = match result {
                    Ok(r) => r,
                    Err(ValidateError::Invalid(fields)) => {
                        return Err(ErrorResponse::validation(
                            format!("the job input has {} problem(s)", fields.len()),
                            &fields,
                        ));
                    }
                    Err(ValidateError::Policy(f)) => return Err(policy_error(&f)),
                };
                rec.timings.insert("validate_ms".into(), ms(t.elapsed()));
                // sanitize
                let t = Instant::now();
                let (result, used) = i.registry.sanitize(&req.prompt);
                record_used(rec, used);
                match result {
                    Ok(Sanitized::Unchanged) => {}
                    Ok(Sanitized::Cleaned { text, changes }) => {
                        req.prompt = text;
                        rec.timings
                            .insert("sanitize_changes".into(), changes.len() as f64);
                    }
                    Ok(Sanitized::Reject(field)) => {
                        return Err(ErrorResponse::validation(
                            format!("the prompt was refused: {}", field.message),
                            &[field],
                        ));
                    }
                    Err(f) => return Err(policy_error(&f)),
                }
                rec.timings.insert("sanitize_ms".into(), ms(t.elapsed()));
                if req.seed.is_none() {
                    req.seed = Some(crate::pipeline::params::random_seed());
                }
                rec.request = serde_json::to_value(&req).ok();
                i.jobs.put(rec, true).map_err(internal)?;
                req
            }
        };
        // admit
        let t = Instant::now();
        let mode = i.config.server.output;
        if mode == OutputMode::Url {
            upload::admit(&i.registry, &i.breakers, upload::STORAGE_BREAKER)?;
        }
        let model = i.inference.state();
        if model.permanent_error {
            // Said as the load said it, before the supervisor has noticed and stopped.
            return Err(infer_error(InferError::Load {
                message: model.last_error.unwrap_or_default(),
                permanent: true,
            }));
        }
        if !model.loaded && i.supervising.load(Ordering::Acquire) {
            let why = model
                .last_error
                .unwrap_or_else(|| "the model is loading".into());
            // The supervisor's next try (a second at least: it may be loading now, or about
            // to be).
            let retry_after_ms = i
                .next_load_ms
                .load(Ordering::Acquire)
                .saturating_sub(now_ms())
                .max(1000);
            return Err(ErrorResponse::new(
                ErrorType::InitializationError,
                format!("the model is not ready: {why}"),
                json!({ "retry_after_ms": retry_after_ms, "load_failures": model.load_failures }),
            ));
        }
        if let Err(refusal) = i
            .monitor
            .admit(request.width, request.height, request.num_images)
        {
            return Err(ErrorResponse::new(
                ErrorType::ResourceExhausted,
                format!(
                    "not enough {} memory for {}x{}x{}: needs about {} MiB, {} MiB free ({} MiB kept free)",
                    refusal.pool,
                    request.width,
                    request.height,
                    request.num_images,
                    refusal.needed_bytes >> 20,
                    refusal.free_bytes >> 20,
                    refusal.margin_bytes >> 20
                ),
                json!({ "retry_after_ms": refusal.retry_after_ms, "refusal": refusal }),
            ));
        }
        rec.timings.insert("admit_ms".into(), ms(t.elapsed()));
        // generate
        let t = Instant::now();
        let prompt = apply_style(&i.config.styles, request.style.as_deref(), &request.prompt)
            .map_err(|e| {
                ErrorResponse::validation(
                    e.to_string(),
                    &[FieldError::new(
                        "/input/style",
                        "unknown_style",
                        e.to_string(),
                    )],
                )
            })?;
        let params = GenerationParams {
            prompt,
            width: request.width,
            height: request.height,
            steps: Some(request.steps),
            guidance: request.guidance.map(f64::from),
            seed: request.seed,
            num_images: request.num_images,
        };
        let progress_live = i.live.entry(&rec.id);
        let progress = Box::new(move |p: crate::pipeline::StepProgress| {
            progress_live
                .progress(json!({ "step": p.step, "total": p.total, "elapsed_ms": p.elapsed_ms }));
        });
        let generation = match i
            .inference
            .generate(params, Arc::clone(&live.cancel), progress)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                if matches!(
                    e,
                    InferError::Load {
                        permanent: false,
                        ..
                    }
                ) && i.config.model.reinit
                {
                    self.supervise_model();
                }
                return Err(infer_error(e));
            }
        };
        rec.timings.insert("generate_ms".into(), ms(t.elapsed()));
        rec.timings
            .insert("denoise_ms".into(), generation.timings.denoise_ms);
        // store
        let t = Instant::now();
        let max_user = i.config.policies.validator.max_user_id_chars as usize;
        let mut images = Vec::with_capacity(generation.images.len());
        match mode {
            OutputMode::Base64 => {
                for img in &generation.images {
                    images.push(json!({ "base64": base64(&img.png), "seed": img.seed, "width": img.width, "height": img.height }));
                }
            }
            OutputMode::Url => {
                let keys = generation
                    .images
                    .iter()
                    .enumerate()
                    .map(|(n, _)| ObjectKey::new(&request.user_id, &rec.id, n as u32, max_user))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        ErrorResponse::validation(
                            e.to_string(),
                            &[FieldError::new(
                                "/input/user_id",
                                "invalid_format",
                                e.to_string(),
                            )],
                        )
                    })?;
                let mut rng = Rng::new(now_ms() ^ request.seed.unwrap_or(0));
                for (key, img) in keys.iter().zip(&generation.images) {
                    if let Err(mut err) = upload::upload_one(
                        &i.registry,
                        &i.breakers,
                        &i.store,
                        key,
                        &img.png,
                        &mut rng,
                    )
                    .await
                    {
                        let pngs: Vec<&[u8]> =
                            generation.images.iter().map(|g| g.png.as_slice()).collect();
                        match upload::keep_locally(&i.unsent_dir, &keys, &pngs) {
                            Ok(dir) => {
                                err.message = format!(
                                    "{}. The images are kept at {}.",
                                    err.message.trim_end_matches('.'),
                                    dir.display()
                                );
                                if let Value::Object(m) = &mut err.details {
                                    m.insert("kept_at".into(), json!(dir));
                                }
                            }
                            Err(io) => {
                                tracing::error!(job = %rec.id, error = %io, "could not keep images locally")
                            }
                        }
                        return Err(err);
                    }
                }
                let ttl = Duration::from_secs(i.config.storage.url_ttl_secs);
                let urls = i.store.sign(&keys, ttl).await.map_err(|e| {
                    ErrorResponse::new(
                        ErrorType::StorageError,
                        format!("signing the image URLs failed: {e}"),
                        json!({ "error": e.to_string() }),
                    )
                })?;
                for ((img, url), key) in generation.images.iter().zip(urls).zip(&keys) {
                    images.push(json!({
                        "url": url.url, "expires_at_ms": url.expires_at_ms, "key": key.path(),
                        "seed": img.seed, "width": img.width, "height": img.height,
                    }));
                }
            }
        }
        rec.timings.insert("store_ms".into(), ms(t.elapsed()));
        let r = &generation.params;
        Ok(json!({
            "images": images,
            "seed": request.seed,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            "style": request.style,
            "prompt": request.prompt,
            // Tokens past each encoder's window are cut; a caller sees how much of the
            // prompt (with its style template) the image could not follow.
            "prompt_truncated_tokens": { "t5": generation.t5_truncated, "clip": generation.clip_truncated },
        }))
    }
}

/// Records which version of a slot a job called. Under `on_error = "fail_open"` a version
/// that failed leaves the answer to the native built-in rules: recorded beside it
/// (`"<slot>_fallback"`), or the record would credit the decision to the version that failed.
fn record_used(rec: &mut JobRecord, used: crate::policy::Used) {
    let slot = used.kind.as_str();
    let marker = format!("{slot}_fallback");
    if used.fallback {
        rec.policies.insert(
            marker,
            "the version failed; the native built-in rules answered (on_error = fail_open)".into(),
        );
    } else {
        // A rerun after a crash replaces what the earlier attempt recorded.
        rec.policies.remove(&marker);
    }
    rec.policies.insert(slot.into(), used.sha256);
}

fn finish(
    rec: &mut JobRecord,
    status: JobStatus,
    output: Option<Value>,
    error: Option<ErrorResponse>,
) {
    rec.status = status;
    rec.output = output;
    rec.error = error;
    rec.finished_ms = Some(now_ms());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn internal(e: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(
        ErrorType::Internal,
        format!("state store: {e}"),
        Value::Null,
    )
}

fn policy_error(f: &crate::policy::PolicyFailure) -> ErrorResponse {
    ErrorResponse::new(
        ErrorType::PolicyError,
        format!("the {} policy failed: {}", f.kind, f.error),
        json!({ "policy": f.kind, "sha256": f.sha256, "error": f.error.to_string(), "limit": f.error.label() }),
    )
}

fn infer_error(e: InferError) -> ErrorResponse {
    match e {
        InferError::Load {
            message,
            permanent: false,
        } => ErrorResponse::new(
            ErrorType::InitializationError,
            format!("the model is not available: {message}"),
            Value::Null,
        ),
        InferError::Load {
            message,
            permanent: true,
        } => ErrorResponse {
            retryable: false,
            ..ErrorResponse::new(
                ErrorType::InitializationError,
                format!("the model cannot be loaded with this configuration: {message}"),
                json!({ "permanent": true }),
            )
        },
        InferError::Stopped => ErrorResponse::new(
            ErrorType::Internal,
            "the inference thread has stopped",
            Value::Null,
        ),
        InferError::Panicked(ref message) => ErrorResponse::new(
            ErrorType::Internal,
            e.to_string(),
            json!({ "panic": message, "model_reloads": true }),
        ),
        InferError::Generate(g) => match &g {
            GenerateError::Cancelled { completed, total } => ErrorResponse::new(
                ErrorType::Cancelled,
                format!("cancelled after {completed} of {total} steps"),
                json!({ "completed_steps": completed, "total_steps": total }),
            ),
            GenerateError::InvalidParam { field, message } => ErrorResponse::validation(
                g.to_string(),
                &[FieldError::new(
                    format!("/input/{field}"),
                    "invalid",
                    message.clone(),
                )],
            ),
            _ if g.is_out_of_memory() => ErrorResponse::new(
                ErrorType::ResourceExhausted,
                format!("the device ran out of memory: {g}"),
                json!({ "retry_after_ms": 5000 }),
            ),
            _ => ErrorResponse::new(
                ErrorType::GenerationError,
                g.to_string(),
                json!({ "device_fault": g.is_device_fault() }),
            ),
        },
    }
}

/// The `[resources]` section as admission settings.
pub fn admission_config(config: &Config) -> AdmissionConfig {
    let r = &config.resources;
    AdmissionConfig {
        gpu_bytes_per_pixel: r.gpu_bytes_per_pixel,
        cpu_bytes_per_pixel: r.cpu_bytes_per_pixel,
        base_bytes: r.base_bytes,
        margin_bytes: r.margin_bytes,
        retry_after_ms: r.retry_after_ms,
    }
}

/// A new job id: time-ordered and random enough not to collide.
pub fn new_job_id() -> String {
    let mut rng = Rng::new(now_ms() ^ crate::pipeline::params::random_seed());
    format!("{:012x}-{:016x}", now_ms(), rng.next_u64())
}

/// Standard base64 (RFC 4648, padded).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(T[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn job_ids_are_safe_and_distinct() {
        let a = new_job_id();
        let b = new_job_id();
        assert_ne!(a, b);
        assert!(headshot_plugin_sdk::rules::request::user_id_is_safe(
            &a,
            MAX_JOB_ID_CHARS
        ));
    }
}
