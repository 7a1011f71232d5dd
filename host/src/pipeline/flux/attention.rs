//! Joint attention over text and image tokens, in the `(batch, tokens, heads, head_dim)`
//! layout the QKV projection produces, so no transposes are needed around a fused kernel.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::flash_cpu;

/// Which attention implementation the model runs (`model.attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// The fastest the device has: the CUDA flash kernel on CUDA builds, plain ops on the CPU.
    #[default]
    Auto,
    /// Plain candle ops: matmul, softmax, matmul (the score matrix is materialised).
    Plain,
    /// The fused, memory-bounded kernel where the device has one: the CPU's online-softmax
    /// op, or on CUDA builds the tensor-core flash kernel (bf16, head dim 128; other inputs
    /// take plain ops).
    Fused,
}

impl AttentionKernel {
    /// The implementation that runs on `device`: a fused path only where one exists. `auto`
    /// is the CUDA flash kernel on CUDA builds (it passed `headshot bench gpu --check` on an
    /// H100 and takes a FLUX step from 570 to 162 ms there, docs/BENCHMARKS.md) and plain ops
    /// on the CPU, where they are faster than the fused CPU op.
    pub fn resolve(self, device: &Device) -> Resolved {
        match (self, device) {
            (Self::Fused, Device::Cpu) => Resolved::FusedCpu,
            #[cfg(feature = "cuda")]
            (Self::Fused | Self::Auto, Device::Cuda(_)) => Resolved::FusedCuda,
            _ => Resolved::Plain,
        }
    }
}

impl std::str::FromStr for AttentionKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "plain" => Ok(Self::Plain),
            "fused" => Ok(Self::Fused),
            other => Err(format!(
                "unknown attention kernel {other:?}: expected \"auto\", \"plain\" or \"fused\""
            )),
        }
    }
}

/// An implementation that exists on the device it was resolved for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// [`plain`].
    Plain,
    /// [`flash_cpu::attention`].
    FusedCpu,
    /// The CUDA flash kernel for bf16 / head dim 128, plain ops for anything else.
    #[cfg(feature = "cuda")]
    FusedCuda,
}

impl Resolved {
    /// Runs attention: q, k, v `(batch, tokens, heads, head_dim)` → `(batch, tokens,
    /// heads·head_dim)`.
    pub fn run(self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Plain => plain(q, k, v),
            Self::FusedCpu => flash_cpu::attention(q, k, v),
            #[cfg(feature = "cuda")]
            Self::FusedCuda if super::flash_cuda::supports(q) => {
                super::flash_cuda::attention(q, k, v)
            }
            #[cfg(feature = "cuda")]
            Self::FusedCuda => plain(q, k, v),
        }
    }

    /// Name for logs and bench output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::FusedCpu => "fused-cpu",
            #[cfg(feature = "cuda")]
            Self::FusedCuda => "fused-cuda",
        }
    }
}

/// `softmax(q·kᵀ/√d)·v` for `q`, `k`, `v` shaped `(batch, tokens, heads, head_dim)`, returned
/// as `(batch, tokens, heads·head_dim)`. Plain candle ops: the score matrix
/// `(batch, heads, tokens, tokens)` is materialised.
pub fn plain(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (b, n, h, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let (q, k, v) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, h * d))
}
