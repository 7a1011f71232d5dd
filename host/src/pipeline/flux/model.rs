//! The FLUX.1 rectified-flow transformer, written on candle ops for this project. It loads the
//! BFL checkpoint's tensor names (the same files as candle's stock module, which the tests
//! keep as the reference) and differs where precision or speed asks for it: rotary and
//! timestep embeddings in f32, fused norm kernels, `silu(vec)` computed once per pass,
//! attention in the `(batch, tokens, heads, head_dim)` layout.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::WithForward;
use candle_transformers::models::flux::model::Config;

use super::attention::{AttentionKernel, Resolved};
use super::blocks::{DoubleBlock, SingleBlock};
use super::embed::{RopeTable, timestep_embedding};
use super::layers::{Dense, FinalLayer, MlpEmbedder};
use super::layers::{GemmKernel, Projections, WeightFormat, WeightSize};
use super::modulation_bank::ModulationBank;
use super::stage_profile;

/// Width of the sinusoidal timestep/guidance embedding.
const TIME_EMBED_DIM: usize = 256;

/// Choices that change how the model computes, not what it loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelOptions {
    /// Attention kernel (`model.attention`).
    pub attention: AttentionKernel,
    /// Storage of the blocks' projection weights (`model.fp8`); the embedders, modulation and
    /// final layer stay in the activation dtype.
    pub weights: WeightFormat,
    /// GEMM implementation of the blocks' projections (`model.gemm`).
    pub gemm: GemmKernel,
}

impl ModelOptions {
    /// Options from the settings: `model.attention`, `model.fp8` with `model.fp8_scale`
    /// (see [`WeightFormat::from_settings`]) and `model.gemm`.
    pub fn new(attention: AttentionKernel, weights: WeightFormat, gemm: GemmKernel) -> Self {
        Self {
            attention,
            weights,
            gemm,
        }
    }

    fn projections(&self) -> Projections {
        Projections {
            format: self.weights,
            gemm: self.gemm,
        }
    }
}

/// The transformer.
#[derive(Debug, Clone)]
pub struct FluxModel {
    img_in: Dense,
    txt_in: Dense,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    /// Every block's modulation projection, joined (double blocks' image and text streams in
    /// block order, then the single blocks).
    modulations: ModulationBank,
    final_layer: FinalLayer,
    axes_dim: Vec<usize>,
    theta: f64,
    attention: Resolved,
}

