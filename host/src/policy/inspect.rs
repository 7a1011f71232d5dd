//! Static checks on uploaded bytes before anything runs: is it a component, what does it
//! import, which SDK built it.

use wasmparser::{Parser, Payload};

use super::error::UploadError;

/// Import name prefixes a policy may have. `headshot:policy/*` is the world's own interface;
/// the WASI cli/io interfaces are what Rust std links on `wasm32-wasip2` and are defined as
/// traps, so a policy gets no filesystem, network, clock, randomness or environment.
const ALLOWED_IMPORTS: &[&str] = &[
    "headshot:policy/host@0.",
    "headshot:policy/types@0.",
    "wasi:cli/",
    "wasi:io/",
];

/// What the bytes say about themselves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inspection {
    /// Content of the `headshot:sdk-version` custom section, if present.
    pub sdk_version: Option<String>,
}

/// Refuses precompiled code, core modules and garbage; reads the SDK version section.
pub fn inspect(bytes: &[u8]) -> Result<Inspection, UploadError> {
    if wasmtime::Engine::detect_precompiled(bytes).is_some() {
        return Err(UploadError::NotAComponent(
            "this is precompiled native code (.cwasm); upload the .wasm component".into(),
        ));
    }
    if !Parser::is_component(bytes) {
        let why = if Parser::is_core_wasm(bytes) {
            "this is a core wasm module; build the policy with `--target wasm32-wasip2` so it is a component"
        } else {
            "the bytes do not start with the WebAssembly component header"
        };
        return Err(UploadError::NotAComponent(why.into()));
    }
    let mut sdk_version = None;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| UploadError::NotAComponent(e.to_string()))?;
        if let Payload::CustomSection(reader) = payload
            && reader.name() == headshot_plugin_sdk::SDK_VERSION_SECTION
        {
            sdk_version = Some(String::from_utf8_lossy(reader.data()).into_owned());
        }
    }
    if let Some(found) = &sdk_version
        && !sdk_compatible(found, headshot_plugin_sdk::SDK_VERSION)
    {
        return Err(UploadError::IncompatibleSdk {
            found: found.clone(),
            supported: headshot_plugin_sdk::SDK_VERSION.into(),
        });
    }
    Ok(Inspection { sdk_version })
}

/// Semver compatibility: same major, or same minor while the major is 0.
pub fn sdk_compatible(found: &str, ours: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> {
        v.split('.')
            .take(2)
            .map(|p| p.parse().unwrap_or(u64::MAX))
            .collect()
    };
    let (f, o) = (parts(found), parts(ours));
    match (f.as_slice(), o.as_slice()) {
        ([0, fm], [0, om]) => fm == om,
        ([fmaj, ..], [omaj, ..]) => fmaj == omaj && *fmaj != 0,
        _ => false,
    }
}

/// Every import outside the allow-list, comma-separated; `None` when all are allowed.
pub fn forbidden_import<'a>(imports: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let bad: Vec<&str> = imports
        .into_iter()
        .filter(|name| !ALLOWED_IMPORTS.iter().any(|p| name.starts_with(p)))
        .collect();
    (!bad.is_empty()).then(|| bad.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_core_modules_are_named() {
        let err = inspect(b"hello world").unwrap_err().to_string();
        assert!(err.contains("component header"), "{err}");
        let core = b"\0asm\x01\0\0\0";
        let err = inspect(core).unwrap_err().to_string();
        assert!(err.contains("core wasm module"), "{err}");
    }

    #[test]
    fn sdk_versions_follow_semver() {
        assert!(sdk_compatible("0.1.0", "0.1.3"));
        assert!(!sdk_compatible("0.2.0", "0.1.0"));
        assert!(sdk_compatible("1.4.0", "1.0.0"));
        assert!(!sdk_compatible("2.0.0", "1.0.0"));
        assert!(!sdk_compatible("nonsense", "0.1.0"));
    }

    #[test]
    fn allow_list() {
        assert_eq!(
            forbidden_import([
                "wasi:cli/stderr@0.2.6",
                "wasi:io/streams@0.2.6",
                "headshot:policy/host@0.1.0"
            ]),
            None
        );
        assert_eq!(
            forbidden_import(["wasi:io/error@0.2.6", "wasi:filesystem/types@0.2.6"]).as_deref(),
            Some("wasi:filesystem/types@0.2.6")
        );
        assert!(forbidden_import(["wasi:sockets/tcp@0.2.0"]).is_some());
        assert!(forbidden_import(["wasi:clocks/wall-clock@0.2.0"]).is_some());
        assert!(forbidden_import(["wasi:random/random@0.2.0"]).is_some());
    }
}
