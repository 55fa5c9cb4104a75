//! An in-process fake registry: plain HTTP on 127.0.0.1, hyper, serving images the
//! harness built (read from their OCI layouts) and misbehaving when a test switches a
//! fault on. It records every request it answers (method, path, headers, whether
//! `Authorization` was present), so tests can prove what the daemon sent.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use tokio::sync::watch;

use super::http_server::ServerThread;
use super::images::OciImage;
use super::{IoContext, Result};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;
/// (repository, subject digest) → descriptors of the manifests referring to it.
type Referrers = HashMap<(String, String), Vec<serde_json::Value>>;

/// How the fake misbehaves; switch with [`FakeRegistry::set_faults`]. The default
/// serves everything correctly without authentication. No `Debug`: it holds a
/// password.
#[derive(Clone, Default)]
pub struct Faults {
    /// Every `/v2/` request needs HTTP Basic with this user and password; anything
    /// else gets 401 with a `Basic` challenge.
    pub basic_auth: Option<(String, String)>,
    /// This blob is served with the right length and wrong bytes.
    pub corrupt_blob: Option<String>,
    /// The first GET of this blob (digest) sends this many bytes of it, then drops the
    /// connection; later GETs are served (honouring `Range`).
    pub drop_blob_once: Option<(String, usize)>,
    /// Blob GETs answer 307 to the same path on this `host:port`.
    pub redirect_blobs_to: Option<String>,
    /// Manifest GETs answer this status, with these extra headers and a distribution
    /// error body.
    pub manifest_status: Option<(u16, Vec<(String, String)>)>,
    /// With `manifest_status`: how many manifest GETs get it (shared by clones of
    /// these faults); after that, manifests are served. `None`: every one.
    pub manifest_status_times: Option<Arc<AtomicUsize>>,
    /// Each of these blobs (digest, bytes) sends that many bytes, then stalls until
    /// [`FakeRegistry::release`] names it.
    pub stall_blobs: Vec<(String, usize)>,
    /// Each of these blobs (digest, bytes) trickles: that many bytes every 100 ms.
    pub trickle_blobs: Vec<(String, usize)>,
    /// Answers that never end, instead of the real ones.
    pub hostile: Option<Hostile>,
    /// Manifest HEADs answer this status (405: a registry that allows GET only).
    pub manifest_head_status: Option<u16>,
    /// Manifest HEADs come without `Docker-Content-Digest`.
    pub manifest_head_without_digest: bool,
}

/// A registry that sends bodies without end, to prove the client bounds what it
/// reads and how long it waits.
#[derive(Clone, Debug)]
pub enum Hostile {
    /// Manifest GETs answer 200 and a JSON body that never ends, fast.
    EndlessManifest,
    /// Manifest GETs answer 500 and an error body that never ends, fast.
    EndlessErrorBody,
    /// `/v2/` needs a Bearer token from the fake's own `/token`, which answers 200
    /// and a JSON body that never ends, fast.
    EndlessToken,
    /// As `EndlessToken`, but the token body comes one byte every 100 ms, forever
    /// (slowloris: each byte arrives well within any idle timeout).
    SlowToken,
}

/// One request as the fake saw it. The value of `Authorization` is not kept.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// Header names (lower case) and values; `authorization` shows only its scheme.
    pub headers: Vec<(String, String)>,
    pub has_authorization: bool,
    /// What the fake answered.
    pub status: u16,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_blob(&self) -> bool {
        self.path.contains("/blobs/")
    }
}

struct State {
    /// Digest → bytes.
    blobs: Mutex<HashMap<String, Bytes>>,
    /// (repository, tag or digest) → (media type, body).
    manifests: Mutex<HashMap<(String, String), (String, Bytes)>>,
    /// The OCI referrers API, once a referrer was added: (repository, subject digest)
    /// → descriptors of the manifests that refer to it. `None`: 404, as registries
    /// without the API answer.
    referrers: Mutex<Option<Referrers>>,
    faults: Mutex<Faults>,
    dropped_once: Mutex<bool>,
    requests: Mutex<Vec<SeenRequest>>,
    /// Blobs released from their stall (`None`: all of them).
    released: Arc<Mutex<Option<Vec<String>>>>,
    /// Bumped whenever `released` changes, to wake stalled bodies.
    release_signal: watch::Sender<u64>,
    /// Stalled or trickling blob bodies still being sent (dropped by hyper when the
    /// client closes the connection).
    sending: Arc<AtomicUsize>,
    /// `127.0.0.1:PORT`, once bound (for the Bearer realm).
    host: Mutex<String>,
}

