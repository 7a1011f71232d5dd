//! The CUDA kernels of `host/kernels` run on the CPU emulator of `host/kernels/emu` against
//! plain references, so their index math, barriers, fragment layouts and roundings are
//! tested on every machine, not only in the sessions that are lent a GPU.
//!
//! The kernel sources compile unchanged with the machine's C++ compiler (`$CXX`, else the first
//! of `c++`, `g++`, `clang++`) into one runner binary, cached under the target dir by a hash
//! of the sources. Each launch here passes the grid, block, shared memory and arguments the host module passes (named in
//! each test); the runner checks every argument's kind and width against the kernel's
//! parameter, fills outputs with NaN bytes first, and stops on an access before a buffer's page
//! or past its end (to within the 15 bytes that 16-byte alignment leaves after odd sizes).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use headshot_host::pipeline::flux::check::max_rel_error;
use headshot_host::pipeline::flux::decoder::gemm_taps;

// ---- the runner ----------------------------------------------------------------------------

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// The runner's compiler flags (part of its cache key).
const FLAGS: [&str; 7] = [
    "-std=c++17",
    "-O2",
    "-fno-strict-aliasing",
    "-DHEADSHOT_EMULATE",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",
];

/// Builds the runner once per test process, reusing a binary built from the same sources and
/// flags.
fn runner() -> &'static Path {
    static RUNNER: OnceLock<PathBuf> = OnceLock::new();
    RUNNER.get_or_init(|| {
        let kernels = kernels_dir();
        let mut sources: Vec<PathBuf> = Vec::new();
        for dir in [
            kernels.clone(),
            kernels.join("emu"),
            kernels.join("emu/include"),
        ] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() {
                    sources.push(path);
                }
            }
        }
        sources.sort();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for path in &sources {
            std::fs::read(path).unwrap().hash(&mut hasher);
        }
        FLAGS.hash(&mut hasher);
        let compiler = std::env::var("CXX").unwrap_or_else(|_| {
            ["c++", "g++", "clang++"]
                .into_iter()
                .find(|c| Command::new(c).arg("--version").output().is_ok())
                .unwrap_or("c++")
                .to_string()
        });
        compiler.hash(&mut hasher);
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu");
        std::fs::create_dir_all(&out).unwrap();
        let bin = out.join(format!("runner-{:016x}", hasher.finish()));
        if !bin.exists() {
            let partial = out.join(format!("runner-{}.partial", std::process::id()));
            let output = Command::new(&compiler)
                .args(FLAGS)
                .arg("-I")
                .arg(kernels.join("emu/include"))
                .arg("-I")
                .arg(kernels.join("emu"))
                .arg(kernels.join("emu/runner.cpp"))
                .arg("-o")
                .arg(&partial)
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "the kernel emulation tests build host/kernels with a C++17 compiler \
                         ({compiler}: $CXX, else the first of c++, g++, clang++), which did not \
                         start: {e}"
                    )
                });
            assert!(
                output.status.success(),
                "building the kernel emulator failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::fs::rename(&partial, &bin).unwrap();
        }
        bin
    })
}

/// One kernel parameter, as the host pushes it.
enum Arg {
    /// A device buffer holding these bytes.
    In(Vec<u8>),
    /// A device buffer of this many bytes the kernel writes; returned after the launch.
    Out(usize),
    /// A device buffer holding these bytes that the kernel updates; returned after the launch.
    InOut(Vec<u8>),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
}

/// A launch configuration: grid, threads per block (1-D, as every kernel here), dynamic
/// shared memory bytes.
struct Config {
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
}

/// The order the emulator moves a block's threads in (`runner.cpp` says what each exposes).
#[derive(Clone, Copy, Debug)]
enum Schedule {
    Forward,
    Reverse,
    WarpsAhead,
}

impl Schedule {
    const ALL: [Schedule; 3] = [Self::Forward, Self::Reverse, Self::WarpsAhead];

    fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Reverse => "reverse",
            Self::WarpsAhead => "warps-ahead",
        }
    }
}

/// Runs `kernel` under every schedule, checks that they agree bit for bit (a difference is a
/// race), and returns the `Out` and `InOut` buffers in order.
fn launch(kernel: &str, cfg: &Config, args: &[Arg]) -> Vec<Vec<u8>> {
    let first = launch_with(Schedule::Forward, kernel, cfg, args);
    for schedule in &Schedule::ALL[1..] {
        let other = launch_with(*schedule, kernel, cfg, args);
        assert!(
            other == first,
            "{kernel}: the {} schedule wrote other results than forward: a race",
            schedule.name()
        );
    }
    first
}

/// Runs `kernel` on the emulator under one schedule and returns the `Out` and `InOut`
/// buffers in order.
fn launch_with(schedule: Schedule, kernel: &str, cfg: &Config, args: &[Arg]) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(runner());
    cmd.args(["--schedule", schedule.name(), kernel]);
    for n in [
        cfg.grid.0, cfg.grid.1, cfg.grid.2, cfg.block, 1, 1, cfg.smem,
    ] {
        cmd.arg(n.to_string());
    }
    let mut outputs = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let path = dir.path().join(format!("arg{i}"));
        let spec = match arg {
            Arg::In(bytes) => {
                std::fs::write(&path, bytes).unwrap();
                format!("in:{}", path.display())
            }
            Arg::Out(bytes) => {
                outputs.push(path.clone());
                format!("out:{}:{bytes}", path.display())
            }
            Arg::InOut(bytes) => {
                std::fs::write(&path, bytes).unwrap();
                let updated = dir.path().join(format!("arg{i}.out"));
                outputs.push(updated.clone());
                format!("inout:{}:{}", path.display(), updated.display())
            }
            Arg::I32(v) => format!("i32:{v}"),
            Arg::U32(v) => format!("u32:{v}"),
            Arg::I64(v) => format!("i64:{v}"),
            Arg::U64(v) => format!("u64:{v}"),
            Arg::F32(v) => format!("f32:{v:e}"),
        };
        cmd.arg(spec);
    }
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "{kernel} failed on the emulator ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    outputs
        .iter()
        .map(|path| std::fs::read(path).unwrap())
        .collect()
}

// ---- values --------------------------------------------------------------------------------

/// Round to nearest even, as `__float2bfloat16`.
fn bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

fn bf16_value(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `values` rounded to bf16: (the bytes, the rounded values).
fn bf16_buffer(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bits: Vec<u16> = values.iter().map(|&v| bf16(v)).collect();
    let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    (bytes, bits.iter().map(|&b| bf16_value(b)).collect())
}

fn bf16_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16_value(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The value of an e4m3 byte (bias 7, 0x7f/0xff NaN).
fn e4m3_value(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, mant) = (i32::from((b >> 3) & 15), f32::from(b & 7));
    if exp == 15 && mant == 7.0 {
        return f32::NAN;
    }
    sign * if exp == 0 {
        mant * 2f32.powi(-9)
    } else {
        (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

/// candle's own f32 → F8E4M3 conversion (the `float8` crate), read back as f32: the
/// reference for the kernels' `__nv_cvt_float_to_fp8`.
fn candle_e4m3(values: &[f32]) -> Vec<f32> {
    Tensor::from_vec(values.to_vec(), values.len(), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F8E4M3))
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// Deterministic standard-normal-ish values (sum of four uniforms, scaled).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| (((0..4).map(|_| uniform()).sum::<f64>() - 2.0) * 1.732) as f32)
        .collect()
}

/// Asserts `got` finite and within `--check`'s bf16 bound (max |got − want| / max |want| ≤
/// 1e-2) of `want`, and prints the error (`-- --nocapture` shows them).
fn check_bf16(case: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{case}: lengths");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{case}: non-finite output"
    );
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap();
    let error = max_rel_error(&t(got), &t(want)).unwrap();
    eprintln!("emulated {case}: max relative error {error:.1e}");
    assert!(error <= 1e-2, "{case}: max relative error {error}");
}

// ---- fp8 -------------------------------------------------------------------------------------

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

// ---- attention -------------------------------------------------------------------------------

/// `flash_cuda`'s kernels: (entry, query rows per block, dynamic shared memory).
const FLASH_KERNELS: [(&str, u32, u32); 5] = [
    ("headshot_flash_attn_pipe4_bf16_d128", 64, 69_632),
    ("headshot_flash_attn_wide_bf16_d128", 128, 104_448),
    ("headshot_flash_attn_wide32_bf16_d128", 128, 104_448),
    ("headshot_flash_attn_wide32_lazy_bf16_d128", 128, 104_448),
    ("headshot_flash_attn_wide_lazy_bf16_d128", 128, 104_448),
];
const HEAD_DIM: usize = 128;

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
    let scale_log2 = ((HEAD_DIM as f64).sqrt().recip() * std::f64::consts::LOG2_E) as f32;
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
            Arg::F32(scale_log2),
        ],
    );
    bf16_values(&out[0])
}