impl FluxModel {
    /// Loads every weight of `cfg` from `vb` (BFL names: `img_in`, `double_blocks.N.*`, ...),
    /// with the attention kernel `auto` picks for the builder's device.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_options(cfg, vb, ModelOptions::default())
    }

    /// [`FluxModel::new`] with chosen options (a fused attention kernel falls back to plain
    /// ops on a device that has none).
    pub fn with_options(cfg: &Config, vb: VarBuilder, options: ModelOptions) -> Result<Self> {
        let attention = options.attention.resolve(vb.device());
        let h = cfg.hidden_size;
        if !h.is_multiple_of(cfg.num_heads)
            || cfg.axes_dim.iter().sum::<usize>() != h / cfg.num_heads
        {
            candle_core::bail!(
                "inconsistent FLUX config: hidden {h}, {} heads, rotary axes {:?}",
                cfg.num_heads,
                cfg.axes_dim
            );
        }
        let double = vb.pp("double_blocks");
        let single = vb.pp("single_blocks");
        let mut sources = Vec::with_capacity(2 * cfg.depth + cfg.depth_single_blocks);
        for i in 0..cfg.depth {
            sources.extend(DoubleBlock::modulation_sources(&double.pp(i)));
        }
        for i in 0..cfg.depth_single_blocks {
            sources.push(SingleBlock::modulation_source(&single.pp(i)));
        }
        let modulations = ModulationBank::load(h, &sources)?;
        Ok(Self {
            modulations,
            img_in: Dense::new(cfg.in_channels, h, true, vb.pp("img_in"))?,
            txt_in: Dense::new(cfg.context_in_dim, h, true, vb.pp("txt_in"))?,
            time_in: MlpEmbedder::new(TIME_EMBED_DIM, h, vb.pp("time_in"))?,
            vector_in: MlpEmbedder::new(cfg.vec_in_dim, h, vb.pp("vector_in"))?,
            guidance_in: cfg
                .guidance_embed
                .then(|| MlpEmbedder::new(TIME_EMBED_DIM, h, vb.pp("guidance_in")))
                .transpose()?,
            double_blocks: (0..cfg.depth)
                .map(|i| DoubleBlock::new(cfg, options.projections(), double.pp(i)))
                .collect::<Result<_>>()?,
            single_blocks: (0..cfg.depth_single_blocks)
                .map(|i| SingleBlock::new(cfg, options.projections(), single.pp(i)))
                .collect::<Result<_>>()?,
            final_layer: FinalLayer::new(h, cfg.in_channels, vb.pp("final_layer"))?,
            axes_dim: cfg.axes_dim.clone(),
            theta: cfg.theta as f64,
            attention,
        })
    }

    /// The attention implementation this model runs.
    pub fn attention(&self) -> Resolved {
        self.attention
    }

    /// The blocks' projection weights, the bulk of the model (and what FP8 halves against
    /// bf16).
    pub fn projection_size(&self) -> WeightSize {
        let double: WeightSize = self
            .double_blocks
            .iter()
            .map(DoubleBlock::projection_size)
            .sum();
        let single: WeightSize = self
            .single_blocks
            .iter()
            .map(SingleBlock::projection_size)
            .sum();
        double + single
    }

    /// The rotary table for text ids then image ids; constant over a generation's steps, so
    /// a sampler may build it once and call [`FluxModel::forward_with_rope`].
    pub fn rope(&self, img_ids: &Tensor, txt_ids: &Tensor) -> Result<RopeTable> {
        RopeTable::new(
            &Tensor::cat(&[txt_ids, img_ids], 1)?,
            &self.axes_dim,
            self.theta,
        )
    }

    /// Predicted velocity for latent patches `img` `(batch, tokens, 64)` at `timesteps`
    /// (batch, in [0, 1]) given T5 tokens `txt`, pooled CLIP `y` and, for the dev variant,
    /// `guidance`.
    pub fn forward_with_rope(
        &self,
        img: &Tensor,
        txt: &Tensor,
        rope: &RopeTable,
        timesteps: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = img.dtype();
        let (n_txt, n_img) = (txt.dim(1)?, img.dim(1)?);
        if rope.tokens() != n_txt + n_img {
            candle_core::bail!(
                "rotary table covers {} tokens, the input has {n_txt} text + {n_img} image",
                rope.tokens()
            );
        }
        let mut vec =
            self.time_in
                .forward(&timestep_embedding(timesteps, TIME_EMBED_DIM, dtype)?)?;
        match (&self.guidance_in, guidance) {
            (Some(g_in), Some(g)) => {
                vec = (vec + g_in.forward(&timestep_embedding(g, TIME_EMBED_DIM, dtype)?)?)?;
            }
            (Some(_), None) => candle_core::bail!("this FLUX.1-dev model needs a guidance value"),
            _ => {}
        }
        let vec = (vec + self.vector_in.forward(y)?)?;
        let silu_vec = vec.silu()?;
        stage_profile::mark("conditioning", &silu_vec)?;
        let modulations = self.modulations.forward(&silu_vec)?;
        let (double_mods, single_mods) = modulations.split_at(2 * self.double_blocks.len());
        if single_mods.len() != self.single_blocks.len() {
            candle_core::bail!(
                "{} modulations for {} double and {} single blocks",
                modulations.len(),
                self.double_blocks.len(),
                self.single_blocks.len()
            );
        }
        stage_profile::mark("modulations", &silu_vec)?;

        let mut txt = self.txt_in.forward(txt)?;
        let mut img = self.img_in.forward(img)?;
        stage_profile::mark("embed", &img)?;
        for (block, mods) in self.double_blocks.iter().zip(double_mods.chunks(2)) {
            let [img_mod, txt_mod] = mods else {
                candle_core::bail!("a double block's modulations come in pairs");
            };
            (img, txt) = block.forward(&img, &txt, (img_mod, txt_mod), rope, self.attention)?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        stage_profile::mark("join txt+img", &x)?;
        for (block, mods) in self.single_blocks.iter().zip(single_mods) {
            let [m] = mods.as_slice() else {
                candle_core::bail!("a single block takes one modulation");
            };
            x = block.forward(&x, m, rope, self.attention)?;
        }
        let out = self
            .final_layer
            .forward(&x.narrow(1, n_txt, n_img)?, &silu_vec)?;
        stage_profile::mark("final_layer", &out)?;
        Ok(out)
    }
}

impl WithForward for FluxModel {
    fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        timesteps: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let rope = self.rope(img_ids, txt_ids)?;
        self.forward_with_rope(img, txt, &rope, timesteps, y, guidance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::demo::demo_flux_config;
    use crate::pipeline::random_weights::RandomWeights;
    use crate::pipeline::rng::Rng;
    use crate::pipeline::variant::Variant;
    use candle_core::{DType, Device};
    use candle_transformers::models::flux::model::Flux;
    use candle_transformers::models::flux::sampling::State;

    /// The stock candle model and ours on the same seeded weights.
    fn both(cfg: &Config, dtype: DType) -> (Flux, FluxModel) {
        both_with(cfg, dtype, AttentionKernel::Auto)
    }

    fn both_with(cfg: &Config, dtype: DType, kernel: AttentionKernel) -> (Flux, FluxModel) {
        let (weights, recording) = RandomWeights::seeded(7);
        let stock_vb = VarBuilder::from_backend(Box::new(weights), DType::F32, Device::Cpu);
        let stock_f32 = Flux::new(cfg, stock_vb).expect("stock model");
        let tensors = recording.take();
        let vb = VarBuilder::from_tensors(tensors.clone(), dtype, &Device::Cpu);
        let options = ModelOptions {
            attention: kernel,
            ..ModelOptions::default()
        };
        let ours = FluxModel::with_options(cfg, vb, options).expect("our model");
        let stock = if dtype == DType::F32 {
            stock_f32
        } else {
            Flux::new(cfg, VarBuilder::from_tensors(tensors, dtype, &Device::Cpu))
                .expect("stock model")
        };
        (stock, ours)
    }

    fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
        rng.normal_tensor(shape, &Device::Cpu).expect("randn")
    }

