//! Runpod serverless worker protocol (ref/runpod.md §1): take jobs, post progress and
//! results in order, heartbeat on its own thread, honour the per-job stop channel, drain on
//! SIGTERM, and stop taking after a `stopPod` result.
//!
//! Jobs run through the same [`JobService`] as the local API, so a Runpod job gets the same
//! validation, policies, storage, idempotency (the Runpod job id is the job id) and history.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};

use crate::error::{ErrorResponse, ErrorType};
use crate::jobs::{JobService, Submitted};
use crate::state::{JobRecord, JobStatus};

/// Version string reported as `runpod_version` (this worker, not the Python SDK).
pub const WORKER_VERSION: &str = concat!("headshot-", env!("CARGO_PKG_VERSION"));

/// The platform's settings, from `RUNPOD_*` variables.
#[derive(Clone, Debug, PartialEq)]
pub struct RunpodEnv {
    /// Job-take URL, worker id substituted.
    pub take_url: String,
    /// Job-done URL template with `$ID` left for the job id.
    pub done_url: String,
    /// Heartbeat URL, worker id substituted.
    pub ping_url: Option<String>,
    /// Sent verbatim in `Authorization`.
    pub api_key: Option<String>,
    /// `RUNPOD_POD_ID`.
    pub worker_id: String,
    /// Heartbeat period.
    pub ping_interval: Duration,
    /// `RUNPOD_POD_HOSTNAME`.
    pub hostname: String,
    /// Per-job stop channel URL (from the take URL), when the template allows it.
    pub stop_url: Option<String>,
}

/// What `done_url` holds when `RUNPOD_WEBHOOK_POST_OUTPUT` is unset (the Runpod SDK's own
/// placeholder); [`RunpodEnv::check`] refuses to start with it.
const UNSET_DONE_URL: &str = "JOB_DONE_URL";

impl RunpodEnv {
    /// Reads the environment through `get`; `None` when `RUNPOD_WEBHOOK_GET_JOB` is unset (local
    /// mode).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let take = get("RUNPOD_WEBHOOK_GET_JOB").filter(|v| !v.is_empty())?;
        let pod_id = get("RUNPOD_POD_ID").filter(|v| !v.is_empty());
        let has_pod_id = pod_id.is_some();
        let worker_id = pod_id.unwrap_or_else(|| format!("headshot-{}", crate::jobs::new_job_id()));
        let take_url = take
            .replace("$RUNPOD_POD_ID", &worker_id)
            .replace("$ID", &worker_id);
        let done_url = get("RUNPOD_WEBHOOK_POST_OUTPUT")
            .unwrap_or_else(|| UNSET_DONE_URL.into())
            .replace("$RUNPOD_POD_ID", &worker_id);
        let api_key = get("RUNPOD_AI_API_KEY").filter(|v| !v.is_empty());
        // As the SDK: the heartbeat runs only with a key and a pod id to report (a made-up
        // id would ping for a worker the platform does not know).
        let ping_url = get("RUNPOD_WEBHOOK_PING")
            .filter(|v| !v.is_empty())
            .filter(|_| {
                let usable = api_key.is_some() && has_pod_id;
                if !usable {
                    tracing::warn!("RUNPOD_WEBHOOK_PING is set but RUNPOD_AI_API_KEY or RUNPOD_POD_ID is not: no heartbeat");
                }
                usable
            })
            .map(|u| u.replace("$RUNPOD_POD_ID", &worker_id));
        let ping_interval = match get("RUNPOD_PING_INTERVAL") {
            None => 10_000,
            Some(raw) => raw.trim().parse::<u64>().unwrap_or_else(|_| {
                tracing::warn!(value = %raw, "RUNPOD_PING_INTERVAL is not a whole number of milliseconds; pinging every 10000 ms");
                10_000
            }),
        }
        .max(100);
        let stop_url = take_url
            .contains("/job-take/")
            .then(|| take_url.replace("/job-take/", "/job-stop/"));
        Some(Self {
            take_url,
            done_url,
            ping_url,
            api_key,
            worker_id,
            ping_interval: Duration::from_millis(ping_interval),
            hostname: get("RUNPOD_POD_HOSTNAME").unwrap_or_else(|| "unknown".into()),
            stop_url,
        })
    }
}

