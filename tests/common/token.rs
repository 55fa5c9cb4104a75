//! The token server that token-auth registries delegate to: an in-process hyper server
//! over TLS implementing the docker token spec (GET with basic auth or anonymous, POST
//! `grant_type=password|refresh_token`), signing ES256 JWTs that docker-registry accepts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use ring::rand::SecureRandom as _;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;

use super::http_server::ServerThread;
use super::tls::{Issued, TestCa};
use super::{HarnessError, Result};

/// A user the token server knows, with the repositories it may pull and push.
/// Patterns: `*` (any), `name` (exact) or `prefix/*`.
#[derive(Clone)]
pub struct TokenUser {
    pub name: String,
    pub password: String,
    pub pull: Vec<String>,
    pub push: Vec<String>,
}

impl std::fmt::Debug for TokenUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenUser")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .field("pull", &self.pull)
            .field("push", &self.push)
            .finish()
    }
}

impl TokenUser {
    pub fn new(name: &str, password: &str) -> TokenUser {
        TokenUser {
            name: name.to_owned(),
            password: password.to_owned(),
            pull: Vec::new(),
            push: Vec::new(),
        }
    }

    /// May pull repositories matching `pattern`.
    pub fn pull(mut self, pattern: &str) -> TokenUser {
        self.pull.push(pattern.to_owned());
        self
    }

    /// May pull and push repositories matching `pattern`.
    pub fn push(mut self, pattern: &str) -> TokenUser {
        self.pull.push(pattern.to_owned());
        self.push.push(pattern.to_owned());
        self
    }
}

/// How a token server behaves.
#[derive(Debug, Clone)]
pub struct TokenOptions {
    pub users: Vec<TokenUser>,
    /// Repositories anonymous clients may pull (none by default).
    pub anonymous_pull: Vec<String>,
    /// The `service` the registry expects in `aud`.
    pub service: String,
    pub issuer: String,
    /// Host name put in the realm URL; `localhost` makes the realm a different host
    /// from the registry's `127.0.0.1` (delegated auth on another host and port).
    pub realm_host: String,
    pub expires_in: u64,
}

impl Default for TokenOptions {
    fn default() -> TokenOptions {
        TokenOptions {
            users: Vec::new(),
            anonymous_pull: Vec::new(),
            service: "cri-imaged-test-registry".to_owned(),
            issuer: "cri-imaged-test-token-issuer".to_owned(),
            realm_host: "127.0.0.1".to_owned(),
            expires_in: 300,
        }
    }
}

/// One `type:name:actions` entry of a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// What a client sent to the token server, for tests that assert on it. Passwords are
/// replaced by `<redacted>`; refresh tokens are kept so tests can match them.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub form: Vec<(String, String)>,
    /// The user of a Basic `Authorization` header, if any.
    pub basic_user: Option<String>,
    /// The subject the token was issued to (`""` for anonymous), if one was issued.
    pub subject: Option<String>,
    pub granted: Vec<Access>,
    pub status: u16,
}

/// A running token server; stopped on drop.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
    server: ServerThread,
}

struct State {
    options: TokenOptions,
    key: EcdsaKeyPair,
    x5c: String,
    rng: ring::rand::SystemRandom,
    requests: Mutex<Vec<TokenRequest>>,
    /// refresh token → user name.
    refresh_tokens: Mutex<HashMap<String, String>>,
}

