//! The attention kernels: flash_attn.cu's mma.sync kernels and flash_wgmma.cu's Hopper ones.

use crate::kernel_emu::*;

/// `flash_cuda`'s kernels: (entry, query rows per block, dynamic shared memory).
const FLASH_KERNELS: [(&str, u32, u32); 5] = [
    ("headshot_flash_attn_pipe4_bf16_d128", 64, 69_632),
    ("headshot_flash_attn_wide_bf16_d128", 128, 104_448),
    ("headshot_flash_attn_wide32_bf16_d128", 128, 104_448),
    ("headshot_flash_attn_wide32_lazy_bf16_d128", 128, 104_448),
    ("headshot_flash_attn_wide_lazy_bf16_d128", 128, 104_448),
];

/// softmax(q·kᵀ/√d)·v in f64 over `(batch, tokens, heads, 128)`, the kernels' layout.
fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, n, h): (usize, usize, usize),
) -> Vec<f32> {
    let at = |bi: usize, t: usize, hi: usize| ((bi * n + t) * h + hi) * HEAD_DIM;
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let mut out = vec![0f32; b * n * h * HEAD_DIM];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..n {
                let qi = &q[at(bi, i, hi)..][..HEAD_DIM];
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        let kj = &k[at(bi, j, hi)..][..HEAD_DIM];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..HEAD_DIM {
                    let o: f64 = (0..n)
                        .map(|j| weights[j] * f64::from(v[at(bi, j, hi) + d]))
                        .sum();
                    out[at(bi, i, hi) + d] = (o / total) as f32;
                }
            }
        }
    }
    out
}

fn flash(
    kernel: (&str, u32, u32),
    qkv: [&[u8]; 3],
    (b, n, h): (usize, usize, usize),
    schedule: Schedule,
) -> Vec<f32> {
    let (entry, rows, smem) = kernel;
    let cfg = Config {
        grid: ((n as u32).div_ceil(rows), (b * h) as u32, 1),
        block: 128,
        smem,
    };
    let out = launch_with(
        schedule,
        entry,
        &cfg,
        &[
            Arg::In(qkv[0].to_vec()),
            Arg::In(qkv[1].to_vec()),
            Arg::In(qkv[2].to_vec()),
            Arg::Out(2 * b * n * h * HEAD_DIM),
            Arg::I32(n as i32),
            Arg::I32(h as i32),
            Arg::F32(scale_log2()),
        ],
    );
    bf16_values(&out[0])
}

/// `flash_cuda`'s `scale_log2`: log2(e)/√128, the softmax scale folded into exp2.
fn scale_log2() -> f32 {
    ((HEAD_DIM as f64).sqrt().recip() * std::f64::consts::LOG2_E) as f32
}

/// `flash_cuda`'s wgmma kernels: (entry, dynamic shared memory).
const WGMMA_KERNELS: [(&str, u32); 2] = [
    ("headshot_flash_attn_wgmma_bf16_d128", 98_304),
    ("headshot_flash_attn_wgmma_pipe_bf16_d128", 131_072),
];

/// `flash_cuda`'s wgmma path: Vᵀ (batch, heads, 128, keys padded to 64) by the transpose
/// kernel, then a Hopper kernel (256 threads); under one schedule, or every one (`None`).
fn flash_wgmma(
    (entry, smem): (&str, u32),
    qkv: [&[u8]; 3],
    (b, n, h): (usize, usize, usize),
    schedule: Option<Schedule>,
) -> Vec<f32> {
    let keys_pad = n.div_ceil(64) * 64;
    let vt = launch_under(
        schedule,
        "headshot_transpose_v_bf16",
        &Config {
            grid: ((keys_pad / 64) as u32, (b * h) as u32, 1),
            block: 256,
            smem: 0,
        },
        &[
            Arg::In(qkv[2].to_vec()),
            Arg::Out(2 * b * h * HEAD_DIM * keys_pad),
            Arg::I32(n as i32),
            Arg::I32(h as i32),
            Arg::I32(keys_pad as i32),
        ],
    );
    let out = launch_under(
        schedule,
        entry,
        &Config {
            grid: ((n as u32).div_ceil(128), (b * h) as u32, 1),
            block: 256,
            smem,
        },
        &[
            Arg::In(qkv[0].to_vec()),
            Arg::In(qkv[1].to_vec()),
            Arg::In(vt[0].clone()),
            Arg::Out(2 * b * n * h * HEAD_DIM),
            Arg::I32(n as i32),
            Arg::I32(h as i32),
            Arg::I32(keys_pad as i32),
            Arg::F32(scale_log2()),
        ],
    );
    bf16_values(&out[0])
}

