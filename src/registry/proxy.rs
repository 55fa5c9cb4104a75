//! Registry traffic through an HTTP proxy, as corporate nodes need: `HTTPS_PROXY` /
//! `HTTP_PROXY` / `NO_PROXY` (or `[registry] proxy` / `no_proxy`). Every connection,
//! HTTPS or plain HTTP, is a `CONNECT` tunnel, so the proxy sees host and port and
//! never a registry credential in clear (TLS runs inside the tunnel).

use base64::Engine as _;
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use url::Url;

/// The longest proxy response head we read.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
}

/// Where the proxy is and which hosts bypass it.
#[derive(Clone)]
pub struct ProxySettings {
    /// `host:port` of the proxy.
    address: String,
    /// `Proxy-Authorization` value, from the URL's user info.
    authorization: Option<String>,
    no_proxy: Vec<String>,
    /// The URL without user info, for logs.
    shown: String,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySettings")
            .field("proxy", &self.shown)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl ProxySettings {
    /// `proxy` (a URL such as `http://user:pass@proxy:3128`; empty: none) and
    /// `no_proxy` (comma-separated hosts, `.domain`s, `host:port`s, or `*`).
    pub fn new(proxy: &str, no_proxy: &str) -> Result<Option<ProxySettings>, ProxyError> {
        let proxy = proxy.trim();
        if proxy.is_empty() {
            return Ok(None);
        }
        let with_scheme = if proxy.contains("://") {
            proxy.to_string()
        } else {
            format!("http://{proxy}")
        };
        let bad = |why: &str| ProxyError::BadUrl {
            url: redact(&with_scheme),
            why: why.to_string(),
        };
        let url = Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "http" {
            return Err(bad("only http:// proxies are supported"));
        }
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let authorization = (!url.username().is_empty()).then(|| {
            let user = percent_decode(url.username());
            let password = percent_decode(url.password().unwrap_or_default());
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        Ok(Some(ProxySettings {
            address: format!("{host}:{port}"),
            authorization,
            no_proxy: no_proxy
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            shown: format!("http://{host}:{port}"),
        }))
    }

    /// From the environment, as curl and Go read it: `HTTPS_PROXY` (else
    /// `HTTP_PROXY`), `NO_PROXY`, either case.
    pub fn from_env() -> Result<Option<ProxySettings>, ProxyError> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
                .unwrap_or_default()
        };
        let proxy = var(&["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"]);
        ProxySettings::new(&proxy, &var(&["NO_PROXY", "no_proxy"]))
    }

    /// Whether a connection to `host:port` goes through the proxy.
    pub fn applies_to(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        !self.no_proxy.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = match entry.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') || n.ends_with(']') => (n, p.parse::<u16>().ok()),
                _ => (entry.as_str(), None),
            };
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let name = name.trim_start_matches('[').trim_end_matches(']');
            let domain = name.trim_start_matches('.');
            host == domain || host.ends_with(&format!(".{domain}"))
        })
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<unparsable>".into(),
    }
}

/// Connects directly, or through the proxy's `CONNECT` tunnel.
#[derive(Clone)]
pub struct ProxyConnector {
    direct: HttpConnector,
    proxy: Option<Arc<ProxySettings>>,
}

