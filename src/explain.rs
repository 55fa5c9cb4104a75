//! `cri-imaged explain IMAGE`: what a pull of IMAGE would do, from the daemon's
//! configuration, as JSON: how the name resolves (short names), and for each
//! candidate the policy.json verdict with its scope, the sources in order (mirrors,
//! then the origin unless blocked) and the credentials each would try (keys and
//! where they come from, never secrets).

use crate::auth::Keyring;
use crate::config::Config;
use crate::policy::{Policy, PolicyError, ShortNameError};
use crate::reference::Reference;
use crate::registry;
use crate::server::{self, ServerError};
use crate::trust_policy::{TrustPolicy, TrustPolicyError};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The configuration does not load (the daemon would not start either).
    #[error(transparent)]
    Config(#[from] ServerError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    TrustPolicy(#[from] TrustPolicyError),
    /// The name itself is invalid or ambiguous (a pull would fail the same way).
    #[error(transparent)]
    Name(#[from] ShortNameError),
}

/// The decision for `image`. The top-level `image`, `policy`, `sources`,
/// `candidates` describe the first candidate; `names` has every candidate.
pub async fn explain(config: &Config, image: &str) -> Result<Value, ExplainError> {
    let keyring = server::keyring(config)?;
    let policy = Policy::load(
        &config.registry.registries_conf,
        Some(&config.registry.registries_conf_d),
    )?;
    let trust =
        TrustPolicy::load_with(&config.registry.policy_json, &config.registry.registries_d)?;
    let resolved = policy.candidates(image)?;
    let mut names = Vec::new();
    for reference in &resolved.references {
        names.push(candidate(config, &keyring, &policy, &trust, reference).await);
    }
    let mut out = names.first().cloned().unwrap_or(Value::Null);
    out["resolution"] = json!(resolved.resolution.to_string());
    out["names"] = json!(names);
    out["matching"] = json!(keyring.matching().to_string());
    Ok(out)
}

/// The CA files and client certificate that apply to `host` (`host[:port]`).
fn tls(config: &Config, host: &str) -> Value {
    let Ok(url) = url::Url::parse(&format!("https://{host}/")) else {
        return Value::Null;
    };
    let dirs = [
        config.registry.ca_dir.clone(),
        config.registry.certs_d.clone(),
    ];
    let files = registry::tls_files(&dirs, url.host_str().unwrap_or_default(), url.port());
    json!({"cas": files.cas, "client_certificate": files.client_certificate})
}

async fn candidate(
    config: &Config,
    keyring: &Keyring,
    policy: &Policy,
    trust: &TrustPolicy,
    reference: &Reference,
) -> Value {
    let (scope, _) = trust.scope_for(reference);
    let mut verdict = json!({
        "file": config.registry.policy_json,
        "scope": scope,
    });
    match trust.check(reference) {
        Ok(pending) if pending.is_empty() => verdict["verdict"] = json!("accepted"),
        Ok(pending) => {
            let signatures = trust.registries_d().sources_for(reference);
            verdict["verdict"] =
                json!("accepted only with a valid signature for every requirement");
            verdict["requirements"] = json!(pending
                .requirements
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>());
            verdict["signatures"] = json!({
                "registries_d": config.registry.registries_d,
                "configured_by": signatures.configured_by,
                "lookaside": signatures.lookaside.as_str(),
                "sigstore_attachments": signatures.attachments,
            });
        }
        Err(refusal) => verdict["verdict"] = json!(refusal.to_string()),
    }
    let sources = match policy.sources(reference) {
        Ok(sources) => sources,
        Err(blocked) => {
            return json!({
                "image": reference.to_string(),
                "policy": verdict,
                "blocked": blocked.to_string(),
            })
        }
    };
    let mut all = Vec::new();
    let mut per_source = Vec::new();
    for source in &sources {
        let here: Vec<Value> = keyring
            .configured(&source.reference)
            .await
            .iter()
            .map(|c| json!({"key": c.key, "source": c.source, "kind": c.kind()}))
            .collect();
        all.extend(here.iter().cloned());
        per_source.push(json!({
            "kind": source.kind.to_string(),
            "registry": source.endpoint.host,
            "reference": source.reference.to_string(),
            "insecure": source.endpoint.insecure,
            "tls": tls(config, &source.endpoint.host),
            "candidates": here,
        }));
    }
    json!({
        "image": reference.to_string(),
        "policy": verdict,
        "sources": per_source,
        "candidates": all,
    })
}
