//! The two FLUX transformer blocks: double-stream (separate text and image weights, joint
//! attention) and single-stream (one fused QKV+MLP projection over all tokens).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::model::Config;

use super::attention::Resolved;
use super::embed::RopeTable;
use super::layers::{
    Activation, Dense, FeedForward, Modulation, PlainLayerNorm, Projections, ScaledRmsNorm,
    WeightSize,
};
use super::stage_profile::mark;

/// Width of the MLP for a config.
fn mlp_width(cfg: &Config) -> usize {
    (cfg.hidden_size as f64 * cfg.mlp_ratio) as usize
}

/// Splits a `(batch, tokens, 3·hidden)` projection into q, k, v `(batch, tokens, heads,
/// head_dim)`, with q and k RMS-normalised.
fn split_qkv(
    qkv: &Tensor,
    heads: usize,
    q_norm: &ScaledRmsNorm,
    k_norm: &ScaledRmsNorm,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, width) = qkv.dims3()?;
    let qkv = qkv.reshape((b, n, 3, heads, width / (3 * heads)))?;
    let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
    Ok((
        q_norm.forward(&part(0)?)?,
        k_norm.forward(&part(1)?)?,
        part(2)?,
    ))
}

/// One stream's QKV projection `(batch, tokens, 3·hidden)` with its query and key norms.
pub type StreamQkv<'a> = (&'a Tensor, &'a ScaledRmsNorm, &'a ScaledRmsNorm);

