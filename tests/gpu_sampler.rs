//! The engine's GPU sampler (`sample_rows` in kernels/cuda/util.cu): greedy
//! rows pick the argmax (lowest index on ties, NaN never), and temperature
//! rows draw from softmax(logits / T): over many seeds the frequencies must
//! match the distribution the CPU sampler computes (`sampler::distribution`).

use half::bf16;
use kernels::Gpu;
use workbench::engine::sampler::{distribution, SamplingParams};

fn draw(gpu: &Gpu, logits: &[bf16], vocab: usize, inv_temp: &[f32], seeds: &[u64]) -> Vec<i32> {
    let s = gpu.stream();
    let n = inv_temp.len();
    let l = s.clone_htod(logits).unwrap();
    let t = s.clone_htod(inv_temp).unwrap();
    let sd = s.clone_htod(seeds).unwrap();
    let mut out = s.alloc_zeros::<i32>(n).unwrap();
    kernels::util::sample_rows(
        gpu,
        &mut out.slice_mut(..),
        &l.slice(..),
        vocab,
        vocab,
        &t.slice(..),
        &sd.slice(..),
    )
    .unwrap();
    s.clone_dtoh(&out).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn greedy_rows_pick_the_argmax_and_skip_nan() {
    let gpu = Gpu::new(0).expect("a usable GPU");
    let vocab = 151_936; // Qwen2's vocabulary: many strided passes per thread
    let mut logits: Vec<bf16> = (0..3 * vocab)
        .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 100.0 - 5.0))
        .collect();
    // Row 0: a unique maximum far in; row 1: a tie (lowest index wins);
    // row 2: a NaN larger than everything must not win.
    logits[123_457] = bf16::from_f32(50.0);
    logits[vocab + 9000] = bf16::from_f32(40.0);
    logits[vocab + 100_000] = bf16::from_f32(40.0);
    logits[2 * vocab + 5] = bf16::NAN;
    logits[2 * vocab + 77] = bf16::from_f32(30.0);
    let got = draw(&gpu, &logits, vocab, &[0.0; 3], &[1, 2, 3]);
    assert_eq!(got, vec![123_457, 9000, 77]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn temperature_rows_match_the_softmax_distribution() {
    let gpu = Gpu::new(0).expect("a usable GPU");
    let vocab = 8;
    let row: Vec<f32> = vec![1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.5, 0.2];
    let temp = 0.6f32;
    let n = 200_000;
    let logits: Vec<bf16> = (0..n)
        .flat_map(|_| row.iter().map(|&x| bf16::from_f32(x)))
        .collect();
    let seeds: Vec<u64> = (0..n as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let got = draw(&gpu, &logits, vocab, &vec![1.0 / temp; n], &seeds);
    let mut count = [0usize; 8];
    for g in got {
        count[usize::try_from(g).expect("a token")] += 1;
    }
    let params = SamplingParams {
        temperature: temp,
        ..SamplingParams::default()
    };
    let rounded: Vec<f32> = row.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    let p = distribution(&rounded, &params).unwrap();
    for (j, (&c, &pj)) in count.iter().zip(&p).enumerate() {
        let freq = c as f64 / n as f64;
        // 5 standard deviations of a binomial frequency.
        let sd = (pj * (1.0 - pj) / n as f64).sqrt();
        assert!(
            (freq - pj).abs() <= 5.0 * sd + 1e-4,
            "token {j}: frequency {freq:.5} vs p {pj:.5} (sd {sd:.5})"
        );
    }
}
