//! HTTP(S) to registries: one hyper client per host (system roots plus that host's
//! extra CAs), redirects followed by hand so `Authorization` and request bodies never
//! leave their origin, and plain HTTP or unverified TLS only for the very host an
//! endpoint configured insecure names.

use super::error::{cause_chain, RegistryError};
use super::proxy::{ProxyConnector, ProxySettings};
use super::{ClientSettings, Endpoint};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AUTHORIZATION, LOCATION, USER_AGENT};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use url::Url;

/// Redirects followed for one request (blob GETs go registry → storage, sometimes
/// through a CDN hop or two).
pub(crate) const MAX_REDIRECTS: usize = 5;
/// HTTP/2 flow-control window per stream (hyper's default); the connection gets 16.
const H2_STREAM_WINDOW: u32 = 2 << 20;

type HttpsClient = Client<HttpsConnector<ProxyConnector>, Full<Bytes>>;

/// One request as the caller wants it sent; the transport adds `User-Agent` and
/// carries `authorization` only as far as the origin it was meant for.
pub(crate) struct Outgoing {
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub authorization: Option<HeaderValue>,
}

impl Outgoing {
    pub fn get(headers: HeaderMap, authorization: Option<HeaderValue>) -> Self {
        Self::new(Method::GET, headers, authorization)
    }

    pub fn new(method: Method, headers: HeaderMap, authorization: Option<HeaderValue>) -> Self {
        Outgoing {
            method,
            headers,
            body: Bytes::new(),
            authorization,
        }
    }
}

pub(crate) struct Transport {
    user_agent: HeaderValue,
    /// `ca_dir`, then `certs_d`: where extra CAs and client certificates are found.
    trust_dirs: Vec<PathBuf>,
    proxy: Option<Arc<ProxySettings>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    min_bytes_per_second: u64,
    provider: Arc<CryptoProvider>,
    /// Loaded once: reading the system store is slow and it does not change under us.
    system_roots: Arc<RootCertStore>,
    /// Keyed by (authority, verify certificates).
    clients: Mutex<HashMap<(String, bool), HttpsClient>>,
    /// Insecure endpoints that turned out not to speak TLS.
    plain_http: Mutex<HashSet<String>>,
}

/// Why one hop failed, before it becomes a `RegistryError`.
enum HopError {
    Setup(RegistryError),
    Http(hyper_util::client::legacy::Error),
    NoResponse(Duration),
}

