//! SDK for headshot-worker policies.
//!
//! A policy is a WebAssembly component (target `wasm32-wasip2`) exporting one of the worlds in
//! `wit/policy.wit`: `validator`, `sanitizer` or `resilience`. Implement the matching trait
//! ([`Validator`], [`Sanitizer`], [`Resilience`]) and call its export macro
//! ([`export_validator!`], ...). The built-in rules are in [`rules`] and reachable from guests
//! through [`standard_request`], [`standard_sanitize`] and friends, so a custom policy extends
//! them instead of re-implementing them.
//!
//! The host depends on this crate with `default-features = false` and uses [`rules`] natively:
//! for the fail-open fallback and as the benchmark baseline for the wasm path.

pub mod envelope;
pub mod rules;

#[cfg(feature = "guest")]
mod guest;
#[cfg(feature = "guest")]
pub use guest::*;

/// This SDK's version, embedded in every policy as the `headshot:sdk-version` custom section
/// so the host can refuse an incompatible policy before running it.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Name of the custom section that carries [`SDK_VERSION`].
pub const SDK_VERSION_SECTION: &str = "headshot:sdk-version";

#[doc(hidden)]
pub const SDK_VERSION_LEN: usize = SDK_VERSION.len();

/// [`SDK_VERSION`] as a fixed-size array, the form a `#[link_section]` static needs.
#[doc(hidden)]
pub const SDK_VERSION_BYTES: [u8; SDK_VERSION_LEN] = {
    let src = SDK_VERSION.as_bytes();
    let mut out = [0u8; SDK_VERSION_LEN];
    let mut i = 0;
    while i < SDK_VERSION_LEN {
        out[i] = src[i];
        i += 1;
    }
    out
};
