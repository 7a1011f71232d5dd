//! The one thread that owns the model. Jobs send it work over a channel and await the reply;
//! HTTP handlers never touch the pipeline and never block on it.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::pipeline::{
    FluxPipeline, GenerateError, Generation, GenerationParams, LoadOptions, PipelineStatus,
    StepProgress,
};

/// Why the inference thread could not produce images.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The model could not be loaded; the next job tries again unless `permanent` (a device
    /// this binary cannot drive): then only another configuration or binary helps.
    #[error("the model could not be loaded: {message}")]
    Load {
        /// The load error with its causes.
        message: String,
        /// No retry can succeed with this configuration and binary.
        permanent: bool,
    },
    /// Generation failed (or was cancelled).
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The inference thread is gone.
    #[error("the inference thread has stopped")]
    Stopped,
    /// Loading or generating panicked (a bug, in our code or a library's). The thread caught
    /// it and dropped the pipeline, whose state is suspect; the next job loads it again.
    #[error("the model panicked ({0}); it reloads on the next job")]
    Panicked(String),
}

/// What `/readyz` and the admin API show about the model.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModelState {
    /// Loaded and ready.
    pub loaded: bool,
    /// Generating now.
    pub busy: bool,
    /// Last load failure, if the model is not loaded.
    pub last_error: Option<String>,
    /// Components, device, dtype, memory (when loaded).
    pub status: Option<PipelineStatus>,
    /// Loads so far.
    pub loads: u32,
    /// Failed loads so far.
    pub load_failures: u32,
    /// The last load failed in a way no retry fixes (a device this binary cannot drive).
    pub permanent_error: bool,
}

type Progress = Box<dyn FnMut(StepProgress) + Send>;

enum Work {
    Generate {
        params: GenerationParams,
        cancel: Arc<AtomicBool>,
        progress: Progress,
        reply: oneshot::Sender<Result<Generation, InferError>>,
    },
    Load {
        reload: bool,
        reply: oneshot::Sender<Result<(), InferError>>,
    },
}

/// A failure to inject into the next generation (fault-injection hook for tests and drills:
/// it runs the real pipeline and fails it part-way, it does not replace it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InjectedFault {
    /// Fail after this many denoising steps.
    pub after_step: u32,
    /// The failure's text, e.g. `CUDA_ERROR_ILLEGAL_ADDRESS` or `out of memory`.
    pub message: String,
    /// Panic with the message instead of returning it as an error, as a bug in a kernel
    /// wrapper or a library would.
    pub panic: bool,
}

/// Handle to the inference thread.
#[derive(Clone)]
pub struct Inference {
    tx: mpsc::Sender<Work>,
    state: Arc<Mutex<ModelState>>,
    faults: Arc<Mutex<std::collections::VecDeque<InjectedFault>>>,
}

impl Inference {
    /// Starts the thread. The model loads on the first job or [`Inference::load`].
    pub fn start(options: LoadOptions) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Work>();
        let state = Arc::new(Mutex::new(ModelState::default()));
        let shared = Arc::clone(&state);
        let faults = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let queued = Arc::clone(&faults);
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || run(options, rx, shared, queued))?;
        Ok(Self { tx, state, faults })
    }

    /// Makes the next generation fail after `fault.after_step` steps with `fault.message`.
    pub fn inject_fault(&self, fault: InjectedFault) {
        if let Ok(mut f) = self.faults.lock() {
            f.push_back(fault);
        }
    }

    /// A snapshot of the model state.
    pub fn state(&self) -> ModelState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Loads the model (or reloads it when `reload`).
    pub async fn load(&self, reload: bool) -> Result<(), InferError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Work::Load { reload, reply })
            .map_err(|_| InferError::Stopped)?;
        answer.await.map_err(|_| InferError::Stopped)?
    }

    /// Generates; `progress` is called on the inference thread after every step, and
    /// setting `cancel` stops at the next step boundary.
    pub async fn generate(
        &self,
        params: GenerationParams,
        cancel: Arc<AtomicBool>,
        progress: Progress,
    ) -> Result<Generation, InferError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Work::Generate {
                params,
                cancel,
                progress,
                reply,
            })
            .map_err(|_| InferError::Stopped)?;
        answer.await.map_err(|_| InferError::Stopped)?
    }
}

fn set(state: &Mutex<ModelState>, f: impl FnOnce(&mut ModelState)) {
    if let Ok(mut s) = state.lock() {
        f(&mut s);
    }
}