impl ProxyConnector {
    pub fn new(direct: HttpConnector, proxy: Option<Arc<ProxySettings>>) -> Self {
        ProxyConnector { direct, proxy }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for ProxyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default().to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let proxy = self.proxy.clone().filter(|p| p.applies_to(&host, port));
        let Some(proxy) = proxy else {
            let connecting = self.direct.call(uri);
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        };
        let proxy_uri: Result<Uri, _> = format!("http://{}", proxy.address).parse();
        let connecting = proxy_uri.map(|u| self.direct.call(u));
        Box::pin(async move {
            let io = connecting?.await?;
            let mut stream = io.into_inner();
            tunnel(&mut stream, &proxy, &host, port).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Asks the proxy for a tunnel to `host:port` and reads its answer.
async fn tunnel(
    stream: &mut TcpStream,
    proxy: &ProxySettings,
    host: &str,
    port: u16,
) -> Result<(), BoxError> {
    let target = format!("{host}:{port}");
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    // Read the response head byte by byte: nothing of the tunnelled stream may be
    // consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(format!("proxy {}: response head too long", proxy.shown).into());
        }
        let byte = stream
            .read_u8()
            .await
            .map_err(|e| format!("proxy {} closed the CONNECT to {target}: {e}", proxy.shown))?;
        head.push(byte);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let ok = status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'));
    if !ok {
        return Err(format!(
            "proxy {} refused CONNECT to {target}: {status_line}",
            proxy.shown
        )
        .into());
    }
    tracing::debug!(proxy = %proxy.shown, %target, "tunnel through proxy");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_hosts_domains_ports_and_everything() {
        let p = ProxySettings::new(
            "proxy.corp:3128",
            "localhost, .internal.example, registry.example.com:5000, 10.0.0.7,[::1]",
        )
        .unwrap()
        .unwrap();
        assert!(!p.applies_to("localhost", 5000));
        assert!(!p.applies_to("a.internal.example", 443));
        assert!(!p.applies_to("internal.example", 443));
        assert!(!p.applies_to("registry.example.com", 5000));
        assert!(p.applies_to("registry.example.com", 443));
        assert!(!p.applies_to("10.0.0.7", 443));
        assert!(!p.applies_to("[::1]", 443));
        assert!(p.applies_to("quay.io", 443));
        assert!(p.applies_to("notinternal.example", 443));
        let all = ProxySettings::new("http://p:1", "*").unwrap().unwrap();
        assert!(!all.applies_to("quay.io", 443));
    }

    /// A proxy that answers every CONNECT with `answer`; returns its address.
    async fn proxy_answering(answer: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read_u8().await {
                        Ok(b) => head.push(b),
                        Err(_) => break,
                    }
                }
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn a_proxy_refusing_the_tunnel_is_an_error_naming_it_without_credentials() {
        let address = proxy_answering("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let proxy = ProxySettings::new(&format!("http://user:s3cret@{address}"), "")
            .unwrap()
            .map(Arc::new);
        let mut connector = ProxyConnector::new(HttpConnector::new(), proxy);
        let uri: Uri = "https://registry.example.com/v2/".parse().unwrap();
        let Err(error) = tower::Service::call(&mut connector, uri).await else {
            panic!("a refused tunnel fails");
        };
        let error = error.to_string();
        assert!(
            error.contains("refused CONNECT to registry.example.com:443")
                && error.contains("407")
                && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn no_proxy_hosts_are_dialled_directly() {
        // The proxy would refuse; a no_proxy host never asks it.
        let address = proxy_answering("HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = target.local_addr().unwrap().port();
        let proxy = ProxySettings::new(&address, "127.0.0.1")
            .unwrap()
            .map(Arc::new);
        let mut connector = ProxyConnector::new(HttpConnector::new(), proxy);
        let uri: Uri = format!("http://127.0.0.1:{port}/v2/").parse().unwrap();
        assert!(tower::Service::call(&mut connector, uri).await.is_ok());
    }

    #[test]
    fn proxy_urls_and_their_credentials() {
        assert!(ProxySettings::new("", "").unwrap().is_none());
        let p = ProxySettings::new("http://us%40er:p%3Ass@proxy.corp:8080", "")
            .unwrap()
            .unwrap();
        assert_eq!(p.address, "proxy.corp:8080");
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert_eq!(p.authorization, Some(format!("Basic {expected}")));
        assert!(!format!("{p:?}").contains("p:ss") && !format!("{p:?}").contains(&expected));
        let e = ProxySettings::new("socks5://u:secret@proxy:1080", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only http://") && !e.contains("secret"), "{e}");
    }
}
