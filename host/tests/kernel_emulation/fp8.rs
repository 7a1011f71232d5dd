//! The FP8 quantizers and the adaLN norm kernels (fp8_quant.cu, adaln.cu's norm steps).

use crate::kernel_emu::*;

/// `gemm_cuda::elementwise`: blocks of 256 threads, 8 values each, at most 4096 blocks.
fn elementwise(n: usize) -> Config {
    Config {
        grid: ((n / 8).div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block: 256,
        smem: 0,
    }
}

#[test]
fn e4m3_conversion_matches_candle_for_every_bf16_up_to_448_and_saturates_past_it() {
    // Every finite bf16 of magnitude ≤ 448, then a few past it, through the per-tensor
    // quantizer with its amax forced to 448 (scale 1), as gemm_cuda's FP8 path launches it.
    let mut values: Vec<f32> = (0u16..=0xffff)
        .map(bf16_value)
        .filter(|v| v.is_finite() && v.abs() <= 448.0)
        .collect();
    let exact = values.len();
    values.extend([449.0, -460.0, 1e6, -3e38]);
    values.push(0.5); // 8-aligned tail differs from the vector body: test both
    let (bytes, rounded) = bf16_buffer(&values);
    let n = values.len();
    let amax = f32_bytes(&[448.0]);
    let out = launch(
        "headshot_quantize_e4m3",
        &elementwise(n),
        &[
            Arg::In(bytes.clone()),
            Arg::U64(n as u64),
            Arg::In(amax),
            Arg::Out(n),
            Arg::Out(4),
        ],
    );
    let got: Vec<f32> = out[0].iter().map(|&b| e4m3_value(b)).collect();
    assert_eq!(f32_values(&out[1]), [1.0], "the scale is amax / 448");
    let want = candle_e4m3(&rounded[..exact]);
    for (i, (g, w)) in got[..exact].iter().zip(&want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0),
            "{} -> {g}, candle says {w} (index {i})",
            rounded[i]
        );
    }
    assert_eq!(&got[exact..], [448.0, -448.0, 448.0, -448.0, 0.5]);

    // The amax kernel over the same values (zeroed first, as the host does).
    let amax = launch(
        "headshot_amax_bf16",
        &elementwise(n),
        &[
            Arg::In(bytes),
            Arg::U64(n as u64),
            Arg::InOut(f32_bytes(&[0.0])),
        ],
    );
    let max = rounded.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(f32_values(&amax[0]), [max]);
}

/// The per-row quantizer's launch (`fp8_rows_cuda::QuantizeRows::launch`): rows of `a`, or
/// of `a` and `b` joined, into `rows × width` e4m3 bytes and `rows` f32 scales.
fn quantize_rows(a: &[u8], a_width: usize, b: Option<(&[u8], usize)>, rows: usize) -> Vec<Vec<u8>> {
    let (b, b_width) = b.unwrap_or((a, 0));
    launch(
        "headshot_quantize_rows_e4m3",
        &Config {
            grid: ((rows as u32).clamp(1, 1 << 16), 1, 1),
            block: 256,
            smem: 0,
        },
        &[
            Arg::In(a.to_vec()),
            Arg::U32(a_width as u32),
            Arg::In(b.to_vec()),
            Arg::U32(b_width as u32),
            Arg::U32(rows as u32),
            Arg::Out(rows * (a_width + b_width)),
            Arg::Out(4 * rows),
        ],
    )
}

/// The reference for one row: max |x| ↦ 448 (the kernel's f32 arithmetic: `inv = 448 / amax`,
/// then `x · inv`), converted by candle.
fn reference_row(row: &[f32]) -> (Vec<f32>, f32) {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let inv = 448.0 / amax;
    let scaled: Vec<f32> = row.iter().map(|v| v * inv).collect();
    (candle_e4m3(&scaled), amax / 448.0)
}

#[test]
fn row_quantizer_maps_each_rows_max_to_448_from_one_part_or_two() {
    // Narrow rows (one warp reads them), and rows wider than the block (every warp, twice).
    // Widths the host accepts (each part a multiple of 8, the whole a multiple of 16).
    for (a_width, b_width) in [(48, 16), (3072, 1040)] {
        quantize_rows_case(a_width, b_width);
    }
}

