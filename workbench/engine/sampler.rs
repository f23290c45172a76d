//! The CPU reference sampler: the definition the GPU sampler is checked
//! against, so it is written for exactness, not speed.
//!
//! Given one row of logits (`[vocab]`, f32) and a request's
//! [`SamplingParams`]:
//! - temperature 0 is greedy: the argmax, ties going to the lowest index;
//! - otherwise `softmax(logits / T)` is computed in f64, restricted to the
//!   `top_k` most probable tokens (0 = off), then to the nucleus: the
//!   smallest prefix of those, by falling probability, whose mass reaches
//!   `top_p` of what top-k kept (1 = off; at least one token always stays).
//!   This is the order Hugging Face's and vLLM's samplers apply them in.
//!   Ties in probability are broken by the lower index, so the kept set is a
//!   function of the logits alone;
//! - one uniform `u` in [0, 1) is drawn and the token is the first index, in
//!   ascending index order, whose running sum of kept weights exceeds
//!   `u * total` (inverse CDF). Fixing the walk order to token order makes
//!   `(logits, params, u) -> token` a pure function the GPU can reproduce
//!   given the same `u` ([`sample_with_uniform`]).
//!
//! A NaN logit is an error naming its index; `+inf` logits share all the
//! mass equally (the limit of softmax); `-inf` logits get none.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How one request's tokens are drawn and when it stops (nano-vllm's
/// `SamplingParams`, plus top-k/top-p and a seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most probable tokens; 0 turns it off.
    pub top_k: usize,
    /// Nucleus mass in (0, 1]; 1 turns it off.
    pub top_p: f32,
    /// Seed for this request's generator, for reproducible draws; `None`
    /// seeds from the OS.
    pub seed: Option<u64>,
    /// Keep generating past an end-of-sequence token (benchmarks do this to
    /// get a fixed output length).
    pub ignore_eos: bool,
    /// Most tokens to generate; at least 1.
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    /// Plain sampling at temperature 1, no truncation, 64 tokens
    /// (nano-vllm's defaults).
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            ignore_eos: false,
            max_tokens: 64,
        }
    }
}

/// A sampling parameter out of range; each names the field.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SamplingParamsError {
    #[error("sampling params: temperature must be a finite number >= 0 (0 = greedy), got {0}")]
    Temperature(f32),
    #[error("sampling params: top_p must be in (0, 1] (1 = off), got {0}")]
    TopP(f32),
    #[error("sampling params: max_tokens must be at least 1, got 0")]
    MaxTokens,
}

impl SamplingParamsError {
    /// The offending field's name, as spelled in [`SamplingParams`].
    pub fn field(&self) -> &'static str {
        match self {
            Self::Temperature(_) => "temperature",
            Self::TopP(_) => "top_p",
            Self::MaxTokens => "max_tokens",
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), other fields at their defaults.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field; `top_k` has no invalid value (0 = off, and a k
    /// beyond the vocab keeps everything).
    pub fn validate(&self) -> Result<(), SamplingParamsError> {
        self.validate_distribution()?;
        if self.max_tokens == 0 {
            return Err(SamplingParamsError::MaxTokens);
        }
        Ok(())
    }

    /// A generator for this request: seeded when `seed` is set, so the same
    /// request draws the same tokens run after run.
    pub fn rng(&self) -> SmallRng {
        match self.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        }
    }