impl RunpodEnv {
    /// Checks the webhook URLs before the first job is taken: a worker that cannot post its
    /// results must say which variable is wrong at start, not lose every result later.
    pub fn check(&self) -> Result<(), String> {
        let parses = |var: &str, url: &str| -> Result<(), String> {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
                Ok(u) => Err(format!(
                    "{var} must be an http(s) URL, got scheme `{}`",
                    u.scheme()
                )),
                Err(e) => Err(format!("{var} is not a URL ({e}): `{url}`")),
            }
        };
        parses("RUNPOD_WEBHOOK_GET_JOB", &self.take_url)?;
        if self.done_url == UNSET_DONE_URL {
            return Err(
                "RUNPOD_WEBHOOK_POST_OUTPUT is unset: results would have nowhere to go".into(),
            );
        }
        parses(
            "RUNPOD_WEBHOOK_POST_OUTPUT",
            &self.done_url.replace("$ID", "job"),
        )?;
        // RUNPOD_WEBHOOK_POST_STREAM is not read: this worker posts progress to job-done.
        if let Some(url) = &self.ping_url {
            parses("RUNPOD_WEBHOOK_PING", url)?;
        }
        Ok(())
    }
}

/// `s` with every byte outside RFC 3986's unreserved set percent-encoded, for a job id put
/// into a URL's path or query: an id is the platform's, but one holding `/` or `?` must not
/// reach another route or add a parameter.
pub fn escape_component(s: &str) -> String {
    crate::percent::percent_encode(s, b"-_.~")
}

/// Appends `query` (`k=v&...`) with `?` or `&` as the URL needs.
pub fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

/// Tunables of the protocol loop (the defaults are the platform's; tests shorten them).
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Largest job-done body; larger results become an error result.
    pub max_output_bytes: usize,
    /// Wait after a 429 on job-take.
    pub backoff_429: Duration,
    /// Wait after a failed take (5xx, connection error), doubled up to 10×.
    pub backoff_error: Duration,
    /// Bound on one take or stop long-poll.
    pub poll_timeout: Duration,
    /// Waits between job-done attempts on 5xx or connection errors (3 attempts in all).
    pub done_retry_delays: Vec<Duration>,
    /// Least time between empty stop polls.
    pub stop_poll_interval: Duration,
    /// How often a running job's progress is forwarded.
    pub progress_interval: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            max_output_bytes: 20 << 20,
            backoff_429: Duration::from_secs(5),
            backoff_error: Duration::from_millis(500),
            poll_timeout: Duration::from_secs(90),
            done_retry_delays: vec![Duration::from_secs(2), Duration::from_secs(3)],
            stop_poll_interval: Duration::from_secs(1),
            progress_interval: Duration::from_millis(100),
        }
    }
}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerExit {
    /// SIGTERM/SIGINT: in-flight work finished and posted.
    Shutdown,
    /// A result carried `stopPod`: the platform will recycle the worker.
    StopPod,
}

/// Jobs this process has taken and not yet reported (for `job_in_progress` and pings).
#[derive(Default)]
pub struct InFlight {
    ids: std::sync::Mutex<Vec<String>>,
}

