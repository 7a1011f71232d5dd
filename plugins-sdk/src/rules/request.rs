//! Validation of a job's `input` JSON.
//!
//! Turns untrusted JSON into a typed [`Request`] with defaults applied, or into a list of
//! [`FieldError`]s naming every problem at once (clients fix everything in one round trip
//! instead of one error per submission).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One problem with one field of a job's input, in a shape clients can render next to the
/// offending field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// RFC 6901 JSON pointer to the offending value (e.g. `/input/width`), so clients can
    /// highlight it.
    pub field: String,
    /// Stable machine-readable code (`required`, `out_of_range`, ...) for clients to branch on.
    pub code: String,
    /// Short human explanation naming the field and the limit.
    pub message: String,
}

impl FieldError {
    /// Builds an error; `impl Into<String>` keeps call sites short.
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

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.field, self.message, self.code)
    }
}

/// Limits and defaults for [`validate_input`]; operators tune them per deployment (model
/// variant, GPU memory) without rebuilding the policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidatorConfig {
    /// Model variant, `"schnell"` or `"dev"`: decides the default steps and whether guidance
    /// exists at all.
    pub variant: String,
    /// Smallest accepted width and height in pixels.
    pub min_size: u32,
    /// Largest accepted width in pixels (bounds GPU memory per image).
    pub max_width: u32,
    /// Largest accepted height in pixels (bounds GPU memory per image).
    pub max_height: u32,
    /// Width used when the input gives none.
    pub default_width: u32,
    /// Height used when the input gives none.
    pub default_height: u32,
    /// Most denoising steps a job may ask for (bounds GPU time per image).
    pub max_steps: u32,
    /// Most images one job may ask for.
    pub max_num_images: u32,
    /// Largest guidance scale accepted for the dev variant.
    pub max_guidance: f32,
    /// Longest accepted prompt, in characters.
    pub max_prompt_chars: u32,
    /// The style presets the pipeline knows.
    pub styles: Vec<String>,
    /// Longest accepted user id, in characters (it becomes a storage path segment).
    pub max_user_id_chars: u32,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        Self {
            variant: "schnell".into(),
            min_size: 64,
            max_width: 1536,
            max_height: 1536,
            default_width: 1024,
            default_height: 1024,
            max_steps: 50,
            max_num_images: 4,
            max_guidance: 20.0,
            max_prompt_chars: 2000,
            styles: ["corporate", "casual", "studio", "outdoor"]
                .map(String::from)
                .to_vec(),
            max_user_id_chars: 64,
        }
    }
}

/// Default steps for FLUX.1-schnell, which is distilled for very few steps.
const SCHNELL_STEPS: u32 = 4;
/// Default steps for FLUX.1-dev.
const DEV_STEPS: u32 = 28;
/// Default guidance for FLUX.1-dev.
const DEV_GUIDANCE: f32 = 3.5;
/// Smallest guidance accepted for FLUX.1-dev.
const MIN_GUIDANCE: f64 = 1.0;

impl ValidatorConfig {
    /// Refuses configurations under which no request (or not even the defaults) could pass,
    /// so a typo fails at load time rather than on every job.
    pub fn check(&self) -> Result<(), String> {
        let default_steps = match self.variant.as_str() {
            "schnell" => SCHNELL_STEPS,
            "dev" => DEV_STEPS,
            _ => return Err("variant must be \"schnell\" or \"dev\"".into()),
        };
        if self.min_size == 0 {
            return Err("min_size must be >= 1".into());
        }
        let dims = [
            ("width", self.default_width, self.max_width),
            ("height", self.default_height, self.max_height),
        ];
        for (dim, default, max) in dims {
            if max < self.min_size {
                return Err(format!("max_{dim} must be >= min_size"));
            }
            if default % 16 != 0 {
                return Err(format!("default_{dim} must be a multiple of 16"));
            }
            if !(self.min_size..=max).contains(&default) {
                return Err(format!(
                    "default_{dim} must be between min_size and max_{dim}"
                ));
            }
        }
        if self.max_steps < default_steps {
            return Err(format!(
                "max_steps must be >= {default_steps} (the {} default)",
                self.variant
            ));
        }
        if self.max_num_images == 0 {
            return Err("max_num_images must be >= 1".into());
        }
        if !self.max_guidance.is_finite() || self.max_guidance < DEV_GUIDANCE {
            return Err(format!(
                "max_guidance must be a finite number >= {DEV_GUIDANCE}"
            ));
        }
        if self.max_prompt_chars == 0 {
            return Err("max_prompt_chars must be >= 1".into());
        }
        if self.max_user_id_chars == 0 {
            return Err("max_user_id_chars must be >= 1".into());
        }
        for (i, style) in self.styles.iter().enumerate() {
            if style.trim().is_empty() || self.styles.get(..i).unwrap_or_default().contains(style) {
                return Err(format!("styles[{i}] must be a non-empty, unique name"));
            }
        }
        Ok(())
    }

