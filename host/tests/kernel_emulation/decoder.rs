//! The decoder's kernels: group norm and the convolution GEMMs' pad and crop.

use crate::kernel_emu::*;
use candle_core::{DType, Device, Tensor};
use headshot_host::pipeline::flux::conv_launch::{
    Launch, Tile, bias_residual_launch, nhwc_out_launch, prep_launch,
};
use headshot_host::pipeline::flux::decoder::gemm_taps;

/// `group_norm_cuda::chunking`: a group split into chunks of at least 8192 values, at most 32
/// of them, each even.
fn chunking(group_len: usize) -> (usize, usize) {
    let chunk = group_len.div_ceil(32).max(8192);
    let chunk = chunk + chunk % 2;
    (chunk, group_len.div_ceil(chunk).max(1))
}

/// A group's mean and 1/std in f64 (epsilon 1e-6): the reference for the norm kernels.
fn mean_rstd(group: &[f32]) -> (f64, f64) {
    let n = group.len() as f64;
    let mean = group.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = group
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + 1e-6).sqrt())
}

#[test]
fn group_norm_kernels_match_f64_with_and_without_silu() {
    // One chunk per group; two chunks (8192 + 1024); channels of an odd number of pairs.
    for (batch, channels, groups, h, w) in
        [(2, 8, 4, 48, 48), (1, 16, 4, 48, 48), (1, 6, 3, 10, 13)]
    {
        let channel_len = h * w;
        let group_len = channels / groups * channel_len;
        let (chunk_len, chunks) = chunking(group_len);
        let all_groups = batch * groups;
        let n = batch * channels * channel_len;
        let x: Vec<f32> = random(n, 9)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 3.0 + (i / channel_len % 5) as f32)
            .collect();
        let (x_bytes, x) = bf16_buffer(&x);
        let (w_bytes, weight) = bf16_buffer(&random(channels, 10));
        let (b_bytes, bias) = bf16_buffer(&random(channels, 11));
        let cfg = Config {
            grid: (chunks as u32, all_groups as u32, 1),
            block: 256,
            smem: 0,
        };
        let partials = launch(
            "headshot_group_stats_bf16",
            &cfg,
            &[
                Arg::In(x_bytes.clone()),
                Arg::I64(group_len as i64),
                Arg::I64(chunk_len as i64),
                Arg::Out(8 * 2 * all_groups * chunks),
            ],
        );
        for silu in [false, true] {
            let y = launch(
                "headshot_group_apply_bf16",
                &cfg,
                &[
                    Arg::In(x_bytes.clone()),
                    Arg::In(partials[0].clone()),
                    Arg::I32(chunks as i32),
                    Arg::In(w_bytes.clone()),
                    Arg::In(b_bytes.clone()),
                    Arg::I32(groups as i32),
                    Arg::I64(group_len as i64),
                    Arg::I64(chunk_len as i64),
                    Arg::I64(channel_len as i64),
                    Arg::F32(1e-6),
                    Arg::I32(i32::from(silu)),
                    Arg::Out(2 * n),
                ],
            );
            let mut want = Vec::with_capacity(n);
            for (g, group) in x.chunks(group_len).enumerate() {
                let (mean, rstd) = mean_rstd(group);
                for (i, &v) in group.iter().enumerate() {
                    let c = g % groups * (channels / groups) + i / channel_len;
                    let y =
                        (f64::from(v) - mean) * rstd * f64::from(weight[c]) + f64::from(bias[c]);
                    want.push((if silu { y / (1.0 + (-y).exp()) } else { y }) as f32);
                }
            }
            let case =
                format!("group norm {batch}x{channels}x{h}x{w}, {groups} groups, silu {silu}");
            check_bf16(&case, &bf16_values(&y[0]), &want);
        }
    }
}

