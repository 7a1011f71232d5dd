//! Generation parameters: what a caller asks for, and the checked form the pipeline runs.

use serde::{Deserialize, Serialize};

use super::error::GenerateError;
use super::variant::Variant;

/// Bounds a request must stay within; they come from the `[model]` config section.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Smallest accepted width/height.
    pub min_size: u32,
    /// Largest accepted width.
    pub max_width: u32,
    /// Largest accepted height.
    pub max_height: u32,
    /// Largest step count.
    pub max_steps: u32,
    /// Largest batch.
    pub max_num_images: u32,
    /// Largest guidance value.
    pub max_guidance: f64,
    /// Longest prompt, in characters.
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            min_size: 64,
            max_width: 1536,
            max_height: 1536,
            max_steps: 50,
            max_num_images: 4,
            max_guidance: 20.0,
            max_prompt_chars: 2000,
        }
    }
}

/// What a caller asks for. `None` means "the variant's default" (or a random seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// The text prompt (already styled and sanitized by the caller).
    pub prompt: String,
    /// Image width in pixels, a multiple of 16.
    pub width: u32,
    /// Image height in pixels, a multiple of 16.
    pub height: u32,
    /// Denoising steps; default by variant.
    pub steps: Option<u32>,
    /// Guidance (FLUX.1-dev only); default by variant.
    pub guidance: Option<f64>,
    /// Seed of the first image; image `i` uses `seed + i`. Random when absent.
    pub seed: Option<u64>,
    /// Images generated together in one batch.
    pub num_images: u32,
}

impl GenerationParams {
    /// A request with the variant defaults for everything but the prompt and size.
    pub fn new(prompt: impl Into<String>, width: u32, height: u32) -> Self {
        Self {
            prompt: prompt.into(),
            width,
            height,
            steps: None,
            guidance: None,
            seed: None,
            num_images: 1,
        }
    }
}

/// A request that passed every check, with defaults filled in and the seed fixed.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedParams {
    /// The prompt.
    pub prompt: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance, only for variants that take it.
    pub guidance: Option<f64>,
    /// Seed of the first image.
    pub seed: u64,
    /// Batch size.
    pub num_images: u32,
}

impl ResolvedParams {
    /// The seed of each image in the batch.
    pub fn seeds(&self) -> Vec<u64> {
        (0..self.num_images as u64)
            .map(|i| self.seed.wrapping_add(i))
            .collect()
    }
}

fn invalid(field: &'static str, message: String) -> GenerateError {
    GenerateError::InvalidParam { field, message }
}

impl GenerationParams {
    /// Checks every field against `limits` and the variant, and fills defaults. Errors name the
    /// field and the limit.
    pub fn resolve(
        &self,
        variant: Variant,
        limits: &Limits,
    ) -> Result<ResolvedParams, GenerateError> {
        if self.prompt.trim().is_empty() {
            return Err(invalid("prompt", "must not be empty".into()));
        }
        let chars = self.prompt.chars().count();
        if chars > limits.max_prompt_chars {
            return Err(invalid(
                "prompt",
                format!(
                    "must be at most {} characters, got {chars}",
                    limits.max_prompt_chars
                ),
            ));
        }
        for (field, value, max) in [
            ("width", self.width, limits.max_width),
            ("height", self.height, limits.max_height),
        ] {
            if value % 16 != 0 || value < limits.min_size || value > max {
                return Err(invalid(
                    field,
                    format!(
                        "must be a multiple of 16 between {} and {max}, got {value}",
                        limits.min_size
                    ),
                ));
            }
        }
        let steps = self.steps.unwrap_or_else(|| variant.default_steps());
        if steps == 0 || steps > limits.max_steps {
            return Err(invalid(
                "steps",
                format!("must be between 1 and {}, got {steps}", limits.max_steps),
            ));
        }
        if self.num_images == 0 || self.num_images > limits.max_num_images {
            return Err(invalid(
                "num_images",
                format!(
                    "must be between 1 and {}, got {}",
                    limits.max_num_images, self.num_images
                ),
            ));
        }
        let guidance = match (variant.default_guidance(), self.guidance) {
            (None, Some(g)) => {
                return Err(invalid(
                    "guidance",
                    format!(
                        "FLUX.1-{variant} has no guidance input, so guidance {g} would be ignored; omit it"
                    ),
                ));
            }
            (None, None) => None,
            (Some(default), given) => {
                let g = given.unwrap_or(default);
                if !g.is_finite() || g < 0.0 || g > limits.max_guidance {
                    return Err(invalid(
                        "guidance",
                        format!("must be between 0 and {}, got {g}", limits.max_guidance),
                    ));
                }
                Some(g)
            }
        };
        Ok(ResolvedParams {
            prompt: self.prompt.clone(),
            width: self.width,
            height: self.height,
            steps,
            guidance,
            seed: self.seed.unwrap_or_else(random_seed),
            num_images: self.num_images,
        })
    }
}

