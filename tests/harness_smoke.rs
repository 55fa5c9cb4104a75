//! Proves the test harness itself against real components: containerd's own CRI pulls
//! our built images from each kind of registry, and `ctr run` runs them.

mod common;

use common::containerd::Containerd;
use common::cri::{self, proto, DaemonConfig};
use common::images::{self, ImageUser};
use common::registry::Registry;
use common::scenario::{cri_pull, password_auth};
use common::token::TokenUser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_cri_pulls_built_images_from_open_and_htpasswd_registries_and_ctr_runs_them() {
    // Start everything at once; each piece waits for its own readiness.
    let (containerd, open, private) = std::thread::scope(|s| {
        let containerd = s.spawn(Containerd::start);
        let open = s.spawn(Registry::open);
        let private = s.spawn(|| Registry::htpasswd("alice", "s3cret-pw"));
        (
            containerd.join().expect("containerd thread"),
            open.join().expect("open registry thread"),
            private.join().expect("htpasswd registry thread"),
        )
    });
    containerd.add_registry(&open);
    containerd.add_registry(&private);

    let plain = images::busybox().build().push(&open, "smoke/busybox");
    let nobody = images::busybox()
        .user(ImageUser::Name("nobody".into()))
        .app_text("private\n")
        .build()
        .push(&private, "smoke/private");
    let multi = images::multi_arch("v1").push(&open, "smoke/multi");

    // Open registry over plain HTTP: the image ID is the config digest we built.
    let id = cri_pull(containerd.socket(), &plain.reference, None)
        .await
        .expect("pull open");
    assert_eq!(id, plain.config_digest);

    // The multi-arch index resolves to the host's manifest.
    let id = cri_pull(containerd.socket(), &multi.reference, None)
        .await
        .expect("pull multi-arch");
    assert_eq!(id, multi.config_digest);
    assert_ne!(
        multi.manifests[0].config_digest(),
        multi.manifests[1].config_digest()
    );

    // TLS + htpasswd: anonymous fails, the right credentials work.
    let denied = cri_pull(containerd.socket(), &nobody.reference, None).await;
    assert!(
        denied.is_err(),
        "anonymous pull from the htpasswd registry succeeded"
    );
    let creds = private.credentials().expect("htpasswd credentials");
    let id = cri_pull(
        containerd.socket(),
        &nobody.reference,
        password_auth(&creds.username, &creds.password),
    )
    .await
    .expect("pull with credentials");
    assert_eq!(id, nobody.config_digest);

    // containerd's CRI lists what it pulled, under the tags we pushed.
    let mut client = cri::connect(containerd.socket()).await;
    let listed = client
        .list_images(proto::ListImagesRequest { filter: None })
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    for pushed in [&plain, &nobody, &multi] {
        let image = listed
            .iter()
            .find(|i| i.id == pushed.config_digest)
            .unwrap_or_else(|| panic!("{} not in ListImages: {listed:?}", pushed.reference));
        assert!(image.repo_tags.contains(&pushed.reference), "{image:?}");
        assert!(
            image.repo_digests.contains(&pushed.digest_reference),
            "{image:?}"
        );
    }
    let nobody_image = listed
        .iter()
        .find(|i| i.id == nobody.config_digest)
        .expect("listed");
    assert_eq!(nobody_image.username, "nobody");
    // Record what containerd counts as size (the daemon must report the same).
    let host = &nobody.manifests[0];
    assert_eq!(
        nobody_image.size,
        host.content_size() + host.manifest.size,
        "containerd's CRI size = manifest + config + compressed layers"
    );

    // containerd's CRI unpacked into overlayfs; ctr runs the image, with its User.
    assert!(containerd.is_unpacked(&plain.reference));
    // Judged by exit status: containerd 1.6 can lose a short-lived container's stdout
    // under load (containerd#770), so an output comparison would flake.
    containerd.run_ok(
        &plain.reference,
        &["/bin/sh", "-c", "[ \"$(echo hi)\" = hi ]"],
    );
    containerd.run_ok(
        &nobody.reference,
        &["/bin/sh", "-c", "[ \"$(id -u)\" = 65534 ]"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_cri_pulls_from_token_registry_with_password_and_identity_token() {
    let (containerd, registry) = std::thread::scope(|s| {
        let containerd = s.spawn(Containerd::start);
        let registry = s.spawn(|| {
            Registry::token(vec![
                TokenUser::new("bob", "bob-pw").pull("team/*"),
                TokenUser::new("eve", "eve-pw").pull("other/*"),
            ])
        });
        (
            containerd.join().expect("containerd thread"),
            registry.join().expect("token registry thread"),
        )
    });
    containerd.add_registry(&registry);
    let token = registry.token_server().expect("token server");
    let pushed = images::busybox()
        .user(ImageUser::Uid("1000".into()))
        .build()
        .push(&registry, "team/app");
    // skopeo got its push token with basic auth (GET).
    assert!(token
        .requests()
        .iter()
        .any(|r| r.method == "GET" && r.basic_user.as_deref() == Some("pusher")));

    token.clear_requests();
    let id = cri_pull(
        containerd.socket(),
        &pushed.reference,
        password_auth("bob", "bob-pw"),
    )
    .await
    .expect("pull as bob");
    assert_eq!(id, pushed.config_digest);
    // containerd 1.6 uses the OAuth2 password grant when given a password.
    let requests = token.requests();
    let grant = requests
        .iter()
        .find(|r| r.method == "POST" && r.status == 200)
        .unwrap_or_else(|| panic!("no successful POST: {requests:?}"));
    assert!(grant
        .form
        .contains(&("grant_type".into(), "password".into())));
    assert!(grant
        .form
        .contains(&("password".into(), "<redacted>".into())));
    assert_eq!(grant.granted[0].name, "team/app");

    // A user without access to team/* is refused; so is anonymous.
    assert!(cri_pull(
        containerd.socket(),
        &pushed.digest_reference,
        password_auth("eve", "eve-pw")
    )
    .await
    .is_err());
    assert!(
        cri_pull(containerd.socket(), &pushed.digest_reference, None)
            .await
            .is_err()
    );

    // identitytoken: containerd uses the refresh_token grant.
    token.clear_requests();
    let refresh = token.issue_refresh_token("bob");
    let id = cri_pull(
        containerd.socket(),
        &pushed.digest_reference,
        Some(proto::AuthConfig {
            identity_token: refresh.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("pull with identity token");
    assert_eq!(id, pushed.config_digest);
    assert!(token.requests().iter().any(|r| r.status == 200
        && r.form
            .contains(&("grant_type".into(), "refresh_token".into()))
        && r.form.contains(&("refresh_token".into(), refresh.clone()))));
}

#[test]
fn random_image_has_requested_size_and_layers() {
    let image = images::random_image(3 << 20, 3, "rand");
    let host = image.host();
    assert_eq!(host.layers.len(), 3);
    // Random data does not compress: gzip adds only headers.
    assert!(host.content_size() >= 3 << 20);
    assert!(host.content_size() < (3 << 20) + (64 << 10));
    // Layers are valid gzip whose content matches the diff_id.
    for (layer, diff_id) in host.layers.iter().zip(&host.diff_ids) {
        let gz = std::fs::read(image.blob_path(&layer.digest)).expect("layer blob");
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw)
            .expect("gunzip layer");
        let digest = ring::digest::digest(&ring::digest::SHA256, &raw);
        assert_eq!(&format!("sha256:{}", hex::encode(digest)), diff_id);
    }
    let other = images::random_image(1 << 20, 1, "rand");
    assert_ne!(other.host().layers[0].digest, host.layers[0].digest);
}

#[test]
fn daemon_config_renders_the_contract_keys() {
    let containerd = Containerd::start_with(common::containerd::ContainerdOptions {
        cri: false,
        ..Default::default()
    });
    let open = Registry::open();
    let config = DaemonConfig::new(&containerd)
        .registry(&open)
        .platform("linux/amd64");
    let dir = tempfile::tempdir().expect("temp dir");
    let (daemon_toml, registries_conf) = config.render(dir.path());
    let daemon: toml::Value = toml::from_str(&daemon_toml).expect("daemon config is TOML");
    assert_eq!(
        daemon["containerd"]["address"].as_str(),
        Some(containerd.address().as_str())
    );
    assert_eq!(daemon["containerd"]["namespace"].as_str(), Some("k8s.io"));
    assert_eq!(daemon["pull"]["platform"].as_str(), Some("linux/amd64"));
    assert!(daemon["server"]["listen"].as_str().is_some());
    assert!(daemon["registry"]["ca_dir"].as_str().is_some());
    assert!(daemon["credentials"]["kubelet_root_dir"].as_str().is_some());
    let registries: toml::Value =
        toml::from_str(&registries_conf).expect("registries.conf is TOML");
    assert_eq!(
        registries["registry"][0]["location"].as_str(),
        Some(open.host())
    );
    assert_eq!(registries["registry"][0]["insecure"].as_bool(), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_realm_on_another_host_works_for_skopeo_and_containerd() {
    let (containerd, registry) = std::thread::scope(|s| {
        let containerd = s.spawn(Containerd::start);
        let registry = s.spawn(|| {
            Registry::token_with(common::token::TokenOptions {
                users: vec![TokenUser::new("bob", "bob-pw").pull("*")],
                realm_host: "localhost".into(),
                ..Default::default()
            })
        });
        (
            containerd.join().expect("containerd thread"),
            registry.join().expect("token registry thread"),
        )
    });
    let token = registry.token_server().expect("token server");
    assert!(token.realm().starts_with("https://localhost:"));
    containerd.add_registry(&registry);
    let pushed = images::busybox().build().push(&registry, "delegated/app");
    let id = cri_pull(
        containerd.socket(),
        &pushed.reference,
        password_auth("bob", "bob-pw"),
    )
    .await
    .expect("pull with the realm on localhost");
    assert_eq!(id, pushed.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_tree_images_unpack_on_a_journaled_containerd_root() {
    let (containerd, open) = std::thread::scope(|s| {
        let containerd = s.spawn(|| {
            Containerd::start_with(common::containerd::ContainerdOptions {
                journaled_root_mib: Some(512),
                ..Default::default()
            })
        });
        let open = s.spawn(Registry::open);
        (
            containerd.join().expect("containerd thread"),
            open.join().expect("registry thread"),
        )
    });
    containerd.add_registry(&open);
    // containerd's root is the loop-mounted ext4, with a journal.
    let root = containerd.root();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(root.to_str().expect("utf-8 root")))
        .unwrap_or_else(|| panic!("{} is not a mount point", root.display()));
    assert!(line.contains(" - ext4 /dev/loop"), "{line}");

    // Small trees: the debug build's gzip is slow (the benchmarks build big ones
    // in release).
    let dirs = [
        std::path::Path::new("/usr/include/linux"),
        std::path::Path::new("/usr/share/doc/adduser"),
    ];
    let pushed = images::host_tree_image(&dirs, "tree").push(&open, "smoke/tree");
    let id = cri_pull(containerd.socket(), &pushed.reference, None)
        .await
        .expect("containerd's CRI pulls the tree image");
    assert_eq!(id, pushed.config_digest);
    assert!(containerd.is_unpacked(&pushed.reference));
}
