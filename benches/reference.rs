//! criterion benches of the CPU references: how long "check before timing"
//! spends on the host per case (the dominant cost of `workbench check` at
//! LLM sizes, see CHALLENGES.md #1). Runs anywhere: `cargo bench --bench reference`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array1, Array2, Array3, Array4};

fn data(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    let (tokens, hidden) = (64, 896);
    let x = Array2::from_shape_vec((tokens, hidden), data(tokens * hidden)).unwrap();
    let w = Array1::from_elem(hidden, 1.0);
    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Elements((tokens * hidden) as u64));
    g.bench_function("rmsnorm 64x896", |b| {
        b.iter(|| reference::rmsnorm::rmsnorm(black_box(x.view()), w.view(), 1e-6).unwrap())
    });
    let gate_up = Array2::from_shape_vec((tokens, 2 * 4864), data(tokens * 2 * 4864)).unwrap();
    g.throughput(Throughput::Elements((tokens * 4864) as u64));
    g.bench_function("silu_mul 64x4864", |b| {
        b.iter(|| reference::silu_mul::silu_mul(black_box(gate_up.view())).unwrap())
    });
    let q = Array3::from_shape_vec((tokens, 14, 64), data(tokens * 14 * 64)).unwrap();
    let pos: Vec<i32> = (0..tokens as i32).collect();
    g.throughput(Throughput::Elements((tokens * 14 * 64) as u64));
    g.bench_function("rope 64 tok 14x64", |b| {
        b.iter(|| reference::rope::rope_neox(black_box(q.view()), &pos, 1e6).unwrap())
    });
    // Decode attention: 8 sequences x 512 tokens, Qwen2-0.5B heads, block 16.
    let (batch, ctx, bs) = (8, 512, 16);
    let blocks = batch * ctx / bs;
    let kc = Array4::from_shape_vec((blocks, bs, 2, 64), data(blocks * bs * 128)).unwrap();
    let qd = Array3::from_shape_vec((batch, 14, 64), data(batch * 14 * 64)).unwrap();
    let tables = Array2::from_shape_fn((batch, ctx / bs), |(b, j)| (b * (ctx / bs) + j) as i32);
    let lens = vec![ctx as i32; batch];
    g.throughput(Throughput::Elements((batch * ctx * 128) as u64));
    g.bench_function("paged_decode 8x512 14/2 d64", |b| {
        b.iter(|| {
            reference::paged_attention::paged_decode(
                qd.view(),
                kc.view(),
                kc.view(),
                tables.view(),
                &lens,
                0.125,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
