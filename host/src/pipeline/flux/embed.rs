//! Positional (rotary) and timestep embeddings, always computed in f32.
//!
//! The stock candle module builds the rotary table in the activation dtype: in bf16 the
//! angles `position × frequency` lose their low bits (a bf16 mantissa has 8 bits, so an
//! angle near 60 rad is off by up to 0.125 rad) and the cos/sin values are off by up to 0.15
//! at 1024×1024. diffusers keeps them in f32/f64. Here the table is f32 and the rotation is
//! applied in f32, then cast back to the activation dtype.

use candle_core::{D, DType, Result, Tensor};

/// Rotary table for one forward pass: cos and sin of every (token, frequency) pair, f32,
/// shaped `(batch, tokens, 1, head_dim / 2, 1)` so it broadcasts over heads.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTable {
    /// The table for position ids `(batch, tokens, axes)` (any dtype; converted to f32 first)
    /// with `axes_dim[a]` rotary dimensions for axis `a`.
    pub fn new(ids: &Tensor, axes_dim: &[usize], theta: f64) -> Result<Self> {
        let ids = ids.to_dtype(DType::F32)?;
        let (b, n, axes) = ids.dims3()?;
        if axes != axes_dim.len() {
            candle_core::bail!(
                "position ids have {axes} axes but the model has {} rotary axes",
                axes_dim.len()
            );
        }
        let mut freqs = Vec::with_capacity(axes);
        for (axis, &dim) in axes_dim.iter().enumerate() {
            if dim % 2 == 1 {
                candle_core::bail!("rotary dimension {dim} of axis {axis} is odd");
            }
            // Frequencies in f64, rounded once to f32.
            let inv: Vec<f32> = (0..dim / 2)
                .map(|i| (1.0 / theta.powf(2.0 * i as f64 / dim as f64)) as f32)
                .collect();
            let inv = Tensor::from_vec(inv, (1, 1, dim / 2), ids.device())?;
            let pos = ids.narrow(D::Minus1, axis, 1)?;
            freqs.push(pos.broadcast_mul(&inv)?);
        }
        let angles = Tensor::cat(&freqs, D::Minus1)?.reshape((b, n, 1, (), 1))?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// The cos and sin tables, f32 `(batch, tokens, 1, head_dim / 2, 1)`, for fused kernels.
    pub fn cos_sin(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Tokens the table covers.
    pub fn tokens(&self) -> usize {
        self.cos.dims().get(1).copied().unwrap_or(0)
    }

    /// Rotates `x` `(batch, tokens, heads, head_dim)` pairwise (`x[2i]`, `x[2i+1]`) in f32 and
    /// returns it in `x`'s dtype, contiguous.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let (b, n, h, d) = x.dims4()?;
        let pairs = x.to_dtype(DType::F32)?.reshape((b, n, h, d / 2, 2))?;
        let x0 = pairs.narrow(D::Minus1, 0, 1)?;
        let x1 = pairs.narrow(D::Minus1, 1, 1)?;
        let r0 = (x0.broadcast_mul(&self.cos)? - x1.broadcast_mul(&self.sin)?)?;
        let r1 = (x0.broadcast_mul(&self.sin)? + x1.broadcast_mul(&self.cos)?)?;
        Tensor::cat(&[r0, r1], D::Minus1)?
            .reshape((b, n, h, d))?
            .to_dtype(dtype)
    }
}