impl InFlight {
    fn add(&self, id: &str) {
        if let Ok(mut v) = self.ids.lock() {
            v.push(id.to_string());
        }
    }
    fn remove(&self, id: &str) {
        if let Ok(mut v) = self.ids.lock() {
            v.retain(|x| x != id);
        }
    }
    /// Ids in flight.
    pub fn ids(&self) -> Vec<String> {
        self.ids.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// One job as the platform hands it out.
#[derive(Clone, Debug, PartialEq)]
pub struct TakenJob {
    /// Job id.
    pub id: String,
    /// The client's `input`.
    pub input: Value,
}

/// What a take returned.
#[derive(Debug)]
pub enum Take {
    /// Jobs to run (one, or a batch).
    Jobs(Vec<TakenJob>),
    /// Nothing now: poll again.
    Empty,
    /// Rate limited: back off.
    RateLimited,
    /// Failed: back off a little.
    Failed(String),
}

/// Parses a job-take answer body. Jobs missing `id` or `input` are skipped (and logged).
pub fn parse_take(status: u16, content_type: Option<&str>, body: &[u8]) -> Take {
    match status {
        204 | 400 => return Take::Empty,
        429 => return Take::RateLimited,
        200 => {}
        other => return Take::Failed(format!("job-take answered HTTP {other}")),
    }
    if body.iter().all(|b| b.is_ascii_whitespace())
        || !content_type.is_some_and(|c| c.contains("json"))
    {
        return Take::Empty;
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Take::Failed(format!("job-take body is not JSON: {e}")),
    };
    let one = |v: &Value| -> Option<TakenJob> {
        let id = v.get("id").and_then(|i| i.as_str()).map(str::to_string);
        let input = v.get("input").cloned();
        match (id, input) {
            (Some(id), Some(input)) => Some(TakenJob { id, input }),
            _ => {
                tracing::error!(job = %v, "job has missing field(s): id or input; skipped");
                None
            }
        }
    };
    match &value {
        Value::Array(items) => Take::Jobs(items.iter().filter_map(one).collect()),
        Value::Object(_) => Take::Jobs(one(&value).into_iter().collect()),
        _ => Take::Failed("job-take body is neither an object nor an array".into()),
    }
}

/// The `error` string of a failed job: our ErrorResponse plus the six keys of the Python
/// SDK's exception report, so Runpod's tooling and ours both read it.
pub fn error_report(err: &ErrorResponse, env: &RunpodEnv) -> String {
    let mut v = serde_json::to_value(err).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        m.insert("error_message".into(), json!(err.message));
        m.insert("error_traceback".into(), json!(err.details.to_string()));
        m.insert("hostname".into(), json!(env.hostname));
        m.insert("worker_id".into(), json!(env.worker_id));
        m.insert("runpod_version".into(), json!(WORKER_VERSION));
    }
    v.to_string()
}

/// The job-done body for a finished record (`None` for a cancelled job: the platform already
/// knows, and posting would resurrect it).
pub fn done_body(
    rec: &JobRecord,
    env: &RunpodEnv,
    stop_pod: bool,
    max_bytes: usize,
) -> Option<String> {
    let mut body = match rec.status {
        JobStatus::Completed => json!({ "output": rec.output.clone().unwrap_or(Value::Null) }),
        JobStatus::Failed => {
            let err = rec.error.clone().unwrap_or_else(|| {
                ErrorResponse::new(ErrorType::Internal, "failed without an error", Value::Null)
            });
            json!({ "error": error_report(&err, env) })
        }
        JobStatus::Cancelled => return None,
        JobStatus::InQueue | JobStatus::InProgress => {
            let err =
                ErrorResponse::new(ErrorType::Internal, "the job did not finish", Value::Null);
            json!({ "error": error_report(&err, env) })
        }
    };
    if stop_pod {
        body["stopPod"] = json!(true);
    }
    let text = body.to_string();
    if text.len() <= max_bytes {
        return Some(text);
    }
    let err = ErrorResponse::new(
        ErrorType::Internal,
        format!(
            "the result is {} bytes; the limit is {max_bytes} bytes (use output = \"url\")",
            text.len()
        ),
        json!({ "size_bytes": text.len(), "limit_bytes": max_bytes }),
    );
    let mut body = json!({ "error": error_report(&err, env) });
    if stop_pod {
        body["stopPod"] = json!(true);
    }
    Some(body.to_string())
}

/// The protocol loop.
pub struct Worker {
    env: RunpodEnv,
    opts: WorkerOptions,
    service: JobService,
    http: reqwest::Client,
    in_flight: Arc<InFlight>,
    stop_pod: Arc<AtomicBool>,
}

impl Worker {
    /// A worker for `service` with the platform's settings.
    pub fn new(
        env: RunpodEnv,
        opts: WorkerOptions,
        service: JobService,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("headshot-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            env,
            opts,
            service,
            http,
            in_flight: Arc::new(InFlight::default()),
            stop_pod: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Jobs in flight (for the heartbeat).
    pub fn in_flight(&self) -> Arc<InFlight> {
        Arc::clone(&self.in_flight)
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.env.api_key {
            Some(k) => req.header(reqwest::header::AUTHORIZATION, k),
            None => req,
        }
    }

    /// Runs until shutdown or `stopPod`. Concurrency is 1: no take while a job runs.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> WorkerExit {
        let heartbeat = self.env.ping_url.clone().map(|url| {
            start_heartbeat(
                url,
                self.env.api_key.clone(),
                self.env.ping_interval,
                Arc::clone(&self.in_flight),
            )
        });
        let mut backoff = self.opts.backoff_error;
        let exit = loop {
            if *shutdown.borrow() {
                break WorkerExit::Shutdown;
            }
            if self.stop_pod.load(Ordering::Acquire) {
                break WorkerExit::StopPod;
            }
            let take = tokio::select! {
                t = self.take() => t,
                _ = shutdown.wait_for(|s| *s) => break WorkerExit::Shutdown,
            };
            match take {
                Take::Jobs(jobs) => {
                    backoff = self.opts.backoff_error;
                    let mut queue: VecDeque<TakenJob> = jobs.into();
                    while let Some(job) = queue.pop_front() {
                        // A job already handed to us is finished even during shutdown.
                        self.run_job(job).await;
                        if self.stop_pod.load(Ordering::Acquire) {
                            break;
                        }
                    }
                }
                Take::Empty => {}
                Take::RateLimited => {
                    tokio::select! {
                        _ = tokio::time::sleep(self.opts.backoff_429) => {}
                        _ = shutdown.wait_for(|s| *s) => break WorkerExit::Shutdown,
                    }
                }
                Take::Failed(why) => {
                    tracing::warn!(error = %why, "failed to get job");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => break WorkerExit::Shutdown,
                    }
                    backoff = (backoff * 2).min(self.opts.backoff_error * 10);
                }
            }
        };
        if let Some((stop, handle)) = heartbeat {
            stop.store(true, Ordering::Release);
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        exit
    }

    async fn take(&self) -> Take {
        let busy = u8::from(!self.in_flight.ids().is_empty());
        let url = with_query(&self.env.take_url, &format!("job_in_progress={busy}"));
        let req = self
            .auth(self.http.get(&url))
            .timeout(self.opts.poll_timeout);
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let ct = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                match resp.bytes().await {
                    Ok(body) => parse_take(status, ct.as_deref(), &body),
                    Err(e) => Take::Failed(format!("reading the job-take body: {e}")),
                }
            }
            Err(e) if e.is_timeout() => Take::Empty,
            Err(e) => Take::Failed(format!("job-take: {e}")),
        }
    }