#[test]
fn wgmma_kernels_agree_across_schedules_at_one_tile_whole_tiles_and_a_two_row_block() {
    // 40 keys: one partial tile (the pipelined kernel's single-tile prologue); 64: one whole
    // tile; 130: three tiles, the second query block two rows deep. Every schedule must give
    // the same bits.
    for n in [40, 64, 130] {
        let dims @ (b, _, h) = (1, n, 2);
        let len = b * n * h * HEAD_DIM;
        let (q_bytes, q) = bf16_buffer(&random(len, 21));
        let (k_bytes, k) = bf16_buffer(&random(len, 22));
        let (v_bytes, v) = bf16_buffer(&random(len, 23));
        let want = attention_reference(&q, &k, &v, dims);
        for kernel in WGMMA_KERNELS {
            let got = flash_wgmma(kernel, [&q_bytes, &k_bytes, &v_bytes], dims, None);
            check_bf16(&format!("{} at {n} tokens", kernel.0), &got, &want);
        }
    }
}

#[test]
fn every_flash_kernel_matches_f64_attention_at_a_ragged_length_and_with_a_late_peak() {
    // 200 tokens: a partial last 64-key tile, a partial second 128-row block; two batches of
    // two heads (grid y walks both).
    let dims @ (b, n, h) = (2, 200, 2);
    let len = b * n * h * HEAD_DIM;
    let (q_bytes, q) = bf16_buffer(&random(len, 6));
    let (k_bytes, k) = bf16_buffer(&random(len, 7));
    let (v_bytes, v) = bf16_buffer(&random(len, 8));
    // The last 100 keys 4× (as `--check`'s late_peak): most rows' maximum jumps by ~11 log2
    // units after the first tiles, past the lazy kernels' 2⁸ slack, so they rescale.
    let peaked: Vec<f32> = k
        .iter()
        .enumerate()
        .map(|(i, x)| {
            if (i / (h * HEAD_DIM)) % n >= n - 100 {
                x * 4.0
            } else {
                *x
            }
        })
        .collect();
    let (peak_bytes, peaked) = bf16_buffer(&peaked);
    // Every score near -19: the keys past the end (zero-filled tiles, score 0) would take
    // nearly all the weight if the mask missed one.
    let positive: Vec<f32> = q.iter().map(|x| x.abs() + 0.5).collect();
    let negative: Vec<f32> = k.iter().map(|x| -x.abs() - 0.5).collect();
    let (pos_bytes, positive) = bf16_buffer(&positive);
    let (neg_bytes, negative) = bf16_buffer(&negative);
    let cases = [
        (
            "random",
            [q_bytes.as_slice(), &k_bytes, &v_bytes],
            attention_reference(&q, &k, &v, dims),
        ),
        (
            "late peak",
            [q_bytes.as_slice(), &peak_bytes, &v_bytes],
            attention_reference(&q, &peaked, &v, dims),
        ),
        (
            "negative scores",
            [pos_bytes.as_slice(), &neg_bytes, &v_bytes],
            attention_reference(&positive, &negative, &v, dims),
        ),
    ];
    for (i, kernel) in FLASH_KERNELS.into_iter().enumerate() {
        for (j, (name, inputs, want)) in cases.iter().enumerate() {
            // One schedule per run (all three would triple the test's time), each kernel
            // and each input under a different one.
            let got = flash(kernel, *inputs, dims, Schedule::ALL[(i + j) % 3]);
            check_bf16(&format!("{} {name}", kernel.0), &got, want);
        }
    }
    for (i, kernel) in WGMMA_KERNELS.into_iter().enumerate() {
        for (j, (name, inputs, want)) in cases.iter().enumerate() {
            let got = flash_wgmma(kernel, *inputs, dims, Some(Schedule::ALL[(i + j) % 3]));
            check_bf16(&format!("{} {name}", kernel.0), &got, want);
        }
    }
}
