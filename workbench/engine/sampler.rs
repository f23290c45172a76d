//! sampler (being written)
