//! policy.json (containers-policy.json(5)) against a real registry and containerd:
//! scopes by host and by repository, the default, and a signature requirement whose
//! key cannot be read (it fails closed). A rejected pull contacts no registry and
//! leaves nothing in containerd. Verified signatures: `tests/signatures.rs`.

mod common;

use common::cri::{explain, DaemonConfig};
use common::images;
use common::leftovers::assert_nothing_left;
use common::registry::Registry;
use common::scenario::{pull_err_code, pull_ok, start};
use tonic::Code;

/// The log lines of requests the registry served to anyone but skopeo (the pusher).
fn pulled_from(registry: &Registry) -> usize {
    registry
        .log()
        .lines()
        .filter(|l| l.contains("/v2/") && l.contains("GET") && !l.contains("skopeo/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_scope_accepts_inside_a_rejected_host_and_rejections_name_scope_and_file() {
    let (containerd, registry) = start(Registry::open);
    let allowed = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "team/allowed");
    let other = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "team/other");
    let host = registry.host();
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&format!(
            r#"{{"default": [{{"type": "insecureAcceptAnything"}}],
                "transports": {{"docker": {{
                    "{host}": [{{"type": "reject"}}],
                    "{host}/team/allowed": [{{"type": "insecureAcceptAnything"}}]
                }}}}}}"#
        ))
        .start();
    let status = pull_err_code(&daemon, &other.reference, Code::PermissionDenied).await;
    let message = status.message();
    assert!(
        message.contains(&format!("rejected by scope \"{host}\""))
            && message.contains("policy.json"),
        "{message}"
    );
    assert_eq!(
        pulled_from(&registry),
        0,
        "a rejected image contacts no registry"
    );
    assert_nothing_left(&containerd, &[], "a pull policy.json rejects");
    assert_eq!(
        pull_ok(&daemon, &allowed.reference, None).await,
        allowed.config_digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_requirement_whose_key_is_missing_fails_closed_with_kubelets_reason() {
    let (containerd, registry) = start(Registry::open);
    let image = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "signed/app");
    let host = registry.host();
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&format!(
            r#"{{"default": [{{"type": "reject"}}],
                "transports": {{"docker": {{
                    "{host}/signed": [{{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/etc/pki/key.gpg"}}]
                }}}}}}"#
        ))
        .start();
    let status = pull_err_code(&daemon, &image.reference, Code::PermissionDenied).await;
    assert!(
        status.message().starts_with("SignatureValidationFailed: ")
            && status.message().contains("signedBy")
            && status.message().contains(&format!("\"{host}/signed\""))
            && status.message().contains("cannot read /etc/pki/key.gpg"),
        "{}",
        status.message()
    );
    assert_nothing_left(&containerd, &[], "a pull policy.json refuses unsigned");
    // The default rejects what no scope names.
    let status = pull_err_code(
        &daemon,
        "docker.io/library/busybox:1",
        Code::PermissionDenied,
    )
    .await;
    assert!(
        status.message().contains("rejected by the default"),
        "{}",
        status.message()
    );
}

#[test]
fn explain_shows_the_verdict_and_its_scope() {
    let (containerd, registry) = start(Registry::open);
    let host = registry.host();
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&format!(
            r#"{{"default": [{{"type": "insecureAcceptAnything"}}],
                "transports": {{"docker": {{"{host}/blocked": [{{"type": "reject"}}]}}}}}}"#
        ))
        .start();
    let decision = |image: &str| explain(daemon.config_path(), image).0;
    let refused = decision(&format!("{host}/blocked/app:1"));
    assert_eq!(refused["policy"]["scope"], format!("{host}/blocked"));
    assert!(refused["policy"]["verdict"]
        .as_str()
        .unwrap()
        .contains("rejected"));
    let accepted = decision(&format!("{host}/fine/app:1"));
    assert_eq!(accepted["policy"]["scope"], "default");
    assert_eq!(accepted["policy"]["verdict"], "accepted");
    assert_eq!(accepted["sources"][0]["kind"], "origin");
    assert_eq!(accepted["sources"][0]["registry"], host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_json_and_registries_conf_reload_while_the_daemon_runs() {
    let (containerd, registry) = start(Registry::open);
    let image = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "live/app");
    let host = registry.host();
    let reject = format!(
        r#"{{"default": [{{"type": "insecureAcceptAnything"}}],
            "transports": {{"docker": {{"{host}/live": [{{"type": "reject"}}]}}}}}}"#
    );
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&reject)
        .start();
    let policy_json = daemon.dir().join("policy.json");
    pull_err_code(&daemon, &image.reference, Code::PermissionDenied).await;
    // Accepting now: the next pull sees it, no restart.
    std::fs::write(
        &policy_json,
        r#"{"default": [{"type": "insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    assert_eq!(
        pull_ok(&daemon, &image.reference, None).await,
        image.config_digest
    );
    // A broken edit keeps the last good policy and says so.
    std::fs::write(&policy_json, "{ not json").unwrap();
    assert_eq!(
        pull_ok(&daemon, &image.reference, None).await,
        image.config_digest
    );
    assert!(
        daemon
            .log()
            .contains("does not load; keeping the last good one"),
        "{}",
        daemon.log()
    );
    // registries.conf too: blocking the registry refuses the next pull.
    let conf = daemon.registries_conf_path().to_path_buf();
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!(
        "\n[[registry]]\nprefix = \"{host}/live\"\nblocked = true\n"
    ));
    std::fs::write(&conf, text).unwrap();
    let blocked = pull_err_code(&daemon, &image.reference, Code::PermissionDenied).await;
    assert!(
        blocked.message().contains("is blocked"),
        "{}",
        blocked.message()
    );
}
