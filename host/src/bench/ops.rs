//! `headshot bench gpu --ops`: the model's building blocks one at a time, at the shapes one
//! forward pass runs them (one image, text and image tokens joined), so a step's time can be
//! split into attention, GEMMs and the memory-bound ops around them. Each figure prints as a
//! `RESULT op_…` line plus its rate: TFLOP/s for GEMMs and attention, GB/s of tensor traffic
//! for the rest.

use std::io::Write;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::model::Config as FluxConfig;

use super::{BenchError, GpuBenchOptions, median, timed};
use crate::pipeline::flux::attention;
use crate::pipeline::flux::blocks::joined_qkv;
use crate::pipeline::flux::decoder::{EPS, GROUPS};
use crate::pipeline::flux::layers::{
    Activation, Dense, GemmKernel, Modulation, PlainLayerNorm, Projections, ScaledRmsNorm,
    WeightFormat,
};
use crate::pipeline::rng::Rng;

/// Times every op; `opts.warmup` / `opts.iters` runs each.
pub(super) fn run(
    opts: &GpuBenchOptions,
    device: &Device,
    dtype: DType,
    cfg: &FluxConfig,
    out: &mut dyn Write,
) -> Result<(), BenchError> {
    let tokens = opts.txt_len + (opts.height / 16) * (opts.width / 16);
    let hidden = cfg.hidden_size;
    let heads = cfg.num_heads;
    let head_dim = hidden / heads;
    let mlp = (hidden as f64 * cfg.mlp_ratio) as usize;
    let mut rng = Rng::new(5);
    let mut randn = |dims: &[usize]| -> candle_core::Result<Tensor> {
        rng.normal_tensor(dims, device)?.to_dtype(dtype)
    };
    let bytes = dtype.size_in_bytes() as f64;
    let time = |out: &mut dyn Write,
                name: &str,
                work: Work,
                f: &dyn Fn() -> candle_core::Result<Tensor>|
     -> Result<(), BenchError> {
        let label = format!("op_{name}");
        let (_, samples) = timed(device, opts.warmup, opts.iters, out, &label, f)?;
        let median = median(&samples);
        let (rate, unit) = match work {
            Work::Flop(f) => (f / median / 1e9, "TFLOP/s"),
            Work::Bytes(b) => (b / median / 1e6, "GB/s"),
        };
        writeln!(out, "RATE op_{name}: {} {unit}", readable(rate))?;
        Ok(())
    };

    // Attention over all tokens.
    let q = randn(&[1, tokens, heads, head_dim])?;
    let k = randn(&[1, tokens, heads, head_dim])?;
    let v = randn(&[1, tokens, heads, head_dim])?;
    let attn_flop = 4.0 * (tokens * tokens * head_dim * heads) as f64;
    time(out, "attention_plain", Work::Flop(attn_flop), &|| {
        attention::plain(&q, &k, &v)
    })?;
    #[cfg(feature = "cuda")]
    if device.is_cuda() && dtype == DType::BF16 {
        use crate::pipeline::flux::flash_cuda::{FlashKernel, attention_with};
        for kernel in FlashKernel::usable(device)? {
            let name = format!("attention_{}", kernel.name());
            time(out, &name, Work::Flop(attn_flop), &|| {
                attention_with(kernel, &q, &k, &v)
            })?;
        }
    }
    drop((q, k, v));

    // The GEMMs of one double block (per stream, all tokens) and one single block.
    let x = randn(&[1, tokens, hidden])?;
    let wide = randn(&[1, tokens, mlp])?;
    let gemms: [(&str, &Tensor, usize); 4] = [
        ("qkv", &x, 3 * hidden),
        ("mlp_up", &x, mlp),
        ("mlp_down", &wide, hidden),
        ("single_linear1", &x, 3 * hidden + mlp),
    ];
    // Untuned unless a row says so (HEADSHOT_GEMM_TUNE=on would tune every row).
    #[cfg(feature = "cuda")]
    let tuning_from_env = {
        let was = crate::pipeline::flux::gemm_algo_cuda::tuning();
        crate::pipeline::flux::gemm_algo_cuda::set_tuning(false);
        was
    };
    for (name, input, output) in gemms {
        let inner = input.dim(2)?;
        let flop = 2.0 * (tokens * inner * output) as f64;
        let w = (randn(&[output, inner])? / (inner as f64).sqrt())?;
        let b = randn(&[output])?;
        let variants = [
            ("_bias", WeightFormat::Full, GemmKernel::Auto),
            ("_bias_plain", WeightFormat::Full, GemmKernel::Plain),
            ("_bias_fp8", WeightFormat::Fp8, GemmKernel::Auto),
            ("_bias_fp8_rows", WeightFormat::Fp8Rows, GemmKernel::Auto),
        ];
        for (tag, format, gemm) in variants {
            let dense =
                Dense::from_parts(w.clone(), Some(b.clone()), Projections { format, gemm })?;
            time(out, &format!("{name}{tag}"), Work::Flop(flop), &|| {
                dense.forward(input)
            })?;
            if name == "mlp_up" && format == WeightFormat::Full {
                let label = format!("{name}{tag}_gelu");
                time(out, &label, Work::Flop(flop), &|| {
                    dense.forward_act(input, Activation::GeluTanh)
                })?;
            }
        }
        // The FP8 GEMMs again with cuBLASLt's candidates timed (HEADSHOT_GEMM_TUNE=on).
        #[cfg(feature = "cuda")]
        if device.is_cuda() && dtype == DType::BF16 {
            use crate::pipeline::flux::gemm_algo_cuda::{set_tuning, tuning};
            let was = tuning();
            set_tuning(true);
            let timed = [
                ("_bias_fp8_tuned", WeightFormat::Fp8),
                ("_bias_fp8_rows_tuned", WeightFormat::Fp8Rows),
            ]
            .into_iter()
            .try_for_each(|(tag, format)| {
                let how = Projections {
                    format,
                    gemm: GemmKernel::Auto,
                };
                let dense = Dense::from_parts(w.clone(), Some(b.clone()), how)?;
                time(out, &format!("{name}{tag}"), Work::Flop(flop), &|| {
                    dense.forward(input)
                })
            });
            set_tuning(was);
            timed?;
        }
        let wt = w.t()?;
        time(out, &format!("{name}_matmul"), Work::Flop(flop), &|| {
            input.broadcast_matmul(&wt)
        })?;
    }

    #[cfg(feature = "cuda")]
    crate::pipeline::flux::gemm_algo_cuda::set_tuning(tuning_from_env);

    // The single block's linear2 reads the attention output and the MLP hidden layer joined:
    // joined first (a copy), then the GEMM; per-row FP8 quantizes from the two parts in place.
    let attn_out = randn(&[1, tokens, hidden])?;
    let w2 = (randn(&[hidden, hidden + mlp])? / ((hidden + mlp) as f64).sqrt())?;
    let b2 = randn(&[hidden])?;
    let flop = 2.0 * (tokens * (hidden + mlp) * hidden) as f64;
    for (tag, format) in [
        ("", WeightFormat::Full),
        ("_fp8", WeightFormat::Fp8),
        ("_fp8_rows", WeightFormat::Fp8Rows),
    ] {
        let how = Projections {
            format,
            gemm: GemmKernel::Auto,
        };
        let dense = Dense::from_parts(w2.clone(), Some(b2.clone()), how)?;
        time(
            out,
            &format!("single_linear2_joined{tag}"),
            Work::Flop(flop),
            &|| dense.apply(&dense.prepare(&[&attn_out, &wide])?, Activation::Identity),
        )?;
        // The join as a copy, then one GEMM (what the model did before).
        time(
            out,
            &format!("single_linear2_cat{tag}"),
            Work::Flop(flop),
            &|| dense.forward(&Tensor::cat(&[&attn_out, &wide], 2)?),
        )?;
    }
    // bf16: one GEMM per part, the second accumulating (the model's default; off with
    // HEADSHOT_SPLIT_GEMM=off).
    #[cfg(feature = "cuda")]
    if crate::pipeline::flux::gemm_cuda::supports_parts(&attn_out, &wide, &w2, &b2) {
        time(out, "single_linear2_parts", Work::Flop(flop), &|| {
            crate::pipeline::flux::gemm_cuda::linear_parts(
                &attn_out,
                &wide,
                &w2,
                &b2,
                Activation::Identity,
            )
        })?;
    }
    drop((attn_out, w2, b2));

    // Memory-bound ops, rated by the bytes they must move at least (read + write once).
    let n_x = (tokens * hidden) as f64 * bytes;
    let n_wide = (tokens * mlp) as f64 * bytes;
    let ones = Tensor::ones(hidden, dtype, device)?;
    let zeros = Tensor::zeros(hidden, dtype, device)?;
    time(out, "layer_norm", Work::Bytes(2.0 * n_x), &|| {
        candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6)
    })?;
    let per_head = x.reshape((1, tokens, heads, head_dim))?;
    let scale = Tensor::ones(head_dim, dtype, device)?;
    time(out, "rms_norm", Work::Bytes(2.0 * n_x), &|| {
        candle_nn::ops::rms_norm(&per_head, &scale, 1e-6)
    })?;
    let shift = randn(&[1, 1, hidden])?;
    let factor = randn(&[1, 1, hidden])?;
    time(out, "modulate", Work::Bytes(2.0 * n_x), &|| {
        x.broadcast_mul(&(&factor + 1.0)?)?.broadcast_add(&shift)
    })?;
    time(out, "gated_add", Work::Bytes(3.0 * n_x), &|| {
        &x + x.broadcast_mul(&factor)?
    })?;
    // The model's adaLN path (one kernel each on CUDA in bf16) for the same two steps.
    let norm = PlainLayerNorm::new(hidden, &VarBuilder::zeros(dtype, device))?;
    let modulation = Modulation::from_parts(shift.clone(), factor.clone(), factor.clone());
    time(out, "adaln_norm_modulate", Work::Bytes(2.0 * n_x), &|| {
        modulation.norm_scale_shift(&norm, &x)
    })?;
    // The same for a per-row FP8 projection: the norm kernel writes e4m3 (1 byte a value)
    // against the norm in bf16 and the per-row quantization after it.
    let rows_layer = Dense::from_parts(
        randn(&[hidden, hidden])?,
        Some(randn(&[hidden])?),
        Projections {
            format: WeightFormat::Fp8Rows,
            gemm: GemmKernel::Auto,
        },
    )?;
    let bytes_e4m3 = (tokens * hidden) as f64 * (bytes + 1.0);
    time(
        out,
        "adaln_norm_modulate_fp8_rows_fused",
        Work::Bytes(bytes_e4m3),
        &|| {
            Ok(modulation
                .norm_scale_shift_for(&norm, &x, &rows_layer)?
                .tensor()
                .clone())
        },
    )?;
    time(
        out,
        "adaln_norm_modulate_then_fp8_rows",
        Work::Bytes(bytes_e4m3),
        &|| {
            Ok(rows_layer
                .prepare(&[&modulation.norm_scale_shift(&norm, &x)?])?
                .tensor()
                .clone())
        },
    )?;
    drop(rows_layer);
    time(out, "adaln_gated_residual", Work::Bytes(3.0 * n_x), &|| {
        modulation.gated_add(&x, &x)
    })?;
    time(out, "gelu", Work::Bytes(2.0 * n_wide), &|| wide.gelu())?;
    time(out, "cat_tokens", Work::Bytes(2.0 * n_x), &|| {
        let half = tokens / 2;
        Tensor::cat(
            &[x.narrow(1, 0, half)?, x.narrow(1, half, tokens - half)?],
            1,
        )
    })?;
    let ids = Tensor::arange(0u32, (tokens * 3) as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((1, tokens, 3))?;
    let rope = crate::pipeline::flux::embed::RopeTable::new(&ids, &cfg.axes_dim, cfg.theta as f64)?;
    time(out, "rope", Work::Bytes(2.0 * n_x), &|| {
        rope.apply(&per_head)
    })?;

    // Queries, keys and values of a single block from its projection: the model's path (one
    // fused kernel each for q and k on CUDA) and the same steps as separate ops.
    let qkv = randn(&[1, tokens, 3 * hidden])?;
    let norm_vb = |name: &str| {
        let tensors = [(
            format!("{name}.scale"),
            Tensor::ones(head_dim, dtype, device)?,
        )];
        Ok::<_, candle_core::Error>(VarBuilder::from_tensors(
            tensors.into_iter().collect(),
            dtype,
            device,
        ))
    };
    let q_norm = ScaledRmsNorm::new(head_dim, norm_vb("q")?.pp("q"))?;
    let k_norm = ScaledRmsNorm::new(head_dim, norm_vb("k")?.pp("k"))?;
    time(out, "qkv_prepare", Work::Bytes(6.0 * n_x), &|| {
        let (q, k, v) = joined_qkv(&[(&qkv, &q_norm, &k_norm)], heads, &rope)?;
        drop((k, v.contiguous()?));
        Ok(q)
    })?;
    time(out, "qkv_prepare_plain", Work::Bytes(6.0 * n_x), &|| {
        let parts = qkv.reshape((1, tokens, 3, heads, head_dim))?;
        let part = |i: usize| parts.narrow(2, i, 1)?.squeeze(2);
        let q = rope.apply(&q_norm.forward(&part(0)?)?)?;
        let k = rope.apply(&k_norm.forward(&part(1)?)?)?;
        drop((k, part(2)?.contiguous()?));
        Ok(q)
    })?;
    drop((x, wide, qkv));
    if !opts.skip_vae {
        vae_ops(opts, device, dtype, out, &time)?;
    }
    Ok(())
}

