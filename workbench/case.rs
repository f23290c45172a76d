//! Case strings: `key=value` pairs joined by commas, e.g.
//! `tokens=7,hidden=1025,residual=1,gen=randn,seed=3,dtype=bf16`.
//!
//! The same string names a row of `check.csv`, is printed by a failing
//! proptest, and is replayed with `workbench check <kernel> --case '...'`.
//! Keys keep the order they were written in, so a printed case reads the way
//! its kernel declares it.

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum CaseError {
    #[error("case `{case}`: `{part}` is not key=value")]
    Syntax { case: String, part: String },
    #[error("case `{case}`: key `{key}` given twice")]
    Duplicate { case: String, key: String },
    #[error("case `{case}`: missing key `{key}`")]
    Missing { case: String, key: String },
    #[error("case `{case}`: `{key}={value}` is not {want}")]
    Value {
        case: String,
        key: String,
        value: String,
        want: String,
    },
    #[error("{kernel}: unknown key `{key}` in case `{case}` (known keys: {known})")]
    UnknownKey {
        kernel: String,
        case: String,
        key: String,
        known: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Case {
    pairs: Vec<(String, String)>,
}

impl Case {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder: add or replace `key`.
    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.set(key, value);
        self
    }

    pub fn set(&mut self, key: &str, value: impl ToString) {
        let value = value.to_string();
        match self.pairs.iter_mut().find(|(k, _)| k == key) {
            Some(p) => p.1 = value,
            None => self.pairs.push((key.to_string(), value)),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.pairs.iter().position(|(k, _)| k == key)?;
        Some(self.pairs.remove(i).1)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.pairs.iter().map(|(k, _)| k.as_str())
    }

    fn value_err(&self, key: &str, value: &str, want: &str) -> CaseError {
        CaseError::Value {
            case: self.to_string(),
            key: key.into(),
            value: value.into(),
            want: want.into(),
        }
    }

    /// A required value parsed as `V`; `want` says what was expected in errors.
    pub fn parse<V: FromStr>(&self, key: &str, want: &str) -> Result<V, CaseError> {
        let v = self.get(key).ok_or_else(|| CaseError::Missing {
            case: self.to_string(),
            key: key.into(),
        })?;
        v.parse().map_err(|_| self.value_err(key, v, want))
    }

    /// An optional value parsed as `V`, `default` when absent.
    pub fn parse_or<V: FromStr>(&self, key: &str, default: V, want: &str) -> Result<V, CaseError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| self.value_err(key, v, want)),
        }
    }

    /// A positive integer dimension.
    pub fn dim(&self, key: &str) -> Result<usize, CaseError> {
        let v: usize = self.parse(key, "a positive integer")?;
        if v == 0 {
            return Err(self.value_err(key, "0", "a positive integer"));
        }
        Ok(v)
    }

    /// A 0/1 flag, false when absent.
    pub fn flag(&self, key: &str) -> Result<bool, CaseError> {
        match self.get(key) {
            None | Some("0") => Ok(false),
            Some("1") => Ok(true),
            Some(v) => Err(self.value_err(key, v, "0 or 1")),
        }
    }

    /// Refuse keys the kernel does not know (a typo must not be ignored).
    pub fn check_keys(&self, kernel: &str, known: &[&str]) -> Result<(), CaseError> {
        for k in self.keys() {
            if !known.contains(&k) {
                return Err(CaseError::UnknownKey {
                    kernel: kernel.into(),
                    case: self.to_string(),
                    key: k.into(),
                    known: known.join(", "),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.pairs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

impl FromStr for Case {
    type Err = CaseError;
    fn from_str(s: &str) -> Result<Self, CaseError> {
        let mut case = Case::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| CaseError::Syntax {
                case: s.into(),
                part: part.into(),
            })?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(CaseError::Syntax {
                    case: s.into(),
                    part: part.into(),
                });
            }
            if case.get(k).is_some() {
                return Err(CaseError::Duplicate {
                    case: s.into(),
                    key: k.into(),
                });
            }
            case.pairs.push((k.into(), v.into()));
        }
        Ok(case)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_order() {
        let s = "tokens=7,hidden=1025,gen=randn,seed=3";
        let c: Case = s.parse().unwrap();
        assert_eq!(c.to_string(), s);
        assert_eq!(c.dim("hidden").unwrap(), 1025);
        assert!(!c.flag("residual").unwrap());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(matches!(
            "a=1,b".parse::<Case>(),
            Err(CaseError::Syntax { .. })
        ));
        assert!(matches!(
            "a=1,a=2".parse::<Case>(),
            Err(CaseError::Duplicate { .. })
        ));
        let c: Case = "tokens=0,x=y".parse().unwrap();
        let e = c.dim("tokens").unwrap_err().to_string();
        assert!(e.contains("tokens=0"), "{e}");
        let e = c.dim("hidden").unwrap_err().to_string();
        assert!(e.contains("missing key `hidden`"), "{e}");
        let e = c
            .check_keys("rmsnorm", &["tokens"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `x`") && e.contains("known keys: tokens"),
            "{e}"
        );
    }
}
