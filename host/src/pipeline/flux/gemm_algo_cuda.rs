//! Which cuBLASLt algorithm runs a GEMM: the heuristic's first pick, or, with tuning on
//! (`HEADSHOT_GEMM_TUNE=on`), the fastest of its first few picks, timed once per shape on the
//! GPU and kept for the process.
//!
//! cuBLASLt's heuristic ranks algorithms by a model, not by measurement, and on shapes whose
//! tiles fill the GPU unevenly (the FP8 MLP down-projection at 1024×1024 runs ~30% below the
//! other projections) its first pick need not be the fastest. Tuning costs a few milliseconds
//! per distinct shape on first use (each candidate runs six times; tens of milliseconds for
//! the decoder's largest convolutions at 1024×1024, again for each new image size); the
//! choice can differ between processes, so outputs stay reproducible within a process, not
//! across them. Off by default until measured on a GPU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::Result;
use candle_core::cuda_backend::cudarc::cublaslt::sys as lt_sys;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;

use super::cuda_util::opt_in;

/// Heuristic candidates timed per shape.
const CANDIDATES: usize = 8;
/// Timed runs per candidate (after one untimed run).
const REPS: usize = 5;
/// GEMMs below this many multiply-adds are not tuned: a few microseconds each, where launch
/// gaps would decide the timing.
const MIN_TUNED_MACS: usize = 1 << 29;

type Algo = lt_sys::cublasLtMatmulAlgo_t;

/// One GEMM configuration as its caller describes it: everything that changes which
/// algorithms apply or how fast they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct TuneKey {
    /// GPU ordinal.
    pub ordinal: usize,
    /// Operand types, scaling and epilogue family, named by the caller.
    pub what: &'static str,
    /// The epilogue or activation within that family.
    pub variant: u32,
    /// `(m, n, k)` as cuBLASLt sees them, then the leading dimensions of A, B and D.
    pub dims: [usize; 6],
}

fn switch() -> &'static AtomicBool {
    static ON: OnceLock<AtomicBool> = OnceLock::new();
    ON.get_or_init(|| AtomicBool::new(opt_in("HEADSHOT_GEMM_TUNE", "on")))
}

/// Whether GEMMs are tuned (`HEADSHOT_GEMM_TUNE=on`, or [`set_tuning`]). While on, the
/// candidates are limited to algorithms that reduce split sums in f32 (see `run_matmul`).
pub fn tuning() -> bool {
    switch().load(Ordering::Relaxed)
}

/// Turns tuning on or off for GEMMs not yet tuned (`bench gpu --ops` times both).
pub fn set_tuning(on: bool) {
    switch().store(on, Ordering::Relaxed);
}

fn tuned() -> &'static Mutex<HashMap<TuneKey, Algo>> {
    static TUNED: OnceLock<Mutex<HashMap<TuneKey, Algo>>> = OnceLock::new();
    TUNED.get_or_init(Default::default)
}

/// How an error from [`choose`] starts when cuBLASLt has no algorithm for a GEMM's shape
/// and settings (its heuristic answers "not supported" or offers none), as opposed to a
/// failed launch or a fault.
const NO_ALGORITHM: &str = "no cuBLASLt algorithm for this GEMM's shape";

/// Whether `e` says cuBLASLt refused a GEMM's shape and settings ([`NO_ALGORITHM`]): the
/// caller may take another path; nothing was enqueued.
pub fn is_refusal(e: &candle_core::Error) -> bool {
    e.to_string().contains(NO_ALGORITHM)
}

/// Up to `count` algorithms for the GEMM `desc` describes, best-ranked first.
///
/// # Safety
/// The handle, descriptor, layouts and preference are live cuBLASLt objects.
unsafe fn heuristics(
    handle: lt_sys::cublasLtHandle_t,
    desc: lt_sys::cublasLtMatmulDesc_t,
    (a, b, d): (
        lt_sys::cublasLtMatrixLayout_t,
        lt_sys::cublasLtMatrixLayout_t,
        lt_sys::cublasLtMatrixLayout_t,
    ),
    pref: lt_sys::cublasLtMatmulPreference_t,
    count: usize,
) -> Result<Vec<Algo>> {
    // SAFETY: an all-zero heuristic result is a valid value of this plain C struct; cuBLASLt
    // overwrites the first `returned` entries.
    let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
        vec![unsafe { std::mem::zeroed() }; count];
    let mut returned: std::ffi::c_int = 0;
    // SAFETY: the array holds `count` entries; the objects are the caller's, live.
    let status = unsafe {
        lt_sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            desc,
            a,
            b,
            d,
            d,
            pref,
            count as std::ffi::c_int,
            results.as_mut_ptr(),
            &mut returned,
        )
    };
    // Only "not supported" is a refusal of the shape; any other status (invalid value, not
    // initialized, allocation failed) is a fault, not a reason to take another path.
    if status == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
        candle_core::bail!("{NO_ALGORITHM}: {status:?}");
    }
    if status != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        candle_core::bail!("cuBLASLt's algorithm heuristic failed: {status:?}");
    }
    if returned <= 0 {
        candle_core::bail!("{NO_ALGORITHM}: none offered");
    }
    Ok(results
        .into_iter()
        .take(returned as usize)
        .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
        .map(|r| r.algo)
        .collect())
}

