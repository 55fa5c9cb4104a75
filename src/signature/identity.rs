//! `signedIdentity`: whether the name inside a signature fits the image being pulled
//! (containers-policy.json(5)). Names are compared after normalisation
//! (`busybox` is `docker.io/library/busybox`), but no `:latest` is implied: a signed
//! name without tag or digest only ever matches by repository.

use crate::reference::Reference;

/// One `signedIdentity` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedIdentity {
    /// The signed name and the image name are equal, both with a tag or digest.
    MatchExact,
    /// `MatchExact` for an image by tag; same repository for an image by digest (the
    /// digest itself is checked against the manifest). The default.
    MatchRepoDigestOrExact,
    /// Same repository, any tag or digest.
    MatchRepository,
    /// The signed name equals this one (which has a tag or digest).
    ExactReference(String),
    /// The signed name's repository is this one.
    ExactRepository(String),
    /// The image name with `prefix` replaced by `signed_prefix`, then as
    /// `MatchRepoDigestOrExact`; an image outside `prefix` as `MatchRepoDigestOrExact`.
    RemapIdentity {
        prefix: String,
        signed_prefix: String,
    },
}

impl std::fmt::Display for SignedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignedIdentity::MatchExact => f.write_str("matchExact"),
            SignedIdentity::MatchRepoDigestOrExact => f.write_str("matchRepoDigestOrExact"),
            SignedIdentity::MatchRepository => f.write_str("matchRepository"),
            SignedIdentity::ExactReference(r) => write!(f, "exactReference {r}"),
            SignedIdentity::ExactRepository(r) => write!(f, "exactRepository {r}"),
            SignedIdentity::RemapIdentity {
                prefix,
                signed_prefix,
            } => write!(f, "remapIdentity {prefix} -> {signed_prefix}"),
        }
    }
}

/// A normalised name that remembers whether a tag or digest was written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    name: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Named {
    fn parse(input: &str) -> Option<Named> {
        let parsed = Reference::parse(input).ok()?;
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest.to_string())),
            None => (input, None),
        };
        let last = rest.rfind('/').map_or(0, |i| i + 1);
        let tag = rest[last..].split_once(':').map(|(_, t)| t.to_string());
        Some(Named {
            name: parsed.name(),
            tag,
            digest,
        })
    }

    fn of(reference: &Reference) -> Named {
        Named {
            name: reference.name(),
            tag: reference.tag().map(str::to_string),
            digest: reference.digest().map(ToString::to_string),
        }
    }

    fn is_name_only(&self) -> bool {
        self.tag.is_none() && self.digest.is_none()
    }

    fn full(&self) -> String {
        let mut s = self.name.clone();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl SignedIdentity {
    /// Whether a signature naming `signed` may stand for `image`. A signed name that
    /// does not parse never matches.
    pub fn matches(&self, image: &Reference, signed: &str) -> bool {
        let Some(signed) = Named::parse(signed) else {
            return false;
        };
        let image = Named::of(image);
        match self {
            SignedIdentity::MatchExact => {
                !image.is_name_only() && !signed.is_name_only() && image.full() == signed.full()
            }
            SignedIdentity::MatchRepoDigestOrExact => repo_digest_or_exact(&image, &signed),
            SignedIdentity::MatchRepository => image.name == signed.name,
            SignedIdentity::ExactReference(wanted) => match Named::parse(wanted) {
                Some(wanted) => {
                    !wanted.is_name_only()
                        && !signed.is_name_only()
                        && wanted.full() == signed.full()
                }
                None => false,
            },
            SignedIdentity::ExactRepository(wanted) => {
                Named::parse(wanted).is_some_and(|wanted| wanted.name == signed.name)
            }
            SignedIdentity::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                let full = image.full();
                let remapped = match remap(&full, prefix, signed_prefix) {
                    Some(text) => match Named::parse(&text) {
                        Some(named) => named,
                        None => return false,
                    },
                    None => image,
                };
                repo_digest_or_exact(&remapped, &signed)
            }
        }
    }
}

