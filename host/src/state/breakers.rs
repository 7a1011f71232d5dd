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

    /// The states of the breakers named, in that order: the worker's own breakers, listed
    /// whether or not they have tripped yet. Anything else the tree holds (a name an older
    /// version's admin API let an operator create) is not a breaker the worker consults, so
    /// it is not reported as one.
    pub fn named<'a>(&self, names: &[&'a str]) -> Result<Vec<(&'a str, Breaker)>, StateError> {
        names
            .iter()
            .map(|&name| Ok((name, self.get(name)?)))
            .collect()
    }
}