    async fn run_job(&self, job: TakenJob) {
        let id = job.id.clone();
        self.in_flight.add(&id);
        let poster = Arc::new(Mutex::new(()));
        let submitted = {
            let service = self.service.clone();
            let (jid, input) = (job.id.clone(), job.input.clone());
            tokio::task::spawn_blocking(move || service.submit(Some(jid), input)).await
        };
        let record = match submitted {
            Ok(Ok(Submitted::Accepted(_) | Submitted::Existing(_))) => {
                self.follow(&id, &poster).await
            }
            Ok(Err(err)) => Some(synthetic_failure(&id, err)),
            Err(e) => Some(synthetic_failure(
                &id,
                ErrorResponse::new(
                    ErrorType::Internal,
                    format!("accepting the job: {e}"),
                    Value::Null,
                ),
            )),
        };
        if let Some(rec) = record {
            // The job layer marks failures that leave the GPU untrustworthy.
            let stop_pod = rec.error.as_ref().is_some_and(|e| {
                e.details.get("device_fault").and_then(Value::as_bool) == Some(true)
            });
            if let Some(body) = done_body(&rec, &self.env, stop_pod, self.opts.max_output_bytes) {
                let _guard = poster.lock().await;
                self.post_done(&id, body).await;
            }
            if stop_pod {
                self.stop_pod.store(true, Ordering::Release);
            }
        }
        self.in_flight.remove(&id);
    }

