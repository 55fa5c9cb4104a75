//! cri (in progress)