/// Counts one body in [`State::sending`] while it lives.
struct Sending(Arc<AtomicUsize>);

impl Sending {
    fn new(count: &Arc<AtomicUsize>) -> Sending {
        count.fetch_add(1, Ordering::SeqCst);
        Sending(count.clone())
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running fake registry; stopped on drop.
pub struct FakeRegistry {
    addr: SocketAddr,
    state: Arc<State>,
    // Last: dropped after `Drop::drop` has released the stalled bodies.
    server: ServerThread,
}

impl FakeRegistry {
    /// Starts a fake on its own thread and runtime (so it keeps answering while the
    /// test blocks on `ctr` or a harness call).
    pub fn start() -> FakeRegistry {
        super::must(FakeRegistry::try_start())
    }

    pub fn try_start() -> Result<FakeRegistry> {
        let (release_signal, _) = watch::channel(0);
        let state = Arc::new(State {
            blobs: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            referrers: Mutex::new(None),
            faults: Mutex::new(Faults::default()),
            dropped_once: Mutex::new(false),
            requests: Mutex::new(Vec::new()),
            released: Arc::new(Mutex::new(Some(Vec::new()))),
            release_signal,
            sending: Arc::new(AtomicUsize::new(0)),
            host: Mutex::new(String::new()),
        });
        let served = state.clone();
        let server = ServerThread::start("fake registry", None, move |request| {
            let state = served.clone();
            async move { state.handle(request).await }
        })?;
        *lock(&state.host) = server.addr().to_string();
        Ok(FakeRegistry {
            addr: server.addr(),
            state,
            server,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// A registries.conf entry making this fake reachable over plain HTTP.
    pub fn insecure_entry(&self) -> String {
        format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            self.host()
        )
    }

    /// Serves every blob of `image`'s layout, and its top manifest (or index) as
    /// `REPO:TAG` and by digest, its platform manifests by digest. Returns
    /// `HOST/REPO:TAG`.
    pub fn serve_image(&self, image: &OciImage, repo: &str) -> String {
        let blobs = image.layout().join("blobs/sha256");
        let entries =
            super::must(std::fs::read_dir(&blobs).ctx(|| format!("reading {}", blobs.display())));
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = super::must(
                std::fs::read(entry.path()).ctx(|| format!("reading {}", entry.path().display())),
            );
            lock(&self.state.blobs).insert(format!("sha256:{name}"), Bytes::from(bytes));
        }
        let blob = |digest: &str| self.blob(digest).unwrap_or_default();
        for m in &image.manifests {
            let body = blob(&m.manifest.digest);
            self.put_manifest(repo, &m.manifest.digest, &m.manifest.media_type, body);
        }
        let top = blob(&image.top.digest);
        self.put_manifest(repo, &image.top.digest, &image.top.media_type, top.clone());
        self.put_manifest(repo, &image.tag, &image.top.media_type, top);
        format!("{}/{repo}:{}", self.host(), image.tag)
    }

    /// Adds a blob; returns its digest.
    pub fn put_blob(&self, bytes: Vec<u8>) -> String {
        let digest = sha256(&bytes);
        lock(&self.state.blobs).insert(digest.clone(), Bytes::from(bytes));
        digest
    }

    pub fn blob(&self, digest: &str) -> Option<Bytes> {
        lock(&self.state.blobs).get(digest).cloned()
    }

    /// Serves `body` as `repo`'s manifest `reference` (a tag or a digest) with
    /// `media_type` as its Content-Type. Returns the body's digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: impl Into<Bytes>,
    ) -> String {
        let body = body.into();
        let digest = sha256(&body);
        lock(&self.state.manifests).insert(
            (repo.to_owned(), reference.to_owned()),
            (media_type.to_owned(), body),
        );
        digest
    }

    /// Serves `body` (an OCI image manifest with `artifactType`) by digest in `repo`
    /// and lists it among the referrers of `subject`, with `artifact_type`. From then
    /// on the fake offers the referrers API. Returns the manifest digest.
    pub fn put_referrer(
        &self,
        repo: &str,
        subject: &str,
        artifact_type: &str,
        body: Vec<u8>,
    ) -> String {
        let media_type = "application/vnd.oci.image.manifest.v1+json";
        let size = body.len();
        let digest = sha256(&body);
        self.put_manifest(repo, &digest, media_type, body);
        let descriptor = serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "artifactType": artifact_type,
        });
        lock(&self.state.referrers)
            .get_or_insert_with(HashMap::new)
            .entry((repo.to_owned(), subject.to_owned()))
            .or_default()
            .push(descriptor);
        digest
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.state.faults) = faults;
        *lock(&self.state.dropped_once) = false;
        *lock(&self.state.released) = Some(Vec::new());
        self.state.release_signal.send_modify(|n| *n += 1);
    }

    /// Lets the stalled blob `digest` continue.
    pub fn release(&self, digest: &str) {
        if let Some(released) = lock(&self.state.released).as_mut() {
            released.push(digest.to_owned());
        }
        self.state.release_signal.send_modify(|n| *n += 1);
    }

    fn release_all(&self) {
        *lock(&self.state.released) = None;
        self.state.release_signal.send_modify(|n| *n += 1);
    }

    /// How many stalled or trickling blob bodies are still being sent: 0 once the
    /// client has closed their connections.
    pub fn bodies_sending(&self) -> usize {
        self.state.sending.load(Ordering::SeqCst)
    }

    /// Everything answered so far, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.state.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }

    /// Waits (without blocking the caller's runtime) until a request matching `want`
    /// was answered; gives up after `limit`, which only bounds a hang.
    pub async fn wait_for(
        &self,
        limit: Duration,
        want: impl Fn(&SeenRequest) -> bool,
    ) -> Option<SeenRequest> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Some(found) = self.requests().into_iter().find(|r| want(r)) {
                return Some(found);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        // Wake stalled bodies so their connections can close.
        self.release_all();
    }
}

