//! Which credentials to try for a pull, in order.
//!
//! Sources, merged into one [`Keyring`] and tried in this order:
//! 1. the PullImageRequest's `AuthConfig` (kubelet's match from imagePullSecrets);
//! 2. node files ([`files`]: kubelet's config.json / .dockercfg search paths and the
//!    configured `files`) and 3. mounted pull-secret directories — together, every
//!    matching key in the matcher's order, each key's credentials in source order;
//! 4. credential providers, matched and ordered the same way among themselves;
//! 5. anonymous, last.
//!
//! Lookups are for the host and repository actually contacted (a mirror's, not the
//! image's), and the candidate that last worked for a repository is tried first.

pub mod dockerconfig;
pub mod files;
pub mod matcher;
pub mod provider;

use crate::reference::Reference;
use crate::registry::{Credential, RealmCredential, RealmCredentials};
use base64::Engine as _;
use files::{FileKeyring, FileSettings};
use matcher::{AuthKey, ImageLocation, Matching};
use provider::{ProvidedAuth, Providers};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the pull request's auth field is not base64 of \"username:password\"")]
    MalformedAuthField,
}

/// The CRI `AuthConfig` of a pull request. `Debug` shows only which fields are set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RequestAuth {
    pub username: String,
    pub password: String,
    pub auth: String,
    pub server_address: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl fmt::Debug for RequestAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_auth_fields(
            f,
            "RequestAuth",
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

/// `Debug` for the six fields of a CRI `AuthConfig` (ours or the proto's), in the
/// proto's order: username, password, auth, server_address, identity_token,
/// registry_token. The username and server address show as they are; each secret
/// only as `<redacted>` when set, so a log shows which kind of credential came.
pub(crate) fn debug_auth_fields(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    [username, password, auth, server_address, identity_token, registry_token]: [&str; 6],
) -> fmt::Result {
    let set = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
    f.debug_struct(name)
        .field("username", &username)
        .field("password", &set(password))
        .field("auth", &set(auth))
        .field("server_address", &server_address)
        .field("identity_token", &set(identity_token))
        .field("registry_token", &set(registry_token))
        .finish()
}

impl RequestAuth {
    /// The credential these fields describe, if any. As in containerd's CRI, `auth`
    /// overrides username/password, and an identity token wins over a password.
    pub fn credential(&self) -> Result<Option<Credential>, AuthError> {
        if !self.registry_token.is_empty() {
            return Ok(Some(Credential::RegistryToken(self.registry_token.clone())));
        }
        let (username, password) = if self.auth.is_empty() {
            (self.username.clone(), self.password.clone())
        } else {
            decode_auth(&self.auth)?
        };
        if !self.identity_token.is_empty() {
            return Ok(Some(Credential::IdentityToken {
                username,
                token: self.identity_token.clone(),
            }));
        }
        if username.is_empty() && password.is_empty() {
            return Ok(None);
        }
        Ok(Some(Credential::Basic { username, password }))
    }
}

/// Decodes docker's `auth` field: base64 of `username:password`.
pub fn decode_auth(auth: &str) -> Result<(String, String), AuthError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_decode_error_would_echo_the_secret| AuthError::MalformedAuthField)?;
    let text = String::from_utf8(bytes)
        .map_err(|_not_utf8_would_echo_the_secret| AuthError::MalformedAuthField)?;
    let (user, pass) = text.split_once(':').ok_or(AuthError::MalformedAuthField)?;
    Ok((user.to_string(), pass.to_string()))
}

/// One set of credentials to try, and where it came from (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The key that matched (a config.json `auths` key, or the request's server address).
    pub key: String,
    /// `request`, a file path, `provider:<name>` or `anonymous`.
    pub source: String,
    /// `None` for anonymous access.
    pub credential: Option<Credential>,
}

impl Candidate {
    pub fn anonymous() -> Self {
        Candidate {
            key: String::new(),
            source: "anonymous".to_string(),
            credential: None,
        }
    }

