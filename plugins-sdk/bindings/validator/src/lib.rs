//! Guest bindings of the `validator` world; also the home of the shared `types` and `host`
//! interfaces the other worlds reuse.
#![allow(missing_docs, clippy::all)]

wit_bindgen::generate!({
    path: "../../wit",
    world: "validator",
    pub_export_macro: true,
    default_bindings_module: "headshot_plugin_sdk::bindings::validator_world",
});

impl headshot::policy::types::FieldError {
    /// A problem with one field; `field` is a JSON pointer such as `/input/width`.
    pub fn new(
        field: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            code: code.into(),
            message: message.into(),
        }
    }
}