/// `flash_cuda`'s wgmma kernels: (entry, dynamic shared memory).
const WGMMA_KERNELS: [(&str, u32); 2] = [
    ("headshot_flash_attn_wgmma_bf16_d128", 98_304),
    ("headshot_flash_attn_wgmma_pipe_bf16_d128", 131_072),
];

/// `flash_cuda`'s wgmma path: Vᵀ (batch, heads, 128, keys padded to 64) by the transpose
/// kernel, then a Hopper kernel (256 threads).
fn flash_wgmma(
    (entry, smem): (&str, u32),
    qkv: [&[u8]; 3],
    (b, n, h): (usize, usize, usize),
    schedule: Schedule,
) -> Vec<f32> {
    let keys_pad = n.div_ceil(64) * 64;
    let vt = launch_with(
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
    let scale_log2 = ((HEAD_DIM as f64).sqrt().recip() * std::f64::consts::LOG2_E) as f32;
    let out = launch_with(
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
            Arg::F32(scale_log2),
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
        let keys_pad = n.div_ceil(64) * 64;
        let vt = launch(
            "headshot_transpose_v_bf16",
            &Config {
                grid: ((keys_pad / 64) as u32, (b * h) as u32, 1),
                block: 256,
                smem: 0,
            },
            &[
                Arg::In(v_bytes.clone()),
                Arg::Out(2 * b * h * HEAD_DIM * keys_pad),
                Arg::I32(n as i32),
                Arg::I32(h as i32),
                Arg::I32(keys_pad as i32),
            ],
        );
        let scale_log2 = ((HEAD_DIM as f64).sqrt().recip() * std::f64::consts::LOG2_E) as f32;
        for (entry, smem) in WGMMA_KERNELS {
            let out = launch(
                entry,
                &Config {
                    grid: ((n as u32).div_ceil(128), (b * h) as u32, 1),
                    block: 256,
                    smem,
                },
                &[
                    Arg::In(q_bytes.clone()),
                    Arg::In(k_bytes.clone()),
                    Arg::In(vt[0].clone()),
                    Arg::Out(2 * len),
                    Arg::I32(n as i32),
                    Arg::I32(h as i32),
                    Arg::I32(keys_pad as i32),
                    Arg::F32(scale_log2),
                ],
            );
            check_bf16(
                &format!("{entry} at {n} tokens"),
                &bf16_values(&out[0]),
                &want,
            );
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
            let got = flash_wgmma(kernel, *inputs, dims, Schedule::ALL[(i + j) % 3]);
            check_bf16(&format!("{} {name}", kernel.0), &got, want);
        }
    }
}

// ---- the decoder's kernels -------------------------------------------------------------------

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

// ---- the transformer's other kernels -----------------------------------------------------------

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