fn quantize_rows_case(a_width: usize, b_width: usize) {
    let rows = 5;
    // Rows spanning 1e-4 to 1e2, and an all-zero row.
    let row_scaled = |values: Vec<f32>, width: usize| -> Vec<f32> {
        values
            .chunks(width)
            .enumerate()
            .flat_map(|(r, row)| {
                let s = if r == 3 {
                    0.0
                } else {
                    10f32.powi(r as i32 * 2 - 4)
                };
                row.iter().map(move |v| v * s).collect::<Vec<_>>()
            })
            .collect()
    };
    let (a_bytes, a) = bf16_buffer(&row_scaled(random(rows * a_width, 1), a_width));
    let (b_bytes, b) = bf16_buffer(&row_scaled(random(rows * b_width, 2), b_width));
    for two_parts in [false, true] {
        let width = a_width + if two_parts { b_width } else { 0 };
        let parts = two_parts.then_some((b_bytes.as_slice(), b_width));
        let out = quantize_rows(&a_bytes, a_width, parts, rows);
        let scales = f32_values(&out[1]);
        for r in 0..rows {
            let mut row = a[r * a_width..(r + 1) * a_width].to_vec();
            if two_parts {
                row.extend_from_slice(&b[r * b_width..(r + 1) * b_width]);
            }
            let (want, scale) = reference_row(&row);
            let got: Vec<f32> = out[0][r * width..(r + 1) * width]
                .iter()
                .map(|&b| e4m3_value(b))
                .collect();
            let case = format!("row {r} of {a_width}+{b_width}, two parts: {two_parts}");
            assert_eq!(got, want, "{case}");
            assert_eq!(scales[r], scale, "{case}: scale");
            if r != 3 {
                let max = got.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(max, 448.0, "row {r}: its max maps to 448");
            }
        }
    }
}

/// adaLN's norm launch (`adaln_cuda`, the norm steps): one block of 256 threads per row,
/// `(x, scale, shift, vec_batch, outputs…, rows, hidden, eps)`.
fn norm_modulate(
    kernel: &str,
    inputs: [&[u8]; 3],
    vec_batch: usize,
    outputs: &[usize],
    (batch, rows, hidden): (usize, usize, usize),
) -> Vec<Vec<u8>> {
    let mut args = vec![
        Arg::In(inputs[0].to_vec()),
        Arg::In(inputs[1].to_vec()),
        Arg::In(inputs[2].to_vec()),
        Arg::I64(vec_batch as i64),
    ];
    args.extend(outputs.iter().map(|&bytes| Arg::Out(bytes)));
    args.extend([
        Arg::I32(rows as i32),
        Arg::I32(hidden as i32),
        Arg::F32(1e-6),
    ]);
    let cfg = Config {
        grid: (rows as u32, batch as u32, 1),
        block: 256,
        smem: 0,
    };
    launch(kernel, &cfg, &args)
}

#[test]
fn adaln_norm_matches_f64_and_its_fused_e4m3_form_equals_norm_then_row_quantizer_bit_for_bit() {
    // FLUX's width, 6 of a thread's 8 pairs in use; the modulation rows sit 3·hidden apart
    // (as chunks of one modulation vector do).
    let (batch, rows, hidden) = (2, 3, 3072);
    let vec_batch = 3 * hidden;
    let x: Vec<f32> = random(batch * rows * hidden, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 2.0 + (i / hidden) as f32 * 0.5)
        .collect();
    let (x_bytes, x) = bf16_buffer(&x);
    let (scale_bytes, scale) = bf16_buffer(
        &random(batch * vec_batch, 4)
            .iter()
            .map(|v| v * 0.3)
            .collect::<Vec<_>>(),
    );
    let (shift_bytes, shift) = bf16_buffer(
        &random(batch * vec_batch, 5)
            .iter()
            .map(|v| v * 0.3)
            .collect::<Vec<_>>(),
    );
    let inputs = [x_bytes.as_slice(), &scale_bytes, &shift_bytes];
    let dims = (batch, rows, hidden);

    let y = norm_modulate(
        "headshot_norm_modulate_bf16",
        inputs,
        vec_batch,
        &[2 * batch * rows * hidden],
        dims,
    );
    let got = bf16_values(&y[0]);
    let mut want = Vec::new();
    for (r, row) in x.chunks(hidden).enumerate() {
        let b = r / rows;
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / hidden as f64;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / hidden as f64;
        let rstd = 1.0 / (var + 1e-6).sqrt();
        for (j, &v) in row.iter().enumerate() {
            let s = f64::from(scale[b * vec_batch + j]);
            let t = f64::from(shift[b * vec_batch + j]);
            want.push(((f64::from(v) - mean) * rstd * (1.0 + s) + t) as f32);
        }
    }
    check_bf16("norm-modulate (bf16) against f64", &got, &want);

    let fused = norm_modulate(
        "headshot_norm_modulate_e4m3",
        inputs,
        vec_batch,
        &[batch * rows * hidden, 4 * batch * rows],
        dims,
    );
    let separate = quantize_rows(&y[0], hidden, None, batch * rows);
    assert_eq!(fused[1], separate[1], "row scales");
    assert!(fused[0] == separate[0], "e4m3 values differ");
}
