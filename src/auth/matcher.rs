//! Matching docker `config.json` `auths` keys against images: keys may be globs
//! on the host and path prefixes (seed 002).
//!
//! Two modes:
//! - `kubelet` (default): kubelet's `URLsMatch` — equal ports, the same number of
//!   dot-separated host labels, each label glob-matched on its own, the key's path a
//!   string prefix of the image's path; candidates in reverse-lexicographic key order.
//! - `span-labels`: seed 002 read literally — `*` and `?` may span dots, so
//!   `*my-registry.io` matches `a.sub.my-registry.io`; paths match at segment
//!   boundaries; the most specific key first.

use crate::reference::{DOCKER_HUB, DOCKER_HUB_REGISTRY};
use serde::Deserialize;
use std::cmp::Ordering;
use std::fmt;

/// How `auths` keys match images (`[credentials] matching`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Matching {
    #[default]
    Kubelet,
    SpanLabels,
}

impl fmt::Display for Matching {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Matching::Kubelet => "kubelet",
            Matching::SpanLabels => "span-labels",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("auths key {0:?} is empty")]
    Empty(String),
    #[error("auths key {key:?}: {why}")]
    Invalid { key: String, why: &'static str },
    #[error("auths key {key:?}: host pattern is malformed: {why}")]
    BadPattern { key: String, why: &'static str },
}

/// A parsed `auths` key: scheme stripped, a leading `/v1/` or `/v2/` dropped, and
/// Docker Hub's aliases folded into `docker.io`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKey {
    /// The key as written in the file.
    pub raw: String,
    /// `host[:port][/path]` after normalisation: what is sorted and shown.
    pub normalized: String,
    host: String,
    port: String,
    path: String,
}

/// Where an image lives, split as the matcher needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLocation {
    host: String,
    port: String,
    /// `/repository/path`.
    path: String,
}

impl ImageLocation {
    /// From a reference's registry domain (`host[:port]`) and repository path.
    pub fn new(domain: &str, repository: &str) -> Self {
        let (host, port) = split_port(domain);
        ImageLocation {
            host: fold_hub(host).to_string(),
            port: port.to_string(),
            path: format!("/{repository}"),
        }
    }
}

impl AuthKey {
    pub fn parse(raw: &str) -> Result<AuthKey, KeyError> {
        let invalid = |why| KeyError::Invalid {
            key: raw.to_string(),
            why,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(KeyError::Empty(raw.to_string()));
        }
        let without_scheme = trimmed
            .strip_prefix("https://")
            .or_else(|| trimmed.strip_prefix("http://"))
            .unwrap_or(trimmed);
        if without_scheme.contains("://") {
            return Err(invalid("only http:// and https:// schemes are understood"));
        }
        // No query or fragment is stripped: '?' is a glob character in a host pattern.
        let (authority, path) = match without_scheme.find('/') {
            Some(i) => without_scheme.split_at(i),
            None => (without_scheme, ""),
        };
        if authority.is_empty() {
            return Err(invalid("no registry host"));
        }
        if authority.contains('@') {
            return Err(invalid("user information in a key is not supported"));
        }
        let (host, port) = split_port(authority);
        if host.is_empty() {
            return Err(invalid("no registry host"));
        }
        if !port.is_empty() && !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("the port is not a number"));
        }
        validate_pattern(host).map_err(|why| KeyError::BadPattern {
            key: raw.to_string(),
            why,
        })?;
        // docker treats `/v1/` and `/v2/` after the host as the host itself.
        let path = if path.starts_with("/v1/") || path.starts_with("/v2/") {
            &path[3..]
        } else {
            path
        };
        let path = if path == "/" { "" } else { path };
        let host = fold_hub(host);
        let mut normalized = host.to_string();
        if !port.is_empty() {
            normalized.push(':');
            normalized.push_str(port);
        }
        normalized.push_str(path);
        Ok(AuthKey {
            raw: raw.to_string(),
            normalized,
            host: host.to_string(),
            port: port.to_string(),
            path: path.to_string(),
        })
    }

    /// Whether this key applies to an image at `image`.
    pub fn matches(&self, image: &ImageLocation, mode: Matching) -> bool {
        if self.port != image.port {
            return false;
        }
        match mode {
            Matching::Kubelet => {
                let key_labels: Vec<&str> = self.host.split('.').collect();
                let image_labels: Vec<&str> = image.host.split('.').collect();
                key_labels.len() == image_labels.len()
                    && image.path.starts_with(&self.path)
                    && key_labels
                        .iter()
                        .zip(&image_labels)
                        .all(|(k, i)| glob_match(k, i, false))
            }
            Matching::SpanLabels => {
                let key_path = self.path.trim_end_matches('/');
                let path_ok = key_path.is_empty()
                    || image.path == key_path
                    || image
                        .path
                        .strip_prefix(key_path)
                        .is_some_and(|rest| rest.starts_with('/'));
                path_ok && glob_match(&self.host, &image.host, true)
            }
        }
    }

    /// Order in which matching keys are tried: `Less` means `self` first.
    pub fn try_order(&self, other: &AuthKey, mode: Matching) -> Ordering {
        match mode {
            // kubelet sorts its index in reverse: longer paths before their prefixes,
            // and literal hosts before `*`, which sorts low.
            Matching::Kubelet => other.normalized.cmp(&self.normalized),
            Matching::SpanLabels => {
                let spec = |k: &AuthKey| {
                    (
                        k.path
                            .trim_end_matches('/')
                            .split('/')
                            .filter(|s| !s.is_empty())
                            .count(),
                        k.host
                            .chars()
                            .filter(|c| !matches!(c, '*' | '?' | '['))
                            .count(),
                        !k.host.contains(['*', '?', '[']),
                    )
                };
                spec(other)
                    .cmp(&spec(self))
                    .then_with(|| other.normalized.cmp(&self.normalized))
            }
        }
    }
}

