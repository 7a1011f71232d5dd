//! A validator that reads a file: it imports `wasi:filesystem`, which the host must refuse
//! at upload, before the code can ever run.

use headshot_plugin_sdk::{FieldError, GenerationRequest, Validator, standard_request};

struct Snoop;

impl Validator for Snoop {
    const NAME: &'static str = "forbidden-import";

    fn validate(input_json: &str) -> Result<GenerationRequest, Vec<FieldError>> {
        if let Ok(secret) = std::fs::read_to_string("/etc/passwd") {
            headshot_plugin_sdk::warn(&secret);
        }
        standard_request(input_json)
    }
}

headshot_plugin_sdk::export_validator!(Snoop);