    /// Forwards progress while the job runs and watches the stop channel; returns the final
    /// record (None when the job was stopped by the platform: nothing is posted for it).
    async fn follow(&self, id: &str, poster: &Arc<Mutex<()>>) -> Option<JobRecord> {
        let mut progress_tick = tokio::time::interval(self.opts.progress_interval);
        // The stop channel is a long poll the platform may hold for 90 s. It runs beside the
        // job, kept across the loop's turns: awaited inside a turn, it held back every
        // progress post, the result and the next take until it answered.
        let stop_watch = self.watch_stop(id);
        tokio::pin!(stop_watch);
        let mut stopped_by_platform = false;
        loop {
            tokio::select! {
                done = self.service.wait(id, Duration::from_secs(3600)) => {
                    let rec = done.ok().flatten()?;
                    if !rec.status.is_terminal() {
                        continue;
                    }
                    // Progress emitted before the end goes first; none after.
                    self.forward_progress(id, poster).await;
                    if stopped_by_platform || rec.status == JobStatus::Cancelled {
                        return None;
                    }
                    return Some(rec);
                }
                _ = progress_tick.tick() => self.forward_progress(id, poster).await,
                () = &mut stop_watch, if !stopped_by_platform => {
                    stopped_by_platform = true;
                    tracing::info!(job = %id, "the platform stopped this job");
                    let _ = self.service.cancel(id);
                }
            }
        }
    }

    async fn forward_progress(&self, id: &str, poster: &Arc<Mutex<()>>) {
        let chunks = self.service.drain_stream(id);
        if chunks.is_empty() {
            return;
        }
        let _guard = poster.lock().await;
        let Some(url) = self.done_url(id) else {
            return;
        };
        for chunk in chunks {
            let body = json!({ "status": "IN_PROGRESS", "output": chunk }).to_string();
            let req = self.done_request(&url, id, Duration::from_secs(30), body);
            if let Err(e) = req.send().await {
                tracing::warn!(job = %id, error = %e, "progress update failed");
            }
        }
    }

    /// Resolves when the platform asks to stop job `id`; never without a stop channel.
    async fn watch_stop(&self, id: &str) {
        let Some(url) = &self.env.stop_url else {
            return std::future::pending().await;
        };
        // At most one poll per interval however long the last was held: the default
        // behaviour would fire every tick missed during a 90 s hold at once.
        let mut poll = tokio::time::interval(self.opts.stop_poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            poll.tick().await;
            match self.stop_requested(url, id).await {
                StopAnswer::Stop => return,
                StopAnswer::Keep => {}
                StopAnswer::RateLimited => tokio::time::sleep(self.opts.backoff_429).await,
            }
        }
    }

    /// One poll of the stop channel at `url`: whether it lists job `id`.
    async fn stop_requested(&self, url: &str, id: &str) -> StopAnswer {
        let req = self
            .auth(self.http.get(url))
            .timeout(self.opts.poll_timeout);
        let Ok(resp) = req.send().await else {
            return StopAnswer::Keep;
        };
        match resp.status().as_u16() {
            200 => {}
            429 => return StopAnswer::RateLimited,
            _ => return StopAnswer::Keep,
        }
        let Ok(v) = resp.json::<Value>().await else {
            return StopAnswer::Keep;
        };
        let listed = v
            .get("jobsToStop")
            .and_then(|l| l.as_array())
            .is_some_and(|l| l.iter().any(|x| x.as_str() == Some(id)));
        if listed {
            StopAnswer::Stop
        } else {
            StopAnswer::Keep
        }
    }

    /// The job-done URL for job `id`; none for an id that cannot be a path segment (empty,
    /// `.` or `..`, which URL parsing folds into the parent path even percent-encoded): a post
    /// there would reach another route, so the job's answer is logged instead.
    fn done_url(&self, id: &str) -> Option<String> {
        if matches!(id, "" | "." | "..") {
            tracing::error!(job = %id, "a job id that cannot be put in the job-done URL; its result is not posted");
            return None;
        }
        Some(with_query(
            &self.env.done_url.replace("$ID", &escape_component(id)),
            "isStream=false",
        ))
    }