    fn is_dev(&self) -> bool {
        self.variant == "dev"
    }
}

/// A validated job input with every default applied, so the pipeline never re-derives them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Text prompt (as given; the sanitizer cleans it later).
    pub prompt: String,
    /// Owner of the job; safe to use as a storage path segment (see [`user_id_is_safe`]).
    pub user_id: String,
    /// Image width in pixels, a multiple of 16.
    pub width: u32,
    /// Image height in pixels, a multiple of 16.
    pub height: u32,
    /// How many images to generate.
    pub num_images: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale: always `None` for schnell (it has none), `Some` for dev.
    pub guidance: Option<f32>,
    /// Fixed seed for reproducible output, or `None` for a random one.
    pub seed: Option<u64>,
    /// Style preset, one of [`ValidatorConfig::styles`].
    pub style: Option<String>,
}

/// The input keys accepted, as listed in `unknown_field` messages.
pub const FIELDS: &[&str] = &[
    "prompt",
    "user_id",
    "style",
    "width",
    "height",
    "num_images",
    "steps",
    "guidance",
    "seed",
];

/// Accepted aliases as `(alias, canonical)`: the names other FLUX front ends use.
pub const ALIASES: &[(&str, &str)] = &[
    ("num_inference_steps", "steps"),
    ("guidance_scale", "guidance"),
];

/// Parses `input_json` and validates it with [`validate_value`]; malformed JSON is reported
/// as a single `/input` error with code `invalid_json`.
pub fn validate_input(input_json: &str, cfg: &ValidatorConfig) -> Result<Request, Vec<FieldError>> {
    match serde_json::from_str::<Value>(input_json) {
        Ok(value) => validate_value(&value, cfg),
        Err(e) => Err(vec![FieldError::new(
            "/input",
            "invalid_json",
            format!("input is not valid JSON: {e}"),
        )]),
    }
}

/// Validates a job's `input` object, collecting every problem rather than stopping at the
/// first. `null` for an optional field means "absent" (use the default).
pub fn validate_value(input: &Value, cfg: &ValidatorConfig) -> Result<Request, Vec<FieldError>> {
    let Some(obj) = input.as_object() else {
        let msg = format!("input must be a JSON object (got {})", describe(input));
        return Err(vec![FieldError::new("/input", "not_object", msg)]);
    };
    let mut errs = Vec::new();
    let e = &mut errs;

    let prompt = required_string(e, obj, "prompt");
    if let Some(p) = &prompt {
        check_prompt(e, p, cfg);
    }
    let user_id = required_string(e, obj, "user_id");
    if let Some(u) = &user_id {
        check_user_id(e, u, cfg);
    }
    let style = present(obj, "style").and_then(|v| match v.as_str() {
        Some(s) => check_style(e, s, cfg).then(|| s.to_owned()),
        None => type_error(e, "style", "a string", v),
    });
    let width = present(obj, "width").map_or(Some(cfg.default_width), |v| {
        integer_or_error(e, "width", v).and_then(|n| check_dim(e, "width", n, cfg.max_width, cfg))
    });
    let height = present(obj, "height").map_or(Some(cfg.default_height), |v| {
        integer_or_error(e, "height", v)
            .and_then(|n| check_dim(e, "height", n, cfg.max_height, cfg))
    });
    let num_images = present(obj, "num_images").map_or(Some(1), |v| {
        integer_or_error(e, "num_images", v)
            .and_then(|n| check_range(e, "num_images", n, 1, cfg.max_num_images))
    });
    let default_steps = if cfg.is_dev() {
        DEV_STEPS
    } else {
        SCHNELL_STEPS
    };
    let steps =
        aliased(e, obj, "steps", "num_inference_steps").map_or(Some(default_steps), |(key, v)| {
            integer_or_error(e, key, v).and_then(|n| check_range(e, key, n, 1, cfg.max_steps))
        });
    let guidance = match (cfg.is_dev(), aliased(e, obj, "guidance", "guidance_scale")) {
        (false, None) => Some(None),
        (false, Some((key, _))) => {
            e.push(not_supported(key));
            None
        }
        (true, None) => Some(Some(DEV_GUIDANCE)),
        (true, Some((key, v))) => match v.as_f64() {
            Some(g) => check_guidance(e, key, g, cfg).then_some(Some(g as f32)),
            None => type_error(e, key, "a number", v),
        },
    };
    let seed = present(obj, "seed").map_or(Some(None), |v| {
        let n = integer_or_error(e, "seed", v)?;
        let seed = u64::try_from(n).ok();
        if seed.is_none() {
            let msg = format!("seed must be between 0 and {} (got {n})", u64::MAX);
            e.push(FieldError::new("/input/seed", "out_of_range", msg));
        }
        seed.map(Some)
    });
    for key in obj.keys() {
        if !FIELDS.contains(&key.as_str()) && !ALIASES.iter().any(|(a, _)| a == key) {
            e.push(unknown_field(key));
        }
    }

    match (
        prompt, user_id, width, height, num_images, steps, guidance, seed,
    ) {
        (
            Some(prompt),
            Some(user_id),
            Some(width),
            Some(height),
            Some(num_images),
            Some(steps),
            Some(guidance),
            Some(seed),
        ) if errs.is_empty() => Ok(Request {
            prompt,
            user_id,
            width,
            height,
            num_images,
            steps,
            guidance,
            seed,
            style,
        }),
        _ => Err(errs),
    }
}

