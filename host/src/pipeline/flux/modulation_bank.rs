//! Every block's adaLN modulation projection, run as a few large GEMVs at the start of a
//! forward pass instead of one small one per block.
//!
//! Each FLUX block projects the same conditioning vector `silu(vec)` (one row per image) to
//! its shifts, scales and gates: 76 projections, ~3.2 B weights (a quarter of the model), all
//! of one input. Here their weights are joined at load into a few tall matrices (each under
//! 2³⁰ values, within 32-bit offsets) and every modulation of a pass comes from one product
//! per matrix, which reads the 6.4 GB at full memory bandwidth (~2.9 ms a step on an H100).
//! Run per block, the profile had put them at ~18 ms of a 162 ms step; measured whole, the
//! step went from 161.8 to 160.8 ms (docs/BENCHMARKS.md): most of the profile's figure was
//! its own per-stage synchronization. The numbers are the same products, so a block sees the
//! same modulation (the model is checked against candle's in tests and by `--check`).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Dense, Modulation, Projections};

/// Most weight values in one joined matrix: 2 GiB in bf16, and every offset into it fits
/// 32 bits.
const MAX_CHUNK_VALUES: usize = 1 << 30;

/// Where one block's modulation projection sits in the joined output.
#[derive(Debug, Clone, Copy)]
struct Slot {
    chunk: usize,
    offset: usize,
    /// Modulations it makes (2 for a double block's stream, 1 for a single block).
    count: usize,
}

/// The joined modulation projections of a model's blocks.
#[derive(Debug, Clone)]
pub struct ModulationBank {
    chunks: Vec<Dense>,
    slots: Vec<Slot>,
    hidden: usize,
}

impl ModulationBank {
    /// Loads `lin.weight` (`3·count·hidden × hidden`) and `lin.bias` under each of `sources`
    /// (a block's modulation prefix and its modulation count) and joins them in order, in
    /// full precision. Peak extra memory while loading: one joined matrix.
    pub fn load(hidden: usize, sources: &[(VarBuilder, usize)]) -> Result<Self> {
        Self::load_chunked(hidden, sources, MAX_CHUNK_VALUES)
    }

