//! Credentials the registry client may present. `Debug` never shows a secret.

use sha2::{Digest as _, Sha256};
use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    /// Username and password: HTTP Basic, or the token endpoint's basic auth / password grant.
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (docker config `identitytoken`): POST grant_type=refresh_token.
    IdentityToken { username: String, token: String },
    /// A bearer token sent as is (docker config `registrytoken`).
    RegistryToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            Credential::IdentityToken { username, .. } => {
                write!(
                    f,
                    "IdentityToken {{ username: {username:?}, token: <redacted> }}"
                )
            }
            Credential::RegistryToken(_) => f.write_str("RegistryToken(<redacted>)"),
        }
    }
}

impl Credential {
    /// `basic`, `identitytoken` or `registrytoken`: how it is used, never what it is.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Basic { .. } => "basic",
            Credential::IdentityToken { .. } => "identitytoken",
            Credential::RegistryToken(_) => "registrytoken",
        }
    }

    /// A stable hash of the whole credential, used to key cached tokens so two
    /// credentials never share one. It is a SHA-256 digest, never the secret itself.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        // Length-prefix each field so ("ab","c") and ("a","bc") differ.
        let mut field = |s: &str| {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        };
        match self {
            Credential::Basic { username, password } => {
                field("basic");
                field(username);
                field(password);
            }
            Credential::IdentityToken { username, token } => {
                field("identitytoken");
                field(username);
                field(token);
            }
            Credential::RegistryToken(token) => {
                field("registrytoken");
                field(token);
            }
        }
        hex::encode(&h.finalize()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let c = Credential::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = Credential::RegistryToken("tok-123".into());
        assert!(!format!("{t:?}").contains("tok-123"));
    }

    #[test]
    fn fingerprints_differ_per_secret_and_hide_it() {
        let a = Credential::Basic {
            username: "u".into(),
            password: "p1".into(),
        };
        let b = Credential::Basic {
            username: "u".into(),
            password: "p2".into(),
        };
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert!(!a.fingerprint().contains("p1"));
    }
}
