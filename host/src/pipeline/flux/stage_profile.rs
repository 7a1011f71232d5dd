//! Per-stage times of one forward pass: `bench gpu`'s `PROFILE` lines.
//!
//! A whole-step figure says how far the model is from its target, not where the time goes,
//! and `--ops` times ops alone at the model's shapes, which misses what runs between them
//! (joins, copies, small launches). So the transformer and the decoder mark the end of each
//! of their stages as they run. While a profile is taken on this thread, a mark synchronizes
//! the device and adds the time since the previous mark to its stage's total; otherwise it
//! is one thread-local read. Thread-local, so a profile counts only the pass it wraps even
//! while other threads run generations.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::{Device, Result, Tensor};

/// One stage's total over a profiled pass.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTime {
    /// The stage's name, as its mark gives it.
    pub name: String,
    /// Its output's shape the first time it ran.
    pub dims: Vec<usize>,
    /// Milliseconds, summed over its runs.
    pub ms: f64,
    /// How many times it ran (per block for a block's stages; a double block's finishing
    /// stages run once per stream, so twice per block).
    pub runs: usize,
}

/// Name of the time after a pass's last mark.
pub const TAIL: &str = "(after the last mark)";

/// The profile being taken on this thread.
struct Profile {
    device: Device,
    since: Instant,
    stages: Vec<StageTime>,
}

impl Profile {
    /// Synchronizes, then books the time since the previous mark to `name`.
    fn book(&mut self, name: &str, dims: &[usize]) -> Result<()> {
        self.device.synchronize()?;
        let now = Instant::now();
        let ms = (now - self.since).as_secs_f64() * 1e3;
        self.since = now;
        match self.stages.iter_mut().find(|s| s.name == name) {
            Some(stage) => {
                stage.ms += ms;
                stage.runs += 1;
            }
            None => self.stages.push(StageTime {
                name: name.to_string(),
                dims: dims.to_vec(),
                ms,
                runs: 1,
            }),
        }
        Ok(())
    }
}

thread_local! {
    static PROFILE: RefCell<Option<Profile>> = const { RefCell::new(None) };
}

/// Whether a profile is being taken on this thread: callers that build a stage's name at
/// run time ask first, so an unprofiled pass formats nothing.
pub fn active() -> bool {
    PROFILE.with(|p| p.borrow().is_some())
}

/// Ends the stage that ran since the previous mark: `name`, with output `output`. Does
/// nothing unless a profile is being taken on this thread.
pub fn mark(name: &str, output: &Tensor) -> Result<()> {
    PROFILE.with(|p| match p.borrow_mut().as_mut() {
        Some(profile) => profile.book(name, output.dims()),
        None => Ok(()),
    })
}

/// Clears this thread's profile however the pass ends (an error or a panic included), so
/// later passes on the thread run unprofiled.
struct Clear;

impl Drop for Clear {
    fn drop(&mut self) {
        PROFILE.with(|p| p.borrow_mut().take());
    }
}

/// Runs `pass` with its marks timed on `device`: its output, and each stage's total in the
/// order the stages first ran, with the time after the last mark as [`TAIL`] (so the totals
/// add up to the pass). Synchronizing at every mark costs a launch's latency or so per
/// stage; compare the sum with the unprofiled figure.
pub fn profile<T>(
    device: &Device,
    pass: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<StageTime>)> {
    if active() {
        candle_core::bail!("a profile is already being taken on this thread");
    }
    device.synchronize()?;
    let clear = Clear;
    PROFILE.with(|p| {
        *p.borrow_mut() = Some(Profile {
            device: device.clone(),
            since: Instant::now(),
            stages: Vec::new(),
        })
    });
    let output = pass()?;
    let stages = PROFILE.with(|p| -> Result<Vec<StageTime>> {
        let mut slot = p.borrow_mut();
        let Some(profile) = slot.as_mut() else {
            return Ok(Vec::new());
        };
        profile.book(TAIL, &[])?;
        Ok(std::mem::take(&mut profile.stages))
    })?;
    drop(clear);
    Ok((output, stages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_add_up_per_stage_in_first_run_order_and_only_while_profiling() {
        let device = Device::Cpu;
        let t = Tensor::zeros((2, 3), candle_core::DType::F32, &device).unwrap();
        // Unprofiled marks do nothing.
        mark("ignored", &t).unwrap();
        assert!(!active());
        let (value, stages) = profile(&device, || {
            assert!(active());
            for _ in 0..3 {
                mark("a", &t)?;
                // Time spent between two marks is booked to the later one.
                std::thread::sleep(std::time::Duration::from_millis(2));
                mark("b", &t.flatten_all()?)?;
            }
            Ok(7)
        })
        .unwrap();
        assert_eq!(value, 7);
        assert!(!active(), "the profile ends with its pass");
        let summary: Vec<(&str, &[usize], usize)> = stages
            .iter()
            .map(|s| (s.name.as_str(), s.dims.as_slice(), s.runs))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", &[2, 3][..], 3),
                ("b", &[6][..], 3),
                (TAIL, &[][..], 1)
            ]
        );
        assert!(stages.iter().all(|s| s.ms >= 0.0));
        // The sleeps are booked to "b", the mark that ends them: at least 6 ms.
        assert!(stages[1].ms >= 6.0, "{stages:?}");
    }

    #[test]
    fn a_failed_pass_ends_its_profile_and_profiles_do_not_nest() {
        let device = Device::Cpu;
        let failed = profile(&device, || -> Result<()> {
            candle_core::bail!("pass failed")
        });
        assert!(failed.is_err());
        assert!(!active());
        let nested = profile(&device, || profile(&device, || Ok(())).map(|_| ()));
        let message = nested.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("already being taken"), "{message}");
        assert!(!active());
    }
}
