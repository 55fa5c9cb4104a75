//! Platform selection: which manifest of an index this node runs.
//!
//! Matches containerd's default matcher closely enough that the manifest we unpack
//! is the one containerd's CRI resolves for the same image: same OS, same
//! architecture (after normalising aliases), and a compatible variant.

use crate::oci::{Descriptor, Platform};
use std::fmt;
use std::str::FromStr;

/// A wanted platform: `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("platform {0:?} is not of the form os/arch[/variant]")]
pub struct PlatformError(String);

impl PlatformSpec {
    /// The platform of this host, as containerd would report it.
    pub fn host() -> Self {
        let architecture = normalize_arch(std::env::consts::ARCH).to_string();
        let variant = match architecture.as_str() {
            "arm64" => Some("v8".to_string()),
            "arm" => Some("v7".to_string()),
            _ => None,
        };
        PlatformSpec {
            os: std::env::consts::OS.to_string(),
            architecture,
            variant,
        }
    }

    /// Whether an index entry's platform can run here.
    pub fn matches(&self, p: &Platform) -> bool {
        if p.os != self.os || normalize_arch(&p.architecture) != self.architecture {
            return false;
        }
        let theirs = normalize_variant(&self.architecture, p.variant.as_deref());
        let ours = normalize_variant(&self.architecture, self.variant.as_deref());
        match (ours, theirs) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => a == b,
        }
    }

    /// Picks the manifest for this platform from an index's entries: the first exact
    /// match, preferring an entry whose variant is given and equal over one without.
    pub fn select<'a>(&self, manifests: &'a [Descriptor]) -> Option<&'a Descriptor> {
        let candidates = manifests
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| self.matches(p)));
        let mut best: Option<&Descriptor> = None;
        for d in candidates {
            let exact = d
                .platform
                .as_ref()
                .and_then(|p| p.variant.as_ref())
                .is_some();
            match best {
                None => best = Some(d),
                Some(b)
                    if exact
                        && b.platform
                            .as_ref()
                            .and_then(|p| p.variant.as_ref())
                            .is_none() =>
                {
                    best = Some(d)
                }
                _ => {}
            }
        }
        best
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for PlatformSpec {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || PlatformError(s.to_string());
        let ok = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(bad());
        }
        let architecture = normalize_arch(&parts[1].to_ascii_lowercase()).to_string();
        Ok(PlatformSpec {
            os: parts[0].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
            architecture,
        })
    }
}

fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" | "x86" => "386",
        "armhf" | "armel" => "arm",
        a => a,
    }
}

/// Variants that mean "the base variant" compare as none.
fn normalize_variant<'a>(arch: &str, v: Option<&'a str>) -> Option<&'a str> {
    match (arch, v) {
        ("arm64", Some("v8")) | ("amd64", Some("v1")) => None,
        (_, Some("")) => None,
        (_, v) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn entry(os: &str, arch: &str, variant: Option<&str>, tag: &[u8]) -> Descriptor {
        let mut d = Descriptor::new(crate::oci::OCI_MANIFEST, Digest::of(tag), 1);
        d.platform = Some(Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
            os_version: None,
        });
        d
    }

    #[test]
    fn parses_platform_specs() {
        let p: PlatformSpec = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        let p: PlatformSpec = "linux/x86_64".parse().unwrap();
        assert_eq!(p.architecture, "amd64");
        assert!("linux".parse::<PlatformSpec>().is_err());
        assert!("linux//v7".parse::<PlatformSpec>().is_err());
        assert!("a/b/c/d".parse::<PlatformSpec>().is_err());
    }

    #[test]
    fn selects_the_matching_manifest() {
        let entries = vec![
            entry("linux", "arm", Some("v6"), b"armv6"),
            entry("linux", "arm", Some("v7"), b"armv7"),
            entry("linux", "arm64", None, b"arm64"),
            entry("linux", "amd64", None, b"amd64"),
            entry("windows", "amd64", None, b"win"),
        ];
        let pick = |s: &str| {
            let spec: PlatformSpec = s.parse().unwrap();
            spec.select(&entries).map(|d| d.digest.clone())
        };
        assert_eq!(pick("linux/amd64"), Some(Digest::of(b"amd64")));
        assert_eq!(pick("linux/arm64/v8"), Some(Digest::of(b"arm64")));
        assert_eq!(pick("linux/arm/v7"), Some(Digest::of(b"armv7")));
        assert_eq!(pick("windows/amd64"), Some(Digest::of(b"win")));
        assert_eq!(pick("linux/s390x"), None);
    }

    #[test]
    fn host_platform_is_normalised() {
        let h = PlatformSpec::host();
        assert_eq!(h.os, std::env::consts::OS);
        assert!(!h.architecture.contains('_'));
    }
}
