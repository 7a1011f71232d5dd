//! Guest bindings of the `resilience` world, sharing `types` and `host` with the validator bindings.
#![allow(missing_docs, clippy::all)]

wit_bindgen::generate!({
    path: "../../wit",
    world: "resilience",
    pub_export_macro: true,
    default_bindings_module: "headshot_plugin_sdk::bindings::resilience_world",
    with: {
        "headshot:policy/types@0.1.0": headshot_policy_bindings_validator::headshot::policy::types,
        "headshot:policy/host@0.1.0": headshot_policy_bindings_validator::headshot::policy::host,
    },
});