/// q, k, v `(batch, tokens, heads, head_dim)` of the token sequence the streams' projections
/// make when joined in order (text, then image), q and k normalised and rotated. On CUDA in
/// bf16 the norm and rotation of each of q and k are one kernel that also does the join.
pub fn joined_qkv(
    streams: &[StreamQkv],
    heads: usize,
    rope: &RopeTable,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if streams
        .iter()
        .all(|(qkv, ..)| super::norm_rope_cuda::supports(qkv, heads))
    {
        use super::norm_rope_cuda::{Part, norm_rope};
        let q: Vec<(&Tensor, &Tensor)> = streams.iter().map(|(x, n, _)| (*x, n.scale())).collect();
        let k: Vec<(&Tensor, &Tensor)> = streams.iter().map(|(x, _, n)| (*x, n.scale())).collect();
        let values = streams
            .iter()
            .map(|(x, ..)| {
                let (b, n, width) = x.dims3()?;
                x.narrow(2, 2 * width / 3, width / 3)?
                    .reshape((b, n, heads, width / (3 * heads)))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok((
            norm_rope(&q, Part::Query, heads, rope)?,
            norm_rope(&k, Part::Key, heads, rope)?,
            Tensor::cat(&values, 1)?,
        ));
    }
    let parts = streams
        .iter()
        .map(|(qkv, q_norm, k_norm)| split_qkv(qkv, heads, q_norm, k_norm))
        .collect::<Result<Vec<_>>>()?;
    let join = |pick: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| {
        Tensor::cat(&parts.iter().map(pick).collect::<Vec<_>>(), 1)
    };
    Ok((
        rope.apply(&join(|p| &p.0)?)?,
        rope.apply(&join(|p| &p.1)?)?,
        join(|p| &p.2)?,
    ))
}

/// One stream's half of a double block.
#[derive(Debug, Clone)]
struct Stream {
    norm: PlainLayerNorm,
    qkv: Dense,
    q_norm: ScaledRmsNorm,
    k_norm: ScaledRmsNorm,
    proj: Dense,
    mlp: FeedForward,
}

impl Stream {
    fn new(cfg: &Config, prefix: &str, how: Projections, vb: &VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_heads;
        let attn = vb.pp(format!("{prefix}_attn"));
        Ok(Self {
            norm: PlainLayerNorm::new(h, vb)?,
            qkv: Dense::load(h, 3 * h, cfg.qkv_bias, how, attn.pp("qkv"))?,
            q_norm: ScaledRmsNorm::new(head_dim, attn.pp("norm.query_norm"))?,
            k_norm: ScaledRmsNorm::new(head_dim, attn.pp("norm.key_norm"))?,
            proj: Dense::load(h, h, true, how, attn.pp("proj"))?,
            mlp: FeedForward::new(h, mlp_width(cfg), how, vb.pp(format!("{prefix}_mlp")))?,
        })
    }
}

impl Stream {
    fn weight_size(&self) -> WeightSize {
        self.qkv.weight_size() + self.proj.weight_size() + self.mlp.weight_size()
    }
}

/// A double-stream block.
#[derive(Debug, Clone)]
pub struct DoubleBlock {
    img: Stream,
    txt: Stream,
    heads: usize,
}

impl DoubleBlock {
    /// Loads `img_*` and `txt_*` weights under `vb`, the projections as `how` says.
    pub fn new(cfg: &Config, how: Projections, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            img: Stream::new(cfg, "img", how, &vb)?,
            txt: Stream::new(cfg, "txt", how, &vb)?,
            heads: cfg.num_heads,
        })
    }

    /// The projection weights (those `model.fp8` stores as FP8).
    pub fn projection_size(&self) -> WeightSize {
        self.img.weight_size() + self.txt.weight_size()
    }

    /// Where this block's two modulation projections sit under its `vb` (image stream, then
    /// text), each making two modulations: loaded by the model's [`ModulationBank`].
    ///
    /// [`ModulationBank`]: super::modulation_bank::ModulationBank
    pub fn modulation_sources<'a>(vb: &VarBuilder<'a>) -> [(VarBuilder<'a>, usize); 2] {
        [(vb.pp("img_mod"), 2), (vb.pp("txt_mod"), 2)]
    }

    /// Updates image and text tokens with the stream's modulations (attention, then MLP,
    /// from the model's [`ModulationBank`](super::modulation_bank::ModulationBank)); `rope`
    /// covers text tokens first, then image tokens.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        (img_mod, txt_mod): (&[Modulation], &[Modulation]),
        rope: &RopeTable,
        attention: Resolved,
    ) -> Result<(Tensor, Tensor)> {
        if img_mod.len() != 2 || txt_mod.len() != 2 {
            candle_core::bail!(
                "a double block takes two modulations per stream, got {} and {}",
                img_mod.len(),
                txt_mod.len()
            );
        }
        let qkv_of = |s: &Stream, x: &Tensor, m: &Modulation| {
            let input = m.norm_scale_shift_for(&s.norm, x, &s.qkv)?;
            s.qkv.apply(&input, Activation::Identity)
        };
        let txt_qkv = qkv_of(&self.txt, txt, &txt_mod[0])?;
        let img_qkv = qkv_of(&self.img, img, &img_mod[0])?;
        mark("double.norm+qkv", &img_qkv)?;
        let (q, k, v) = joined_qkv(
            &[
                (&txt_qkv, &self.txt.q_norm, &self.txt.k_norm),
                (&img_qkv, &self.img.q_norm, &self.img.k_norm),
            ],
            self.heads,
            rope,
        )?;
        mark("double.qk_norm+rope+join", &q)?;
        let attn = attention.run(&q, &k, &v)?;
        mark("double.attention", &attn)?;
        let n_txt = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, n_txt)?;
        let img_attn = attn.narrow(1, n_txt, attn.dim(1)? - n_txt)?;

        let finish = |s: &Stream, x: &Tensor, a: &Tensor, m: &[Modulation]| {
            let x = m[0].gated_add(x, &s.proj.forward(a)?)?;
            mark("double.proj+gated_add", &x)?;
            let mlp = s.mlp.forward_modulated(&m[1], &s.norm, &x)?;
            let x = m[1].gated_add(&x, &mlp)?;
            mark("double.norm+mlp+gated_add", &x)?;
            Ok::<_, candle_core::Error>(x)
        };
        Ok((
            finish(&self.img, img, &img_attn, img_mod)?,
            finish(&self.txt, txt, &txt_attn, txt_mod)?,
        ))
    }
}

/// A single block's first projection: q, k, v and the MLP's hidden layer from one input.
#[derive(Debug, Clone)]
enum Linear1 {
    /// One GEMM, as the checkpoint stores it (the output is split afterwards).
    Joint(Dense),
    /// Split by rows into the attention part and the MLP part, so the MLP's GELU applies to a
    /// whole GEMM output and runs in its epilogue (CUDA): the same products.
    Split { qkv: Dense, mlp: Dense },
}

/// A single-stream block.
#[derive(Debug, Clone)]
pub struct SingleBlock {
    linear1: Linear1,
    linear2: Dense,
    q_norm: ScaledRmsNorm,
    k_norm: ScaledRmsNorm,
    norm: PlainLayerNorm,
    hidden: usize,
    heads: usize,
}

