#!/usr/bin/env python3
"""Summary of one scripts/gpu-session.sh run: every run's step and decode time as a ratio to
the diffusers twin measured in the same call, the checks that failed, the log lines that
decide whether an opt-in path really ran (per-row FP8 fallback, GEMM tuning), and the
attention kernels' throughput alone, fastest first.

    python3 scripts/gpu-summary.py OUT_DIR      (OUT_DIR holds session.txt and vs-torch/)

Standard library only: the device machine has Python but nothing from this repo's toolchain.
"""

import json
import re
import sys
from pathlib import Path

# The section read from vs-torch/ours.txt: our side of run-bench.sh.
OURS = "ours vs diffusers (default paths)"
RESULT = re.compile(r"RESULT (\w+): median ([0-9.]+) ms")
CHECK = re.compile(r"CHECK (\S+): max relative error (\S+)(.*)\(bound (\S+)\) (ok|FAIL)")
ATTENTION_RATE = re.compile(r"RATE op_attention_(\w+): ([0-9.]+) TFLOP/s")
# The decoder's ops (--ops): name, shape (channels x height x width), rate, unit.
VAE_RATE = re.compile(r"RATE op_(vae_\w+?)_(\d+x\d+x\d+): ([0-9.]+(?:e[+-]?\d+)?) TFLOP/s")
# The decoder's memory-bound ops (norms, SiLU, upsampling, candle's bias add): GB/s.
VAE_BYTES = re.compile(r"RATE op_(vae_\w+?)_(\d+x\d+x\d+): ([0-9.]+(?:e[+-]?\d+)?) GB/s")