impl Transport {
    pub fn new(settings: &ClientSettings) -> Result<Self, RegistryError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(error = %err, "some system CA certificates could not be loaded");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "loaded system CA certificates");
        let agent = if settings.user_agent.is_empty() {
            concat!("cri-imaged/", env!("CARGO_PKG_VERSION")).to_string()
        } else {
            settings.user_agent.clone()
        };
        let user_agent = HeaderValue::from_str(&agent).unwrap_or_else(|_| {
            tracing::warn!("configured user agent is not a valid header value; using the default");
            HeaderValue::from_static(concat!("cri-imaged/", env!("CARGO_PKG_VERSION")))
        });
        Ok(Transport {
            user_agent,
            trust_dirs: {
                let mut dirs: Vec<PathBuf> = [&settings.ca_dir, &settings.certs_d]
                    .into_iter()
                    .flatten()
                    .filter(|d| !d.as_os_str().is_empty())
                    .cloned()
                    .collect();
                dirs.dedup();
                dirs
            },
            proxy: settings.proxy.clone(),
            connect_timeout: settings.connect_timeout,
            idle_timeout: settings.idle_timeout,
            min_bytes_per_second: settings.min_bytes_per_second,
            provider,
            system_roots: Arc::new(roots),
            clients: Mutex::new(HashMap::new()),
            plain_http: Mutex::new(HashSet::new()),
        })
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The slowest a blob may arrive over an `idle_timeout` window (0: any speed).
    pub fn min_bytes_per_second(&self) -> u64 {
        self.min_bytes_per_second
    }

    /// The URL of `path` on the endpoint: HTTPS, unless the endpoint is insecure and
    /// was found earlier to speak only plain HTTP.
    pub fn registry_url(&self, endpoint: &Endpoint, path: &str) -> Result<Url, RegistryError> {
        let plain = endpoint.insecure
            && self
                .plain_http
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&endpoint.host);
        let scheme = if plain { "http" } else { "https" };
        let text = format!("{scheme}://{}{path}", endpoint.host);
        Url::parse(&text).map_err(|source| RegistryError::InvalidUrl {
            what: format!("{}{path}", endpoint.host),
            source,
        })
    }

    /// Sends `req` to `url`, following redirects. For an insecure endpoint whose
    /// HTTPS connection fails, retries once over plain HTTP and remembers that.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        mut url: Url,
        req: &Outgoing,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut method = req.method.clone();
        let mut body = req.body.clone();
        let mut authorization = req.authorization.clone();
        for hop in 0..=MAX_REDIRECTS {
            // Insecurity is granted to the configured host. A hop elsewhere carrying
            // credentials (a token request, say) gets full checks; one carrying none
            // (a blob redirected to storage, with Authorization already dropped) may
            // stay as insecure as its registry: nothing secret travels, and the blob
            // is checked against its digest.
            let carries_secrets = authorization.is_some() || !body.is_empty();
            let insecure =
                is_insecure_for(endpoint, &url) || (endpoint.insecure && !carries_secrets);
            if url.scheme() != "https" && !insecure {
                return Err(RegistryError::InsecureUrl {
                    host: endpoint.host.clone(),
                    url: redacted(&url),
                });
            }
            let sent = self
                .send_once(&url, insecure, &method, req, &body, &authorization)
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(HopError::Http(e))
                    if hop == 0 && e.is_connect() && insecure && url.scheme() == "https" =>
                {
                    let https_detail = cause_chain(&e);
                    tracing::debug!(host = %endpoint.host, error = %https_detail,
                        "HTTPS failed on an insecure registry; trying plain HTTP");
                    let mut plain = url.clone();
                    // Cannot fail: both are special schemes.
                    let _ = plain.set_scheme("http");
                    let r = self
                        .send_once(&plain, true, &method, req, &body, &authorization)
                        .await
                        .map_err(|e| {
                            let mut err = hop_error(&plain, e);
                            if let RegistryError::Unreachable { detail, .. } = &mut err {
                                *detail = format!("HTTPS: {https_detail}; plain HTTP: {detail}");
                            }
                            err
                        })?;
                    tracing::info!(host = %endpoint.host, "insecure registry speaks plain HTTP; using it from now on");
                    self.plain_http
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(endpoint.host.clone());
                    url = plain;
                    r
                }
                Err(e) => return Err(hop_error(&url, e)),
            };
            let status = response.status();
            if !is_followed_redirect(status) {
                return Ok(response);
            }
            let next = redirect_target(&url, response.headers())?;
            if url.scheme() == "https" && next.scheme() != "https" {
                return Err(RegistryError::DowngradeRedirect {
                    host: endpoint.host.clone(),
                    url: redacted(&next),
                });
            }
            let leaves_origin = !same_origin(&url, &next);
            // Token grants carry passwords and refresh tokens in the body, and 307/308
            // would replay it to wherever the redirect points.
            if leaves_origin && (!body.is_empty() || !is_safe_method(&method)) {
                return Err(RegistryError::BadResponse {
                    host: endpoint.host.clone(),
                    detail: format!(
                        "refusing to forward a {method} request body with credentials to {}",
                        authority(&next)
                    ),
                });
            }
            if authorization.is_some() && leaves_origin {
                tracing::debug!(from = %authority(&url), to = %authority(&next),
                    "redirect leaves the origin; dropping Authorization");
                authorization = None;
            }
            // 301/302/303 turn a POST into a GET (RFC 9110 15.4); 307/308 keep it.
            if matches!(
                status,
                StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND | StatusCode::SEE_OTHER
            ) && !is_safe_method(&method)
            {
                method = Method::GET;
                body = Bytes::new();
            }
            tracing::debug!(status = status.as_u16(), to = %redacted(&next), "following redirect");
            url = next;
        }
        Err(RegistryError::TooManyRedirects {
            host: endpoint.host.clone(),
            limit: MAX_REDIRECTS,
        })
    }

    async fn send_once(
        &self,
        url: &Url,
        insecure: bool,
        method: &Method,
        req: &Outgoing,
        body: &Bytes,
        authorization: &Option<HeaderValue>,
    ) -> Result<Response<Incoming>, HopError> {
        let client = self.client_for(url, !insecure).map_err(HopError::Setup)?;
        let uri: Uri = url.as_str().parse().map_err(|source| {
            HopError::Setup(RegistryError::BadResponse {
                host: authority(url),
                detail: format!("URL {} is not a valid request URI: {source}", redacted(url)),
            })
        })?;
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(Full::new(body.clone()))
            .map_err(|source| {
                HopError::Setup(RegistryError::BadResponse {
                    host: authority(url),
                    detail: format!("cannot build request: {source}"),
                })
            })?;
        let headers = request.headers_mut();
        for (name, value) in &req.headers {
            headers.append(name.clone(), value.clone());
        }
        headers.insert(USER_AGENT, self.user_agent.clone());
        if let Some(auth) = authorization {
            let mut auth = auth.clone();
            auth.set_sensitive(true);
            headers.insert(AUTHORIZATION, auth);
        }
        match tokio::time::timeout(self.idle_timeout, client.request(request)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(HopError::Http(e)),
            Err(_) => Err(HopError::NoResponse(self.idle_timeout)),
        }
    }

    fn client_for(&self, url: &Url, verify: bool) -> Result<HttpsClient, RegistryError> {
        let key = (authority(url), verify);
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(c.clone());
        }
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?;
        let host = url.host_str().unwrap_or_default();
        let wants_identity = if verify {
            let mut roots = (*self.system_roots).clone();
            for dir in &self.trust_dirs {
                add_extra_cas(&mut roots, dir, host, url.port())?;
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                    self.provider.clone(),
                )))
        };
        // Mutual TLS: a client certificate from certs.d, offered to insecure hosts too.
        let mut identity = None;
        for dir in &self.trust_dirs {
            identity = client_identity(dir, host, url.port())?;
            if identity.is_some() {
                break;
            }
        }
        let tls = match identity {
            Some((chain, key)) => wants_identity.with_client_auth_cert(chain, key)?,
            None => wants_identity.with_no_client_auth(),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(ProxyConnector::new(http, self.proxy.clone()));
        // Over HTTP/2 every request to a host shares one connection, and its window is
        // used up by data received but not yet read. A layer download waiting for its
        // extraction (the tee) reads nothing meanwhile: with hyper's 5 MiB connection
        // window, three such streams would starve every other request to the host
        // (the other layers, other pulls' manifests). Sixteen streams' worth of room.
        let client: HttpsClient = Client::builder(TokioExecutor::new())
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_STREAM_WINDOW * 16)
            .build(connector);
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, client.clone());
        Ok(client)
    }
}

