//! The decoder's kernels: group norm and the convolution GEMMs' pad and crop.

use crate::kernel_emu::*;
use candle_core::{DType, Device, Tensor};
use headshot_host::pipeline::flux::decoder::gemm_taps;

/// `group_norm_cuda::chunking`: a group split into chunks of at least 8192 values, at most 32
/// of them, each even.
fn chunking(group_len: usize) -> (usize, usize) {
    let chunk = group_len.div_ceil(32).max(8192);
    let chunk = chunk + chunk % 2;
    (chunk, group_len.div_ceil(chunk).max(1))
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
                let mean = group.iter().map(|&v| f64::from(v)).sum::<f64>() / group_len as f64;
                let var = group
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / group_len as f64;
                let rstd = 1.0 / (var + 1e-6).sqrt();
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
