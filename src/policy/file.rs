//! One registries.conf file (the main file or a `.d` drop-in) read into a [`Layer`]:
//! the v2 format (`[[registry]]`, `[[registry.mirror]]`, `unqualified-search-registries`,
//! `short-name-mode`, `[aliases]`) and the v1 format (`[registries.search]`,
//! `[registries.insecure]`, `[registries.block]`) as containers/image reads it.

use super::{
    is_registry_location, normalize_hub, Mirror, MirrorUse, PolicyError, Rule, ShortNameMode,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
    unqualified_search_registries: Option<Vec<String>>,
    short_name_mode: Option<String>,
    aliases: Option<BTreeMap<String, String>>,
    /// The v1 format.
    registries: Option<V1>,
    /// v2's version marker; nothing to act on.
    #[allow(dead_code)]
    version: Option<u32>,
    /// v2 keys this daemon has no use for (credential helpers are podman's).
    #[allow(dead_code)]
    credential_helpers: Option<Vec<String>>,
    #[allow(dead_code)]
    additional_layer_store_auth_helper: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct V1 {
    #[serde(default)]
    search: V1List,
    #[serde(default)]
    insecure: V1List,
    #[serde(default)]
    block: V1List,
}

#[derive(Debug, Deserialize, Default)]
struct V1List {
    #[serde(default)]
    registries: Vec<String>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(rename_all = "kebab-case")]
struct RegistryEntry {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    mirror_by_digest_only: bool,
    #[serde(default)]
    mirror: Vec<MirrorEntry>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(rename_all = "kebab-case")]
struct MirrorEntry {
    #[serde(default)]
    location: String,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    pull_from_mirror: Option<String>,
}

/// What one file says; `None` where it says nothing (a drop-in then leaves the
/// earlier value alone).
#[derive(Debug, Default)]
pub(super) struct Layer {
    pub path: PathBuf,
    /// Read from the v1 tables (not allowed in drop-ins).
    pub v1: bool,
    pub rules: Vec<Rule>,
    pub search: Option<Vec<String>>,
    pub mode: Option<ShortNameMode>,
    /// Short name → fully qualified repository; an empty value removes an alias.
    pub aliases: BTreeMap<String, String>,
}

pub(super) fn parse(text: &str, path: &Path) -> Result<Layer, PolicyError> {
    let mut unknown = Vec::new();
    let file: File = serde_ignored::deserialize(toml::Deserializer::new(text), |key| {
        unknown.push(key.to_string())
    })
    .map_err(|source| PolicyError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    // containers/image ignores keys it does not know too; say so, with the line.
    for key in &unknown {
        let name = key.rsplit('.').next().unwrap_or(key);
        let line = text
            .lines()
            .position(|l| {
                l.trim_start()
                    .strip_prefix(name)
                    .or_else(|| l.trim_start().strip_prefix(&format!("\"{name}\"")))
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
            .map(|i| i + 1);
        tracing::warn!(
            file = %path.display(),
            key = %key,
            line = ?line,
            "unknown registries.conf key; ignored"
        );
    }
    let invalid_file = |why: String| PolicyError::InvalidFile {
        path: path.to_path_buf(),
        why,
    };
    let mut layer = Layer {
        path: path.to_path_buf(),
        ..Layer::default()
    };
    if let Some(v1) = file.registries {
        // containers/image refuses a file that mixes the two formats.
        if !file.registry.is_empty() || file.unqualified_search_registries.is_some() {
            return Err(invalid_file(
                "mixes the v1 [registries.*] tables with v2 keys".into(),
            ));
        }
        return v1_layer(v1, layer, &invalid_file);
    }
    layer.search = file.unqualified_search_registries;
    layer.mode = match file.short_name_mode.as_deref() {
        None | Some("") => None,
        Some("enforcing") => Some(ShortNameMode::Enforcing),
        Some("permissive") => Some(ShortNameMode::Permissive),
        Some("disabled") => Some(ShortNameMode::Disabled),
        Some(other) => {
            return Err(invalid_file(format!(
                "short-name-mode {other:?} is not \"enforcing\", \"permissive\" or \"disabled\""
            )))
        }
    };
    for (short, target) in file.aliases.unwrap_or_default() {
        if !target.is_empty() && !is_registry_location(&normalize_hub(&target)) {
            return Err(invalid_file(format!(
                "alias {short:?} = {target:?}: not a fully qualified repository (host/path)"
            )));
        }
        layer.aliases.insert(short, normalize_hub(&target));
    }
    for (index, entry) in file.registry.into_iter().enumerate() {
        let invalid = |why: &str| PolicyError::Invalid {
            path: path.to_path_buf(),
            index,
            why: why.to_string(),
        };
        let rule = rule(entry, path, &invalid)?;
        // OpenShift renders one prefix in several entries (seed 004 §9.2.3: digest-only
        // mirrors in one, `blocked` and a tag-only mirror in another). They are one
        // rule: mirrors in file order, blocked or insecure if any entry says so.
        match layer.rules.iter_mut().find(|r| r.prefix == rule.prefix) {
            Some(earlier) if earlier.location != rule.location => {
                return Err(invalid(&format!(
                    "prefix {:?} appears again with another location ({:?}, {:?})",
                    rule.prefix, earlier.location, rule.location
                )));
            }
            Some(earlier) => {
                earlier.insecure |= rule.insecure;
                earlier.blocked |= rule.blocked;
                earlier.mirrors.extend(rule.mirrors);
            }
            None => layer.rules.push(rule),
        }
    }
    Ok(layer)
}

fn rule(
    entry: RegistryEntry,
    path: &Path,
    invalid: &dyn Fn(&str) -> PolicyError,
) -> Result<Rule, PolicyError> {
    let location = entry.location.clone().unwrap_or_default();
    // `prefix = ""` is how OpenShift renders "same as location" (seed 004).
    let prefix = entry
        .prefix
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| location.clone());
    if prefix.is_empty() {
        return Err(invalid("needs a prefix or a location"));
    }
    if prefix.starts_with("*.") && !location.is_empty() {
        return Err(invalid("a wildcard prefix cannot have a location"));
    }
    if !location.is_empty() && !is_registry_location(&normalize_hub(&location)) {
        return Err(invalid(
            "location is not a registry host[:port] optionally followed by /path",
        ));
    }
    if prefix.starts_with("*.") && !entry.mirror.is_empty() {
        return Err(invalid("mirrors under a wildcard prefix are not supported"));
    }
    let mut mirrors = Vec::new();
    for (m, mirror) in entry.mirror.iter().enumerate() {
        let invalid_mirror = |why: String| invalid(&format!("mirror {m}: {why}"));
        let location = normalize_hub(&mirror.location);
        if !is_registry_location(&location) {
            return Err(invalid_mirror(format!(
                "location {:?} is not a registry host[:port] optionally followed by /path",
                mirror.location
            )));
        }
        let serves = match mirror.pull_from_mirror.as_deref() {
            None | Some("all") | Some("") => MirrorUse::All,
            Some("digest-only") => MirrorUse::DigestOnly,
            Some("tag-only") => MirrorUse::TagOnly,
            Some(other) => {
                return Err(invalid_mirror(format!(
                    "pull-from-mirror {other:?} is not \"all\", \"digest-only\" or \"tag-only\""
                )))
            }
        };
        // As containers/image: the entry-wide switch and a per-mirror choice other
        // than "all" contradict each other.
        if entry.mirror_by_digest_only && serves != MirrorUse::All {
            return Err(invalid_mirror(
                "pull-from-mirror cannot be combined with mirror-by-digest-only".into(),
            ));
        }
        mirrors.push(Mirror {
            location,
            insecure: mirror.insecure,
            serves: if entry.mirror_by_digest_only {
                MirrorUse::DigestOnly
            } else {
                serves
            },
        });
    }
    Ok(Rule {
        prefix: normalize_hub(&prefix),
        location: normalize_hub(if location.is_empty() {
            &prefix
        } else {
            &location
        }),
        insecure: entry.insecure,
        blocked: entry.blocked,
        mirrors,
        path: path.to_path_buf(),
    })
}

/// The v1 tables as v2 rules: each listed registry a prefix of its own.
fn v1_layer(
    v1: V1,
    mut layer: Layer,
    invalid_file: &dyn Fn(String) -> PolicyError,
) -> Result<Layer, PolicyError> {
    layer.v1 = true;
    layer.search = Some(v1.search.registries);
    for (registries, insecure, blocked) in [
        (&v1.insecure.registries, true, false),
        (&v1.block.registries, false, true),
    ] {
        for registry in registries {
            let prefix = normalize_hub(registry);
            if !is_registry_location(&prefix) {
                return Err(invalid_file(format!(
                    "[registries.*] entry {registry:?} is not a registry host[:port]"
                )));
            }
            match layer.rules.iter_mut().find(|r| r.prefix == prefix) {
                Some(rule) => {
                    rule.insecure |= insecure;
                    rule.blocked |= blocked;
                }
                None => layer.rules.push(Rule {
                    location: prefix.clone(),
                    prefix,
                    insecure,
                    blocked,
                    mirrors: Vec::new(),
                    path: layer.path.clone(),
                }),
            }
        }
    }
    Ok(layer)
}
