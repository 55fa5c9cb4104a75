//! Signed images end to end: policy.json `signedBy` and `sigstoreSigned` against a
//! real registry and containerd. GPG signatures are made by skopeo and gpg and read
//! from a lookaside served over HTTP; containers/image's own verifier (`skopeo copy`
//! with the same policy and registries.d) must agree with the daemon on every image.
//! Cosign-format signatures (made with ring by the harness; the format is proven
//! against cosign's own fixtures in `src/signature`) are read from the registry's
//! `sha256-<hex>.sig` tag, also through a mirror. Every refusal is
//! `SignatureValidationFailed` and leaves nothing in containerd.

mod common;

use common::cri::{explain, DaemonConfig};
use common::fake_registry::FakeRegistry;
use common::images;
use common::leftovers::{assert_nothing_left, assert_serving};
use common::registry::Registry;
use common::scenario::{pull_err_code, pull_ok, start, start_many};
use common::signing::{self, CosignKey, CosignSignature, GpgKey, SignatureStaging};
use serde_json::json;
use tonic::Code;

/// Pulls `image`, expecting a signature refusal whose message holds every `parts`;
/// checks nothing was written and the daemon still serves.
async fn refused(
    daemon: &common::cri::Daemon,
    containerd: &common::containerd::Containerd,
    before: &[String],
    image: &str,
    parts: &[&str],
) {
    let status = pull_err_code(daemon, image, Code::PermissionDenied).await;
    let message = status.message();
    assert!(
        message.starts_with("SignatureValidationFailed: "),
        "{image}: {message}"
    );
    for part in parts {
        assert!(
            message.contains(part),
            "{image}: wanted {part:?} in {message}"
        );
    }
    assert_nothing_left(containerd, before, &format!("refusing {image}"));
    assert_serving(daemon.socket()).await;
}