/// A fresh seed from the OS-keyed hasher (no extra dependency); seeds are reported back, so
/// any image can be reproduced.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    // Keep seeds within JavaScript's safe integer range so JSON clients round-trip them.
    h.finish() & ((1u64 << 53) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: GenerateError) -> (&'static str, String) {
        match e {
            GenerateError::InvalidParam { field, message } => (field, message),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn defaults_follow_the_variant() {
        let l = Limits::default();
        let r = GenerationParams::new("a", 64, 64)
            .resolve(Variant::Schnell, &l)
            .unwrap();
        assert_eq!((r.steps, r.guidance), (4, None));
        let r = GenerationParams::new("a", 64, 64)
            .resolve(Variant::Dev, &l)
            .unwrap();
        assert_eq!((r.steps, r.guidance), (28, Some(3.5)));
        assert!(r.seed < (1 << 53));
    }

    #[test]
    fn each_bad_field_is_named_with_its_limit() {
        let l = Limits::default();
        let base = GenerationParams::new("a founder", 64, 64);
        let cases: Vec<(GenerationParams, Variant, &str, &str)> = vec![
            (
                GenerationParams {
                    width: 100,
                    ..base.clone()
                },
                Variant::Schnell,
                "width",
                "multiple of 16",
            ),
            (
                GenerationParams {
                    height: 4096,
                    ..base.clone()
                },
                Variant::Schnell,
                "height",
                "1536",
            ),
            (
                GenerationParams {
                    width: 32,
                    ..base.clone()
                },
                Variant::Schnell,
                "width",
                "between 64",
            ),
            (
                GenerationParams {
                    steps: Some(0),
                    ..base.clone()
                },
                Variant::Schnell,
                "steps",
                "between 1 and 50",
            ),
            (
                GenerationParams {
                    steps: Some(51),
                    ..base.clone()
                },
                Variant::Schnell,
                "steps",
                "got 51",
            ),
            (
                GenerationParams {
                    num_images: 5,
                    ..base.clone()
                },
                Variant::Schnell,
                "num_images",
                "between 1 and 4",
            ),
            (
                GenerationParams {
                    num_images: 0,
                    ..base.clone()
                },
                Variant::Schnell,
                "num_images",
                "got 0",
            ),
            (
                GenerationParams {
                    guidance: Some(3.0),
                    ..base.clone()
                },
                Variant::Schnell,
                "guidance",
                "no guidance",
            ),
            (
                GenerationParams {
                    guidance: Some(f64::NAN),
                    ..base.clone()
                },
                Variant::Dev,
                "guidance",
                "between 0 and 20",
            ),
            (
                GenerationParams {
                    guidance: Some(21.0),
                    ..base.clone()
                },
                Variant::Dev,
                "guidance",
                "20",
            ),
            (
                GenerationParams {
                    prompt: "  ".into(),
                    ..base.clone()
                },
                Variant::Schnell,
                "prompt",
                "empty",
            ),
            (
                GenerationParams {
                    prompt: "x".repeat(2001),
                    ..base.clone()
                },
                Variant::Schnell,
                "prompt",
                "2000",
            ),
        ];
        for (p, v, field, needle) in cases {
            let (f, m) = field_of(p.resolve(v, &l).unwrap_err());
            assert_eq!(f, field);
            assert!(m.contains(needle), "{field}: {m}");
        }
    }

    #[test]
    fn seeds_count_up_from_the_first() {
        let l = Limits::default();
        let p = GenerationParams {
            seed: Some(u64::MAX),
            num_images: 2,
            ..GenerationParams::new("a", 64, 64)
        };
        assert_eq!(
            p.resolve(Variant::Schnell, &l).unwrap().seeds(),
            vec![u64::MAX, 0]
        );
        assert_ne!(random_seed(), random_seed());
    }
}
