//! Option values the command line and pipeline files share, each spelled and checked in one
//! place: [`Precision`] (`--precision`, `precision = "…"`) and [`Devices`] (`--devices`,
//! `devices = "…"`). The binaries parse flags into these types once (clap calls `FromStr`);
//! encoder nodes, whose TOML keys stay strings so a file reports every problem at once, check
//! them with the same parser. Whether a CUDA device is there is only known when a model is
//! placed on it (`cnclip_models::device`).

use std::fmt;
use std::str::FromStr;

/// What a model computes in: cn_clip's `--precision` values.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats.
    Fp32,
    /// 16-bit floats (CUDA only: libtorch's CPU kernels lack half-precision convolutions).
    Fp16,
    /// bfloat16.
    Bf16,
    /// cn_clip's automatic mixed precision: fp16 on a GPU, fp32 on the CPU, as its scripts end up computing.
    Amp,
}

impl Precision {
    /// Its name on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Amp => "amp",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a precision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision `{0}`: use fp32, fp16, bf16 or amp")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Ok(match name {
            "fp32" => Precision::Fp32,
            "fp16" => Precision::Fp16,
            "bf16" => Precision::Bf16,
            "amp" => Precision::Amp,
            other => return Err(UnknownPrecision(other.to_string())),
        })
    }
}

/// One device a model replica runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// `cuda` (the first) or `cuda:N`.
    Cuda(Option<usize>),
}

impl Device {
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The devices of a job, one model replica each, in order: `cpu`, `cuda`, `cuda:0,cuda:2`,
/// `cpu,cpu` (two CPU replicas stand in for two GPUs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Devices(Vec<Device>);

impl Devices {
    /// One CPU replica.
    pub fn cpu() -> Self {
        Devices(vec![Device::Cpu])
    }

    pub fn iter(&self) -> impl Iterator<Item = Device> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: a list names at least one device.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any replica is on a GPU.
    pub fn any_cuda(&self) -> bool {
        self.0.iter().any(|d| d.is_cuda())
    }
}

impl Default for Devices {
    fn default() -> Self {
        Devices::cpu()
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, device) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{device}")?;
        }
        Ok(())
    }
}

/// Why a device list does not parse: every problem, one sentence each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct BadDevices(pub Vec<String>);

impl FromStr for Devices {
    type Err = BadDevices;

    /// Comma-separated names; blanks around them are ignored.
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let (mut devices, mut problems) = (Vec::new(), Vec::new());
        for name in list.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let device = match name {
                "cpu" => Some(Device::Cpu),
                "cuda" => Some(Device::Cuda(None)),
                other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(|n| Device::Cuda(Some(n))),
            };
            match device {
                Some(device) => devices.push(device),
                None => problems.push(format!("unknown device `{name}`: use cpu, cuda or cuda:N")),
            }
        }
        if devices.is_empty() && problems.is_empty() {
            problems.push("`devices` names no device (e.g. \"cpu\", \"cuda:0,cuda:1\")".to_string());
        }
        if problems.is_empty() { Ok(Devices(devices)) } else { Err(BadDevices(problems)) }
    }
}

impl serde::Serialize for Devices {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Devices {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list = String::deserialize(deserializer)?;
        list.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precisions_parse_and_print_as_their_names() {
        for precision in [Precision::Fp32, Precision::Fp16, Precision::Bf16, Precision::Amp] {
            assert_eq!(precision.name().parse::<Precision>(), Ok(precision));
            let value = <Precision as clap::ValueEnum>::to_possible_value(&precision).unwrap();
            assert_eq!(value.get_name(), precision.name(), "clap's name");
        }
        assert_eq!(
            "fp64".parse::<Precision>().unwrap_err().to_string(),
            "unknown precision `fp64`: use fp32, fp16, bf16 or amp"
        );
    }

    #[test]
    fn device_lists_parse_print_and_name_every_bad_entry() {
        let devices: Devices = " cuda:0, cuda ,cpu".parse().unwrap();
        assert_eq!(devices.to_string(), "cuda:0,cuda,cpu");
        assert_eq!((devices.len(), devices.any_cuda()), (3, true));
        assert_eq!(devices.to_string().parse::<Devices>(), Ok(devices));
        assert_eq!("cpu,cpu".parse::<Devices>().unwrap().len(), 2);
        let bad = "cpu,tpu,cuda:x".parse::<Devices>().unwrap_err().to_string();
        assert_eq!(
            bad,
            "unknown device `tpu`: use cpu, cuda or cuda:N; unknown device `cuda:x`: use cpu, cuda or cuda:N"
        );
        assert!(" , ".parse::<Devices>().unwrap_err().to_string().contains("names no device"));
    }
}
