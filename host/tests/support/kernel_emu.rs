//! The harness of the kernel emulation tests (host/tests/kernel_emulation.rs): builds the
//! CPU emulator's runner from host/kernels (cached under the target dir by a hash of the
//! sources and flags), launches one kernel per call with the arguments a host module passes,
//! and the value helpers (bf16, e4m3, seeded inputs, the bf16 error bound) the tests share.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use headshot_host::pipeline::flux::check::max_rel_error;

// ---- the runner ----------------------------------------------------------------------------

pub fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// The runner's compiler flags (part of its cache key).
pub const FLAGS: [&str; 7] = [
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
pub fn runner() -> &'static Path {
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
pub enum Arg {
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
pub struct Config {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
}

/// The order the emulator moves a block's threads in (`runner.cpp` says what each exposes).
#[derive(Clone, Copy, Debug)]
pub enum Schedule {
    Forward,
    Reverse,
    WarpsAhead,
}

impl Schedule {
    pub const ALL: [Schedule; 3] = [Self::Forward, Self::Reverse, Self::WarpsAhead];

    pub fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Reverse => "reverse",
            Self::WarpsAhead => "warps-ahead",
        }
    }
}

/// Runs `kernel` under every schedule, checks that they agree bit for bit (a difference is a
/// race), and returns the `Out` and `InOut` buffers in order.
pub fn launch(kernel: &str, cfg: &Config, args: &[Arg]) -> Vec<Vec<u8>> {
    let launch = Launch::new(kernel, cfg, args);
    let first = launch.run(Schedule::Forward);
    for schedule in &Schedule::ALL[1..] {
        let other = launch.run(*schedule);
        assert!(
            other == first,
            "{kernel}: the {} schedule wrote other results than forward: a race",
            schedule.name()
        );
    }
    first
}

/// [`launch_with`] under `schedule`, or with `None` [`launch`] under every schedule, compared.
pub fn launch_under(
    schedule: Option<Schedule>,
    kernel: &str,
    cfg: &Config,
    args: &[Arg],
) -> Vec<Vec<u8>> {
    match schedule {
        Some(schedule) => launch_with(schedule, kernel, cfg, args),
        None => launch(kernel, cfg, args),
    }
}

/// Runs `kernel` on the emulator under one schedule and returns the `Out` and `InOut`
/// buffers in order.
pub fn launch_with(schedule: Schedule, kernel: &str, cfg: &Config, args: &[Arg]) -> Vec<Vec<u8>> {
    Launch::new(kernel, cfg, args).run(schedule)
}

/// One launch's runner arguments, with its input buffers written to files once (every
/// schedule's run reads the same ones; the runner never writes them).
struct Launch {
    _dir: tempfile::TempDir,
    kernel: String,
    shape: [u32; 7],
    specs: Vec<String>,
    outputs: Vec<PathBuf>,
}

impl Launch {
    fn new(kernel: &str, cfg: &Config, args: &[Arg]) -> Launch {
        let dir = tempfile::tempdir().unwrap();
        let mut outputs = Vec::new();
        let specs = args
            .iter()
            .enumerate()
            .map(|(i, arg)| {
                let path = dir.path().join(format!("arg{i}"));
                match arg {
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
                }
            })
            .collect();
        Launch {
            _dir: dir,
            kernel: kernel.to_string(),
            shape: [
                cfg.grid.0, cfg.grid.1, cfg.grid.2, cfg.block, 1, 1, cfg.smem,
            ],
            specs,
            outputs,
        }
    }

    /// The `Out` and `InOut` buffers of one run under `schedule`.
    fn run(&self, schedule: Schedule) -> Vec<Vec<u8>> {
        let output = Command::new(runner())
            .args(["--schedule", schedule.name(), &self.kernel])
            .args(self.shape.iter().map(u32::to_string))
            .args(&self.specs)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{} failed on the emulator ({}):\n{}",
            self.kernel,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        self.outputs
            .iter()
            .map(|path| std::fs::read(path).unwrap())
            .collect()
    }
}

// ---- values --------------------------------------------------------------------------------

/// Round to nearest even, as `__float2bfloat16`.
pub fn bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

pub fn bf16_value(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `values` rounded to bf16: (the bytes, the rounded values).
pub fn bf16_buffer(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bits: Vec<u16> = values.iter().map(|&v| bf16(v)).collect();
    let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    (bytes, bits.iter().map(|&b| bf16_value(b)).collect())
}

pub fn bf16_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16_value(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The value of an e4m3 byte (bias 7, 0x7f/0xff NaN).
pub fn e4m3_value(b: u8) -> f32 {
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
pub fn candle_e4m3(values: &[f32]) -> Vec<f32> {
    Tensor::from_vec(values.to_vec(), values.len(), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F8E4M3))
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// Deterministic standard-normal-ish values (sum of four uniforms, scaled).
pub fn random(n: usize, seed: u64) -> Vec<f32> {
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
pub fn check_bf16(case: &str, got: &[f32], want: &[f32]) {
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

/// Head dimension of the attention kernels.
pub const HEAD_DIM: usize = 128;