#[test]
fn convolution_gemm_kernels_with_the_gemms_in_rust_match_candles_convolution() {
    // 3×3, 3×3 over the input upsampled 2×, 1×1; widths whose padded rows (wp) differ.
    for (cin, cout, (h0, w0), kernel, upsample) in [
        (8, 5, (7, 6), 3, false),
        (16, 3, (5, 4), 3, true),
        (8, 4, (4, 6), 1, false),
    ] {
        let case = format!("{cin}->{cout} {h0}x{w0} {kernel}x{kernel} upsample {upsample}");
        let up = usize::from(upsample);
        let (h, w) = (h0 << up, w0 << up);
        let taps = if kernel == 3 { 3 } else { 1 };
        let (x_bytes, x) = bf16_buffer(&random(cin * h0 * w0, 12));
        let (_, weights) = bf16_buffer(&random(cout * cin * kernel * kernel, 13));
        let (bias_bytes, bias) = bf16_buffer(&random(cout, 14));
        let weights = Tensor::from_vec(weights, (cout, cin, kernel, kernel), &Device::Cpu).unwrap();
        let tap_values: Vec<f32> = gemm_taps(&weights)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap();
        let k = taps * cin;
        // conv_gemm_cuda: padded rows of wp values, (h+2)·wp per padded plane, h·wp GEMM rows.
        let wp = if taps == 3 {
            (w + 2).div_ceil(8) * 8
        } else {
            w
        };
        let plane = if taps == 3 { (h + 2) * wp } else { h * w };
        let rows = h * wp;
        let grid = |n: usize, planes: usize| Config {
            grid: (n.div_ceil(256).clamp(1, 4096) as u32, planes as u32, 1),
            block: 256,
            smem: 0,
        };
        let a = if taps == 3 {
            let padded = launch(
                "headshot_conv_pad3_bf16",
                &grid(plane, 3 * cin),
                &[
                    Arg::In(x_bytes.clone()),
                    Arg::I32(cin as i32),
                    Arg::I32(h as i32),
                    Arg::I32(w as i32),
                    Arg::I32(wp as i32),
                    Arg::I32(up as i32),
                    Arg::Out(2 * 3 * cin * plane),
                ],
            );
            bf16_values(&padded[0])
        } else {
            x.clone()
        };
        // gemm_bf16_f32's contract: A rows × k column-major with leading dimension `plane`,
        // starting dy padded rows in; B tap dy's k × cout column-major (ld k); D rows × cout
        // (ld rows), accumulated over the taps.
        let mut acc = vec![0f32; cout * rows];
        for dy in 0..taps {
            for o in 0..cout {
                for p in 0..rows {
                    let sum: f32 = (0..k)
                        .map(|kk| {
                            a[kk * plane + dy * wp + p] * tap_values[(dy * cout + o) * k + kk]
                        })
                        .sum();
                    acc[o * rows + p] += sum;
                }
            }
        }
        let y = launch(
            "headshot_conv_crop_bias_bf16",
            &grid(h * w, cout),
            &[
                Arg::In(f32_bytes(&acc)),
                Arg::In(bias_bytes),
                Arg::I32(h as i32),
                Arg::I32(w as i32),
                Arg::I32(wp as i32),
                Arg::Out(2 * cout * h * w),
            ],
        );
        let input = Tensor::from_vec(x, (1, cin, h0, w0), &Device::Cpu).unwrap();
        let input = if upsample {
            input.upsample_nearest2d(h, w).unwrap()
        } else {
            input
        };
        let want = input
            .conv2d(&weights, kernel / 2, 1, 1, 1)
            .and_then(|t| t.broadcast_add(&Tensor::from_vec(bias, (1, cout, 1, 1), &Device::Cpu)?))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        check_bf16(&format!("convolution {case}"), &bf16_values(&y[0]), &want);
    }
}

// ---- the implicit-GEMM convolution (conv_implicit_cuda.rs) ---------------------------------

/// The emulator's launch configuration for a launch `conv_launch` gives (as
/// conv_implicit_cuda passes it to the driver).
fn config(launch: &Launch) -> Config {
    Config {
        grid: launch.grid,
        block: launch.threads,
        smem: launch.smem,
    }
}

/// The prep pass over one image whose (upsampled) size is `h × w`, by `up` from the source,
/// as conv_implicit_cuda launches it: kernel and launch configuration.
fn prep_config(channels: usize, h: usize, w: usize, up: i32) -> (&'static str, Config) {
    let launch = prep_launch(channels, h, w, w >> up);
    (launch.entry, config(&launch))
}

/// The convolution of an `h × w` output of `cout` channels with `tile`, as
/// conv_implicit_cuda launches it.
fn conv_config(tile: Tile, cout: usize, h: usize, w: usize) -> (&'static str, Config) {
    let launch = tile.launch(cout, h, w);
    (launch.entry, config(&launch))
}

