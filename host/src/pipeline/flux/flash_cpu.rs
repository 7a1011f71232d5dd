//! Memory-bounded attention for the CPU: a flash-attention style custom op (online softmax
//! over key blocks), so the `(batch, heads, tokens, tokens)` score matrix never exists.
//!
//! At 1024×1024 FLUX attends over 4352 tokens in 24 heads: the plain path allocates
//! 24 × 4352² f32 scores (1.8 GB) twice per layer (scores, then probabilities). This kernel
//! keeps one `QUERY_BLOCK × KEY_BLOCK` tile per thread. It is the same algorithm a GPU flash
//! kernel runs, which makes it the CPU reference for one.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Query rows handled together (they share each loaded key/value block).
const QUERY_BLOCK: usize = 16;
/// Keys scored per tile.
const KEY_BLOCK: usize = 64;

/// The custom op: f32 `q`, `k`, `v` `(batch, tokens, heads, head_dim)`, contiguous; output
/// `(batch, heads, tokens, head_dim)`.
struct FlashAttention {
    scale: f32,
    threads: usize,
}

/// One unit of work: a block of query rows of one (batch, head).
struct Task<'a> {
    batch: usize,
    head: usize,
    first_row: usize,
    out: &'a mut [f32],
}

/// Shape bookkeeping shared by the tasks.
#[derive(Clone, Copy)]
struct Dims {
    tokens: usize,
    heads: usize,
    head_dim: usize,
}

impl Dims {
    /// Offset of row `token` of head `head` in batch `batch` in a `(b, n, h, d)` buffer.
    fn at(&self, batch: usize, token: usize, head: usize) -> usize {
        ((batch * self.tokens + token) * self.heads + head) * self.head_dim
    }
}

impl FlashAttention {
    fn run_task(&self, dims: Dims, q: &[f32], k: &[f32], v: &[f32], task: Task<'_>) {
        let d = dims.head_dim;
        let rows = task.out.len() / d;
        let mut max = [f32::NEG_INFINITY; QUERY_BLOCK];
        let mut sum = [0f32; QUERY_BLOCK];
        let mut scores = [0f32; QUERY_BLOCK * KEY_BLOCK];
        task.out.fill(0.0);
        let mut key = 0;
        while key < dims.tokens {
            let keys = KEY_BLOCK.min(dims.tokens - key);
            for r in 0..rows {
                let qr = &q[dims.at(task.batch, task.first_row + r, task.head)..][..d];
                let mut block_max = f32::NEG_INFINITY;
                for j in 0..keys {
                    let kr = &k[dims.at(task.batch, key + j, task.head)..][..d];
                    let s = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * self.scale;
                    scores[r * KEY_BLOCK + j] = s;
                    block_max = block_max.max(s);
                }
                // Online softmax: rescale what was accumulated under the old maximum.
                let new_max = max[r].max(block_max);
                let correction = (max[r] - new_max).exp();
                max[r] = new_max;
                sum[r] *= correction;
                let acc = &mut task.out[r * d..(r + 1) * d];
                if correction != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= correction);
                }
                for j in 0..keys {
                    let p = (scores[r * KEY_BLOCK + j] - new_max).exp();
                    sum[r] += p;
                    let vr = &v[dims.at(task.batch, key + j, task.head)..][..d];
                    acc.iter_mut().zip(vr).for_each(|(a, b)| *a += p * b);
                }
            }
            key += keys;
        }
        for (row, total) in task.out.chunks_mut(d).zip(sum) {
            let inv = 1.0 / total;
            row.iter_mut().for_each(|a| *a *= inv);
        }
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "headshot-flash-attention-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
            match l.contiguous_offsets() {
                Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
                None => candle_core::bail!("flash attention wants contiguous inputs"),
            }
        }
        let (b, n, h, d) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "flash attention wants q, k, v of one shape, got {:?} {:?} {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let dims = Dims {
            tokens: n,
            heads: h,
            head_dim: d,
        };
        let mut out = vec![0f32; b * h * n * d];
        let mut tasks: Vec<Task<'_>> = Vec::new();
        for (bh, per_head) in out.chunks_mut(n * d).enumerate() {
            for (i, rows) in per_head.chunks_mut(QUERY_BLOCK * d).enumerate() {
                tasks.push(Task {
                    batch: bh / h,
                    head: bh % h,
                    first_row: i * QUERY_BLOCK,
                    out: rows,
                });
            }
        }
        let threads = self.threads.clamp(1, tasks.len().max(1));
        let mut shares: Vec<Vec<Task<'_>>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, task) in tasks.into_iter().enumerate() {
            shares[i % threads].push(task);
        }
        std::thread::scope(|scope| {
            for share in shares {
                scope.spawn(move || {
                    for task in share {
                        self.run_task(dims, q, k, v, task);
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, n, d))))
    }
}

/// Attention for CPU tensors `(batch, tokens, heads, head_dim)` → `(batch, tokens,
/// heads·head_dim)`, in the inputs' dtype (computed in f32).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, n, h, d) = q.dims4()?;
    let dtype = q.dtype();
    let f32c = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let op = FlashAttention {
        scale: 1.0 / (d as f32).sqrt(),
        threads,
    };
    f32c(q)?
        .apply_op3_no_bwd(&f32c(k)?, &f32c(v)?, &op)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, h * d))?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::flux::attention;
    use crate::pipeline::rng::Rng;
    use candle_core::Device;

    fn randn(rng: &mut Rng, shape: (usize, usize, usize, usize), scale: f32) -> Tensor {
        rng.normal_tensor(shape, &Device::Cpu)
            .and_then(|t| t.affine(f64::from(scale), 0.0))
            .expect("randn")
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        crate::pipeline::flux::check::max_rel_error(a, b).expect("error measure")
    }

    #[test]
    fn matches_plain_attention_across_block_edges() {
        let mut rng = Rng::new(11);
        // Token counts below, at and across the block sizes; a large scale makes the softmax
        // peaky, so the running-maximum rescaling is exercised.
        for (n, scale) in [
            (1, 1.0),
            (5, 1.0),
            (16, 3.0),
            (17, 3.0),
            (64, 1.0),
            (130, 4.0),
        ] {
            let shape = (2, n, 3, 32);
            let (q, k, v) = (
                randn(&mut rng, shape, scale),
                randn(&mut rng, shape, scale),
                randn(&mut rng, shape, 1.0),
            );
            let want = attention::plain(&q, &k, &v).expect("plain");
            let got = super::attention(&q, &k, &v).expect("flash");
            assert_eq!(got.dims(), &[2, n, 96]);
            let err = max_rel(&got, &want);
            assert!(err < 1e-5, "{n} tokens: relative error {err}");
        }
    }

    #[test]
    fn bf16_inputs_come_back_in_bf16() {
        let mut rng = Rng::new(5);
        let q = randn(&mut rng, (1, 20, 2, 16), 1.0);
        let q16 = q.to_dtype(DType::BF16).expect("bf16");
        let out = super::attention(&q16, &q16, &q16).expect("flash");
        assert_eq!(out.dtype(), DType::BF16);
        let want = attention::plain(&q16, &q16, &q16)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("plain");
        let err = max_rel(&out.to_dtype(DType::F32).expect("f32"), &want);
        assert!(err < 2e-2, "bf16 relative error {err}");
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let mut rng = Rng::new(1);
        let q = randn(&mut rng, (1, 4, 2, 8), 1.0);
        let k = randn(&mut rng, (1, 5, 2, 8), 1.0);
        let e = super::attention(&q, &k, &k).expect_err("shapes differ");
        assert!(e.to_string().contains("one shape"), "{e}");
    }
}