impl TokenServer {
    /// Starts a token server with a signing certificate issued by `ca`. It serves TLS
    /// with a server certificate from the same CA, on its own thread and runtime so it
    /// answers even while the test blocks on a child process (skopeo, ctr).
    pub fn start(ca: &TestCa, options: TokenOptions) -> Result<TokenServer> {
        let server_cert: Issued = ca.issue_server("token-server")?;
        let signing = ca.issue_signing("token-signing")?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &signing.key_pkcs8_der()?,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(HarnessError::SigningKey)?;
        let x5c = base64::engine::general_purpose::STANDARD.encode(signing.cert_der()?);
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_cert.server_config()?));
        let state = Arc::new(State {
            options,
            key,
            x5c,
            rng: ring::rand::SystemRandom::new(),
            requests: Mutex::new(Vec::new()),
            refresh_tokens: Mutex::new(HashMap::new()),
        });
        let served = state.clone();
        let server = ServerThread::start("token server", Some(tls), move |request| {
            let state = served.clone();
            async move { state.handle(request).await }
        })?;
        Ok(TokenServer {
            addr: server.addr(),
            state,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The realm URL to configure in the registry (`https://HOST:PORT/token`).
    pub fn realm(&self) -> String {
        format!("https://{}/token", self.realm_host_port())
    }

    /// `HOST:PORT` of the realm (what a client connects to for tokens).
    pub fn realm_host_port(&self) -> String {
        format!("{}:{}", self.state.options.realm_host, self.addr.port())
    }

    pub fn service(&self) -> &str {
        &self.state.options.service
    }

    pub fn issuer(&self) -> &str {
        &self.state.options.issuer
    }

    /// Everything received so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.state.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }

    /// A refresh token (docker config `identitytoken`) for `user`, as if a login had
    /// asked for one.
    pub fn issue_refresh_token(&self, user: &str) -> String {
        self.state.new_refresh_token(user)
    }

    /// Mints an access token directly (for `registrytoken` tests).
    pub fn mint(&self, subject: &str, access: Vec<Access>) -> String {
        self.state.jwt(subject, &access)
    }
}

/// The outcome of one token request before it is recorded.
struct Outcome {
    status: StatusCode,
    body: serde_json::Value,
    subject: Option<String>,
    granted: Vec<Access>,
}

impl Outcome {
    fn error(status: StatusCode, message: &str) -> Outcome {
        Outcome {
            status,
            body: serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]}),
            subject: None,
            granted: Vec::new(),
        }
    }
}

