//! A custom validator: every built-in rule, plus "square images only".

use headshot_plugin_sdk::{FieldError, GenerationRequest, Validator, standard_request};

struct SquareOnly;

impl Validator for SquareOnly {
    const NAME: &'static str = "square-only";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn validate(input_json: &str) -> Result<GenerationRequest, Vec<FieldError>> {
        let request = standard_request(input_json)?;
        if request.width != request.height {
            let message = format!("width must equal height (got {}x{})", request.width, request.height);
            return Err(vec![FieldError::new("/input/width", "not_square", message)]);
        }
        Ok(request)
    }
}

headshot_plugin_sdk::export_validator!(SquareOnly);
