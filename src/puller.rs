//! puller (in progress)
