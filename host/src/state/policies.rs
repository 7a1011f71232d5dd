//! Trees `policy_blobs` (sha256 → component bytes), `policy_meta` (sha256 → what it is) and
//! `policy_active` (kind → active version and the versions before it).

use serde::{Deserialize, Serialize};

use super::{StateDb, StateError};
use crate::policy::{PolicyKind, PolicySource};

/// Versions kept for rollback per slot.
const MAX_PREVIOUS: usize = 10;

/// One activation of one version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// Hex sha256 of the component.
    pub sha256: String,
    /// Built-in or uploaded.
    pub source: PolicySource,
    /// When it became active (Unix ms).
    pub activated_at_ms: u64,
}

/// The `policy_active` record of one slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveRecord {
    /// Record format version.
    pub record_version: u32,
    /// The active version.
    pub current: PolicyEntry,
    /// Earlier versions, oldest first; rollback pops the last.
    pub previous: Vec<PolicyEntry>,
}

/// The `policy_meta` record of one stored component.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Record format version.
    pub record_version: u32,
    /// Slot it was uploaded for.
    pub kind: PolicyKind,
    /// From `meta.info()`.
    pub name: String,
    /// From `meta.info()`.
    pub version: String,
    /// Built-in or uploaded.
    pub source: PolicySource,
    /// When it was stored (Unix ms).
    pub stored_at_ms: u64,
    /// Component size.
    pub size_bytes: usize,
}

/// Access to the policy trees.
#[derive(Clone)]
pub struct PolicyStore {
    db: StateDb,
    blobs: sled::Tree,
    meta: sled::Tree,
    active: sled::Tree,
}

fn decode<T: for<'de> Deserialize<'de>>(
    tree: &'static str,
    key: &str,
    raw: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(raw).map_err(|e| StateError::Corrupt {
        tree,
        key: key.into(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(tree: &'static str, key: &str, value: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(value).map_err(|e| StateError::Corrupt {
        tree,
        key: key.into(),
        message: e.to_string(),
    })
}

impl PolicyStore {
    pub(super) fn open(db: &StateDb) -> Result<Self, StateError> {
        Ok(Self {
            db: db.clone(),
            blobs: db.tree("policy_blobs")?,
            meta: db.tree("policy_meta")?,
            active: db.tree("policy_active")?,
        })
    }

    /// Stores a component and its description (idempotent), flushed.
    pub fn put_blob(&self, sha256: &str, bytes: &[u8], meta: &BlobMeta) -> Result<(), StateError> {
        if self.blobs.get(sha256)?.is_none() {
            self.blobs.insert(sha256, bytes)?;
        }
        self.meta
            .insert(sha256, encode("policy_meta", sha256, meta)?)?;
        self.db.flush()
    }

    /// A stored component's bytes.
    pub fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.blobs.get(sha256)?.map(|v| v.to_vec()))
    }

    /// A stored component's description.
    pub fn blob_meta(&self, sha256: &str) -> Result<Option<BlobMeta>, StateError> {
        self.meta
            .get(sha256)?
            .map(|raw| decode("policy_meta", sha256, &raw))
            .transpose()
    }

    /// Every stored component of `kind`, by hash.
    pub fn stored(&self, kind: PolicyKind) -> Result<Vec<(String, BlobMeta)>, StateError> {
        let mut out = Vec::new();
        for item in self.meta.iter() {
            let (key, raw) = item?;
            let sha = String::from_utf8_lossy(&key).into_owned();
            let meta: BlobMeta = decode("policy_meta", &sha, &raw)?;
            if meta.kind == kind {
                out.push((sha, meta));
            }
        }
        Ok(out)
    }

    /// The slot's active record.
    pub fn active(&self, kind: PolicyKind) -> Result<Option<ActiveRecord>, StateError> {
        self.active
            .get(kind.as_str())?
            .map(|raw| decode("policy_active", kind.as_str(), &raw))
            .transpose()
    }

    /// Makes `entry` current, pushing the old current onto the rollback stack; flushed.
    pub fn activate(
        &self,
        kind: PolicyKind,
        entry: PolicyEntry,
    ) -> Result<ActiveRecord, StateError> {
        let record = match self.active(kind)? {
            Some(mut rec) => {
                let old = std::mem::replace(&mut rec.current, entry);
                rec.previous.push(old);
                if rec.previous.len() > MAX_PREVIOUS {
                    let excess = rec.previous.len() - MAX_PREVIOUS;
                    rec.previous.drain(..excess);
                }
                rec
            }
            None => ActiveRecord {
                record_version: 1,
                current: entry,
                previous: Vec::new(),
            },
        };
        self.write_active(kind, &record)?;
        Ok(record)
    }

    /// Makes the last previous version current again; flushed. `None` when there is none.
    pub fn roll_back(
        &self,
        kind: PolicyKind,
        now_ms: u64,
    ) -> Result<Option<ActiveRecord>, StateError> {
        let Some(mut rec) = self.active(kind)? else {
            return Ok(None);
        };
        let Some(mut prev) = rec.previous.pop() else {
            return Ok(None);
        };
        prev.activated_at_ms = now_ms;
        rec.current = prev;
        self.write_active(kind, &rec)?;
        Ok(Some(rec))
    }

    fn write_active(&self, kind: PolicyKind, record: &ActiveRecord) -> Result<(), StateError> {
        self.active.insert(
            kind.as_str(),
            encode("policy_active", kind.as_str(), record)?,
        )?;
        self.db.flush()
    }
}
