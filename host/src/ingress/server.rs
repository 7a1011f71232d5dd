//! `headshot serve`: opens the state, policies, storage and job service, and serves the
//! local API and the admin API until shutdown.

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, StorageBackend};
use crate::jobs::JobService;
use crate::policy::{PolicySettings, Registry};
use crate::state::StateDb;
use crate::storage::{LocalStore, Store, SupabaseStore};

/// Why the server could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Data dir, token file, key file.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A port could not be bound.
    #[error(
        "cannot listen on {addr}: {source} (set server.port / server.admin_port, or the command's --port / --admin-port; `worker --rp_serve_api` takes --rp_api_port / --admin-port)"
    )]
    Bind {
        /// Address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

/// A running server.
pub struct Running {
    /// Where the local API listens.
    pub api_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// The admin bearer token.
    pub admin_token: String,
    /// Where the token was written when generated.
    pub admin_token_file: Option<PathBuf>,
    /// The job service.
    pub service: JobService,
    state: StateDb,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting requests, lets in-flight ones finish, and flushes the state.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.service.stop().await;
        if let Err(e) = self.state.flush() {
            tracing::error!(error = %e, "flushing state at shutdown failed");
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `n` random bytes from the OS, hex-encoded.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `contents` to `path` readable by the owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn admin_token(config: &Config) -> Result<(String, Option<PathBuf>), ServeError> {
    if !config.server.admin_token.is_empty() {
        return Ok((config.server.admin_token.clone(), None));
    }
    let path = config.data_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), Some(path))),
        _ => {}
    }
    let token = random_hex(32).map_err(io("generating the admin token", &path))?;
    write_private(&path, token.as_bytes()).map_err(io("writing the admin token", &path))?;
    Ok((token, Some(path)))
}

/// Opens storage and starts the job service (no HTTP): shared by `serve` and `worker`.
/// `default_base_url` is where local-store image URLs point when
/// `storage.local.public_base_url` is empty.
pub fn open_service(
    config: Config,
    state: &StateDb,
    registry: Registry,
    default_base_url: String,
) -> Result<JobService, ServeError> {
    let data = config.data_dir.clone();
    let store = match config.storage.backend {
        StorageBackend::Local => {
            let local = &config.storage.local;
            let key = LocalStore::load_or_create_key(&local.signing_key, &data.join("signing.key"))
                .map_err(|e| ServeError::Other(e.to_string()))?;
            Store::Local(
                LocalStore::from_config(local, data.join("images"), default_base_url, key)
                    .map_err(|e| ServeError::Other(e.to_string()))?,
            )
        }
        StorageBackend::Supabase => Store::Supabase(
            SupabaseStore::new(&config.storage.supabase)
                .map_err(|e| ServeError::Other(e.to_string()))?,
        ),
    };
    JobService::start(Arc::new(config), state, Arc::new(registry), Arc::new(store))
        .map_err(|e| ServeError::Other(e.message))
}

/// Opens the state database and the policy registry (compiling policies off the runtime).
pub async fn open_state(config: &Config) -> Result<(StateDb, Registry), ServeError> {
    // Library callers (tests, benches, embedders) get the same checks as a config file.
    config
        .validate()
        .map_err(|e| ServeError::Other(format!("invalid configuration: {e}")))?;
    let data = config.data_dir.clone();
    std::fs::create_dir_all(&data).map_err(io("creating the data dir", &data))?;
    let state = StateDb::open(&data.join("state")).map_err(|e| ServeError::Other(e.to_string()))?;
    let settings = PolicySettings::from_config(config);
    let cache = data.join("policy-cache");
    let st = state.clone();
    let registry = tokio::task::spawn_blocking(move || Registry::open(settings, &st, &cache))
        .await
        .map_err(|e| ServeError::Other(e.to_string()))?
        .map_err(|e| ServeError::Other(format!("loading policies: {e}")))?;
    Ok((state, registry))
}

/// Binds `host:port` (port 0: any free one) and says which address it got.
async fn bind(
    host: &str,
    port: u16,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), ServeError> {
    let addr = format!("{host}:{port}");
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok((listener, local))
}

/// Starts everything on the current Tokio runtime.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    let (state, registry) = open_state(&config).await?;
    let (token, token_file) = admin_token(&config)?;

    let (api_listener, api_local) = bind(&config.server.host, config.server.port).await?;
    let (admin_listener, admin_local) = bind(&config.server.host, config.server.admin_port).await?;

    let service = open_service(config, &state, registry, format!("http://{api_local}"))?;

    let (stop, _) = watch::channel(false);
    let api = super::api::router(super::api::ApiState {
        service: service.clone(),
    });
    let admin = super::admin::router(super::admin::AdminState {
        service: service.clone(),
        token: token.clone().into(),
    });
    let mut tasks = Vec::new();
    for (listener, app, name) in [
        (api_listener, api, "local API"),
        (admin_listener, admin, "admin API"),
    ] {
        let mut rx = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let graceful = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            super::http_serve::serve(listener, app, graceful).await;
            tracing::debug!(server = name, "server stopped");
        }));
    }
    tracing::info!(api = %api_local, admin = %admin_local, "serving");
    Ok(Running {
        api_addr: api_local,
        admin_addr: admin_local,
        admin_token: token,
        admin_token_file: token_file,
        service,
        state,
        stop,
        tasks,
    })
}

