//! The steps most integration tests share: start containerd and the registries side
//! by side, pull over a CRI socket and expect success or a given failure, ask
//! ImageStatus.

use std::path::Path;

use tonic::{Code, Status};

use super::containerd::{Containerd, ContainerdOptions};
use super::cri::{self, proto, Daemon};
use super::registry::Registry;

/// containerd without its CRI plugin: cri-imaged needs only the content, snapshot,
/// image and lease services, and it starts faster.
pub fn containerd_without_cri() -> Containerd {
    Containerd::start_with(ContainerdOptions {
        cri: false,
        ..Default::default()
    })
}

/// Starts containerd (with its CRI plugin) and a registry side by side (each waits
/// for its own readiness).
pub fn start(registry: impl FnOnce() -> Registry + Send) -> (Containerd, Registry) {
    start_with(Containerd::start, registry)
}

/// [`start`] with containerd started by `containerd`.
pub fn start_with(
    containerd: impl FnOnce() -> Containerd + Send,
    registry: impl FnOnce() -> Registry + Send,
) -> (Containerd, Registry) {
    std::thread::scope(|s| {
        let containerd = s.spawn(containerd);
        let registry = s.spawn(registry);
        (
            containerd.join().expect("containerd thread"),
            registry.join().expect("registry thread"),
        )
    })
}

/// Starts containerd (with its CRI plugin) and several registries side by side.
pub fn start_many(
    registries: Vec<Box<dyn FnOnce() -> Registry + Send>>,
) -> (Containerd, Vec<Registry>) {
    std::thread::scope(|s| {
        let containerd = s.spawn(Containerd::start);
        let started: Vec<_> = registries.into_iter().map(|r| s.spawn(r)).collect();
        let registries = started
            .into_iter()
            .map(|h| h.join().expect("registry thread"))
            .collect();
        (containerd.join().expect("containerd thread"), registries)
    })
}

/// Request credentials as kubelet passes them: username and password only.
pub fn password_auth(username: &str, password: &str) -> Option<proto::AuthConfig> {
    Some(proto::AuthConfig {
        username: username.to_owned(),
        password: password.to_owned(),
        ..Default::default()
    })
}

/// Sends `request` to any CRI ImageService socket (cri-imaged's or containerd's own);
/// returns `image_ref`.
pub async fn cri_pull_request(
    socket: &Path,
    request: proto::PullImageRequest,
) -> Result<String, Status> {
    let response = cri::connect(socket).await.pull_image(request).await?;
    Ok(response.into_inner().image_ref)
}

/// PullImage of `image` with request credentials `auth` through any CRI
/// ImageService socket; returns `image_ref`.
pub async fn cri_pull(
    socket: &Path,
    image: &str,
    auth: Option<proto::AuthConfig>,
) -> Result<String, Status> {
    let request = proto::PullImageRequest {
        image: Some(cri::image_spec(image)),
        auth,
        sandbox_config: None,
    };
    cri_pull_request(socket, request).await
}

/// PullImage of `image` through the daemon, with request credentials `auth`.
pub async fn pull(
    daemon: &Daemon,
    image: &str,
    auth: Option<proto::AuthConfig>,
) -> Result<String, Status> {
    cri_pull(daemon.socket(), image, auth).await
}

/// [`pull`] that must succeed; a failure panics with the status and the daemon's log.
pub async fn pull_ok(daemon: &Daemon, image: &str, auth: Option<proto::AuthConfig>) -> String {
    match pull(daemon, image, auth).await {
        Ok(id) => id,
        Err(status) => panic!(
            "PullImage {image}: {:?}: {}\ndaemon log:\n{}",
            status.code(),
            status.message(),
            daemon.log()
        ),
    }
}

/// [`pull`] that must fail; returns the status.
pub async fn pull_err(daemon: &Daemon, image: &str, auth: Option<proto::AuthConfig>) -> Status {
    match pull(daemon, image, auth).await {
        Ok(id) => panic!(
            "PullImage {image} succeeded ({id}); daemon log:\n{}",
            daemon.log()
        ),
        Err(status) => status,
    }
}

/// [`pull`] of `image` without credentials that must fail with `code`; returns the
/// status (a wrong code panics with its message).
pub async fn pull_err_code(daemon: &Daemon, image: &str, code: Code) -> Status {
    let status = pull_err(daemon, image, None).await;
    assert_eq!(
        status.code(),
        code,
        "PullImage {image}: {}",
        status.message()
    );
    status
}

/// Sends `request` to the daemon and expects a failure with `code`; returns the
/// status.
pub async fn pull_fails(daemon: &Daemon, request: proto::PullImageRequest, code: Code) -> Status {
    let shown = request.image.as_ref().map(|i| i.image.clone());
    match cri_pull_request(daemon.socket(), request).await {
        Ok(id) => panic!("pull of {shown:?} succeeded ({id}); expected {code:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "pull of {shown:?}: {}",
                status.message()
            );
            status
        }
    }
}

/// ImageStatus on any CRI ImageService socket (cri-imaged's or containerd's own).
pub async fn status_of(socket: &Path, image: &str, verbose: bool) -> proto::ImageStatusResponse {
    cri::connect(socket)
        .await
        .image_status(proto::ImageStatusRequest {
            image: Some(cri::image_spec(image)),
            verbose,
        })
        .await
        .unwrap_or_else(|s| panic!("ImageStatus {image}: {s}"))
        .into_inner()
}

/// The image ImageStatus reports on any CRI ImageService socket, if any.
pub async fn status(socket: &Path, image: &str) -> Option<proto::Image> {
    status_of(socket, image, false).await.image
}