    /// A POST to the job-done URL as the platform expects it (progress and final results).
    fn done_request(
        &self,
        url: &str,
        id: &str,
        timeout: Duration,
        body: String,
    ) -> reqwest::RequestBuilder {
        self.auth(self.http.post(url))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header("charset", "utf-8")
            .header("X-Request-ID", id)
            .timeout(timeout)
            .body(body)
    }

    /// Posts a final result; retries 5xx and connection errors (3 attempts in all).
    async fn post_done(&self, id: &str, body: String) {
        let Some(url) = self.done_url(id) else {
            return;
        };
        let mut delays = self.opts.done_retry_delays.iter();
        loop {
            let req = self.done_request(&url, id, Duration::from_secs(600), body.clone());
            let retry = match req.send().await {
                Ok(resp) if resp.status().is_success() => return,
                Ok(resp) if resp.status().is_server_error() => format!("HTTP {}", resp.status()),
                Ok(resp) => {
                    tracing::error!(job = %id, status = %resp.status(), "failed to return job results; the platform refused them");
                    return;
                }
                Err(e) => format!("{e}"),
            };
            match delays.next() {
                Some(d) => {
                    tracing::warn!(job = %id, error = %retry, "job-done failed; retrying");
                    tokio::time::sleep(*d).await;
                }
                None => {
                    tracing::error!(job = %id, error = %retry, "failed to return job results");
                    return;
                }
            }
        }
    }
}

/// What one poll of the stop channel said.
enum StopAnswer {
    /// This job is to stop.
    Stop,
    /// Nothing for this job (or the poll failed): poll again.
    Keep,
    /// 429: wait the take loop's back-off before polling again.
    RateLimited,
}

fn synthetic_failure(id: &str, err: ErrorResponse) -> JobRecord {
    JobRecord {
        record_version: 1,
        id: id.into(),
        input: Value::Null,
        status: JobStatus::Failed,
        user_id: None,
        created_ms: 0,
        started_ms: None,
        finished_ms: None,
        request: None,
        output: None,
        error: Some(err),
        policies: Default::default(),
        timings: Default::default(),
        attempts: 0,
        queue_seq: None,
    }
}

