//! Every conversion between CRI proto messages and domain types, and the one
//! mapping from errors to gRPC status codes.

use crate::auth::{AuthError, RequestAuth};
use crate::catalog::{CatalogError, ImageView};
use crate::proto;
use crate::puller::PullError;
use crate::reference::ReferenceError;
use crate::registry::RegistryError;
use crate::store::{FsUsage, StoreError};
use crate::unpack::UnpackError;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use tonic::{Code, Status};

/// Everything a CRI call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Reference(#[from] ReferenceError),
    #[error("{0}")]
    MissingField(&'static str),
    #[error("{0}")]
    Pull(Arc<PullError>),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
}

impl From<Arc<PullError>> for Error {
    fn from(e: Arc<PullError>) -> Self {
        Error::Pull(e)
    }
}

/// The longest `grpc-message` we send. grpc-core clients (Python, C++) drop a status
/// whose metadata passes their hard limit (16 KiB) and report RESOURCE_EXHAUSTED
/// instead; kubelet shows the message in events, where a few KiB is plenty.
const MAX_STATUS_MESSAGE: usize = 4096;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = bounded(e.to_string());
        let code = match &e {
            Error::Reference(_) | Error::MissingField(_) => Code::InvalidArgument,
            Error::Pull(p) => pull_code(p),
            Error::Catalog(CatalogError::Store(s)) => store_code(s),
        };
        // kubelet turns a message starting with these words into the pod's reason.
        if code == Code::Unavailable && is_registry_failure(&e) {
            return Status::new(code, format!("RegistryUnavailable: {message}"));
        }
        if matches!(&e, Error::Pull(p) if refused_signature(p)) {
            return Status::new(code, format!("SignatureValidationFailed: {message}"));
        }
        Status::new(code, message)
    }
}

/// `message`, cut at [`MAX_STATUS_MESSAGE`] bytes (at a character boundary) with a
/// note saying so.
fn bounded(mut message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let total = message.len();
    let mut end = MAX_STATUS_MESSAGE - 64;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(&format!("… (message cut at {end} of {total} bytes)"));
    message
}

fn pull_code(e: &PullError) -> Code {
    match e {
        PullError::Auth(AuthError::MalformedAuthField) => Code::InvalidArgument,
        PullError::Registry { source, .. } => registry_code(source),
        PullError::Unauthorized {
            forbidden: true, ..
        } => Code::PermissionDenied,
        PullError::Unauthorized {
            forbidden: false, ..
        } => Code::Unauthenticated,
        PullError::NoMatchingPlatform { .. } => Code::NotFound,
        // The registry serves something we cannot run: not an internal fault, not
        // the caller's argument either.
        PullError::InvalidImage { .. } => Code::FailedPrecondition,
        PullError::Store { source, .. } => store_code(source),
        PullError::Task { .. } => Code::Internal,
        PullError::Cancelled { .. } => Code::Cancelled,
        PullError::Blocked(_) | PullError::Refused(_) => Code::PermissionDenied,
        // Signatures that could not be read (a lookaside or registry failing) are
        // not a verdict on the image: the pull may work later.
        PullError::Signatures { .. } => Code::Unavailable,
        PullError::Sources { last, .. } => pull_code(last),
        PullError::Candidates { last, .. } => pull_code(last),
        PullError::ShortName(_) => Code::InvalidArgument,
    }
}

fn registry_code(e: &RegistryError) -> Code {
    use crate::registry::error::ErrorCode;
    match e {
        // A registry breaking the protocol (bad Location, unparsable token realm or
        // response, a redirect we refuse to follow) is the registry's failure, not ours.
        RegistryError::Unreachable { .. }
        | RegistryError::Interrupted { .. }
        | RegistryError::TooManyRedirects { .. }
        | RegistryError::BadResponse { .. } => Code::Unavailable,
        RegistryError::Server { status, .. } if *status >= 500 => Code::Unavailable,
        RegistryError::Server {
            code: Some(ErrorCode::NameInvalid),
            ..
        }
        | RegistryError::InvalidReference { .. }
        | RegistryError::InvalidUrl { .. } => Code::InvalidArgument,
        RegistryError::Stalled { .. } => Code::DeadlineExceeded,
        RegistryError::Unauthorized { .. } => Code::Unauthenticated,
        RegistryError::Denied { .. } => Code::PermissionDenied,
        RegistryError::NotFound { .. } => Code::NotFound,
        RegistryError::TooManyRequests { .. } => Code::ResourceExhausted,
        RegistryError::DigestMismatch { .. } | RegistryError::SizeMismatch { .. } => Code::DataLoss,
        // What the registry serves, or how it would have us reach it, is something we
        // refuse: the system is not in a state where the pull can work.
        RegistryError::Unsupported { .. }
        | RegistryError::ManifestTooLarge { .. }
        | RegistryError::InsecureUrl { .. }
        | RegistryError::DowngradeRedirect { .. }
        | RegistryError::TrustStore { .. } => Code::FailedPrecondition,
        RegistryError::Server { .. }
        | RegistryError::OffsetBeyondEnd { .. }
        | RegistryError::Tls(_) => Code::Internal,
    }
}

fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::Unavailable { .. } => Code::Unavailable,
        StoreError::DigestMismatch { .. } => Code::DataLoss,
        StoreError::NotFound { .. }
        | StoreError::InvalidArgument { .. }
        | StoreError::Local { .. }
        | StoreError::TooLarge { .. }
        | StoreError::Grpc { .. }
        | StoreError::Malformed { .. } => Code::Internal,
        StoreError::Unpack(e) => match e {
            UnpackError::DiffIdMismatch { .. } => Code::DataLoss,
            UnpackError::Hostile { .. } | UnpackError::Corrupt { .. } => Code::InvalidArgument,
            // A budget is set only where the pull falls back to the stored blob.
            UnpackError::Io { .. } | UnpackError::OverBudget { .. } => Code::Internal,
        },
    }
}

fn refused_signature(p: &PullError) -> bool {
    match p {
        PullError::Refused(r) => r.is_signature(),
        PullError::Candidates { last, .. } => refused_signature(last),
        PullError::Sources { last, .. } => refused_signature(last),
        _ => false,
    }
}

fn is_registry_failure(e: &Error) -> bool {
    fn registry(p: &PullError) -> bool {
        match p {
            PullError::Registry { .. } => true,
            PullError::Sources { last, .. } => registry(last),
            PullError::Candidates { last, .. } => registry(last),
            _ => false,
        }
    }
    matches!(e, Error::Pull(p) if registry(p))
}

impl fmt::Debug for proto::AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::auth::debug_auth_fields(
            f,
            "AuthConfig",
            [
                &self.username,
                &self.password,
                &self.auth,
                &self.server_address,
                &self.identity_token,
                &self.registry_token,
            ],
        )
    }
}

pub fn request_auth(auth: Option<proto::AuthConfig>) -> Option<RequestAuth> {
    let a = auth?;
    let empty = a.username.is_empty()
        && a.password.is_empty()
        && a.auth.is_empty()
        && a.identity_token.is_empty()
        && a.registry_token.is_empty();
    if empty {
        return None;
    }
    Some(RequestAuth {
        username: a.username,
        password: a.password,
        auth: a.auth,
        server_address: a.server_address,
        identity_token: a.identity_token,
        registry_token: a.registry_token,
    })
}

/// The image name in an ImageSpec; required.
pub fn image_name(spec: Option<&proto::ImageSpec>) -> Result<&str, Error> {
    match spec.map(|s| s.image.as_str()) {
        Some(name) if !name.is_empty() => Ok(name),
        _ => Err(Error::MissingField(
            "image spec with a non-empty image name is required",
        )),
    }
}

pub fn image(view: &ImageView) -> proto::Image {
    let (uid, username) = view.uid_or_username();
    proto::Image {
        id: view.id.to_string(),
        repo_tags: view.repo_tags.clone(),
        repo_digests: view.repo_digests.clone(),
        size: view.size,
        uid: uid.map(|value| proto::Int64Value { value }),
        username,
        spec: Some(proto::ImageSpec {
            image: view.id.to_string(),
            ..Default::default()
        }),
        pinned: view.pinned,
    }
}