type TimeFn<'a> = dyn Fn(
        &mut dyn Write,
        &str,
        Work,
        &dyn Fn() -> candle_core::Result<Tensor>,
    ) -> Result<(), BenchError>
    + 'a;

/// The autoencoder decoder's ops at each of its four resolutions (latent ×1, ×2, ×4, ×8 with
/// 512, 512, 256, 128 channels): 3×3 convolution, group norm (32 groups), SiLU, nearest
/// upsampling.
fn vae_ops(
    opts: &GpuBenchOptions,
    device: &Device,
    dtype: DType,
    out: &mut dyn Write,
    time: &TimeFn,
) -> Result<(), BenchError> {
    let mut rng = Rng::new(6);
    let mut randn = |dims: &[usize]| -> candle_core::Result<Tensor> {
        rng.normal_tensor(dims, device)?.to_dtype(dtype)
    };
    let bytes = dtype.size_in_bytes() as f64;
    let (lh, lw) = (opts.height / 8, opts.width / 8);
    for (level, ch) in [(1usize, 512usize), (2, 512), (4, 256), (8, 128)] {
        let (h, w) = (lh * level, lw * level);
        let x = randn(&[1, ch, h, w])?;
        let weight = (randn(&[ch, ch, 3, 3])? / ((9 * ch) as f64).sqrt())?;
        let flop = 2.0 * (ch * ch * 9 * h * w) as f64;
        let tag = format!("{ch}x{h}x{w}");
        time(out, &format!("vae_conv_{tag}"), Work::Flop(flop), &|| {
            x.conv2d(&weight, 1, 1, 1, 1)
        })?;
        if device.is_cuda() && matches!(level, 1 | 8) {
            conv_algorithms(out, time, &x, &weight, &tag, flop)?;
        }
        #[cfg(feature = "cudnn")]
        cudnn_conv_ops(out, time, &x, &weight, &tag, flop, level)?;
        #[cfg(feature = "cuda")]
        {
            let taps = crate::pipeline::flux::decoder::gemm_taps(&weight)?;
            let bias = Tensor::zeros(ch, dtype, device)?;
            if crate::pipeline::flux::conv_gemm_cuda::supports(&x, &taps, false) {
                // Padding, three GEMMs, bias and crop: what HEADSHOT_CONV=gemm runs.
                time(
                    out,
                    &format!("vae_conv_gemm_{tag}"),
                    Work::Flop(flop),
                    &|| crate::pipeline::flux::conv_gemm_cuda::conv2d(&x, &taps, &bias),
                )?;
                if level < 8 && crate::pipeline::flux::conv_gemm_cuda::supports(&x, &taps, true) {
                    // The next level's upsample conv: 4x the pixels, the upsampling read
                    // through instead of written.
                    time(
                        out,
                        &format!("vae_upsample_conv_gemm_{tag}"),
                        Work::Flop(4.0 * flop),
                        &|| {
                            crate::pipeline::flux::conv_gemm_cuda::upsample_conv2d(&x, &taps, &bias)
                        },
                    )?;
                }
            }
        }
        // The decoder's norms: unit weight, zero bias, its groups and epsilon.
        let (one, zero) = (
            Tensor::ones(ch, dtype, device)?,
            Tensor::zeros(ch, dtype, device)?,
        );
        let gn = candle_nn::GroupNorm::new(one.clone(), zero.clone(), ch, GROUPS, EPS)?;
        let n = (ch * h * w) as f64 * bytes;
        time(
            out,
            &format!("vae_group_norm_{tag}"),
            Work::Bytes(2.0 * n),
            &|| candle_core::Module::forward(&gn, &x),
        )?;
        time(
            out,
            &format!("vae_silu_{tag}"),
            Work::Bytes(2.0 * n),
            &|| x.silu(),
        )?;
        // A convolution's bias as candle's Conv2d adds it: a broadcast add, on candle's
        // strided path (what the cuDNN path's epilogue replaces).
        time(
            out,
            &format!("vae_bias_add_{tag}"),
            Work::Bytes(2.0 * n),
            &|| x.broadcast_add(&zero.reshape((1, ch, 1, 1))?),
        )?;
        #[cfg(feature = "cuda")]
        if crate::pipeline::flux::group_norm_cuda::supports(&x, GROUPS) {
            // Reads x twice and writes once; what the decoder runs in place of the two above.
            time(
                out,
                &format!("vae_group_norm_silu_fused_{tag}"),
                Work::Bytes(3.0 * n),
                &|| {
                    crate::pipeline::flux::group_norm_cuda::group_norm(
                        &x, &one, &zero, GROUPS, EPS as f32, true,
                    )
                },
            )?;
        }
        if level < 8 {
            time(
                out,
                &format!("vae_upsample_{tag}"),
                Work::Bytes(5.0 * n),
                &|| x.upsample_nearest2d(2 * h, 2 * w),
            )?;
        }
    }
    // The implicit-GEMM convolutions last (the prep pass with cuDNN convolving first, then our
    // kernels), and the wgmma kernel (never run on a GPU yet) after the others: a kernel that
    // faults leaves the CUDA context unusable, and every row before it is printed already.
    #[cfg(feature = "cuda")]
    {
        use crate::pipeline::flux::conv_implicit_cuda::{Engine, Tile};
        let mut passes = vec![vec![
            Engine::Kernel(Tile::Narrow),
            Engine::Kernel(Tile::Wide),
        ]];
        #[cfg(feature = "cudnn")]
        passes.insert(0, vec![Engine::Cudnn]);
        if Tile::Wgmma.runs_on(device) {
            passes.push(vec![Engine::Kernel(Tile::Wgmma)]);
        }
        for engines in passes {
            for (level, ch) in [(1usize, 512usize), (2, 512), (4, 256), (8, 128)] {
                let (h, w) = (lh * level, lw * level);
                let x = randn(&[1, ch, h, w])?;
                let weight = (randn(&[ch, ch, 3, 3])? / ((9 * ch) as f64).sqrt())?;
                let flop = 2.0 * (ch * ch * 9 * h * w) as f64;
                let shape = ImplicitShape {
                    tag: format!("{ch}x{h}x{w}"),
                    flop,
                    upsample_too: level < 8,
                };
                implicit_conv_ops(out, time, &x, &weight, &shape, &engines)?;
            }
        }
    }
    Ok(())
}

