//! The two FLUX transformer blocks: double-stream (separate text and image weights, joint
//! attention) and single-stream (one fused QKV+MLP projection over all tokens).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::model::Config;

use super::attention::Resolved;
use super::embed::RopeTable;
use super::layers::{
    Dense, FeedForward, Modulation, Modulator, PlainLayerNorm, ScaledRmsNorm, WeightFormat,
};

/// Width of the MLP for a config.
fn mlp_width(cfg: &Config) -> usize {
    (cfg.hidden_size as f64 * cfg.mlp_ratio) as usize
}

/// Splits a `(batch, tokens, 3·hidden)` projection into q, k, v `(batch, tokens, heads,
/// head_dim)`, with q and k RMS-normalised and rotated.
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

/// One stream's half of a double block.
#[derive(Debug, Clone)]
struct Stream {
    modulator: Modulator,
    norm: PlainLayerNorm,
    qkv: Dense,
    q_norm: ScaledRmsNorm,
    k_norm: ScaledRmsNorm,
    proj: Dense,
    mlp: FeedForward,
}

impl Stream {
    fn new(cfg: &Config, prefix: &str, format: WeightFormat, vb: &VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_heads;
        let attn = vb.pp(format!("{prefix}_attn"));
        Ok(Self {
            modulator: Modulator::new(h, 2, vb.pp(format!("{prefix}_mod")))?,
            norm: PlainLayerNorm::new(h, vb)?,
            qkv: Dense::load(h, 3 * h, cfg.qkv_bias, format, attn.pp("qkv"))?,
            q_norm: ScaledRmsNorm::new(head_dim, attn.pp("norm.query_norm"))?,
            k_norm: ScaledRmsNorm::new(head_dim, attn.pp("norm.key_norm"))?,
            proj: Dense::load(h, h, true, format, attn.pp("proj"))?,
            mlp: FeedForward::new(h, mlp_width(cfg), format, vb.pp(format!("{prefix}_mlp")))?,
        })
    }
}

impl Stream {
    fn weight_bytes(&self) -> usize {
        self.qkv.weight_bytes() + self.proj.weight_bytes() + self.mlp.weight_bytes()
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
    /// Loads `img_*` and `txt_*` weights under `vb`, the projections in `format`.
    pub fn new(cfg: &Config, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            img: Stream::new(cfg, "img", format, &vb)?,
            txt: Stream::new(cfg, "txt", format, &vb)?,
            heads: cfg.num_heads,
        })
    }

    /// Bytes of the projection weights (those `model.fp8` stores as FP8).
    pub fn projection_bytes(&self) -> usize {
        self.img.weight_bytes() + self.txt.weight_bytes()
    }

    /// Updates image and text tokens; `rope` covers text tokens first, then image tokens.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        silu_vec: &Tensor,
        rope: &RopeTable,
        attention: Resolved,
    ) -> Result<(Tensor, Tensor)> {
        let img_mod = self.img.modulator.forward(silu_vec)?;
        let txt_mod = self.txt.modulator.forward(silu_vec)?;
        let qkv_of = |s: &Stream, x: &Tensor, m: &Modulation| {
            let x = m.scale_shift(&s.norm.forward(x)?)?;
            split_qkv(&s.qkv.forward(&x)?, self.heads, &s.q_norm, &s.k_norm)
        };
        let (tq, tk, tv) = qkv_of(&self.txt, txt, &txt_mod[0])?;
        let (iq, ik, iv) = qkv_of(&self.img, img, &img_mod[0])?;
        let q = rope.apply(&Tensor::cat(&[tq, iq], 1)?)?;
        let k = rope.apply(&Tensor::cat(&[tk, ik], 1)?)?;
        let v = Tensor::cat(&[tv, iv], 1)?;
        let attn = attention.run(&q, &k, &v)?;
        let n_txt = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, n_txt)?;
        let img_attn = attn.narrow(1, n_txt, attn.dim(1)? - n_txt)?;

        let finish = |s: &Stream, x: &Tensor, a: &Tensor, m: &[Modulation]| {
            let x = m[0].gated_add(x, &s.proj.forward(a)?)?;
            let mlp = s.mlp.forward(&m[1].scale_shift(&s.norm.forward(&x)?)?)?;
            m[1].gated_add(&x, &mlp)
        };
        Ok((
            finish(&self.img, img, &img_attn, &img_mod)?,
            finish(&self.txt, txt, &txt_attn, &txt_mod)?,
        ))
    }
}

/// A single-stream block.
#[derive(Debug, Clone)]
pub struct SingleBlock {
    linear1: Dense,
    linear2: Dense,
    q_norm: ScaledRmsNorm,
    k_norm: ScaledRmsNorm,
    norm: PlainLayerNorm,
    modulator: Modulator,
    hidden: usize,
    heads: usize,
}

impl SingleBlock {
    /// Loads `linear1`, `linear2`, `norm.*` and `modulation` under `vb`, the two projections
    /// in `format`.
    pub fn new(cfg: &Config, format: WeightFormat, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = mlp_width(cfg);
        Ok(Self {
            linear1: Dense::load(h, 3 * h + mlp, true, format, vb.pp("linear1"))?,
            linear2: Dense::load(h + mlp, h, true, format, vb.pp("linear2"))?,
            q_norm: ScaledRmsNorm::new(h / cfg.num_heads, vb.pp("norm.query_norm"))?,
            k_norm: ScaledRmsNorm::new(h / cfg.num_heads, vb.pp("norm.key_norm"))?,
            norm: PlainLayerNorm::new(h, &vb)?,
            modulator: Modulator::new(h, 1, vb.pp("modulation"))?,
            hidden: h,
            heads: cfg.num_heads,
        })
    }

    /// Bytes of the projection weights (those `model.fp8` stores as FP8).
    pub fn projection_bytes(&self) -> usize {
        self.linear1.weight_bytes() + self.linear2.weight_bytes()
    }

    /// Updates all tokens `x` (text first, then image).
    pub fn forward(
        &self,
        x: &Tensor,
        silu_vec: &Tensor,
        rope: &RopeTable,
        attention: Resolved,
    ) -> Result<Tensor> {
        let m = self.modulator.forward(silu_vec)?;
        let h = self
            .linear1
            .forward(&m[0].scale_shift(&self.norm.forward(x)?)?)?;
        let qkv = h.narrow(D::Minus1, 0, 3 * self.hidden)?;
        let mlp = h.narrow(
            D::Minus1,
            3 * self.hidden,
            h.dim(D::Minus1)? - 3 * self.hidden,
        )?;
        let (q, k, v) = split_qkv(&qkv, self.heads, &self.q_norm, &self.k_norm)?;
        let attn = attention.run(&rope.apply(&q)?, &rope.apply(&k)?, &v)?;
        let out = self
            .linear2
            .forward(&Tensor::cat(&[attn, mlp.gelu()?], 2)?)?;
        m[0].gated_add(x, &out)
    }
}
