//! Image references: parsing and normalisation the way kubelet and containerd do it
//! (`busybox` → `docker.io/library/busybox:latest`), and the queries ImageStatus and
//! RemoveImage accept (a reference, a short name, a digest reference or an image ID).
//!
//! This is the only module that splits strings on `/`, `:` and `@`.

use crate::digest::{Digest, DigestError};
use std::fmt;

/// Docker Hub's canonical domain; `index.docker.io` and `registry-1.docker.io` are aliases.
pub const DOCKER_HUB: &str = "docker.io";
/// The host actually contacted for Docker Hub.
pub const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;
/// How much of a rejected input an error quotes: a caller's 1 MiB "reference" must
/// not come back whole in the gRPC status (clients drop oversized metadata).
const QUOTED_INPUT: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("invalid image reference {input:?}: {why}")]
    Invalid { input: String, why: &'static str },
    #[error("invalid image reference {input:?}: repository name must be lowercase")]
    Uppercase { input: String },
    #[error("invalid image reference {input:?}: {source}")]
    Digest {
        input: String,
        #[source]
        source: DigestError,
    },
}

/// `input` for an error message: whole when short, else its first 256 bytes (at a
/// character boundary) and its length.
fn quoted(input: &str) -> String {
    if input.len() <= QUOTED_INPUT {
        return input.to_string();
    }
    let mut end = QUOTED_INPUT;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes in all)", &input[..end], input.len())
}

/// An image name written without a registry host (`busybox`, `team/app:1`,
/// `app@sha256:…`), kept as written: registries.conf may resolve it (aliases,
/// unqualified-search registries) before it is normalised to Docker Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortName {
    /// The repository as written (`busybox`, `team/app`): what aliases are keyed by.
    repository: String,
    /// `:tag`, `@digest` or empty, appended to whatever the name resolves to.
    suffix: String,
}

impl ShortName {
    /// `input` as a short name, or None when it names a registry host (or is empty).
    pub fn of(input: &str) -> Option<ShortName> {
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (input, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if repository.is_empty()
            || split_domain(repository).0 != DOCKER_HUB
            || repository.starts_with("docker.io/")
        {
            return None;
        }
        let suffix = match (digest, tag) {
            (Some(d), _) => format!("@{d}"),
            (None, Some(t)) => format!(":{t}"),
            (None, None) => String::new(),
        };
        Some(ShortName {
            repository: repository.to_string(),
            suffix,
        })
    }

    /// The repository as written, without tag or digest.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The reference this name has at `registry` (`host[:port]`), normalised as any
    /// reference is (`docker.io` + `busybox` → `docker.io/library/busybox`).
    pub fn at(&self, registry: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(&format!("{registry}/{}{}", self.repository, self.suffix))
    }

    /// `repository` (fully qualified, from an alias) with this name's tag or digest.
    pub fn aliased_to(&self, repository: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(&format!("{repository}{}", self.suffix))
    }
}

impl fmt::Display for ShortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.repository, self.suffix)
    }
}