/// `values` (channels × h × w) as the zero-padded NHWC image the convolution reads.
fn padded_nhwc(values: &[f32], channels: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; (h + 2) * (w + 2) * channels];
    for c in 0..channels {
        for r in 0..h {
            for col in 0..w {
                out[((r + 1) * (w + 2) + col + 1) * channels + c] = values[(c * h + r) * w + col];
            }
        }
    }
    out
}

/// Weights `(cout, cin, 3, 3)` as the convolution kernel reads them.
fn implicit_tap_values(weights: &Tensor) -> Vec<f32> {
    headshot_host::pipeline::flux::decoder::implicit_taps(weights)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// `x` `(1, cin, h, w)` convolved (3×3, padding 1) with `weights`, plus `bias` (and
/// `residual`), by candle on the CPU in f32.
fn candle_conv3x3(
    x: Tensor,
    weights: &Tensor,
    bias: Vec<f32>,
    residual: Option<Vec<f32>>,
) -> Vec<f32> {
    let cout = bias.len();
    let y = x
        .conv2d(weights, 1, 1, 1, 1)
        .and_then(|t| t.broadcast_add(&Tensor::from_vec(bias, (1, cout, 1, 1), &Device::Cpu)?))
        .unwrap();
    let y = match residual {
        Some(r) => {
            let r = Tensor::from_vec(r, y.shape(), &Device::Cpu).unwrap();
            (y + r).unwrap()
        }
        None => y,
    };
    y.flatten_all().and_then(|t| t.to_vec1()).unwrap()
}

/// group_norm_cuda::group_stats's two launches over `all_groups` groups of `group_len` values
/// of bf16 `x`: the (mean, 1/std) f32 pairs, epsilon 1e-6.
fn group_stats(x: &[u8], all_groups: usize, group_len: usize) -> Vec<u8> {
    let (chunk_len, chunks) = chunking(group_len);
    let partials = launch(
        "headshot_group_stats_bf16",
        &Config {
            grid: (chunks as u32, all_groups as u32, 1),
            block: 256,
            smem: 0,
        },
        &[
            Arg::In(x.to_vec()),
            Arg::I64(group_len as i64),
            Arg::I64(chunk_len as i64),
            Arg::Out(8 * 2 * all_groups * chunks),
        ],
    );
    let stats = launch(
        "headshot_group_finalize_bf16",
        &Config {
            grid: (all_groups.div_ceil(256) as u32, 1, 1),
            block: 256,
            smem: 0,
        },
        &[
            Arg::In(x.to_vec()),
            Arg::In(partials[0].clone()),
            Arg::I32(chunks as i32),
            Arg::I32(all_groups as i32),
            Arg::I64(group_len as i64),
            Arg::F32(1e-6),
            Arg::Out(4 * 2 * all_groups),
        ],
    );
    stats[0].clone()
}

#[test]
fn group_finalize_gives_each_groups_mean_and_inverse_std() {
    // One chunk per group, and two.
    for (batch, channels, groups, h, w) in [(2, 8, 4, 16, 16), (1, 16, 4, 48, 48)] {
        let channel_len = h * w;
        let group_len = channels / groups * channel_len;
        let all_groups = batch * groups;
        let x: Vec<f32> = random(batch * channels * channel_len, 21)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 2.0 + 7.0 + (i / group_len) as f32)
            .collect();
        let (x_bytes, x) = bf16_buffer(&x);
        let stats = f32_values(&group_stats(&x_bytes, all_groups, group_len));
        for (g, group) in x.chunks(group_len).enumerate() {
            let (mean, rstd) = mean_rstd(group);
            let (got_mean, got_rstd) = (f64::from(stats[2 * g]), f64::from(stats[2 * g + 1]));
            assert!(
                (got_mean - mean).abs() <= 1e-5 * mean.abs(),
                "group {g}: mean {got_mean} for {mean}"
            );
            assert!(
                (got_rstd - rstd).abs() <= 1e-5 * rstd,
                "group {g}: 1/std {got_rstd} for {rstd}"
            );
        }
    }
}

/// The group norm a prep launch applies: per-group (mean, 1/std) f32 bytes, the per-channel
/// weight and bias as bf16 bytes, and whether SiLU follows.
struct PrepNorm {
    stats: Vec<u8>,
    gamma: Vec<u8>,
    beta: Vec<u8>,
    groups: usize,
    silu: bool,
}

