//! The signing harness checked with independent tools only (skopeo, gpg, openssl,
//! plain HTTP), never the daemon: GPG-signed pushes land in the lookaside layout and
//! skopeo's own verifier accepts them through the lookaside server, and cosign-format
//! signature manifests read back from the registry verify with the public key.

mod common;

use std::process::Command;

use common::images::{self, MEDIA_MANIFEST};
use common::registry::Registry;
use common::signing::{
    add_gpg_signature, cosign_payload, cosign_tag, gpg_policy, http_get, push_cosign_signatures,
    push_gpg_signed, sign_sigstore, skopeo_accepts, CosignKey, CosignSignature, GpgKey, GpgKeyType,
    RegistriesD, SignatureStaging, COSIGN_SIGNATURE_ANNOTATION, MEDIA_COSIGN_SIMPLESIGNING,
};
use common::{must, run};

/// The simple-signing payload of `signature`, checked by gpg against `key`'s keyring.
fn gpg_payload(key: &GpgKey, signature: &[u8]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signature");
    std::fs::write(&path, signature).unwrap();
    let output = must(run(Command::new("gpg")
        .arg("--homedir")
        .arg(key.gnupg_home())
        .args(["--batch", "--status-fd", "2", "--decrypt"])
        .arg(&path)));
    let status = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.contains(&format!("[GNUPG:] VALIDSIG {}", key.fingerprint())),
        "{status}"
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
    )
}

#[test]
fn gpg_signed_push_is_served_from_the_lookaside_and_accepted_by_skopeo() {
    let registry = Registry::open();
    let key = GpgKey::generate("signer");
    let staging = SignatureStaging::new();
    let image = images::busybox().tag("1").build();
    let pushed = push_gpg_signed(&image, &registry, "team/app", &key, &staging);
    assert_eq!(pushed.digest, image.top.digest);

    // Layout: ROOT/REPO@sha256=HEX/signature-1, no registry host.
    let hex = pushed.digest.trim_start_matches("sha256:");
    let relative = format!("team/app@sha256={hex}/signature-1");
    assert!(staging.root().join(&relative).is_file(), "{relative}");
    let signatures = staging.signatures("team/app", &pushed.digest);
    assert_eq!(signatures.len(), 1);
    let payload = gpg_payload(&key, &signatures[0]);
    assert_eq!(
        payload["critical"]["identity"]["docker-reference"],
        pushed.reference
    );
    assert_eq!(
        payload["critical"]["image"]["docker-manifest-digest"],
        pushed.digest
    );
    assert_eq!(payload["critical"]["type"], "atomic container signature");

    let server = staging.serve();
    let served = must(http_get(&format!("{}/{relative}", server.url()), None));
    assert_eq!((served.status, &served.body), (200, &signatures[0]));
    let missing = must(http_get(
        &format!("{}/team/app@sha256={hex}/signature-2", server.url()),
        None,
    ));
    assert_eq!(missing.status, 404);

    let reader = RegistriesD::lookaside(registry.host(), &server.url());
    let policy = gpg_policy(registry.host(), key.public_key_path());
    let before = server.requests().len();
    assert_eq!(
        skopeo_accepts(&policy, reader.path(), &pushed.reference, &registry),
        Ok(())
    );
    let fetched: Vec<String> = server.requests()[before..]
        .iter()
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect();
    assert_eq!(
        fetched,
        [
            format!("GET /{relative} 200"),
            format!("GET /team/app@sha256={hex}/signature-2 404"),
        ]
    );
    // By digest too: the default identity (matchRepoDigestOrExact) accepts it.
    assert_eq!(
        skopeo_accepts(&policy, reader.path(), &pushed.digest_reference, &registry),
        Ok(())
    );
}