/// A normalised, fully qualified image reference.
///
/// Holds a tag or a digest, never both: as containerd's `ParseDockerRef` does, a
/// reference with both keeps the digest (it names the content exactly) and drops the tag.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let invalid = |why| ReferenceError::Invalid {
            input: quoted(input),
            why,
        };
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d
                    .parse::<Digest>()
                    .map_err(|source| ReferenceError::Digest {
                        input: quoted(input),
                        source,
                    })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let split = last_slash + i;
                (&rest[..split], Some(&rest[split + 1..]))
            }
            None => (rest, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(invalid(
                    "tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                ));
            }
        }
        if name.is_empty() {
            return Err(invalid("repository name is empty"));
        }
        let (domain, path) = split_domain(name);
        if !valid_domain(domain) {
            return Err(invalid("registry host is not a valid host[:port]"));
        }
        let domain = match domain {
            "index.docker.io" | DOCKER_HUB_REGISTRY => DOCKER_HUB,
            d => d,
        };
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase {
                input: quoted(input),
            });
        }
        if !path.split('/').all(valid_path_component) {
            return Err(invalid(
                "repository path components must be lowercase letters and digits separated by '.', '_', '__' or '-'",
            ));
        }
        if domain.len() + 1 + path.len() > MAX_NAME_LEN {
            return Err(invalid("repository name is longer than 255 characters"));
        }
        let tag = match (&digest, tag) {
            (Some(_), _) => None,
            (None, Some(t)) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            domain: domain.to_string(),
            path,
            tag,
            digest,
        })
    }

    /// The registry as written in the reference (`docker.io`, `quay.io`, `127.0.0.1:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The registry host to contact: Docker Hub's API lives on `registry-1.docker.io`.
    pub fn registry_host(&self) -> &str {
        if self.domain == DOCKER_HUB {
            DOCKER_HUB_REGISTRY
        } else {
            &self.domain
        }
    }

    /// The registry's host name without a port (`127.0.0.1` for `127.0.0.1:5000`).
    pub fn host_name(&self) -> &str {
        if self.domain.starts_with('[') {
            return self
                .domain
                .split_once(']')
                .map_or(&self.domain, |(h, _)| &h[1..]);
        }
        self.domain.split_once(':').map_or(&self.domain, |(h, _)| h)
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `domain/path`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifest endpoint for: the digest, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// `name:tag`, when the reference is by tag.
    pub fn tagged_name(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `name@digest` for any digest (the image's repo digest).
    pub fn digest_name(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.name())
    }

    /// The same repository at another registry and path (used for mirrors).
    pub fn with_location(&self, domain: &str, path: &str) -> Reference {
        Reference {
            domain: domain.to_string(),
            path: path.to_string(),
            tag: self.tag.clone(),
            digest: self.digest.clone(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

/// What ImageStatus, RemoveImage and the ListImages filter may be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageQuery {
    /// An image ID: `sha256:<hex>` or the bare 64 hex digits.
    Id(Digest),
    /// A reference by tag or by digest (short names already normalised).
    Ref(Reference),
}

impl ImageQuery {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.starts_with("sha256:") {
            return input
                .parse()
                .map(ImageQuery::Id)
                .map_err(|source| ReferenceError::Digest {
                    input: quoted(input),
                    source,
                });
        }
        if input.len() == 64
            && input
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            if let Ok(d) = format!("sha256:{input}").parse() {
                return Ok(ImageQuery::Id(d));
            }
        }
        Reference::parse(input).map(ImageQuery::Ref)
    }
}

/// Splits off the registry the way docker does: the first component is a registry
/// when it has a '.' or ':' or is `localhost`; otherwise the image is on Docker Hub.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // IPv6 literal: [addr] or [addr]:port
        match rest.split_once(']') {
            Some((addr, tail)) => {
                if addr.is_empty()
                    || !addr
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                {
                    return false;
                }
                match tail {
                    "" => return true,
                    t => match t.strip_prefix(':') {
                        Some(p) => return valid_port(p),
                        None => return false,
                    },
                }
            }
            None => return false,
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(p) = port {
        if !valid_port(p) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    proptest::proptest! {
        // Fuzzing on the stable toolchain: a fixed number of cases in CI, more by
        // hand with PROPTEST_CASES=100000 cargo test --lib reference.
        #[test]
        fn any_input_parses_or_errors_and_parsed_references_round_trip(
            input in r"[a-zA-Z0-9._:/@-]{0,80}|sha256:[0-9a-f]{0,70}|\PC{0,40}"
        ) {
            if let Ok(reference) = Reference::parse(&input) {
                let again = Reference::parse(&reference.to_string());
                proptest::prop_assert_eq!(again.as_ref(), Ok(&reference));
            }
            let _ = ImageQuery::parse(&input);
        }
    }

    #[test]
    fn short_names_are_names_without_a_registry_host() {
        for (input, short) in [
            ("busybox", Some(("busybox", ""))),
            ("busybox:1.36", Some(("busybox", ":1.36"))),
            ("team/app:1", Some(("team/app", ":1"))),
            (
                &format!("app@{D}") as &str,
                Some(("app", &format!("@{D}") as &str)),
            ),
            ("library/busybox", Some(("library/busybox", ""))),
            ("docker.io/busybox", None),
            ("quay.io/team/app", None),
            ("localhost/app", None),
            ("127.0.0.1:5000/app", None),
            ("", None),
        ] {
            let got = ShortName::of(input);
            assert_eq!(
                got.as_ref().map(|s| (s.repository(), s.suffix.as_str())),
                short,
                "{input}"
            );
        }
        let s = ShortName::of("busybox:1").unwrap();
        assert_eq!(
            s.at("docker.io").unwrap().to_string(),
            "docker.io/library/busybox:1"
        );
        assert_eq!(s.at("quay.io").unwrap().to_string(), "quay.io/busybox:1");
        assert_eq!(
            s.aliased_to("registry.example.com/tools/bb")
                .unwrap()
                .to_string(),
            "registry.example.com/tools/bb:1"
        );
        assert_eq!(s.to_string(), "busybox:1");
    }

    #[test]
    fn errors_quote_a_bounded_prefix_of_huge_input() {
        let huge = format!("é{}", "A".repeat(1 << 20));
        let message = Reference::parse(&huge).unwrap_err().to_string();
        assert!(message.len() < 512, "{} bytes", message.len());
        assert!(message.contains("(1048578 bytes in all)"), "{message}");
        let short = Reference::parse("Busybox").unwrap_err().to_string();
        assert!(short.contains("\"Busybox\""), "{short}");
    }

    #[test]
    fn normalises_like_kubelet() {
        let table = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("myuser/app", "docker.io/myuser/app:latest"),
            (
                "index.docker.io/library/busybox",
                "docker.io/library/busybox:latest",
            ),
            (
                "registry-1.docker.io/busybox",
                "docker.io/library/busybox:latest",
            ),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("quay.io/org/app:v1", "quay.io/org/app:v1"),
            ("127.0.0.1:5000/app:1", "127.0.0.1:5000/app:1"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/a/b/c", "localhost:5000/a/b/c:latest"),
            (
                "my-registry.io:443/images/my-image",
                "my-registry.io:443/images/my-image:latest",
            ),
            ("[::1]:5000/app:2", "[::1]:5000/app:2"),
            ("a__b/c-d.e_f:x", "docker.io/a__b/c-d.e_f:x"),
        ];
        for (input, want) in table {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), want, "{input}");
        }
    }

    #[test]
    fn digest_references_drop_the_tag() {
        let r = Reference::parse(&format!("busybox:1.36@{D}")).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.manifest_reference(), D);
        let r = Reference::parse(&format!("127.0.0.1:5000/app@{D}")).unwrap();
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.tagged_name(), None);
    }

    #[test]
    fn exposes_parts() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.domain(), "docker.io");
        assert_eq!(r.registry_host(), "registry-1.docker.io");
        assert_eq!(r.path(), "library/busybox");
        assert_eq!(r.name(), "docker.io/library/busybox");
        assert_eq!(r.tagged_name().unwrap(), "docker.io/library/busybox:latest");
        let d: Digest = D.parse().unwrap();
        assert_eq!(r.digest_name(&d), format!("docker.io/library/busybox@{D}"));
        let r = Reference::parse("127.0.0.1:5000/app:1").unwrap();
        assert_eq!(r.registry_host(), "127.0.0.1:5000");
        assert_eq!(r.host_name(), "127.0.0.1");
        assert_eq!(r.manifest_reference(), "1");
        assert_eq!(Reference::parse("[::1]:5000/a").unwrap().host_name(), "::1");
        assert_eq!(
            Reference::parse("quay.io/a").unwrap().host_name(),
            "quay.io"
        );
    }

    #[test]
    fn rejects_malformed_references() {
        let bad = [
            "",
            "Busybox",
            "docker.io/Library/busybox",
            "busybox:",
            "busybox:-tag",
            "busybox:a/b",
            "busybox@sha256:abc",
            "busybox@md5:abc",
            "/busybox",
            "busybox/",
            "a//b",
            "a/b_-c",
            "-a/b",
            "host:port/app",
            "bad host/app",
            "a..b/c",
            "app:tag:more",
        ];
        for input in bad {
            assert!(
                Reference::parse(input).is_err(),
                "{input:?} should be rejected"
            );
        }
        assert_eq!(
            Reference::parse("Busybox"),
            Err(ReferenceError::Uppercase {
                input: "Busybox".into()
            })
        );
        let long = format!("a/{}", "b".repeat(300));
        assert!(Reference::parse(&long).is_err());
    }

    #[test]
    fn queries_accept_ids_refs_and_digests() {
        let id: Digest = D.parse().unwrap();
        assert_eq!(ImageQuery::parse(D).unwrap(), ImageQuery::Id(id.clone()));
        assert_eq!(ImageQuery::parse(&D[7..]).unwrap(), ImageQuery::Id(id));
        match ImageQuery::parse("busybox").unwrap() {
            ImageQuery::Ref(r) => assert_eq!(r.to_string(), "docker.io/library/busybox:latest"),
            q => panic!("{q:?}"),
        }
        assert!(ImageQuery::parse("sha256:xyz").is_err());
    }
}
