//! Tree `breakers`: circuit-breaker state by name, so an open breaker stays open across a
//! restart instead of hammering a dependency that is still down.

use headshot_plugin_sdk::rules::breaker::Breaker;

use super::{StateDb, StateError};

/// Access to the `breakers` tree.
#[derive(Clone)]
pub struct BreakerStore {
    tree: sled::Tree,
}

impl BreakerStore {
    pub(super) fn open(db: &StateDb) -> Result<Self, StateError> {
        Ok(Self {
            tree: db.tree("breakers")?,
        })
    }

    /// The breaker's state; a fresh closed breaker when none is stored.
    pub fn get(&self, name: &str) -> Result<Breaker, StateError> {
        match self.tree.get(name)? {
            Some(raw) => serde_json::from_slice(&raw).map_err(|e| StateError::Corrupt {
                tree: "breakers",
                key: name.into(),
                message: e.to_string(),
            }),
            None => Ok(Breaker::default()),
        }
    }

    /// Stores the breaker's state (not flushed: losing the last few outcomes in a crash is
    /// harmless; state changes are flushed by `put_durable`).
    pub fn put(&self, name: &str, breaker: &Breaker) -> Result<(), StateError> {
        let raw = serde_json::to_vec(breaker).map_err(|e| StateError::Corrupt {
            tree: "breakers",
            key: name.into(),
            message: e.to_string(),
        })?;
        self.tree.insert(name, raw)?;
        Ok(())
    }

    /// Stores and flushes (a state transition).
    pub fn put_durable(&self, name: &str, breaker: &Breaker) -> Result<(), StateError> {
        self.put(name, breaker)?;
        self.tree.flush()?;
        Ok(())
    }

    /// Every stored breaker.
    pub fn all(&self) -> Result<Vec<(String, Breaker)>, StateError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, _) = item?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let b = self.get(&name)?;
            out.push((name, b));
        }
        Ok(out)
    }
}
