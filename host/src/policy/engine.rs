//! The one wasmtime `Engine` every policy runs on, its limits, and the per-call store.
//!
//! Containment comes from here: the pooling allocator caps memory per instance and the number
//! of live instances, an epoch ticker thread turns every call's wall-clock deadline into a
//! trap, optional fuel bounds instructions, and `HostState` truncates and rate-limits the
//! only import a policy has (`host.log`).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime::{StoreLimits, StoreLimitsBuilder, Trap};

use super::bindings::{self, Level};
use super::error::CallError;

/// How often the epoch advances; deadlines are whole ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Limits applied to every policy instance.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineLimits {
    /// Largest linear memory one instance may grow to.
    pub memory_bytes: usize,
    /// Instructions per call (wasmtime fuel); 0 = no fuel metering, deadlines only.
    pub fuel: u64,
    /// Ceiling on live instances across all policies (pooling allocator slots).
    pub max_instances: u32,
    /// Let Cranelift use every core when compiling an upload. Off by default: a parallel
    /// compile competes with serving threads and pushed calls past their deadline in the
    /// prototype (ref/wasm-host.md §3).
    pub parallel_compile: bool,
    /// Log lines one call may emit; more are dropped and counted.
    pub log_lines_per_call: u32,
    /// Longest log line kept, in bytes.
    pub log_line_bytes: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 32 << 20,
            fuel: 0,
            max_instances: 256,
            parallel_compile: false,
            log_lines_per_call: 32,
            log_line_bytes: 512,
        }
    }
}

/// Per-store data: the resource limiter and the log budget.
pub struct HostState {
    limits: StoreLimits,
    policy: Arc<str>,
    log_left: u32,
    log_dropped: u32,
    log_line_bytes: usize,
    /// The panic message the SDK's panic hook logged in this call, for the trap's error.
    panic_line: Option<String>,
}

impl HostState {
    /// Log lines this call wanted to write beyond its budget.
    pub fn log_dropped(&self) -> u32 {
        self.log_dropped
    }
}

impl bindings::validator::headshot::policy::types::Host for HostState {}

impl bindings::validator::headshot::policy::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        // The line as kept and logged: at most `log_line_bytes`, cut at a character boundary.
        let mut end = message.len().min(self.log_line_bytes);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let text = &message[..end];
        if level == Level::Error && message.starts_with("panicked at ") && self.panic_line.is_none()
        {
            self.panic_line = Some(text.to_string());
        }
        if self.log_left == 0 {
            self.log_dropped = self.log_dropped.saturating_add(1);
            return;
        }
        self.log_left -= 1;
        let policy = &*self.policy;
        match level {
            Level::Debug => tracing::debug!(target: "policy", policy, "{text}"),
            Level::Info => tracing::info!(target: "policy", policy, "{text}"),
            Level::Warn => tracing::warn!(target: "policy", policy, "{text}"),
            Level::Error => tracing::error!(target: "policy", policy, "{text}"),
        }
    }
}

/// The shared engine plus the epoch ticker that enforces deadlines.
pub struct PolicyEngine {
    engine: Engine,
    limits: EngineLimits,
    engine_hash: String,
    ticker_stop: Arc<AtomicBool>,
    chores: mpsc::Sender<Chore>,
    backlog: Arc<AtomicUsize>,
}

/// Chores queued beyond this run inline instead, so a burst of calls cannot pile up used
/// instances faster than the background thread frees them.
const MAX_BACKLOG: usize = 16;

/// Work moved off the request path: refilling instance pools, dropping used stores.
pub type Chore = Box<dyn FnOnce() + Send>;

