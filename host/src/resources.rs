//! What the machine has left: GPU memory, utilization and temperature through NVML, system
//! and process memory through sysinfo; and admission control that refuses a request whose
//! estimated memory does not fit, with a retry-after, instead of risking an OOM.
//!
//! No GPU, no NVML library, or a driver error all read as "GPU unavailable", never as an
//! error: the CPU build and CI machines report system memory only.

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One GPU's state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuReading {
    /// Device name.
    pub name: String,
    /// Total memory, bytes.
    pub total_bytes: u64,
    /// Free memory, bytes.
    pub free_bytes: u64,
    /// Utilization, percent.
    pub utilization_percent: Option<u32>,
    /// Temperature, °C.
    pub temperature_c: Option<u32>,
}

/// A snapshot of the machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Readings {
    /// The GPU in use, when one is readable.
    pub gpu: Option<GpuReading>,
    /// Why no GPU reading is available.
    pub gpu_unavailable: Option<String>,
    /// System memory, bytes.
    pub system_total_bytes: u64,
    /// Memory available to new allocations, bytes.
    pub system_available_bytes: u64,
    /// This process's resident memory, bytes.
    pub process_rss_bytes: u64,
}

/// Where readings come from: the real machine, or a test's script.
pub trait Probe: Send + Sync {
    /// Current readings.
    fn read(&self) -> Readings;
}

/// Readings younger than this are reused: admission runs once per job and a fresh read costs
/// a few hundred microseconds (procfs, NVML).
const READING_TTL: std::time::Duration = std::time::Duration::from_millis(200);

/// Reads the real machine.
pub struct SystemProbe {
    sys: Mutex<sysinfo::System>,
    nvml: Result<nvml_wrapper::Nvml, String>,
    gpu_index: u32,
    cached: Mutex<Option<(std::time::Instant, Readings)>>,
}

impl SystemProbe {
    /// Opens NVML when `use_gpu` (a CUDA device is configured) and it loads.
    pub fn new(use_gpu: bool, gpu_index: u32) -> Self {
        let nvml = if use_gpu {
            nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable: {e}"))
        } else {
            Err("the model runs on the CPU".into())
        };
        Self {
            sys: Mutex::new(sysinfo::System::new()),
            nvml,
            gpu_index,
            cached: Mutex::new(None),
        }
    }

    fn read_now(&self) -> Readings {
        let mut r = Readings::default();
        if let Ok(mut sys) = self.sys.lock() {
            sys.refresh_memory();
            r.system_total_bytes = sys.total_memory();
            r.system_available_bytes = sys.available_memory();
            if let Ok(pid) = sysinfo::get_current_pid() {
                sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), false);
                r.process_rss_bytes = sys.process(pid).map(|p| p.memory()).unwrap_or(0);
            }
        }
        match &self.nvml {
            Ok(nvml) => match nvml.device_by_index(self.gpu_index).and_then(|d| {
                let mem = d.memory_info()?;
                Ok(GpuReading {
                    name: d.name().unwrap_or_else(|_| "unknown GPU".into()),
                    total_bytes: mem.total,
                    free_bytes: mem.free,
                    utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                    temperature_c: d
                        .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                        .ok(),
                })
            }) {
                Ok(g) => r.gpu = Some(g),
                Err(e) => r.gpu_unavailable = Some(format!("reading GPU {}: {e}", self.gpu_index)),
            },
            Err(why) => r.gpu_unavailable = Some(why.clone()),
        }
        r
    }
}

impl Probe for SystemProbe {
    fn read(&self) -> Readings {
        if let Ok(cached) = self.cached.lock()
            && let Some((at, r)) = cached.as_ref()
            && at.elapsed() < READING_TTL
        {
            return r.clone();
        }
        let r = self.read_now();
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((std::time::Instant::now(), r.clone()));
        }
        r
    }
}

/// Admission settings (`[resources]`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionConfig {
    /// Estimated working memory per output pixel per image, bytes (activations, latents,
    /// decode buffers), on the GPU.
    pub gpu_bytes_per_pixel: u64,
    /// The same on the CPU.
    pub cpu_bytes_per_pixel: u64,
    /// Fixed working memory per request, bytes.
    pub base_bytes: u64,
    /// Memory always left free, bytes.
    pub margin_bytes: u64,
    /// Suggested wait when refusing, ms.
    pub retry_after_ms: u64,
}

/// A refusal, with the numbers behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Refusal {
    /// Estimated need, bytes.
    pub needed_bytes: u64,
    /// Free now, bytes.
    pub free_bytes: u64,
    /// Kept free, bytes.
    pub margin_bytes: u64,
    /// `gpu` or `system`.
    pub pool: &'static str,
    /// Suggested wait, ms.
    pub retry_after_ms: u64,
}

/// Whether requests for a model on `device` are admitted against GPU memory. With `auto` a
/// CUDA build runs the model on the CPU when it finds no GPU: memory is counted where the
/// model will run (counted on a GPU nobody can read, every request was admitted unchecked).
pub fn admits_on_gpu(device: crate::pipeline::device::DeviceSpec, probe: &dyn Probe) -> bool {
    use crate::pipeline::device::DeviceSpec;
    device.is_cuda() && (device != DeviceSpec::Auto || probe.read().gpu.is_some())
}

/// Reads resources and decides admission.
pub struct Monitor {
    probe: Arc<dyn Probe>,
    config: AdmissionConfig,
    on_gpu: bool,
}

impl Monitor {
    /// A monitor over `probe`; `on_gpu` picks the memory pool requests are admitted against.
    pub fn new(probe: Arc<dyn Probe>, config: AdmissionConfig, on_gpu: bool) -> Self {
        Self {
            probe,
            config,
            on_gpu,
        }
    }

