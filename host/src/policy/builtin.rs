//! The built-in policy components, compiled from `policies/` by the build script.

use super::kind::PolicyKind;

static VALIDATOR: &[u8] = include_bytes!(env!("HEADSHOT_POLICY_VALIDATOR_WASM"));
static SANITIZER: &[u8] = include_bytes!(env!("HEADSHOT_POLICY_SANITIZER_WASM"));
static RESILIENCE: &[u8] = include_bytes!(env!("HEADSHOT_POLICY_RESILIENCE_WASM"));

/// The embedded component for `kind`.
pub fn builtin_bytes(kind: PolicyKind) -> &'static [u8] {
    match kind {
        PolicyKind::Validator => VALIDATOR,
        PolicyKind::Sanitizer => SANITIZER,
        PolicyKind::Resilience => RESILIENCE,
    }
}
