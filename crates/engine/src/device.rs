//! Where a model runs: the CPU, or an NVIDIA GPU when the binary is built with the `cuda`
//! feature (candle's CUDA backend). `--device cpu|cuda[:N]` on the command line parses here.
//!
//! On the CPU the decoder keeps its own kernels (activations f32, weights in their storage). On a
//! GPU every matrix is moved there dense in one compute dtype (bf16 for models of 1B parameters
//! and more, f32 below, unless `--dtype` says otherwise) and the decoder runs candle's ops, which
//! have CUDA kernels (cuBLAS for the products).

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        if l == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        if l == "cuda" || l == "gpu" {
            return Ok(DeviceSpec::Cuda(0));
        }
        if let Some(n) = l.strip_prefix("cuda:") {
            if let Ok(i) = n.parse::<usize>() {
                return Ok(DeviceSpec::Cuda(i));
            }
        }
        bail!("--device `{s}`: expected cpu, cuda or cuda:N (N a GPU index such as 0)")
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Opens the device asked for; with none asked for, GPU 0 when this build has CUDA and a GPU
/// answers, else the CPU.
pub fn open(spec: Option<DeviceSpec>) -> Result<Device> {
    match spec {
        Some(DeviceSpec::Cpu) => Ok(Device::Cpu),
        Some(DeviceSpec::Cuda(i)) => open_cuda(i),
        None if CUDA_BUILT => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
        None => Ok(Device::Cpu),
    }
}

fn open_cuda(i: usize) -> Result<Device> {
    if !CUDA_BUILT {
        bail!(
            "--device cuda:{i}: this binary was built without GPU support; build it with \
             `cargo build --release --features cuda` (README, \"GPU build\"), or use --device cpu"
        );
    }
    Device::new_cuda(i).map_err(|e| {
        // candle's message carries a backtrace after its first line.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "--device cuda:{i}: no CUDA GPU could be opened ({first}); check `nvidia-smi`, the \
             GPU index, and that the CUDA 13 libraries (libcublas, libcurand, libnvrtc, \
             libcudart) are on LD_LIBRARY_PATH, or use --device cpu"
        )
    })
}

/// How the device is named in outputs' provenance (`cpu`, `cuda:0`).
pub fn name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The compute dtype on a GPU when `--dtype` leaves it open (auto, native), for matrices held
/// as `storage`: bf16/f16 checkpoints compute in their own dtype; otherwise (f32 or quantized)
/// bf16 for models of 1B parameters and more, f32 below.
pub fn gpu_compute_dtype(storage: &[DType], params: usize) -> DType {
    if let Some(d) = storage
        .iter()
        .find(|d| matches!(d, DType::BF16 | DType::F16))
    {
        return *d;
    }
    if params >= 1_000_000_000 {
        return DType::BF16;
    }
    DType::F32
}

/// Turns a CUDA out-of-memory failure into an error naming the stage and what to lower; other
/// errors pass through unchanged.
pub fn explain_oom(e: anyhow::Error, stage: &str, batch_size: usize) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("OUT_OF_MEMORY") || text.contains("out of memory") {
        anyhow::anyhow!(
            "{stage}: the GPU ran out of memory at batch size {batch_size}; lower --batch-size \
             (or use --dtype bf16) ({text})"
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("cuda:N"), "{e}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn cpu_build_names_the_feature() {
        if CUDA_BUILT {
            return;
        }
        let e = open(Some(DeviceSpec::Cuda(0))).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(open(None).unwrap().is_cpu());
    }

    #[test]
    fn compute_dtype_rule() {
        assert_eq!(gpu_compute_dtype(&[DType::BF16], 100), DType::BF16);
        assert_eq!(gpu_compute_dtype(&[DType::F32], 8_000_000_000), DType::BF16);
        assert_eq!(gpu_compute_dtype(&[DType::F32], 135_000_000), DType::F32);
        assert_eq!(gpu_compute_dtype(&[], 135_000_000), DType::F32);
        assert_eq!(gpu_compute_dtype(&[], 8_000_000_000), DType::BF16);
    }

    #[test]
    fn oom_is_explained() {
        let e = explain_oom(
            anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY)"),
            "hidden",
            32,
        );
        let s = e.to_string();
        assert!(s.contains("hidden") && s.contains("32") && s.contains("--batch-size"));
        let e = explain_oom(anyhow::anyhow!("other"), "hidden", 32);
        assert_eq!(e.to_string(), "other");
    }
}