fn split_port(authority: &str) -> (&str, &str) {
    if authority.starts_with('[') {
        // [v6]:port
        return match authority.rsplit_once("]:") {
            Some((h, p)) => (&authority[..h.len() + 1], p),
            None => (authority, ""),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h, p),
        None => (authority, ""),
    }
}

fn fold_hub(host: &str) -> &str {
    match host {
        "index.docker.io" | DOCKER_HUB_REGISTRY => DOCKER_HUB,
        h => h,
    }
}

/// Checks a host pattern's syntax (the grammar seed 002 gives): classes closed and
/// non-empty, no trailing escape.
fn validate_pattern(p: &str) -> Result<(), &'static str> {
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return Err("a trailing '\\' escapes nothing");
                }
                i += 2;
            }
            '[' => {
                i = class_end(&chars, i + 1).ok_or("a '[' class is not closed or is empty")?;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Given the index just after '[', returns the index after the closing ']'.
fn class_end(chars: &[char], mut i: usize) -> Option<usize> {
    if chars.get(i) == Some(&'^') {
        i += 1;
    }
    let start = i;
    loop {
        match chars.get(i)? {
            ']' if i > start => return Some(i + 1),
            ']' => return None,
            '\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Whether `class` (the text between '[' and ']', with an optional leading '^')
/// contains `c`.
fn class_matches(class: &[char], c: char) -> bool {
    let (negated, body) = match class.first() {
        Some('^') => (true, &class[1..]),
        _ => (false, class),
    };
    let mut i = 0;
    let mut hit = false;
    while i < body.len() {
        let (lo, next) = if body[i] == '\\' && i + 1 < body.len() {
            (body[i + 1], i + 2)
        } else {
            (body[i], i + 1)
        };
        if next + 1 < body.len() && body[next] == '-' {
            let (hi, after) = if body[next + 1] == '\\' && next + 2 < body.len() {
                (body[next + 2], next + 3)
            } else {
                (body[next + 1], next + 2)
            };
            hit |= lo <= c && c <= hi;
            i = after;
        } else {
            hit |= lo == c;
            i = next;
        }
    }
    hit != negated
}

/// Glob match of a whole `text`. `*` matches any run of characters and `?` any one;
/// unless `span_dots`, neither matches a '.' (kubelet matches one label at a time,
/// where no '.' occurs, so this only matters in span-labels mode).
pub(crate) fn glob_match(pattern: &str, text: &str, span_dots: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    if validate_pattern(pattern).is_err() {
        return false;
    }
    glob_at(&p, &t, span_dots)
}

fn glob_at(p: &[char], t: &[char], span_dots: bool) -> bool {
    let wild_ok = |c: char| span_dots || c != '.';
    match p.first() {
        None => t.is_empty(),
        Some('*') => {
            // Try every split: the star takes t[..k].
            let rest = &p[1..];
            for k in 0..=t.len() {
                if glob_at(rest, &t[k..], span_dots) {
                    return true;
                }
                if k < t.len() && !wild_ok(t[k]) {
                    return false;
                }
            }
            false
        }
        Some('?') => t.first().is_some_and(|&c| wild_ok(c)) && glob_at(&p[1..], &t[1..], span_dots),
        Some('[') => {
            let Some(end) = class_end(p, 1) else {
                return false;
            };
            t.first().is_some_and(|&c| class_matches(&p[1..end - 1], c))
                && glob_at(&p[end..], &t[1..], span_dots)
        }
        Some('\\') => {
            p.get(1).is_some_and(|&c| t.first() == Some(&c)) && glob_at(&p[2..], &t[1..], span_dots)
        }
        Some(&c) => t.first() == Some(&c) && glob_at(&p[1..], &t[1..], span_dots),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> AuthKey {
        AuthKey::parse(k).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `image` is `host[:port]/path` as in seed 002's list.
    fn loc(image: &str) -> ImageLocation {
        let (domain, path) = image.split_once('/').unwrap_or((image, ""));
        ImageLocation::new(domain, path)
    }

    fn m(k: &str, image: &str, mode: Matching) -> bool {
        key(k).matches(&loc(image), mode)
    }

    /// Seed 002: `*my-registry.io/images` and the images it names.
    const SEED_002_IMAGES: [&str; 5] = [
        "my-registry.io/images",
        "my-registry.io/images/my-image",
        "my-registry.io/images/another-image",
        "sub.my-registry.io/images/my-image",
        "a.sub.my-registry.io/images/my-image",
    ];

    #[test]
    fn seed_002_examples_all_match_in_span_labels_mode() {
        for image in SEED_002_IMAGES {
            assert!(
                m("*my-registry.io/images", image, Matching::SpanLabels),
                "{image}"
            );
        }
    }

    #[test]
    fn seed_002_examples_in_kubelet_mode_match_only_equal_label_counts() {
        // kubelet compares label by label: `*my-registry` matches `my-registry`, but
        // `sub.my-registry.io` has three labels against the key's two.
        let outcomes = [true, true, true, false, false];
        for (image, want) in SEED_002_IMAGES.iter().zip(outcomes) {
            assert_eq!(
                m("*my-registry.io/images", image, Matching::Kubelet),
                want,
                "{image}"
            );
        }
        assert!(m(
            "*.my-registry.io/images",
            "sub.my-registry.io/images/my-image",
            Matching::Kubelet
        ));
        assert!(!m(
            "*.my-registry.io/images",
            "a.sub.my-registry.io/images/my-image",
            Matching::Kubelet
        ));
        assert!(m(
            "*.*.my-registry.io/images",
            "a.sub.my-registry.io/images/my-image",
            Matching::Kubelet
        ));
    }

    #[test]
    fn seed_002_subpath_key_is_tried_before_its_prefix() {
        for mode in [Matching::Kubelet, Matching::SpanLabels] {
            let image = loc("my-registry.io/images/subpath/my-image");
            let mut keys = [
                key("my-registry.io/images"),
                key("my-registry.io/images/subpath"),
            ];
            assert!(keys.iter().all(|k| k.matches(&image, mode)), "{mode}");
            keys.sort_by(|a, b| a.try_order(b, mode));
            assert_eq!(keys[0].raw, "my-registry.io/images/subpath", "{mode}");
        }
    }

    #[test]
    fn paths_are_string_prefixes_for_kubelet_and_segments_for_span_labels() {
        assert!(m("r.io/images", "r.io/imagesfoo/app", Matching::Kubelet));
        assert!(!m(
            "r.io/images",
            "r.io/imagesfoo/app",
            Matching::SpanLabels
        ));
        assert!(m("r.io/images/", "r.io/images/app", Matching::SpanLabels));
        assert!(!m("r.io/images/app", "r.io/images", Matching::Kubelet));
        assert!(m("r.io", "r.io/any/thing", Matching::Kubelet));
    }

    #[test]
    fn ports_must_be_equal() {
        for mode in [Matching::Kubelet, Matching::SpanLabels] {
            assert!(m("r.io:5000", "r.io:5000/app", mode));
            assert!(!m("r.io", "r.io:5000/app", mode));
            assert!(!m("r.io:5000", "r.io/app", mode));
            assert!(!m("r.io:5000", "r.io:5001/app", mode));
            assert!(m("127.0.0.1:5000", "127.0.0.1:5000/a/b", mode));
        }
    }

    #[test]
    fn schemes_and_v1_v2_paths_are_stripped() {
        assert_eq!(key("https://index.docker.io/v1/").normalized, "docker.io");
        assert_eq!(key("http://r.io:5000/v2/").normalized, "r.io:5000");
        assert_eq!(key("https://r.io/v2/team").normalized, "r.io/team");
        assert_eq!(key("r.io/").normalized, "r.io");
        assert_eq!(key("r.io/v1x").normalized, "r.io/v1x");
    }

    #[test]
    fn docker_hub_aliases_are_one_registry() {
        for k in [
            "docker.io",
            "index.docker.io",
            "https://index.docker.io/v1/",
            "registry-1.docker.io",
        ] {
            for mode in [Matching::Kubelet, Matching::SpanLabels] {
                assert!(m(k, "docker.io/library/busybox", mode), "{k}");
                assert!(m(k, "index.docker.io/library/busybox", mode), "{k}");
            }
        }
        assert!(m(
            "docker.io/library",
            "docker.io/library/busybox",
            Matching::Kubelet
        ));
        assert!(!m(
            "docker.io/other",
            "docker.io/library/busybox",
            Matching::Kubelet
        ));
    }

    #[test]
    fn glob_syntax_of_seed_002() {
        let cases = [
            ("r?g.io", "reg.io", true),
            ("r?g.io", "rg.io", false),
            ("[a-c]eg.io", "beg.io", true),
            ("[a-c]eg.io", "deg.io", false),
            ("[^a-c]eg.io", "deg.io", true),
            ("[^a-c]eg.io", "aeg.io", false),
            ("[\\]]x.io", "]x.io", true),
            ("\\*x.io", "*x.io", true),
            ("\\*x.io", "ax.io", false),
            ("*.io", "r.io", true),
            ("*", "localhost", true),
            ("re*ry.io", "registry.io", true),
            ("[rs]eg.io", "seg.io", true),
        ];
        for (k, host, want) in cases {
            for mode in [Matching::Kubelet, Matching::SpanLabels] {
                assert_eq!(
                    m(k, &format!("{host}/app"), mode),
                    want,
                    "{k} vs {host} ({mode})"
                );
            }
        }
        // `?` and `*` do not cross a '.' in kubelet mode; they do in span-labels mode.
        assert!(!m("r?io", "r.io/app", Matching::Kubelet));
        assert!(m("r?io", "r.io/app", Matching::SpanLabels));
    }

    #[test]
    fn bad_keys_are_rejected() {
        for k in [
            "",
            "   ",
            "[a-.io",
            "[].io",
            "r.io\\",
            "https://",
            "ftp://r.io",
            "r.io:port",
            "u@r.io",
        ] {
            assert!(AuthKey::parse(k).is_err(), "{k:?} should be rejected");
        }
    }

    #[test]
    fn kubelet_order_is_reverse_lexicographic() {
        let mut keys: Vec<AuthKey> = ["*.r.io", "a.r.io", "a.r.io/team", "r.io"]
            .iter()
            .map(|k| key(k))
            .collect();
        keys.sort_by(|a, b| a.try_order(b, Matching::Kubelet));
        let order: Vec<&str> = keys.iter().map(|k| k.raw.as_str()).collect();
        assert_eq!(order, ["r.io", "a.r.io/team", "a.r.io", "*.r.io"]);
    }

    #[test]
    fn span_labels_order_is_most_specific_first() {
        let mut keys: Vec<AuthKey> = [
            "*my-registry.io",
            "*my-registry.io/images",
            "sub.my-registry.io",
            "sub.my-registry.io/images",
        ]
        .iter()
        .map(|k| key(k))
        .collect();
        keys.sort_by(|a, b| a.try_order(b, Matching::SpanLabels));
        let order: Vec<&str> = keys.iter().map(|k| k.raw.as_str()).collect();
        assert_eq!(
            order,
            [
                "sub.my-registry.io/images",
                "*my-registry.io/images",
                "sub.my-registry.io",
                "*my-registry.io"
            ]
        );
    }
}