/// Whether `user_id` is safe as a storage path segment: 1..=`max_chars` ASCII letters,
/// digits, `_` or `-`, starting with a letter or digit. This rules out `.`/`..`, path
/// separators, whitespace and look-alike Unicode.
pub fn user_id_is_safe(user_id: &str, max_chars: usize) -> bool {
    let bytes = user_id.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.len() <= max_chars
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Re-checks a typed [`Request`] against the same bounds as [`validate_value`]; the host runs
/// it on a custom policy's output as defence in depth. Empty means valid. For dev,
/// `guidance: None` passes (the pipeline default applies).
pub fn check_request(req: &Request, cfg: &ValidatorConfig) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let e = &mut errs;
    check_prompt(e, &req.prompt, cfg);
    check_user_id(e, &req.user_id, cfg);
    check_dim(e, "width", req.width.into(), cfg.max_width, cfg);
    check_dim(e, "height", req.height.into(), cfg.max_height, cfg);
    check_range(
        e,
        "num_images",
        req.num_images.into(),
        1,
        cfg.max_num_images,
    );
    check_range(e, "steps", req.steps.into(), 1, cfg.max_steps);
    match (cfg.is_dev(), req.guidance) {
        (false, Some(_)) => e.push(not_supported("guidance")),
        (true, Some(g)) => {
            check_guidance(e, "guidance", g.into(), cfg);
        }
        (_, None) => {}
    }
    if let Some(style) = &req.style {
        check_style(e, style, cfg);
    }
    errs
}

/// `/input/<key>` for a known key (no escaping needed).
fn ptr(key: &str) -> String {
    format!("/input/{key}")
}

/// The value of `key` unless it is missing or `null`.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// Short description of a JSON value for messages; never echoes (possibly huge) strings.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Records an `invalid_type` error; returns `None` so callers can use it as the failed value.
fn type_error<T>(errs: &mut Vec<FieldError>, key: &str, want: &str, v: &Value) -> Option<T> {
    let msg = format!("{key} must be {want} (got {})", describe(v));
    errs.push(FieldError::new(ptr(key), "invalid_type", msg));
    None
}