/// Sinusoidal embedding of timesteps in [0, 1] (scaled by 1000 as in training), `dim` wide,
/// computed in f32 and returned in `dtype`: `[cos(t·f_0..), sin(t·f_0..)]`.
pub fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    const TIME_FACTOR: f64 = 1000.0;
    const MAX_PERIOD: f64 = 10_000.0;
    if dim % 2 == 1 {
        candle_core::bail!("timestep embedding width {dim} is odd");
    }
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-MAX_PERIOD.ln() * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let t = (t.to_dtype(DType::F32)? * TIME_FACTOR)?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Position ids like the sampler's for an `h × w` latent grid (in tokens) after `txt`
    /// text tokens at position 0.
    fn ids(txt: usize, h: usize, w: usize, dtype: DType) -> Tensor {
        let mut v = vec![0f32; txt * 3];
        for y in 0..h {
            for x in 0..w {
                v.extend([0.0, y as f32, x as f32]);
            }
        }
        Tensor::from_vec(v, (1, txt + h * w, 3), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("ids")
    }

    /// Exact rotation in f64 for one (token, head) vector.
    fn rotate_f64(x: &[f64], pos: [f64; 3], axes: &[usize], theta: f64) -> Vec<f64> {
        let mut angles = Vec::new();
        for (a, &dim) in axes.iter().enumerate() {
            for i in 0..dim / 2 {
                angles.push(pos[a] / theta.powf(2.0 * i as f64 / dim as f64));
            }
        }
        let mut out = vec![0.0; x.len()];
        for (i, ang) in angles.iter().enumerate() {
            let (c, s) = (ang.cos(), ang.sin());
            out[2 * i] = c * x[2 * i] - s * x[2 * i + 1];
            out[2 * i + 1] = s * x[2 * i] + c * x[2 * i + 1];
        }
        out
    }

    #[test]
    fn rotation_matches_f64_math_and_keeps_norms() {
        let axes = [4, 6, 6];
        let table = RopeTable::new(&ids(2, 3, 5, DType::F32), &axes, 10_000.0).expect("table");
        assert_eq!(table.tokens(), 17);
        let n = 17 * 2 * 16;
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let x = Tensor::from_vec(xs.clone(), (1, 17, 2, 16), &Device::Cpu).expect("x");
        let got: Vec<f32> = table
            .apply(&x)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("apply");
        for tok in 0..17 {
            let pos = if tok < 2 {
                [0.0; 3]
            } else {
                [0.0, ((tok - 2) / 5) as f64, ((tok - 2) % 5) as f64]
            };
            for head in 0..2 {
                let at = (tok * 2 + head) * 16;
                let input: Vec<f64> = xs[at..at + 16].iter().map(|&v| f64::from(v)).collect();
                let want = rotate_f64(&input, pos, &axes, 10_000.0);
                for (g, w) in got[at..at + 16].iter().zip(&want) {
                    assert!((f64::from(*g) - w).abs() < 1e-5, "token {tok}: {g} vs {w}");
                }
                let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
                let got64: Vec<f64> = got[at..at + 16].iter().map(|&v| f64::from(v)).collect();
                assert!((norm(&got64) - norm(&input)).abs() < 1e-5);
            }
        }
    }

    /// At FLUX's 1024×1024 positions (64×64 tokens, 16/56/56 axes) a bf16 table like the stock
    /// module's is visibly wrong; this one, fed the same bf16 ids, is within f32 rounding.
    #[test]
    fn bf16_ids_give_an_f32_accurate_table() {
        let axes = [16, 56, 56];
        let ids16 = ids(0, 64, 64, DType::BF16);
        let ours = RopeTable::new(&ids16, &axes, 10_000.0).expect("table");
        // Exact cos of the x-axis angles (frequencies 36..64 of each token), in f64.
        let mut exact = Vec::with_capacity(4096 * 28);
        for _y in 0..64 {
            for x in 0..64 {
                for i in 0..28 {
                    exact.push((x as f64 / 10_000f64.powf(2.0 * i as f64 / 56.0)).cos());
                }
            }
        }
        let max_err = |t: &Tensor| -> f64 {
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("values");
            v.iter()
                .zip(&exact)
                .map(|(a, b)| (f64::from(*a) - b).abs())
                .fold(0.0, f64::max)
        };
        let ours_x = ours
            .cos
            .reshape((1, 4096, 64))
            .and_then(|t| t.narrow(2, 36, 28))
            .expect("x part");
        let ours_err = max_err(&ours_x);
        assert!(ours_err < 1e-4, "f32 table error {ours_err}");

        // The stock recipe: angles and cos in bf16.
        let pos = ids16.narrow(D::Minus1, 2, 1).expect("x axis");
        let inv: Vec<f32> = (0..28)
            .map(|i| (1.0 / 10_000f64.powf(2.0 * i as f64 / 56.0)) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, 1, 28), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("inv");
        let stock_cos = pos.broadcast_mul(&inv).and_then(|a| a.cos()).expect("cos");
        let stock_err = max_err(&stock_cos);
        assert!(
            stock_err > 0.05,
            "a bf16 table should be visibly off (error {stock_err})"
        );
    }

    #[test]
    fn timestep_embedding_is_cos_then_sin() {
        let t = Tensor::new(&[0.25f32], &Device::Cpu).expect("t");
        let e: Vec<f32> = timestep_embedding(&t, 8, DType::F32)
            .and_then(|e| e.flatten_all())
            .and_then(|e| e.to_vec1())
            .expect("emb");
        for i in 0..4 {
            let f = (-(10_000f64.ln()) * i as f64 / 4.0).exp();
            let arg = 250.0 * f;
            assert!((f64::from(e[i]) - arg.cos()).abs() < 1e-4);
            assert!((f64::from(e[4 + i]) - arg.sin()).abs() < 1e-4);
        }
        assert!(timestep_embedding(&t, 7, DType::F32).is_err());
    }
}
