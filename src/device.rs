//! `--device auto|cpu|cuda[:N]`: auto takes GPU 0 when the binary was built with the cargo
//! feature `cuda` and a GPU answers, else the CPU.

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
            Device::new_cuda(n)
                .map_err(|e| anyhow::anyhow!("device {s:?}: cannot open GPU {n}: {e}"))
        }
    }
}

pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => format!("cuda:{:?}", d.location()),
        other => format!("{:?}", other.location()),
    }
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
