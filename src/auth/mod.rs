//! Which credentials to try for a pull, in order.
//!
//! Today the keyring holds what the PullImageRequest carries (kubelet's match from
//! the pod's imagePullSecrets) followed by anonymous access. Node config.json files,
//! secret directories and credential providers join it with the credentials issue.

pub mod matcher;
pub mod provider;

use crate::reference::Reference;
use crate::registry::Credential;
use base64::Engine as _;
use std::fmt;

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
        let set = |s: &str| if s.is_empty() { "" } else { "<set>" };
        f.debug_struct("RequestAuth")
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("auth", &set(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &set(&self.identity_token))
            .field("registry_token", &set(&self.registry_token))
            .finish()
    }
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
}

/// Resolves the ordered candidates for a pull.
#[derive(Debug, Clone, Default)]
pub struct Keyring {}

impl Keyring {
    pub fn new() -> Self {
        Keyring {}
    }

    /// Candidates for pulling `image` from `host`: the request's credential first,
    /// anonymous last.
    pub fn candidates(
        &self,
        image: &Reference,
        request: Option<&RequestAuth>,
    ) -> Result<Vec<Candidate>, AuthError> {
        let mut out = Vec::new();
        if let Some(req) = request {
            if let Some(credential) = req.credential()? {
                let key = if req.server_address.is_empty() {
                    image.domain().to_string()
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
        out.push(Candidate::anonymous());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn request_credential_comes_before_anonymous() {
        let image = Reference::parse("127.0.0.1:5000/app").unwrap();
        let req = RequestAuth {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        let c = Keyring::new().candidates(&image, Some(&req)).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].source, "request");
        assert_eq!(c[0].key, "127.0.0.1:5000");
        assert_eq!(c[1], Candidate::anonymous());
        let c = Keyring::new().candidates(&image, None).unwrap();
        assert_eq!(c, vec![Candidate::anonymous()]);
    }
}