/// Starts the heartbeat on its own OS thread with its own runtime, so inference or a busy
/// async runtime can never delay it.
fn start_heartbeat(
    url: String,
    key: Option<String>,
    interval: Duration,
    in_flight: Arc<InFlight>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            tracing::error!("heartbeat: could not start its runtime");
            return;
        };
        rt.block_on(async move {
            let Ok(http) = reqwest::Client::builder().timeout(interval * 2).build() else {
                return;
            };
            while !stopping.load(Ordering::Acquire) {
                let ids = in_flight.ids();
                let mut q = format!("runpod_version={WORKER_VERSION}");
                if !ids.is_empty() {
                    let ids: Vec<String> = ids.iter().map(|id| escape_component(id)).collect();
                    q = format!("job_id={}&{q}", ids.join(","));
                }
                let mut req = http.get(with_query(&url, &q));
                if let Some(k) = &key {
                    req = req.header(reqwest::header::AUTHORIZATION, k);
                }
                if let Err(e) = req.send().await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                let mut slept = Duration::ZERO;
                while slept < interval && !stopping.load(Ordering::Acquire) {
                    let step = Duration::from_millis(50).min(interval - slept);
                    tokio::time::sleep(step).await;
                    slept += step;
                }
            }
        });
    });
    (stop, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn job_ids_are_escaped_byte_by_byte_outside_the_unreserved_set() {
        assert_eq!(escape_component("job-1_a.b~c"), "job-1_a.b~c");
        assert_eq!(escape_component("a b/c?d&e"), "a%20b%2Fc%3Fd%26e");
        assert_eq!(escape_component("é,"), "%C3%A9%2C");
    }

    #[test]
    fn env_substitution_follows_the_sdk() {
        let e = RunpodEnv::from_vars(vars(&[
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                "http://h/v2/ep/job-take/$ID?gpu=T",
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                "http://h/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=T",
            ),
            (
                "RUNPOD_WEBHOOK_PING",
                "http://h/v2/ep/ping/$RUNPOD_POD_ID?gpu=T",
            ),
            ("RUNPOD_AI_API_KEY", "k"),
            ("RUNPOD_POD_ID", "w1"),
            ("RUNPOD_PING_INTERVAL", "200"),
        ]))
        .unwrap();
        assert_eq!(e.take_url, "http://h/v2/ep/job-take/w1?gpu=T");
        assert_eq!(e.done_url, "http://h/v2/ep/job-done/w1/$ID?gpu=T");
        assert_eq!(e.ping_url.as_deref(), Some("http://h/v2/ep/ping/w1?gpu=T"));
        assert_eq!(
            e.stop_url.as_deref(),
            Some("http://h/v2/ep/job-stop/w1?gpu=T")
        );
        assert_eq!(e.ping_interval, Duration::from_millis(200));
        assert!(RunpodEnv::from_vars(vars(&[])).is_none());
        // No heartbeat without a key or a pod id, as the SDK.
        for missing in ["RUNPOD_AI_API_KEY", "RUNPOD_POD_ID"] {
            let pairs: Vec<(&str, &str)> = [
                ("RUNPOD_WEBHOOK_GET_JOB", "http://h/v2/ep/job-take/$ID"),
                ("RUNPOD_WEBHOOK_PING", "http://h/v2/ep/ping/$RUNPOD_POD_ID"),
                ("RUNPOD_AI_API_KEY", "k"),
                ("RUNPOD_POD_ID", "w1"),
            ]
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
            let e = RunpodEnv::from_vars(vars(&pairs)).unwrap();
            assert_eq!(e.ping_url, None, "without {missing}");
        }
        assert_eq!(with_query("http://h/x", "a=1"), "http://h/x?a=1");
        assert_eq!(with_query("http://h/x?g=T", "a=1"), "http://h/x?g=T&a=1");
    }

    #[test]
    fn the_take_parser_never_panics_on_hostile_bodies() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let pieces: [&[u8]; 12] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"id\":",
            b"\"input\":",
            b"null",
            b"1e999",
            b",",
            b"\"\\u0000\"",
            b"\xff\xfe",
            b"{\"id\":\"a\",\"input\":{}}",
        ];
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..(next() % 12) {
                body.extend_from_slice(pieces[(next() % 12) as usize]);
            }
            let status = [200u16, 204, 400, 429, 500, 502][(next() % 6) as usize];
            let ct = [Some("application/json"), Some("text/plain"), None][(next() % 3) as usize];
            match parse_take(status, ct, &body) {
                // Only jobs that really are in the body come out.
                Take::Jobs(jobs) => {
                    let text = String::from_utf8_lossy(&body);
                    assert!(
                        jobs.iter()
                            .all(|j| text.contains(&format!("\"id\":\"{}\"", j.id))),
                        "{text}"
                    );
                }
                Take::Empty | Take::RateLimited | Take::Failed(_) => {}
            }
        }
    }

    #[test]
    fn take_answers_are_classified() {
        assert!(matches!(parse_take(204, None, b""), Take::Empty));
        assert!(matches!(parse_take(400, None, b"flashboot"), Take::Empty));
        assert!(matches!(parse_take(429, None, b""), Take::RateLimited));
        assert!(matches!(parse_take(500, None, b""), Take::Failed(_)));
        assert!(matches!(
            parse_take(200, Some("text/html"), b"<html>"),
            Take::Empty
        ));
        assert!(matches!(
            parse_take(200, Some("application/json"), b""),
            Take::Empty
        ));
        let Take::Jobs(j) = parse_take(200, Some("application/json"), br#"{"id":"x"}"#) else {
            panic!()
        };
        assert!(j.is_empty());
        let Take::Jobs(j) = parse_take(
            200,
            Some("application/json"),
            br#"[{"id":"a","input":{}},{"id":"b","input":1}]"#,
        ) else {
            panic!()
        };
        assert_eq!(j.len(), 2);
    }
}
