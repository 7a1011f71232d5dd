//! `headshot policy ...`: test, list, push, activate and roll back policies in the local state.
//!
//! These act on the sled database under the data dir, so they are for a stopped worker (sled
//! allows one process at a time) or for preparing state; a running worker is changed through
//! the admin API instead.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use headshot_host::config::Config;
use headshot_host::policy::{PolicyKind, PolicySettings, Registry, test_component};
use headshot_host::state::StateDb;

/// Subcommands of `headshot policy`.
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Run the checks an activation runs (type check, limits, conformance cases) on a file.
    Test {
        /// The component (.wasm) to check.
        file: PathBuf,
        /// Which slot it is for: validator, sanitizer or resilience.
        #[arg(long)]
        kind: PolicyKind,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the active version of each slot and what rollback would return to.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check, store and activate a component.
    Push {
        /// The component (.wasm).
        file: PathBuf,
        /// Slot.
        #[arg(long)]
        kind: PolicyKind,
    },
    /// Activate a stored version by its sha256.
    Activate {
        /// Slot.
        #[arg(long)]
        kind: PolicyKind,
        /// Hex sha256 shown by `policy list` or `policy push`.
        sha256: String,
    },
    /// Return a slot to the version active before the current one.
    Rollback {
        /// Slot.
        #[arg(long)]
        kind: PolicyKind,
    },
}

fn cache_dir(config: &Config) -> PathBuf {
    config.data_dir.join("policy-cache")
}

fn read(file: &Path) -> Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

fn open_registry(config: &Config) -> Result<Registry> {
    // A worker running on this data dir holds the lock for as long as it runs: say so now.
    let state = StateDb::open_within(&config.data_dir.join("state"), std::time::Duration::ZERO)?;
    Ok(Registry::open(
        PolicySettings::from_config(config),
        &state,
        &cache_dir(config),
    )?)
}

/// Runs one `policy` subcommand.
pub fn run(config: &Config, command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Test { file, kind, json } => {
            let bytes = read(&file)?;
            let settings = PolicySettings::from_config(config);
            match test_component(&settings, &cache_dir(config), kind, &bytes) {
                Ok(report) => {
                    if json {
                        outln!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        let p = &report.policy;
                        outln!(
                            "{} {} (sdk {}, sha256 {}, {} bytes): compiled in {:.1} ms",
                            p.name,
                            p.version,
                            p.sdk_version,
                            p.sha256,
                            p.size_bytes,
                            report.compile_ms
                        );
                        for c in &report.cases {
                            outln!("  ok   {} ({} µs)", c.name, c.micros);
                        }
                        outln!(
                            "passed: {} conformance cases for the {kind} slot",
                            report.cases.len()
                        );
                    }
                    Ok(())
                }
                Err(e) => bail!("{} is not a usable {kind} policy: {e}", file.display()),
            }
        }
        PolicyCommand::List { json } => {
            let registry = open_registry(config)?;
            let status = registry.status()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                for s in status {
                    let a = &s.active;
                    outln!(
                        "{:<10} {} {} ({:?}, sha256 {}, {} bytes), {} earlier version(s)",
                        s.kind.as_str(),
                        a.name,
                        a.version,
                        a.source,
                        a.sha256,
                        a.size_bytes,
                        s.previous.len()
                    );
                    if let Some(why) = &s.fallback {
                        outln!("{:<10} standing in: {why}", "");
                    }
                }
            }
            Ok(())
        }
        PolicyCommand::Push { file, kind } => {
            let bytes = read(&file)?;
            let registry = open_registry(config)?;
            let (upload, activation) = registry
                .push(kind, &bytes)
                .map_err(|e| anyhow::anyhow!("{} refused: {e}", file.display()))?;
            outln!(
                "activated {} {} as the {kind} policy (sha256 {}); {} conformance cases passed; activation {:.1} ms",
                upload.policy.name,
                upload.policy.version,
                upload.policy.sha256,
                upload.cases.len(),
                activation.activation_ms
            );
            Ok(())
        }
        PolicyCommand::Activate { kind, sha256 } => {
            let registry = open_registry(config)?;
            let report = registry.activate(kind, &sha256)?;
            outln!(
                "{kind}: active {} {} (sha256 {})",
                report.active.name,
                report.active.version,
                report.active.sha256
            );
            Ok(())
        }
        PolicyCommand::Rollback { kind } => {
            let registry = open_registry(config)?;
            let report = registry.rollback(kind)?;
            outln!(
                "{kind}: rolled back to {} {} (sha256 {})",
                report.active.name,
                report.active.version,
                report.active.sha256
            );
            Ok(())
        }
    }
}
