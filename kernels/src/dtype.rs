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
            DType::BF16 => <bf16 as Storage>::from_f64(x).to_f64(),
            DType::F16 => <f16 as Storage>::from_f64(x).to_f64(),
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

/// x rounded to f32 "to odd": the f32 next to x toward zero, with its last
/// mantissa bit set when any bit of x was dropped. Rounding that to a
/// 16-bit type (at least 2 mantissa bits fewer) gives the correctly rounded
/// (nearest, ties to even) 16-bit value of x. The `half` crate's f64
/// conversions drop the f64's low 32 bits before rounding, so an x just
/// above a 16-bit tie came out rounded down (CHALLENGES #22); a plain
/// f64 -> f32 -> 16-bit chain double-rounds the same way.
fn f64_to_f32_odd(x: f64) -> f32 {
    let f = x as f32;
    if !f.is_finite() || f as f64 == x {
        return f; // exact, NaN, or beyond f32's range (infinite in 16 bits too)
    }
    // `as` rounds to nearest: step back toward zero if that went past x.
    let t = if (f as f64).abs() > x.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(t.to_bits() | 1)
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
        bf16::from_f32(f64_to_f32_odd(x))
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
        f16::from_f32(f64_to_f32_odd(x))
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
    fn sixteen_bit_rounding_from_f64_is_correct_next_to_ties() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7; a hair
        // above (2^-40, below the f64 bits `half` keeps) must round up, a
        // hair below down, the tie itself to even (1). Same for f16 at
        // 1 + 2^-11. The FAIL that found this: CHALLENGES #22.
        let up = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        let down = 1.0 + 2f64.powi(-8) - 2f64.powi(-40);
        assert_eq!(DType::BF16.round(up), 1.0 + 2f64.powi(-7));
        assert_eq!(DType::BF16.round(down), 1.0);
        assert_eq!(DType::BF16.round(1.0 + 2f64.powi(-8)), 1.0);
        assert_eq!(DType::BF16.round(-up), -(1.0 + 2f64.powi(-7)));
        let up16 = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(DType::F16.round(up16), 1.0 + 2f64.powi(-10));
        assert_eq!(DType::F16.round(1.0 + 2f64.powi(-11)), 1.0);
        // Values an f32 holds exactly convert as `half`'s f32 path does.
        for &x in &[0.1f32, -3.3, 6.0e4, 1e-8, 65519.0, 5.877_47e-39] {
            assert_eq!(DType::BF16.round(x as f64), bf16::from_f32(x).to_f64());
            assert_eq!(DType::F16.round(x as f64), f16::from_f32(x).to_f64());
        }
        for &x in &[0.1, -3.3, 6.0e4, 1e-8, 65519.0, 1e300, -1e300, 1e-300] {
            assert_eq!(
                DType::BF16.round(x),
                <bf16 as Storage>::from_f64(x).to_f64()
            );
            assert_eq!(DType::F16.round(x), <f16 as Storage>::from_f64(x).to_f64());
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