/// Milliseconds per run of `run(algo)` on `stream` (one untimed run first).
fn time(stream: &CudaStream, run: &dyn Fn(&Algo) -> Result<()>, algo: &Algo) -> Result<f32> {
    let event = || {
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| candle_core::Error::Msg(format!("CUDA event for GEMM tuning: {e:?}")))
    };
    run(algo)?;
    let start = event()?;
    for _ in 0..REPS {
        run(algo)?;
    }
    let end = event()?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(|e| candle_core::Error::Msg(format!("timing a GEMM for tuning: {e:?}")))?;
    Ok(ms / REPS as f32)
}

/// The algorithm for one GEMM. Without tuning, or without a `key` (a GEMM that accumulates
/// into its output cannot be run repeatedly), cuBLASLt's first pick. With tuning, the
/// fastest of its first [`CANDIDATES`] picks by `run`, which executes the GEMM with an
/// algorithm; each candidate `run` refuses is skipped. The caller runs the GEMM with the
/// returned algorithm afterwards (tuning leaves the output written by some candidate).
///
/// # Safety
/// As [`heuristics`]; `run` executes exactly the GEMM `desc` and the layouts describe, on
/// `stream`, with buffers that stay live until it is enqueued.
pub(super) unsafe fn choose(
    handle: lt_sys::cublasLtHandle_t,
    desc: lt_sys::cublasLtMatmulDesc_t,
    layouts: (
        lt_sys::cublasLtMatrixLayout_t,
        lt_sys::cublasLtMatrixLayout_t,
        lt_sys::cublasLtMatrixLayout_t,
    ),
    pref: lt_sys::cublasLtMatmulPreference_t,
    key: Option<TuneKey>,
    stream: &CudaStream,
    run: &dyn Fn(&Algo) -> Result<()>,
) -> Result<Algo> {
    let worth = |k: &TuneKey| k.dims[0] * k.dims[1] * k.dims[2] >= MIN_TUNED_MACS;
    let Some(key) = key.filter(|k| tuning() && worth(k)) else {
        // SAFETY: the caller's contract.
        let first = unsafe { heuristics(handle, desc, layouts, pref, 1) }?;
        return first
            .into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg(format!("{NO_ALGORITHM}: none usable")));
    };
    let lock = || {
        tuned()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the GEMM tuning cache is poisoned".into()))
    };
    if let Some(algo) = lock()?.get(&key) {
        return Ok(*algo);
    }
    // SAFETY: the caller's contract.
    let candidates = unsafe { heuristics(handle, desc, layouts, pref, CANDIDATES) }?;
    let Some(first) = candidates.first() else {
        candle_core::bail!("{NO_ALGORITHM}: none usable");
    };
    // The heuristic's pick must run (it is what an untuned process uses); the others may not.
    let first_ms = time(stream, run, first)?;
    let (mut best, mut best_ms, mut best_index) = (*first, first_ms, 0);
    for (i, algo) in candidates.iter().enumerate().skip(1) {
        match time(stream, run, algo) {
            Ok(ms) if ms < best_ms => (best, best_ms, best_index) = (*algo, ms, i),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(what = key.what, candidate = i, error = %e, "GEMM candidate refused")
            }
        }
    }
    tracing::info!(
        what = key.what,
        variant = key.variant,
        dims = ?key.dims,
        candidates = candidates.len(),
        heuristic_ms = first_ms,
        best_ms,
        best_index,
        "GEMM tuned"
    );
    // Another thread may have tuned the same GEMM meanwhile: every later call uses the first
    // choice stored, so one process runs one algorithm per shape.
    Ok(*lock()?.entry(key).or_insert(best))
}
