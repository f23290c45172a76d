//! plots (being written)
