//! `headshot check`: is this worker set up to run? Validates the config (already done when
//! it loaded), looks at the model source, reaches storage, reads GPU and memory, and lists
//! every problem found, exiting non-zero when there is one.

use anyhow::{Result, bail};

use headshot_host::config::{Config, StorageBackend};
use headshot_host::pipeline::ModelSource;
use headshot_host::resources::{Probe, SystemProbe};
use headshot_host::storage::{ImageStore, LocalStore, Store, SupabaseStore};

fn mib(b: u64) -> u64 {
    b >> 20
}

/// Runs the checks and prints a report.
pub fn run(config: &Config) -> Result<()> {
    let mut problems: Vec<String> = Vec::new();
    outln!("config: ok (defaults < file < HEADSHOT__* < flags)");
    outln!("data dir: {}", config.data_dir.display());

    let m = &config.model;
    match &m.source {
        ModelSource::Demo => outln!(
            "model: demo (tiny generated weights, abstract images), {}",
            m.variant.as_str()
        ),
        ModelSource::Hub { repo, revision } => {
            let token = std::env::var("HF_TOKEN")
                .map(|t| !t.is_empty())
                .unwrap_or(false);
            outln!(
                "model: hub:{repo}@{} ({}), HF_TOKEN {}",
                revision.as_deref().unwrap_or("main"),
                m.variant.as_str(),
                if token {
                    "set"
                } else {
                    "not set (needed for gated repos such as FLUX.1-dev)"
                }
            );
        }
        ModelSource::Dir(path) => {
            let needed = [m.variant.transformer_file(), "ae.safetensors"];
            let missing: Vec<&str> = needed
                .iter()
                .copied()
                .filter(|f| !path.join(f).is_file())
                .collect();
            if !path.is_dir() {
                problems.push(format!(
                    "model: {} does not exist (model.source)",
                    path.display()
                ));
            } else if !missing.is_empty() {
                problems.push(format!(
                    "model: {} lacks {} (see README \"Real weights\")",
                    path.display(),
                    missing.join(", ")
                ));
            } else {
                outln!("model: dir:{} ({})", path.display(), m.variant.as_str());
            }
        }
    }

    let probe = SystemProbe::new(m.device.is_cuda(), m.device.cuda_index());
    let r = probe.read();
    outln!(
        "memory: {} MiB available of {} MiB",
        mib(r.system_available_bytes),
        mib(r.system_total_bytes)
    );
    match (&r.gpu, m.device.is_cuda()) {
        (Some(g), _) => outln!(
            "gpu: {} with {} MiB free of {} MiB",
            g.name,
            mib(g.free_bytes),
            mib(g.total_bytes)
        ),
        (None, true) => problems.push(format!(
            "gpu: model.device wants CUDA but no GPU is readable ({})",
            r.gpu_unavailable.as_deref().unwrap_or("unknown")
        )),
        (None, false) => outln!(
            "gpu: none used ({})",
            r.gpu_unavailable.as_deref().unwrap_or("cpu")
        ),
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let storage = match config.storage.backend {
        StorageBackend::Local => {
            // The configured key (its length) and URL base are checked as `serve` checks them,
            // by the store itself. An empty key is generated at the first start; a stand-in
            // serves here, so check writes no key file.
            let local = &config.storage.local;
            let base = format!("http://{}:{}", config.server.host, config.server.port);
            let key = if local.signing_key.is_empty() {
                vec![0u8; 32]
            } else {
                local.signing_key.as_bytes().to_vec()
            };
            LocalStore::from_config(local, config.data_dir.join("images"), base, key)
                .map(Store::Local)
        }
        StorageBackend::Supabase => {
            SupabaseStore::new(&config.storage.supabase).map(Store::Supabase)
        }
    };
    match storage {
        Ok(store) => match runtime.block_on(store.health()) {
            Ok(()) => outln!("storage: {} reachable", store.name()),
            Err(e) => problems.push(format!("storage ({}): {e}", store.name())),
        },
        Err(e) => problems.push(format!("storage: {e}")),
    }

    if problems.is_empty() {
        outln!("ok: ready to serve");
        return Ok(());
    }
    for p in &problems {
        outln!("problem: {p}");
    }
    bail!("{} problem(s) found", problems.len())
}
