//! Authentication: `WWW-Authenticate` parsing, the Basic and Bearer flows (docker's
//! token spec: GET with basic auth, POST password or refresh-token grants) and the
//! token cache, keyed by a credential fingerprint rather than the credential.

use super::credential::Credential;
use super::error::{parse_error_body, RegistryError, RetryAfter};
use super::transport::{authority, is_insecure_for, read_capped, redacted, Outgoing, Transport};
use super::Endpoint;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, StatusCode};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use url::Url;

/// Sent as `client_id` in OAuth2 grants; registries log it.
const CLIENT_ID: &str = "cri-imaged";
/// Docker's token spec: a token without `expires_in` lives 60 s.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Token responses are small JSON documents; anything bigger is not one.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// One recognised challenge from `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic {
        realm: Option<String>,
    },
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses every `WWW-Authenticate` value into the challenges we understand (Basic,
/// and Bearer with a realm); other schemes are skipped.
pub fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut out = Vec::new();
    for value in values {
        for (scheme, params) in parse_header(value) {
            if scheme.eq_ignore_ascii_case("basic") {
                out.push(Challenge::Basic {
                    realm: params.get("realm").cloned(),
                });
            } else if scheme.eq_ignore_ascii_case("bearer") {
                match params.get("realm") {
                    Some(realm) if !realm.is_empty() => out.push(Challenge::Bearer {
                        realm: realm.clone(),
                        service: params.get("service").cloned(),
                        scope: params.get("scope").cloned(),
                    }),
                    _ => tracing::debug!("ignoring Bearer challenge without a realm"),
                }
            }
        }
    }
    out
}