/// One decoder shape for [`implicit_conv_ops`]: its row tag, the 3×3 convolution's FLOP, and
/// whether the next level's upsampling convolution is timed too.
#[cfg(feature = "cuda")]
struct ImplicitShape {
    tag: String,
    flop: f64,
    upsample_too: bool,
}

/// The implicit-GEMM convolution (`HEADSHOT_CONV=implicit…`) on `x` with each of `engines`
/// (name suffix `` for the narrow tile, `_wide` where rows are 256 or wider, `_wgmma`,
/// `_on_cudnn` for cuDNN convolving the prep pass's image): alone
/// (`vae_conv_implicit*_*`); as a resnet's second convolution runs it (group norm + SiLU
/// before, residual after: `vae_norm_conv_residual_implicit*_*`, and with the narrow tile,
/// against the fused norm, the GEMM convolution and an add as separate steps when those take
/// the shape: `vae_norm_conv_residual_gemm_*`); and, below the top level, the next level's
/// upsampling convolution (`vae_upsample_conv_implicit*_*`, 4× the work).
#[cfg(feature = "cuda")]
fn implicit_conv_ops(
    out: &mut dyn Write,
    time: &TimeFn,
    x: &Tensor,
    weight: &Tensor,
    shape: &ImplicitShape,
    engines: &[crate::pipeline::flux::conv_implicit_cuda::Engine],
) -> Result<(), BenchError> {
    use crate::pipeline::flux::conv_implicit_cuda::{
        Engine, InputNorm, Tile, conv3x3, supports, weights_for,
    };
    use crate::pipeline::flux::{conv_gemm_cuda, decoder, group_norm_cuda};
    let (tag, flop) = (&shape.tag, shape.flop);
    let ch = x.dim(1)?;
    let w = x.dim(3)?;
    let bias = Tensor::zeros(ch, x.dtype(), x.device())?;
    // Every input its own tensor: an op read-locks each input's storage, and std's RwLock may
    // panic on a second read lock of the same one from the same thread.
    let norm = InputNorm {
        weight: Tensor::ones(ch, x.dtype(), x.device())?,
        bias: Tensor::zeros(ch, x.dtype(), x.device())?,
        groups: GROUPS,
        eps: EPS as f32,
        silu: true,
    };
    let skip = x.copy()?;
    // Whether `engine` runs on rows `w` wide as asked (a wide tile falls to the narrow one on
    // narrower rows, which the narrow tile's own rows time already).
    let as_asked = |engine: Engine, w: usize| match engine {
        Engine::Kernel(tile) => Tile::for_width(w, tile) == tile,
        #[cfg(feature = "cudnn")]
        Engine::Cudnn => true,
    };
    for &engine in engines {
        let taps = weights_for(engine, weight)?;
        if !supports(x, &taps, &bias, false, Some(&norm), Some(&skip), engine) {
            continue;
        }
        let suffix = engine.suffix();
        // Our kernels' rows stop the run on an error (a faulting kernel leaves the context
        // unusable); cuDNN's report it and go on.
        let row = |out: &mut dyn Write,
                   name: String,
                   work: Work,
                   f: &dyn Fn() -> candle_core::Result<Tensor>| match engine {
            Engine::Kernel(_) => time(out, &name, work, f),
            #[cfg(feature = "cudnn")]
            Engine::Cudnn => time_or_report(out, time, &name, work, f),
        };
        if as_asked(engine, w) {
            row(
                out,
                format!("vae_conv_implicit{suffix}_{tag}"),
                Work::Flop(flop),
                &|| conv3x3(x, &taps, &bias, None, false, None, engine),
            )?;
            row(
                out,
                format!("vae_norm_conv_residual_implicit{suffix}_{tag}"),
                Work::Flop(flop),
                &|| conv3x3(x, &taps, &bias, Some(&norm), false, Some(&skip), engine),
            )?;
        }
        if shape.upsample_too
            && as_asked(engine, 2 * w)
            && supports(x, &taps, &bias, true, None, None, engine)
        {
            row(
                out,
                format!("vae_upsample_conv_implicit{suffix}_{tag}"),
                Work::Flop(4.0 * flop),
                &|| conv3x3(x, &taps, &bias, None, true, None, engine),
            )?;
        }
    }
    let gemm_taps = decoder::gemm_taps(weight)?;
    if engines.contains(&Engine::Kernel(Tile::Narrow))
        && group_norm_cuda::supports(x, GROUPS)
        && conv_gemm_cuda::supports(x, &gemm_taps, false)
    {
        time(
            out,
            &format!("vae_norm_conv_residual_gemm_{tag}"),
            Work::Flop(flop),
            &|| {
                let normed =
                    group_norm_cuda::group_norm(x, &norm.weight, &bias, GROUPS, EPS as f32, true)?;
                conv_gemm_cuda::conv2d(&normed, &gemm_taps, &bias)? + x
            },
        )?;
    }
    Ok(())
}