    /// `basic`, `identitytoken`, `registrytoken` or `anonymous`.
    pub fn kind(&self) -> &'static str {
        self.credential
            .as_ref()
            .map_or("anonymous", Credential::kind)
    }

    /// What identifies this candidate across lookups: source, key and a hash of the
    /// credential (a file edit that changes the password makes it another one).
    fn identity(&self) -> (String, String, String) {
        (
            self.source.clone(),
            self.key.clone(),
            self.credential
                .as_ref()
                .map(Credential::fingerprint)
                .unwrap_or_default(),
        )
    }
}

/// Kubelet credential-provider plugins, as the keyring sees them: [`Providers`],
/// or a fake in unit tests.
#[async_trait::async_trait]
pub trait ProviderSource: Send + Sync + fmt::Debug {
    /// Every credential the providers whose `matchImages` match `image` return,
    /// before the keyring matches their keys.
    async fn lookup(&self, image: &Reference) -> Vec<ProvidedAuth>;
}

#[async_trait::async_trait]
impl ProviderSource for Providers {
    async fn lookup(&self, image: &Reference) -> Vec<ProvidedAuth> {
        Providers::lookup(self, image).await
    }
}

/// What the keyring reads; `[credentials]` of the config.
#[derive(Debug, Clone, Default)]
pub struct KeyringSettings {
    pub matching: Matching,
    pub files: FileSettings,
}

/// Repositories whose last working candidate is remembered, at most.
const MAX_REMEMBERED: usize = 4096;

/// Resolves the ordered candidates for a pull; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    inner: Arc<KeyringInner>,
}

#[derive(Debug, Default)]
struct KeyringInner {
    matching: Matching,
    files: Option<FileKeyring>,
    providers: Option<Arc<dyn ProviderSource>>,
    /// `domain/repository` → the candidate that last worked there.
    remembered: Mutex<HashMap<String, (String, String, String)>>,
}

impl Keyring {
    /// Only the request's credential, then anonymous.
    pub fn empty() -> Self {
        Keyring::default()
    }

