//! Builds the policy components (built-ins, test guests, the SDK example) for
//! `wasm32-wasip2` with a nested cargo, so `cargo build` of the host embeds them.
//!
//! The nested builds use their own target directory next to this build's (a shared one
//! would deadlock on cargo's build lock) and a clean environment (flags meant for the host
//! target, or clippy's wrapper, must not leak into the wasm build).
//!
//! With the `cuda` feature it also compiles `kernels/*.cu` to PTX with nvcc.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.clone());
    for watched in [
        "policies/Cargo.toml",
        "policies/Cargo.lock",
        "policies/validator",
        "policies/sanitizer",
        "policies/resilience",
        "policies/testing",
        "plugins-sdk/Cargo.toml",
        "plugins-sdk/src",
        "plugins-sdk/wit",
        "plugins-sdk/examples/custom-validator/Cargo.toml",
        "plugins-sdk/examples/custom-validator/Cargo.lock",
        "plugins-sdk/examples/custom-validator/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    require_target();

    let out_dir = PathBuf::from(env("OUT_DIR"));
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_cuda_kernels(&manifest_dir, &out_dir);
    }
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: share one wasm target dir per
    // host target dir so dev, test and clippy builds reuse the same guest artifacts.
    let wasm_target = out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-policies"))
        .unwrap_or_else(|| out_dir.join("wasm-policies"));

    nested_build(&root.join("policies/Cargo.toml"), &wasm_target);
    nested_build(
        &root.join("plugins-sdk/examples/custom-validator/Cargo.toml"),
        &wasm_target,
    );

    let release = wasm_target.join(TARGET).join("release");
    for (var, file) in [
        (
            "HEADSHOT_POLICY_VALIDATOR_WASM",
            "headshot_policy_validator.wasm",
        ),
        (
            "HEADSHOT_POLICY_SANITIZER_WASM",
            "headshot_policy_sanitizer.wasm",
        ),
        (
            "HEADSHOT_POLICY_RESILIENCE_WASM",
            "headshot_policy_resilience.wasm",
        ),
        ("HEADSHOT_TEST_HOSTILE_WASM", "headshot_test_hostile.wasm"),
        (
            "HEADSHOT_TEST_FORBIDDEN_IMPORT_WASM",
            "headshot_test_forbidden_import.wasm",
        ),
        (
            "HEADSHOT_EXAMPLE_VALIDATOR_WASM",
            "square_only_validator.wasm",
        ),
    ] {
        let path = release.join(file);
        if !path.is_file() {
            panic!("nested wasm build did not produce {}", path.display());
        }
        println!("cargo:rustc-env={var}={}", path.display());
    }
}

/// `kernels/*.cu` → `$OUT_DIR/*.ptx` for `CUDA_COMPUTE_CAP` (default 80: the attention
/// kernels need mma.sync with bf16, and PTX for 8.0 is JIT-compiled by newer drivers for newer
/// cards); `flash_wgmma.cu` and `conv_wgmma.cu` only for 90 or 90a, as compute_90a. nvcc
/// comes from `CUDA_HOME`/`CUDA_ROOT` or the PATH.
fn compile_cuda_kernels(manifest_dir: &Path, out_dir: &Path) {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = ["CUDA_HOME", "CUDA_ROOT"]
        .into_iter()
        .filter_map(std::env::var_os)
        .map(|home| PathBuf::from(home).join("bin/nvcc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let ptx = |kernel: &str, arch: &str| {
        let source = manifest_dir.join(format!("kernels/{kernel}.cu"));
        println!("cargo:rerun-if-changed={}", source.display());
        let out = out_dir.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("--gpu-architecture={arch}"), "-o"])
            .arg(&out)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| panic!("running {} for the cuda feature: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {} ({status})", source.display());
        }
    };
    // The headers the kernel files include.
    for header in [
        "ptx_common.cuh",
        "lazy_softmax.cuh",
        "wgmma_common.cuh",
        "conv_common.cuh",
        "norm_apply.cuh",
    ] {
        let path = manifest_dir.join("kernels").join(header);
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for kernel in [
        "flash_attn",
        "fp8_quant",
        "norm_rope",
        "adaln",
        "group_norm",
        "conv_gemm",
        "conv_implicit",
    ] {
        ptx(kernel, &format!("compute_{cap}"));
    }
    // The wgmma kernels use sm_90a-only instructions: built for compute_90a when the target
    // is Hopper, else an empty PTX the host reads as "not in this build".
    for kernel in ["flash_wgmma", "conv_wgmma"] {
        if cap == "90" || cap == "90a" {
            ptx(kernel, "compute_90a");
        } else {
            let out = out_dir.join(format!("{kernel}.ptx"));
            if let Err(e) = std::fs::write(&out, "") {
                panic!("writing {}: {e}", out.display());
            }
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo did not set {name}"))
}

/// Fails with the command to run when the wasm target is not installed, instead of a
/// cryptic "can't find crate for `core`" from the nested build.
fn require_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(sysroot) = sysroot
        && !sysroot.join("lib/rustlib").join(TARGET).is_dir()
    {
        panic!(
            "\n\nThe policy components are built for {TARGET}, which is not installed.\n\
             Run:  rustup target add {TARGET}\n\n"
        );
    }
}

fn nested_build(manifest: &Path, target_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(manifest);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = matches!(
            key,
            "RUSTFLAGS"
                | "CARGO_ENCODED_RUSTFLAGS"
                | "CARGO_BUILD_TARGET"
                | "CARGO_BUILD_RUSTFLAGS"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_DIR"
                | "OUT_DIR"
                | "TARGET"
                | "HOST"
                | "OPT_LEVEL"
                | "PROFILE"
                | "DEBUG"
        ) || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_PROFILE_");
        if leaks {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_TARGET_DIR", target_dir);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run cargo for {}: {e}", manifest.display()));
    if !output.status.success() {
        panic!(
            "building the policy components ({}) failed:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
