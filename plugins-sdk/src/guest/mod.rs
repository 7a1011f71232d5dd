//! Guest-side bindings, traits and export macros (feature `guest`).

pub mod bindings;
mod convert;
mod log;
mod standard;
mod traits;

pub use log::{debug, error, info, warn};
pub use standard::{
    standard_admit, standard_record_outcome, standard_request, standard_retry, standard_sanitize,
};
pub use traits::{Resilience, Sanitizer, Validator};

pub use bindings::validator_world::headshot::policy::types::{
    FieldError, GenerationRequest, PolicyInfo,
};
/// Types of the `sanitizer` world.
pub mod sanitization {
    pub use super::bindings::sanitizer_world::exports::headshot::policy::sanitization::{
        CleanedPrompt, Sanitized,
    };
}
/// Types of the `resilience` world.
pub mod decisions {
    pub use super::bindings::resilience_world::exports::headshot::policy::decisions::{
        Admission, AdmitResult, Attempt, Breaker, BreakerState, Bucket, CallResult, ErrorKind,
        GiveUpReason, Outcome, RetryDecision,
    };
}

#[doc(hidden)]
pub mod __private {
    pub use super::standard::{
        configure_resilience, configure_sanitizer, configure_validator, custom_config,
    };
}

/// Exports `$ty` (implementing [`Validator`]) as the component's `validator` world.
#[macro_export]
macro_rules! export_validator {
    ($ty:ty) => {
        const _: () = {
            struct HeadshotValidatorExport;
            impl $crate::bindings::validator_world::exports::headshot::policy::meta::Guest
                for HeadshotValidatorExport
            {
                fn info() -> $crate::PolicyInfo {
                    $crate::PolicyInfo {
                        name: <$ty as $crate::Validator>::NAME.into(),
                        version: <$ty as $crate::Validator>::VERSION.into(),
                        sdk_version: $crate::SDK_VERSION.into(),
                    }
                }
                fn configure(config_json: String) -> Result<(), String> {
                    $crate::__private::configure_validator(&config_json)?;
                    <$ty as $crate::Validator>::configure(&$crate::__private::custom_config())
                }
            }
            impl $crate::bindings::validator_world::exports::headshot::policy::validation::Guest
                for HeadshotValidatorExport
            {
                fn validate(
                    input_json: String,
                ) -> Result<$crate::GenerationRequest, Vec<$crate::FieldError>> {
                    <$ty as $crate::Validator>::validate(&input_json)
                }
            }
            $crate::bindings::validator_world::__export_validator_impl!(
                HeadshotValidatorExport with_types_in $crate::bindings::validator_world
            );
            $crate::__sdk_version_section!();
        };
    };
}

/// Exports `$ty` (implementing [`Sanitizer`]) as the component's `sanitizer` world.
#[macro_export]
macro_rules! export_sanitizer {
    ($ty:ty) => {
        const _: () = {
            struct HeadshotSanitizerExport;
            impl $crate::bindings::sanitizer_world::exports::headshot::policy::meta::Guest
                for HeadshotSanitizerExport
            {
                fn info() -> $crate::PolicyInfo {
                    $crate::PolicyInfo {
                        name: <$ty as $crate::Sanitizer>::NAME.into(),
                        version: <$ty as $crate::Sanitizer>::VERSION.into(),
                        sdk_version: $crate::SDK_VERSION.into(),
                    }
                }
                fn configure(config_json: String) -> Result<(), String> {
                    $crate::__private::configure_sanitizer(&config_json)?;
                    <$ty as $crate::Sanitizer>::configure(&$crate::__private::custom_config())
                }
            }
            impl $crate::bindings::sanitizer_world::exports::headshot::policy::sanitization::Guest
                for HeadshotSanitizerExport
            {
                fn sanitize(prompt: String) -> $crate::sanitization::Sanitized {
                    <$ty as $crate::Sanitizer>::sanitize(&prompt)
                }
            }
            $crate::bindings::sanitizer_world::__export_sanitizer_impl!(
                HeadshotSanitizerExport with_types_in $crate::bindings::sanitizer_world
            );
            $crate::__sdk_version_section!();
        };
    };
}

/// Exports `$ty` (implementing [`Resilience`]) as the component's `resilience` world.
#[macro_export]
macro_rules! export_resilience {
    ($ty:ty) => {
        const _: () = {
            struct HeadshotResilienceExport;
            impl $crate::bindings::resilience_world::exports::headshot::policy::meta::Guest
                for HeadshotResilienceExport
            {
                fn info() -> $crate::PolicyInfo {
                    $crate::PolicyInfo {
                        name: <$ty as $crate::Resilience>::NAME.into(),
                        version: <$ty as $crate::Resilience>::VERSION.into(),
                        sdk_version: $crate::SDK_VERSION.into(),
                    }
                }
                fn configure(config_json: String) -> Result<(), String> {
                    $crate::__private::configure_resilience(&config_json)?;
                    <$ty as $crate::Resilience>::configure(&$crate::__private::custom_config())
                }
            }
            impl $crate::bindings::resilience_world::exports::headshot::policy::decisions::Guest
                for HeadshotResilienceExport
            {
                fn admit(
                    current: $crate::decisions::Breaker,
                    now_ms: u64,
                ) -> $crate::decisions::AdmitResult {
                    <$ty as $crate::Resilience>::admit(current, now_ms)
                }
                fn record_outcome(
                    current: $crate::decisions::Breaker,
                    seen: $crate::decisions::CallResult,
                    now_ms: u64,
                ) -> $crate::decisions::Breaker {
                    <$ty as $crate::Resilience>::record_outcome(current, seen, now_ms)
                }
                fn retry(
                    failed: $crate::decisions::Attempt,
                    jitter: f64,
                ) -> $crate::decisions::RetryDecision {
                    <$ty as $crate::Resilience>::retry(failed, jitter)
                }
            }
            $crate::bindings::resilience_world::__export_resilience_impl!(
                HeadshotResilienceExport with_types_in $crate::bindings::resilience_world
            );
            $crate::__sdk_version_section!();
        };
    };
}

/// Embeds [`crate::SDK_VERSION`] as the `headshot:sdk-version` custom section.
#[doc(hidden)]
#[macro_export]
macro_rules! __sdk_version_section {
    () => {
        #[cfg(target_family = "wasm")]
        #[used]
        #[unsafe(link_section = "headshot:sdk-version")]
        static HEADSHOT_SDK_VERSION: [u8; $crate::SDK_VERSION_LEN] = $crate::SDK_VERSION_BYTES;
    };
}