/// RFC 9110 11.6.1: `scheme [auth-param *("," auth-param)]`, challenges separated by
/// commas too; a token not followed by `=` starts the next challenge.
fn parse_header(value: &str) -> Vec<(String, HashMap<String, String>)> {
    let mut p = Parser {
        s: value.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip(b" \t,");
        let scheme = p.token();
        if scheme.is_empty() {
            break;
        }
        let mut params = HashMap::new();
        loop {
            let save = p.i;
            p.skip(b" \t,");
            let name = p.token();
            p.skip(b" \t");
            if name.is_empty() || !p.eat(b'=') {
                p.i = save;
                break;
            }
            p.skip(b" \t");
            let value = if p.eat(b'"') { p.quoted() } else { p.token() };
            params.insert(name.to_ascii_lowercase(), value);
        }
        // A token68 (`Negotiate abc==`) or junk: step over it so parsing goes on.
        p.skip(b" \t");
        if p.i < p.s.len() && p.s[p.i] != b',' {
            let _ = p.token();
            while p.eat(b'=') {}
        }
        out.push((scheme, params));
    }
    out
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip(&mut self, set: &[u8]) {
        while self.i < self.s.len() && set.contains(&self.s[self.i]) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// A `tchar` run (RFC 9110 5.6.2).
    fn token(&mut self) -> String {
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric()
                || b"!#$%&'*+-.^_`|~/:".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    /// The rest of a quoted string after its opening quote, unescaping `\x`.
    fn quoted(&mut self) -> String {
        let mut out = Vec::new();
        while self.i < self.s.len() {
            let b = self.s[self.i];
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' if self.i < self.s.len() => {
                    out.push(self.s[self.i]);
                    self.i += 1;
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    host: String,
    repository: String,
    /// `Credential::fingerprint`, or empty for anonymous tokens.
    fingerprint: String,
}

struct CachedToken {
    header: HeaderValue,
    expires: Instant,
}

/// How the `Authorization` of a request was obtained, to know what to undo on a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthSource {
    None,
    CachedToken,
    FreshToken,
    Basic,
    RegistryToken,
}

/// Where credentials for a token realm on another host come from (delegated auth,
/// seed 004 §5.4.2.3: the registry hands authentication to a separate service, and
/// the pull secret names that service's host).
pub trait RealmCredentials: Send + Sync + fmt::Debug {
    /// Credentials for the realm at `realm_host` (`host[:port]`), in the order to try.
    /// Empty when none are configured: the registry's credential is used then.
    fn for_realm(&self, realm_host: &str) -> Vec<RealmCredential>;
}

/// One credential for a token realm. `label` says where it came from, for the log
/// (a key and a file, never the secret).
#[derive(Debug, Clone)]
pub struct RealmCredential {
    pub label: String,
    pub credential: Credential,
}

/// Remembers challenges per host and tokens per (host, repository, credential).
#[derive(Default)]
pub(crate) struct Authenticator {
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
    challenges: Mutex<HashMap<String, Challenge>>,
    realm_credentials: Option<Arc<dyn RealmCredentials>>,
}

impl Authenticator {
    pub fn new(realm_credentials: Option<Arc<dyn RealmCredentials>>) -> Self {
        Authenticator {
            realm_credentials,
            ..Authenticator::default()
        }
    }

    /// The `Authorization` to send on a first request, without a 401 round trip when
    /// we already know what the host wants.
    pub async fn initial(
        &self,
        transport: &Transport,
        endpoint: &Endpoint,
        repository: &str,
        credential: Option<&Credential>,
    ) -> Result<(Option<HeaderValue>, AuthSource), RegistryError> {
        if let Some(Credential::RegistryToken(token)) = credential {
            return Ok((
                Some(bearer_header(&endpoint.host, token)?),
                AuthSource::RegistryToken,
            ));
        }
        let key = token_key(endpoint, repository, credential);
        if let Some(header) = self.cached(&key) {
            return Ok((Some(header), AuthSource::CachedToken));
        }
        let known = self
            .challenges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&endpoint.host)
            .cloned();
        let Some(challenge) = known else {
            return Ok((None, AuthSource::None));
        };
        match self
            .answer(transport, endpoint, repository, credential, &challenge)
            .await
        {
            Ok(answer) => Ok(answer),
            Err(e) => {
                // The registry may have changed how it authenticates (another token
                // service, none at all): forget what it asked before and let its
                // answer to a plain request say what it wants now.
                tracing::debug!(host = %endpoint.host, error = %e, "the remembered challenge could not be answered; asking the registry afresh");
                self.challenges
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&endpoint.host);
                Ok((None, AuthSource::None))
            }
        }
    }

    /// Answers a 401: drops a token that stopped working and obtains what the
    /// challenge asks for. `Ok(None)` means there is nothing more we can try.
    pub async fn after_unauthorized(
        &self,
        transport: &Transport,
        endpoint: &Endpoint,
        repository: &str,
        credential: Option<&Credential>,
        used: AuthSource,
        response_headers: &HeaderMap,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let key = token_key(endpoint, repository, credential);
        if matches!(used, AuthSource::CachedToken | AuthSource::FreshToken) {
            self.tokens
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
        }
        if used == AuthSource::RegistryToken {
            return Ok(None);
        }
        let challenges = parse_challenges(
            response_headers
                .get_all(http::header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        // Bearer first: a registry offering both prefers tokens.
        let Some(challenge) = challenges
            .iter()
            .find(|c| matches!(c, Challenge::Bearer { .. }))
            .or_else(|| challenges.first())
            .cloned()
        else {
            return Ok(None);
        };
        self.challenges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(endpoint.host.clone(), challenge.clone());
        let (header, _) = self
            .answer(transport, endpoint, repository, credential, &challenge)
            .await?;
        Ok(header)
    }

    async fn answer(
        &self,
        transport: &Transport,
        endpoint: &Endpoint,
        repository: &str,
        credential: Option<&Credential>,
        challenge: &Challenge,
    ) -> Result<(Option<HeaderValue>, AuthSource), RegistryError> {
        match challenge {
            Challenge::Basic { .. } => match credential {
                Some(Credential::Basic { username, password }) => Ok((
                    Some(basic_header(&endpoint.host, username, password)?),
                    AuthSource::Basic,
                )),
                _ => Ok((None, AuthSource::None)),
            },
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let request = TokenRequest {
                    realm,
                    service: service.as_deref(),
                    challenge_scope: scope.as_deref(),
                    repository,
                };
                let (token, lifetime) = fetch_token(
                    transport,
                    endpoint,
                    &request,
                    credential,
                    self.realm_credentials.as_deref(),
                )
                .await?;
                let header = bearer_header(&endpoint.host, &token)?;
                // Renew a little early so a token does not expire on its way.
                let margin = (lifetime / 10).min(Duration::from_secs(30));
                self.tokens
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        token_key(endpoint, repository, credential),
                        CachedToken {
                            header: header.clone(),
                            expires: Instant::now() + lifetime - margin,
                        },
                    );
                Ok((Some(header), AuthSource::FreshToken))
            }
        }
    }

    fn cached(&self, key: &TokenKey) -> Option<HeaderValue> {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        match tokens.get(key) {
            Some(t) if t.expires > Instant::now() => Some(t.header.clone()),
            Some(_) => {
                tokens.remove(key);
                None
            }
            None => None,
        }
    }
}

fn token_key(endpoint: &Endpoint, repository: &str, credential: Option<&Credential>) -> TokenKey {
    TokenKey {
        host: endpoint.host.clone(),
        repository: repository.to_string(),
        fingerprint: credential.map(Credential::fingerprint).unwrap_or_default(),
    }
}

fn bearer_header(host: &str, token: &str) -> Result<HeaderValue, RegistryError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        RegistryError::BadResponse {
            // The error would only repeat the value, which holds the token.
            host: host.to_string(),
            detail: "bearer token holds characters not allowed in a header".into(),
        }
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn basic_header(host: &str, username: &str, password: &str) -> Result<HeaderValue, RegistryError> {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    // Base64 output is always a valid header value.
    let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
        RegistryError::BadResponse {
            host: host.to_string(),
            detail: "basic credential does not fit a header".into(),
        }
    })?;
    v.set_sensitive(true);
    Ok(v)
}