fn hop_error(url: &Url, e: HopError) -> RegistryError {
    match e {
        HopError::Setup(e) => e,
        HopError::Http(e) => {
            let mut detail = cause_chain(&e);
            // rustls' words for "the server answered TLS with plain HTTP".
            if url.scheme() == "https" && detail.contains("InvalidContentType") {
                detail.push_str(
                    " (the registry seems to speak plain HTTP; if that is intended, mark it \
                     `insecure = true` in registries.conf)",
                );
            }
            RegistryError::Unreachable {
                host: authority(url),
                detail,
                transient: !e.is_connect(),
            }
        }
        HopError::NoResponse(after) => RegistryError::Unreachable {
            host: authority(url),
            detail: format!("no response within {} s", after.as_secs()),
            transient: true,
        },
    }
}

fn is_followed_redirect(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    )
}

fn redirect_target(from: &Url, headers: &HeaderMap) -> Result<Url, RegistryError> {
    let bad = |detail: String| RegistryError::BadResponse {
        host: authority(from),
        detail,
    };
    let location = headers
        .get(LOCATION)
        .ok_or_else(|| bad("redirect without a Location header".into()))?
        .to_str()
        .map_err(|e| bad(format!("redirect Location is not text: {e}")))?;
    let next = from
        .join(location)
        .map_err(|e| bad(format!("redirect Location is not a URL: {e}")))?;
    if next.scheme() != "http" && next.scheme() != "https" {
        return Err(bad(format!(
            "redirect to unsupported scheme {}",
            next.scheme()
        )));
    }
    Ok(next)
}