    /// [`ModulationBank::load`] with at most `max_values` weights per joined matrix (one
    /// projection larger than that gets a matrix of its own).
    fn load_chunked(
        hidden: usize,
        sources: &[(VarBuilder, usize)],
        max_values: usize,
    ) -> Result<Self> {
        let mut chunks = Vec::new();
        let mut slots = Vec::with_capacity(sources.len());
        let mut pending: Vec<(Tensor, Tensor)> = Vec::new();
        let mut pending_rows = 0usize;
        let flush = |pending: &mut Vec<(Tensor, Tensor)>, chunks: &mut Vec<Dense>| -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            let weights: Vec<&Tensor> = pending.iter().map(|(w, _)| w).collect();
            let biases: Vec<&Tensor> = pending.iter().map(|(_, b)| b).collect();
            let joined = Dense::from_parts(
                Tensor::cat(&weights, 0)?,
                Some(Tensor::cat(&biases, 0)?),
                Projections::default(),
            )?;
            pending.clear();
            chunks.push(joined);
            Ok(())
        };
        for (vb, count) in sources {
            let rows = 3 * count * hidden;
            if (pending_rows + rows) * hidden > max_values && !pending.is_empty() {
                flush(&mut pending, &mut chunks)?;
                pending_rows = 0;
            }
            let lin = vb.pp("lin");
            pending.push((lin.get((rows, hidden), "weight")?, lin.get(rows, "bias")?));
            slots.push(Slot {
                chunk: chunks.len(),
                offset: pending_rows,
                count: *count,
            });
            pending_rows += rows;
        }
        flush(&mut pending, &mut chunks)?;
        Ok(Self {
            chunks,
            slots,
            hidden,
        })
    }

    /// Every block's modulations from `silu_vec` `(batch, hidden)`, in the order of the
    /// sources given to [`ModulationBank::load`]; each `(batch, 1, hidden)`, a view into one
    /// product per joined matrix.
    pub fn forward(&self, silu_vec: &Tensor) -> Result<Vec<Vec<Modulation>>> {
        let outs = self
            .chunks
            .iter()
            .map(|chunk| chunk.forward(silu_vec)?.unsqueeze(1))
            .collect::<Result<Vec<_>>>()?;
        let h = self.hidden;
        self.slots
            .iter()
            .map(|slot| {
                let out = &outs[slot.chunk];
                (0..slot.count)
                    .map(|m| {
                        let part =
                            |i: usize| out.narrow(D::Minus1, slot.offset + (3 * m + i) * h, h);
                        Ok(Modulation::from_parts(part(0)?, part(1)?, part(2)?))
                    })
                    .collect()
            })
            .collect()
    }

    /// How many joined matrices the projections take.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Sources at `hidden` with the given counts, random weights in a fresh VarMap.
    fn sources(vm: &VarMap, hidden: usize, counts: &[usize]) -> Vec<(VarBuilder<'static>, usize)> {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        let randn = candle_nn::Init::Randn {
            mean: 0.,
            stdev: 1.,
        };
        counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let vb = vb.pp(format!("b{i}"));
                // Touch the tensors so the VarMap holds random values.
                let (lin, rows) = (vb.pp("lin"), 3 * c * hidden);
                lin.get_with_hints((rows, hidden), "weight", randn).unwrap();
                lin.get_with_hints(rows, "bias", randn).unwrap();
                (vb, c)
            })
            .collect()
    }

    /// Largest |a − b|.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn each_block_gets_the_modulations_its_own_projection_gives() {
        let (hidden, counts) = (8, [2, 2, 1, 1, 1]);
        let vm = VarMap::new();
        let srcs = sources(&vm, hidden, &counts);
        let bank = ModulationBank::load(hidden, &srcs).unwrap();
        assert_eq!(bank.chunk_count(), 1, "small weights join into one matrix");
        let x = Tensor::randn(0f32, 1., (2, hidden), &Device::Cpu).unwrap();
        let got = bank.forward(&x).unwrap();
        assert_eq!(got.len(), counts.len());
        for ((vb, count), mods) in srcs.iter().zip(&got) {
            assert_eq!(mods.len(), *count);
            let lin = vb.pp("lin");
            let w = lin.get((3 * count * hidden, hidden), "weight").unwrap();
            let b = lin.get(3 * count * hidden, "bias").unwrap();
            let own = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            for (m, modulation) in mods.iter().enumerate() {
                for (i, part) in modulation.parts().into_iter().enumerate() {
                    assert_eq!(part.dims(), [2, 1, hidden]);
                    let want = own.narrow(1, (3 * m + i) * hidden, hidden).unwrap();
                    let diff = max_diff(&part.squeeze(1).unwrap(), &want);
                    assert!(diff < 1e-5, "modulation {m} part {i}: off by {diff}");
                }
            }
        }
    }

    #[test]
    fn matrices_past_the_value_limit_split_at_block_boundaries_and_still_match() {
        let (hidden, counts) = (8, [2, 2, 1, 1, 1]);
        let vm = VarMap::new();
        let srcs = sources(&vm, hidden, &counts);
        let whole = ModulationBank::load(hidden, &srcs).unwrap();
        // Room for one double-stream projection or two single-block ones per matrix.
        let limit = 3 * 2 * hidden * hidden;
        let split = ModulationBank::load_chunked(hidden, &srcs, limit).unwrap();
        assert_eq!(split.chunk_count(), 4, "[2] [2] [1, 1] [1]");
        let x = Tensor::randn(0f32, 1., (1, hidden), &Device::Cpu).unwrap();
        let (a, b) = (whole.forward(&x).unwrap(), split.forward(&x).unwrap());
        for (ma, mb) in a.iter().flatten().zip(b.iter().flatten()) {
            for (pa, pb) in ma.parts().into_iter().zip(mb.parts()) {
                assert!(max_diff(pa, pb) < 1e-5);
            }
        }
        assert_eq!(a.iter().flatten().count(), 7);
    }
}
