//! Registry and token traffic through an HTTP CONNECT proxy (`[registry] proxy`), as
//! corporate nodes need: every connection is a tunnel the proxy records, no
//! credential crosses the proxy in clear, and `no_proxy` hosts go direct.

mod common;

use common::cri::DaemonConfig;
use common::images;
use common::proxy::ConnectProxy;
use common::registry::Registry;
use common::scenario::{password_auth, pull_ok, start};
use common::token::TokenUser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_token_traffic_tunnel_through_the_proxy_without_credentials_in_clear() {
    let (containerd, registry) = start(|| {
        Registry::token(vec![
            TokenUser::new("proxy-user", "proxy-S3cret").pull("corp/*")
        ])
    });
    let image = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "corp/app");
    let proxy = ConnectProxy::start();
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .proxy(&proxy.url(), "")
        .start();
    let pulled = pull_ok(
        &daemon,
        &image.reference,
        password_auth("proxy-user", "proxy-S3cret"),
    )
    .await;
    assert_eq!(pulled, image.config_digest);
    let tunnels = proxy.tunnels();
    let targets: Vec<&str> = tunnels.iter().map(|t| t.target.as_str()).collect();
    assert!(targets.contains(&registry.host()), "{targets:?}");
    let realm = registry
        .token_server()
        .expect("token registry")
        .realm_host_port();
    assert!(
        targets.contains(&realm.as_str()),
        "the token request tunnels too: {targets:?}"
    );
    for tunnel in &tunnels {
        assert!(
            !tunnel
                .head
                .to_ascii_lowercase()
                .contains("\nauthorization:")
                && !tunnel.head.contains("proxy-S3cret"),
            "a credential reached the proxy in clear: {}",
            tunnel.head
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_hosts_go_direct() {
    let (containerd, registry) = start(Registry::open);
    let image = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "direct/app");
    let proxy = ConnectProxy::start();
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .proxy(&proxy.url(), "localhost,127.0.0.1")
        .start();
    assert_eq!(
        pull_ok(&daemon, &image.reference, None).await,
        image.config_digest
    );
    assert!(proxy.tunnels().is_empty(), "{:?}", proxy.tunnels());
}