def medians(lines):
    """{name: median ms} of the RESULT lines."""
    out = {}
    for line in lines:
        m = RESULT.search(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def runs(session):
    """[(header, lines)] for each "== ..." section of session.txt."""
    sections, header, lines = [], None, []
    for line in session.splitlines():
        if line.startswith("== "):
            if header is not None:
                sections.append((header, lines))
            header, lines = line[3:], []
        elif header is not None:
            lines.append(line)
    if header is not None:
        sections.append((header, lines))
    return sections


def log_message(line):
    """The message of a JSON tracing line, with its fields, or the line itself."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()
    fields = record.get("fields") if isinstance(record, dict) else None
    if not isinstance(fields, dict):
        return line.strip()
    message = fields.pop("message", "")
    rest = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"{message} ({rest})" if rest else message


def main(out_dir):
    out = Path(out_dir)
    if not (out / "session.txt").exists():
        print(f"no {out / 'session.txt'}: the session wrote nothing")
        return
    session = (out / "session.txt").read_text(errors="replace")
    torch_file = out / "vs-torch" / "torch.txt"
    torch = medians(torch_file.read_text(errors="replace").splitlines()) if torch_file.exists() else {}
    base_step, base_decode = torch.get("one_step"), torch.get("vae_decode")
    print(f"diffusers (same call): one_step {base_step} ms, vae_decode {base_decode} ms")
    ours_file = out / "vs-torch" / "ours.txt"
    sections = runs(session)
    if ours_file.exists():
        sections.insert(0, (OURS, ours_file.read_text(errors="replace").splitlines()))
    print(f"{'run (switches beyond --device cuda --attention fused)':<100} {'one_step':>9} {'ratio':>6} {'decode':>9} {'ratio':>6}")
    failed = []
    for header, lines in sections:
        header = re.sub(r" \(t=\d+s\)$", "", header)
        # What every run shares says nothing: keep the switches that differ.
        header = re.sub(r"bench gpu |--device cuda\b\s*|--attention fused\b\s*", "", header)
        header = re.sub(r"--(iters|warmup) \d+\s*", "", header).strip() or "(defaults)"
        if header == "vs torch":
            continue  # both sides' lines, tee'd; read from vs-torch/ above
        # Ratios only at the diffusers twin's size (1024x1024).
        same_size = "--width" not in header and "--height" not in header
        m = medians(lines)
        step, decode = m.get("one_step"), m.get("vae_decode")
        ratio = lambda x, b: f"{x / b:.3f}" if x and b and same_size else "-"
        if step or decode:
            print(
                f"{header[:100]:<100} {step or '-':>9} {ratio(step, base_step):>6} "
                f"{decode or '-':>9} {ratio(decode, base_decode):>6}"
            )
            if "vae_decode_candle" in m:
                print(f"{'':<100} {'':>9} {'':>6} {m['vae_decode_candle']:>9} (candle AutoEncoder)")
        for line in lines:
            c = CHECK.search(line)
            if c and c.group(5) == "FAIL":
                failed.append(f"{header}: {c.group(1)} {c.group(2)}{c.group(3)}(bound {c.group(4)})")
            if line.startswith("CHECK ") and " where: " in line:
                failed.append("    " + line.strip())
            # Why a run ended: a panic nobody caught, or the error the CLI printed (a panic
            # caught on the way, cudarc's for one, is in it).
            if "CHECK stopped" in line or "panicked" in line or line.startswith("error: "):
                failed.append(f"{header}: {line.strip()[:400]}")
        # A run that failed or ran out of time has no table row: say so. Every run the script
        # starts ends with an `exit N` line; one without it was cut off with the device call.
        # (run-bench.sh's own output, read from vs-torch/, has none.)
        if header.startswith("SKIPPED") or header == OURS:
            continue
        code = next((l.split()[1] for l in reversed(lines) if l.startswith("exit ") and len(l.split()) > 1), None)
        if code is None:
            failed.append(f"{header}: no exit line (cut short with the device call)")
        elif code != "0":
            why = " (timed out)" if code in ("124", "137") else ""
            failed.append(f"{header}: exit {code}{why}")
    fell_back = sorted({c.group(1) for c in CHECK.finditer(session) if "fell_back_to_tensor" in c.group(1)})
    print("failed (checks, runs):" if failed else "failed (checks, runs): none")
    for f in failed:
        print("  " + f)
    if fell_back:
        print("per-row FP8 fell back to per-tensor scales: " + ", ".join(fell_back))
    notes = [
        log_message(line)
        for line in session.splitlines()
        if "GEMM tuned" in line or "per-row FP8" in line or "keeping per-tensor" in line
    ]
    for note in dict.fromkeys(notes):
        print("log: " + note)
    # The attention kernels alone (--ops), the last figure of each: which kernel is fastest.
    rates = {m.group(1): float(m.group(2)) for m in ATTENTION_RATE.finditer(session)}
    if rates:
        ranked = sorted(rates.items(), key=lambda kv: -kv[1])
        print("attention alone (--ops, TFLOP/s): " + ", ".join(f"{k} {v:g}" for k, v in ranked))
    # The decoder's convolutions alone, per shape, fastest first (cuDNN is `vae_conv`), then
    # its memory-bound ops.
    for line in decoder_op_lines(session, VAE_RATE, "convolutions", "TFLOP/s"):
        print(line)
    for line in decoder_op_lines(session, VAE_BYTES, "memory-bound ops", "GB/s"):
        print(line)
    # Whole decodes per decoder path (--vae-only runs and full runs alike), fastest first.
    decodes, profiles = [], {}
    for header, lines in runs(session):
        m = medians(lines)
        if "vae_decode" in m and "--width" not in header and "--height" not in header:
            switches = " ".join(w for w in header.split() if w.startswith("HEADSHOT_")) or "(defaults)"
            decodes.append((m["vae_decode"], switches))
            profile = stage_lines(lines, "vae_decode")
            if profile:
                profiles.setdefault(switches, profile)
    # The fastest 1024x1024 step (its switches and flags) and where its time goes.
    steps = []
    for header, lines in sections:
        m = medians(lines)
        if "one_step" in m and "--width" not in header and "--height" not in header:
            steps.append((m["one_step"], re.sub(r" \(t=\d+s\)$", "", header), stage_lines(lines, "one_step")))
    verdicts = check_verdicts(session)
    if steps:
        t, header, profile = min(steps, key=lambda s: s[0])
        print(f"fastest step: {t:g} ms ({header})")
        print("  " + verdict_line(header, verdicts, attention=True))
        if profile:
            print("  its stages, slowest first: " + "; ".join(profile[:10]))
    if decodes:
        best = {}
        for t, s in decodes:
            best[s] = min(t, best.get(s, t))
        ranked = sorted(best.items(), key=lambda kv: kv[1])
        base = f" (diffusers {base_decode} ms)" if base_decode else ""
        print("decode by decoder path, fastest first" + base + ":")
        for s, t in ranked:
            print(f"  {t:g} ms  {s}  ({verdict_line(s, verdicts, attention=False)})")
        # Where the fastest path's decode spends its time (one traced decode, slowest stages
        # first): what to work on next.
        fastest = ranked[0][0]
        if fastest in profiles:
            print(f"stages of the fastest decode ({fastest}), slowest first: " + "; ".join(profiles[fastest][:8]))


# The --check rows each opt-in switch stands on: a path is a candidate for the default only if
# every one of them ran and passed. Keys: a HEADSHOT_CONV word, or VAR=value.
CHECK_ROWS = {
    "HEADSHOT_GROUP_NORM=fused": [r"^group_norm(_silu)?_cuda_", r"^decoder_full_bf16_cuda_paths_fused_norm_vs_f32$"],
    "gemm": [r"^(upsample_)?conv\dx\d_gemm_cuda_", r"^decoder_bf16_cuda_paths_vs_f32$"],
    "cudnn": [
        r"^conv\dx\d_cudnn_cuda_[\dx]+_to_\d+(_bias_residual)?$",
        r"^decoder(_128ch)?_bf16_cuda_paths_cudnn_vs_f32$",
        r"^decoder_full_bf16_cuda_paths_cudnn_vs_f32$",
    ],
    "cudnn_nhwc": [
        r"^conv\dx\d_cudnn_nhwc_cuda_[\dx]+_to_\d+(_bias_residual)?$",
        r"^decoder(_128ch)?_bf16_cuda_paths_cudnn_nhwc_vs_f32$",
        r"^decoder_full_bf16_cuda_paths_cudnn_nhwc_vs_f32$",
    ],
    "implicit": [
        r"^conv3x3_implicit_cuda_",
        r"^decoder_128ch_bf16_cuda_paths_vs_f32$",
        r"^decoder_full_bf16_cuda_paths_vs_f32$",
    ],
    "implicit_wide": [
        r"^conv3x3_implicit_wide_cuda_",
        r"^decoder_128ch_bf16_cuda_paths_wide_vs_f32$",
        r"^decoder_full_bf16_cuda_paths_wide_vs_f32$",
    ],
    "implicit_wgmma": [
        r"^conv3x3_implicit_wgmma_cuda_",
        r"^decoder_128ch_bf16_cuda_paths_wgmma_vs_f32$",
        r"^decoder_full_bf16_cuda_paths_wgmma_vs_f32$",
    ],
    "implicit_cudnn": [
        r"^conv3x3_implicit_on_cudnn_cuda_",
        r"^decoder_128ch_bf16_cuda_paths_on_cudnn_vs_f32$",
        r"^decoder_full_bf16_cuda_paths_on_cudnn_vs_f32$",
    ],
    "HEADSHOT_SPLIT_GEMM=on": [r"^gemm_bias(_gelu)?_parts$"],
    "--fp8": [r"^(model_fp8_vs_full|fp8_linear_vs_full|fp8_batch_independent)$"],
    "row": [r"fp8_rows"],
}


def check_verdicts(session):
    """{row name: passed} over every --check run (a row passes only if it passed every time)."""
    verdicts = {}
    for m in CHECK.finditer(session):
        verdicts[m.group(1)] = verdicts.get(m.group(1), True) and m.group(5) == "ok"
    return verdicts


def switch_keys(header):
    """The CHECK_ROWS keys a run's header turns on (HEADSHOT_CONV words, VAR=value, flags),
    the defaults' own where no switch turns them off (the decoder's implicit_cudnn,cudnn with
    the fused norm, the split GEMM, per-row FP8 with --fp8), with the attention kernel it runs
    (wide_lazy unless HEADSHOT_FLASH_KERNEL names another)."""
    keys, kernel = [], "wide_lazy"
    words = header.split()
    conv, norm, split = ["implicit_cudnn", "cudnn"], True, True
    for w in words:
        if w.startswith("HEADSHOT_CONV="):
            conv = [c for c in w.split("=", 1)[1].split(",") if c.lower() != "candle"]
        elif w.startswith("HEADSHOT_FLASH_KERNEL="):
            kernel = w.split("=", 1)[1]
        elif w.startswith("HEADSHOT_GROUP_NORM="):
            norm = w.split("=", 1)[1].lower() not in ("candle", "off", "0", "false")
        elif w.startswith("HEADSHOT_SPLIT_GEMM="):
            split = w.split("=", 1)[1].lower() not in ("off", "0", "false")
        elif w.startswith("HEADSHOT_"):
            keys.append(w)
    if "--skip-vae" not in words:
        keys += conv + (["HEADSHOT_GROUP_NORM=fused"] if norm else [])
    if "--vae-only" not in words:
        if split and "--fp8" not in words:
            keys.append("HEADSHOT_SPLIT_GEMM=on")
        if "--fp8" in words:
            keys.append("--fp8")
            scale = words.index("--fp8-scale") + 1 if "--fp8-scale" in words else len(words)
            if words[scale:scale + 1] != ["tensor"]:
                keys.append("row")
    return keys, kernel


def verdict_line(header, verdicts, attention):
    """Whether the --check rows a run's switches stand on all passed: "checks: n rows pass",
    "checks FAILED: …", or what is missing."""
    keys, kernel = switch_keys(header)
    patterns = [p for k in keys for p in CHECK_ROWS.get(k, [])]
    if attention:
        patterns.append(rf"^attention_cuda_{re.escape(kernel)}(_batch_2|_\d+_tokens(_late_peak)?)?$")
    if not patterns:
        return "checks: none needed (default paths)"
    failed, missing, passed = [], [], 0
    for pattern in patterns:
        rows = [(n, ok) for n, ok in verdicts.items() if re.search(pattern, n)]
        if not rows:
            missing.append(pattern)
        passed += sum(ok for _, ok in rows)
        failed += [n for n, ok in rows if not ok]
    if failed:
        return "checks FAILED: " + ", ".join(failed)
    if missing:
        return f"checks: {passed} rows pass, none ran for " + ", ".join(missing)
    return f"checks: all {passed} rows pass"


def stage_lines(lines, figure):
    """The PROFILE lines of one figure (slowest stage first, the sum last), without the prefix."""
    prefix = f"PROFILE {figure} "
    return [l.removeprefix(prefix) for l in lines if l.startswith(prefix)]


def decoder_op_lines(session, pattern, what, unit):
    """One line per decoder shape: its --ops rows `pattern` matches (rate in `unit`), fastest
    first."""
    by_shape = {}
    for m in pattern.finditer(session):
        by_shape.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return [
        f"decoder {what} {shape} (--ops, {unit}): "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(rows.items(), key=lambda kv: -kv[1]))
        for shape, rows in by_shape.items()
    ]


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-out")
