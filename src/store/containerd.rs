//! containerd store (in progress)
