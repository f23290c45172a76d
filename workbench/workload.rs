//! The e2e request sets. `nanovllm-256` is nano-vllm's benchmark workload,
//! stored once in `benches/data/nanovllm-256.bin` (format and generator in
//! `benches/data/make_nanovllm_workload.py`) and embedded here, so our
//! engine and the peer scripts run exactly the same requests.

use thiserror::Error;

/// One request: prompt token ids and how many tokens to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
}

/// nano-vllm's sampling settings for this workload.
pub const NANOVLLM_TEMPERATURE: f32 = 0.6;

const NANOVLLM_256: &[u8] = include_bytes!("../benches/data/nanovllm-256.bin");

#[derive(Debug, Error, PartialEq)]
pub enum WorkloadError {
    #[error("workload file: bad magic (expected WBREQ1)")]
    Magic,
    #[error("workload file: truncated at byte {0}")]
    Truncated(usize),
    #[error("workload file: {0} trailing bytes after the last request")]
    Trailing(usize),
}

/// Parse the binary format: b"WBREQ1", u32 count, then per request u16
/// prompt_len, u16 max_tokens, prompt_len x u16 ids (little-endian).
pub fn parse(bytes: &[u8]) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let magic = bytes.get(..6).ok_or(WorkloadError::Truncated(0))?;
    if magic != b"WBREQ1" {
        return Err(WorkloadError::Magic);
    }
    let mut at = 6;
    let mut take = |n: usize| -> Result<&[u8], WorkloadError> {
        let s = bytes.get(at..at + n).ok_or(WorkloadError::Truncated(at))?;
        at += n;
        Ok(s)
    };
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
    let count = take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))?;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let h = take(4)?;
        let (len, max_tokens) = (u16_at(h, 0) as usize, u16_at(h, 1) as usize);
        let ids = take(2 * len)?;
        out.push(WorkloadRequest {
            prompt: (0..len).map(|i| u16_at(ids, i) as u32).collect(),
            max_tokens,
        });
    }
    if at != bytes.len() {
        return Err(WorkloadError::Trailing(bytes.len() - at));
    }
    Ok(out)
}

/// nano-vllm's benchmark: 256 requests, 142,827 prompt and 133,966 output tokens.
pub fn nanovllm_256() -> Result<Vec<WorkloadRequest>, WorkloadError> {
    parse(NANOVLLM_256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanovllm_totals_match_the_python_draw() {
        let w = nanovllm_256().unwrap();
        assert_eq!(w.len(), 256);
        assert_eq!(w.iter().map(|r| r.prompt.len()).sum::<usize>(), 142_827);
        assert_eq!(w.iter().map(|r| r.max_tokens).sum::<usize>(), 133_966);
        assert!(w.iter().all(
            |r| (100..=1024).contains(&r.prompt.len()) && (100..=1024).contains(&r.max_tokens)
        ));
        assert!(w.iter().flat_map(|r| &r.prompt).all(|&t| t <= 10_000));
    }

    #[test]
    fn damaged_files_are_errors() {
        assert_eq!(parse(b"WBREQ2\0\0\0\0"), Err(WorkloadError::Magic));
        assert!(matches!(
            parse(&NANOVLLM_256[..100]),
            Err(WorkloadError::Truncated(_))
        ));
        let mut extra = NANOVLLM_256.to_vec();
        extra.push(0);
        assert_eq!(parse(&extra), Err(WorkloadError::Trailing(1)));
    }
}
