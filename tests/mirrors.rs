//! registries.conf mirrors and blocked registries (seed 004: ImageDigestMirrorSet,
//! ImageTagMirrorSet, NeverContactSource, blockedRegistries) against real
//! docker-registry instances and a real containerd: mirrors are tried in order, a dead
//! or empty mirror hands over to the next source, a blocked origin is never
//! contacted, credentials are the mirror host's own, and whatever served the image it
//! is recorded under the name that was asked for.

mod common;

use common::containerd::Containerd;
use common::cri::{explain, DaemonConfig};
use common::images::{self, PushedImage};
use common::registry::Registry;
use common::scenario::{pull_err, pull_err_code, pull_ok, start_many, status};
use tonic::Code;

/// A loopback `host:port` where nothing listens (connections are refused).
fn dead_host() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    drop(listener);
    format!("127.0.0.1:{port}")
}

/// The busybox test image, tagged `tag`, pushed to `registry` as `repo`.
fn pushed(registry: &Registry, repo: &str, tag: &str) -> PushedImage {
    images::busybox().tag(tag).build().push(registry, repo)
}

/// The log lines of requests for `/v2/<repo>/...` that `registry` served to anyone
/// but skopeo (which pushed the test images).
fn requests_for(registry: &Registry, repo: &str) -> usize {
    let needle = format!("/v2/{repo}/");
    registry
        .log()
        .lines()
        .filter(|l| l.contains(&needle) && !l.contains("skopeo/"))
        .count()
}