#[test]
fn skopeo_rejects_another_keys_policy_an_unsigned_image_and_a_signature_for_another_digest() {
    let registry = Registry::open();
    let key = GpgKey::generate("signer");
    let other = GpgKey::generate("other");
    let staging = SignatureStaging::new();
    let signed_image = images::busybox().tag("1").build();
    let signed = push_gpg_signed(&signed_image, &registry, "team/app", &key, &staging);
    let unsigned = images::busybox()
        .tag("1")
        .app_text("unsigned\n")
        .build()
        .push(&registry, "team/unsigned");
    let server = staging.serve();
    let reader = RegistriesD::lookaside(registry.host(), &server.url());

    let wrong_key = gpg_policy(registry.host(), other.public_key_path());
    let refused = skopeo_accepts(&wrong_key, reader.path(), &signed.reference, &registry)
        .expect_err("a policy trusting another key accepted the image");
    assert!(
        refused.contains("Source image rejected") && refused.contains("GPG signature"),
        "{refused}"
    );

    let policy = gpg_policy(registry.host(), key.public_key_path());
    let refused = skopeo_accepts(&policy, reader.path(), &unsigned.reference, &registry)
        .expect_err("an unsigned image was accepted");
    assert!(refused.contains("no signature exists"), "{refused}");

    // A good signature by the trusted key, but over another manifest, stored as the
    // unsigned image's signature.
    let signed_manifest = std::fs::read(signed_image.blob_path(&signed.digest)).unwrap();
    let misplaced = must(key.standalone_sign(&signed_manifest, &unsigned.reference));
    must(staging.write_signature("team/unsigned", &unsigned.digest, 1, &misplaced));
    let refused = skopeo_accepts(&policy, reader.path(), &unsigned.reference, &registry)
        .expect_err("a signature of another manifest was accepted");
    assert!(
        refused.contains("Source image rejected") && refused.contains("does not match"),
        "{refused}"
    );
    assert!(server.served().contains(&format!(
        "/team/unsigned@{}/signature-1",
        unsigned.digest.replacen(':', "=", 1)
    )));
}

#[test]
fn a_second_signature_by_an_rsa_key_is_appended_and_accepted_on_its_own() {
    let registry = Registry::open();
    let first = GpgKey::generate("first");
    let second = GpgKey::generate_with("second", GpgKeyType::Rsa2048);
    let staging = SignatureStaging::new();
    let pushed = push_gpg_signed(
        &images::busybox().tag("1").build(),
        &registry,
        "team/app",
        &first,
        &staging,
    );
    must(add_gpg_signature(&registry, &pushed, &second, &staging));
    let signatures = staging.signatures("team/app", &pushed.digest);
    assert_eq!(signatures.len(), 2);
    gpg_payload(&first, &signatures[0]);
    let payload = gpg_payload(&second, &signatures[1]);
    assert_eq!(
        payload["critical"]["image"]["docker-manifest-digest"],
        pushed.digest
    );

    let server = staging.serve();
    let reader = RegistriesD::lookaside(registry.host(), &server.url());
    let policy = gpg_policy(
        &format!("{}/team", registry.host()),
        second.public_key_path(),
    );
    assert_eq!(
        skopeo_accepts(&policy, reader.path(), &pushed.reference, &registry),
        Ok(())
    );
}

/// Verifies `signature` (DER) over `payload` with the PEM public key, using the
/// openssl CLI: independent of ring, which signed it.
fn openssl_verifies(public_pem: &str, payload: &[u8], signature: &[u8]) -> bool {
    must(common::require_tool("openssl", "openssl"));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let key = write("cosign.pub", public_pem.as_bytes());
    let payload = write("payload", payload);
    let signature = write("signature.der", signature);
    Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&key)
        .arg("-signature")
        .arg(&signature)
        .arg(&payload)
        .output()
        .unwrap()
        .status
        .success()
}

/// A cosign signature manifest as read back from the registry.
struct ReadBack {
    manifest_bytes: Vec<u8>,
    manifest: serde_json::Value,
    /// Each layer's (payload blob, annotations).
    layers: Vec<(Vec<u8>, serde_json::Value)>,
}

/// The signature manifest at `REPO:sha256-HEX.sig` and its layers, read with plain
/// HTTP GETs.
fn read_cosign(registry: &Registry, repo: &str, signed_digest: &str) -> ReadBack {
    let url = format!(
        "{}/v2/{repo}/manifests/{}",
        registry.url(),
        cosign_tag(signed_digest)
    );
    let reply = must(http_get(&url, Some(MEDIA_MANIFEST)));
    assert_eq!(reply.status, 200, "{url}");
    assert_eq!(reply.content_type.as_deref(), Some(MEDIA_MANIFEST));
    let manifest: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            assert_eq!(layer["mediaType"], MEDIA_COSIGN_SIMPLESIGNING);
            let digest = layer["digest"].as_str().unwrap();
            let blob = must(http_get(
                &format!("{}/v2/{repo}/blobs/{digest}", registry.url()),
                None,
            ));
            assert_eq!(blob.status, 200);
            assert_eq!(sha256(&blob.body), digest);
            (blob.body, layer["annotations"].clone())
        })
        .collect();
    ReadBack {
        manifest_bytes: reply.body,
        manifest,
        layers,
    }
}

