//! Credentials the registry client may present. `Debug` never shows a secret.

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
}