/// The cuDNN path with tensor-core math at one decoder level, in each layout
/// (`HEADSHOT_CONV=cudnn`: `vae_conv_cudnn_*`, `cudnn_nhwc`: `vae_conv_cudnn_nhwc_*`, the
/// transforms to NHWC and back included): the heuristic's pick (`vae_conv_cudnn_{tag}`); at
/// the lowest and the top level each algorithm of
/// [`ALGORITHMS`](crate::pipeline::flux::conv_cudnn_cuda::ALGORITHMS)
/// (`vae_conv_cudnn_{algo}_{tag}`); below the top level the next level's upsampling
/// convolution, candle's upsampling then the convolution (`vae_upsample_conv_cudnn_{tag}`, 4×
/// the work).
#[cfg(feature = "cudnn")]
fn cudnn_conv_ops(
    out: &mut dyn Write,
    time: &TimeFn,
    x: &Tensor,
    weight: &Tensor,
    tag: &str,
    flop: f64,
    level: usize,
) -> Result<(), BenchError> {
    use crate::pipeline::flux::conv_cudnn_cuda::{
        ALGORITHMS, CudnnLayout, algorithm_name, conv2d, conv2d_bias, supports, takes_epilogue,
        weights_for,
    };
    for layout in [CudnnLayout::Nchw, CudnnLayout::Nhwc] {
        let weight = weights_for(layout, weight)?;
        if !supports(x, &weight, layout) {
            continue;
        }
        let path = format!("cudnn{}", layout.suffix());
        time_or_report(
            out,
            time,
            &format!("vae_conv_{path}_{tag}"),
            Work::Flop(flop),
            &|| conv2d(x, &weight, layout, None),
        )?;
        // As a resnet's second convolution runs it: the bias and the residual added in one
        // pass after cuDNN.
        let cout = weight.dim(0)?;
        if takes_epilogue(x, cout, Some(x)) {
            let bias = Tensor::zeros(cout, x.dtype(), x.device())?;
            // Its own tensor: an op read-locks each input's storage once.
            let skip = x.copy()?;
            time_or_report(
                out,
                time,
                &format!("vae_conv_bias_residual_{path}_{tag}"),
                Work::Flop(flop),
                &|| conv2d_bias(x, &weight, &bias, Some(&skip), layout),
            )?;
        }
        if matches!(level, 1 | 8) {
            for algorithm in ALGORITHMS {
                let algo = algorithm_name(algorithm);
                time_or_report(
                    out,
                    time,
                    &format!("vae_conv_{path}_{algo}_{tag}"),
                    Work::Flop(flop),
                    &|| conv2d(x, &weight, layout, Some(algorithm)),
                )?;
            }
        }
        if level < 8 {
            let (_, _, h, w) = x.dims4()?;
            time_or_report(
                out,
                time,
                &format!("vae_upsample_conv_{path}_{tag}"),
                Work::Flop(4.0 * flop),
                &|| conv2d(&x.upsample_nearest2d(2 * h, 2 * w)?, &weight, layout, None),
            )?;
        }
    }
    Ok(())
}

