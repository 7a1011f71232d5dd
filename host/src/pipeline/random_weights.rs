//! Random model weights served through candle's `VarBuilder`, for the demo model and for GPU
//! benchmarks of full-size FLUX without downloading 24 GB.
//!
//! Values follow each layer's own initialisation hint where it gives one. Where a module asks
//! with no hint (candle passes "zeros"), norms get ~1 and matrices get N(0, 1/fan_in) so the
//! network does real, non-degenerate work instead of multiplying by zero.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::Init;
use candle_nn::var_builder::SimpleBackend;

use super::rng::Rng;

/// How values are drawn.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// From [`Rng`] on the CPU, keyed by tensor name: reproducible on any machine.
    Seeded(u64),
    /// From the device's own generator: fast for billions of parameters, not reproducible.
    Device,
}

/// A `VarBuilder` backend that invents every tensor it is asked for.
pub struct RandomWeights {
    source: Source,
    recorded: Option<Recording>,
}

/// The tensors a seeded [`RandomWeights`] handed out, readable after the `VarBuilder` that
/// owns the backend is gone.
#[derive(Clone, Default)]
pub struct Recording(Arc<Mutex<HashMap<String, Tensor>>>);

impl Recording {
    /// Every tensor handed out so far, as f32 on the CPU, by name.
    pub fn take(&self) -> HashMap<String, Tensor> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The distribution one tensor is drawn from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dist {
    Const(f64),
    Normal { mean: f64, std: f64 },
    Uniform { lo: f64, up: f64 },
}

fn dist_for(name: &str, shape: &Shape, hint: Init) -> Dist {
    let dims = shape.dims();
    let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
    let matrix = Dist::Normal {
        mean: 0.0,
        std: 1.0 / (fan_in as f64).sqrt(),
    };
    match hint {
        Init::Const(c) if c != 0.0 => Dist::Const(c),
        Init::Const(_) if dims.len() <= 1 => {
            if name.ends_with("bias") {
                Dist::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
            } else {
                // Norm weights and RMSNorm scales.
                Dist::Normal {
                    mean: 1.0,
                    std: 0.02,
                }
            }
        }
        Init::Const(_) => matrix,
        Init::Randn { mean, stdev } => Dist::Normal { mean, std: stdev },
        Init::Uniform { lo, up } => Dist::Uniform { lo, up },
        Init::Kaiming { .. } => matrix,
    }
}

impl RandomWeights {
    /// Reproducible weights from `seed`, remembered in the returned [`Recording`] so they can
    /// be written out as safetensors.
    pub fn seeded(seed: u64) -> (Self, Recording) {
        let recording = Recording::default();
        let weights = Self {
            source: Source::Seeded(seed),
            recorded: Some(recording.clone()),
        };
        (weights, recording)
    }

    /// Weights drawn on the device itself (GPU benchmarks); nothing is remembered.
    pub fn on_device() -> Self {
        Self {
            source: Source::Device,
            recorded: None,
        }
    }

    fn make(
        &self,
        name: &str,
        shape: &Shape,
        dist: Dist,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        match self.source {
            Source::Seeded(seed) => {
                let n = shape.elem_count();
                let mut rng = Rng::for_name(seed, name);
                let values: Vec<f32> = match dist {
                    Dist::Const(c) => vec![c as f32; n],
                    Dist::Normal { mean, std } => rng
                        .normals(n)
                        .into_iter()
                        .map(|x| (mean + std * f64::from(x)) as f32)
                        .collect(),
                    Dist::Uniform { lo, up } => (0..n)
                        .map(|_| (lo + (up - lo) * rng.uniform()) as f32)
                        .collect(),
                };
                let cpu = Tensor::from_vec(values, shape.clone(), &Device::Cpu)?;
                if let Some(rec) = &self.recorded {
                    let mut map = rec.0.lock().unwrap_or_else(|p| p.into_inner());
                    map.insert(name.to_string(), cpu.clone());
                }
                cpu.to_dtype(dtype)?.to_device(dev)
            }
            Source::Device => {
                let t = match dist {
                    Dist::Const(c) => {
                        Tensor::ones(shape.clone(), DType::F32, dev)?.affine(c, 0.0)?
                    }
                    Dist::Normal { mean, std } => {
                        Tensor::randn(mean as f32, std as f32, shape.clone(), dev)?
                    }
                    Dist::Uniform { lo, up } => {
                        Tensor::rand(lo as f32, up as f32, shape.clone(), dev)?
                    }
                };
                t.to_dtype(dtype)
            }
        }
    }
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let dist = dist_for(name, &s, h);
        self.make(name, &s, dist, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_become_sensible_distributions() {
        let s2 = Shape::from((4, 16));
        let s1 = Shape::from(4);
        assert_eq!(
            dist_for("x.scale", &s1, Init::Const(0.0)),
            Dist::Normal {
                mean: 1.0,
                std: 0.02
            }
        );
        assert_eq!(
            dist_for("x.bias", &s1, Init::Const(0.0)),
            Dist::Normal {
                mean: 0.0,
                std: 0.02
            }
        );
        assert_eq!(
            dist_for("w", &s2, Init::Const(0.0)),
            Dist::Normal {
                mean: 0.0,
                std: 0.25
            }
        );
        assert_eq!(
            dist_for("ln.weight", &s1, Init::Const(1.0)),
            Dist::Const(1.0)
        );
    }

    #[test]
    fn seeded_weights_are_recorded_and_reproducible() {
        let make = || {
            let (rw, rec) = RandomWeights::seeded(3);
            let t = rw
                .get(
                    (2, 3).into(),
                    "a.weight",
                    Init::Const(0.0),
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
            (t.to_vec2::<f32>().unwrap(), rec.take())
        };
        let (a, rec) = make();
        let (b, _) = make();
        assert_eq!(a, b);
        assert_eq!(rec["a.weight"].to_vec2::<f32>().unwrap(), a);
        assert!(a.iter().flatten().any(|&x| x != 0.0));
    }
}
