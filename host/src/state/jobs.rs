//! Trees `jobs` (id → record), `jobs_by_time` (created ms ‖ id → id) and `queue` (accepted
//! but unfinished, seq → id). A job is written and flushed before it is acknowledged and
//! again when it finishes, so a crash can lose neither.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{StateDb, StateError};
use crate::error::ErrorResponse;

/// Runpod's job states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Accepted, waiting.
    InQueue,
    /// Running.
    InProgress,
    /// Done, with output.
    Completed,
    /// Done, with an error.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobStatus {
    /// Whether the job will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The wire name (`IN_QUEUE`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InQueue => "IN_QUEUE",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::InQueue,
            Self::InProgress,
            Self::Completed,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }
}

/// One job, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Record format version.
    pub record_version: u32,
    /// Job id (the idempotency key).
    pub id: String,
    /// The job's `input`, as received.
    pub input: serde_json::Value,
    /// Current state.
    pub status: JobStatus,
    /// `input.user_id` when it was a string (for history queries; not validated).
    pub user_id: Option<String>,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms, when a run started.
    pub started_ms: Option<u64>,
    /// Unix ms, when it ended.
    pub finished_ms: Option<u64>,
    /// The validated, sanitized request with its seed fixed (so a rerun after a crash
    /// makes the same images).
    pub request: Option<serde_json::Value>,
    /// Result.
    pub output: Option<serde_json::Value>,
    /// Failure.
    pub error: Option<ErrorResponse>,
    /// Policy versions used, by slot.
    pub policies: BTreeMap<String, String>,
    /// Milliseconds per stage.
    pub timings: BTreeMap<String, f64>,
    /// Runs started (more than 1 after a crash).
    pub attempts: u32,
    /// Sequence number in the `queue` tree while unfinished.
    pub queue_seq: Option<u64>,
}

/// What [`JobStore::accept`] answers for an id already taken: the stored job, and the input
/// it was asked to store, so the caller can compare the two without a copy made beforehand.
#[derive(Debug)]
pub struct Taken {
    /// The job stored under the id.
    pub existing: JobRecord,
    /// The input that was not stored.
    pub input: serde_json::Value,
}

/// The stored form of a job as it was read: what [`JobStore::replace`] compares. (The bytes,
/// not a re-encoding: a float read back from JSON may print differently.)
#[derive(Clone, Debug)]
pub struct Version(sled::IVec);

/// A history query.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobFilter {
    /// Only this state.
    pub status: Option<JobStatus>,
    /// Only this user.
    pub user_id: Option<String>,
    /// Created at or after (Unix ms).
    pub since_ms: Option<u64>,
    /// Created before (Unix ms).
    pub until_ms: Option<u64>,
}

/// Access to the job trees.
#[derive(Clone)]
pub struct JobStore {
    db: StateDb,
    jobs: sled::Tree,
    by_time: sled::Tree,
    queue: sled::Tree,
}