    pub fn new(settings: KeyringSettings, providers: Option<Arc<dyn ProviderSource>>) -> Self {
        Keyring {
            inner: Arc::new(KeyringInner {
                matching: settings.matching,
                files: Some(FileKeyring::new(settings.files)),
                providers,
                remembered: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn matching(&self) -> Matching {
        self.inner.matching
    }

    /// Reads every file now, so problems are logged when the daemon starts rather
    /// than at the first pull.
    pub fn preload(&self) {
        if let Some(files) = &self.inner.files {
            let n = files.entries().len();
            tracing::info!(entries = n, matching = %self.inner.matching, "credentials loaded");
        }
    }

    /// Candidates for pulling from `at` (the reference at the host actually
    /// contacted): the request's credential first, then files and secrets, then
    /// providers, then anonymous. The one that last worked for this repository goes
    /// first among those after the request's.
    pub async fn candidates(
        &self,
        at: &Reference,
        request: Option<&RequestAuth>,
    ) -> Result<Vec<Candidate>, AuthError> {
        let mut out = Vec::new();
        if let Some(req) = request {
            if let Some(credential) = req.credential()? {
                let key = if req.server_address.is_empty() {
                    at.domain().to_string()
                } else {
                    req.server_address.clone()
                };
                out.push(Candidate {
                    key,
                    source: "request".to_string(),
                    credential: Some(credential),
                });
            }
        }
        let first_configured = out.len();
        out.extend(self.configured(at).await);
        let remembered = self
            .inner
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&repository_key(at))
            .cloned();
        if let Some(id) = remembered {
            if let Some(i) = out[first_configured..]
                .iter()
                .position(|c| c.identity() == id)
            {
                let c = out.remove(first_configured + i);
                out.insert(first_configured, c);
            }
        }
        out.push(Candidate::anonymous());
        Ok(out)
    }

    /// Candidates from files, secrets and providers (what `explain` shows).
    pub async fn configured(&self, at: &Reference) -> Vec<Candidate> {
        let location = ImageLocation::new(at.domain(), at.path());
        let mut out = Vec::new();
        if let Some(files) = &self.inner.files {
            let entries = files
                .entries()
                .into_iter()
                .map(|e| (e.entry.key, e.source.to_string(), e.entry.credential));
            out.extend(self.ordered(&location, entries));
        }
        if let Some(providers) = &self.inner.providers {
            let provided = providers.lookup(at).await.into_iter().filter_map(|p| {
                match AuthKey::parse(&p.key) {
                    Ok(key) => Some((key, format!("provider:{}", p.provider), p.credential)),
                    Err(e) => {
                        tracing::warn!(provider = %p.provider, error = %e, "provider returned an unusable key; ignoring it");
                        None
                    }
                }
            });
            out.extend(self.ordered(&location, provided));
        }
        out
    }

    /// The entries whose key matches, in the matcher's order; a stable sort keeps
    /// each key's credentials in source order.
    fn ordered(
        &self,
        location: &ImageLocation,
        entries: impl Iterator<Item = (AuthKey, String, Credential)>,
    ) -> Vec<Candidate> {
        let mode = self.inner.matching;
        let mut matching: Vec<(AuthKey, String, Credential)> = entries
            .filter(|(key, _, _)| key.matches(location, mode))
            .collect();
        matching.sort_by(|a, b| a.0.try_order(&b.0, mode));
        matching
            .into_iter()
            .map(|(key, source, credential)| Candidate {
                key: key.raw,
                source,
                credential: Some(credential),
            })
            .collect()
    }

    /// Records that `candidate` worked for `at`, to try it first next time. The
    /// request's credential and anonymous access are not remembered: the next
    /// request brings its own, and anonymous stays last.
    pub fn remember(&self, at: &Reference, candidate: &Candidate) {
        let mut remembered = self
            .inner
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = repository_key(at);
        if candidate.source == "request" || candidate.credential.is_none() {
            remembered.remove(&key);
            return;
        }
        if remembered.len() >= MAX_REMEMBERED && !remembered.contains_key(&key) {
            remembered.clear();
        }
        remembered.insert(key, candidate.identity());
    }
}

fn repository_key(at: &Reference) -> String {
    format!("{}/{}", at.domain(), at.path())
}

/// Delegated auth: credentials from files and secrets whose key matches the token
/// realm's host (any path), in the matcher's order.
impl RealmCredentials for Keyring {
    fn for_realm(&self, realm_host: &str) -> Vec<RealmCredential> {
        let Some(files) = &self.inner.files else {
            return Vec::new();
        };
        let location = ImageLocation::new(realm_host, "");
        let entries = files
            .entries()
            .into_iter()
            .map(|e| (e.entry.key, e.source.to_string(), e.entry.credential));
        self.ordered(&location, entries)
            .into_iter()
            .filter_map(|c| {
                Some(RealmCredential {
                    label: format!("{:?} from {}", c.key, c.source),
                    credential: c.credential?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::files::tests::auths;
    use super::*;

    fn basic(u: &str, p: &str) -> Option<Credential> {
        Some(Credential::Basic {
            username: u.into(),
            password: p.into(),
        })
    }

    #[test]
    fn auth_field_overrides_username_and_password() {
        let req = RequestAuth {
            username: "ignored".into(),
            password: "ignored".into(),
            auth: base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et"),
            ..Default::default()
        };
        assert_eq!(req.credential().unwrap(), basic("alice", "s3cr:et"));
    }

    #[test]
    fn token_fields_pick_the_credential_kind() {
        let req = RequestAuth {
            username: "bob".into(),
            identity_token: "refresh".into(),
            ..Default::default()
        };
        assert!(matches!(
            req.credential().unwrap(),
            Some(Credential::IdentityToken { .. })
        ));
        let req = RequestAuth {
            registry_token: "bearer".into(),
            ..Default::default()
        };
        assert_eq!(
            req.credential().unwrap(),
            Some(Credential::RegistryToken("bearer".into()))
        );
        assert_eq!(RequestAuth::default().credential().unwrap(), None);
    }

    #[test]
    fn malformed_auth_is_an_error_without_the_secret() {
        let req = RequestAuth {
            auth: "!!not base64 hunter2".into(),
            ..Default::default()
        };
        let e = req.credential().unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        let no_colon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        assert_eq!(decode_auth(&no_colon), Err(AuthError::MalformedAuthField));
    }

    #[test]
    fn debug_hides_secrets() {
        let req = RequestAuth {
            username: "u".into(),
            password: "hunter2".into(),
            ..Default::default()
        };
        assert!(!format!("{req:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn request_credential_comes_before_anonymous() {
        let image = Reference::parse("127.0.0.1:5000/app").unwrap();
        let req = RequestAuth {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        let k = Keyring::empty();
        let c = k.candidates(&image, Some(&req)).await.unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].source, "request");
        assert_eq!(c[0].key, "127.0.0.1:5000");
        assert_eq!(c[1], Candidate::anonymous());
        let c = k.candidates(&image, None).await.unwrap();
        assert_eq!(c, vec![Candidate::anonymous()]);
    }

    /// A keyring over a temp dir: `node` is kubelet's config.json, `extra` a listed
    /// file, `secret` a mounted secret in a secret dir.
    struct Setup {
        _tmp: tempfile::TempDir,
        keyring: Keyring,
    }

    fn setup(
        matching: Matching,
        node: &[(&str, &str)],
        extra: &[(&str, &str)],
        secret: &[(&str, &str)],
        providers: Option<Arc<dyn ProviderSource>>,
    ) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("kubelet")).unwrap();
        std::fs::create_dir_all(root.join("secrets/pull")).unwrap();
        std::fs::write(root.join("kubelet/config.json"), auths(node)).unwrap();
        std::fs::write(root.join("extra.json"), auths(extra)).unwrap();
        std::fs::write(
            root.join("secrets/pull").join(files::DOCKERCONFIGJSON),
            auths(secret),
        )
        .unwrap();
        let settings = KeyringSettings {
            matching,
            files: FileSettings {
                kubelet_root_dir: root.join("kubelet"),
                cwd: None,
                home: None,
                files: vec![root.join("extra.json")],
                secret_dirs: vec![root.join("secrets")],
            },
        };
        Setup {
            keyring: Keyring::new(settings, providers),
            _tmp: tmp,
        }
    }

    /// (key, username or kind, source's last path component) per candidate.
    async fn trial(k: &Keyring, image: &str) -> Vec<(String, String, String)> {
        let at = Reference::parse(image).unwrap();
        k.candidates(&at, None)
            .await
            .unwrap()
            .into_iter()
            .map(|c| {
                let who = match &c.credential {
                    Some(Credential::Basic { username, .. }) => username.clone(),
                    Some(other) => other.kind().to_string(),
                    None => "anonymous".into(),
                };
                let source = c.source.rsplit('/').next().unwrap_or_default().to_string();
                (c.key, who, source)
            })
            .collect()
    }

    fn t(key: &str, who: &str, source: &str) -> (String, String, String) {
        (key.into(), who.into(), source.into())
    }

    #[tokio::test]
    async fn matching_keys_in_matcher_order_each_keys_credentials_in_source_order() {
        let s = setup(
            Matching::Kubelet,
            &[("r.io/team", "node-team:pw"), ("*.io", "node-glob:pw")],
            &[("r.io", "extra:pw"), ("r.io/team", "extra-team:pw")],
            &[("r.io/team", "secret-team:pw"), ("q.io", "other:pw")],
            None,
        );
        assert_eq!(
            trial(&s.keyring, "r.io/team/app:1").await,
            vec![
                t("r.io/team", "node-team", "config.json"),
                t("r.io/team", "extra-team", "extra.json"),
                t("r.io/team", "secret-team", ".dockerconfigjson"),
                t("r.io", "extra", "extra.json"),
                t("*.io", "node-glob", "config.json"),
                t("", "anonymous", "anonymous"),
            ]
        );
        assert_eq!(
            trial(&s.keyring, "r.io/other/app").await,
            vec![
                t("r.io", "extra", "extra.json"),
                t("*.io", "node-glob", "config.json"),
                t("", "anonymous", "anonymous"),
            ]
        );
    }

    #[tokio::test]
    async fn both_matching_modes_through_the_keyring() {
        let keys = [("*my-registry.io/images", "glob:pw")];
        let image = "a.sub.my-registry.io/images/my-image";
        let kubelet = setup(Matching::Kubelet, &keys, &[], &[], None);
        assert_eq!(trial(&kubelet.keyring, image).await.len(), 1);
        let span = setup(Matching::SpanLabels, &keys, &[], &[], None);
        assert_eq!(
            trial(&span.keyring, image).await[0],
            t("*my-registry.io/images", "glob", "config.json")
        );
    }

    #[derive(Debug)]
    struct FakeProviders;

    #[async_trait::async_trait]
    impl ProviderSource for FakeProviders {
        async fn lookup(&self, image: &Reference) -> Vec<ProvidedAuth> {
            let p = |key: &str, user: &str| ProvidedAuth {
                provider: "fake".into(),
                key: key.into(),
                credential: Credential::Basic {
                    username: user.into(),
                    password: "pw".into(),
                },
            };
            if image.domain() != "r.io" {
                return vec![];
            }
            vec![
                p("*.io", "prov-glob"),
                p("r.io/team", "prov-team"),
                p("q.io", "prov-other"),
                p("[bad", "prov-bad"),
            ]
        }
    }

    #[tokio::test]
    async fn providers_come_after_files_matched_and_ordered_among_themselves() {
        let s = setup(
            Matching::Kubelet,
            &[("*.io", "node-glob:pw")],
            &[],
            &[],
            Some(Arc::new(FakeProviders)),
        );
        assert_eq!(
            trial(&s.keyring, "r.io/team/app").await,
            vec![
                t("*.io", "node-glob", "config.json"),
                t("r.io/team", "prov-team", "provider:fake"),
                t("*.io", "prov-glob", "provider:fake"),
                t("", "anonymous", "anonymous"),
            ]
        );
    }

    #[tokio::test]
    async fn last_working_candidate_goes_first_after_the_requests() {
        let s = setup(
            Matching::Kubelet,
            &[("r.io/team", "first:pw"), ("r.io", "second:pw")],
            &[],
            &[],
            None,
        );
        let at = Reference::parse("r.io/team/app").unwrap();
        let req = RequestAuth {
            username: "req".into(),
            password: "pw".into(),
            ..Default::default()
        };
        let c = s.keyring.candidates(&at, Some(&req)).await.unwrap();
        assert_eq!(c[1].key, "r.io/team");
        s.keyring.remember(&at, &c[2]);
        let c = s.keyring.candidates(&at, Some(&req)).await.unwrap();
        let order: Vec<&str> = c
            .iter()
            .map(|c| c.source.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(c[0].source, "request", "{order:?}");
        assert_eq!(c[1].key, "r.io");
        assert_eq!(c[2].key, "r.io/team");
        // Another repository is not affected.
        let other = Reference::parse("r.io/team/other").unwrap();
        assert_eq!(
            s.keyring.candidates(&other, None).await.unwrap()[0].key,
            "r.io/team"
        );
        // Anonymous success forgets it.
        s.keyring.remember(&at, &Candidate::anonymous());
        assert_eq!(
            s.keyring.candidates(&at, None).await.unwrap()[0].key,
            "r.io/team"
        );
    }

    #[tokio::test]
    async fn lookups_are_for_the_host_contacted() {
        let s = setup(
            Matching::Kubelet,
            &[("source.io", "source:pw"), ("mirror.io:5000", "mirror:pw")],
            &[],
            &[],
            None,
        );
        let at_mirror = Reference::parse("mirror.io:5000/team/app").unwrap();
        let c = trial(&s.keyring, &at_mirror.to_string()).await;
        assert_eq!(c[0], t("mirror.io:5000", "mirror", "config.json"));
        assert_eq!(c.len(), 2, "{c:?}");
    }

    #[tokio::test]
    async fn realm_credentials_match_the_realm_host() {
        let s = setup(
            Matching::Kubelet,
            &[
                ("sso.example", "sso:s3cr3t-sso"),
                ("registry.example", "reg:s3cr3t-reg"),
            ],
            &[],
            &[("*.example/some/path", "path:s3cr3t-path")],
            None,
        );
        let found = s.keyring.for_realm("sso.example");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].label.contains("sso.example"), "{}", found[0].label);
        // (The label names the file, whose random temp path may hold any letters:
        // look for the secret itself.)
        assert!(!found[0].label.contains("s3cr3t"), "{}", found[0].label);
        assert!(s.keyring.for_realm("sso.example:8443").is_empty());
        assert!(Keyring::empty().for_realm("sso.example").is_empty());
    }
}