/// `time`'s row `name`, or where the op fails, a `RATE op_{name}: unsupported (…)` row in its
/// place: for paths first run on a GPU whose failure must not end the rows after them.
fn time_or_report(
    out: &mut dyn Write,
    time: &TimeFn,
    name: &str,
    work: Work,
    f: &dyn Fn() -> candle_core::Result<Tensor>,
) -> Result<(), BenchError> {
    if let Err(e) = time(out, name, work, f) {
        writeln!(out, "RATE op_{name}: unsupported ({e})")?;
    }
    Ok(())
}

/// The same 3×3 convolution with each cuDNN forward algorithm forced (candle otherwise takes
/// cuDNN's heuristic pick): which one, if any, reaches tensor-core speed on bf16 NCHW. An
/// algorithm cuDNN refuses for these inputs is reported as such, not fatal.
fn conv_algorithms(
    out: &mut dyn Write,
    time: &TimeFn,
    x: &Tensor,
    weight: &Tensor,
    tag: &str,
    flop: f64,
) -> Result<(), BenchError> {
    use candle_core::conv::CudnnFwdAlgo as A;
    for algo in [
        A::ImplicitGemm,
        A::ImplicitPrecompGemm,
        A::Gemm,
        A::Direct,
        A::Fft,
        A::FftTiling,
        A::Winograd,
        A::WinogradNonFused,
    ] {
        let name = format!("vae_conv_{tag}_{algo:?}").to_lowercase();
        time_or_report(out, time, &name, Work::Flop(flop), &|| {
            x.conv2d_with_algo(weight, 1, 1, 1, 1, Some(algo))
        })?;
    }
    Ok(())
}

