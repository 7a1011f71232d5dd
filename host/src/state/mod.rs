//! Durable worker state in sled: one database under the data dir, one tree per concern,
//! a schema version in `meta`. Records are versioned serde structs (JSON), so a newer worker
//! can read what an older one wrote, and an older one refuses what it cannot understand.

mod breakers;
mod jobs;
mod policies;

pub use breakers::BreakerStore;
pub use jobs::{Cursor, JobFilter, JobRecord, JobStatus, JobStore, Taken, Version};
pub use policies::{ActiveRecord, BlobMeta, PolicyEntry, PolicyStore};

use std::path::{Path, PathBuf};

/// sled's page cache size.
const CACHE_BYTES: u64 = 16 << 20;

/// How long opening waits for the database's file lock: a worker restarted in the same
/// process or container can find the previous one's sled still releasing it (sled lets go
/// from its own threads once the last handle is gone).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The schema this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database could not be opened (locked by another process, unreadable, corrupt).
    #[error("opening the state database at {}: {source}", path.display())]
    Open {
        /// Database folder.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// Another process holds the database's lock (one process owns a data dir).
    #[error(
        "the state database at {} is in use by another headshot process (a running `serve` or `worker`?): stop it first, or make the change through its admin API",
        path.display()
    )]
    InUse {
        /// Database folder.
        path: PathBuf,
    },
    /// A read or write failed.
    #[error("state database: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be decoded.
    #[error("state record {tree}/{key} is unreadable: {message}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// Record key.
        key: String,
        /// Decoder message.
        message: String,
    },
    /// Written by a newer worker.
    #[error(
        "the state database has schema version {found}; this worker reads up to {supported}. Upgrade the worker or point --data-dir elsewhere"
    )]
    NewerSchema {
        /// Version on disk.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
}

/// The open database.
#[derive(Clone)]
pub struct StateDb {
    db: sled::Db,
    path: PathBuf,
}

impl StateDb {
    /// Opens (or creates) the database in `dir` and checks the schema version, waiting up to
    /// 10 s for its lock (a worker restarted in the same process).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Self::open_within(dir, LOCK_WAIT)
    }

    /// [`StateDb::open`], waiting at most `wait` for the lock: a command that finds a running
    /// worker holding it answers at once.
    pub fn open_within(dir: &Path, wait: std::time::Duration) -> Result<Self, StateError> {
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // sled caches pages up to this size (default 1 GiB): bounded, so resident memory
            // does not grow with the job history.
            .cache_capacity(CACHE_BYTES);
        let db = open_waiting_for_lock(&config, wait).map_err(|source| {
            if is_lock_contention(&source) {
                StateError::InUse {
                    path: dir.to_path_buf(),
                }
            } else {
                StateError::Open {
                    path: dir.to_path_buf(),
                    source,
                }
            }
        })?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StateError::Corrupt {
                        tree: "meta",
                        key: "schema_version".into(),
                        message: format!("{} bytes, expected 4", raw.len()),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StateError::NewerSchema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        Ok(Self {
            db,
            path: dir.to_path_buf(),
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A named tree.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StateError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Writes everything to disk; called before acknowledging anything durable.
    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }

    /// The policy trees.
    pub fn policies(&self) -> Result<PolicyStore, StateError> {
        PolicyStore::open(self)
    }

    /// The job trees.
    pub fn jobs(&self) -> Result<JobStore, StateError> {
        JobStore::open(self)
    }

    /// The breaker tree.
    pub fn breakers(&self) -> Result<BreakerStore, StateError> {
        BreakerStore::open(self)
    }

    /// A unique, increasing id (sled's monotonic counter, persisted).
    pub fn generate_id(&self) -> Result<u64, StateError> {
        Ok(self.db.generate_id()?)
    }
}

/// `config` opened, retrying for up to `wait` while another handle (a previous worker still
/// shutting down) holds the file lock; any other error at once.
fn open_waiting_for_lock(
    config: &sled::Config,
    wait: std::time::Duration,
) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match config.open() {
            Err(e) if is_lock_contention(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            opened => return opened,
        }
    }
}

/// Whether `e` is sled refusing the file lock another handle holds. sled 0.34 reports it as
/// an `Other` I/O error with this text, the OS's `WouldBlock` only inside the message.
fn is_lock_contention(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_waits_for_a_previous_handle_to_let_go_of_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDb::open(dir.path()).unwrap();
        // Without waiting, the lock is refused while the first handle lives.
        let config = sled::Config::new().path(dir.path());
        let err = open_waiting_for_lock(&config, std::time::Duration::ZERO).expect_err("locked");
        assert!(is_lock_contention(&err), "{err}");
        // Released a moment later, as a worker shutting down releases it.
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(first);
        });
        let second = StateDb::open(dir.path());
        release.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
    }

    #[test]
    fn a_lock_held_past_the_wait_is_named_as_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateDb::open(dir.path()).unwrap();
        let err = match StateDb::open_within(dir.path(), std::time::Duration::from_millis(100)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened a locked database"),
        };
        assert!(err.contains("in use by another headshot process"), "{err}");
    }

    #[test]
    fn schema_version_is_written_and_newer_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = StateDb::open(dir.path()).unwrap();
            db.flush().unwrap();
        }
        {
            let db = StateDb::open(dir.path()).unwrap();
            db.tree("meta")
                .unwrap()
                .insert("schema_version", &99u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = StateDb::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }
}