    /// Inputs for a `h × w` image (in pixels) with `txt` T5 tokens, batch 2.
    fn inputs(
        cfg: &Config,
        h: usize,
        w: usize,
        txt: usize,
        dtype: DType,
    ) -> (State, Tensor, Tensor) {
        let mut rng = Rng::new(3);
        let noise = randn(&mut rng, &[2, 16, h / 8, w / 8]);
        let t5 = randn(&mut rng, &[1, txt, cfg.context_in_dim]);
        let clip = randn(&mut rng, &[1, cfg.vec_in_dim]);
        let cast = |t: Tensor| t.to_dtype(dtype).expect("cast");
        let state = State::new(&cast(t5), &cast(clip), &cast(noise)).expect("state");
        let t = Tensor::new(&[0.75f32, 0.3], &Device::Cpu).expect("t");
        let g = Tensor::new(&[3.5f32, 1.0], &Device::Cpu).expect("g");
        (state, t, g)
    }

    fn run(m: &dyn WithForward, s: &State, t: &Tensor, g: Option<&Tensor>) -> Tensor {
        m.forward(&s.img, &s.img_ids, &s.txt, &s.txt_ids, t, &s.vec, g)
            .and_then(|o| o.to_dtype(DType::F32))
            .expect("forward")
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        crate::pipeline::flux::check::max_rel_error(a, b).expect("error measure")
    }

    #[test]
    fn matches_the_stock_module_in_f32() {
        let cases = [
            (Variant::Schnell, AttentionKernel::Plain),
            (Variant::Dev, AttentionKernel::Plain),
            (Variant::Schnell, AttentionKernel::Fused),
        ];
        for (variant, kernel) in cases {
            let cfg = demo_flux_config(variant);
            let (stock, ours) = both_with(&cfg, DType::F32, kernel);
            assert_eq!(ours.attention(), kernel.resolve(&Device::Cpu));
            let (state, t, g) = inputs(&cfg, 64, 96, 7, DType::F32);
            let g = cfg.guidance_embed.then_some(&g);
            let want = run(&stock, &state, &t, g);
            let got = run(&ours, &state, &t, g);
            assert_eq!(got.dims(), want.dims());
            let err = rel_err(&got, &want);
            // Same math, different kernels (fused norms, f32 rotation): f32 rounding only.
            assert!(
                err < 5e-5,
                "{variant} {kernel:?}: relative error {err} against the stock module"
            );
        }
    }

    #[test]
    fn rope_prebuilt_once_gives_the_same_result() {
        let cfg = demo_flux_config(Variant::Schnell);
        let (_, ours) = both(&cfg, DType::F32);
        let (s, t, _) = inputs(&cfg, 32, 32, 5, DType::F32);
        let rope = ours.rope(&s.img_ids, &s.txt_ids).expect("rope");
        let a = ours
            .forward_with_rope(&s.img, &s.txt, &rope, &t, &s.vec, None)
            .expect("forward");
        let b = run(&ours, &s, &t, None);
        assert_eq!(rel_err(&a, &b), 0.0);
        // A table for other ids is refused, not silently broadcast.
        let (small, _, _) = inputs(&cfg, 16, 16, 5, DType::F32);
        let wrong = ours.rope(&small.img_ids, &small.txt_ids).expect("rope");
        assert!(
            ours.forward_with_rope(&s.img, &s.txt, &wrong, &t, &s.vec, None)
                .is_err()
        );
    }

    #[test]
    fn fp8_stores_projections_in_one_byte_per_weight() {
        let cfg = demo_flux_config(Variant::Schnell);
        let (weights, recording) = RandomWeights::seeded(7);
        let vb = VarBuilder::from_backend(Box::new(weights), DType::F32, Device::Cpu);
        let full = FluxModel::new(&cfg, vb).expect("f32 model");
        let vb = VarBuilder::from_tensors(recording.take(), DType::F32, &Device::Cpu);
        let options = ModelOptions {
            weights: WeightFormat::Fp8,
            ..ModelOptions::default()
        };
        let fp8 = FluxModel::with_options(&cfg, vb, options).expect("fp8 model");
        let (full, fp8) = (full.projection_size(), fp8.projection_size());
        assert!(full.bytes > 0);
        assert_eq!(fp8.bytes * 4, full.bytes);
        assert_eq!(fp8.parameters, full.parameters);
    }

    #[test]
    fn dev_without_guidance_is_an_error() {
        let cfg = demo_flux_config(Variant::Dev);
        let (_, ours) = both(&cfg, DType::F32);
        let (s, t, _) = inputs(&cfg, 32, 32, 5, DType::F32);
        let e = ours
            .forward(&s.img, &s.img_ids, &s.txt, &s.txt_ids, &t, &s.vec, None)
            .expect_err("guidance is required");
        assert!(e.to_string().contains("guidance"), "{e}");
    }
}
