//! Errors of policy calls and policy uploads.

use super::kind::PolicyKind;

/// Why one policy call produced no usable answer. The slot's `on_error` rule decides what
/// the caller sees; the worker itself carries on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The call ran past its wall-clock deadline (epoch interruption).
    #[error("policy ran past its deadline")]
    Deadline,
    /// The call used up its instruction budget (fuel).
    #[error("policy ran out of fuel")]
    Fuel,
    /// The guest tried to grow its memory past the limit.
    #[error("policy exceeded its memory limit")]
    Memory,
    /// The guest recursed past the wasm stack limit.
    #[error("policy overflowed its stack")]
    StackOverflow,
    /// The guest trapped (panic, abort, unreachable, a stubbed import).
    #[error("policy trapped: {0}")]
    Trap(String),
    /// The guest answered, but the answer broke an output limit or an invariant.
    #[error("policy output refused: {0}")]
    Output(String),
    /// No instance slot was free (the pooling allocator's ceiling).
    #[error("no policy instance available: {0}")]
    Capacity(String),
    /// `configure` refused the settings.
    #[error("policy refused its configuration: {0}")]
    Configure(String),
    /// The engine itself could not be set up.
    #[error("policy engine: {0}")]
    Engine(String),
    /// The canned call every new instance gets before it serves failed: named as such, or a
    /// module that fails only in `validate` read as refusing its configuration.
    #[error("policy failed the warm-up call each instance gets before it serves ({call}): {error}")]
    WarmUp {
        /// The call and its input.
        call: &'static str,
        /// How it failed.
        error: Box<CallError>,
    },
}

impl CallError {
    /// Short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Deadline => "deadline",
            Self::Fuel => "fuel",
            Self::Memory => "memory",
            Self::StackOverflow => "stack_overflow",
            Self::Trap(_) => "trap",
            Self::Output(_) => "output",
            Self::Capacity(_) => "capacity",
            Self::Configure(_) => "configure",
            Self::Engine(_) => "engine",
            Self::WarmUp { error, .. } => error.label(),
        }
    }
}

/// Why an uploaded policy was refused. The active policy is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Larger than `policies.max_upload_bytes`.
    #[error("policy is {size} bytes; the limit is {limit} bytes (policies.max_upload_bytes)")]
    TooLarge {
        /// Bytes received.
        size: usize,
        /// The configured cap.
        limit: usize,
    },
    /// Not a WebAssembly component (garbage, a core module, a precompiled `.cwasm`).
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    /// Imports something outside the allow-list.
    #[error(
        "policy imports {0}, which policies may not use (allowed: headshot:policy/host and the WASI cli/io interfaces Rust std links, which trap if called)"
    )]
    ForbiddenImport(String),
    /// Built against an SDK whose major version the host does not speak.
    #[error("policy was built with SDK {found}; this worker supports SDK {supported}")]
    IncompatibleSdk {
        /// Version in the policy's custom section.
        found: String,
        /// What the host supports.
        supported: String,
    },
    /// Compilation failed.
    #[error("compiling the policy failed: {0}")]
    Compile(String),
    /// The exports do not match the slot's world.
    #[error("policy does not implement the `{kind}` world: {message}")]
    WrongWorld {
        /// The slot it was uploaded for.
        kind: PolicyKind,
        /// What wasmtime found missing or mistyped.
        message: String,
    },
    /// `configure` refused the slot's settings, instantiation failed, or the warm-up call
    /// did (the message says which).
    #[error("policy could not start: {0}")]
    Start(String),
    /// One or more conformance cases failed.
    #[error("policy failed {} conformance case(s): {}", failed.len(), failed.join("; "))]
    Conformance {
        /// `case: why` for each failure.
        failed: Vec<String>,
    },
    /// No stored policy has this hash.
    #[error("no stored {kind} policy with sha256 {sha256}")]
    UnknownHash {
        /// Slot.
        kind: PolicyKind,
        /// The hash asked for.
        sha256: String,
    },
    /// A shortened hash that more than one stored version starts with.
    #[error("sha256 prefix {prefix} matches {} stored {kind} versions ({}); give more of it", matches.len(), matches.join(", "))]
    AmbiguousHash {
        /// Slot.
        kind: PolicyKind,
        /// The prefix asked for.
        prefix: String,
        /// The versions it matches.
        matches: Vec<String>,
    },
    /// Nothing to roll back to.
    #[error("the {0} slot has no previous version to roll back to")]
    NoPrevious(PolicyKind),
    /// The state store failed.
    #[error("policy state: {0}")]
    State(#[from] crate::state::StateError),
    /// Filesystem trouble with the compiled-code cache.
    #[error("policy cache: {0}")]
    Cache(String),
}

impl UploadError {
    /// Whether the upload was refused for what it is (4xx) rather than a worker fault (5xx).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::State(_) | Self::Cache(_))
    }
}
