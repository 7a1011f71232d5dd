//! What can go wrong while loading weights or generating, with enough context to act on.

use std::path::PathBuf;

/// Loading the pipeline failed. Every variant names the file, repo or device involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A required file is not there.
    #[error("model file {} is missing: expected {expected}", file.display())]
    Missing {
        /// Where it was looked for.
        file: PathBuf,
        /// What the file should hold.
        expected: String,
    },
    /// A file is there but cannot be what it should be (truncated, wrong format, wrong tensors).
    #[error("model file {} is corrupt or not what was expected: expected {expected}; {reason}", file.display())]
    Corrupt {
        /// The file at fault.
        file: PathBuf,
        /// What the file should hold.
        expected: String,
        /// What was found instead.
        reason: String,
    },
    /// The model source string cannot be used.
    #[error("model source `{source_spec}`: {reason}")]
    BadSource {
        /// The source as configured.
        source_spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A hub download failed.
    #[error("downloading `{file}` from hub repo {repo}: {reason}")]
    Download {
        /// Repo id (with revision).
        repo: String,
        /// Path inside the repo.
        file: String,
        /// The error from the hub client.
        reason: String,
        /// Whether trying again may help (network errors, 5xx) or not (401/403/404).
        transient: bool,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", file.display())]
    Io {
        /// The file involved.
        file: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The compute device cannot be opened.
    #[error("device {device}: {reason}")]
    Device {
        /// Device as configured.
        device: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The device asked for needs support this binary was not built with: no retry helps,
    /// only another binary or another `model.device`.
    #[error("device {device}: {reason}")]
    Unsupported {
        /// Device as configured.
        device: String,
        /// What is missing and how to get it.
        reason: String,
    },
    /// Building a model component from its weights failed.
    #[error("building the {component} from {}: {reason}", file.display())]
    Build {
        /// Which component (transformer, autoencoder, T5, CLIP).
        component: &'static str,
        /// The checkpoint it was built from.
        file: PathBuf,
        /// candle's message (often the missing tensor's name and shape).
        reason: String,
    },
}

impl LoadError {
    /// Whether the failure may go away on its own, so a retry with backoff makes sense.
    pub fn is_transient(&self) -> bool {
        match self {
            LoadError::Download { transient, .. } => *transient,
            LoadError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::ResourceBusy
            ),
            _ => false,
        }
    }

    /// Whether the failure stays as long as the binary does, so that retrying the load (or
    /// the job) cannot help. Missing or corrupt files, and a source folder that is not there
    /// yet, are not: an operator may mount or fix them while the worker waits.
    pub fn is_permanent(&self) -> bool {
        matches!(self, LoadError::Unsupported { .. })
    }
}

/// A generation request failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A parameter is outside what the model and the config allow.
    #[error("{field}: {message}")]
    InvalidParam {
        /// The request field at fault (`width`, `steps`, …).
        field: &'static str,
        /// What is allowed and what was given.
        message: String,
    },
    /// The prompt could not be tokenized.
    #[error("tokenizing the prompt for {encoder}: {reason}")]
    Tokenize {
        /// `T5` or `CLIP`.
        encoder: &'static str,
        /// The tokenizer's message.
        reason: String,
    },
    /// The progress callback asked to stop.
    #[error("generation cancelled after {completed} of {total} steps")]
    Cancelled {
        /// Steps finished before the stop.
        completed: u32,
        /// Steps requested.
        total: u32,
    },
    /// A tensor computation failed (out of memory, a kernel error, a shape bug).
    #[error("{stage} failed: {source}")]
    Compute {
        /// Which stage (encode, denoise, decode).
        stage: &'static str,
        /// candle's error.
        source: candle_core::Error,
    },
    /// Turning pixels into PNG failed.
    #[error("encoding PNG: {0}")]
    Png(String),
}

impl GenerateError {
    /// Whether the failure is the device running out of memory, so the caller can free memory,
    /// report `resource_exhausted` and consider re-initialising the pipeline.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            GenerateError::Compute { source, .. } => {
                let text = source.to_string().to_ascii_lowercase();
                text.contains("out_of_memory") || text.contains("out of memory")
            }
            _ => false,
        }
    }
}

impl GenerateError {
    /// Whether the device is left in a state no reload in this process can trust (a CUDA
    /// illegal address, a launch failure, an ECC error): the worker should be recycled.
    pub fn is_device_fault(&self) -> bool {
        match self {
            GenerateError::Compute { source, .. } => {
                let text = source.to_string();
                text.contains("CUDA_ERROR") && !self.is_out_of_memory()
            }
            _ => false,
        }
    }
}

/// Wraps a candle error with the stage it happened in.
pub(crate) fn at(stage: &'static str) -> impl FnOnce(candle_core::Error) -> GenerateError {
    move |source| GenerateError::Compute { stage, source }
}

#[cfg(test)]
mod device_fault_tests {
    use super::*;

    fn compute(msg: &str) -> GenerateError {
        GenerateError::Compute {
            stage: "denoise",
            source: candle_core::Error::Msg(msg.into()),
        }
    }

    #[test]
    fn device_faults_are_told_apart_from_oom_and_ordinary_failures() {
        assert!(
            compute("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")")
                .is_device_fault()
        );
        assert!(
            !compute("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").is_device_fault()
        );
        assert!(
            compute("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").is_out_of_memory()
        );
        assert!(!compute("shape mismatch in matmul").is_device_fault());
        assert!(!GenerateError::Png("x".into()).is_device_fault());
    }
}