impl SingleBlock {
    /// Loads `linear1`, `linear2`, `norm.*` and `modulation` under `vb`, the two projections
    /// as `how` says. On CUDA `linear1` is split (`Linear1::Split`); elsewhere the
    /// split buys nothing and it stays one GEMM.
    pub fn new(cfg: &Config, how: Projections, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = mlp_width(cfg);
        let linear1 = if vb.device().is_cuda() {
            let vb1 = vb.pp("linear1");
            let weight = vb1.get((3 * h + mlp, h), "weight")?;
            let bias = vb1.get(3 * h + mlp, "bias")?;
            let rows = |start: usize, len: usize| -> Result<Dense> {
                Dense::from_parts(
                    weight.narrow(0, start, len)?,
                    Some(bias.narrow(0, start, len)?),
                    how,
                )
            };
            Linear1::Split {
                qkv: rows(0, 3 * h)?,
                mlp: rows(3 * h, mlp)?,
            }
        } else {
            Linear1::Joint(Dense::load(h, 3 * h + mlp, true, how, vb.pp("linear1"))?)
        };
        Ok(Self {
            linear1,
            linear2: Dense::load(h + mlp, h, true, how, vb.pp("linear2"))?,
            q_norm: ScaledRmsNorm::new(h / cfg.num_heads, vb.pp("norm.query_norm"))?,
            k_norm: ScaledRmsNorm::new(h / cfg.num_heads, vb.pp("norm.key_norm"))?,
            norm: PlainLayerNorm::new(h, &vb)?,
            hidden: h,
            heads: cfg.num_heads,
        })
    }

    /// The projection weights (those `model.fp8` stores as FP8).
    pub fn projection_size(&self) -> WeightSize {
        let first = match &self.linear1 {
            Linear1::Joint(d) => d.weight_size(),
            Linear1::Split { qkv, mlp } => qkv.weight_size() + mlp.weight_size(),
        };
        first + self.linear2.weight_size()
    }

    /// Where this block's modulation projection sits under its `vb` (one modulation): loaded
    /// by the model's [`ModulationBank`](super::modulation_bank::ModulationBank).
    pub fn modulation_source<'a>(vb: &VarBuilder<'a>) -> (VarBuilder<'a>, usize) {
        (vb.pp("modulation"), 1)
    }

    /// Updates all tokens `x` (text first, then image) with the block's modulation `m`.
    pub fn forward(
        &self,
        x: &Tensor,
        m: &Modulation,
        rope: &RopeTable,
        attention: Resolved,
    ) -> Result<Tensor> {
        let (qkv, mlp) = match &self.linear1 {
            Linear1::Joint(linear1) => {
                let h = linear1.forward(&m.norm_scale_shift(&self.norm, x)?)?;
                let rest = h.dim(D::Minus1)? - 3 * self.hidden;
                let mlp = h.narrow(D::Minus1, 3 * self.hidden, rest)?.gelu()?;
                (h.narrow(D::Minus1, 0, 3 * self.hidden)?, mlp)
            }
            Linear1::Split { qkv, mlp } => {
                // Both halves read the same input: for per-row FP8, quantized once, by the
                // norm kernel itself.
                let input = m.norm_scale_shift_for(&self.norm, x, qkv)?;
                (
                    qkv.apply(&input, Activation::Identity)?,
                    mlp.apply(&input, Activation::GeluTanh)?,
                )
            }
        };
        mark("single.norm+linear1", &mlp)?;
        let (q, k, v) = joined_qkv(&[(&qkv, &self.q_norm, &self.k_norm)], self.heads, rope)?;
        mark("single.qk_norm+rope", &q)?;
        let attn = attention.run(&q, &k, &v)?;
        mark("single.attention", &attn)?;
        // linear2 reads attention output and MLP joined: per-row FP8 quantizes both where they
        // lie, and bf16 cuBLASLt multiplies each by its weight columns; elsewhere a copy joins.
        let joined = self.linear2.prepare(&[&attn, &mlp])?;
        let out = self.linear2.apply(&joined, Activation::Identity)?;
        let x = m.gated_add(x, &out)?;
        mark("single.linear2+gated_add", &x)?;
        Ok(x)
    }
}
