//! In-memory view of jobs that are queued or running: cancel flag, latest progress, the
//! stream of progress chunks (handed out once each), and a completion signal.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Chunks kept per job when nobody drains them.
const MAX_CHUNKS: usize = 1024;

/// One job's live state.
pub struct Live {
    /// Set to stop the job at the next step.
    pub cancel: Arc<AtomicBool>,
    progress: Mutex<Option<serde_json::Value>>,
    stream: Mutex<VecDeque<serde_json::Value>>,
    done: watch::Sender<bool>,
}

impl Live {
    fn new() -> Self {
        Self {
            cancel: Arc::new(AtomicBool::new(false)),
            progress: Mutex::new(None),
            stream: Mutex::new(VecDeque::new()),
            done: watch::channel(false).0,
        }
    }

    /// Records a progress update (latest value for `/status`, a chunk for `/stream`).
    pub fn progress(&self, value: serde_json::Value) {
        if let Ok(mut s) = self.stream.lock() {
            if s.len() >= MAX_CHUNKS {
                s.pop_front();
            }
            s.push_back(value.clone());
        }
        if let Ok(mut p) = self.progress.lock() {
            *p = Some(value);
        }
    }

    /// The latest progress value.
    pub fn latest(&self) -> Option<serde_json::Value> {
        self.progress.lock().ok().and_then(|p| p.clone())
    }

    /// Takes every chunk not handed out yet.
    pub fn drain(&self) -> Vec<serde_json::Value> {
        self.stream
            .lock()
            .map(|mut s| s.drain(..).collect())
            .unwrap_or_default()
    }

    /// Wakes everyone waiting for this job.
    pub fn finish(&self) {
        self.done.send_replace(true);
    }

    /// A receiver that turns true when the job finishes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }
}

/// Live state of every unfinished (and recently finished) job.
pub struct LiveJobs {
    map: Mutex<HashMap<String, Arc<Live>>>,
    finished: Mutex<VecDeque<String>>,
    /// Finished jobs whose undrained stream chunks are kept for late `/stream` readers
    /// (`jobs.stream_keep_finished`); bounds this structure's memory.
    keep_finished: usize,
}

impl LiveJobs {
    /// Keeps the live state of up to `keep_finished` finished jobs for late readers.
    pub fn new(keep_finished: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            finished: Mutex::new(VecDeque::new()),
            keep_finished,
        }
    }

    /// The job's live state, created on first use.
    pub fn entry(&self, id: &str) -> Arc<Live> {
        match self.map.lock() {
            Ok(mut m) => Arc::clone(
                m.entry(id.to_string())
                    .or_insert_with(|| Arc::new(Live::new())),
            ),
            Err(_) => Arc::new(Live::new()),
        }
    }

    /// The job's live state, if it has one.
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.map.lock().ok().and_then(|m| m.get(id).cloned())
    }

    /// Marks a job finished: wakes waiters and keeps it a while for late stream readers.
    pub fn finish(&self, id: &str) {
        if let Some(live) = self.get(id) {
            live.finish();
        }
        let evicted = self.finished.lock().ok().and_then(|mut f| {
            f.push_back(id.to_string());
            (f.len() > self.keep_finished)
                .then(|| f.pop_front())
                .flatten()
        });
        if let Some(old) = evicted
            && let Ok(mut m) = self.map.lock()
        {
            m.remove(&old);
        }
    }

    /// Jobs with live state (for metrics).
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no job has live state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_jobs_beyond_the_bound_are_dropped_oldest_first() {
        let live = LiveJobs::new(2);
        for id in ["a", "b", "c"] {
            live.entry(id).progress(serde_json::json!({ "job": id }));
            live.finish(id);
        }
        assert!(live.get("a").is_none(), "oldest finished job evicted");
        assert_eq!(live.len(), 2);
        let b = live.get("b").expect("b kept");
        assert_eq!(b.drain(), vec![serde_json::json!({ "job": "b" })]);
        // A job still running is never evicted, however many finish after it.
        live.entry("running");
        for id in ["d", "e", "f"] {
            live.entry(id);
            live.finish(id);
        }
        assert!(live.get("running").is_some());
        assert_eq!(live.len(), 3);
    }
}