    /// The fields the draw itself depends on (not `max_tokens`, which only
    /// the scheduler uses).
    fn validate_distribution(&self) -> Result<(), SamplingParamsError> {
        // `!(x >= 0)` also catches NaN.
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(SamplingParamsError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingParamsError::TopP(self.top_p));
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Why no token could be drawn.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SampleError {
    #[error("sample: the logits row is empty (vocab of 0)")]
    EmptyLogits,
    #[error("sample: {len} logits do not fit u32 token ids")]
    VocabTooLarge { len: usize },
    #[error("sample: logit {index} is NaN")]
    NanLogit { index: usize },
    #[error("sample: all {len} logits are -inf; no token can be drawn")]
    AllMasked { len: usize },
    #[error("sample: the uniform draw must be in [0, 1), got {0}")]
    Uniform(f64),
    #[error("sample: {0}")]
    Params(#[from] SamplingParamsError),
}

/// Draws one token id from `logits` (`[vocab]`) under `params`, taking one
/// uniform from `rng` (none when greedy, so greedy requests do not advance
/// their generator).
pub fn sample<R: Rng + ?Sized>(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut R,
) -> Result<u32, SampleError> {
    match kept_weights(logits, params)? {
        Kept::Greedy(i) => Ok(i),
        Kept::Weights(w) => {
            let u: f64 = rng.random();
            Ok(draw(&w, u))
        }
    }
}

/// [`sample`] with the uniform given: the pure function a GPU sampler fed
/// the same `u` must reproduce. `u` is ignored when greedy.
pub fn sample_with_uniform(
    logits: &[f32],
    params: &SamplingParams,
    u: f64,
) -> Result<u32, SampleError> {
    if !(0.0..1.0).contains(&u) {
        return Err(SampleError::Uniform(u));
    }
    match kept_weights(logits, params)? {
        Kept::Greedy(i) => Ok(i),
        Kept::Weights(w) => Ok(draw(&w, u)),
    }
}

/// The distribution [`sample`] draws from: `[vocab]` probabilities in f64,
/// zero outside the kept set, summing to 1 (one-hot when greedy).
pub fn distribution(logits: &[f32], params: &SamplingParams) -> Result<Vec<f64>, SampleError> {
    match kept_weights(logits, params)? {
        Kept::Greedy(i) => {
            let mut p = vec![0.0; logits.len()];
            p[i as usize] = 1.0;
            Ok(p)
        }
        Kept::Weights(mut w) => {
            let total: f64 = w.iter().sum();
            for x in &mut w {
                *x /= total;
            }
            Ok(w)
        }
    }
}

enum Kept {
    Greedy(u32),
    /// Unnormalised weights, `[vocab]`, zero outside the kept set, with at
    /// least one positive entry.
    Weights(Vec<f64>),
}

fn kept_weights(logits: &[f32], params: &SamplingParams) -> Result<Kept, SampleError> {
    params.validate_distribution()?;
    if logits.is_empty() {
        return Err(SampleError::EmptyLogits);
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(SampleError::VocabTooLarge { len: logits.len() });
    }
    if let Some(index) = logits.iter().position(|x| x.is_nan()) {
        return Err(SampleError::NanLogit { index });
    }
    if logits.iter().all(|&x| x == f32::NEG_INFINITY) {
        return Err(SampleError::AllMasked { len: logits.len() });
    }
    if params.is_greedy() {
        // Strict `>` keeps the first of equal maxima.
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return Ok(Kept::Greedy(best as u32));
    }

    // softmax(logits / T) up to its normaliser, in f64. Subtracting the max
    // keeps exp from overflowing; f32 / tiny T cannot overflow f64
    // (3.4e38 / 1.4e-45 ~ 2.4e83).
    let t = f64::from(params.temperature);
    let z: Vec<f64> = logits.iter().map(|&x| f64::from(x) / t).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut w: Vec<f64> = if m == f64::INFINITY {
        // exp(inf - inf) is NaN; the limit gives the +inf logits equal mass.
        z.iter()
            .map(|&x| if x == f64::INFINITY { 1.0 } else { 0.0 })
            .collect()
    } else {
        z.iter().map(|&x| (x - m).exp()).collect()
    };

    let n = w.len();
    let top_k_on = params.top_k > 0 && params.top_k < n;
    let top_p_on = params.top_p < 1.0;
    if top_k_on || top_p_on {
        // Indices by falling weight, ties by index: the weights are finite
        // and >= 0, so total_cmp is the ordinary order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
        let mut keep = if top_k_on { params.top_k } else { n };
        if top_p_on {
            // Nucleus over the top-k survivors, relative to their own mass.
            let kept_mass: f64 = order[..keep].iter().map(|&i| w[i]).sum();
            let target = f64::from(params.top_p) * kept_mass;
            let mut cum = 0.0;
            let mut nucleus = keep;
            for (rank, &i) in order[..keep].iter().enumerate() {
                cum += w[i];
                if cum >= target {
                    nucleus = rank + 1;
                    break;
                }
            }
            keep = nucleus.max(1);
        }
        for &i in &order[keep..] {
            w[i] = 0.0;
        }
    }
    Ok(Kept::Weights(w))
}

/// Inverse CDF in token order over `w` (at least one entry positive).
fn draw(w: &[f64], u: f64) -> u32 {
    let total: f64 = w.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    let mut last_positive = 0;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 {
            cum += x;
            last_positive = i;
            if target < cum {
                return i as u32;
            }
        }
    }
    // Only reachable when u * total rounds up to total: take the last token
    // with mass, never one that was cut.
    last_positive as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    // Both globs export an `Rng`; this one is the rand 0.9 trait `sample` takes.
    use rand::Rng;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..SamplingParams::default()
        }
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let m = logits
            .iter()
            .fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let e: Vec<f64> = logits.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(42)
    }

