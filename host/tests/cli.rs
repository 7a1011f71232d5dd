//! The `headshot` binary as a user runs it: no GPU, no network, demo weights.

use std::process::{Command, Output};

fn headshot(data_dir: &std::path::Path, args: &[&str]) -> Output {
    headshot_env(data_dir, args, &[])
}

/// [`headshot`] with `envs` set for the process.
fn headshot_env(data_dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = headshot_command(data_dir, args);
    command.envs(envs.iter().copied());
    command.output().expect("headshot runs")
}

/// The `headshot` command the helpers above run, for tests that spawn it.
fn headshot_command(data_dir: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_headshot"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("HEADSHOT_LOG", "warn")
        .env_remove("HEADSHOT__MODEL__SOURCE");
    command
}

/// `headshot bench gpu --tiny --device cpu` with `extra` arguments.
fn bench_gpu_tiny(data_dir: &std::path::Path, extra: &[&str]) -> Output {
    let args: Vec<&str> = ["bench", "gpu", "--tiny", "--device", "cpu"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    headshot(data_dir, &args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_writes_a_png_of_the_requested_size() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let out = headshot(
        tmp.path(),
        &[
            "generate",
            "--model",
            "demo",
            "--prompt",
            "a founder in a navy blazer",
            "--style",
            "corporate",
            "--width",
            "96",
            "--height",
            "64",
            "--seed",
            "1234",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("seed 1234") && stdout.contains("timings:"),
        "{stdout}"
    );
    // The corporate template runs past the demo CLIP's window: said in the output.
    assert!(stdout.contains("CLIP tokens were cut"), "{stdout}");
    let png = std::fs::read(out_dir.join("headshot-1234-0.png")).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (96, 64));
}

#[test]
fn generate_json_reports_every_image_and_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let out = headshot(
        tmp.path(),
        &[
            "generate",
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--num-images",
            "2",
            "--json",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let s0 = images[0]["seed"].as_u64().unwrap();
    assert_eq!(images[1]["seed"].as_u64().unwrap(), s0 + 1);
    assert_eq!(v["model"]["components"].as_array().unwrap().len(), 4);
    assert_eq!(v["timings_ms"]["step_ms"].as_array().unwrap().len(), 4);
    assert_eq!(v["prompt_truncated_tokens"]["clip"], 0, "{v}");
}

#[test]
fn bad_input_fails_with_the_field_named_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    for (args, needle) in [
        (vec!["--width", "100"], "width: must be a multiple of 16"),
        (
            vec!["--num-images", "5"],
            "num_images: must be between 1 and 4",
        ),
        (vec!["--style", "noir"], "style: unknown style `noir`"),
        (
            vec!["--model", "s3:bucket"],
            "--model: unknown model source",
        ),
        (vec!["--guidance", "2"], "guidance"),
    ] {
        let mut all = vec![
            "generate",
            "--prompt",
            "p",
            "--height",
            "64",
            "--out",
            out_dir.to_str().unwrap(),
        ];
        if !args.contains(&"--width") {
            all.extend(["--width", "64"]);
        }
        all.extend(args.iter().copied());
        let out = headshot(tmp.path(), &all);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!out_dir.exists());
}

#[test]
fn a_busy_port_is_named_once_with_the_flags_that_move_it() {
    let tmp = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = headshot(tmp.path(), &["serve", "--port", &port, "--admin-port", "0"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("--rp_api_port / --admin-port"), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    // The same through a config error's cause (the CLI prints each cause once).
    let out = headshot(
        tmp.path(),
        &["--config", "/nonexistent/headshot.toml", "check"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("reading config file /nonexistent/headshot.toml"),
        "{err}"
    );
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

#[test]
fn worker_serving_the_local_api_takes_an_admin_port_too() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let mut child = headshot_command(
        tmp.path(),
        &[
            "worker",
            "--rp_serve_api",
            "--rp_api_port",
            "0",
            "--admin-port",
            "0",
        ],
    )
    .env("HEADSHOT_LOG", "error")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let admin = v["admin"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(!admin.ends_with(":8001"), "--admin-port 0 was ignored: {v}");
    // Without --rp_serve_api there is no admin API to move: the flag is refused, not ignored.
    let out = headshot(
        tmp.path(),
        &["worker", "--admin-port", "0", "--test-input", "{}"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--rp_serve_api"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `headshot check | head -0`: the reader is gone before the first line.
    let tmp = tempfile::tempdir().unwrap();
    for args in [&["check"][..], &["policy", "list"][..]] {
        let mut child = headshot_command(tmp.path(), args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
    }
}

#[test]
fn generate_takes_its_default_size_from_the_config_and_flags_without_effect_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let out = headshot_env(
        tmp.path(),
        &[
            "generate",
            "--prompt",
            "x",
            "--seed",
            "7",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[
            ("HEADSHOT__MODEL__DEFAULT_WIDTH", "96"),
            ("HEADSHOT__MODEL__DEFAULT_HEIGHT", "64"),
            ("HEADSHOT_LOG_FORMAT", "colourful"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let png = std::fs::read(out_dir.join("headshot-7-0.png")).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (96, 64));
    // A log setting it cannot use is said, not dropped.
    assert!(
        text(&out.stderr).contains("HEADSHOT_LOG_FORMAT `colourful`"),
        "{}",
        text(&out.stderr)
    );
    // Worker flags that only mean something with --rp_serve_api are refused without it.
    for args in [
        &["worker", "--rp_api_port", "9", "--test-input", "{}"][..],
        &["worker", "--rp_api_host", "0.0.0.0", "--test-input", "{}"][..],
        &["worker", "--admin-port", "0", "--test-input", "{}"][..],
    ] {
        let out = headshot(tmp.path(), args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).contains("--rp_serve_api"), "{args:?}");
    }
    let out = headshot(
        tmp.path(),
        &["worker", "--rp_serve_api", "--test-input", "{}"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot be combined"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_headshot"))
        .args([
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "bench",
            "demo",
            "--iters",
            "1",
        ])
        .env("HEADSHOT__MODEL__MAX_STEPS", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("model.max_steps") && err.contains("HEADSHOT__MODEL__MAX_STEPS"),
        "{err}"
    );
}

#[test]
fn bench_demo_reports_each_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let out = headshot(tmp.path(), &["bench", "demo", "--iters", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for stage in [
        "encode",
        "encode_cached",
        "denoise_step",
        "decode",
        "png",
        "total",
    ] {
        assert!(
            stdout.contains(&format!("RESULT demo_{stage}_64x64x1: median ")),
            "{stage}: {stdout}"
        );
    }
    // No samples, no medians: refused rather than printed as NaN.
    let out = headshot(tmp.path(), &["bench", "demo", "--iters", "0"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("iters must be at least 1"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("NaN"));
}

#[test]
fn bench_gpu_tiny_runs_the_harness_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bench_gpu_tiny(tmp.path(), &["--iters", "2", "--warmup", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for name in [
        "build_transformer",
        "one_step",
        "four_steps",
        "build_vae",
        "vae_decode",
        "vae_decode_candle",
    ] {
        assert!(
            stdout.contains(&format!("RESULT {name}: ")),
            "{name}: {stdout}"
        );
    }
    assert!(stdout.contains("decoded image [1, 3, 64, 64]"), "{stdout}");
    // One profiled step: each block stage summed over the blocks (two double blocks, two
    // streams each, two single blocks in the tiny config), and every block's modulations at
    // once (the joined projections).
    for stage in [
        "modulations ",
        "double.attention x2 ",
        "double.norm+mlp+gated_add x4 ",
        "single.linear2+gated_add x2 ",
        "final_layer ",
    ] {
        assert!(
            stdout.contains(&format!("PROFILE one_step {stage}")),
            "{stage}: {stdout}"
        );
    }
    assert!(
        stdout.contains("PROFILE one_step sum of 15 stages: "),
        "{stdout}"
    );
    let full_on_cpu = headshot(tmp.path(), &["bench", "gpu", "--device", "cpu"]);
    assert!(!full_on_cpu.status.success());
}

#[test]
fn bench_gpu_vae_only_times_the_decoders_without_a_transformer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bench_gpu_tiny(tmp.path(), &["--vae-only", "--iters", "1", "--warmup", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for name in ["build_vae", "vae_decode", "vae_decode_candle"] {
        assert!(
            stdout.contains(&format!("RESULT {name}: ")),
            "{name}: {stdout}"
        );
    }
    for name in ["build_transformer", "one_step", "four_steps"] {
        assert!(
            !stdout.contains(&format!("RESULT {name}:")),
            "{name}: {stdout}"
        );
    }
    assert!(stdout.contains("decoded image [1, 3, 64, 64]"), "{stdout}");
    // One traced decode splits the time by stage: every stage once, the sum last.
    let profile: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("PROFILE vae_decode "))
        .collect();
    for stage in [
        "conv_in ",
        "mid.attn_1 ",
        "up.0.block.0 ",
        "norm_out+conv_out ",
    ] {
        assert_eq!(
            profile.iter().filter(|l| l.contains(stage)).count(),
            1,
            "{stage}: {stdout}"
        );
    }
    assert!(
        profile
            .last()
            .is_some_and(|l| l.contains("sum of ") && l.ends_with(" ms")),
        "{stdout}"
    );
    // Without candle's decode: ours only.
    let ours_only = bench_gpu_tiny(
        tmp.path(),
        &[
            "--vae-only",
            "--no-candle-vae",
            "--iters",
            "1",
            "--warmup",
            "0",
        ],
    );
    assert!(ours_only.status.success(), "{}", text(&ours_only.stderr));
    let ours_only = text(&ours_only.stdout);
    assert!(ours_only.contains("RESULT vae_decode: "), "{ours_only}");
    assert!(!ours_only.contains("vae_decode_candle"), "{ours_only}");
    let both = bench_gpu_tiny(tmp.path(), &["--vae-only", "--skip-vae"]);
    assert!(
        !both.status.success(),
        "--vae-only with --skip-vae is refused"
    );
    let stderr = text(&both.stderr);
    assert!(
        stderr.contains("--vae-only") && stderr.contains("--skip-vae"),
        "the refusal names both flags: {stderr}"
    );
}

#[test]
fn bench_gpu_check_only_attention_stops_after_the_attention_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["bench", "gpu", "--tiny", "--device", "cpu", "--check"];
    let check = |only: &str| headshot_env(tmp.path(), &args, &[("HEADSHOT_CHECK_ONLY", only)]);
    let out = check("attention");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let checks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("CHECK ")).collect();
    assert!(
        !checks.is_empty() && checks.iter().all(|l| l.starts_with("CHECK attention")),
        "{stdout}"
    );
    // Everything else the full check runs is left out.
    let full = bench_gpu_tiny(tmp.path(), &["--check"]);
    assert!(full.status.success(), "{}", text(&full.stderr));
    assert!(
        text(&full.stdout).contains("CHECK layer_norm"),
        "{}",
        text(&full.stdout)
    );
    // A value it does not know is an error naming the one it does, before any comparison.
    let wrong = check("norms");
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stdout).contains("CHECK stopped after 0 comparisons"),
        "{}",
        text(&wrong.stdout)
    );
    assert!(
        text(&wrong.stderr).contains("the values are \"attention\" and \"decoder_full\""),
        "{}",
        text(&wrong.stderr)
    );
    // The full-size decoders compare CUDA paths: on the CPU that is an error saying so.
    let full_decoders = check("decoder_full");
    assert!(!full_decoders.status.success());
    assert!(
        text(&full_decoders.stderr).contains("needs a CUDA device and bf16"),
        "{}",
        text(&full_decoders.stderr)
    );
}

#[test]
fn bench_gpu_ops_times_each_op_with_its_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bench_gpu_tiny(tmp.path(), &["--ops", "--iters", "1", "--warmup", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for (name, unit) in [
        ("attention_plain", "TFLOP/s"),
        ("qkv_bias", "TFLOP/s"),
        ("mlp_down_bias_fp8", "TFLOP/s"),
        ("single_linear1_matmul", "TFLOP/s"),
        ("layer_norm", "GB/s"),
        ("gelu", "GB/s"),
        ("rope", "GB/s"),
    ] {
        assert!(
            stdout.contains(&format!("RESULT op_{name}: median ")),
            "{name}: {stdout}"
        );
        let rate = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("RATE op_{name}: ")))
            .unwrap_or_else(|| panic!("no rate for {name}: {stdout}"));
        let (value, got_unit) = rate.split_once(' ').unwrap();
        assert_eq!(got_unit, unit, "{rate}");
        assert!(value.parse::<f64>().unwrap() > 0.0, "{rate}");
    }
    // Ops timing is its own mode: no whole steps are run.
    assert!(!stdout.contains("RESULT one_step"), "{stdout}");
    let both = bench_gpu_tiny(tmp.path(), &["--ops", "--check"]);
    assert!(!both.status.success());
}

#[test]
fn policy_test_push_list_and_rollback_the_sdk_example() {
    let tmp = tempfile::tempdir().unwrap();
    let example = env!("HEADSHOT_EXAMPLE_VALIDATOR_WASM");

    let out = headshot(
        tmp.path(),
        &["policy", "test", example, "--kind", "validator"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("square-only"), "{stdout}");
    assert!(stdout.contains("passed: 7 conformance cases"), "{stdout}");

    // The same file is not a sanitizer: refused, with the reason.
    let out = headshot(
        tmp.path(),
        &["policy", "test", example, "--kind", "sanitizer"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not implement the `sanitizer` world"),
        "{}",
        text(&out.stderr)
    );

    let out = headshot(
        tmp.path(),
        &["policy", "push", example, "--kind", "validator"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = headshot(tmp.path(), &["policy", "list"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("validator")
            && l.contains("square-only")
            && l.contains("1 earlier")),
        "{stdout}"
    );

    let out = headshot(tmp.path(), &["policy", "rollback", "--kind", "validator"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = headshot(tmp.path(), &["policy", "list"]);
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("validator") && l.contains("builtin-validator"))
    );

    let out = headshot(
        tmp.path(),
        &["policy", "test", "/nonexistent.wasm", "--kind", "validator"],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent.wasm"));
    let out = headshot(tmp.path(), &["policy", "rollback", "--kind", "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown policy kind `nope`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_reports_a_good_setup_and_lists_every_problem_of_a_broken_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = headshot(tmp.path(), &["check"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("ok: ready to serve"), "{stdout}");
    assert!(stdout.contains("storage: local reachable"), "{stdout}");

    let cfg = tmp.path().join("broken.toml");
    std::fs::write(
        &cfg,
        "[model]\nsource = \"dir:/nonexistent/flux\"\n[storage]\nbackend = \"supabase\"\n[storage.supabase]\nurl = \"http://127.0.0.1:9\"\nservice_key = \"sb_secret_x\"\ntimeout_ms = 500\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_headshot"))
        .args(["--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(tmp.path())
        .arg("check")
        .env("HEADSHOT_LOG", "error")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("problem: model: /nonexistent/flux does not exist"),
        "{stdout}"
    );
    assert!(stdout.contains("problem: storage"), "{stdout}");
    assert!(
        text(&out.stderr).contains("2 problem(s) found"),
        "{}",
        text(&out.stderr)
    );

    // The local store's own settings are checked as serve checks them.
    for (var, value, says) in [
        (
            "HEADSHOT__STORAGE__LOCAL__SIGNING_KEY",
            "short",
            "signing_key must be at least",
        ),
        (
            "HEADSHOT__STORAGE__LOCAL__PUBLIC_BASE_URL",
            "ftp://x",
            "public_base_url must be",
        ),
    ] {
        let out = headshot_env(tmp.path(), &["check"], &[(var, value)]);
        assert!(!out.status.success(), "{var}");
        assert!(
            text(&out.stdout).contains(says),
            "{var}: {}",
            text(&out.stdout)
        );
    }
}