/// `host` or `host:port` as written in the URL (default ports omitted, as `Url` does).
pub(crate) fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// Whether `url` is on the host `endpoint` names and that endpoint is configured
/// insecure: only then are plain HTTP and unverified certificates acceptable.
pub(crate) fn is_insecure_for(endpoint: &Endpoint, url: &Url) -> bool {
    if !endpoint.insecure {
        return false;
    }
    if authority(url) == endpoint.host {
        return true;
    }
    // `Url` drops a default port that the configuration may spell out (`r.io:443`).
    match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => format!("{host}:{port}") == endpoint.host,
        _ => false,
    }
}

fn is_safe_method(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A URL for logs and errors: storage redirects carry signed query strings that act
/// as short-lived credentials, so the query and any userinfo are left out.
pub(crate) fn redacted(url: &Url) -> String {
    format!("{}://{}{}", url.scheme(), authority(url), url.path())
}

/// The certs.d directory name for `host[:port]`.
fn certs_d_name(host: &str, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// The extra CA files for `host[:port]` in `dir`: a PEM file named `host` or
/// `host..port` (OpenShift's additionalTrustedCA keys), and every `*.crt` in the
/// `certs.d`-style directory `host` or `host:port`.
fn ca_files(dir: &Path, host: &str, port: Option<u16>) -> Result<Vec<PathBuf>, RegistryError> {
    let file_name = match port {
        Some(p) => format!("{host}..{p}"),
        None => host.to_string(),
    };
    let dir_name = certs_d_name(host, port);
    let mut files = Vec::new();
    let file = dir.join(&file_name);
    if file.is_file() {
        files.push(file);
    }
    let certs_d = dir.join(&dir_name);
    if certs_d.is_dir() {
        let entries = std::fs::read_dir(&certs_d).map_err(|e| RegistryError::TrustStore {
            host: dir_name.clone(),
            path: certs_d.display().to_string(),
            source: rustls_pki_types::pem::Error::Io(e),
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt") && p.is_file())
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Adds the extra CAs for `host[:port]` found in `dir` (see [`ca_files`]).
fn add_extra_cas(
    roots: &mut RootCertStore,
    dir: &Path,
    host: &str,
    port: Option<u16>,
) -> Result<(), RegistryError> {
    let dir_name = certs_d_name(host, port);
    let files = ca_files(dir, host, port)?;
    for path in files {
        let certs = CertificateDer::pem_file_iter(&path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| RegistryError::TrustStore {
                host: dir_name.clone(),
                path: path.display().to_string(),
                source,
            })?;
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 || ignored > 0 {
            tracing::warn!(path = %path.display(), added, ignored,
                "extra CA file held unusable certificates");
        } else {
            tracing::debug!(path = %path.display(), added, "trusting extra CAs");
        }
    }
    Ok(())
}

/// The client certificate file for `host[:port]` in `dir`: in the certs.d directory
/// `host:port` (or `host`), the first `NAME.cert` by name (its key is `NAME.key`),
/// as containers-certs.d(5) lays them out.
fn client_certificate_file(dir: &Path, host: &str, port: Option<u16>) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir.join(certs_d_name(host, port))).ok()?;
    let mut certs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cert") && p.is_file())
        .collect();
    certs.sort();
    certs.into_iter().next()
}

/// The client certificate and key for `host[:port]` from `dir`
/// ([`client_certificate_file`]). A `.cert` without its key is an error, as in
/// containers/image.
fn client_identity(
    dir: &Path,
    host: &str,
    port: Option<u16>,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, RegistryError> {
    let Some(cert) = client_certificate_file(dir, host, port) else {
        return Ok(None);
    };
    let dir_name = certs_d_name(host, port);
    let store_error = |path: &Path, source| RegistryError::TrustStore {
        host: dir_name.clone(),
        path: path.display().to_string(),
        source,
    };
    let key = cert.with_extension("key");
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| store_error(&cert, e))?;
    let private = PrivateKeyDer::from_pem_file(&key).map_err(|e| store_error(&key, e))?;
    tracing::debug!(cert = %cert.display(), "offering a client certificate");
    Ok(Some((chain, private)))
}

/// The files that shape TLS to `host[:port]` from `dirs` (in order): extra CAs and
/// the client certificate, for `explain`. Unreadable directories list nothing.
pub fn tls_files(dirs: &[PathBuf], host: &str, port: Option<u16>) -> TlsFiles {
    TlsFiles {
        cas: dirs
            .iter()
            .flat_map(|d| ca_files(d, host, port).unwrap_or_default())
            .collect(),
        client_certificate: dirs
            .iter()
            .find_map(|d| client_certificate_file(d, host, port)),
    }
}

/// See [`tls_files`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cas: Vec<PathBuf>,
    pub client_certificate: Option<PathBuf>,
}

/// The certificate "verifier" for insecure endpoints: accepts any certificate but
/// still checks handshake signatures, so the session itself is sound.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The next data frame of `body`, skipping trailers; `None` at the end. Waiting longer
/// than `idle` for a frame is an interruption: a stalled connection must not hang a pull.
pub(crate) async fn next_data(
    body: &mut Incoming,
    idle: Duration,
    host: &str,
) -> Result<Option<Bytes>, RegistryError> {
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(RegistryError::Stalled {
                    host: host.to_string(),
                    what: "a response body".into(),
                    received: 0,
                    why: format!("nothing for {idle:?} (pull.progress_timeout)"),
                })
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => {
                return Err(RegistryError::Interrupted {
                    host: host.to_string(),
                    detail: cause_chain(&e),
                })
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads at most `limit` bytes of `body`. Returns the bytes and whether more followed.
/// These are small documents (manifests, tokens, error bodies): the whole body must
/// arrive within `idle`, so a server sending a byte now and then (slowloris) cannot
/// hold a pull longer than a silent one.
pub(crate) async fn read_capped(
    body: &mut Incoming,
    limit: usize,
    idle: Duration,
    host: &str,
) -> Result<(Bytes, bool), RegistryError> {
    let mut buf = BytesMut::new();
    let read = async {
        while let Some(chunk) = next_data(body, idle, host).await? {
            if buf.len() + chunk.len() > limit {
                let room = limit - buf.len();
                buf.extend_from_slice(&chunk[..room]);
                return Ok(true);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(false)
    };
    match tokio::time::timeout(idle, read).await {
        Ok(Ok(truncated)) => Ok((buf.freeze(), truncated)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(RegistryError::Stalled {
            host: host.to_string(),
            what: "a response body".into(),
            received: buf.len() as u64,
            why: format!("not complete within {idle:?} (pull.progress_timeout)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::oci::Descriptor;

    /// Over HTTP/2, blob bodies nobody reads for now (their extraction is behind)
    /// hold their stream windows; they must not take the whole connection's, or
    /// every other request to the host waits with them.
    #[tokio::test]
    async fn unread_blob_bodies_do_not_starve_other_requests_on_the_connection() {
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        let blob = bytes::Bytes::from(vec![7u8; 3 << 20]);
        let desc = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Digest::of(&blob),
            blob.len() as u64,
        );
        let served = blob.clone();
        let registry = Fake::start_tls(&cert, move |seen: &Seen| {
            if seen.path().contains("/blobs/") {
                fake::reply(200, served.clone())
            } else {
                fake::serve_image(seen)
            }
        })
        .await;
        let client = fake::client();
        let endpoint = fake::insecure(&registry);
        let mut unread = Vec::new();
        for _ in 0..4 {
            let body = client
                .fetch_blob(&endpoint, "app", &desc, 0, None)
                .await
                .unwrap();
            unread.push(body);
        }
        // Give the unread streams time to fill their windows.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let manifest = tokio::time::timeout(
            Duration::from_secs(10),
            client.fetch_manifest(&endpoint, "app", "v1", None),
        )
        .await;
        assert!(
            matches!(manifest, Ok(Ok(_))),
            "the manifest waited for unread blobs: {manifest:?}"
        );
        // What the test is about: one HTTP/2 connection carried all of it.
        let seen = registry.seen();
        assert_eq!(seen.len(), 5);
        assert!(
            seen.iter()
                .all(|s| s.version == http::Version::HTTP_2 && s.connection == seen[0].connection),
            "{:?}",
            seen.iter()
                .map(|s| (s.version, s.connection))
                .collect::<Vec<_>>()
        );
        drop(unread);
    }

    #[test]
    fn origin_compares_scheme_host_and_port() {
        let a = Url::parse("https://r.example/v2/").unwrap();
        assert!(same_origin(
            &a,
            &Url::parse("https://r.example:443/x").unwrap()
        ));
        assert!(!same_origin(
            &a,
            &Url::parse("https://r.example:5000/x").unwrap()
        ));
        assert!(!same_origin(&a, &Url::parse("http://r.example/x").unwrap()));
        assert!(!same_origin(
            &a,
            &Url::parse("https://s.example/x").unwrap()
        ));
    }

    #[test]
    fn redacted_url_drops_signed_query() {
        let u = Url::parse("https://u:p@s.example:9000/b/x?X-Amz-Signature=abc").unwrap();
        assert_eq!(redacted(&u), "https://s.example:9000/b/x");
    }

    #[test]
    fn extra_cas_found_in_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        // Not a certificate: parsing must find no PEM sections and add nothing, but
        // reading must succeed and a certs.d directory must be looked into.
        std::fs::write(dir.path().join("r.example..5000"), "").unwrap();
        std::fs::create_dir(dir.path().join("r.example:5000")).unwrap();
        std::fs::write(dir.path().join("r.example:5000/ca.crt"), "").unwrap();
        let mut roots = RootCertStore::empty();
        add_extra_cas(&mut roots, dir.path(), "r.example", Some(5000)).unwrap();
        assert!(roots.is_empty());
    }

    use crate::registry::fake::{self, Fake, Seen};
    use crate::registry::{Credential, Endpoint, RegistryClient};

    /// The URL scheme the client's transport now uses for `endpoint`.
    fn scheme(client: &RegistryClient, endpoint: &Endpoint) -> String {
        let url = client
            .inner
            .transport
            .registry_url(endpoint, "/v2/")
            .unwrap();
        url.scheme().to_owned()
    }

    #[tokio::test]
    async fn blob_redirect_to_another_host_drops_authorization() {
        // The storage host is not the insecure endpoint: it must pass TLS checks.
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        let storage = Fake::start_tls(&cert, |_: &Seen| fake::reply(200, fake::LAYER)).await;
        let location = format!("https://{}/bucket/layer?sig=abc", storage.host());
        let registry = Fake::start(move |seen: &Seen| {
            if seen.authorization() != Some("Bearer given") {
                return fake::reply(401, "");
            }
            let r = fake::reply(307, "");
            fake::with_header(r, "location", &location)
        })
        .await;
        let cred = Credential::RegistryToken("given".into());
        let stream = fake::client_trusting(tmp.path(), &cert, &[&storage])
            .fetch_blob(
                &fake::insecure(&registry),
                "app",
                &fake::layer(),
                0,
                Some(&cred),
            )
            .await
            .unwrap();
        assert_eq!(fake::collect(stream).await.unwrap(), fake::LAYER);
        assert_eq!(registry.seen()[0].authorization(), Some("Bearer given"));
        let at_storage = storage.seen();
        assert_eq!(at_storage[0].target, "/bucket/layer?sig=abc");
        assert_eq!(at_storage[0].authorization(), None);
    }

    #[tokio::test]
    async fn same_origin_redirect_keeps_authorization() {
        let registry = Fake::start(|seen: &Seen| {
            if seen.authorization() != Some("Bearer given") {
                return fake::reply(401, "");
            }
            if seen.path().starts_with("/v2/") {
                return fake::with_header(fake::reply(302, ""), "location", "/local/layer");
            }
            fake::reply(200, fake::LAYER)
        })
        .await;
        let cred = Credential::RegistryToken("given".into());
        let stream = fake::fetch_layer(&registry, 0, Some(&cred)).await.unwrap();
        assert_eq!(fake::collect(stream).await.unwrap(), fake::LAYER);
        assert_eq!(registry.seen()[1].path(), "/local/layer");
    }

    #[tokio::test]
    async fn endless_redirects_stop() {
        let registry =
            Fake::start(|_: &Seen| fake::with_header(fake::reply(302, ""), "location", "/again"))
                .await;
        let err = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "app", "v1", None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::TooManyRedirects { .. }),
            "{err}"
        );
        assert_eq!(registry.seen().len(), MAX_REDIRECTS + 1);
    }

    #[tokio::test]
    async fn secure_endpoint_never_falls_back_to_http() {
        let registry = Fake::start(fake::serve_image).await;
        let endpoint = Endpoint {
            host: registry.host(),
            insecure: false,
        };
        let cred = Credential::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        let err = fake::client()
            .fetch_manifest(&endpoint, "app", "v1", Some(&cred))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
        assert!(err.is_unavailable());
        // The TLS hello is not HTTP, so the fake answered no request at all.
        assert!(registry.seen().is_empty());
    }

    #[tokio::test]
    async fn insecure_endpoint_remembers_plain_http() {
        let registry = Fake::start(fake::serve_image).await;
        let client = fake::client();
        let endpoint = fake::insecure(&registry);
        client
            .fetch_manifest(&endpoint, "app", "v1", None)
            .await
            .unwrap();
        assert_eq!(scheme(&client, &endpoint), "http");
        let secure = Endpoint {
            insecure: false,
            ..endpoint
        };
        assert_eq!(scheme(&client, &secure), "https");
    }

    #[tokio::test]
    async fn unreachable_names_the_cause() {
        // Bind then drop: nothing listens on this port any more.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let endpoint = Endpoint {
            host: format!("127.0.0.1:{port}"),
            insecure: true,
        };
        let err = fake::client()
            .fetch_manifest(&endpoint, "app", "v1", None)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, RegistryError::Unreachable { .. }), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    fn client_with_ca_dir(dir: &Path) -> crate::registry::RegistryClient {
        crate::registry::RegistryClient::new(crate::registry::ClientSettings {
            ca_dir: Some(dir.to_path_buf()),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn extra_ca_trusted_from_either_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        let registry = Fake::start_tls(&cert, fake::serve_image).await;
        let port = registry.addr.port();
        let secure = Endpoint {
            host: registry.host(),
            insecure: false,
        };

        // No extra CA: the self-signed certificate is not trusted.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = client_with_ca_dir(&empty)
            .fetch_manifest(&secure, "app", "v1", None)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("certificate"), "{err}");

        // OpenShift additionalTrustedCA style: `<host>..<port>`.
        let openshift = tmp.path().join("openshift");
        std::fs::create_dir(&openshift).unwrap();
        std::fs::copy(&cert.cert, openshift.join(format!("127.0.0.1..{port}"))).unwrap();
        client_with_ca_dir(&openshift)
            .fetch_manifest(&secure, "app", "v1", None)
            .await
            .unwrap();

        // certs.d style: `<host:port>/ca.crt`.
        let certs_d = tmp.path().join("certs.d");
        std::fs::create_dir_all(certs_d.join(format!("127.0.0.1:{port}"))).unwrap();
        std::fs::copy(&cert.cert, certs_d.join(format!("127.0.0.1:{port}/ca.crt"))).unwrap();
        client_with_ca_dir(&certs_d)
            .fetch_manifest(&secure, "app", "v1", None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn insecure_endpoint_accepts_any_certificate_and_keeps_https() {
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        let registry = Fake::start_tls(&cert, fake::serve_image).await;
        let client = fake::client();
        let endpoint = fake::insecure(&registry);
        client
            .fetch_manifest(&endpoint, "app", "v1", None)
            .await
            .unwrap();
        assert_eq!(scheme(&client, &endpoint), "https");
    }

    #[tokio::test]
    async fn https_to_http_redirect_is_refused_even_when_insecure() {
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        let storage = Fake::start(|_: &Seen| fake::reply(200, fake::LAYER)).await;
        let location = format!("http://{}/layer", storage.host());
        let registry = Fake::start_tls(&cert, move |_: &Seen| {
            fake::with_header(fake::reply(307, ""), "location", &location)
        })
        .await;
        let err = fake::fetch_layer(&registry, 0, None).await.err().unwrap();
        assert!(
            matches!(err, RegistryError::DowngradeRedirect { .. }),
            "{err}"
        );
        assert!(storage.seen().is_empty());
    }

    /// A credential-free hop (a blob redirected to storage; Authorization dropped)
    /// may stay as insecure as its registry: nothing secret travels and the blob is
    /// checked against its digest. Token requests are held to full checks (see the
    /// realm tests in challenge.rs).
    #[tokio::test]
    async fn insecure_registrys_blob_redirect_elsewhere_is_followed_without_credentials() {
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        let tls_storage = Fake::start_tls(&cert, |_: &Seen| fake::reply(200, fake::LAYER)).await;
        let plain_storage = Fake::start(|_: &Seen| fake::reply(200, fake::LAYER)).await;
        let credential = crate::registry::Credential::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        for location in [
            format!("https://{}/layer", tls_storage.host()),
            format!("http://{}/layer", plain_storage.host()),
        ] {
            let registry = Fake::start(move |_: &Seen| {
                fake::with_header(fake::reply(307, ""), "location", &location)
            })
            .await;
            let body = fake::collect(
                fake::fetch_layer(&registry, 0, Some(&credential))
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
            assert_eq!(body, fake::LAYER);
        }
        for storage in [&tls_storage, &plain_storage] {
            let seen = storage.seen();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].authorization(), None);
        }
    }

    #[test]
    fn insecurity_belongs_to_the_configured_host_only() {
        let endpoint = Endpoint {
            host: "r.example:5000".into(),
            insecure: true,
        };
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(is_insecure_for(
            &endpoint,
            &url("http://r.example:5000/v2/")
        ));
        assert!(is_insecure_for(&endpoint, &url("https://r.example:5000/t")));
        assert!(!is_insecure_for(&endpoint, &url("https://r.example/t")));
        assert!(!is_insecure_for(
            &endpoint,
            &url("http://auth.example:5000/t")
        ));
        let default_port = Endpoint {
            host: "r.example:443".into(),
            insecure: true,
        };
        assert!(is_insecure_for(
            &default_port,
            &url("https://r.example/v2/")
        ));
        let secure = Endpoint {
            insecure: false,
            ..endpoint
        };
        assert!(!is_insecure_for(&secure, &url("http://r.example:5000/v2/")));
    }
}
