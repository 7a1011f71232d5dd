//! A validator that attacks its host, for the containment tests.
//!
//! The attack is chosen by the `custom` config (`{"always": "loop"}` attacks on every call,
//! so conformance must refuse it) or per call by a prompt of the form `attack:<name>`, so an
//! activated module can be made to misbehave on some inputs only.

use std::sync::atomic::{AtomicU8, Ordering};

use headshot_plugin_sdk::{FieldError, GenerationRequest, Validator, standard_request};

static ALWAYS: AtomicU8 = AtomicU8::new(0);

const ATTACKS: &[&str] = &["none", "loop", "memory", "recursion", "huge-output", "trap", "reject-all", "log-spam", "panic"];

fn attack_code(name: &str) -> u8 {
    ATTACKS.iter().position(|a| *a == name).unwrap_or(0) as u8
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64, sink: &mut [u64; 16]) -> u64 {
    sink[(depth % 16) as usize] = depth;
    let below = recurse(depth.wrapping_add(1), sink);
    below.wrapping_add(sink[(depth % 7) as usize])
}

fn run_attack(code: u8, req: GenerationRequest) -> Result<GenerationRequest, Vec<FieldError>> {
    match ATTACKS.get(code as usize).copied().unwrap_or("none") {
        "loop" => {
            let mut x: u64 = 1;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "memory" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "recursion" => {
            let mut sink = [0u64; 16];
            let v = recurse(0, &mut sink);
            Err(vec![FieldError::new("/input", "unreachable", v.to_string())])
        }
        "huge-output" => Err(vec![FieldError::new("/input/prompt", "huge", "x".repeat(16 << 20))]),
        "trap" => std::process::abort(),
        "panic" => panic!("a hostile panic with its reason"),
        "reject-all" => Err(vec![FieldError::new("/input", "rejected", "this policy rejects everything")]),
        "log-spam" => {
            for i in 0..2_000 {
                headshot_plugin_sdk::info(&format!("spam line {i}"));
            }
            Ok(req)
        }
        _ => Ok(req),
    }
}

struct Hostile;

impl Validator for Hostile {
    const NAME: &'static str = "hostile-validator";

    fn configure(custom_json: &str) -> Result<(), String> {
        let marker = "\"always\":\"";
        let compact: String = custom_json.chars().filter(|c| !c.is_whitespace()).collect();
        if let Some(start) = compact.find(marker) {
            let rest = &compact[start + marker.len()..];
            let name = rest.split('"').next().unwrap_or("none");
            ALWAYS.store(attack_code(name), Ordering::Relaxed);
        }
        Ok(())
    }

    fn validate(input_json: &str) -> Result<GenerationRequest, Vec<FieldError>> {
        let always = ALWAYS.load(Ordering::Relaxed);
        if always != 0 {
            let req = standard_request(input_json).unwrap_or(GenerationRequest {
                prompt: String::new(),
                user_id: String::new(),
                width: 0,
                height: 0,
                num_images: 0,
                steps: 0,
                guidance: None,
                seed: None,
                style: None,
            });
            return run_attack(always, req);
        }
        let req = standard_request(input_json)?;
        let code = req.prompt.strip_prefix("attack:").map(attack_code).unwrap_or(0);
        run_attack(code, req)
    }
}

headshot_plugin_sdk::export_validator!(Hostile);
