//! auth (in progress)
