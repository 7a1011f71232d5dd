//! The built-in validator: the SDK's standard rules with the host's limits.

use headshot_plugin_sdk::{FieldError, GenerationRequest, Validator, standard_request};

struct Builtin;

impl Validator for Builtin {
    const NAME: &'static str = "builtin-validator";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn validate(input_json: &str) -> Result<GenerationRequest, Vec<FieldError>> {
        standard_request(input_json)
    }
}

headshot_plugin_sdk::export_validator!(Builtin);
