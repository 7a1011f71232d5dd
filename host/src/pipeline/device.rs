//! Device and dtype selection: what the config asks for, and what the machine has.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::error::LoadError;

/// Which device to run on, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The first CUDA GPU when built with `--features cuda` and one is present, else the CPU.
    Auto,
    /// The CPU (f32), what tests and CI use.
    Cpu,
    /// CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)")
                }),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse().map_err(|e| format!("model.device: {e}"))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> Self {
        d.to_string()
    }
}

impl DeviceSpec {
    /// Whether this spec runs on a CUDA GPU in this build.
    pub fn is_cuda(self) -> bool {
        match self {
            DeviceSpec::Cuda(_) => true,
            DeviceSpec::Auto => cfg!(feature = "cuda"),
            DeviceSpec::Cpu => false,
        }
    }

    /// The CUDA ordinal (0 for `auto`).
    pub fn cuda_index(self) -> u32 {
        match self {
            DeviceSpec::Cuda(n) => n as u32,
            _ => 0,
        }
    }

    /// Opens the device. `Auto` falls back to the CPU when no GPU can be used.
    pub fn open(self) -> Result<Device, LoadError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if candle_core::utils::cuda_is_available() {
                    match open_catching(|| Device::new_cuda(0)) {
                        Ok(d) => return Ok(d),
                        Err(e) => {
                            tracing::warn!(error = %e, "CUDA GPU present but unusable; using the CPU")
                        }
                    }
                }
                Ok(Device::Cpu)
            }
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(LoadError::Unsupported {
                        device: self.to_string(),
                        reason: "this binary was built without CUDA support; rebuild with \
                                 `--features cuda` or set model.device = \"cpu\""
                            .into(),
                    });
                }
                open_catching(|| Device::new_cuda(n)).map_err(|reason| LoadError::Device {
                    device: self.to_string(),
                    reason,
                })
            }
        }
    }
}

/// Which dtype to compute in, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DTypeSpec {
    /// bf16 on CUDA, f32 on the CPU (the CPU has no fast half-precision matmul).
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl FromStr for DTypeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DTypeSpec::Auto),
            "f32" | "float32" => Ok(DTypeSpec::F32),
            "bf16" | "bfloat16" => Ok(DTypeSpec::Bf16),
            "f16" | "float16" => Ok(DTypeSpec::F16),
            other => Err(format!(
                "unknown dtype `{other}` (expected auto, f32, bf16 or f16)"
            )),
        }
    }
}

impl TryFrom<String> for DTypeSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse().map_err(|e| format!("model.dtype: {e}"))
    }
}

impl From<DTypeSpec> for String {
    fn from(d: DTypeSpec) -> Self {
        match d {
            DTypeSpec::Auto => "auto",
            DTypeSpec::F32 => "f32",
            DTypeSpec::Bf16 => "bf16",
            DTypeSpec::F16 => "f16",
        }
        .to_string()
    }
}

impl DTypeSpec {
    /// The dtype to use on `device`.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            DTypeSpec::Auto if device.is_cuda() => DType::BF16,
            DTypeSpec::Auto => DType::F32,
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::Bf16 => DType::BF16,
            DTypeSpec::F16 => DType::F16,
        }
    }
}

/// A short human name for a device, for status reports and logs.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// `open()`'s device, or why not. A CUDA build loads the driver library at run time, and
/// cudarc panics where it cannot (a CUDA build on a machine without the NVIDIA driver): that
/// is an error naming the library, not a crash of the worker.
fn open_catching(open: impl FnOnce() -> candle_core::Result<Device>) -> Result<Device, String> {
    crate::panics::catch(open)
        .map_err(|message| format!("the CUDA libraries could not be loaded: {message}"))?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_library_that_cannot_load_is_an_error_naming_it_not_a_crash() {
        let err =
            open_catching(|| panic!("Unable to dynamically load the \"cuda\" shared library"))
                .expect_err("a panic is an error");
        assert!(
            err.contains("could not be loaded") && err.contains("\"cuda\" shared library"),
            "{err}"
        );
        let err = open_catching(|| Err(candle_core::Error::Msg("no GPU 3".into())))
            .expect_err("an error stays one");
        assert_eq!(err, "no GPU 3");
        assert!(matches!(open_catching(|| Ok(Device::Cpu)), Ok(Device::Cpu)));
    }
}
