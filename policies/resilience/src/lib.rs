//! The built-in resilience policy: resilience4j-style breaker and jittered retries, with
//! the host's thresholds. The trait's default methods are the standard rules.

use headshot_plugin_sdk::Resilience;

struct Builtin;

impl Resilience for Builtin {
    const NAME: &'static str = "builtin-resilience";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
}

headshot_plugin_sdk::export_resilience!(Builtin);