/// The prep pass over bf16 `x` (`channels` × source image) into an `h × w` output upsampled by
/// `up`, normalized when `norm` is given, launched as conv_implicit_cuda does: the kernel that
/// ran and the padded NHWC output bytes.
fn run_prep(
    x: Vec<u8>,
    (channels, h, w, up): (usize, usize, usize, i32),
    norm: Option<PrepNorm>,
) -> (&'static str, Vec<u8>) {
    let (kernel, cfg) = prep_config(channels, h, w, up);
    let on = norm.is_some();
    // Without a norm the kernel reads none of these: small placeholders stand in.
    let norm = norm.unwrap_or(PrepNorm {
        stats: vec![0; 8],
        gamma: vec![0; 2],
        beta: vec![0; 2],
        groups: 1,
        silu: false,
    });
    let out = launch(
        kernel,
        &cfg,
        &[
            Arg::In(x),
            Arg::I32(channels as i32),
            Arg::I32(h as i32),
            Arg::I32(w as i32),
            Arg::I32(up),
            Arg::I32(i32::from(on)),
            Arg::In(norm.stats),
            Arg::In(norm.gamma),
            Arg::In(norm.beta),
            Arg::I32(norm.groups as i32),
            Arg::I32(i32::from(norm.silu)),
            Arg::Out(2 * (h + 2) * (w + 2) * channels),
        ],
    );
    (kernel, out.into_iter().next().unwrap())
}

/// The convolution kernel of `tile` over padded NHWC bf16 `xp` (`cin` channels, an `h × w`
/// output of `cout`), with `taps`, `bias` and (added when `with_residual`) `residual` bytes,
/// launched as conv_implicit_cuda does: the kernel that ran and its output bytes.
fn run_conv(
    tile: Tile,
    (xp, taps, bias, residual): (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>),
    with_residual: bool,
    (cin, cout, h, w): (usize, usize, usize, usize),
) -> (&'static str, Vec<u8>) {
    let (kernel, cfg) = conv_config(tile, cout, h, w);
    let y = launch(
        kernel,
        &cfg,
        &[
            Arg::In(xp),
            Arg::In(taps),
            Arg::In(bias),
            Arg::In(residual),
            Arg::I32(i32::from(with_residual)),
            Arg::I32(cin as i32),
            Arg::I32(cout as i32),
            Arg::I32(h as i32),
            Arg::I32(w as i32),
            Arg::Out(2 * cout * h * w),
        ],
    );
    (kernel, y.into_iter().next().unwrap())
}

/// bf16-rounded 3×3 weights `(cout, cin, 3, 3)` scaled by 1/√(9·cin), from `seed`.
fn conv_weights(cout: usize, cin: usize, seed: u64) -> Tensor {
    let scale = (9.0 * cin as f32).sqrt();
    let values: Vec<f32> = random(cout * cin * 9, seed)
        .iter()
        .map(|v| v / scale)
        .collect();
    let (_, values) = bf16_buffer(&values);
    Tensor::from_vec(values, (cout, cin, 3, 3), &Device::Cpu).unwrap()
}

#[test]
fn conv_prep_pads_transposes_and_applies_norm_silu_and_upsampling() {
    let (channels, groups) = (64, 32);
    // The scalar kernel: one block of columns, two (w + 2 = 44), upsampled; with and without
    // the norm. The vector kernel (source widths in multiples of 8): one block, two (the
    // second part-empty), upsampled into one block and into two.
    for ((h0, w0), up, norm, silu) in [
        ((5, 7), 0, false, false),
        ((3, 42), 0, true, true),
        ((4, 6), 1, true, false),
        ((2, 5), 1, false, false),
        ((3, 40), 0, true, true),
        ((2, 72), 0, true, false),
        ((4, 16), 1, true, true),
        ((3, 40), 1, false, false),
    ] {
        let (h, w) = (h0 << up, w0 << up);
        let (x_bytes, x) = bf16_buffer(&random(channels * h0 * w0, 22));
        let (g_bytes, gamma) = bf16_buffer(&random(channels, 23));
        let (b_bytes, beta) = bf16_buffer(&random(channels, 24));
        let stats: Vec<f32> = random(2 * groups, 25)
            .chunks(2)
            .flat_map(|p| [p[0], 0.5 + p[1].abs()])
            .collect();
        let prep_norm = PrepNorm {
            stats: f32_bytes(&stats),
            gamma: g_bytes,
            beta: b_bytes,
            groups,
            silu,
        };
        let (kernel, out) = run_prep(x_bytes, (channels, h, w, up), norm.then_some(prep_norm));
        let case = format!("{kernel} {h0}x{w0} up {up} norm {norm} silu {silu}");
        let mut image = vec![0f32; channels * h * w];
        for c in 0..channels {
            let g = c / (channels / groups);
            for r in 0..h {
                for col in 0..w {
                    let mut v = f64::from(x[(c * h0 + (r >> up)) * w0 + (col >> up)]);
                    if norm {
                        v = (v - f64::from(stats[2 * g]))
                            * f64::from(stats[2 * g + 1])
                            * f64::from(gamma[c])
                            + f64::from(beta[c]);
                        if silu {
                            v /= 1.0 + (-v).exp();
                        }
                    }
                    image[(c * h + r) * w + col] = v as f32;
                }
            }
        }
        let want = padded_nhwc(&image, channels, h, w);
        let got = bf16_values(&out);
        check_bf16(&case, &got, &want);
        let border_zero = (0..(h + 2) * (w + 2)).all(|p| {
            let (r, col) = (p / (w + 2), p % (w + 2));
            let border = r == 0 || r == h + 1 || col == 0 || col == w + 1;
            !border
                || got[p * channels..(p + 1) * channels]
                    .iter()
                    .all(|&v| v == 0.0)
        });
        assert!(border_zero, "{case}: the padding is not zero");
    }
}

