//! Turning component bytes into loadable code, off the serving threads, with a disk cache.
//!
//! Cranelift runs on one dedicated thread (uploads are compiled one at a time, and never on a
//! request thread). The machine code is cached as `<sha256>-<engine hash>.cwasm` in a
//! directory only this user can read; a restart loads it in well under a millisecond instead
//! of compiling again. Each cache file starts with the sha256 of the rest, so a truncated or
//! altered file is recompiled rather than loaded.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::engine::PolicyEngine;
use super::error::UploadError;

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// How a component was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeOrigin {
    /// Loaded from the `.cwasm` cache.
    Cache,
    /// Compiled by Cranelift now.
    Compiled,
}

/// A component ready to type-check, and what it cost.
pub struct Compiled {
    /// The component.
    pub component: Component,
    /// Cache hit or fresh compile.
    pub origin: CodeOrigin,
    /// Time spent.
    pub elapsed: Duration,
}

type Job = (Vec<u8>, mpsc::Sender<Result<Vec<u8>, String>>);

/// Compiles on its own thread and caches machine code on disk.
pub struct Compiler {
    engine: Arc<PolicyEngine>,
    cache_dir: PathBuf,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Compiler {
    /// Starts the compile thread; creates `cache_dir` (mode 0700).
    pub fn new(engine: Arc<PolicyEngine>, cache_dir: &Path) -> Result<Self, UploadError> {
        create_private_dir(cache_dir)?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let compiling = engine.engine().clone();
        std::thread::Builder::new()
            .name("policy-compile".into())
            .spawn(move || {
                while let Ok((bytes, reply)) = inbox.recv() {
                    let result = compiling
                        .precompile_component(&bytes)
                        .map_err(|e| format!("{e:#}"));
                    let _ = reply.send(result);
                }
            })
            .map_err(|e| UploadError::Compile(format!("starting the compile thread: {e}")))?;
        Ok(Self {
            engine,
            cache_dir: cache_dir.to_path_buf(),
            jobs: Mutex::new(jobs),
        })
    }

    fn cache_path(&self, sha256: &str) -> PathBuf {
        self.cache_dir
            .join(format!("{sha256}-{}.cwasm", self.engine.engine_hash()))
    }

    /// The component for `bytes` (whose hash is `sha256`): from the cache when a valid entry
    /// exists, else compiled on the compile thread and cached.
    pub fn load(&self, sha256: &str, bytes: &[u8]) -> Result<Compiled, UploadError> {
        let start = Instant::now();
        let path = self.cache_path(sha256);
        if let Some(code) = read_checked(&path) {
            // SAFETY: `deserialize` trusts its input to be wasmtime output. This file was
            // written by `store` below into a 0700 directory, under a name bound to the
            // wasm's sha256 and this engine's compatibility hash, and its own sha256 header
            // was just verified. Nothing from the network is ever deserialized.
            match unsafe { Component::deserialize(self.engine.engine(), &code) } {
                Ok(component) => {
                    return Ok(Compiled {
                        component,
                        origin: CodeOrigin::Cache,
                        elapsed: start.elapsed(),
                    });
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unusable policy cache entry")
                }
            }
        }
        let code = self.precompile(bytes)?;
        // SAFETY: `code` was produced just now by `precompile_component` of this engine.
        let component = unsafe { Component::deserialize(self.engine.engine(), &code) }
            .map_err(|e| UploadError::Compile(format!("{e:#}")))?;
        if let Err(e) = write_checked(&path, &code) {
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled policy");
        }
        Ok(Compiled {
            component,
            origin: CodeOrigin::Compiled,
            elapsed: start.elapsed(),
        })
    }

    fn precompile(&self, bytes: &[u8]) -> Result<Vec<u8>, UploadError> {
        let (reply, answer) = mpsc::channel();
        self.jobs
            .lock()
            .map_err(|_| UploadError::Compile("compile queue poisoned".into()))?
            .send((bytes.to_vec(), reply))
            .map_err(|_| UploadError::Compile("the compile thread has stopped".into()))?;
        answer
            .recv()
            .map_err(|_| UploadError::Compile("the compile thread has stopped".into()))?
            .map_err(UploadError::Compile)
    }
}

fn create_private_dir(dir: &Path) -> Result<(), UploadError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder
            .create(dir)
            .map_err(|e| UploadError::Cache(format!("creating {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| UploadError::Cache(format!("securing {}: {e}", dir.display())))?;
    }
    #[cfg(not(unix))]
    builder
        .create(dir)
        .map_err(|e| UploadError::Cache(format!("creating {}: {e}", dir.display())))?;
    Ok(())
}

fn read_checked(path: &Path) -> Option<Vec<u8>> {
    let mut data = std::fs::read(path).ok()?;
    if data.len() < 32 {
        return None;
    }
    let body = data.split_off(32);
    (Sha256::digest(&body).as_slice() == data.as_slice()).then_some(body)
}

fn write_checked(path: &Path, code: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut data = Sha256::digest(code).to_vec();
    data.extend_from_slice(code);
    std::fs::write(&tmp, &data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_cache_files_refuse_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cwasm");
        write_checked(&path, b"machine code").unwrap();
        assert_eq!(read_checked(&path).as_deref(), Some(&b"machine code"[..]));
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, data).unwrap();
        assert_eq!(read_checked(&path), None);
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(read_checked(&path), None);
    }

    #[test]
    fn sha256_is_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