fn time_key(created_ms: u64, id: &str) -> Vec<u8> {
    let mut key = created_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

impl JobStore {
    pub(super) fn open(db: &StateDb) -> Result<Self, StateError> {
        Ok(Self {
            db: db.clone(),
            jobs: db.tree("jobs")?,
            by_time: db.tree("jobs_by_time")?,
            queue: db.tree("queue")?,
        })
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, StateError> {
        Ok(self.get_versioned(id)?.map(|(record, _)| record))
    }

    /// A job by id with the stored bytes it was read from, for [`JobStore::replace`].
    pub fn get_versioned(&self, id: &str) -> Result<Option<(JobRecord, Version)>, StateError> {
        self.jobs
            .get(id)?
            .map(|raw| {
                serde_json::from_slice(&raw)
                    .map(|record| (record, Version(raw)))
                    .map_err(|e| StateError::Corrupt {
                        tree: "jobs",
                        key: id.into(),
                        message: e.to_string(),
                    })
            })
            .transpose()
    }

    /// Stores `record` only if its stored bytes are still those of `read` (nobody wrote the
    /// job since): a cancel and the dispatcher starting the same queued job cannot both win.
    /// Returns whether it was stored.
    pub fn replace(
        &self,
        read: &Version,
        record: &JobRecord,
        durable: bool,
    ) -> Result<bool, StateError> {
        let swapped = self.jobs.compare_and_swap(
            record.id.as_bytes(),
            Some(read.0.clone()),
            Some(encode(record)?),
        )?;
        if swapped.is_err() {
            return Ok(false);
        }
        self.after_write(record, durable)?;
        Ok(true)
    }

    /// Stores a new job as IN_QUEUE and flushes, unless the id exists: then returns the
    /// existing record (idempotency) with the input handed back, and writes nothing.
    pub fn accept(
        &self,
        id: &str,
        input: serde_json::Value,
        now_ms: u64,
    ) -> Result<Result<JobRecord, Taken>, StateError> {
        // No read first: the insert below is conditional, and callers have usually just read
        // the id themselves (the job service does, to answer a repeat before its queue check).
        let seq = self.db.generate_id()?;
        let record = JobRecord {
            record_version: 1,
            id: id.into(),
            user_id: input
                .get("user_id")
                .and_then(|v| v.as_str())
                .map(|s| s.chars().take(256).collect()),
            input,
            status: JobStatus::InQueue,
            created_ms: now_ms,
            started_ms: None,
            finished_ms: None,
            request: None,
            output: None,
            error: None,
            policies: BTreeMap::new(),
            timings: BTreeMap::new(),
            attempts: 0,
            queue_seq: Some(seq),
        };
        let raw = encode(&record)?;
        // Insert only if absent, so an id taken before, or by a concurrent submission, keeps
        // its job.
        match self
            .jobs
            .compare_and_swap(id, None as Option<&[u8]>, Some(raw))?
        {
            Ok(()) => {}
            Err(_) => {
                return match self.get(id)? {
                    Some(existing) => Ok(Err(Taken {
                        existing,
                        input: record.input,
                    })),
                    None => Err(StateError::Corrupt {
                        tree: "jobs",
                        key: id.into(),
                        message: "vanished during accept".into(),
                    }),
                };
            }
        }
        self.by_time.insert(time_key(now_ms, id), id.as_bytes())?;
        self.queue.insert(seq.to_be_bytes(), id.as_bytes())?;
        self.db.flush()?;
        Ok(Ok(record))
    }

    /// Writes `record`; when it is terminal, removes it from the queue. Flushes when
    /// `durable` (acceptance and completion), not for intermediate states.
    pub fn put(&self, record: &JobRecord, durable: bool) -> Result<(), StateError> {
        self.jobs.insert(record.id.as_bytes(), encode(record)?)?;
        self.after_write(record, durable)
    }

    /// What follows storing `record` ([`JobStore::put`], [`JobStore::replace`]): a terminal
    /// job leaves the queue, and a durable write is flushed.
    fn after_write(&self, record: &JobRecord, durable: bool) -> Result<(), StateError> {
        if record.status.is_terminal()
            && let Some(seq) = record.queue_seq
        {
            self.queue.remove(seq.to_be_bytes())?;
        }
        if durable {
            self.db.flush()?;
        }
        Ok(())
    }

    /// Flushes everything written so far.
    pub fn flush_now(&self) -> Result<(), StateError> {
        self.db.flush()
    }

    /// Ids of unfinished jobs, oldest first.
    pub fn unfinished(&self) -> Result<Vec<String>, StateError> {
        self.queue
            .iter()
            .values()
            .map(|v| {
                v.map(|id| String::from_utf8_lossy(&id).into_owned())
                    .map_err(StateError::from)
            })
            .collect()
    }

    /// Newest first; `cursor` is the `next_cursor` of the previous page.
    pub fn list(
        &self,
        filter: &JobFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, Option<String>), StateError> {
        let upper: Vec<u8> = match cursor {
            Some(Cursor(key)) => key.clone(),
            None => filter.until_ms.unwrap_or(u64::MAX).to_be_bytes().to_vec(),
        };
        let lower = filter.since_ms.unwrap_or(0).to_be_bytes().to_vec();
        let mut out = Vec::new();
        let mut next = None;
        for item in self.by_time.range(lower..upper).rev() {
            let (key, id) = item?;
            let id = String::from_utf8_lossy(&id).into_owned();
            let Some(record) = self.get(&id)? else {
                continue;
            };
            if filter.status.is_some_and(|s| s != record.status) {
                continue;
            }
            if filter
                .user_id
                .as_deref()
                .is_some_and(|u| record.user_id.as_deref() != Some(u))
            {
                continue;
            }
            if out.len() == limit {
                // Resume strictly below the last returned key.
                next = out
                    .last()
                    .map(|r: &JobRecord| encode_cursor(&time_key(r.created_ms, &r.id)));
                let _ = key;
                break;
            }
            out.push(record);
        }
        Ok((out, next))
    }

    /// Counts by state (over all records).
    pub fn counts(&self) -> Result<BTreeMap<JobStatus, u64>, StateError> {
        // Only the status is needed: skip building inputs, outputs and errors of every record.
        #[derive(Deserialize)]
        struct StatusOnly {
            status: JobStatus,
        }
        let mut counts = BTreeMap::new();
        for item in self.jobs.iter().values() {
            let raw = item?;
            if let Ok(r) = serde_json::from_slice::<StatusOnly>(&raw) {
                *counts.entry(r.status).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Drops finished jobs beyond `max_count` (oldest first) or older than `max_age_ms`.
    /// Unfinished jobs are never dropped. Returns how many went.
    pub fn prune(
        &self,
        max_count: usize,
        max_age_ms: u64,
        now_ms: u64,
    ) -> Result<usize, StateError> {
        let total = self.by_time.len();
        let mut excess = total.saturating_sub(max_count);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let mut removed = 0;
        for item in self.by_time.iter() {
            let (key, id) = item?;
            let created = key
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if excess == 0 && created >= cutoff {
                break;
            }
            let id = String::from_utf8_lossy(&id).into_owned();
            let terminal = self.get(&id)?.is_none_or(|r| r.status.is_terminal());
            if !terminal {
                continue;
            }
            self.by_time.remove(&key)?;
            self.jobs.remove(id.as_bytes())?;
            excess = excess.saturating_sub(1);
            removed += 1;
        }
        if removed > 0 {
            self.db.flush()?;
        }
        Ok(removed)
    }
}

fn encode(record: &JobRecord) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(record).map_err(|e| StateError::Corrupt {
        tree: "jobs",
        key: record.id.clone(),
        message: e.to_string(),
    })
}

fn encode_cursor(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A place in the history to page on from: a `next_cursor` that [`JobStore::list`] handed
/// out, read back. A type rather than text, so text `list` never handed out cannot reach it
/// and be read as "from the start" or "past the end" without a word.
#[derive(Clone, Debug, PartialEq)]
pub struct Cursor(Vec<u8>);

impl Cursor {
    /// Reads a `next_cursor` (hex of a creation time and a job id); `None` for any other text.
    pub fn parse(s: &str) -> Option<Self> {
        decode_cursor(s)
            .filter(|key| key.len() > 8 && std::str::from_utf8(&key[8..]).is_ok())
            .map(Self)
    }
}

fn decode_cursor(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2048 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, JobStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state")).unwrap();
        let jobs = db.jobs().unwrap();
        (dir, jobs)
    }

    fn finish(s: &JobStore, id: &str, status: JobStatus) {
        let mut r = s.get(id).unwrap().unwrap();
        r.status = status;
        s.put(&r, false).unwrap();
    }

    #[test]
    fn accept_is_idempotent_and_unfinished_jobs_are_tracked() {
        let (_d, s) = store();
        let first = s
            .accept("a", serde_json::json!({"user_id": "u"}), 10)
            .unwrap();
        assert!(first.is_ok());
        let again = s
            .accept("a", serde_json::json!({"other": true}), 11)
            .unwrap();
        let taken = again.unwrap_err();
        assert_eq!(taken.existing.input, serde_json::json!({"user_id": "u"}));
        assert_eq!(taken.input, serde_json::json!({"other": true}));
        s.accept("b", serde_json::json!({}), 12).unwrap().unwrap();
        assert_eq!(
            s.unfinished().unwrap(),
            vec!["a".to_string(), "b".to_string()]
        );
        finish(&s, "a", JobStatus::Completed);
        assert_eq!(s.unfinished().unwrap(), vec!["b".to_string()]);
    }

    #[test]
    fn replace_stores_only_over_the_record_as_read() {
        let (_d, s) = store();
        s.accept("r", serde_json::json!({"timing": 0.1 + 0.2}), 1)
            .unwrap()
            .unwrap();
        let (mut started, read) = s.get_versioned("r").unwrap().unwrap();
        let (mut cancelled, same_read) = s.get_versioned("r").unwrap().unwrap();
        started.status = JobStatus::InProgress;
        started.timings.insert("queue_ms".into(), 1.0 / 3.0);
        assert!(s.replace(&read, &started, false).unwrap());
        // The second writer read the same bytes and loses.
        cancelled.status = JobStatus::Cancelled;
        assert!(!s.replace(&same_read, &cancelled, true).unwrap());
        assert_eq!(s.get("r").unwrap().unwrap().status, JobStatus::InProgress);
        assert_eq!(s.unfinished().unwrap(), vec!["r".to_string()]);
        // A record with floats read back still matches its own bytes.
        let (mut done, read) = s.get_versioned("r").unwrap().unwrap();
        done.status = JobStatus::Completed;
        assert!(s.replace(&read, &done, true).unwrap());
        assert!(s.unfinished().unwrap().is_empty());
    }

    #[test]
    fn list_filters_and_pages_newest_first() {
        let (_d, s) = store();
        for i in 0..5u64 {
            let user = if i % 2 == 0 { "even" } else { "odd" };
            s.accept(
                &format!("j{i}"),
                serde_json::json!({"user_id": user}),
                100 + i,
            )
            .unwrap()
            .unwrap();
        }
        finish(&s, "j3", JobStatus::Failed);
        let (page, next) = s.list(&JobFilter::default(), None, 2).unwrap();
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["j4", "j3"]
        );
        let next = next.map(|c| Cursor::parse(&c).unwrap());
        let (page, next2) = s.list(&JobFilter::default(), next.as_ref(), 2).unwrap();
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["j2", "j1"]
        );
        let next2 = next2.map(|c| Cursor::parse(&c).unwrap());
        let (page, _) = s.list(&JobFilter::default(), next2.as_ref(), 2).unwrap();
        assert_eq!(page.len(), 1);
        let evens = JobFilter {
            user_id: Some("even".into()),
            ..Default::default()
        };
        assert_eq!(s.list(&evens, None, 10).unwrap().0.len(), 3);
        let failed = JobFilter {
            status: Some(JobStatus::Failed),
            ..Default::default()
        };
        assert_eq!(s.list(&failed, None, 10).unwrap().0[0].id, "j3");
        let window = JobFilter {
            since_ms: Some(101),
            until_ms: Some(103),
            ..Default::default()
        };
        assert_eq!(
            s.list(&window, None, 10)
                .unwrap()
                .0
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            ["j2", "j1"]
        );
        for not_handed_out in ["zz-not-hex", "00", "", "0011223344556677ff"] {
            assert_eq!(Cursor::parse(not_handed_out), None, "{not_handed_out}");
        }
    }

    #[test]
    fn prune_drops_old_and_excess_finished_jobs_but_never_unfinished_ones() {
        let (_d, s) = store();
        for i in 0..6u64 {
            s.accept(&format!("j{i}"), serde_json::json!({}), 1_000 + i)
                .unwrap()
                .unwrap();
            if i != 1 {
                finish(&s, &format!("j{i}"), JobStatus::Completed);
            }
        }
        // Keep at most 3: the oldest finished go; j1 is unfinished and stays.
        let removed = s.prune(3, u64::MAX, 2_000).unwrap();
        assert_eq!(removed, 3);
        assert!(s.get("j0").unwrap().is_none());
        assert!(s.get("j1").unwrap().is_some());
        assert!(s.get("j5").unwrap().is_some());
        // Age: finished jobs created before 1005 go (j4); unfinished j1 stays.
        let removed = s.prune(100, 1_000, 2_005).unwrap();
        assert_eq!(removed, 1);
        assert!(s.get("j4").unwrap().is_none());
        assert!(s.get("j5").unwrap().is_some());
        assert_eq!(s.counts().unwrap().get(&JobStatus::InQueue), Some(&1));
    }
}
