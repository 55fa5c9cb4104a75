//! in-memory store (in progress)
