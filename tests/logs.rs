//! The daemon's logs as a log shipper reads them: `[log] format = "json"` gives one
//! JSON object per line (the pull's summary among them), and `--log-level` sets
//! the filter.

mod common;

use common::cri::DaemonConfig;
use common::images;
use common::registry::Registry;
use common::scenario::{pull_ok, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_carry_the_pull_summary() {
    let (containerd, registry) = start(Registry::open);
    let image = images::busybox()
        .tag("1")
        .build()
        .push(&registry, "logs/app");
    let daemon = DaemonConfig::new(&containerd)
        .registry(&registry)
        .extra_toml("[log]\nformat = \"json\"\n")
        .start();
    pull_ok(&daemon, &image.reference, None).await;
    let log = daemon.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let pulled = events
        .iter()
        .find(|e| e["fields"]["message"] == "pulled")
        .unwrap_or_else(|| panic!("no pull summary in:\n{log}"));
    assert_eq!(pulled["level"], "INFO");
    assert_eq!(pulled["fields"]["image_id"], image.config_digest);
    assert_eq!(pulled["fields"]["registry"], registry.host());
    assert!(pulled["fields"]["elapsed_ms"].is_u64(), "{pulled}");
    // Resolved digest, source, credential key, bytes off the wire, seconds, MB/s.
    assert_eq!(pulled["fields"]["digest"], image.digest);
    assert_eq!(pulled["fields"]["source"], "origin");
    assert!(
        pulled["fields"]["key"].is_string() && pulled["fields"]["kind"].is_string(),
        "{pulled}"
    );
    let host = image
        .manifests
        .iter()
        .find(|m| m.platform == images::host_platform())
        .unwrap();
    assert_eq!(pulled["fields"]["bytes"], host.content_size(), "{pulled}");
    assert!(pulled["fields"]["seconds"].is_f64(), "{pulled}");
    assert!(pulled["fields"]["mb_per_s"].is_f64(), "{pulled}");
    // A failed pull: one line with the reason.
    let missing = format!("{}/logs/missing:1", registry.host());
    common::scenario::pull_err(&daemon, &missing, None).await;
    let log = daemon.log();
    let failed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["fields"]["message"] == "pull failed")
        .unwrap_or_else(|| panic!("no failure line in:\n{log}"));
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["fields"]["image"], missing);
    assert!(
        failed["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_flag_sets_the_filter() {
    let containerd = common::scenario::containerd_without_cri();
    let quiet = DaemonConfig::new(&containerd)
        .arg("--log-level")
        .arg("warn")
        .start();
    let verbose = DaemonConfig::new(&containerd)
        .arg("--log-level")
        .arg("cri_imaged=debug")
        .start();
    assert!(
        !quiet.log().contains("serving runtime.v1.ImageService"),
        "{}",
        quiet.log()
    );
    assert!(verbose.log().contains("DEBUG"), "{}", verbose.log());
}
