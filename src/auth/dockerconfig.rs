//! Parsing docker credential files: `config.json` (`{"auths": {KEY: ENTRY}}`, also
//! podman's `auth.json` and a `kubernetes.io/dockerconfigjson` secret) and the legacy
//! flat `.dockercfg` (`{KEY: ENTRY}`, a `kubernetes.io/dockercfg` secret).
//!
//! The JSON is walked by hand rather than deserialised into structs: serde's
//! "invalid type" errors quote the offending value, which may be a password. Errors
//! and warnings here name keys and fields, never values.

use super::matcher::AuthKey;
use super::{decode_auth, AuthError};
use crate::registry::Credential;
use serde_json::{Map, Value};

/// Which of the two layouts a file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"auths": {...}, ...}`: config.json, auth.json, `.dockerconfigjson`.
    ConfigJson,
    /// `{KEY: ENTRY, ...}`: `.dockercfg`.
    Dockercfg,
}

/// One usable `auths` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: AuthKey,
    pub credential: Credential,
}

/// A file that parsed: its usable entries, and what was skipped and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

/// Why a whole file is unusable. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// serde_json's syntax errors give a position and what was expected, not content.
    #[error("not JSON: {0}")]
    Syntax(String),
    #[error("the top level is not a JSON object")]
    NotAnObject,
    #[error("\"auths\" is not a JSON object")]
    AuthsNotAnObject,
}

/// Parses a credentials file. Entries that cannot be used (bad key, bad `auth`
/// field, no credential) are skipped with a warning; the others still count.
pub fn parse(bytes: &[u8], format: Format) -> Result<Parsed, FileError> {
    // Parsed untyped, only syntax errors can occur: serde_json describes those by
    // position and what it expected, never by quoting the text.
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| FileError::Syntax(e.to_string()))?;
    let Value::Object(top) = value else {
        return Err(FileError::NotAnObject);
    };
    let auths = match format {
        Format::Dockercfg => top,
        // A config.json without `auths` (only credHelpers, say) is valid and empty,
        // as kubelet reads it.
        Format::ConfigJson => match top.get("auths") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(auths)) => auths.clone(),
            Some(_) => return Err(FileError::AuthsNotAnObject),
        },
    };
    let mut parsed = Parsed::default();
    for (raw_key, entry) in &auths {
        match parse_entry(raw_key, entry) {
            Ok(Some(entry)) => parsed.entries.push(entry),
            Ok(None) => parsed.warnings.push(format!(
                "auths key {raw_key:?}: no credentials in the entry"
            )),
            Err(why) => parsed.warnings.push(why),
        }
    }
    Ok(parsed)
}