fn required_string(
    errs: &mut Vec<FieldError>,
    obj: &Map<String, Value>,
    key: &str,
) -> Option<String> {
    match present(obj, key) {
        None => {
            errs.push(FieldError::new(
                ptr(key),
                "required",
                format!("{key} is required"),
            ));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => type_error(errs, key, "a string", v),
    }
}

/// Reads a JSON integer (an integral float such as `512.0` is accepted) as `i128`, wide
/// enough that range checks never overflow; `None` for non-integers.
fn integer(v: &Value) -> Option<i128> {
    if let Some(n) = v.as_u64() {
        return Some(n.into());
    }
    if let Some(n) = v.as_i64() {
        return Some(n.into());
    }
    let f = v.as_f64()?;
    // `as` saturates, so absurd floats land out of range instead of wrapping.
    (f.is_finite() && f.fract() == 0.0).then_some(f as i128)
}

fn integer_or_error(errs: &mut Vec<FieldError>, key: &str, v: &Value) -> Option<i128> {
    integer(v).or_else(|| type_error(errs, key, "an integer", v))
}

/// Picks `canonical` or its alias; giving both is a `conflict` reported on the alias.
fn aliased<'a>(
    errs: &mut Vec<FieldError>,
    obj: &'a Map<String, Value>,
    canonical: &'static str,
    alias: &'static str,
) -> Option<(&'static str, &'a Value)> {
    match (present(obj, canonical), present(obj, alias)) {
        (Some(v), Some(_)) => {
            let msg = format!("give either {canonical} or {alias}, not both");
            errs.push(FieldError::new(ptr(alias), "conflict", msg));
            Some((canonical, v))
        }
        (Some(v), None) => Some((canonical, v)),
        (None, Some(v)) => Some((alias, v)),
        (None, None) => None,
    }
}

fn check_prompt(errs: &mut Vec<FieldError>, prompt: &str, cfg: &ValidatorConfig) {
    let chars = prompt.chars().count();
    if prompt.trim().is_empty() {
        errs.push(FieldError::new(
            ptr("prompt"),
            "empty",
            "prompt must not be empty",
        ));
    } else if chars > cfg.max_prompt_chars as usize {
        let msg = format!(
            "prompt must be at most {} characters (got {chars})",
            cfg.max_prompt_chars
        );
        errs.push(FieldError::new(ptr("prompt"), "too_long", msg));
    }
}

fn check_user_id(errs: &mut Vec<FieldError>, user_id: &str, cfg: &ValidatorConfig) {
    if !user_id_is_safe(user_id, cfg.max_user_id_chars as usize) {
        let msg = format!(
            "user_id must be 1 to {} characters of A-Z, a-z, 0-9, '_' or '-', starting with a letter or digit",
            cfg.max_user_id_chars
        );
        errs.push(FieldError::new(ptr("user_id"), "invalid_format", msg));
    }
}

fn check_style(errs: &mut Vec<FieldError>, style: &str, cfg: &ValidatorConfig) -> bool {
    let ok = cfg.styles.iter().any(|s| s == style);
    if !ok {
        let msg = format!("style must be one of: {}", cfg.styles.join(", "));
        errs.push(FieldError::new(ptr("style"), "unknown_style", msg));
    }
    ok
}

/// Checks `lo <= n <= hi`, returning the value as `u32` when it is in range.
fn check_range(errs: &mut Vec<FieldError>, key: &str, n: i128, lo: u32, hi: u32) -> Option<u32> {
    if (i128::from(lo)..=i128::from(hi)).contains(&n) {
        return u32::try_from(n).ok();
    }
    let msg = format!("{key} must be between {lo} and {hi} (got {n})");
    errs.push(FieldError::new(ptr(key), "out_of_range", msg));
    None
}

/// Image dimensions: a multiple of 16 (the latent patch size) within `min_size..=max`.
fn check_dim(
    errs: &mut Vec<FieldError>,
    key: &str,
    n: i128,
    max: u32,
    cfg: &ValidatorConfig,
) -> Option<u32> {
    let multiple = n % 16 == 0;
    if !multiple {
        let msg = format!("{key} must be a multiple of 16 (got {n})");
        errs.push(FieldError::new(ptr(key), "not_multiple_of_16", msg));
    }
    let value = check_range(errs, key, n, cfg.min_size, max);
    value.filter(|_| multiple)
}

fn check_guidance(errs: &mut Vec<FieldError>, key: &str, g: f64, cfg: &ValidatorConfig) -> bool {
    let max = f64::from(cfg.max_guidance);
    let ok = g.is_finite() && (MIN_GUIDANCE..=max).contains(&g);
    if !ok {
        let msg = format!("{key} must be between {MIN_GUIDANCE} and {max} (got {g})");
        errs.push(FieldError::new(ptr(key), "out_of_range", msg));
    }
    ok
}

fn not_supported(key: &str) -> FieldError {
    let msg = format!("{key} is not supported by FLUX.1-schnell (it has no guidance); omit it");
    FieldError::new(ptr(key), "not_supported", msg)
}