/// ImageStatus' verbose `info`: as containerd's CRI gives it, one key `info`
/// holding JSON with the top layer's chain ID and the image config.
pub fn verbose_info(view: &ImageView) -> HashMap<String, String> {
    let info = serde_json::json!({
        "chainID": view.chain_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        "imageSpec": view.config.as_ref(),
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

/// ImageFsInfo's entry: images take their snapshots and their content-store blobs
/// (one file each), so both count (containerd's CRI counts the snapshots only;
/// kubelet's summary API reports this as the image filesystem's usage).
pub fn filesystem_usage(usage: &FsUsage, timestamp_ns: i64) -> proto::FilesystemUsage {
    proto::FilesystemUsage {
        timestamp: timestamp_ns,
        fs_id: Some(proto::FilesystemIdentifier {
            mountpoint: usage.mountpoint.clone(),
        }),
        used_bytes: Some(proto::UInt64Value {
            value: usage.used_bytes + usage.content_bytes,
        }),
        inodes_used: Some(proto::UInt64Value {
            value: usage.inodes_used + usage.content_blobs,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_filesystem_usage_counts_snapshots_and_content_blobs() {
        let usage = FsUsage {
            mountpoint: "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs".into(),
            used_bytes: 1000,
            inodes_used: 40,
            content_bytes: 300,
            content_blobs: 3,
        };
        let fs = filesystem_usage(&usage, 7);
        assert_eq!(fs.used_bytes.map(|v| v.value), Some(1300));
        assert_eq!(fs.inodes_used.map(|v| v.value), Some(43));
        assert_eq!(fs.timestamp, 7);
    }
    use crate::digest::Digest;

    #[test]
    fn status_messages_are_bounded() {
        let long = Error::MissingField("x").to_string() + &"ü".repeat(10_000);
        let cut = bounded(long.clone());
        assert!(cut.len() <= MAX_STATUS_MESSAGE, "{}", cut.len());
        assert!(cut.ends_with(&format!("of {} bytes)", long.len())), "{cut}");
        assert_eq!(bounded("short".into()), "short");
    }

    fn view(user: Option<&str>) -> ImageView {
        ImageView {
            id: Digest::of(b"config"),
            repo_tags: vec!["127.0.0.1:5000/app:1".into()],
            repo_digests: vec![],
            size: 42,
            user: user.map(Into::into),
            pinned: false,
            chain_id: Some(Digest::of(b"chain")),
            config: Arc::new(serde_json::json!({"architecture": "amd64"})),
            record_names: vec![],
        }
    }

    #[test]
    fn numeric_user_is_a_uid_and_a_name_is_a_username() {
        let i = image(&view(Some("1000")));
        assert_eq!(i.uid, Some(proto::Int64Value { value: 1000 }));
        assert_eq!(i.username, "");
        let i = image(&view(Some("nobody:nogroup")));
        assert_eq!(i.uid, None);
        assert_eq!(i.username, "nobody");
        let i = image(&view(Some("0:0")));
        assert_eq!(i.uid, Some(proto::Int64Value { value: 0 }));
        let i = image(&view(None));
        assert_eq!((i.uid, i.username.as_str()), (None, ""));
    }

    #[test]
    fn verbose_info_has_chain_id_and_config() {
        let info = verbose_info(&view(None));
        let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
        assert_eq!(v["chainID"], Digest::of(b"chain").to_string());
        assert_eq!(v["imageSpec"]["architecture"], "amd64");
    }

    #[test]
    fn auth_config_debug_is_redacted() {
        let a = proto::AuthConfig {
            username: "u".into(),
            password: "hunter2".into(),
            auth: "c2VjcmV0".into(),
            identity_token: "idtok".into(),
            registry_token: "regtok".into(),
            server_address: "r.io".into(),
        };
        let s = format!("{a:?}");
        for secret in ["hunter2", "c2VjcmV0", "idtok", "regtok"] {
            assert!(!s.contains(secret), "{s}");
        }
        let req = proto::PullImageRequest {
            auth: Some(a),
            ..Default::default()
        };
        assert!(!format!("{req:?}").contains("hunter2"));
    }

    #[test]
    fn empty_auth_config_is_no_auth() {
        assert_eq!(request_auth(Some(proto::AuthConfig::default())), None);
        assert_eq!(request_auth(None), None);
    }

    fn registry_status(source: RegistryError) -> Status {
        Status::from(Error::Pull(Arc::new(PullError::Registry {
            image: "r.io/a:1".into(),
            registry: "r.io".into(),
            source: Box::new(source),
        })))
    }

    #[test]
    fn registry_failures_are_unavailable_and_marked_for_kubelet() {
        let table = [
            RegistryError::Unreachable {
                host: "r.io".into(),
                detail: "connection refused".into(),
                transient: false,
            },
            // Protocol violations: a realm that is not a URL, a redirect we refuse.
            RegistryError::BadResponse {
                host: "r.io".into(),
                detail: "token realm \"::\" is not a URL".into(),
            },
            RegistryError::TooManyRedirects {
                host: "r.io".into(),
                limit: 5,
            },
        ];
        for source in table {
            let text = source.to_string();
            let s = registry_status(source);
            assert_eq!(s.code(), Code::Unavailable, "{text}");
            assert!(
                s.message().starts_with("RegistryUnavailable"),
                "{}",
                s.message()
            );
        }
    }

    #[test]
    fn unparsable_request_url_stays_invalid_argument() {
        let source = url::Url::parse("::").unwrap_err();
        let s = registry_status(RegistryError::InvalidUrl {
            what: "r.io/a b".into(),
            source,
        });
        assert_eq!(s.code(), Code::InvalidArgument);
    }

    #[test]
    fn bad_reference_is_invalid_argument() {
        let e = Error::from(crate::reference::Reference::parse("UPPER").unwrap_err());
        assert_eq!(Status::from(e).code(), Code::InvalidArgument);
    }
}