impl State {
    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let query = parse_form(request.uri().query().unwrap_or(""));
        let basic = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_basic);
        let body = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                tracing::warn!("token server body: {e}");
                Bytes::new()
            }
        };
        let form = if method == "POST" {
            parse_form(&String::from_utf8_lossy(&body))
        } else {
            Vec::new()
        };

        let outcome = if path != "/token" {
            Outcome::error(StatusCode::NOT_FOUND, "no such endpoint")
        } else if method == "GET" {
            self.get_token(&query, basic.as_ref())
        } else if method == "POST" {
            self.post_token(&form)
        } else {
            Outcome::error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST")
        };

        lock(&self.requests).push(TokenRequest {
            method,
            path,
            query,
            form: form
                .into_iter()
                .map(|(k, v)| {
                    if k == "password" {
                        (k, "<redacted>".to_owned())
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            basic_user: basic.map(|(user, _)| user),
            subject: outcome.subject.clone(),
            granted: outcome.granted.clone(),
            status: outcome.status.as_u16(),
        });

        let mut response = Response::new(Full::new(Bytes::from(outcome.body.to_string())));
        *response.status_mut() = outcome.status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }

    /// GET /token: basic auth for a known user, or anonymous.
    fn get_token(&self, query: &[(String, String)], basic: Option<&(String, String)>) -> Outcome {
        let user = match basic {
            Some((name, password)) => match self.authenticate(name, password) {
                Some(user) => Some(user),
                None => return Outcome::error(StatusCode::UNAUTHORIZED, "bad credentials"),
            },
            None => None,
        };
        let offline = field(query, "offline_token") == Some("true");
        self.grant(user, &scopes(query), offline && user.is_some(), false)
    }

    /// POST /token: the OAuth2 password and refresh_token grants.
    fn post_token(&self, form: &[(String, String)]) -> Outcome {
        let user = match field(form, "grant_type") {
            Some("password") => {
                let name = field(form, "username").unwrap_or("");
                let password = field(form, "password").unwrap_or("");
                match self.authenticate(name, password) {
                    Some(user) => user,
                    None => return Outcome::error(StatusCode::UNAUTHORIZED, "bad credentials"),
                }
            }
            Some("refresh_token") => {
                let token = field(form, "refresh_token").unwrap_or("");
                let name = lock(&self.refresh_tokens).get(token).cloned();
                match name.and_then(|n| self.options.users.iter().find(|u| u.name == n)) {
                    Some(user) => user,
                    None => {
                        return Outcome::error(StatusCode::UNAUTHORIZED, "unknown refresh token")
                    }
                }
            }
            _ => return Outcome::error(StatusCode::BAD_REQUEST, "unsupported grant_type"),
        };
        // A password grant always returns a refresh token (the spec lets the server
        // decide; clients store it as their identity token). A refresh grant keeps
        // the client's token.
        let new_refresh = field(form, "grant_type") == Some("password");
        self.grant(Some(user), &scopes(form), new_refresh, true)
    }

    fn authenticate(&self, name: &str, password: &str) -> Option<&TokenUser> {
        self.options
            .users
            .iter()
            .find(|u| u.name == name && u.password == password)
    }

    fn grant(
        &self,
        user: Option<&TokenUser>,
        requested: &[Access],
        refresh: bool,
        oauth: bool,
    ) -> Outcome {
        let granted: Vec<Access> = requested
            .iter()
            .filter(|a| a.kind == "repository")
            .filter_map(|a| {
                let actions: Vec<String> = a
                    .actions
                    .iter()
                    .filter(|action| self.allowed(user, action, &a.name))
                    .cloned()
                    .collect();
                (!actions.is_empty()).then(|| Access {
                    kind: a.kind.clone(),
                    name: a.name.clone(),
                    actions,
                })
            })
            .collect();
        let subject = user.map(|u| u.name.clone()).unwrap_or_default();
        let token = self.jwt(&subject, &granted);
        let mut body = serde_json::json!({
            "access_token": token,
            "expires_in": self.options.expires_in,
        });
        if !oauth {
            body["token"] = serde_json::Value::String(token);
        } else {
            body["scope"] = serde_json::Value::String(
                requested
                    .iter()
                    .map(|a| format!("{}:{}:{}", a.kind, a.name, a.actions.join(",")))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        if refresh {
            body["refresh_token"] = serde_json::Value::String(self.new_refresh_token(&subject));
        }
        Outcome {
            status: StatusCode::OK,
            body,
            subject: Some(subject),
            granted,
        }
    }

    fn allowed(&self, user: Option<&TokenUser>, action: &str, repo: &str) -> bool {
        let patterns: &[String] = match (user, action) {
            (Some(u), "pull") => &u.pull,
            (Some(u), "push") => &u.push,
            (None, "pull") => &self.options.anonymous_pull,
            _ => &[],
        };
        patterns.iter().any(|p| matches_repo(p, repo))
    }

    fn new_refresh_token(&self, user: &str) -> String {
        let mut bytes = [0u8; 16];
        // SystemRandom fails only without an OS RNG; a fixed token still works for a test.
        let _ = self.rng.fill(&mut bytes);
        let token = format!("refresh-{}", hex::encode(bytes));
        lock(&self.refresh_tokens).insert(token.clone(), user.to_owned());
        token
    }

    /// An ES256 JWT with the signing certificate in `x5c`, which docker-registry checks
    /// against its `rootcertbundle` (our CA).
    fn jwt(&self, subject: &str, access: &[Access]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 8];
        let _ = self.rng.fill(&mut jti);
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": self.options.issuer,
            "sub": subject,
            "aud": self.options.service,
            "exp": now + self.options.expires_in,
            // A little slack for clock reads in different processes.
            "nbf": now.saturating_sub(10),
            "iat": now,
            "jti": hex::encode(jti),
            "access": access,
        });
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let signature = match self.key.sign(&self.rng, signing_input.as_bytes()) {
            Ok(sig) => b64.encode(sig.as_ref()),
            // Only a broken RNG fails here; the registry then rejects the token and the
            // test shows the 401.
            Err(_unspecified) => String::new(),
        };
        format!("{signing_input}.{signature}")
    }
}

/// `*`, `exact/name` or `prefix/*`.
fn matches_repo(pattern: &str, repo: &str) -> bool {
    pattern == "*"
        || pattern == repo
        || pattern
            .strip_suffix("/*")
            .is_some_and(|prefix| repo.starts_with(&format!("{prefix}/")))
}

/// Every `scope` value; one value may hold several space-separated scopes.
fn scopes(params: &[(String, String)]) -> Vec<Access> {
    params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' '))
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(Access {
                kind: kind.to_owned(),
                name: name.to_owned(),
                actions: actions.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

fn field<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn parse_form(text: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread poisons nothing we cannot still read.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