/// Writes one metric family: `# HELP` (when given) and `# TYPE`, then one line per sample,
/// `name{labels} value` (labels already formatted, empty for none).
fn family<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: Option<&str>,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    if let Some(help) = help {
        let _ = writeln!(out, "# HELP {name} {help}");
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// Writes one summary family: `# HELP`, `# TYPE`, then `name_sum{labels}` and
/// `name_count{labels}` per row of (labels, sum, count).
fn summary(
    out: &mut String,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (String, String, u64)>,
) {
    let samples = rows.into_iter().flat_map(|(labels, sum, count)| {
        [
            (format!("_sum{labels}"), sum),
            (format!("_count{labels}"), count.to_string()),
        ]
    });
    family(out, name, "summary", Some(help), samples);
}

/// `{key="value"}`.
fn label(key: &str, value: impl std::fmt::Display) -> String {
    format!("{{{key}=\"{value}\"}}")
}

/// Prometheus text exposition of the worker's counters and gauges.
pub fn metrics_text(service: &JobService) -> String {
    let mut out = String::new();
    let counts = service.counts().ok();
    let by_status = counts.iter().flat_map(|c| {
        [
            ("completed", c.completed),
            ("failed", c.failed),
            ("in_progress", c.in_progress),
            ("in_queue", c.in_queue),
            ("cancelled", c.cancelled),
        ]
        .map(|(status, n)| (label("status", status), n))
    });
    family(
        &mut out,
        "headshot_jobs",
        "gauge",
        Some("Jobs in the history by status."),
        by_status,
    );
    if let Some(c) = &counts {
        let help = Some("Runs restarted after a crash.");
        family(
            &mut out,
            "headshot_jobs_retried_total",
            "counter",
            help,
            [(String::new(), c.retried)],
        );
    }
    let help = Some("Jobs waiting to run.");
    family(
        &mut out,
        "headshot_queue_depth",
        "gauge",
        help,
        [(String::new(), service.queued())],
    );
    let model = service.inference().state();
    let help = Some("Whether the model is loaded.");
    let loaded = u8::from(model.loaded);
    family(
        &mut out,
        "headshot_model_loaded",
        "gauge",
        help,
        [(String::new(), loaded)],
    );

    // One registry read serves the three policy families (the last two only when it worked).
    // Each series is one loaded version (slot and sha256): its counts start when it is loaded
    // and its series ends when it is swapped out (unlabelled by version, a swap read as a
    // drop in one counter). A version activated again starts from zero, which Prometheus
    // reads as a counter reset, as after a restart.
    let slots = service.registry().status().ok();
    let version = |s: &crate::policy::SlotStatus| {
        format!("{{slot=\"{}\",sha256=\"{}\"}}", s.kind, s.active.sha256)
    };
    let per_slot = |f: fn(&_) -> u64| slots.iter().flatten().map(move |s| (version(s), f(s)));
    let help = Some(
        "Policy calls on the active version of each slot since it was loaded, its conformance cases included.",
    );
    family(
        &mut out,
        "headshot_policy_calls_total",
        "counter",
        help,
        per_slot(|s| s.calls),
    );
    if slots.is_some() {
        let help = Some("Policy calls that trapped or broke a limit.");
        let failures = per_slot(|s| s.failures);
        family(
            &mut out,
            "headshot_policy_failures_total",
            "counter",
            help,
            failures,
        );
    }

    let breakers = service
        .breakers()
        .named(&crate::jobs::BREAKERS)
        .unwrap_or_default();
    let open = breakers.iter().map(|(name, b)| {
        use headshot_plugin_sdk::rules::breaker::State;
        let open = matches!(b.state, State::Open | State::ForcedOpen);
        (label("breaker", name), u8::from(open))
    });
    let help = Some("Whether a circuit breaker refuses calls (open or forced open).");
    family(&mut out, "headshot_breaker_open", "gauge", help, open);

    let stages = service.metrics().stages();
    let stage_rows = stages
        .iter()
        .map(|(stage, sum, count)| (label("stage", stage), sum.to_string(), *count));
    summary(
        &mut out,
        "headshot_job_stage_milliseconds",
        "Time spent per job stage.",
        stage_rows,
    );

    let errors = service.metrics().errors();
    let errors = errors
        .iter()
        .map(|(kind, n)| (label("error_type", kind), n));
    let help = Some("Failed jobs by error category.");
    family(
        &mut out,
        "headshot_job_errors_total",
        "counter",
        help,
        errors,
    );

    if let Some(slots) = &slots {
        let rows = slots
            .iter()
            .map(|s| (version(s), s.total_micros.to_string(), s.calls));
        let help = "Policy call time on the active version of each slot since it was loaded.";
        summary(&mut out, "headshot_policy_call_microseconds", help, rows);
    }

    let r = service.monitor().read();
    let mut memory = vec![
        (label("kind", "system_total"), r.system_total_bytes),
        (label("kind", "system_available"), r.system_available_bytes),
        (label("kind", "process_rss"), r.process_rss_bytes),
    ];
    if let Some(g) = &r.gpu {
        memory.push((label("kind", "gpu_total"), g.total_bytes));
        memory.push((label("kind", "gpu_free"), g.free_bytes));
    }
    family(
        &mut out,
        "headshot_memory_bytes",
        "gauge",
        Some("Memory readings."),
        memory,
    );
    if let Some(g) = &r.gpu {
        if let Some(u) = g.utilization_percent {
            family(
                &mut out,
                "headshot_gpu_utilization_percent",
                "gauge",
                None,
                [(String::new(), u)],
            );
        }
        if let Some(t) = g.temperature_c {
            family(
                &mut out,
                "headshot_gpu_temperature_celsius",
                "gauge",
                None,
                [(String::new(), t)],
            );
        }
    }
    let help = Some("Failed model loads.");
    let failures = [(String::new(), model.load_failures)];
    family(
        &mut out,
        "headshot_model_load_failures_total",
        "counter",
        help,
        failures,
    );
    out
}