fn app(text: &str) -> images::OciImage {
    images::busybox().tag("1").app_text(text).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpg_signatures_from_an_http_lookaside_agree_with_skopeo() {
    let (containerd, registry) = start(Registry::open);
    let host = registry.host().to_string();
    let key = GpgKey::generate("trusted signer");
    let stranger = GpgKey::generate("someone else");
    let staging = SignatureStaging::new();
    let signed = signing::push_gpg_signed(&app("signed"), &registry, "team/signed", &key, &staging);
    let by_stranger = signing::push_gpg_signed(
        &app("stranger"),
        &registry,
        "team/stranger",
        &stranger,
        &staging,
    );
    let unsigned = app("unsigned").push(&registry, "team/unsigned");
    // Signed as another name: refused by the default identity, accepted where
    // remapIdentity maps that name.
    let elsewhere = format!("{host}/vendor/app:1");
    let mismatch = signing::try_push_gpg_signed(
        &app("mismatch"),
        &registry,
        "team/mismatch",
        "1",
        &key,
        &staging,
        Some(&elsewhere),
    )
    .unwrap();
    let remapped = signing::try_push_gpg_signed(
        &app("remapped"),
        &registry,
        "mirror/app",
        "1",
        &key,
        &staging,
        Some(&elsewhere),
    )
    .unwrap();
    let rejected = signing::push_gpg_signed(
        &app("rejected"),
        &registry,
        "team/rejected/app",
        &key,
        &staging,
    );
    // A multi-arch image: skopeo --all --sign-by signs the index and every platform
    // manifest; the platform manifest's signature is the one checked.
    let multi = signing::push_gpg_signed(
        &images::multi_arch("1"),
        &registry,
        "team/multi",
        &key,
        &staging,
    );
    // A good signature by the trusted key, but of another manifest.
    let wrong_digest = app("wrong digest").push(&registry, "team/wrong-digest");
    let elsewhere_signed = key
        .standalone_sign(b"{\"schemaVersion\": 2}", &wrong_digest.reference)
        .unwrap();
    staging
        .write_signature(
            "team/wrong-digest",
            &wrong_digest.digest,
            1,
            &elsewhere_signed,
        )
        .unwrap();
    let lookaside = staging.serve();
    let yaml = format!(
        "docker:\n  \"{host}\":\n    lookaside: {}\n",
        lookaside.url()
    );
    let key_path = key.public_key_path().display().to_string();
    let signed_by = |identity: serde_json::Value| {
        let mut r = json!({"type": "signedBy", "keyType": "GPGKeys", "keyPath": key_path});
        if !identity.is_null() {
            r["signedIdentity"] = identity;
        }
        r
    };
    let policy = json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {
            host.clone(): [signed_by(serde_json::Value::Null)],
            format!("{host}/mirror"): [signed_by(json!({
                "type": "remapIdentity",
                "prefix": format!("{host}/mirror"),
                "signedPrefix": format!("{host}/vendor"),
            }))],
            format!("{host}/team/rejected"): [{"type": "reject"}],
        }}
    })
    .to_string();
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&policy)
        .registries_d("lookaside.yaml", &yaml)
        .start();
    let readers = signing::RegistriesD::from_yaml(&yaml);

    // containers/image's verdicts first: the reference for ours.
    let skopeo = |image: &str| signing::skopeo_accepts(&policy, readers.path(), image, &registry);
    for (image, accepted) in [
        (&signed.reference, true),
        (&remapped.reference, true),
        (&by_stranger.reference, false),
        (&unsigned.reference, false),
        (&mismatch.reference, false),
        (&wrong_digest.reference, false),
        (&multi.reference, true),
        (&rejected.reference, false),
    ] {
        let verdict = skopeo(image);
        assert_eq!(verdict.is_ok(), accepted, "skopeo on {image}: {verdict:?}");
    }

    refused(
        &daemon,
        &containerd,
        &[],
        &by_stranger.reference,
        &[
            "team/stranger",
            &by_stranger.digest,
            &format!("scope \"{host}\""),
            "none of 1 signature(s) was accepted",
        ],
    )
    .await;
    refused(
        &daemon,
        &containerd,
        &[],
        &unsigned.reference,
        &[
            "no signature found",
            &format!("{}/team/unsigned@sha256=", lookaside.url()),
        ],
    )
    .await;
    refused(
        &daemon,
        &containerd,
        &[],
        &mismatch.reference,
        &[
            &format!("signed for \"{elsewhere}\""),
            "matchRepoDigestOrExact",
        ],
    )
    .await;
    refused(
        &daemon,
        &containerd,
        &[],
        &wrong_digest.reference,
        &[&format!(
            "is not the pulled manifest's {}",
            wrong_digest.digest
        )],
    )
    .await;
    // A reject scope refuses before any signature is read.
    let status = pull_err_code(&daemon, &rejected.reference, Code::PermissionDenied).await;
    assert!(
        status.message().contains("is rejected by scope"),
        "{}",
        status.message()
    );
    assert!(!lookaside
        .requests()
        .iter()
        .any(|r| r.path.contains("team/rejected")));

    let skopeo_requests = lookaside.requests().len();
    assert_eq!(
        pull_ok(&daemon, &multi.reference, None).await,
        multi.config_digest
    );
    let platform = multi
        .manifests
        .iter()
        .find(|m| m.platform == images::host_platform())
        .unwrap();
    let platform_signature = format!(
        "/team/multi@{}/signature-1",
        platform.manifest.digest.replace(':', "=")
    );
    assert!(
        lookaside.requests()[skopeo_requests..]
            .iter()
            .any(|r| r.path == platform_signature && r.status == 200),
        "{:?}",
        lookaside.requests()
    );
    assert_eq!(
        pull_ok(&daemon, &signed.reference, None).await,
        signed.config_digest
    );
    assert_eq!(
        pull_ok(&daemon, &remapped.reference, None).await,
        remapped.config_digest
    );
    // The signature was read from the lookaside, then the next number, missing.
    let hex = signed.digest.trim_start_matches("sha256:");
    let asked: Vec<(String, u16)> = lookaside
        .requests()
        .into_iter()
        .skip(skopeo_requests)
        .filter(|r| r.path.starts_with("/team/signed@"))
        .map(|r| (r.path, r.status))
        .collect();
    assert_eq!(
        asked,
        [
            (format!("/team/signed@sha256={hex}/signature-1"), 200),
            (format!("/team/signed@sha256={hex}/signature-2"), 404),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosign_signatures_from_registry_attachments_and_through_a_mirror() {
    let (containerd, registries) =
        start_many(vec![Box::new(Registry::open), Box::new(Registry::open)]);
    let (registry, mirror) = (&registries[0], &registries[1]);
    let host = registry.host().to_string();
    let key = CosignKey::generate();
    let stranger = CosignKey::generate();
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("cosign.pub");
    key.write_public_key(&key_path).unwrap();

    let signed = app("cosigned").push(registry, "team/signed");
    signing::sign_sigstore(
        registry,
        "team/signed",
        &signed.digest,
        &format!("{host}/team/signed"),
        key.key_pair(),
    );
    let by_stranger = app("cosigned by a stranger").push(registry, "team/stranger");
    signing::sign_sigstore(
        registry,
        "team/stranger",
        &by_stranger.digest,
        &format!("{host}/team/stranger"),
        stranger.key_pair(),
    );
    // A good signature, but for another manifest, stored under this one's tag.
    let other_digest = app("another").push(registry, "team/wrong-digest");
    let wrong = app("wrong digest").push(registry, "team/wrong-digest");
    let claim = CosignSignature::sign(
        key.key_pair(),
        &format!("{host}/team/wrong-digest"),
        &other_digest.digest,
    )
    .unwrap();
    signing::push_cosign_signatures(registry, "team/wrong-digest", &wrong.digest, &[claim])
        .unwrap();
    let unsigned = app("not cosigned").push(registry, "team/unsigned");
    // Only the mirror holds this one, signed for the name clients ask for.
    let mirrored = app("mirrored").push(mirror, "team/mirrored");
    signing::sign_sigstore(
        mirror,
        "team/mirrored",
        &mirrored.digest,
        &format!("{host}/team/mirrored"),
        key.key_pair(),
    );

    let policy = json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {
            host.clone(): [{"type": "sigstoreSigned", "keyPath": key_path, "signedIdentity": {"type": "matchRepository"}}],
        }}
    })
    .to_string();
    let daemon = DaemonConfig::new(&containerd)
        .registry(registry)
        .registry(mirror)
        .registries_conf(&format!(
            "[[registry]]\nprefix = \"{host}/team/mirrored\"\nlocation = \"{host}/team/mirrored\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{}/team/mirrored\"\ninsecure = true\n",
            mirror.host()
        ))
        .policy_json(&policy)
        // As in containers/image, registries.d is read for the source contacted: the
        // mirror needs its own entry to have its attachments read.
        .registries_d(
            "sigstore.yaml",
            &format!(
                "docker:\n  \"{host}\":\n    use-sigstore-attachments: true\n  \"{}\":\n    use-sigstore-attachments: true\n",
                mirror.host()
            ),
        )
        .start();

    refused(
        &daemon,
        &containerd,
        &[],
        &by_stranger.reference,
        &["not signed by any configured key"],
    )
    .await;
    refused(
        &daemon,
        &containerd,
        &[],
        &wrong.reference,
        &[&format!(
            "signed manifest digest {} is not the pulled manifest's {}",
            other_digest.digest, wrong.digest
        )],
    )
    .await;
    refused(
        &daemon,
        &containerd,
        &[],
        &unsigned.reference,
        &[
            "no signature found",
            &format!("sigstore attachments {host}/team/unsigned:sha256-"),
        ],
    )
    .await;

    // Multi-arch: the signature of the index does not stand for the platform's.
    let multi = images::multi_arch("1").push(registry, "team/multi");
    signing::sign_sigstore(
        registry,
        "team/multi",
        &multi.digest,
        &format!("{host}/team/multi"),
        key.key_pair(),
    );
    let platform = multi
        .manifests
        .iter()
        .find(|m| m.platform == images::host_platform())
        .unwrap();
    refused(
        &daemon,
        &containerd,
        &[],
        &multi.reference,
        &[
            &format!(
                "team/multi:sha256-{}.sig",
                platform.manifest.digest.trim_start_matches("sha256:")
            ),
            &format!(
                "the platform manifest {} must be signed, not only the index {}",
                platform.manifest.digest, multi.digest
            ),
        ],
    )
    .await;
    signing::sign_sigstore(
        registry,
        "team/multi",
        &platform.manifest.digest,
        &format!("{host}/team/multi"),
        key.key_pair(),
    );
    assert_eq!(
        pull_ok(&daemon, &multi.reference, None).await,
        multi.config_digest
    );

    let decision = explain(daemon.config_path(), &signed.reference).0;
    let requirement = decision["policy"]["requirements"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        requirement.starts_with("sigstoreSigned by key") && requirement.contains("matchRepository"),
        "{decision}"
    );
    assert_eq!(
        decision["policy"]["signatures"]["sigstore_attachments"],
        true
    );

    assert_eq!(
        pull_ok(&daemon, &signed.reference, None).await,
        signed.config_digest
    );
    let asked = format!("{host}/team/mirrored:1");
    assert_eq!(pull_ok(&daemon, &asked, None).await, mirrored.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_are_read_only_where_registries_d_enables_them() {
    let (containerd, registry) = start(Registry::open);
    let host = registry.host().to_string();
    let key = CosignKey::generate();
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("cosign.pub");
    key.write_public_key(&key_path).unwrap();
    let signed = app("cosigned").push(&registry, "team/signed");
    signing::sign_sigstore(
        &registry,
        "team/signed",
        &signed.digest,
        &format!("{host}/team/signed"),
        key.key_pair(),
    );
    let policy = json!({
        "default": [{"type": "insecureAcceptAnything"}],
        "transports": {"docker": {
            format!("{host}/team"): [{"type": "sigstoreSigned", "keyPath": key_path, "signedIdentity": {"type": "matchRepository"}}],
        }}
    })
    .to_string();
    // containers/image reads attachments only when told to; so do we, and say so.
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&policy)
        .start();
    refused(
        &daemon,
        &containerd,
        &[],
        &signed.reference,
        &["no signature found", "use-sigstore-attachments"],
    )
    .await;
    // A lookaside that cannot be read is no verdict on the image: Unavailable, and
    // the error names the (credential-free) URL.
    let down = DaemonConfig::new(&containerd)
        .registry(&registry)
        .policy_json(&policy)
        .registries_d(
            "down.yaml",
            "default-docker:\n  lookaside: http://127.0.0.1:1/sigs\n",
        )
        .start();
    let status = pull_err_code(&down, &signed.reference, Code::Unavailable).await;
    assert!(
        status
            .message()
            .contains("cannot read signature http://127.0.0.1:1/sigs/team/signed@sha256="),
        "{}",
        status.message()
    );
    assert!(!status.message().starts_with("SignatureValidationFailed"));
    assert_nothing_left(&containerd, &[], "a pull whose signatures cannot be read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosign_signatures_found_through_the_oci_referrers_api() {
    // docker-registry 2.8 has no referrers API: the in-process registry offers it.
    let containerd = common::scenario::containerd_without_cri();
    let fake = FakeRegistry::start();
    let host = fake.host();
    let image = app("referred");
    let reference = fake.serve_image(&image, "team/app");
    let subject = image.host().manifest.clone();
    let key = CosignKey::generate();
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("cosign.pub");
    key.write_public_key(&key_path).unwrap();
    let signature =
        CosignSignature::sign(key.key_pair(), &format!("{host}/team/app"), &subject.digest)
            .unwrap();
    let payload_size = signature.payload.len();
    let payload = fake.put_blob(signature.payload.clone());
    let config = fake.put_blob(b"{}".to_vec());
    let artifact = "application/vnd.dev.cosign.artifact.sig.v1+json";
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": artifact,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": payload,
            "size": payload_size,
            "annotations": signature.annotations,
        }],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
    });
    fake.put_referrer(
        "team/app",
        &subject.digest,
        artifact,
        manifest.to_string().into_bytes(),
    );
    let policy = json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {
            host.clone(): [{"type": "sigstoreSigned", "keyPath": key_path, "signedIdentity": {"type": "matchRepository"}}],
        }}
    })
    .to_string();
    let daemon = DaemonConfig::new(&containerd)
        .registries_conf(&fake.insecure_entry())
        .policy_json(&policy)
        .registries_d(
            "sigstore.yaml",
            &format!("docker:\n  \"{host}\":\n    use-sigstore-attachments: true\n"),
        )
        .start();
    assert_eq!(
        pull_ok(&daemon, &reference, None).await,
        image.host().config.digest
    );
    let seen: Vec<(String, u16)> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("sha256-") || r.path.contains("/referrers/"))
        .map(|r| (r.path, r.status))
        .collect();
    let hex = subject.digest.trim_start_matches("sha256:");
    assert_eq!(
        seen,
        [
            (format!("/v2/team/app/manifests/sha256-{hex}.sig"), 404),
            (format!("/v2/team/app/referrers/{}", subject.digest), 200),
        ]
    );
}