fn ensure_loaded(
    options: &LoadOptions,
    pipeline: &mut Option<FluxPipeline>,
    state: &Mutex<ModelState>,
) -> Result<(), InferError> {
    if pipeline.is_some() {
        return Ok(());
    }
    match FluxPipeline::load(options) {
        Ok(p) => {
            let status = p.status();
            *pipeline = Some(p);
            set(state, |s| {
                s.loaded = true;
                s.last_error = None;
                s.permanent_error = false;
                s.status = Some(status);
                s.loads += 1;
            });
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!(error = %msg, "model load failed");
            let permanent = e.is_permanent();
            set(state, |s| {
                s.loaded = false;
                s.last_error = Some(msg.clone());
                s.load_failures += 1;
                s.permanent_error = permanent;
            });
            Err(InferError::Load {
                message: msg,
                permanent,
            })
        }
    }
}

/// What a caught panic leaves: the pipeline dropped (its state is suspect, so the next job
/// loads it again), the state saying why, and the job's error.
fn panicked(
    message: String,
    pipeline: &mut Option<FluxPipeline>,
    state: &Mutex<ModelState>,
) -> InferError {
    tracing::error!(error = %message, "the model panicked; it reloads on the next job");
    *pipeline = None;
    set(state, |s| {
        s.loaded = false;
        s.busy = false;
        s.last_error = Some(format!("panicked: {message}"));
    });
    InferError::Panicked(message)
}

fn run(
    options: LoadOptions,
    rx: mpsc::Receiver<Work>,
    state: Arc<Mutex<ModelState>>,
    faults: Arc<Mutex<std::collections::VecDeque<InjectedFault>>>,
) {
    let mut pipeline: Option<FluxPipeline> = None;
    while let Ok(work) = rx.recv() {
        match work {
            Work::Load { reload, reply } => {
                if reload {
                    pipeline = None;
                    set(&state, |s| s.loaded = false);
                }
                let loaded =
                    crate::panics::catch(|| ensure_loaded(&options, &mut pipeline, &state))
                        .unwrap_or_else(|panic| Err(panicked(panic, &mut pipeline, &state)));
                let _ = reply.send(loaded);
            }
            Work::Generate {
                params,
                cancel,
                mut progress,
                reply,
            } => {
                if cancel.load(Ordering::Acquire) {
                    let total = params.steps.unwrap_or(0);
                    let _ = reply.send(Err(InferError::Generate(GenerateError::Cancelled {
                        completed: 0,
                        total,
                    })));
                    continue;
                }
                // A panic (a bug in our code or a library's) fails this job, not the thread:
                // every later job would otherwise find the worker unable to generate.
                let result = crate::panics::catch(|| {
                    ensure_loaded(&options, &mut pipeline, &state)?;
                    let Some(p) = pipeline.as_mut() else {
                        return Err(InferError::Stopped);
                    };
                    set(&state, |s| s.busy = true);
                    let fault = faults.lock().ok().and_then(|mut f| f.pop_front());
                    let mut fault_fired = false;
                    let mut on_step = |step: StepProgress| {
                        progress(step);
                        if let Some(f) = fault.as_ref().filter(|f| step.step >= f.after_step) {
                            if f.panic {
                                panic!("{}", f.message);
                            }
                            fault_fired = true;
                            return ControlFlow::Break(());
                        }
                        if cancel.load(Ordering::Acquire) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    };
                    let mut out = p.generate(&params, &mut on_step).map_err(InferError::from);
                    if fault_fired && let Some(f) = &fault {
                        out = Err(InferError::Generate(GenerateError::Compute {
                            stage: "denoise",
                            source: candle_core::Error::Msg(f.message.clone()),
                        }));
                    }
                    set(&state, |s| {
                        s.busy = false;
                        s.status = Some(p.status());
                    });
                    out
                })
                .unwrap_or_else(|panic| Err(panicked(panic, &mut pipeline, &state)));
                if let Err(InferError::Generate(e)) = &result
                    && e.is_out_of_memory()
                {
                    // The pipeline's state is suspect after an OOM: reload on the next job.
                    pipeline = None;
                    set(&state, |s| s.loaded = false);
                }
                let _ = reply.send(result);
                // The generation's buffers are freed by now; hand their pages back so the
                // resident size tracks what the worker holds (see heap.rs).
                crate::heap::release_free_pages();
            }
        }
    }
}
