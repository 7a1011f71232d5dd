//! Guest bindings of the `sanitizer` world, sharing `types` and `host` with the validator bindings.
#![allow(missing_docs, clippy::all)]

wit_bindgen::generate!({
    path: "../../wit",
    world: "sanitizer",
    pub_export_macro: true,
    default_bindings_module: "headshot_plugin_sdk::bindings::sanitizer_world",
    with: {
        "headshot:policy/types@0.1.0": headshot_policy_bindings_validator::headshot::policy::types,
        "headshot:policy/host@0.1.0": headshot_policy_bindings_validator::headshot::policy::host,
    },
});
