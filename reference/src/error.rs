//! The one error type of the reference crate.
//!
//! Every public function checks its arguments before computing anything and
//! reports the first problem it finds as a [`ShapeError`]. Each variant names
//! the op (the function name) and the offending argument, so a message reads
//! like `rmsnorm: weight has shape [895], expected [896]`.
//!
//! Besides plain shape mismatches this also covers index-like values that do
//! not fit the shapes they index (a position, a cache slot, a block id, a
//! context length): those are shape errors in the sense that the value
//! addresses outside an array.

use std::fmt;

/// A shape or index problem in the arguments of a reference op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    /// `arg` has shape `actual`, but the other arguments imply `expected`.
    Mismatch {
        op: &'static str,
        arg: &'static str,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// `arg` has shape `actual`, which breaks a rule that is not a single
    /// shape (an odd width, a zero dimension, heads that do not divide).
    Invalid {
        op: &'static str,
        arg: &'static str,
        actual: Vec<usize>,
        requirement: String,
    },
    /// The element `arg[index]` holds `value`, which lies outside `expected`.
    OutOfRange {
        op: &'static str,
        arg: &'static str,
        index: Vec<usize>,
        value: i64,
        expected: String,
    },
}

impl ShapeError {
    /// The op (function) that rejected its arguments.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Mismatch { op, .. } | Self::Invalid { op, .. } | Self::OutOfRange { op, .. } => {
                op
            }
        }
    }

    /// The argument that was rejected.
    pub fn arg(&self) -> &'static str {
        match self {
            Self::Mismatch { arg, .. }
            | Self::Invalid { arg, .. }
            | Self::OutOfRange { arg, .. } => arg,
        }
    }
}

/// Writes `[a, b, c]`.
struct Dims<'a>(&'a [usize]);

impl fmt::Display for Dims<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mismatch {
                op,
                arg,
                expected,
                actual,
            } => write!(
                f,
                "{op}: {arg} has shape {}, expected {}",
                Dims(actual),
                Dims(expected)
            ),
            Self::Invalid {
                op,
                arg,
                actual,
                requirement,
            } => write!(
                f,
                "{op}: {arg} has shape {}, expected {requirement}",
                Dims(actual)
            ),
            Self::OutOfRange {
                op,
                arg,
                index,
                value,
                expected,
            } => {
                // `index` is written without brackets around a single index
                // list: `slot_mapping[3]`, `block_tables[1, 2]`.
                let idx = Dims(index).to_string();
                write!(
                    f,
                    "{op}: {arg}{idx} = {value} is out of range, expected {expected}"
                )
            }
        }
    }
}

impl std::error::Error for ShapeError {}

#[cfg(test)]
mod tests {
    use super::ShapeError;

    #[test]
    fn mismatch_message() {
        let e = ShapeError::Mismatch {
            op: "rmsnorm",
            arg: "weight",
            expected: vec![896],
            actual: vec![895],
        };
        assert_eq!(
            e.to_string(),
            "rmsnorm: weight has shape [895], expected [896]"
        );
        assert_eq!((e.op(), e.arg()), ("rmsnorm", "weight"));
    }

    #[test]
    fn invalid_message() {
        let e = ShapeError::Invalid {
            op: "silu_mul",
            arg: "input",
            actual: vec![2, 7],
            requirement: "an even last dimension".into(),
        };
        assert_eq!(
            e.to_string(),
            "silu_mul: input has shape [2, 7], expected an even last dimension"
        );
    }

    #[test]
    fn out_of_range_message() {
        let e = ShapeError::OutOfRange {
            op: "paged_decode",
            arg: "block_tables",
            index: vec![1, 2],
            value: 9,
            expected: "a block id in [0, 8)".into(),
        };
        assert_eq!(
            e.to_string(),
            "paged_decode: block_tables[1, 2] = 9 is out of range, expected a block id in [0, 8)"
        );
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(boxed.to_string().starts_with("paged_decode: block_tables"));
    }
}