struct TokenRequest<'a> {
    realm: &'a str,
    service: Option<&'a str>,
    challenge_scope: Option<&'a str>,
    repository: &'a str,
}

impl TokenRequest<'_> {
    /// Our pull scope, plus the challenge's own when it names something else.
    fn scopes(&self) -> Vec<String> {
        let ours = format!("repository:{}:pull", self.repository);
        let mut scopes = vec![ours.clone()];
        if let Some(s) = self.challenge_scope {
            if !s.is_empty() && s != ours {
                scopes.push(s.to_string());
            }
        }
        scopes
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    /// In the token server's clock; we time expiry from receipt on our monotonic
    /// clock instead, so clock skew cannot make a token look fresh or stale.
    #[serde(default)]
    issued_at: Option<String>,
}

/// Obtains a bearer token for pulling `repository`. The realm may live on another
/// host (delegated auth): then credentials configured for the realm's host are
/// presented, each in turn until the realm accepts one, and the candidate's own
/// credential after them. The anonymous candidate gets them too: a node whose only
/// credential is keyed by the token realm's host (seed 004's delegated auth) pulls
/// with it — that is what configuring it asks for.
async fn fetch_token(
    transport: &Transport,
    endpoint: &Endpoint,
    request: &TokenRequest<'_>,
    credential: Option<&Credential>,
    realm_credentials: Option<&dyn RealmCredentials>,
) -> Result<(String, Duration), RegistryError> {
    // The realm comes from the registry's challenge: a bad one is the registry's fault.
    let realm = Url::parse(request.realm).map_err(|e| RegistryError::BadResponse {
        host: endpoint.host.clone(),
        detail: format!("token realm {:?} is not a URL: {e}", request.realm),
    })?;
    let realm_host = authority(&realm);
    let delegated = match realm_credentials {
        Some(lookup) if realm_host != endpoint.host => lookup.for_realm(&realm_host),
        _ => Vec::new(),
    };
    let mut refused = None;
    for found in &delegated {
        match fetch_token_as(
            transport,
            endpoint,
            &realm,
            request,
            Some(&found.credential),
        )
        .await
        {
            Err(e) if e.is_auth_failure() => {
                tracing::info!(realm = %realm_host, credential = %found.label, "token realm refused its credential; trying the next one");
                refused = Some(e);
            }
            Ok(token) => {
                tracing::debug!(realm = %realm_host, credential = %found.label, "token obtained with the realm host's credential");
                return Ok(token);
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = refused {
        // Presenting the same credential twice would only be refused twice.
        if delegated.iter().any(|d| Some(&d.credential) == credential) {
            return Err(e);
        }
        tracing::info!(realm = %realm_host, "token realm refused the realm host's credentials; trying the registry's own");
    }
    fetch_token_as(transport, endpoint, &realm, request, credential).await
}

#[tracing::instrument(skip(transport, endpoint, realm, request, credential), fields(host = %endpoint.host, repository = request.repository, kind = credential.map(Credential::kind).unwrap_or("anonymous")))]
async fn fetch_token_as(
    transport: &Transport,
    endpoint: &Endpoint,
    realm: &Url,
    request: &TokenRequest<'_>,
    credential: Option<&Credential>,
) -> Result<(String, Duration), RegistryError> {
    // Plain HTTP only on the insecure registry's own host: credentials go in this
    // request, and another host has not been configured insecure.
    if realm.scheme() != "https" && !(realm.scheme() == "http" && is_insecure_for(endpoint, realm))
    {
        return Err(RegistryError::InsecureUrl {
            host: endpoint.host.clone(),
            url: redacted(realm),
        });
    }
    let scopes = request.scopes();
    let (status, headers, body) = match credential {
        Some(Credential::IdentityToken { token, .. }) => {
            let form = token_form(
                request,
                &scopes,
                &[("grant_type", "refresh_token"), ("refresh_token", token)],
            );
            post_form(transport, endpoint, realm, form).await?
        }
        Some(Credential::Basic { username, password }) => {
            let auth = basic_header(&endpoint.host, username, password)?;
            let got = get_token(transport, endpoint, realm, request, &scopes, Some(auth)).await?;
            if matches!(
                got.0,
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
            ) {
                // Docker's OAuth2 variant of the token spec: some servers only take POST.
                tracing::debug!(
                    status = got.0.as_u16(),
                    "token GET refused; trying the password grant"
                );
                let form = token_form(
                    request,
                    &scopes,
                    &[
                        ("grant_type", "password"),
                        ("username", username),
                        ("password", password),
                    ],
                );
                post_form(transport, endpoint, realm, form).await?
            } else {
                got
            }
        }
        // A RegistryToken never reaches here: it is sent as is.
        Some(Credential::RegistryToken(_)) | None => {
            get_token(transport, endpoint, realm, request, &scopes, None).await?
        }
    };
    let realm_host = authority(realm);
    if !status.is_success() {
        return Err(token_error(endpoint, &realm_host, status, &headers, &body));
    }
    let parsed: TokenResponse =
        serde_json::from_slice(&body).map_err(|e| RegistryError::BadResponse {
            host: realm_host.clone(),
            detail: format!("token response is not the expected JSON: {e}"),
        })?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| RegistryError::BadResponse {
            host: realm_host.clone(),
            detail: "token response holds neither token nor access_token".into(),
        })?;
    let lifetime = match parsed.expires_in {
        Some(s) if s > 0 => Duration::from_secs(s),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    tracing::debug!(realm = %realm_host, lifetime_s = lifetime.as_secs(), issued_at = parsed.issued_at.as_deref().unwrap_or(""), "obtained bearer token");
    Ok((token, lifetime))
}

fn token_form(request: &TokenRequest<'_>, scopes: &[String], grant: &[(&str, &str)]) -> Bytes {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in grant {
        form.append_pair(k, v);
    }
    if let Some(service) = request.service {
        form.append_pair("service", service);
    }
    for scope in scopes {
        form.append_pair("scope", scope);
    }
    form.append_pair("client_id", CLIENT_ID);
    Bytes::from(form.finish())
}

type TokenAnswer = (StatusCode, HeaderMap, Bytes);

async fn get_token(
    transport: &Transport,
    endpoint: &Endpoint,
    realm: &Url,
    request: &TokenRequest<'_>,
    scopes: &[String],
    authorization: Option<HeaderValue>,
) -> Result<TokenAnswer, RegistryError> {
    let mut url = realm.clone();
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = request.service {
            q.append_pair("service", service);
        }
        for scope in scopes {
            q.append_pair("scope", scope);
        }
    }
    let req = Outgoing::get(HeaderMap::new(), authorization);
    token_round_trip(transport, endpoint, url, &req).await
}

async fn post_form(
    transport: &Transport,
    endpoint: &Endpoint,
    realm: &Url,
    form: Bytes,
) -> Result<TokenAnswer, RegistryError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    let req = Outgoing {
        method: Method::POST,
        headers,
        body: form,
        authorization: None,
    };
    token_round_trip(transport, endpoint, realm.clone(), &req).await
}