fn parse_entry(raw_key: &str, entry: &Value) -> Result<Option<Entry>, String> {
    let key = AuthKey::parse(raw_key).map_err(|e| format!("{e}; entry ignored"))?;
    let Value::Object(fields) = entry else {
        return Err(format!(
            "auths key {raw_key:?}: the entry is not a JSON object"
        ));
    };
    let field = |name: &str| -> Result<String, String> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!(
                "auths key {raw_key:?}: field {name:?} is not a string; entry ignored"
            )),
        }
    };
    let auth = field("auth")?;
    let (mut username, mut password) = (field("username")?, field("password")?);
    let identity_token = field("identitytoken")?;
    let registry_token = field("registrytoken")?;
    // As docker and kubelet: `auth` overrides username and password.
    if !auth.is_empty() {
        (username, password) = decode_auth(&auth).map_err(|e| match e {
            AuthError::MalformedAuthField => format!(
                "auths key {raw_key:?}: field \"auth\" is not base64 of \"username:password\"; entry ignored"
            ),
        })?;
    }
    let credential = if !registry_token.is_empty() {
        Credential::RegistryToken(registry_token)
    } else if !identity_token.is_empty() {
        Credential::IdentityToken {
            username,
            token: identity_token,
        }
    } else if !username.is_empty() || !password.is_empty() {
        Credential::Basic { username, password }
    } else {
        return Ok(None);
    };
    Ok(Some(Entry { key, credential }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    proptest::proptest! {
        // Fuzzing on the stable toolchain (more cases by hand: PROPTEST_CASES).
        #[test]
        fn any_bytes_parse_or_error_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse(&bytes, Format::ConfigJson);
            let _ = parse(&bytes, Format::Dockercfg);
        }

        #[test]
        fn any_entry_values_parse_or_error_without_panicking(
            key in r"\PC{0,30}",
            auth in r"[A-Za-z0-9+/=:]{0,40}|\PC{0,20}",
            user in r"\PC{0,10}",
        ) {
            let json = serde_json::json!({"auths": {key.clone(): {"auth": auth, "username": user}}});
            let _ = parse(json.to_string().as_bytes(), Format::ConfigJson);
            let legacy = serde_json::json!({key: {"auth": auth, "email": user}});
            let _ = parse(legacy.to_string().as_bytes(), Format::Dockercfg);
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn basic(u: &str, p: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    /// Sorted: which order a JSON object's keys come out in is serde_json's business.
    fn keys_and_creds(p: &Parsed) -> Vec<(String, Credential)> {
        let mut out: Vec<(String, Credential)> = p
            .entries
            .iter()
            .map(|e| (e.key.raw.clone(), e.credential.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn config_json_entries_table() {
        let text = format!(
            r#"{{
              "auths": {{
                "auth.example": {{"auth": "{a}", "email": "you@example.com"}},
                "override.example": {{"auth": "{a}", "username": "x", "password": "y"}},
                "plain.example": {{"username": "bob", "password": "pw"}},
                "id.example": {{"auth": "{t}", "identitytoken": "refresh-1"}},
                "reg.example": {{"registrytoken": "bearer-1", "username": "ignored"}},
                "*.glob.example:5000/team": {{"auth": "{a}"}}
              }},
              "credHelpers": {{"gcr.io": "gcloud"}},
              "HttpHeaders": {{"User-Agent": "x"}}
            }}"#,
            a = b64("alice:pa:ss"),
            t = b64("<token>:")
        );
        let p = parse(text.as_bytes(), Format::ConfigJson).unwrap();
        assert_eq!(p.warnings, Vec::<String>::new());
        assert_eq!(
            keys_and_creds(&p),
            vec![
                ("*.glob.example:5000/team".into(), basic("alice", "pa:ss")),
                ("auth.example".into(), basic("alice", "pa:ss")),
                (
                    "id.example".into(),
                    Credential::IdentityToken {
                        username: "<token>".into(),
                        token: "refresh-1".into()
                    }
                ),
                ("override.example".into(), basic("alice", "pa:ss")),
                ("plain.example".into(), basic("bob", "pw")),
                (
                    "reg.example".into(),
                    Credential::RegistryToken("bearer-1".into())
                ),
            ]
        );
    }

    #[test]
    fn dockercfg_is_the_flat_map() {
        let text = format!(
            r#"{{"https://index.docker.io/v1/": {{"auth": "{}", "email": "e@x"}}}}"#,
            b64("hub:pw")
        );
        let p = parse(text.as_bytes(), Format::Dockercfg).unwrap();
        assert_eq!(p.entries.len(), 1);
        assert_eq!(p.entries[0].key.normalized, "docker.io");
        assert_eq!(p.entries[0].credential, basic("hub", "pw"));
        // The same text read as config.json has no `auths`: valid and empty.
        let p = parse(text.as_bytes(), Format::ConfigJson).unwrap();
        assert!(p.entries.is_empty());
    }

    #[test]
    fn bad_entries_are_skipped_with_a_warning_naming_key_not_secret() {
        let text = format!(
            r#"{{"auths": {{
                "good.example": {{"auth": "{good}"}},
                "bad64.example": {{"auth": "!!hunter2!!"}},
                "nocolon.example": {{"auth": "{nocolon}"}},
                "[unclosed.example": {{"auth": "{good}"}},
                "": {{"auth": "{good}"}},
                "ftp://scheme.example": {{"auth": "{good}"}},
                "empty.example": {{"email": "only@mail"}},
                "number.example": {{"password": 12345678}},
                "list.example": ["hunter2"]
            }}}}"#,
            good = b64("u:p"),
            nocolon = b64("hunter2")
        );
        let p = parse(text.as_bytes(), Format::ConfigJson).unwrap();
        assert_eq!(
            keys_and_creds(&p),
            vec![("good.example".into(), basic("u", "p"))]
        );
        assert_eq!(p.warnings.len(), 8, "{:#?}", p.warnings);
        for needle in [
            "bad64.example",
            "nocolon.example",
            "[unclosed.example",
            "scheme.example",
            "empty.example",
            "number.example",
            "list.example",
        ] {
            assert!(
                p.warnings.iter().any(|w| w.contains(needle)),
                "no warning names {needle}: {:#?}",
                p.warnings
            );
        }
        let all = p.warnings.join("\n");
        for secret in ["hunter2", "12345678", &b64("hunter2")] {
            assert!(!all.contains(secret), "{all}");
        }
    }

    #[test]
    fn broken_files_are_errors_without_content() {
        let cases: [(&str, Format); 5] = [
            (
                r#"{"auths": {"r.io": {"auth": "hunter2"}"#,
                Format::ConfigJson,
            ),
            (r#"{"auths": "hunter2"}"#, Format::ConfigJson),
            (r#"["hunter2"]"#, Format::ConfigJson),
            (r#""hunter2""#, Format::Dockercfg),
            ("", Format::Dockercfg),
        ];
        for (text, format) in cases {
            let e = parse(text.as_bytes(), format).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = parse(b"{\n  \"auths\": {,\n}", Format::ConfigJson).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert_eq!(
            parse(br#"{"auths": 3}"#, Format::ConfigJson).unwrap_err(),
            FileError::AuthsNotAnObject
        );
        assert_eq!(
            parse(b"[]", Format::Dockercfg).unwrap_err(),
            FileError::NotAnObject
        );
    }

    #[test]
    fn null_auths_and_fields_are_empty() {
        let p = parse(br#"{"auths": null}"#, Format::ConfigJson).unwrap();
        assert!(p.entries.is_empty() && p.warnings.is_empty());
        let p = parse(
            br#"{"auths": {"r.io": {"username": "u", "password": "p", "auth": null}}}"#,
            Format::ConfigJson,
        )
        .unwrap();
        assert_eq!(p.entries[0].credential, basic("u", "p"));
    }
}
