//! The workbench: every kernel's check cases, perf cases, tolerances and
//! traffic model ([`op::Op`]), the registry that lists them, and the
//! machinery that proves them against the CPU references (poisoned outputs,
//! guard words, exact comparison rules) and reports the results.

pub mod case;
pub mod ceilings;
pub mod check;
pub mod compare;
pub mod e2e;
pub mod engine;
pub mod gen;
pub mod generate;
pub mod guard;
pub mod op;
pub mod ops;
pub mod parity;
pub mod plot;
pub mod registry;
pub mod report;
pub mod roofline;
pub mod roofline_report;
pub mod shapes;
pub mod workload;