async fn token_round_trip(
    transport: &Transport,
    endpoint: &Endpoint,
    url: Url,
    req: &Outgoing,
) -> Result<TokenAnswer, RegistryError> {
    let host = authority(&url);
    let response = transport.send(endpoint, url, req).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let (bytes, truncated) = read_capped(
        &mut body,
        MAX_TOKEN_RESPONSE,
        transport.idle_timeout(),
        &host,
    )
    .await?;
    if truncated && status.is_success() {
        return Err(RegistryError::BadResponse {
            host,
            detail: format!("token response exceeds {MAX_TOKEN_RESPONSE} bytes"),
        });
    }
    Ok((status, headers, bytes))
}

fn token_error(
    endpoint: &Endpoint,
    realm_host: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> RegistryError {
    let messages = parse_error_body(body)
        .into_iter()
        .map(|m| format!("{} ({})", m.message, m.code))
        .collect::<Vec<_>>()
        .join("; ");
    let detail = if messages.is_empty() {
        format!("token endpoint {realm_host} answered {status}")
    } else {
        format!("token endpoint {realm_host} answered {status}: {messages}")
    };
    let host = endpoint.host.clone();
    match status {
        StatusCode::UNAUTHORIZED => RegistryError::Unauthorized { host, detail },
        StatusCode::FORBIDDEN => RegistryError::Denied { host, detail },
        StatusCode::TOO_MANY_REQUESTS => RegistryError::TooManyRequests {
            host,
            retry_after: RetryAfter::from_headers(headers),
        },
        s if s.is_server_error() => RegistryError::Server {
            host,
            status: s.as_u16(),
            code: None,
            detail,
        },
        _ => RegistryError::BadResponse { host, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Fuzzing on the stable toolchain (more cases by hand: PROPTEST_CASES).
        #[test]
        fn any_www_authenticate_parses_without_panicking(
            values in proptest::collection::vec(r#"(Bearer|Basic|bearer|x)? ?([a-z]{0,6}="?[ -~]{0,20}"?,? ?){0,4}|\PC{0,60}"#, 0..3)
        ) {
            let _ = parse_challenges(values.iter().map(String::as_str));
        }
    }

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Challenge {
        Challenge::Bearer {
            realm: realm.into(),
            service: service.map(Into::into),
            scope: scope.map(Into::into),
        }
    }

    #[test]
    fn parses_challenge_table() {
        let table: Vec<(&str, Vec<Challenge>)> = vec![
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
                vec![bearer(
                    "https://auth.docker.io/token",
                    Some("registry.docker.io"),
                    Some("repository:library/busybox:pull"),
                )],
            ),
            (
                r#"Basic realm="Registry Realm""#,
                vec![Challenge::Basic {
                    realm: Some("Registry Realm".into()),
                }],
            ),
            // Quoted values may hold commas (several actions in one scope).
            (
                r#"Bearer realm="https://a/t", scope="repository:x/y:pull,push", service="s""#,
                vec![bearer(
                    "https://a/t",
                    Some("s"),
                    Some("repository:x/y:pull,push"),
                )],
            ),
            // Case-insensitive scheme and parameter names, spaces around '='.
            (
                r#"bearer Realm = "https://a/t" , Service=s"#,
                vec![bearer("https://a/t", Some("s"), None)],
            ),
            // Two challenges in one header value.
            (
                r#"Bearer realm="https://a/t",service="s", Basic realm="r""#,
                vec![
                    bearer("https://a/t", Some("s"), None),
                    Challenge::Basic {
                        realm: Some("r".into()),
                    },
                ],
            ),
            // Unknown schemes and token68 are skipped; what follows is still read.
            (
                r#"Negotiate abc123==, Basic realm="r""#,
                vec![Challenge::Basic {
                    realm: Some("r".into()),
                }],
            ),
            // Escaped quote inside a quoted string.
            (
                r#"Basic realm="say \"hi\"""#,
                vec![Challenge::Basic {
                    realm: Some("say \"hi\"".into()),
                }],
            ),
            // A Bearer challenge without a realm cannot be answered.
            (r#"Bearer service="s""#, vec![]),
            ("Basic", vec![Challenge::Basic { realm: None }]),
            ("", vec![]),
        ];
        for (header, want) in table {
            assert_eq!(parse_challenges([header]), want, "header: {header}");
        }
    }

    #[test]
    fn scopes_add_the_challenge_scope_once() {
        let r = TokenRequest {
            realm: "https://a/t",
            service: None,
            challenge_scope: Some("repository:x:pull"),
            repository: "x",
        };
        assert_eq!(r.scopes(), vec!["repository:x:pull".to_string()]);
        let r = TokenRequest {
            challenge_scope: Some("repository:other:pull"),
            ..r
        };
        assert_eq!(r.scopes().len(), 2);
    }

    use crate::registry::fake::{self, Fake, Seen};
    use crate::registry::{Credential, RegistryClient};
    use std::sync::{Arc, Mutex};

    fn alice() -> Credential {
        Credential::Basic {
            username: "alice".into(),
            password: "s3cret".into(),
        }
    }

    fn basic_of(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    /// A token server (its own port, i.e. another host: delegated auth) and a
    /// registry that wants its tokens. The registry accepts only the token in
    /// `valid`, which the token server sets to each token it issues. The registry is
    /// insecure plain HTTP; the token server, on another host, speaks TLS with a
    /// certificate only `client()` trusts.
    struct Delegated {
        token: Fake,
        registry: Fake,
        valid: Arc<Mutex<String>>,
        cert: fake::TestCert,
        tmp: tempfile::TempDir,
    }

    impl Delegated {
        /// A client trusting the token server's certificate.
        fn client(&self) -> RegistryClient {
            fake::client_trusting(self.tmp.path(), &self.cert, &[&self.token])
        }

        /// The same, with realm credentials.
        fn client_with_realm(&self, table: Vec<(String, RealmCredential)>) -> RegistryClient {
            RegistryClient::new(crate::registry::ClientSettings {
                realm_credentials: Some(Arc::new(RealmTable(table))),
                ca_dir: Some(fake::trust(self.tmp.path(), &self.cert, &[&self.token])),
                ..fake::settings()
            })
            .unwrap()
        }

        async fn start(allow_get: bool) -> Delegated {
            let tmp = tempfile::tempdir().unwrap();
            let cert = fake::TestCert::generate(tmp.path());
            let valid: Arc<Mutex<String>> = Arc::default();
            let issued = Arc::new(Mutex::new(0u32));
            let v = valid.clone();
            let token = Fake::start_tls(&cert, move |seen: &Seen| {
                let body = String::from_utf8_lossy(&seen.body).into_owned();
                let ok = match (seen.method.as_str(), seen.authorization()) {
                    ("GET", _) if !allow_get => return fake::reply(405, ""),
                    ("GET", Some(a)) => a == basic_of("alice", "s3cret"),
                    ("GET", None) => true,
                    ("POST", _) => {
                        body.contains("grant_type=refresh_token&refresh_token=rt-1")
                            || body.contains("grant_type=password&username=alice&password=s3cret")
                    }
                    _ => false,
                };
                if !ok {
                    return fake::error_reply(401, "UNAUTHORIZED", "bad credentials");
                }
                let mut n = issued.lock().unwrap();
                *n += 1;
                let tok = format!("tok-{n}");
                *v.lock().unwrap() = tok.clone();
                // Both spellings occur in the wild; alternate to cover them.
                let field = if *n % 2 == 1 { "token" } else { "access_token" };
                fake::reply(200, format!(r#"{{"{field}":"{tok}","expires_in":300}}"#))
            })
            .await;
            let realm = format!("https://{}/token", token.host());
            let v = valid.clone();
            let registry = Fake::start(move |seen: &Seen| {
                let want = format!("Bearer {}", v.lock().unwrap());
                if seen.authorization() == Some(want.as_str()) {
                    return fake::serve_image(seen);
                }
                fake::with_header(
                    fake::error_reply(401, "UNAUTHORIZED", "authentication required"),
                    "www-authenticate",
                    &format!(
                        r#"Bearer realm="{realm}",service="fake",scope="repository:app:pull""#
                    ),
                )
            })
            .await;
            Delegated {
                token,
                registry,
                valid,
                cert,
                tmp,
            }
        }
    }

    async fn pull(
        client: &RegistryClient,
        d: &Delegated,
        credential: Option<&Credential>,
    ) -> Result<(), RegistryError> {
        let endpoint = fake::insecure(&d.registry);
        client
            .fetch_manifest(&endpoint, "app", "v1", credential)
            .await?;
        let blob = client
            .fetch_blob(&endpoint, "app", &fake::layer(), 0, credential)
            .await?;
        assert_eq!(fake::collect(blob).await?, fake::LAYER);
        Ok(())
    }

    #[tokio::test]
    async fn bearer_token_fetched_with_basic_auth_and_cached() {
        let d = Delegated::start(true).await;
        pull(&d.client(), &d, Some(&alice())).await.unwrap();
        let token_requests = d.token.seen();
        assert_eq!(
            token_requests.len(),
            1,
            "the token cache saves a second round trip"
        );
        let t = &token_requests[0];
        assert_eq!(t.method, Method::GET);
        assert_eq!(
            t.authorization(),
            Some(basic_of("alice", "s3cret").as_str())
        );
        assert!(t.target.contains("service=fake"), "{}", t.target);
        assert!(
            t.target.contains("scope=repository%3Aapp%3Apull"),
            "{}",
            t.target
        );
        // Anonymous try, then the manifest with the token, then the blob with it.
        let seen = d.registry.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].authorization(), None);
        assert_eq!(seen[2].authorization(), Some("Bearer tok-1"));
    }

    #[tokio::test]
    async fn identity_token_uses_the_refresh_token_grant() {
        let d = Delegated::start(true).await;
        let cred = Credential::IdentityToken {
            username: "<token>".into(),
            token: "rt-1".into(),
        };
        pull(&d.client(), &d, Some(&cred)).await.unwrap();
        let t = &d.token.seen()[0];
        assert_eq!(t.method, Method::POST);
        assert_eq!(
            t.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        let body = String::from_utf8_lossy(&t.body);
        for part in [
            "grant_type=refresh_token",
            "refresh_token=rt-1",
            "service=fake",
            "scope=repository%3Aapp%3Apull",
            "client_id=cri-imaged",
        ] {
            assert!(body.contains(part), "{part} missing from {body}");
        }
    }

    #[tokio::test]
    async fn password_grant_when_token_get_is_refused() {
        let d = Delegated::start(false).await;
        pull(&d.client(), &d, Some(&alice())).await.unwrap();
        let methods: Vec<Method> = d.token.seen().iter().map(|s| s.method.clone()).collect();
        assert_eq!(methods, vec![Method::GET, Method::POST]);
    }

    #[tokio::test]
    async fn anonymous_token_has_no_authorization() {
        let d = Delegated::start(true).await;
        pull(&d.client(), &d, None).await.unwrap();
        assert_eq!(d.token.seen()[0].authorization(), None);
    }

    #[tokio::test]
    async fn registry_token_is_sent_without_a_challenge_round() {
        let d = Delegated::start(true).await;
        *d.valid.lock().unwrap() = "given-token".into();
        let cred = Credential::RegistryToken("given-token".into());
        pull(&d.client(), &d, Some(&cred)).await.unwrap();
        assert!(d.token.seen().is_empty());
        assert_eq!(d.registry.seen().len(), 2);
    }

    #[tokio::test]
    async fn revoked_cached_token_is_dropped_and_renewed_once() {
        let d = Delegated::start(true).await;
        let client = d.client();
        pull(&client, &d, Some(&alice())).await.unwrap();
        *d.valid.lock().unwrap() = "revoked".into();
        pull(&client, &d, Some(&alice())).await.unwrap();
        assert_eq!(d.token.seen().len(), 2);
    }

    #[tokio::test]
    async fn wrong_password_is_unauthorized_without_the_secret() {
        let d = Delegated::start(true).await;
        let cred = Credential::Basic {
            username: "alice".into(),
            password: "wrong-pw".into(),
        };
        let err = pull(&d.client(), &d, Some(&cred)).await.unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("wrong-pw"), "{text}");
        assert!(text.contains(&d.registry.host()), "{text}");
    }

    /// Realm credentials by realm host, as the keyring would give them.
    #[derive(Debug)]
    struct RealmTable(Vec<(String, RealmCredential)>);

    impl RealmCredentials for RealmTable {
        fn for_realm(&self, realm_host: &str) -> Vec<RealmCredential> {
            self.0
                .iter()
                .filter(|(host, _)| host == realm_host)
                .map(|(_, c)| c.clone())
                .collect()
        }
    }

    fn realm_cred(label: &str, user: &str, pass: &str) -> RealmCredential {
        RealmCredential {
            label: label.into(),
            credential: Credential::Basic {
                username: user.into(),
                password: pass.into(),
            },
        }
    }

    #[tokio::test]
    async fn delegated_realm_gets_the_realm_hosts_credentials_in_order() {
        let d = Delegated::start(true).await;
        let realm = d.token.host();
        let client = d.client_with_realm(vec![
            (realm.clone(), realm_cred("wrong", "alice", "nope")),
            (realm.clone(), realm_cred("right", "alice", "s3cret")),
            ("elsewhere:1".into(), realm_cred("other", "mallory", "x")),
        ]);
        // The registry's own credential (here: none) is not what reaches the realm.
        let registry_cred = Credential::Basic {
            username: "registry-user".into(),
            password: "registry-pw".into(),
        };
        pull(&client, &d, Some(&registry_cred)).await.unwrap();
        let auths: Vec<Option<String>> = d
            .token
            .seen()
            .iter()
            .map(|s| s.authorization().map(str::to_string))
            .collect();
        assert_eq!(
            auths,
            vec![
                Some(basic_of("alice", "nope")),
                Some(basic_of("alice", "s3cret"))
            ]
        );
    }

    #[tokio::test]
    async fn anonymous_candidate_uses_the_realm_hosts_credentials() {
        let d = Delegated::start(true).await;
        let client = d.client_with_realm(vec![(
            d.token.host(),
            realm_cred("right", "alice", "s3cret"),
        )]);
        pull(&client, &d, None).await.unwrap();
        let seen = d.token.seen();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].authorization().is_some());
    }

    #[tokio::test]
    async fn refused_realm_credentials_fall_back_to_the_candidates_own() {
        let d = Delegated::start(true).await;
        let client =
            d.client_with_realm(vec![(d.token.host(), realm_cred("stale", "alice", "nope"))]);
        pull(&client, &d, Some(&alice())).await.unwrap();
        let auths: Vec<Option<String>> = d
            .token
            .seen()
            .iter()
            .map(|s| s.authorization().map(str::to_string))
            .collect();
        assert_eq!(
            auths,
            vec![
                Some(basic_of("alice", "nope")),
                Some(basic_of("alice", "s3cret"))
            ]
        );
    }

    #[tokio::test]
    async fn without_realm_credentials_the_registrys_go_to_the_realm() {
        let d = Delegated::start(true).await;
        let client = d.client_with_realm(vec![(
            "not-the-realm:443".into(),
            realm_cred("other", "mallory", "x"),
        )]);
        pull(&client, &d, Some(&alice())).await.unwrap();
        assert_eq!(
            d.token.seen()[0].authorization(),
            Some(basic_of("alice", "s3cret").as_str())
        );
    }

    #[tokio::test]
    async fn basic_challenge_gets_basic_credentials() {
        let want = basic_of("alice", "s3cret");
        let registry = Fake::start(move |seen: &Seen| {
            if seen.authorization() == Some(want.as_str()) {
                return fake::serve_image(seen);
            }
            fake::with_header(
                fake::error_reply(401, "UNAUTHORIZED", "login please"),
                "www-authenticate",
                r#"Basic realm="fake""#,
            )
        })
        .await;
        let client = fake::client();
        let endpoint = fake::insecure(&registry);
        client
            .fetch_manifest(&endpoint, "app", "v1", Some(&alice()))
            .await
            .unwrap();
        // The host is known to want Basic now: no second 401 round.
        client
            .fetch_manifest(&endpoint, "app", "v1", Some(&alice()))
            .await
            .unwrap();
        assert_eq!(registry.seen().len(), 3);
        let err = client
            .fetch_manifest(&endpoint, "app", "v1", None)
            .await
            .unwrap_err();
        match err {
            RegistryError::Unauthorized { host, detail } => {
                assert_eq!(host, registry.host());
                assert!(detail.contains("login please"), "{detail}");
            }
            other => panic!("want Unauthorized, got {other}"),
        }
    }

    #[tokio::test]
    async fn realm_on_another_host_gets_no_insecure_trust() {
        // Insecure registry, token realm elsewhere with a self-signed certificate.
        let d = Delegated::start(true).await;
        let err = pull(&fake::client(), &d, Some(&alice())).await.unwrap_err();
        assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("certificate"), "{err}");
        assert!(d.token.seen().is_empty(), "the realm got a request");
    }

    /// A registry answering 401 with a Bearer challenge whose realm is `realm(host)`,
    /// `host` being the one the request was sent to.
    fn challenging(
        realm: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> impl Fn(&Seen) -> fake::Reply + Send + Sync + 'static {
        move |seen: &Seen| {
            let host = seen.authority().unwrap_or_default();
            fake::with_header(
                fake::error_reply(401, "UNAUTHORIZED", "authentication required"),
                "www-authenticate",
                &format!(r#"Bearer realm="{}",service="fake""#, realm(host)),
            )
        }
    }

    #[tokio::test]
    async fn plain_http_realm_on_another_host_is_refused_for_insecure_registry() {
        let token = Fake::start(|_: &Seen| fake::reply(200, r#"{"token":"t"}"#)).await;
        let realm = format!("http://{}/token", token.host());
        let registry = Fake::start(challenging(move |_| realm.clone())).await;
        let err = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "app", "v1", Some(&alice()))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::InsecureUrl { .. }), "{err}");
        assert!(token.seen().is_empty(), "the realm got the credential");
    }

    /// A registry serving its own token realm at `/token` (Basic alice:s3cret) and
    /// the image to holders of that token.
    fn self_served(scheme: &'static str) -> impl Fn(&Seen) -> fake::Reply + Send + Sync + 'static {
        let challenge = challenging(move |host| format!("{scheme}://{host}/token"));
        move |seen: &Seen| {
            if seen.path() == "/token" {
                if seen.authorization() == Some(basic_of("alice", "s3cret").as_str()) {
                    return fake::reply(200, r#"{"token":"own"}"#);
                }
                return fake::reply(401, "");
            }
            if seen.authorization() == Some("Bearer own") {
                return fake::serve_image(seen);
            }
            challenge(seen)
        }
    }

    #[tokio::test]
    async fn realm_on_the_insecure_registrys_own_host_keeps_working() {
        let plain = Fake::start(self_served("http")).await;
        fake::client()
            .fetch_manifest(&fake::insecure(&plain), "app", "v1", Some(&alice()))
            .await
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        let self_signed = Fake::start_tls(&cert, self_served("https")).await;
        fake::client()
            .fetch_manifest(&fake::insecure(&self_signed), "app", "v1", Some(&alice()))
            .await
            .unwrap();
        assert!(self_signed.seen().iter().any(|s| s.path() == "/token"));
    }

    #[tokio::test]
    async fn token_grant_is_not_replayed_to_another_host() {
        let tmp = tempfile::tempdir().unwrap();
        let cert = fake::TestCert::generate(tmp.path());
        // A host the client trusts: only the redirect rule can keep the grant from it.
        let elsewhere =
            Fake::start_tls(&cert, |_: &Seen| fake::reply(200, r#"{"token":"t"}"#)).await;
        let location = format!("https://{}/token", elsewhere.host());
        let challenge = challenging(|host| format!("http://{host}/token"));
        let registry = Fake::start(move |seen: &Seen| {
            if seen.path() == "/token" {
                return fake::with_header(fake::reply(307, ""), "location", &location);
            }
            challenge(seen)
        })
        .await;
        let cred = Credential::IdentityToken {
            username: "<token>".into(),
            token: "rt-secret".into(),
        };
        let err = fake::client_trusting(tmp.path(), &cert, &[&elsewhere])
            .fetch_manifest(&fake::insecure(&registry), "app", "v1", Some(&cred))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::BadResponse { .. }), "{err}");
        let text = format!("{err} {err:?}");
        assert!(text.contains(&elsewhere.host()), "{text}");
        assert!(!text.contains("rt-secret"), "{text}");
        assert!(
            elsewhere.seen().is_empty(),
            "the grant reached another host"
        );
        let posts = registry
            .seen()
            .into_iter()
            .filter(|s| s.method == Method::POST)
            .count();
        assert_eq!(posts, 1);
    }

    #[tokio::test]
    async fn realm_that_is_not_a_url_is_a_bad_response() {
        let registry = Fake::start(challenging(|_| "not a url".into())).await;
        let err = fake::client()
            .fetch_manifest(&fake::insecure(&registry), "app", "v1", None)
            .await
            .unwrap_err();
        match err {
            RegistryError::BadResponse { host, detail } => {
                assert_eq!(host, registry.host());
                assert!(detail.contains("is not a URL"), "{detail}");
            }
            other => panic!("want BadResponse, got {other}"),
        }
    }
}