#[test]
fn implicit_convolution_matches_candles_convolution() {
    // One channel slice and 128 outputs; two pixel tiles (the second 8 wide) and two
    // output-channel blocks, with the residual; three slices: for the narrow and the wgmma
    // kernel. The wide kernel (on rows of 256 or more, where the wrapper takes it): one full
    // block; two blocks (the second 8 wide) and two channel blocks. Each case launches as
    // conv_implicit_cuda does (`conv_launch`), and names the kernel that ran.
    for (tile, cin, cout, h, w, with_residual) in [
        (Tile::Narrow, 32, 128, 3, 8, false),
        (Tile::Narrow, 64, 256, 2, 136, true),
        (Tile::Narrow, 96, 128, 4, 16, true),
        (Tile::Wide, 32, 128, 2, 256, true),
        (Tile::Wide, 64, 256, 2, 264, false),
        (Tile::Wgmma, 32, 128, 3, 8, false),
        (Tile::Wgmma, 64, 256, 2, 136, true),
        (Tile::Wgmma, 96, 128, 4, 16, true),
    ] {
        let (_, x) = bf16_buffer(&random(cin * h * w, 31));
        let weights = conv_weights(cout, cin, 32);
        let (bias_bytes, bias) = bf16_buffer(&random(cout, 33));
        let (res_bytes, residual) = bf16_buffer(&random(cout * h * w, 34));
        let (xp_bytes, _) = bf16_buffer(&padded_nhwc(&x, cin, h, w));
        let (taps_bytes, _) = bf16_buffer(&implicit_tap_values(&weights));
        let (kernel, y) = run_conv(
            tile,
            (xp_bytes, taps_bytes, bias_bytes, res_bytes),
            with_residual,
            (cin, cout, h, w),
        );
        let case = format!("{kernel} {cin}->{cout} {h}x{w} residual {with_residual}");
        let input = Tensor::from_vec(x, (1, cin, h, w), &Device::Cpu).unwrap();
        let want = candle_conv3x3(input, &weights, bias, with_residual.then_some(residual));
        check_bf16(&case, &bf16_values(&y), &want);
    }
}