/// Asserts that the image pulled as `asked` is recorded under `asked` (tag and repo
/// digest), in cri-imaged's and containerd's own CRI, whatever source served it.
async fn recorded_as_asked(
    containerd: &Containerd,
    daemon: &common::cri::Daemon,
    asked: &str,
    image: &PushedImage,
) {
    let repo = asked.rsplit_once(':').map_or(asked, |(r, _)| r);
    let digest_name = format!("{repo}@{}", image.digest);
    for socket in [daemon.socket(), containerd.socket()] {
        let mut found = None;
        for _ in 0..100 {
            found = status(socket, asked).await;
            if found.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let found = found.unwrap_or_else(|| panic!("{asked} unknown to {}", socket.display()));
        assert_eq!(found.id, image.config_digest);
        assert_eq!(found.repo_tags, [asked.to_string()], "{}", socket.display());
        assert_eq!(
            found.repo_digests,
            std::slice::from_ref(&digest_name),
            "{}",
            socket.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_and_first_mirror_refusing_the_second_mirror_serves() {
    let (containerd, registries) = start_many(vec![Box::new(Registry::open)]);
    let mirror = &registries[0];
    let image = pushed(mirror, "cache/team/app", "1");
    let origin = dead_host();
    let refused = dead_host();
    let daemon = DaemonConfig::new(&containerd)
        .registry(mirror)
        .registries_conf(&format!(
            "[[registry]]\nprefix = \"{origin}/team\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{refused}/x\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{}/cache/team\"\ninsecure = true\n",
            mirror.host()
        ))
        .start();
    let asked = format!("{origin}/team/app:1");
    assert_eq!(pull_ok(&daemon, &asked, None).await, image.config_digest);
    recorded_as_asked(&containerd, &daemon, &asked, &image).await;
    let log = daemon.log();
    assert!(
        log.contains("source failed; trying the next one") && log.contains(&refused),
        "the refusing mirror is logged and skipped:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_without_the_tag_falls_through_to_the_origin() {
    let (containerd, registries) =
        start_many(vec![Box::new(Registry::open), Box::new(Registry::open)]);
    let (origin, mirror) = (&registries[0], &registries[1]);
    let image = pushed(origin, "apps/web", "2");
    let daemon = DaemonConfig::new(&containerd)
        .registry(origin)
        .registry(mirror)
        .registries_conf(&format!(
            "[[registry]]\nprefix = \"{}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{}/empty\"\ninsecure = true\n",
            origin.host(),
            mirror.host()
        ))
        .start();
    assert_eq!(
        pull_ok(&daemon, &image.reference, None).await,
        image.config_digest
    );
    assert!(
        requests_for(mirror, "empty/apps/web") > 0,
        "the mirror was asked first:\n{}",
        mirror.log()
    );
    recorded_as_asked(&containerd, &daemon, &image.reference, &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_origin_is_never_contacted_and_its_digest_mirror_serves_digests_only() {
    let (containerd, registries) =
        start_many(vec![Box::new(Registry::open), Box::new(Registry::open)]);
    let (origin, mirror) = (&registries[0], &registries[1]);
    let image = pushed(origin, "payload/release", "4.17");
    let mirrored = pushed(mirror, "mirror/payload/release", "4.17");
    assert_eq!(image.digest, mirrored.digest);
    // seed 004 §9.2.2.1: the payload registry blocked, its digest-only mirror kept.
    let daemon = DaemonConfig::new(&containerd)
        .registry(origin)
        .registry(mirror)
        .registries_conf(&format!(
            "[[registry]]\nprefix = \"\"\nlocation = \"{}/payload\"\nblocked = true\nmirror-by-digest-only = true\n\n\
             [[registry.mirror]]\nlocation = \"{}/mirror/payload\"\ninsecure = true\n",
            origin.host(),
            mirror.host()
        ))
        .start();
    let by_tag = pull_err_code(&daemon, &image.reference, Code::PermissionDenied).await;
    assert!(
        by_tag.message().contains("is blocked")
            && by_tag.message().contains("registries.conf")
            && by_tag.message().contains("serves a pull by tag"),
        "{}",
        by_tag.message()
    );
    assert_eq!(
        pull_ok(&daemon, &image.digest_reference, None).await,
        image.config_digest
    );
    assert_eq!(
        requests_for(origin, "payload/release"),
        0,
        "the blocked origin was contacted:\n{}",
        origin.log()
    );
    assert!(requests_for(mirror, "mirror/payload/release") > 0);
    // A digest reference records the digest name only, under the asked repository.
    let found = status(daemon.socket(), &image.digest_reference)
        .await
        .expect("pulled by digest");
    assert_eq!(
        found.repo_digests,
        std::slice::from_ref(&image.digest_reference)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_registry_without_mirrors_is_permission_denied() {
    let (containerd, registries) = start_many(vec![Box::new(Registry::open)]);
    let blocked = &registries[0];
    let image = pushed(blocked, "app", "1");
    let daemon = DaemonConfig::new(&containerd)
        .registries_conf(&format!(
            "[[registry]]\nprefix = \"\"\nlocation = \"{}\"\nblocked = true\n",
            blocked.host()
        ))
        .start();
    let status = pull_err_code(&daemon, &image.reference, Code::PermissionDenied).await;
    assert!(
        status.message().contains("is blocked"),
        "{}",
        status.message()
    );
    assert_eq!(requests_for(blocked, "app"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_source_fails_the_error_lists_each_with_its_outcome() {
    let (containerd, registries) = start_many(vec![Box::new(Registry::open)]);
    let origin = &registries[0];
    let refused = dead_host();
    let daemon = DaemonConfig::new(&containerd)
        .registry(origin)
        .registries_conf(&format!(
            "[[registry]]\nprefix = \"{}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{refused}\"\ninsecure = true\n",
            origin.host()
        ))
        .start();
    // The origin's answer decides the code; the mirror's is listed before it.
    let image = format!("{}/nothing/here:1", origin.host());
    let status = pull_err_code(&daemon, &image, Code::NotFound).await;
    let message = status.message();
    assert!(
        message.contains(&format!("mirror {refused}")) && message.contains(origin.host()),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_credentials_are_looked_up_for_the_mirror_host() {
    const USER: &str = "mirror-user";
    const PASSWORD: &str = "mirror-S3cret";
    let (containerd, registries) =
        start_many(vec![Box::new(|| Registry::htpasswd(USER, PASSWORD))]);
    let mirror = &registries[0];
    let image = pushed(mirror, "cache/lib/tool", "3");
    let origin = dead_host();
    let daemon = DaemonConfig::new(&containerd)
        .registry(mirror)
        // Only the mirror host has credentials on the node.
        .docker_config(&format!(
            r#"{{"auths": {{"{}": {{"username": "{USER}", "password": "{PASSWORD}"}}}}}}"#,
            mirror.host()
        ))
        .registries_conf(&format!(
            "[[registry]]\nprefix = \"{origin}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{}/cache\"\n",
            mirror.host()
        ))
        .start();
    let asked = format!("{origin}/lib/tool:3");
    assert_eq!(pull_ok(&daemon, &asked, None).await, image.config_digest);
    recorded_as_asked(&containerd, &daemon, &asked, &image).await;
    assert!(!daemon.log().contains(PASSWORD));
}

#[test]
fn a_misspelt_key_is_warned_about_with_its_file_and_line() {
    let containerd = common::scenario::containerd_without_cri();
    let daemon = DaemonConfig::new(&containerd)
        .registries_conf("[[registry]]\nprefix = \"example.com\"\nblock = true\n")
        .start();
    let log = daemon.log();
    let warning = log
        .lines()
        .find(|l| l.contains("unknown registries.conf key"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        warning.contains("block")
            && warning.contains("registries.conf")
            && warning.contains("line=Some(3)"),
        "{warning}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_demanding_a_client_certificate_gets_the_one_in_certs_d() {
    let (containerd, registries) = start_many(vec![Box::new(Registry::mutual_tls)]);
    let registry = &registries[0];
    let image = pushed(registry, "mtls/app", "1");
    // Without the certificate the registry ends the handshake (how the client sees
    // that, an alert or a closed connection, depends on timing under TLS 1.3).
    let without = DaemonConfig::new(&containerd).registry(registry).start();
    let refused = pull_err(&without, &image.reference, None).await;
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Internal),
        "{:?}: {}",
        refused.code(),
        refused.message()
    );
    // With `<host:port>/client.cert` + `client.key` in the certs.d directory.
    let with = DaemonConfig::new(&containerd)
        .registry(registry)
        .client_certificate(registry)
        .start();
    assert_eq!(
        pull_ok(&with, &image.reference, None).await,
        image.config_digest
    );
    // explain names the CA file and the client certificate in use.
    let (explained, _) = explain(with.config_path(), &image.reference);
    let tls = &explained["sources"][0]["tls"];
    let port = registry.host().rsplit(':').next().unwrap();
    assert!(
        tls["cas"][0]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("127.0.0.1..{port}")))
            && tls["client_certificate"]
                .as_str()
                .is_some_and(|p| p.ends_with(&format!("{}/client.cert", registry.host()))),
        "{explained}"
    );
}

/// Blob downloads `registry` served to anyone but skopeo (the pusher).
fn blob_gets(registry: &Registry, repo: &str) -> usize {
    let needle = format!("\"GET /v2/{repo}/blobs/");
    registry
        .log()
        .lines()
        .filter(|l| l.contains(&needle) && !l.contains("skopeo/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_through_cache_as_mirror_serves_the_second_node_from_its_cache() {
    let (first_containerd, registries) = start_many(vec![Box::new(Registry::open)]);
    let origin = &registries[0];
    let image = pushed(origin, "lib/app", "1");
    let cache = Registry::pull_through(origin);
    let second_containerd = Containerd::start();
    let conf = format!(
        "[[registry]]\nprefix = \"{}\"\ninsecure = true\n\n\
         [[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
        origin.host(),
        cache.host()
    );
    // Two nodes (each its own containerd and cri-imaged) behind one cache.
    let mut from_origin = Vec::new();
    for (node, containerd) in [&first_containerd, &second_containerd]
        .into_iter()
        .enumerate()
    {
        let daemon = DaemonConfig::new(containerd)
            .registry(origin)
            .registry(&cache)
            .registries_conf(&conf)
            .start();
        assert_eq!(
            pull_ok(&daemon, &image.reference, None).await,
            image.config_digest,
            "node {node}"
        );
        recorded_as_asked(containerd, &daemon, &image.reference, &image).await;
        // The cache stores what it fetched in the background: wait until the
        // origin's blob count stops moving.
        let mut settled = blob_gets(origin, "lib/app");
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let now = blob_gets(origin, "lib/app");
            if now == settled {
                break;
            }
            settled = now;
        }
        from_origin.push(settled);
    }
    assert!(
        from_origin[0] > 0,
        "the first node's pull went through the cache to the origin"
    );
    assert_eq!(
        from_origin[0], from_origin[1],
        "the second node was served from the cache: no blob came from the origin again"
    );
    assert!(blob_gets(&cache, "lib/app") > 0, "{}", cache.log());
}