impl State {
    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Body> {
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = if *name == hyper::header::AUTHORIZATION {
                    // Keep the scheme only; the test must not hold the secret either.
                    value
                        .to_str()
                        .unwrap_or_default()
                        .split(' ')
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                } else {
                    String::from_utf8_lossy(value.as_bytes()).into_owned()
                };
                (name.as_str().to_owned(), value)
            })
            .collect();
        let authorization = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let head = request.method() == hyper::Method::HEAD;
        let response = self.respond(&path, head, authorization.as_deref(), request.headers());
        lock(&self.requests).push(SeenRequest {
            method,
            path,
            headers,
            has_authorization: authorization.is_some(),
            status: response.status().as_u16(),
        });
        response
    }

    fn respond(
        &self,
        path: &str,
        head: bool,
        authorization: Option<&str>,
        headers: &hyper::HeaderMap,
    ) -> Response<Body> {
        let faults = lock(&self.faults).clone();
        if let Some(hostile @ (Hostile::EndlessToken | Hostile::SlowToken)) = &faults.hostile {
            if path.starts_with("/token") {
                return match hostile {
                    Hostile::SlowToken => self.endless(StatusCode::OK, b"{\"token\":\"", 1, true),
                    _ => self.endless(StatusCode::OK, b"{\"token\":\"", 64 << 10, false),
                };
            }
            let bearer = authorization.is_some_and(|a| a.starts_with("Bearer "));
            if path.starts_with("/v2/") && !bearer {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "authentication required",
                );
                let challenge = format!(
                    "Bearer realm=\"http://{}/token\",service=\"fake\"",
                    lock(&self.host)
                );
                if let Ok(v) = hyper::header::HeaderValue::from_str(&challenge) {
                    r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
                }
                return r;
            }
        }
        if !path.starts_with("/v2/") {
            return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not a registry path");
        }
        if let Some((user, password)) = &faults.basic_auth {
            if !basic_matches(authorization, user, password) {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "authentication required",
                );
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Basic realm=\"fake-registry\""),
                );
                return r;
            }
        }
        if path == "/v2/" {
            return full(
                StatusCode::OK,
                "application/json",
                Bytes::from_static(b"{}"),
            );
        }
        if let Some((repo, reference)) = split(path, "/manifests/") {
            return self.manifest(repo, reference, head, &faults);
        }
        if let Some((repo, digest)) = split(path, "/blobs/") {
            return self.blob(repo, digest, &faults, headers);
        }
        if let Some((repo, digest)) = split(path, "/referrers/") {
            if let Some(all) = lock(&self.referrers).as_ref() {
                let manifests = all
                    .get(&(repo.to_owned(), digest.to_owned()))
                    .cloned()
                    .unwrap_or_default();
                let index = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": manifests,
                });
                return full(
                    StatusCode::OK,
                    "application/vnd.oci.image.index.v1+json",
                    Bytes::from(index.to_string()),
                );
            }
        }
        error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown path")
    }

    fn manifest(&self, repo: &str, reference: &str, head: bool, faults: &Faults) -> Response<Body> {
        if let Some(status) = faults.manifest_head_status.filter(|_| head) {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::METHOD_NOT_ALLOWED);
            return full(status, "text/plain", Bytes::new());
        }
        match faults.hostile {
            Some(Hostile::EndlessManifest) => {
                let mut r = self.endless(
                    StatusCode::OK,
                    b"{\"schemaVersion\":2,\"x\":\"",
                    64 << 10,
                    false,
                );
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/vnd.oci.image.manifest.v1+json",
                    ),
                );
                return r;
            }
            Some(Hostile::EndlessErrorBody) => {
                return self.endless(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    b"{\"errors\":[{\"code\":\"UNKNOWN\",\"message\":\"",
                    64 << 10,
                    false,
                )
            }
            _ => {}
        }
        let faulty = faults.manifest_status.as_ref().filter(|_| {
            faults.manifest_status_times.as_ref().is_none_or(|left| {
                left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            })
        });
        if let Some((status, extra)) = faulty {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let code = match status {
                StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
                StatusCode::FORBIDDEN => "DENIED",
                _ => "UNAVAILABLE",
            };
            let mut r = error(status, code, "fault injected by the test");
            for (name, value) in extra {
                if let (Ok(n), Ok(v)) = (
                    hyper::header::HeaderName::from_bytes(name.as_bytes()),
                    hyper::header::HeaderValue::from_str(value),
                ) {
                    r.headers_mut().insert(n, v);
                }
            }
            return r;
        }
        let found = lock(&self.manifests)
            .get(&(repo.to_owned(), reference.to_owned()))
            .cloned();
        match found {
            Some((media_type, body)) => {
                let digest = sha256(&body);
                let mut r = full(StatusCode::OK, &media_type, body);
                let hide = head && faults.manifest_head_without_digest;
                if let Ok(v) = hyper::header::HeaderValue::from_str(&digest) {
                    if !hide {
                        r.headers_mut().insert("docker-content-digest", v);
                    }
                }
                r
            }
            None => error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            ),
        }
    }

    fn blob(
        &self,
        repo: &str,
        digest: &str,
        faults: &Faults,
        headers: &hyper::HeaderMap,
    ) -> Response<Body> {
        if let Some(target) = &faults.redirect_blobs_to {
            let mut r = full(StatusCode::TEMPORARY_REDIRECT, "text/plain", Bytes::new());
            let location = format!("http://{target}/v2/{repo}/blobs/{digest}");
            if let Ok(v) = hyper::header::HeaderValue::from_str(&location) {
                r.headers_mut().insert(hyper::header::LOCATION, v);
            }
            return r;
        }
        let Some(mut bytes) = lock(&self.blobs).get(digest).cloned() else {
            return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
        };
        if faults.corrupt_blob.as_deref() == Some(digest) {
            let mut wrong = bytes.to_vec();
            for b in wrong.iter_mut().rev().take(64) {
                *b ^= 0xff;
            }
            bytes = Bytes::from(wrong);
        }
        if let Some((target, sent)) = &faults.drop_blob_once {
            let mut dropped = lock(&self.dropped_once);
            if target == digest && !*dropped {
                *dropped = true;
                let head = bytes.slice(..(*sent).min(bytes.len()));
                // The pause lets hyper flush the headers and the head first: an
                // error polled right after the data would drop them unsent, and the
                // client would see a connection closed before any response.
                let drop = futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "fault: connection dropped mid-blob",
                    ))
                });
                let stream = futures_util::stream::iter(vec![Ok(Frame::data(head))]).chain(drop);
                return sized(
                    StatusCode::OK,
                    bytes.len(),
                    None,
                    StreamBody::new(stream).boxed_unsync(),
                );
            }
        }
        let total = bytes.len();
        let (status, content_range) = match range_start(headers) {
            Some(start) if start < total => {
                bytes = bytes.slice(start..);
                (
                    StatusCode::PARTIAL_CONTENT,
                    Some(format!("bytes {start}-{}/{total}", total - 1)),
                )
            }
            _ => (StatusCode::OK, None),
        };
        let len = bytes.len();
        let stall = faults
            .stall_blobs
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, head)| *head);
        let trickle = faults
            .trickle_blobs
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, step)| (*step).max(1));
        if let Some(step) = trickle {
            let chunks: Vec<Bytes> = (0..len)
                .step_by(step)
                .map(|at| bytes.slice(at..(at + step).min(len)))
                .collect();
            let sending = Sending::new(&self.sending);
            let stream = futures_util::stream::iter(chunks).then(move |chunk| {
                let _sending = &sending;
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Ok(Frame::data(chunk))
                }
            });
            return sized(
                status,
                len,
                content_range,
                StreamBody::new(stream).boxed_unsync(),
            );
        }
        if let Some(head) = stall.filter(|head| *head < len) {
            let tail = bytes.slice(head..);
            let head = bytes.slice(..head);
            let mut signal = self.release_signal.subscribe();
            let released = self.released.clone();
            let digest = digest.to_owned();
            let sending = Sending::new(&self.sending);
            let rest = futures_util::stream::once(async move {
                let _sending = sending;
                // An error only means the fake is going away; send the rest then.
                let _ = signal.wait_for(|_| is_released(&released, &digest)).await;
                Ok(Frame::data(tail))
            });
            let stream = futures_util::stream::iter(vec![Ok(Frame::data(head))]).chain(rest);
            return sized(
                status,
                len,
                content_range,
                StreamBody::new(stream).boxed_unsync(),
            );
        }
        sized(
            status,
            len,
            content_range,
            Full::new(bytes).map_err(never).boxed_unsync(),
        )
    }
}

