//! cri-imaged: a CRI `runtime.v1.ImageService` that pulls images itself and
//! keeps them in containerd's content, image and snapshot stores.
//!
//! # Layout
//!
//! Data flows one way, top to bottom; a module only uses the ones below it.
//!
//! - [`cri`]: the tonic adapter. Converts proto messages to domain types, calls
//!   [`puller`] and [`catalog`], and maps every error to a `tonic::Status` in one place.
//! - [`server`]: binds the unix socket and runs the gRPC server until shutdown, each
//!   connection through an HTTP/2 edge that makes every client's `:authority` acceptable.
//! - [`puller`]: walks pull sources × credentials for one image, deduplicates
//!   concurrent pulls of the same reference, and drives registry → store.
//! - [`catalog`]: the image view over the store: groups image records by image ID
//!   and reads the manifest and config behind them.
//! - [`image_index`]: the image records in memory, kept current from containerd's
//!   event stream, so the read RPCs ask containerd nothing.
//! - [`policy`]: which hosts to contact for a reference and how (registries.conf:
//!   mirrors, blocked registries, TLS, insecure).
//! - [`trust_policy`]: whether an image may be pulled at all (policy.json).
//! - [`auth`]: which credentials to try, in order.
//! - [`registry`]: the distribution API client (challenge, token, manifest, blobs).
//! - [`store`]: the `ImageStore` trait and its containerd implementation.
//! - [`unpack`]: our own layer extractor (decompress, diff-ID hash, safe writes,
//!   overlay whiteouts), which [`store`] uses instead of containerd's `Diff.Apply`
//!   for the overlayfs and native snapshotters (`[pull] unpack`).
//! - [`reference`], [`digest`], [`oci`]: pure data types shared by all of the above;
//!   [`timestamp`]: RFC 3339 UTC times, as labels, messages and logs write them.
//! - [`config`]: the daemon's TOML configuration.
//! - [`reload`], [`file_stamp`]: configuration files re-read when they change.
//! - [`client`]: a CRI ImageService client over a unix socket (CLI and tests).
//! - [`explain`]: what a pull of an image would do, for `cri-imaged explain`.
//! - [`prepull`]: images pulled at start-up (`[pull] prepull`).
//! - [`fs_usage`]: ImageFsInfo's answer, cached and refreshed in the background.
//! - [`signature`]: policy.json signature requirements, verified (GPG, sigstore).
//! - [`metrics`]: Prometheus series recorded along the pull path, served on
//!   `[metrics] listen`.
//! - [`progress`]: the pulls in flight and how far each got, fed by [`puller`], served
//!   on the status socket and shown by `cri-imaged pulls`.
#![forbid(unsafe_code)]

pub mod auth;
pub mod catalog;
pub mod client;
pub mod config;
pub mod cri;
pub mod digest;
pub mod explain;
pub mod file_stamp;
pub mod fs_usage;
pub mod image_index;
pub mod metrics;
pub mod oci;
pub mod platform;
pub mod policy;
pub mod prepull;
pub mod progress;
pub mod puller;
pub mod reference;
pub mod registry;
pub mod reload;
pub mod server;
pub mod signature;
pub mod store;
pub mod timestamp;
pub mod trust_policy;
pub mod unpack;

/// Generated CRI v1 types and service stubs (`proto/runtime/v1/api.proto`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("runtime.v1");
}
