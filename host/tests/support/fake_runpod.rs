//! An in-process Runpod job server (ref/runpod.md §1): scripted job-take answers, scripted
//! job-done statuses, a stop channel, and a record of every request.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// A scripted job-take answer.
#[derive(Clone, Debug)]
pub enum TakeAnswer {
    /// 200 with this JSON body.
    Job(Value),
    /// This status with an empty body.
    Status(u16),
    /// 200 with a body of this content type.
    Raw(&'static str, &'static str),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: String,
    pub at: Instant,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

#[derive(Default)]
struct Inner {
    takes: VecDeque<TakeAnswer>,
    done_statuses: std::collections::HashMap<String, VecDeque<u16>>,
    stop: Vec<String>,
    /// How long a job-stop poll is held when nothing is to stop (the platform holds it).
    stop_hold: Duration,
    /// A status every job-stop poll gets instead (429, say).
    stop_status: Option<u16>,
    seen: Vec<Seen>,
}

#[derive(Clone, Default)]
pub struct FakeRunpod {
    inner: Arc<Mutex<Inner>>,
    pub addr: Option<SocketAddr>,
}

impl FakeRunpod {
    pub async fn start() -> Self {
        let mut fake = FakeRunpod::default();
        fake.hold_stop_polls(Duration::from_secs(1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        fake.addr = Some(listener.local_addr().unwrap());
        let app = Router::new().fallback(handle).with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    /// The variables the platform would set (ping every 200 ms).
    pub fn vars(&self) -> Vec<(String, String)> {
        let b = self.base();
        vec![
            (
                "RUNPOD_WEBHOOK_GET_JOB".into(),
                format!("{b}/v2/ep/job-take/$ID?gpu=T"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT".into(),
                format!("{b}/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=T"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_STREAM".into(),
                format!("{b}/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=T"),
            ),
            (
                "RUNPOD_WEBHOOK_PING".into(),
                format!("{b}/v2/ep/ping/$RUNPOD_POD_ID?gpu=T"),
            ),
            ("RUNPOD_AI_API_KEY".into(), "k".into()),
            ("RUNPOD_POD_ID".into(), "w1".into()),
            ("RUNPOD_PING_INTERVAL".into(), "200".into()),
        ]
    }

    pub fn push_take(&self, a: TakeAnswer) {
        self.inner.lock().unwrap().takes.push_back(a);
    }

    /// The next final job-done post for `job` gets this status.
    pub fn push_done_status(&self, job: &str, s: u16) {
        self.inner
            .lock()
            .unwrap()
            .done_statuses
            .entry(job.into())
            .or_default()
            .push_back(s);
    }

    pub fn stop_job(&self, id: &str) {
        self.inner.lock().unwrap().stop.push(id.into());
    }

    /// Answers every job-stop poll with `status` (and no body).
    pub fn answer_stop_polls_with(&self, status: u16) {
        self.inner.lock().unwrap().stop_status = Some(status);
    }

    /// Holds each job-stop poll this long unless a stop arrives meanwhile (as the platform
    /// does, up to 90 s); 1 s by default.
    pub fn hold_stop_polls(&self, hold: Duration) {
        self.inner.lock().unwrap().stop_hold = hold;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }

    pub fn seen_path(&self, part: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.contains(part))
            .collect()
    }

    /// Final (non-progress) job-done posts for `job`.
    pub fn finals(&self, job: &str) -> Vec<Seen> {
        self.seen_path(&format!("/job-done/w1/{job}"))
            .into_iter()
            .filter(|s| s.json().get("status").is_none())
            .collect()
    }

    /// Waits until each of `jobs` has had its final job-done post.
    pub async fn wait_for_results(&self, jobs: &[&str]) {
        let what = format!("the results of {jobs:?}");
        self.wait_for(&what, |f| jobs.iter().all(|j| !f.finals(j).is_empty()))
            .await;
    }

    pub async fn wait_for(&self, what: &str, mut f: impl FnMut(&FakeRunpod) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn handle(State(fake): State<FakeRunpod>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 64 << 20)
        .await
        .unwrap_or_else(|_| Bytes::new());
    let seen = Seen {
        method,
        path: path.clone(),
        query,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    };
    fake.inner.lock().unwrap().seen.push(seen);
    if path.contains("/job-take/") {
        let next = fake.inner.lock().unwrap().takes.pop_front();
        match next {
            Some(TakeAnswer::Job(v)) => {
                ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
            }
            Some(TakeAnswer::Status(s)) => StatusCode::from_u16(s).unwrap().into_response(),
            Some(TakeAnswer::Raw(ct, body)) => ([(header::CONTENT_TYPE, ct)], body).into_response(),
            None => {
                // A short long-poll, then "no job".
                tokio::time::sleep(Duration::from_millis(50)).await;
                StatusCode::NO_CONTENT.into_response()
            }
        }
    } else if path.contains("/job-done/") {
        let is_progress = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("status").cloned())
            .is_some();
        let job = path.rsplit('/').next().unwrap_or("").to_string();
        let status = if is_progress {
            None
        } else {
            fake.inner
                .lock()
                .unwrap()
                .done_statuses
                .get_mut(&job)
                .and_then(|q| q.pop_front())
        };
        StatusCode::from_u16(status.unwrap_or(200))
            .unwrap()
            .into_response()
    } else if path.contains("/job-stop/") {
        if let Some(s) = fake.inner.lock().unwrap().stop_status {
            return StatusCode::from_u16(s).unwrap().into_response();
        }
        let held = Instant::now();
        let stop = loop {
            let (stop, hold) = {
                let mut inner = fake.inner.lock().unwrap();
                (std::mem::take(&mut inner.stop), inner.stop_hold)
            };
            if !stop.is_empty() || held.elapsed() >= hold {
                break stop;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if stop.is_empty() {
            StatusCode::NO_CONTENT.into_response()
        } else {
            (
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::json!({ "jobsToStop": stop }).to_string(),
            )
                .into_response()
        }
    } else {
        StatusCode::OK.into_response()
    }
}
