//! block_manager (being written)
