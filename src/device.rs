//! `--device auto|cpu|cuda[:N]`: auto takes GPU 0 when the binary was built with the cargo
//! feature `cuda` and a GPU answers, else the CPU. Also the machine's memory probe, which the
//! data readers and the trainer both ask before they allocate.

use anyhow::{bail, Result};
use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Cpu,
    Cuda(usize),
}

pub fn parse(s: &str) -> Result<Choice> {
    match s.trim() {
        "auto" => Ok(Choice::Auto),
        "cpu" => Ok(Choice::Cpu),
        "cuda" | "gpu" => Ok(Choice::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Choice::Cuda(n)),
            _ => bail!("unknown device {s:?}; use auto, cpu, cuda or cuda:N"),
        },
    }
}

/// Opens the device named by `s`.
pub fn open(s: &str) -> Result<Device> {
    match parse(s)? {
        Choice::Cpu => Ok(Device::Cpu),
        Choice::Auto => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        Choice::Cuda(n) => {
            if !cfg!(feature = "cuda") {
                bail!(
                    "device {s:?}: this binary was built without CUDA; rebuild with \
                     `cargo build --release --features cuda`, or use --device cpu"
                );
            }
            Device::new_cuda(n).map_err(|e| {
                // candle appends a backtrace under RUST_BACKTRACE; the first line is the cause.
                let e = e.to_string();
                let cause = e.lines().next().unwrap_or("unknown error");
                anyhow::anyhow!(
                    "device {s:?}: cannot open GPU {n}: {cause}; check nvidia-smi, or use --device cpu"
                )
            })
        }
    }
}

/// Sets flush-to-zero and denormals-are-zero on this thread's SSE/AVX unit: results below
/// f32's normal range (~1.2e-38) become 0 instead of taking a microcode path ~100x slower.
/// Late in training, Adam's second moments and small gradients reach that range.
pub fn flush_denormals_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        const FTZ: u32 = 1 << 15;
        const DAZ: u32 = 1 << 6;
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr only read and write the MXCSR control register; FTZ and DAZ
        // change only how subnormal values are treated.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
            csr |= FTZ | DAZ;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
        }
    }
}

/// Starts the global thread pool (used by the matrix products and the fused step) with denormals
/// flushed on every worker, and flushes them on the calling thread. Call once, early.
pub fn init_cpu_threads() {
    flush_denormals_this_thread();
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .start_handler(|_| flush_denormals_this_thread())
        .build_global();
}

pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => format!("cuda:{:?}", d.location()),
        other => format!("{:?}", other.location()),
    }
}

/// MemAvailable from /proc/meminfo, in bytes (Linux); None elsewhere.
pub fn available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse("auto").unwrap(), Choice::Auto);
        assert_eq!(parse("cpu").unwrap(), Choice::Cpu);
        assert_eq!(parse("cuda").unwrap(), Choice::Cuda(0));
        assert_eq!(parse("cuda:3").unwrap(), Choice::Cuda(3));
        assert!(parse("cuda:x").is_err());
        assert!(parse("tpu").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_cpu_build_names_the_feature() {
        let e = open("cuda").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(matches!(open("auto").unwrap(), Device::Cpu));
    }
}
