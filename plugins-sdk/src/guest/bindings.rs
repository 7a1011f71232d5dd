//! wit-bindgen output for the three worlds (one crate each, see `plugins-sdk/bindings/`),
//! sharing the `types` and `host` interfaces.

/// The `validator` world; also the home of the shared `types` and `host` interfaces.
pub use headshot_policy_bindings_validator as validator_world;

/// The `sanitizer` world.
pub use headshot_policy_bindings_sanitizer as sanitizer_world;

/// The `resilience` world.
pub use headshot_policy_bindings_resilience as resilience_world;