impl State {
    /// A JSON-typed response of `head`, then `chunk` bytes of `a` again and again,
    /// without length or end; every 100 ms with `slow`, else as fast as it is read.
    fn endless(&self, status: StatusCode, head: &[u8], chunk: usize, slow: bool) -> Response<Body> {
        let sending = Sending::new(&self.sending);
        let filler = Bytes::from(vec![b'a'; chunk]);
        let rest = futures_util::stream::repeat(filler).then(move |chunk| {
            let _sending = &sending;
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Frame::data(chunk))
            }
        });
        let body =
            futures_util::stream::iter([Ok(Frame::data(Bytes::copy_from_slice(head)))]).chain(rest);
        let mut r = Response::new(StreamBody::new(body).boxed_unsync());
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    }
}

fn is_released(released: &Mutex<Option<Vec<String>>>, digest: &str) -> bool {
    lock(released)
        .as_ref()
        .is_none_or(|list| list.iter().any(|d| d == digest))
}

/// `/v2/REPO/<sep>REST` → (REPO, REST).
fn split<'a>(path: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let rest = path.strip_prefix("/v2/")?;
    let at = rest.rfind(sep)?;
    Some((&rest[..at], &rest[at + sep.len()..]))
}

fn range_start(headers: &hyper::HeaderMap) -> Option<usize> {
    headers
        .get(hyper::header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

fn basic_matches(authorization: Option<&str>, user: &str, password: &str) -> bool {
    use base64::Engine as _;
    let Some(encoded) = authorization.and_then(|a| a.strip_prefix("Basic ")) else {
        return false;
    };
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    encoded.trim() == expected
}

fn never(e: Infallible) -> std::io::Error {
    match e {}
}

fn full(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    let mut r = sized(
        status,
        body.len(),
        None,
        Full::new(body).map_err(never).boxed_unsync(),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn sized(
    status: StatusCode,
    len: usize,
    content_range: Option<String>,
    body: Body,
) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_LENGTH,
        hyper::header::HeaderValue::from(len),
    );
    if let Some(range) = content_range.and_then(|v| hyper::header::HeaderValue::from_str(&v).ok()) {
        r.headers_mut().insert(hyper::header::CONTENT_RANGE, range);
    }
    r
}

/// A distribution error body (`{"errors":[{code,message}]}`).
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    full(status, "application/json", Bytes::from(body.to_string()))
}

fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