    #[test]
    fn greedy_picks_the_max() {
        let logits = [0.1, -3.0, 2.5, 2.4, -0.5];
        let mut r = rng();
        assert_eq!(
            sample(&logits, &SamplingParams::greedy(), &mut r).unwrap(),
            2
        );
        let neg = [-5.0, -1.0, -7.0];
        assert_eq!(sample(&neg, &SamplingParams::greedy(), &mut r).unwrap(), 1);
        assert_eq!(
            sample(&[3.0], &SamplingParams::greedy(), &mut r).unwrap(),
            0
        );
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_index() {
        let logits = [1.0, 4.0, 2.0, 4.0, 4.0];
        let p = SamplingParams::greedy();
        assert_eq!(sample(&logits, &p, &mut rng()).unwrap(), 1);
        assert_eq!(sample_with_uniform(&logits, &p, 0.99).unwrap(), 1);
    }

    #[test]
    fn greedy_does_not_advance_the_rng() {
        let mut a = rng();
        let mut b = rng();
        sample(&[1.0, 2.0], &SamplingParams::greedy(), &mut a).unwrap();
        assert_eq!(a.random::<u64>(), b.random::<u64>());
    }

    #[test]
    fn greedy_with_infinities() {
        let p = SamplingParams::greedy();
        let logits = [f32::NEG_INFINITY, 1.0, f32::INFINITY, f32::INFINITY];
        assert_eq!(sample(&logits, &p, &mut rng()).unwrap(), 2);
        let logits = [f32::NEG_INFINITY, -1e30, f32::NEG_INFINITY];
        assert_eq!(sample(&logits, &p, &mut rng()).unwrap(), 1);
    }

    #[test]
    fn top_k_one_equals_greedy_at_any_temperature() {
        let mut r = rng();
        for trial in 0..50 {
            let logits: Vec<f32> = (0..37).map(|_| r.random_range(-5.0..5.0)).collect();
            let want = sample(&logits, &SamplingParams::greedy(), &mut r).unwrap();
            for t in [1e-3, 0.5, 1.0, 7.0, 1e4] {
                for _ in 0..5 {
                    let got = sample(&logits, &params(t, 1, 1.0), &mut r).unwrap();
                    assert_eq!(got, want, "trial {trial}, temperature {t}");
                }
            }
        }
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        let mut r = rng();
        for trial in 0..50 {
            let logits: Vec<f32> = (0..37).map(|_| r.random_range(-5.0..5.0)).collect();
            let want = sample(&logits, &SamplingParams::greedy(), &mut r).unwrap();
            for t in [0.1, 1.0, 100.0] {
                for _ in 0..5 {
                    let got = sample(&logits, &params(t, 0, 1e-9), &mut r).unwrap();
                    assert_eq!(got, want, "trial {trial}, temperature {t}");
                }
            }
        }
    }

    #[test]
    fn seeded_draws_are_reproducible() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = SamplingParams {
            seed: Some(1234),
            ..params(0.8, 50, 0.9)
        };
        let draws = |mut r: SmallRng| -> Vec<u32> {
            (0..200)
                .map(|_| sample(&logits, &p, &mut r).unwrap())
                .collect()
        };
        let a = draws(p.rng());
        let b = draws(p.rng());
        assert_eq!(a, b);
        let other = SamplingParams {
            seed: Some(4321),
            ..p.clone()
        };
        assert_ne!(a, draws(other.rng()), "different seeds should differ");
        // More than one token is actually drawn.
        assert!(a.iter().any(|&x| x != a[0]));
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, -1.0, 2.0, 0.5];
        let want = softmax(&logits, 1.0);
        let mut r = SmallRng::seed_from_u64(7);
        let n = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[sample(&logits, &params(1.0, 0, 1.0), &mut r).unwrap() as usize] += 1;
        }
        let mut chi2 = 0.0;
        for i in 0..5 {
            let freq = counts[i] as f64 / n as f64;
            assert!(
                (freq - want[i]).abs() < 0.02,
                "token {i}: freq {freq} vs p {}",
                want[i]
            );
            let expected = want[i] * n as f64;
            chi2 += (counts[i] as f64 - expected).powi(2) / expected;
        }
        // 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
        assert!(chi2 < 18.47, "chi-square {chi2}");
    }

    #[test]
    fn empirical_frequencies_match_tempered_top_k() {
        let logits = [1.0f32, 0.0, -1.0, 2.0, 0.5];
        // T = 2, top-3 keeps tokens 3, 0, 4, renormalised.
        let full = softmax(&logits, 2.0);
        let mass = full[3] + full[0] + full[4];
        let want = [full[0] / mass, 0.0, 0.0, full[3] / mass, full[4] / mass];
        let p = params(2.0, 3, 1.0);
        let dist = distribution(&logits, &p).unwrap();
        for i in 0..5 {
            assert!((dist[i] - want[i]).abs() < 1e-12, "{dist:?} vs {want:?}");
        }
        let mut r = SmallRng::seed_from_u64(8);
        let n = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[sample(&logits, &p, &mut r).unwrap() as usize] += 1;
        }
        assert_eq!(counts[1] + counts[2], 0);
        for i in 0..5 {
            let freq = counts[i] as f64 / n as f64;
            assert!(
                (freq - want[i]).abs() < 0.02,
                "token {i}: {freq} vs {}",
                want[i]
            );
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 (given as log-probs).
        let probs = [0.15f64, 0.5, 0.05, 0.3];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let kept = |top_p: f32| -> Vec<usize> {
            let d = distribution(&logits, &params(1.0, 0, top_p)).unwrap();
            (0..4).filter(|&i| d[i] > 0.0).collect()
        };
        assert_eq!(kept(0.4), vec![1]);
        assert_eq!(kept(0.75), vec![1, 3]);
        assert_eq!(kept(0.9), vec![0, 1, 3]);
        assert_eq!(kept(0.99), vec![0, 1, 2, 3]);
        assert_eq!(kept(1.0), vec![0, 1, 2, 3]);
        let d = distribution(&logits, &params(1.0, 0, 0.75)).unwrap();
        assert!((d[1] - 0.5 / 0.8).abs() < 1e-6 && (d[3] - 0.3 / 0.8).abs() < 1e-6);
    }

    #[test]
    fn nucleus_reached_exactly_keeps_the_smaller_set() {
        // Four equal weights: exactly half the mass is two tokens, and
        // "mass >= p" stops there.
        let d = distribution(&[0.0f32; 4], &params(1.0, 0, 0.5)).unwrap();
        assert_eq!(d, vec![0.5, 0.5, 0.0, 0.0]);
        let d = distribution(&[0.0f32; 4], &params(1.0, 0, 0.25)).unwrap();
        assert_eq!(d, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn top_p_applies_after_top_k() {
        let probs = [0.4f64, 0.3, 0.2, 0.1];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        // Top-2 leaves 0.4/0.7 and 0.3/0.7; p = 0.6 of that needs both.
        let d = distribution(&logits, &params(1.0, 2, 0.6)).unwrap();
        assert!(
            d[0] > 0.0 && d[1] > 0.0 && d[2] == 0.0 && d[3] == 0.0,
            "{d:?}"
        );
        // p = 0.5 of it is met by the first alone.
        let d = distribution(&logits, &params(1.0, 2, 0.5)).unwrap();
        assert_eq!(d, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn top_k_ties_keep_the_lower_index() {
        let logits = [1.0f32, 3.0, 3.0, 3.0, 0.0];
        let d = distribution(&logits, &params(1.0, 2, 1.0)).unwrap();
        assert_eq!(d, vec![0.0, 0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn top_k_beyond_the_vocab_keeps_everything() {
        let logits = [1.0f32, 2.0, 3.0];
        let a = distribution(&logits, &params(1.0, 0, 1.0)).unwrap();
        let b = distribution(&logits, &params(1.0, 1000, 1.0)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn uniform_walks_the_kept_tokens_in_index_order() {
        let logits = [0.0f32; 4]; // each 0.25
        let p = params(1.0, 0, 1.0);
        assert_eq!(sample_with_uniform(&logits, &p, 0.0).unwrap(), 0);
        assert_eq!(sample_with_uniform(&logits, &p, 0.26).unwrap(), 1);
        assert_eq!(sample_with_uniform(&logits, &p, 0.74).unwrap(), 2);
        assert_eq!(sample_with_uniform(&logits, &p, 1.0 - 1e-16).unwrap(), 3);
        // With top-2 of a tie, tokens 0 and 1 split [0, 1).
        let p2 = params(1.0, 2, 1.0);
        assert_eq!(sample_with_uniform(&logits, &p2, 0.49).unwrap(), 0);
        assert_eq!(sample_with_uniform(&logits, &p2, 0.51).unwrap(), 1);
        assert_eq!(sample_with_uniform(&logits, &p2, 1.0 - 1e-16).unwrap(), 1);
    }

    #[test]
    fn bad_uniform_is_an_error() {
        let p = params(1.0, 0, 1.0);
        for u in [-0.1, 1.0, f64::NAN] {
            assert!(matches!(
                sample_with_uniform(&[0.0, 1.0], &p, u),
                Err(SampleError::Uniform(_))
            ));
        }
    }

    #[test]
    fn infinite_logits_share_the_mass() {
        let logits = [f32::INFINITY, 0.0, f32::INFINITY, f32::NEG_INFINITY];
        let d = distribution(&logits, &params(1.0, 0, 1.0)).unwrap();
        assert_eq!(d, vec![0.5, 0.0, 0.5, 0.0]);
        let mut r = rng();
        for _ in 0..100 {
            let t = sample(&logits, &params(0.7, 0, 1.0), &mut r).unwrap();
            assert!(t == 0 || t == 2);
        }
    }

    #[test]
    fn neg_inf_logits_are_never_drawn() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        let mut r = rng();
        for _ in 0..500 {
            let t = sample(&logits, &params(5.0, 0, 1.0), &mut r).unwrap();
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn tiny_temperature_does_not_overflow() {
        let logits = [3.0e38f32, -3.0e38, 2.9e38];
        let p = params(f32::from_bits(1), 0, 1.0); // smallest subnormal
        let d = distribution(&logits, &p).unwrap();
        assert_eq!(d, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn nan_logit_is_an_error_naming_the_index() {
        let logits = [0.0, 1.0, f32::NAN, f32::NAN];
        for p in [SamplingParams::greedy(), params(1.0, 0, 1.0)] {
            let e = sample(&logits, &p, &mut rng()).unwrap_err();
            assert_eq!(e, SampleError::NanLogit { index: 2 });
            assert!(e.to_string().contains("logit 2 is NaN"), "{e}");
        }
    }

    #[test]
    fn empty_and_all_masked_logits_are_errors() {
        for p in [SamplingParams::greedy(), params(1.0, 0, 1.0)] {
            assert_eq!(
                sample(&[], &p, &mut rng()).unwrap_err(),
                SampleError::EmptyLogits
            );
            assert_eq!(
                sample(&[f32::NEG_INFINITY; 3], &p, &mut rng()).unwrap_err(),
                SampleError::AllMasked { len: 3 }
            );
        }
    }

    #[test]
    fn sample_rejects_bad_params() {
        let e = sample(&[1.0], &params(-1.0, 0, 1.0), &mut rng()).unwrap_err();
        assert_eq!(
            e,
            SampleError::Params(SamplingParamsError::Temperature(-1.0))
        );
        let e = sample(&[1.0], &params(1.0, 0, 0.0), &mut rng()).unwrap_err();
        assert_eq!(e, SampleError::Params(SamplingParamsError::TopP(0.0)));
    }

    #[test]
    fn validate_temperature() {
        for t in [f32::NAN, -0.1, -1e-30, f32::INFINITY, f32::NEG_INFINITY] {
            let e = params(t, 0, 1.0).validate().unwrap_err();
            assert!(matches!(e, SamplingParamsError::Temperature(_)), "{t}");
            assert_eq!(e.field(), "temperature");
            assert!(e.to_string().contains("temperature"), "{e}");
        }
        for t in [0.0, 1e-30, 1.0, 100.0] {
            params(t, 0, 1.0).validate().unwrap();
        }
    }

    #[test]
    fn validate_top_p() {
        for p in [0.0, -0.5, 1.0001, f32::NAN, f32::INFINITY] {
            let e = params(1.0, 0, p).validate().unwrap_err();
            assert!(matches!(e, SamplingParamsError::TopP(_)), "{p}");
            assert_eq!(e.field(), "top_p");
            assert!(e.to_string().contains("top_p"), "{e}");
        }
        for p in [1e-9, 0.5, 1.0] {
            params(1.0, 0, p).validate().unwrap();
        }
    }

    #[test]
    fn validate_max_tokens() {
        let p = SamplingParams {
            max_tokens: 0,
            ..SamplingParams::default()
        };
        let e = p.validate().unwrap_err();
        assert_eq!(e, SamplingParamsError::MaxTokens);
        assert_eq!(e.field(), "max_tokens");
        assert!(e.to_string().contains("max_tokens"));
    }

    #[test]
    fn top_k_zero_means_off_and_is_valid() {
        params(1.0, 0, 1.0).validate().unwrap();
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
    }

    proptest! {
        /// Whatever the logits and params, the draw is a kept token, the
        /// distribution sums to 1, and the kept set respects top-k.
        #[test]
        fn draws_stay_in_the_kept_set(
            logits in proptest::collection::vec(-20.0f32..20.0, 1..64),
            temperature in prop_oneof![Just(0.0f32), 0.01f32..10.0],
            top_k in 0usize..10,
            top_p in prop_oneof![Just(1.0f32), 0.001f32..1.0],
            u in 0.0f64..1.0,
        ) {
            let p = params(temperature, top_k, top_p);
            let d = distribution(&logits, &p).unwrap();
            let sum: f64 = d.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-9, "sum {}", sum);
            let kept = d.iter().filter(|&&x| x > 0.0).count();
            prop_assert!(kept >= 1);
            if top_k > 0 {
                prop_assert!(kept <= top_k);
            }
            let t = sample_with_uniform(&logits, &p, u).unwrap();
            prop_assert!(d[t as usize] > 0.0);
            // Every kept token is at least as likely as every cut one.
            let min_kept = d.iter().zip(&logits).filter(|(x, _)| **x > 0.0)
                .map(|(_, &l)| l).fold(f32::INFINITY, f32::min);
            let max_cut = d.iter().zip(&logits).filter(|(x, _)| **x == 0.0)
                .map(|(_, &l)| l).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(min_kept >= max_cut);
        }
    }
}