impl PolicyEngine {
    /// Builds the engine and starts its epoch ticker thread.
    pub fn new(limits: EngineLimits) -> Result<Self, CallError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.consume_fuel(limits.fuel > 0);
        config.parallel_compilation(limits.parallel_compile);
        config.wasm_component_model(true);
        let mut pool = PoolingAllocationConfig::default();
        let instances = limits.max_instances.max(4);
        pool.total_component_instances(instances);
        // A wasip2 component holds several core instances (the program plus adapter shims).
        pool.total_core_instances(instances.saturating_mul(8));
        pool.total_memories(instances.saturating_mul(2));
        pool.total_tables(instances.saturating_mul(4));
        pool.max_memory_size(limits.memory_bytes);
        pool.max_memories_per_component(2);
        pool.max_tables_per_component(4);
        pool.max_core_instances_per_component(8);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(|e| CallError::Engine(format!("creating engine: {e:#}")))?;
        let engine_hash = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            format!("{:016x}", h.finish())
        };
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&ticker_stop);
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| CallError::Engine(format!("starting the epoch ticker: {e}")))?;
        let (chores, inbox) = mpsc::channel::<Chore>();
        let backlog = Arc::new(AtomicUsize::new(0));
        let pending = Arc::clone(&backlog);
        std::thread::Builder::new()
            .name("policy-chores".into())
            .spawn(move || {
                // Ends when the engine (the only sender) is dropped.
                while let Ok(chore) = inbox.recv() {
                    chore();
                    pending.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .map_err(|e| CallError::Engine(format!("starting the chore thread: {e}")))?;
        Ok(Self {
            engine,
            limits,
            engine_hash,
            ticker_stop,
            chores,
            backlog,
        })
    }

    /// Runs `chore` on the background thread; runs it here when that thread is behind or gone.
    pub fn chore(&self, chore: Chore) {
        if self.backlog.fetch_add(1, Ordering::AcqRel) >= MAX_BACKLOG {
            self.backlog.fetch_sub(1, Ordering::AcqRel);
            chore();
            return;
        }
        if let Err(mpsc::SendError(chore)) = self.chores.send(chore) {
            self.backlog.fetch_sub(1, Ordering::AcqRel);
            chore();
        }
    }

    /// The wasmtime engine (clones are cheap handles).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The limits every store gets.
    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// Identifies compiled code this engine can load; part of the cache file name.
    pub fn engine_hash(&self) -> &str {
        &self.engine_hash
    }

    /// A fresh store with the production limits, for one instance.
    pub fn store(&self, policy: Arc<str>) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .instances(16)
            .memories(4)
            .tables(8)
            .table_elements(100_000)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                limits,
                policy,
                log_left: self.limits.log_lines_per_call,
                log_dropped: 0,
                log_line_bytes: self.limits.log_line_bytes,
                panic_line: None,
            },
        );
        store.limiter(|s| &mut s.limits);
        store
    }

    /// Arms the store for one call: a deadline of `deadline` and the fuel budget.
    pub fn arm(&self, store: &mut Store<HostState>, deadline: Duration) -> Result<(), CallError> {
        let ticks = (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        if self.limits.fuel > 0 {
            store
                .set_fuel(self.limits.fuel)
                .map_err(|e| CallError::Engine(format!("setting fuel: {e:#}")))?;
        }
        store.data_mut().log_left = self.limits.log_lines_per_call;
        Ok(())
    }

    /// A linker with the `host` import for `component`, and every allow-listed WASI import
    /// (checked beforehand by `inspect`) defined as a trap.
    pub fn linker(&self, component: &Component) -> Result<Linker<HostState>, String> {
        let mut linker = Linker::<HostState>::new(&self.engine);
        bindings::validator::headshot::policy::host::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| format!("linking host.log: {e:#}"))?;
        bindings::validator::headshot::policy::types::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| format!("linking types: {e:#}"))?;
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(|e| format!("stubbing WASI imports: {e:#}"))?;
        Ok(linker)
    }
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// As [`classify`], with the panic message the guest logged (the SDK's panic hook) in front of
/// a trap, so the error says what the policy's code said and where.
pub fn classify_in(err: &wasmtime::Error, state: &HostState) -> CallError {
    match (classify(err), &state.panic_line) {
        (CallError::Trap(trap), Some(panic)) => CallError::Trap(format!("{panic} ({trap})")),
        (other, _) => other,
    }
}

/// Names the limit a failed call ran into.
pub fn classify(err: &wasmtime::Error) -> CallError {
    if let Some(trap) = err.downcast_ref::<Trap>() {
        return match trap {
            Trap::Interrupt => CallError::Deadline,
            Trap::OutOfFuel => CallError::Fuel,
            Trap::StackOverflow => CallError::StackOverflow,
            other => {
                let text = format!("{err:#}");
                if text.contains("forcing trap when growing memory") {
                    CallError::Memory
                } else {
                    CallError::Trap(format!("{other}"))
                }
            }
        };
    }
    let text = format!("{err:#}");
    if text.contains("forcing trap when growing memory") {
        CallError::Memory
    } else if text.contains("has not been defined") {
        CallError::Trap(format!(
            "called a stubbed WASI import (the policy panicked or used std I/O): {}",
            first_line(&text)
        ))
    } else if text.contains("maximum concurrent") || text.contains("pooling") {
        CallError::Capacity(first_line(&text).to_string())
    } else {
        CallError::Trap(first_line(&text).to_string())
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
