//! The transformer's other kernels: rms norm + rope, the gated residual.

use crate::kernel_emu::*;

#[test]
fn rms_norm_rope_matches_f64_and_writes_only_its_rows() {
    // `norm_rope_cuda`: the k part (1 of q, k, v) of a (batch, rows, 3·heads·128) projection,
    // normed per head, rotated, written at token `offset` of a (batch, total, heads, 128)
    // output; 15 items over 8-warp blocks leave whole warps of the last block idle.
    let (batch, rows, heads, total, offset, part) = (2, 5, 3, 8, 2, 1);
    let width = 3 * heads * HEAD_DIM;
    let (projection_bytes, projection) = bf16_buffer(&random(batch * rows * width, 15));
    let src = projection_bytes[2 * part * heads * HEAD_DIM..].to_vec();
    let (scale_bytes, scale) = bf16_buffer(&random(HEAD_DIM, 16));
    let angles: Vec<f32> = random(batch * total * HEAD_DIM / 2, 17)
        .iter()
        .map(|a| a * 3.0)
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let out_len = batch * total * heads * HEAD_DIM;
    let items = rows * heads;
    let out = launch(
        "headshot_rmsnorm_rope_bf16",
        &Config {
            grid: (items.div_ceil(8) as u32, batch as u32, 1),
            block: 256,
            smem: 0,
        },
        &[
            Arg::In(src),
            Arg::I64((rows * width) as i64),
            Arg::I64(width as i64),
            Arg::I32(rows as i32),
            Arg::I32(heads as i32),
            Arg::In(scale_bytes),
            Arg::In(f32_bytes(&cos)),
            Arg::In(f32_bytes(&sin)),
            Arg::InOut(vec![0x80; 2 * out_len]),
            Arg::I32(total as i32),
            Arg::I32(offset as i32),
            Arg::F32(1e-6),
        ],
    );
    let got = bf16_values(&out[0]);
    // The output starts as bf16 0x8080 (-4.7e-38) everywhere: rows the kernel must not write.
    let untouched = bf16_value(0x8080);
    let mut want = vec![untouched; out_len];
    for b in 0..batch {
        for t in 0..rows {
            let row = b * total + offset + t;
            for h in 0..heads {
                let x = &projection[(b * rows + t) * width + (part * heads + h) * HEAD_DIM..]
                    [..HEAD_DIM];
                let ms = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / HEAD_DIM as f64;
                let r = 1.0 / (ms + 1e-6).sqrt();
                for i in 0..HEAD_DIM / 2 {
                    let a = f64::from(x[2 * i]) * r * f64::from(scale[2 * i]);
                    let c = f64::from(x[2 * i + 1]) * r * f64::from(scale[2 * i + 1]);
                    let (cs, sn) = (f64::from(cos[row * 64 + i]), f64::from(sin[row * 64 + i]));
                    let at = (row * heads + h) * HEAD_DIM + 2 * i;
                    want[at] = (a * cs - c * sn) as f32;
                    want[at + 1] = (a * sn + c * cs) as f32;
                }
            }
        }
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let row = i / (heads * HEAD_DIM) % total;
        if row < offset || row >= offset + rows {
            assert_eq!(g.to_bits(), w.to_bits(), "row {row} of {total} was written");
        }
    }
    check_bf16("rms norm + rope", &got, &want);
}

#[test]
fn gated_residual_matches_f64() {
    // `adaln_cuda`'s GatedResidual: blocks of 256 over each batch's pairs (grid y = batch),
    // the gate row of each batch 2·hidden apart.
    let (batch, rows, hidden) = (2, 3, 3072);
    let vec_batch = 2 * hidden;
    let n = batch * rows * hidden;
    let (r_bytes, residual) = bf16_buffer(&random(n, 18));
    let (x_bytes, x) = bf16_buffer(&random(n, 19));
    let (g_bytes, gate) = bf16_buffer(&random(batch * vec_batch, 20));
    let pairs = rows * hidden / 2;
    let out = launch(
        "headshot_gated_residual_bf16",
        &Config {
            grid: (pairs.div_ceil(256).clamp(1, 8192) as u32, batch as u32, 1),
            block: 256,
            smem: 0,
        },
        &[
            Arg::In(r_bytes),
            Arg::In(x_bytes),
            Arg::In(g_bytes),
            Arg::I64(vec_batch as i64),
            Arg::Out(2 * n),
            Arg::I64(rows as i64),
            Arg::I32(hidden as i32),
        ],
    );
    let want: Vec<f32> = (0..n)
        .map(|i| {
            let g = gate[i / (rows * hidden) * vec_batch + i % hidden];
            (f64::from(residual[i]) + f64::from(g) * f64::from(x[i])) as f32
        })
        .collect();
    check_bf16("gated residual", &bf16_values(&out[0]), &want);
}