fn repo_digest_or_exact(image: &Named, signed: &Named) -> bool {
    if image.tag.is_some() {
        image.full() == signed.full()
    } else if image.digest.is_some() {
        image.name == signed.name
    } else {
        false
    }
}

/// `reference` with `prefix` replaced, when `prefix` is all of it or ends at a
/// component boundary (`/`, `:`, `@`).
fn remap(reference: &str, prefix: &str, signed_prefix: &str) -> Option<String> {
    let rest = reference.strip_prefix(prefix)?;
    if rest.is_empty() || rest.starts_with(['/', ':', '@']) {
        Some(format!("{signed_prefix}{rest}"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SignedIdentity::*;

    const D: &str = "sha256:20bf21ed457b390829cdbeec8795a7bea1626991fda603e0d01b4e7f60427e55";

    fn image(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn upstream_matching_rules() {
        let latest = image("testing/manifest:latest");
        // Normalisation applies to both sides.
        assert!(MatchExact.matches(&latest, "testing/manifest:latest"));
        assert!(MatchExact.matches(&latest, "docker.io/testing/manifest:latest"));
        // No implicit :latest on the signed side.
        assert!(!MatchExact.matches(&latest, "testing/manifest"));
        assert!(!MatchExact.matches(
            &image("testing/manifest:notlatest"),
            "testing/manifest:latest"
        ));
        assert!(!MatchExact.matches(&latest, "UPPERCASEISINVALID"));
        assert!(MatchRepoDigestOrExact.matches(&latest, "testing/manifest:latest"));
        assert!(!MatchRepoDigestOrExact.matches(&latest, "testing/manifest"));
        let by_digest = image(&format!("testing/manifest@{D}"));
        assert!(MatchRepoDigestOrExact.matches(&by_digest, "testing/manifest:anything"));
        assert!(MatchRepoDigestOrExact.matches(&by_digest, "testing/manifest"));
        assert!(!MatchRepoDigestOrExact.matches(&by_digest, "testing/other"));
        let cosign = image("192.168.64.2:5000/cosign-signed-single-sample");
        assert!(MatchRepository.matches(&cosign, "192.168.64.2:5000/cosign-signed-single-sample"));
        assert!(!MatchExact.matches(&cosign, "192.168.64.2:5000/cosign-signed-single-sample"));
        assert!(!MatchRepository.matches(
            &image("testing/manifest:notlatest"),
            "192.168.64.2:5000/cosign-signed-single-sample"
        ));
        let exact = ExactReference("this/does-not:match".into());
        assert!(!exact.matches(&latest, "testing/manifest:latest"));
        assert!(exact.matches(&latest, "docker.io/this/does-not:match"));
        assert!(!ExactReference("this/does-not".into()).matches(&latest, "this/does-not"));
        let repo = ExactRepository("registry.access.redhat.com/rhel7/rhel".into());
        assert!(repo.matches(&latest, "registry.access.redhat.com/rhel7/rhel:7"));
        assert!(!repo.matches(&latest, "registry.access.redhat.com/rhel7/other:7"));
    }

    #[test]
    fn remap_identity_replaces_the_prefix_at_a_boundary() {
        let remap = RemapIdentity {
            prefix: "private-mirror:5000/vendor-mirror".into(),
            signed_prefix: "vendor.example.com".into(),
        };
        let mirrored = image("private-mirror:5000/vendor-mirror/app:1");
        assert!(remap.matches(&mirrored, "vendor.example.com/app:1"));
        assert!(!remap.matches(&mirrored, "private-mirror:5000/vendor-mirror/app:1"));
        assert!(!remap.matches(&mirrored, "vendor.example.com/app:2"));
        // Not at a boundary: no remapping, so the name must match as it is.
        let other = image("private-mirror:5000/vendor-mirrorx/app:1");
        assert!(!remap.matches(&other, "vendor.example.comx/app:1"));
        assert!(remap.matches(&other, "private-mirror:5000/vendor-mirrorx/app:1"));
    }
}