#[test]
fn norm_silu_upsample_and_convolution_chain_as_the_decoder_runs_it() {
    // group_norm_cuda's stats and finalize, the prep (norm, SiLU, 2× upsampling), the
    // convolution with the residual: against candle's group norm, SiLU, upsampling and
    // convolution.
    let (channels, groups, cout, h0, w0) = (64, 32, 128, 4, 8);
    let (h, w) = (2 * h0, 2 * w0);
    let group_len = channels / groups * h0 * w0;
    let x: Vec<f32> = random(channels * h0 * w0, 41)
        .iter()
        .map(|v| v * 1.5 + 0.7)
        .collect();
    let (x_bytes, x) = bf16_buffer(&x);
    let (g_bytes, gamma) = bf16_buffer(&random(channels, 42));
    let (b_bytes, beta) = bf16_buffer(&random(channels, 43));
    let stats = group_stats(&x_bytes, groups, group_len);
    let norm = PrepNorm {
        stats,
        gamma: g_bytes,
        beta: b_bytes,
        groups,
        silu: true,
    };
    let (prep, xp) = run_prep(x_bytes, (channels, h, w, 1), Some(norm));
    // 8-wide source rows: the vector kernel, as the wrapper picks it.
    assert_eq!(prep, "headshot_conv_prep_nhwc_vec_bf16");
    let weights = conv_weights(cout, channels, 44);
    let (taps_bytes, _) = bf16_buffer(&implicit_tap_values(&weights));
    let (bias_bytes, bias) = bf16_buffer(&random(cout, 45));
    let (res_bytes, residual) = bf16_buffer(&random(cout * h * w, 46));
    let (_, y) = run_conv(
        Tile::Narrow,
        (xp, taps_bytes, bias_bytes, res_bytes),
        true,
        (channels, cout, h, w),
    );
    let cpu = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let norm = candle_nn::GroupNorm::new(
        cpu(gamma, &[channels]),
        cpu(beta, &[channels]),
        channels,
        groups,
        1e-6,
    )
    .unwrap();
    let input = cpu(x, &[1, channels, h0, w0])
        .apply(&norm)
        .and_then(|t| t.silu())
        .and_then(|t| t.upsample_nearest2d(h, w))
        .unwrap();
    let want = candle_conv3x3(input, &weights, bias, Some(residual));
    check_bf16(
        "group norm + SiLU + upsample + implicit conv + residual",
        &bf16_values(&y),
        &want,
    );
}

#[test]
fn cudnns_nhwc_output_comes_back_nchw_with_bias_and_residual() {
    // One tile; part-empty tiles in both pixels and channels (3 channels: conv_out's count),
    // with and without the residual; as conv_implicit_cuda launches it for one image.
    for (cout, hw, with_residual) in [(32, 32, false), (64, 200, true), (3, 45, true)] {
        let (y_bytes, y_nhwc) = bf16_buffer(&random(hw * cout, 61));
        let (bias_bytes, bias) = bf16_buffer(&random(cout, 62));
        let (res_bytes, residual) = bf16_buffer(&random(cout * hw, 63));
        let geometry = nhwc_out_launch(cout, hw);
        let out = launch(
            geometry.entry,
            &config(&geometry),
            &[
                Arg::In(y_bytes),
                Arg::In(bias_bytes),
                Arg::In(res_bytes),
                Arg::I32(i32::from(with_residual)),
                Arg::I32(cout as i32),
                Arg::I32(hw as i32),
                Arg::Out(2 * cout * hw),
            ],
        );
        let mut want = vec![0f32; cout * hw];
        for c in 0..cout {
            for p in 0..hw {
                let mut v = y_nhwc[p * cout + c] + bias[c];
                if with_residual {
                    v += residual[c * hw + p];
                }
                want[c * hw + p] = v;
            }
        }
        let case = format!("{} {cout}x{hw} residual {with_residual}", geometry.entry);
        check_bf16(&case, &bf16_values(&out[0]), &want);
    }
}

#[test]
fn the_bias_and_residual_pass_adds_per_channel_over_a_batch() {
    // Two images of 3 channels (conv_out's count) with planes of 24; one image of 64 channels
    // whose last block is part-empty; with and without the residual; launched as
    // conv_cudnn_cuda does, over the whole batch.
    for (batch, channels, hw, with_residual) in [(2, 3, 24, true), (1, 64, 40, false)] {
        let n = batch * channels * hw;
        let (x_bytes, x) = bf16_buffer(&random(n, 71));
        let (bias_bytes, bias) = bf16_buffer(&random(channels, 72));
        let (res_bytes, residual) = bf16_buffer(&random(n, 73));
        let geometry = bias_residual_launch(n);
        let out = launch(
            geometry.entry,
            &config(&geometry),
            &[
                Arg::In(x_bytes),
                Arg::In(bias_bytes),
                Arg::In(res_bytes),
                Arg::I32(i32::from(with_residual)),
                Arg::I32(channels as i32),
                Arg::I64(hw as i64),
                Arg::I64(n as i64),
                Arg::Out(2 * n),
            ],
        );
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let c = (i / hw) % channels;
                x[i] + bias[c] + if with_residual { residual[i] } else { 0.0 }
            })
            .collect();
        let case = format!(
            "{} {batch}x{channels}x{hw} residual {with_residual}",
            geometry.entry
        );
        check_bf16(&case, &bf16_values(&out[0]), &want);
    }
}