/// What an op must do at least, for its rate.
#[derive(Clone, Copy)]
enum Work {
    /// Floating-point operations.
    Flop(f64),
    /// Bytes read plus written.
    Bytes(f64),
}

/// One decimal where that shows the value, scientific notation where it would round to 0
/// (tiny CPU shapes).
fn readable(x: f64) -> String {
    if x >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_op_is_reported_unsupported_and_the_rows_after_it_still_run() {
        // A timer that runs the op once and prints a rate, as `run`'s does.
        let time: &TimeFn = &|out, name, _work, f| {
            f()?;
            writeln!(out, "RATE op_{name}: 1 GB/s")?;
            Ok(())
        };
        let mut out = Vec::new();
        time_or_report(&mut out, time, "refused", Work::Bytes(1.0), &|| {
            Err(candle_core::Error::Msg("CUDNN_STATUS_NOT_SUPPORTED".into()))
        })
        .expect("a failing op is a row, not an error");
        time_or_report(&mut out, time, "runs", Work::Bytes(1.0), &|| {
            Tensor::zeros(1, DType::F32, &Device::Cpu)
        })
        .expect("a row");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("RATE op_refused: unsupported (")
                && lines[0].contains("NOT_SUPPORTED"),
            "{text}"
        );
        assert_eq!(lines[1], "RATE op_runs: 1 GB/s");
    }
}
