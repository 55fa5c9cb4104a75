//! A small in-process fake registry (plain HTTP on 127.0.0.1) for the client's unit
//! tests: each test gives it a handler, and it records every request it answered so
//! a test can check which headers went where.

use super::{ClientSettings, Endpoint, RegistryClient};
use crate::digest::Digest;
use crate::oci::{self, Descriptor};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
    uri_authority: Option<String>,
    /// Which connection it came on (numbered as accepted, from 0).
    pub connection: usize,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The host the request was for: its `Host` header, or over HTTP/2 (which has
    /// none) its `:authority`.
    pub fn authority(&self) -> Option<&str> {
        self.header("host").or(self.uri_authority.as_deref())
    }

    pub fn authorization(&self) -> Option<&str> {
        self.header("authorization")
    }
}

pub type Reply = Response<Full<Bytes>>;
type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

pub struct Fake {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Fake {
    pub async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Fake {
        Fake::serve(None, handler).await
    }

    /// The same over TLS with the given certificate chain and key (HTTP/2 or 1.1).
    pub async fn start_tls(
        tls: &TestCert,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Fake {
        let certs = CertificateDer::pem_file_iter(&tls.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&tls.key).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        // HTTP/2 when the client offers it, as registries behind TLS answer.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Fake::serve(Some(TlsAcceptor::from(Arc::new(config))), handler).await
    }

    async fn serve(
        tls: Option<TlsAcceptor>,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = task_log.clone();
                let handler = handler.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                method: parts.method,
                                target: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body,
                                version: parts.version,
                                uri_authority: parts.uri.authority().map(|a| a.to_string()),
                                connection,
                            };
                            let reply = handler(&seen);
                            log.lock().unwrap().push(seen);
                            Ok::<_, Infallible>(reply)
                        }
                    });
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // Errors here are the client hanging up or speaking the wrong
                    // protocol to us; the test sees that from the client side.
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        Fake { addr, log, task }
    }

    /// `127.0.0.1:<port>`, as an `Endpoint::host`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn reply(status: u16, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .body(Full::new(body.into()))
        .unwrap()
}

pub fn with_header(mut r: Reply, name: &'static str, value: &str) -> Reply {
    r.headers_mut().append(name, value.parse().unwrap());
    r
}

/// A distribution error body with one error.
pub fn error_reply(status: u16, code: &str, message: &str) -> Reply {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#);
    with_header(reply(status, body), "content-type", "application/json")
}

/// Short timeouts, so a broken test fails fast rather than hanging.
pub fn settings() -> ClientSettings {
    ClientSettings {
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(10),
        ..ClientSettings::default()
    }
}

/// A client with `settings()`.
pub fn client() -> RegistryClient {
    RegistryClient::new(settings()).unwrap()
}

/// An extra-CA directory under `dir` trusting `cert` for each of `fakes`
/// (`127.0.0.1..PORT`), for `ClientSettings::ca_dir`.
pub fn trust(dir: &Path, cert: &TestCert, fakes: &[&Fake]) -> PathBuf {
    let ca_dir = dir.join("ca.d");
    std::fs::create_dir_all(&ca_dir).unwrap();
    for fake in fakes {
        let name = format!("{}..{}", fake.addr.ip(), fake.addr.port());
        std::fs::copy(&cert.cert, ca_dir.join(name)).unwrap();
    }
    ca_dir
}

/// A client with `settings()` that trusts `cert` for each of `fakes`.
pub fn client_trusting(dir: &Path, cert: &TestCert, fakes: &[&Fake]) -> RegistryClient {
    RegistryClient::new(ClientSettings {
        ca_dir: Some(trust(dir, cert, fakes)),
        ..settings()
    })
    .unwrap()
}

/// The fake speaks plain HTTP, so its endpoint must be insecure (except in the
/// test proving a secure endpoint refuses it).
pub fn insecure(fake: &Fake) -> Endpoint {
    Endpoint {
        host: fake.host(),
        insecure: true,
    }
}

pub const LAYER: &[u8] = b"pretend this is a gzipped tar layer, 0123456789";

pub fn layer() -> Descriptor {
    Descriptor::new(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest::of(LAYER),
        LAYER.len() as u64,
    )
}

/// An OCI image manifest pointing at `layer()`.
pub fn manifest_body() -> Bytes {
    let l = layer();
    let config = Digest::of(b"{}");
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{config}","size":2}},"layers":[{{"mediaType":"{}","digest":"{}","size":{}}}]}}"#,
        oci::OCI_MANIFEST,
        oci::OCI_CONFIG,
        l.media_type,
        l.digest,
        l.size
    ))
}

/// Serves `manifest_body()` for any manifest and `LAYER` for its blob; 404 otherwise.
pub fn serve_image(seen: &Seen) -> Reply {
    let path = seen.path();
    if path.contains("/manifests/") {
        with_header(
            reply(200, manifest_body()),
            "content-type",
            oci::OCI_MANIFEST,
        )
    } else if path.ends_with(&format!("/blobs/{}", layer().digest)) {
        reply(200, LAYER)
    } else {
        error_reply(404, "BLOB_UNKNOWN", "blob unknown to registry")
    }
}

/// Fetches `layer()` of repository `app` from the fake (as an insecure endpoint),
/// from byte `offset`, with `credential`.
pub async fn fetch_layer(
    fake: &Fake,
    offset: u64,
    credential: Option<&super::Credential>,
) -> Result<super::BlobStream, super::RegistryError> {
    client()
        .fetch_blob(&insecure(fake), "app", &layer(), offset, credential)
        .await
}

/// Drains a blob stream into one buffer (tests only: real callers stream).
pub async fn collect(mut stream: super::BlobStream) -> Result<Vec<u8>, super::RegistryError> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// A self-signed certificate for `127.0.0.1`, made with the `openssl` tool.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCert {
    pub fn generate(dir: &Path) -> TestCert {
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=fake-registry"])
            // Not a CA: webpki refuses a CA certificate used as the server's own.
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the openssl tool is needed for TLS tests: apt-get install openssl");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestCert { cert, key }
    }
}
