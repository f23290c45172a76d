//! weights (being written)
