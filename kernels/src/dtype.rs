//! Storage types: bf16, f16 and f32 in memory, f32 arithmetic in every kernel.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub const ALL: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

    /// Suffix of the `extern "C"` kernel symbols (`rmsnorm_bf16`, ...).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Round an f64 to this storage type and back: what a value becomes once stored.
    pub fn round(self, x: f64) -> f64 {
        match self {
            DType::BF16 => bf16::from_f64(x).to_f64(),
            DType::F16 => f16::from_f64(x).to_f64(),
            DType::F32 => x as f32 as f64,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            "f32" => Ok(DType::F32),
            _ => Err(format!("unknown dtype `{s}` (expected bf16, f16 or f32)")),
        }
    }
}

/// An element type a kernel can store. Sealed to the three the sources instantiate.
pub trait Storage:
    DeviceRepr + ValidAsZeroBits + Copy + Default + PartialEq + fmt::Debug + Send + Sync + 'static
{
    const DTYPE: DType;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Bit pattern, for exact comparisons (NaN-safe) and guard words.
    fn to_bits_u32(self) -> u32;
    fn from_bits_u32(b: u32) -> Self;
}

impl Storage for bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    fn from_bits_u32(b: u32) -> Self {
        bf16::from_bits(b as u16)
    }
}

impl Storage for f16 {
    const DTYPE: DType = DType::F16;
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    fn from_bits_u32(b: u32) -> Self {
        f16::from_bits(b as u16)
    }
}

impl Storage for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
    fn from_bits_u32(b: u32) -> Self {
        f32::from_bits(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_matches_storage_conversion() {
        for &x in &[0.1, -3.3, 6.0e4, 1e-8, 65519.0] {
            assert_eq!(DType::BF16.round(x), bf16::from_f64(x).to_f64());
            assert_eq!(DType::F16.round(x), f16::from_f64(x).to_f64());
            assert_eq!(DType::F32.round(x), (x as f32) as f64);
        }
    }

    #[test]
    fn parse_and_display_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.to_string().parse::<DType>().unwrap(), d);
        }
        assert!("fp8".parse::<DType>().unwrap_err().contains("fp8"));
    }
}