    /// Current readings.
    pub fn read(&self) -> Readings {
        self.probe.read()
    }

    /// Estimated working memory of one request.
    pub fn estimate(&self, width: u32, height: u32, num_images: u32) -> u64 {
        let per_pixel = if self.on_gpu {
            self.config.gpu_bytes_per_pixel
        } else {
            self.config.cpu_bytes_per_pixel
        };
        let pixels = u64::from(width) * u64::from(height) * u64::from(num_images.max(1));
        self.config
            .base_bytes
            .saturating_add(pixels.saturating_mul(per_pixel))
    }

    /// Admits a request if its estimate fits in free memory minus the margin.
    pub fn admit(&self, width: u32, height: u32, num_images: u32) -> Result<u64, Refusal> {
        let needed = self.estimate(width, height, num_images);
        let r = self.probe.read();
        let (pool, free) = match (&r.gpu, self.on_gpu) {
            (Some(g), true) => ("gpu", g.free_bytes),
            // On a GPU build without readable NVML we cannot judge; admit and let the
            // pipeline report an OOM if it happens.
            (None, true) => return Ok(needed),
            (_, false) => ("system", r.system_available_bytes),
        };
        if free == 0 && r.system_total_bytes == 0 && pool == "system" {
            return Ok(needed);
        }
        if needed.saturating_add(self.config.margin_bytes) <= free {
            Ok(needed)
        } else {
            Err(Refusal {
                needed_bytes: needed,
                free_bytes: free,
                margin_bytes: self.config.margin_bytes,
                pool,
                retry_after_ms: self.config.retry_after_ms,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Scripted(AtomicU64);

    impl Probe for Scripted {
        fn read(&self) -> Readings {
            let free = self.0.load(Ordering::Relaxed);
            Readings {
                gpu: Some(GpuReading {
                    name: "test".into(),
                    total_bytes: 80 << 30,
                    free_bytes: free,
                    utilization_percent: None,
                    temperature_c: None,
                }),
                gpu_unavailable: None,
                system_total_bytes: 64 << 30,
                system_available_bytes: free,
                process_rss_bytes: 1 << 30,
            }
        }
    }

    /// A machine with system memory and no readable GPU.
    struct NoGpu;

    impl Probe for NoGpu {
        fn read(&self) -> Readings {
            Readings {
                gpu_unavailable: Some("no NVML".into()),
                system_total_bytes: 64 << 30,
                system_available_bytes: 32 << 30,
                ..Readings::default()
            }
        }
    }

    #[test]
    fn admission_counts_the_memory_where_the_model_will_run() {
        use crate::pipeline::device::DeviceSpec;
        let gpu = Scripted(AtomicU64::new(40 << 30));
        // A named GPU is counted on the GPU, readable or not; the CPU never.
        assert!(admits_on_gpu(DeviceSpec::Cuda(0), &gpu));
        assert!(admits_on_gpu(DeviceSpec::Cuda(0), &NoGpu));
        assert!(!admits_on_gpu(DeviceSpec::Cpu, &gpu));
        // `auto` without a readable GPU runs on the CPU: counted there. With one, on the GPU
        // in CUDA builds (a CPU build runs on the CPU whatever it finds).
        assert!(!admits_on_gpu(DeviceSpec::Auto, &NoGpu));
        assert_eq!(
            admits_on_gpu(DeviceSpec::Auto, &gpu),
            cfg!(feature = "cuda")
        );
    }

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            gpu_bytes_per_pixel: 4096,
            cpu_bytes_per_pixel: 1024,
            base_bytes: 256 << 20,
            margin_bytes: 1 << 30,
            retry_after_ms: 5000,
        }
    }

    #[test]
    fn refuses_before_oom_and_recovers_when_memory_frees() {
        let probe = Arc::new(Scripted(AtomicU64::new(40 << 30)));
        let m = Monitor::new(probe.clone(), cfg(), true);
        // 1024x1024x2 at 4 KiB/pixel = 8 GiB + 256 MiB: fits in 40 GiB.
        assert!(m.admit(1024, 1024, 2).is_ok());
        probe.0.store(6 << 30, Ordering::Relaxed);
        let refusal = m.admit(1024, 1024, 2).unwrap_err();
        assert_eq!(refusal.pool, "gpu");
        assert_eq!(refusal.retry_after_ms, 5000);
        assert!(refusal.needed_bytes > refusal.free_bytes - refusal.margin_bytes);
        // A smaller request still fits; then memory comes back and the big one is admitted.
        assert!(m.admit(512, 512, 1).is_ok());
        probe.0.store(20 << 30, Ordering::Relaxed);
        assert!(m.admit(1024, 1024, 2).is_ok());
    }

    #[test]
    fn cpu_requests_are_judged_against_system_memory() {
        let probe = Arc::new(Scripted(AtomicU64::new(2 << 30)));
        let m = Monitor::new(probe, cfg(), false);
        assert!(m.admit(64, 64, 1).is_ok());
        let r = m.admit(1536, 1536, 4).unwrap_err();
        assert_eq!(r.pool, "system");
    }

    #[test]
    fn real_readings_without_a_gpu() {
        let p = SystemProbe::new(false, 0);
        let r = p.read();
        assert!(r.system_total_bytes > 0);
        assert!(r.system_available_bytes > 0 && r.system_available_bytes <= r.system_total_bytes);
        assert!(r.process_rss_bytes > 0);
        assert!(r.gpu.is_none());
        assert!(r.gpu_unavailable.is_some());
        // Asking for NVML on a machine without it is not an error either.
        let p = SystemProbe::new(true, 0);
        let r = p.read();
        assert!(r.gpu.is_some() || r.gpu_unavailable.is_some());
    }
}
