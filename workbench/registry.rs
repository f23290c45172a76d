//! The one list of kernels that `check`, `list`, the tests and the benches
//! iterate. Adding a kernel: one file under `ops/`, one line here.

use crate::op::Op;
use crate::ops;

pub static OPS: &[&dyn Op] = &[
    &ops::rmsnorm::RmsNorm,
    &ops::silu_mul::SiluMul,
    &ops::rope::Rope,
    &ops::kv_store::KvStore,
    &ops::rope_kv_store::RopeKvStore,
    &ops::paged_attention::PagedAttention,
    &ops::prefill_attention::PrefillAttention,
];

pub fn find(name: &str) -> Option<&'static dyn Op> {
    OPS.iter().copied().find(|o| o.name() == name)
}

/// The variants of `op` that a `--variant` filter names, oldest first. The
/// filter is a comma list of variant names and the words `production` (the
/// variant the engine uses) and `latest` (the newest); None selects every
/// variant. Names `op` lacks are skipped: callers refuse a filter that
/// selects nothing.
pub fn select_variants(op: &dyn Op, filter: Option<&str>) -> Vec<&'static str> {
    let all = op.variants();
    let Some(filter) = filter else {
        return all.iter().map(|v| v.name).collect();
    };
    let words: Vec<&str> = filter.split(',').map(str::trim).collect();
    all.iter()
        .enumerate()
        .filter(|(i, v)| {
            words.iter().any(|w| {
                *w == v.name
                    || (*w == "production" && v.production)
                    || (*w == "latest" && *i + 1 == all.len())
            })
        })
        .map(|(_, v)| v.name)
        .collect()
}

pub fn names() -> Vec<&'static str> {
    OPS.iter().map(|o| o.name()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn variant_filters_name_production_and_latest() {
        let rope = super::find("rope").unwrap();
        let all: Vec<_> = rope.variants().iter().map(|v| v.name).collect();
        assert_eq!(super::select_variants(rope, None), all);
        let prod = kernels::rope::PRODUCTION;
        assert_eq!(super::select_variants(rope, Some("production")), vec![prod]);
        assert_eq!(
            super::select_variants(rope, Some("latest")),
            vec![*all.last().unwrap()]
        );
        let both = super::select_variants(rope, Some("v1, production"));
        assert_eq!(both[0], "v1");
        assert!(both.contains(&prod));
        assert!(super::select_variants(rope, Some("v99")).is_empty());
    }

    use super::*;
    use kernels::compile::SOURCES;

    #[test]
    fn one_stem_per_kernel_across_registry_and_sources() {
        let mut ops = names();
        let mut srcs: Vec<&str> = SOURCES.iter().map(|(s, _)| *s).collect();
        ops.sort();
        srcs.sort();
        assert_eq!(ops, srcs);
    }

    #[test]
    fn every_declared_case_is_valid_and_unique() {
        for op in OPS {
            let mut seen = std::collections::HashSet::new();
            for c in op.check_cases().into_iter().chain(op.perf_cases()) {
                op.check_keys(&c)
                    .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
                assert!(
                    seen.insert(c.to_string()),
                    "{}: duplicate case {c}",
                    op.name()
                );
                for d in op.dtypes() {
                    assert!(op.bytes_moved(&c, *d).unwrap() > 0, "{} {c}", op.name());
                }
            }
            assert!(
                op.variants().iter().filter(|v| v.production).count() == 1,
                "{}",
                op.name()
            );
        }
    }

    #[test]
    fn production_variants_match_the_launchers() {
        let prod = |name: &str| {
            find(name)
                .unwrap()
                .variants()
                .iter()
                .find(|v| v.production)
                .unwrap()
                .name
        };
        assert_eq!(prod("rmsnorm"), kernels::rmsnorm::PRODUCTION);
        assert_eq!(prod("rope"), kernels::rope::PRODUCTION);
        assert_eq!(prod("kv_store"), kernels::kv_store::PRODUCTION);
        assert_eq!(prod("silu_mul"), kernels::silu_mul::PRODUCTION);
        assert_eq!(prod("rope_kv_store"), kernels::rope_kv_store::PRODUCTION);
        assert_eq!(
            prod("paged_attention"),
            kernels::paged_attention::PRODUCTION
        );
        for (op, variants) in [
            ("rmsnorm", kernels::rmsnorm::VARIANTS),
            ("rope", kernels::rope::VARIANTS),
            ("kv_store", kernels::kv_store::VARIANTS),
            ("paged_attention", kernels::paged_attention::VARIANTS),
        ] {
            let ours: Vec<&str> = find(op)
                .unwrap()
                .variants()
                .iter()
                .map(|v| v.name)
                .collect();
            assert_eq!(ours, variants, "{op}");
        }
    }

    #[test]
    fn random_cases_are_valid() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for op in OPS {
            for _ in 0..200 {
                let c = op.random_case(&mut rng);
                op.check_keys(&c)
                    .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
                // The printed case replays: parse it back to the same case.
                assert_eq!(c.to_string().parse::<crate::case::Case>().unwrap(), c);
            }
        }
    }
}