fn unknown_field(key: &str) -> FieldError {
    let escaped = key.replace('~', "~0").replace('/', "~1");
    let shown: String = key.chars().take(64).collect();
    let accepted: Vec<&str> = FIELDS
        .iter()
        .chain(ALIASES.iter().map(|(a, _)| a))
        .copied()
        .collect();
    let msg = format!(
        "unknown field \"{shown}\"; accepted fields: {}",
        accepted.join(", ")
    );
    FieldError::new(format!("/input/{escaped}"), "unknown_field", msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schnell() -> ValidatorConfig {
        ValidatorConfig::default()
    }

    fn dev() -> ValidatorConfig {
        ValidatorConfig {
            variant: "dev".into(),
            ..ValidatorConfig::default()
        }
    }

    fn ok(v: Value, cfg: &ValidatorConfig) -> Request {
        match validate_value(&v, cfg) {
            Ok(r) => r,
            Err(e) => panic!("expected valid, got {e:?}"),
        }
    }

    fn errs(v: Value, cfg: &ValidatorConfig) -> Vec<FieldError> {
        match validate_value(&v, cfg) {
            Ok(r) => panic!("expected errors, got {r:?}"),
            Err(e) => e,
        }
    }

    /// Base valid input with `extra` merged in.
    fn with(extra: Value) -> Value {
        let mut base = json!({"prompt": "a portrait", "user_id": "u1"});
        if let (Some(b), Some(x)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(x.clone());
        }
        base
    }

    /// `(field, code)` pairs, for compact assertions.
    fn codes(e: &[FieldError]) -> Vec<(&str, &str)> {
        e.iter()
            .map(|e| (e.field.as_str(), e.code.as_str()))
            .collect()
    }

    fn one(extra: Value, cfg: &ValidatorConfig) -> FieldError {
        let e = errs(with(extra), cfg);
        assert_eq!(e.len(), 1, "{e:?}");
        e[0].clone()
    }

    #[test]
    fn defaults_for_schnell() {
        let r = ok(with(json!({})), &schnell());
        let want = Request {
            prompt: "a portrait".into(),
            user_id: "u1".into(),
            width: 1024,
            height: 1024,
            num_images: 1,
            steps: 4,
            guidance: None,
            seed: None,
            style: None,
        };
        assert_eq!(r, want);
    }

    #[test]
    fn defaults_for_dev() {
        let r = ok(with(json!({})), &dev());
        assert_eq!((r.steps, r.guidance), (28, Some(3.5)));
    }

    #[test]
    fn all_fields_accepted() {
        let r = ok(
            with(
                json!({"width": 512, "height": 768, "num_images": 4, "steps": 50,
                        "guidance": 7, "seed": 42, "style": "studio"}),
            ),
            &dev(),
        );
        assert_eq!(
            (r.width, r.height, r.num_images, r.steps),
            (512, 768, 4, 50)
        );
        assert_eq!(
            (r.guidance, r.seed, r.style.as_deref()),
            (Some(7.0), Some(42), Some("studio"))
        );
    }

    #[test]
    fn nulls_mean_absent() {
        let r = ok(
            with(
                json!({"width": null, "height": null, "num_images": null, "steps": null,
                        "guidance": null, "seed": null, "style": null}),
            ),
            &schnell(),
        );
        assert_eq!(r, ok(with(json!({})), &schnell()));
    }

    #[test]
    fn invalid_json_and_not_object() {
        let e = validate_input("{\"prompt\": ", &schnell()).unwrap_err();
        assert_eq!(codes(&e), [("/input", "invalid_json")]);
        for v in [json!([1]), json!("x"), json!(null), json!(3)] {
            assert_eq!(codes(&errs(v, &schnell())), [("/input", "not_object")]);
        }
        let r = validate_input(r#"{"prompt":"p","user_id":"a"}"#, &schnell()).unwrap();
        assert_eq!(r.prompt, "p");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = validate_input(&deep, &schnell()).unwrap_err();
        assert_eq!(e[0].code, "invalid_json");
    }

    #[test]
    fn collects_every_error() {
        let e = errs(
            json!({"user_id": "../etc", "width": 500, "height": 2000, "num_images": 0,
                   "steps": 51, "guidance": 2.0, "seed": -1, "style": "anime", "nsfw": true}),
            &schnell(),
        );
        assert_eq!(
            codes(&e),
            [
                ("/input/prompt", "required"),
                ("/input/user_id", "invalid_format"),
                ("/input/style", "unknown_style"),
                ("/input/width", "not_multiple_of_16"),
                ("/input/height", "out_of_range"),
                ("/input/num_images", "out_of_range"),
                ("/input/steps", "out_of_range"),
                ("/input/guidance", "not_supported"),
                ("/input/seed", "out_of_range"),
                ("/input/nsfw", "unknown_field"),
            ]
        );
    }

    #[test]
    fn prompt_rules() {
        let e = errs(json!({"user_id": "u"}), &schnell());
        assert_eq!(codes(&e), [("/input/prompt", "required")]);
        let e = errs(json!({"user_id": "u", "prompt": null}), &schnell());
        assert_eq!(codes(&e), [("/input/prompt", "required")]);
        assert_eq!(one(json!({"prompt": 5}), &schnell()).code, "invalid_type");
        assert_eq!(one(json!({"prompt": " \n\t "}), &schnell()).code, "empty");
        assert_eq!(one(json!({"prompt": ""}), &schnell()).code, "empty");
        // Counted in characters, not bytes.
        ok(with(json!({"prompt": "é".repeat(2000)})), &schnell());
        let e = one(json!({"prompt": "é".repeat(2001)}), &schnell());
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            (
                "too_long",
                "prompt must be at most 2000 characters (got 2001)"
            )
        );
    }

    #[test]
    fn user_id_pattern() {
        for good in ["a", "A9", "9", "user_1-x", "a-", &"x".repeat(64)] {
            assert!(user_id_is_safe(good, 64), "{good}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            ".",
            "..",
            "a.b",
            "a/b",
            "a\\b",
            "a b",
            "a\n",
            "é",
            "ａ",
            &"x".repeat(65),
        ] {
            assert!(!user_id_is_safe(bad, 64), "{bad:?}");
        }
        assert!(!user_id_is_safe("a", 0));
        let e = one(json!({"user_id": "a/../b"}), &schnell());
        assert_eq!(e.code, "invalid_format");
        assert!(
            e.message.contains("64") && e.message.contains("'_'"),
            "{}",
            e.message
        );
        assert_eq!(one(json!({"user_id": 7}), &schnell()).code, "invalid_type");
        let e = errs(json!({"prompt": "p"}), &schnell());
        assert_eq!(codes(&e), [("/input/user_id", "required")]);
    }

    #[test]
    fn dimensions() {
        let r = ok(with(json!({"width": 512.0, "height": 64})), &schnell());
        assert_eq!((r.width, r.height), (512, 64));
        ok(with(json!({"width": 1536, "height": 1536})), &schnell());
        let e = one(json!({"width": 500}), &schnell());
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            (
                "not_multiple_of_16",
                "width must be a multiple of 16 (got 500)"
            )
        );
        let e = one(json!({"height": 2048}), &schnell());
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            (
                "out_of_range",
                "height must be between 64 and 1536 (got 2048)"
            )
        );
        for v in [
            json!(0),
            json!(48),
            json!(-16),
            json!(1552),
            json!(1e30),
            json!(u64::MAX),
        ] {
            let e = errs(with(json!({ "width": v })), &schnell());
            assert!(
                codes(&e).contains(&("/input/width", "out_of_range")),
                "{v}: {e:?}"
            );
        }
        for v in [
            json!("512"),
            json!(512.5),
            json!(true),
            json!([512]),
            json!({}),
        ] {
            assert_eq!(
                one(json!({ "width": v }), &schnell()).code,
                "invalid_type",
                "{v}"
            );
        }
        // Both problems at once are both reported.
        let e = errs(with(json!({"height": 1601})), &schnell());
        assert_eq!(
            codes(&e),
            [
                ("/input/height", "not_multiple_of_16"),
                ("/input/height", "out_of_range")
            ]
        );
    }

    #[test]
    fn num_images() {
        assert_eq!(ok(with(json!({"num_images": 4})), &schnell()).num_images, 4);
        for n in [0, 5, -1] {
            let e = one(json!({ "num_images": n }), &schnell());
            assert_eq!(e.code, "out_of_range");
        }
        assert!(
            one(json!({"num_images": 9}), &schnell())
                .message
                .contains("between 1 and 4")
        );
    }

    #[test]
    fn steps_and_alias() {
        assert_eq!(
            ok(with(json!({"num_inference_steps": 8})), &schnell()).steps,
            8
        );
        assert_eq!(
            ok(
                with(json!({"steps": 8, "num_inference_steps": null})),
                &schnell()
            )
            .steps,
            8
        );
        let e = one(json!({"steps": 8, "num_inference_steps": 9}), &schnell());
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("/input/num_inference_steps", "conflict")
        );
        for n in [0, 51] {
            assert_eq!(one(json!({ "steps": n }), &schnell()).code, "out_of_range");
        }
        let e = one(json!({"num_inference_steps": 0}), &schnell());
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("/input/num_inference_steps", "out_of_range")
        );
        assert_eq!(one(json!({"steps": 4.5}), &schnell()).code, "invalid_type");
    }

    #[test]
    fn guidance_schnell_not_supported() {
        let e = one(json!({"guidance": 3.5}), &schnell());
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("/input/guidance", "not_supported")
        );
        assert!(e.message.contains("FLUX.1-schnell"));
        let e = one(json!({"guidance_scale": 0}), &schnell());
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("/input/guidance_scale", "not_supported")
        );
        assert_eq!(
            ok(with(json!({"guidance_scale": null})), &schnell()).guidance,
            None
        );
    }

    #[test]
    fn guidance_dev() {
        assert_eq!(
            ok(with(json!({"guidance_scale": 1})), &dev()).guidance,
            Some(1.0)
        );
        assert_eq!(
            ok(with(json!({"guidance": 20.0})), &dev()).guidance,
            Some(20.0)
        );
        for g in [json!(0.5), json!(0), json!(-3), json!(20.5)] {
            let e = one(json!({ "guidance": g }), &dev());
            assert_eq!(e.code, "out_of_range", "{g}");
            assert!(e.message.contains("between 1 and 20"), "{}", e.message);
        }
        assert_eq!(one(json!({"guidance": "7"}), &dev()).code, "invalid_type");
        let e = one(json!({"guidance": 3, "guidance_scale": 4}), &dev());
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("/input/guidance_scale", "conflict")
        );
    }

    #[test]
    fn seed() {
        assert_eq!(ok(with(json!({"seed": 0})), &schnell()).seed, Some(0));
        assert_eq!(
            ok(with(json!({"seed": u64::MAX})), &schnell()).seed,
            Some(u64::MAX)
        );
        assert_eq!(ok(with(json!({"seed": 42.0})), &schnell()).seed, Some(42));
        assert_eq!(one(json!({"seed": -1}), &schnell()).code, "out_of_range");
        assert_eq!(one(json!({"seed": 1e20}), &schnell()).code, "out_of_range");
        for v in [json!(1.5), json!("42"), json!(false)] {
            assert_eq!(
                one(json!({ "seed": v }), &schnell()).code,
                "invalid_type",
                "{v}"
            );
        }
    }

    #[test]
    fn style() {
        assert_eq!(
            ok(with(json!({"style": "outdoor"})), &schnell())
                .style
                .as_deref(),
            Some("outdoor")
        );
        let e = one(json!({"style": "Studio"}), &schnell());
        assert_eq!(e.code, "unknown_style");
        assert_eq!(
            e.message,
            "style must be one of: corporate, casual, studio, outdoor"
        );
        assert_eq!(one(json!({"style": 1}), &schnell()).code, "invalid_type");
    }

    #[test]
    fn unknown_fields_are_escaped_and_listed() {
        let e = one(json!({"a/b~c": 1}), &schnell());
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("/input/a~1b~0c", "unknown_field")
        );
        assert!(e.message.contains("\"a/b~c\""));
        assert!(
            e.message.contains("prompt, user_id, style") && e.message.contains("guidance_scale")
        );
        // Even null unknown keys are reported: they are likely typos.
        assert_eq!(
            one(json!({"widht": null}), &schnell()).field,
            "/input/widht"
        );
        // A huge key is not echoed in full.
        let e = one(json!({ "k".repeat(10_000): 1 }), &schnell());
        assert!(e.message.len() < 400);
    }

    #[test]
    fn check_request_same_bounds() {
        let good = ok(with(json!({"style": "casual"})), &schnell());
        assert!(check_request(&good, &schnell()).is_empty());
        let bad = Request {
            prompt: " ".into(),
            user_id: "a b".into(),
            width: 1000,
            height: 4096,
            num_images: 0,
            steps: 0,
            guidance: Some(3.5),
            seed: Some(1),
            style: Some("anime".into()),
        };
        assert_eq!(
            codes(&check_request(&bad, &schnell())),
            [
                ("/input/prompt", "empty"),
                ("/input/user_id", "invalid_format"),
                ("/input/width", "not_multiple_of_16"),
                ("/input/height", "out_of_range"),
                ("/input/num_images", "out_of_range"),
                ("/input/steps", "out_of_range"),
                ("/input/guidance", "not_supported"),
                ("/input/style", "unknown_style"),
            ]
        );
        let d = ok(with(json!({})), &dev());
        assert!(check_request(&d, &dev()).is_empty());
        let none = Request {
            guidance: None,
            ..d.clone()
        };
        assert!(check_request(&none, &dev()).is_empty());
        for g in [f32::NAN, f32::INFINITY, 0.0, 21.0] {
            let r = Request {
                guidance: Some(g),
                ..d.clone()
            };
            assert_eq!(
                codes(&check_request(&r, &dev())),
                [("/input/guidance", "out_of_range")]
            );
        }
        let long = Request {
            prompt: "x".repeat(2001),
            ..d.clone()
        };
        assert_eq!(
            codes(&check_request(&long, &dev())),
            [("/input/prompt", "too_long")]
        );
    }

    #[test]
    fn config_check() {
        assert_eq!(schnell().check(), Ok(()));
        assert_eq!(dev().check(), Ok(()));
        type Mutate = fn(&mut ValidatorConfig);
        let cases: [(Mutate, &str); 12] = [
            (|c| c.variant = "pro".into(), "variant"),
            (|c| c.min_size = 0, "min_size"),
            (|c| c.max_width = 32, "max_width must be >= min_size"),
            (|c| c.max_height = 32, "max_height must be >= min_size"),
            (
                |c| c.default_width = 1000,
                "default_width must be a multiple of 16",
            ),
            (
                |c| c.default_height = 2048,
                "default_height must be between",
            ),
            (|c| c.max_steps = 3, "max_steps"),
            (|c| c.max_num_images = 0, "max_num_images"),
            (|c| c.max_guidance = f32::NAN, "max_guidance"),
            (|c| c.max_prompt_chars = 0, "max_prompt_chars"),
            (|c| c.max_user_id_chars = 0, "max_user_id_chars"),
            (|c| c.styles.push("studio".into()), "styles[4]"),
        ];
        for (mutate, want) in cases {
            let mut c = schnell();
            mutate(&mut c);
            let got = c.check().unwrap_err();
            assert!(got.contains(want), "{got} should mention {want}");
        }
        let mut d = dev();
        d.max_steps = 27;
        assert!(d.check().unwrap_err().contains("max_steps must be >= 28"));
    }

    #[test]
    fn config_serde() {
        let c: ValidatorConfig =
            serde_json::from_value(json!({"variant": "dev", "max_steps": 40})).unwrap();
        assert_eq!(
            c,
            ValidatorConfig {
                max_steps: 40,
                ..dev()
            }
        );
        assert!(serde_json::from_value::<ValidatorConfig>(json!({"max_stpes": 4})).is_err());
        let back: ValidatorConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let r = ok(with(json!({"seed": 7})), &schnell());
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let fe = FieldError::new("/input/x", "c", "m");
        assert_eq!(
            serde_json::to_value(&fe).unwrap(),
            json!({"field": "/input/x", "code": "c", "message": "m"})
        );
        assert_eq!(fe.to_string(), "/input/x: m (c)");
    }

    /// Deterministic fuzz over odd JSON values: never panics, and anything accepted also
    /// passes [`check_request`].
    #[test]
    fn fuzz_never_panics() {
        let values = [
            json!(null),
            json!(true),
            json!(-1),
            json!(0),
            json!(16),
            json!(512),
            json!(1e300),
            json!(-0.0),
            json!(3.5),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(""),
            json!("studio"),
            json!("u1"),
            json!([]),
            json!({}),
        ];
        let keys = [
            "prompt",
            "user_id",
            "style",
            "width",
            "height",
            "num_images",
            "steps",
            "num_inference_steps",
            "guidance",
            "guidance_scale",
            "seed",
            "x/~",
        ];
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize
        };
        for cfg in [schnell(), dev()] {
            for _ in 0..3000 {
                let mut obj = Map::new();
                for _ in 0..next() % 8 {
                    obj.insert(
                        keys[next() % keys.len()].into(),
                        values[next() % values.len()].clone(),
                    );
                }
                match validate_value(&Value::Object(obj), &cfg) {
                    Ok(r) => assert_eq!(check_request(&r, &cfg), []),
                    Err(e) => assert!(!e.is_empty()),
                }
            }
        }
    }
}