fn annotation_signature(annotations: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = annotations[COSIGN_SIGNATURE_ANNOTATION].as_str().unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[test]
fn cosign_signature_manifest_reads_back_byte_for_byte_and_verifies() {
    let registry = Registry::open();
    let pushed = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "team/app");
    let key = CosignKey::generate();
    let push = sign_sigstore(
        &registry,
        "team/app",
        &pushed.digest,
        &pushed.repository,
        key.key_pair(),
    );
    let hex = pushed.digest.trim_start_matches("sha256:");
    assert_eq!(push.tag, format!("sha256-{hex}.sig"));

    let ReadBack {
        manifest_bytes,
        manifest,
        layers,
    } = read_cosign(&registry, "team/app", &pushed.digest);
    assert_eq!(manifest_bytes, push.manifest);
    assert_eq!(sha256(&manifest_bytes), push.manifest_digest);
    assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(layers.len(), 1);
    let (payload, annotations) = &layers[0];
    assert_eq!(
        String::from_utf8_lossy(payload),
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{}"}},"image":{{"docker-manifest-digest":"{}"}},"type":"cosign container image signature"}},"optional":null}}"#,
            pushed.repository, pushed.digest
        )
    );
    let signature = annotation_signature(annotations);
    let pem = key.public_key_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    assert!(openssl_verifies(&pem, payload, &signature));
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        key.public_key_bytes(),
    )
    .verify(payload, &signature)
    .expect("ring verifies the signature");
    // The same key over other bytes does not verify: the check can fail.
    assert!(!openssl_verifies(&pem, b"tampered", &signature));
}

#[test]
fn several_cosign_signatures_are_layers_and_may_claim_any_digest_or_key() {
    let registry = Registry::open();
    let pushed = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "team/app");
    let key = CosignKey::generate();
    let stranger = CosignKey::generate();
    let other_digest = format!("sha256:{}", "ab".repeat(32));
    let good = must(CosignSignature::sign(
        key.key_pair(),
        &pushed.repository,
        &pushed.digest,
    ));
    let wrong_digest = must(CosignSignature::sign(
        key.key_pair(),
        &pushed.repository,
        &other_digest,
    ));
    let wrong_key = must(CosignSignature::sign(
        stranger.key_pair(),
        "elsewhere.example/app",
        &pushed.digest,
    ));
    must(push_cosign_signatures(
        &registry,
        "team/app",
        &pushed.digest,
        &[good.clone(), wrong_digest.clone(), wrong_key.clone()],
    ));
    let layers = read_cosign(&registry, "team/app", &pushed.digest).layers;
    let expected = [&good, &wrong_digest, &wrong_key];
    assert_eq!(layers.len(), expected.len());
    for ((payload, annotations), sent) in layers.iter().zip(expected) {
        assert_eq!(payload, &sent.payload);
        assert_eq!(annotation_signature(annotations), sent.signature_der());
    }
    let pem = key.public_key_pem();
    assert!(openssl_verifies(&pem, &layers[0].0, &good.signature_der()));
    assert_eq!(
        layers[1].0,
        cosign_payload(&pushed.repository, &other_digest)
    );
    assert!(openssl_verifies(
        &pem,
        &layers[1].0,
        &wrong_digest.signature_der()
    ));
    assert!(!openssl_verifies(
        &pem,
        &layers[2].0,
        &wrong_key.signature_der()
    ));
    assert!(openssl_verifies(
        &stranger.public_key_pem(),
        &layers[2].0,
        &wrong_key.signature_der()
    ));
    let path = tempfile::tempdir().unwrap();
    let pub_path = path.path().join("cosign.pub");
    must(key.write_public_key(&pub_path));
    assert_eq!(std::fs::read_to_string(&pub_path).unwrap(), pem);
}
