//! The built-in sanitizer: the SDK's standard rules with the host's blocked terms.

use headshot_plugin_sdk::sanitization::Sanitized;
use headshot_plugin_sdk::{Sanitizer, standard_sanitize};

struct Builtin;

impl Sanitizer for Builtin {
    const NAME: &'static str = "builtin-sanitizer";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn sanitize(prompt: &str) -> Sanitized {
        standard_sanitize(prompt)
    }
}

headshot_plugin_sdk::export_sanitizer!(Builtin);
