//! Prometheus metrics (`[metrics] listen`) of the real daemon: after pulls that
//! succeed, fail and are retried, `/metrics` holds the right counts, `promtool check
//! metrics` accepts it, and a real Prometheus scraping the daemon answers queries
//! about those pulls. The Grafana dashboard in deploy/grafana uses only series the
//! daemon exports.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use common::containerd::Containerd;
use common::cri::{Daemon, DaemonConfig};
use common::fake_registry::{FakeRegistry, Faults};
use common::images;
use common::prometheus::{free_port, http_get, promtool_check_metrics, Prometheus};
use common::scenario::{containerd_without_cri as containerd, pull_err_code, pull_ok};
use tonic::Code;

/// A daemon storing into `containerd`, reaching `fake` over plain HTTP, serving
/// metrics on a port of its own; returns it with the metrics address.
fn daemon(containerd: &Containerd, fake: &FakeRegistry) -> (Daemon, String) {
    daemon_with_pull(containerd, fake, "")
}

/// [`daemon`] with these lines in `[pull]`.
fn daemon_with_pull(containerd: &Containerd, fake: &FakeRegistry, pull: &str) -> (Daemon, String) {
    let address = format!("127.0.0.1:{}", free_port());
    let daemon = DaemonConfig::new(containerd)
        .registries_conf(&fake.insecure_entry())
        .extra_toml(&format!(
            "[pull]\n{pull}\n[metrics]\nlisten = \"{address}\""
        ))
        .start();
    (daemon, address)
}

/// `GET /metrics`, which must answer 200 in the text format 0.0.4.
fn scrape(address: &str, daemon: &Daemon) -> String {
    let answer = http_get(address, "/metrics").unwrap_or_else(|e| {
        panic!(
            "GET http://{address}/metrics: {e}\ndaemon log:\n{}",
            daemon.log()
        )
    });
    assert_eq!(answer.status, 200, "{answer:?}");
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    answer.body
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn expect(text: &str, series: &str, expected: f64) {
    assert_eq!(value(text, series), Some(expected), "{series} in:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_that_succeed_fail_and_retry_are_counted_checked_by_promtool_and_scraped_by_prometheus(
) {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let first = fake.serve_image(&image, "metrics/busybox");
    // The same image under another name: its blobs are in containerd already.
    let flaky = fake.serve_image(&image, "metrics/flaky");
    let missing = format!("{}/metrics/missing:1", fake.host());
    let containerd = containerd();
    let (daemon, address) = daemon(&containerd, &fake);
    let host = fake.host();

    pull_ok(&daemon, &first, None).await;
    pull_err_code(&daemon, &missing, Code::NotFound).await;
    fake.set_faults(Faults {
        manifest_status: Some((503, Vec::new())),
        manifest_status_times: Some(Arc::new(AtomicUsize::new(1))),
        ..Default::default()
    });
    pull_ok(&daemon, &flaky, None).await;

    let text = scrape(&address, &daemon);
    let pulls = |result: &str| {
        format!(
            "cri_imaged_pulls_total{{result=\"{result}\",registry=\"{host}\",source=\"origin\"}}"
        )
    };
    expect(&text, &pulls("success"), 2.0);
    expect(&text, &pulls("not_found"), 1.0);
    expect(
        &text,
        &format!("cri_imaged_registry_retries_total{{registry=\"{host}\"}}"),
        1.0,
    );
    expect(
        &text,
        &format!("cri_imaged_pull_duration_seconds_count{{registry=\"{host}\"}}"),
        2.0,
    );
    expect(
        &text,
        &format!("cri_imaged_pull_duration_seconds_bucket{{registry=\"{host}\",le=\"+Inf\"}}"),
        2.0,
    );
    // Every blob came once, in the first pull; the second found them all stored.
    let manifest = image.host();
    let blob_bytes = manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
    expect(
        &text,
        &format!("cri_imaged_downloaded_bytes_total{{registry=\"{host}\"}}"),
        blob_bytes as f64,
    );
    expect(
        &text,
        "cri_imaged_blob_cache_hits_total{kind=\"layer\"}",
        manifest.layers.len() as f64,
    );
    expect(
        &text,
        "cri_imaged_blob_cache_hits_total{kind=\"config\"}",
        1.0,
    );
    expect(
        &text,
        "cri_imaged_credential_attempts_total{outcome=\"accepted\",source=\"anonymous\"}",
        2.0,
    );
    expect(&text, "cri_imaged_pulls_in_flight", 0.0);
    expect(&text, "cri_imaged_pulls_queued", 0.0);
    assert_eq!(value(&text, "cri_imaged_registry_stalls_total"), None);
    for name in ["process_resident_memory_bytes", "process_open_fds"] {
        assert!(
            value(&text, name).is_some_and(|v| v > 0.0),
            "{name}:\n{text}"
        );
    }
    assert!(
        value(&text, "process_start_time_seconds").is_some_and(|v| v > 1.6e9),
        "{text}"
    );
    assert!(
        value(&text, "process_cpu_seconds_total").is_some(),
        "{text}"
    );
    // Bounded labels: no image or repository name ever becomes a label value.
    assert!(!text.contains("metrics/"), "{text}");

    let checked = promtool_check_metrics(&text)
        .unwrap_or_else(|e| panic!("promtool check metrics: {e}\nthe text:\n{text}"));
    println!("promtool check metrics: ok {checked:?}");

    let prometheus = Prometheus::start(&address);
    for (query, expected) in [
        ("cri_imaged_pulls_total{result=\"success\"}", 2.0),
        ("sum(cri_imaged_pulls_total{result!=\"success\"})", 1.0),
        ("cri_imaged_registry_retries_total", 1.0),
    ] {
        let answer = prometheus
            .wait_for_value(query, expected, Duration::from_secs(60))
            .unwrap_or_else(|last| {
                panic!(
                    "Prometheus never answered {expected} to {query}; last answer: {last}\nits log:\n{}",
                    prometheus.log()
                )
            });
        println!("Prometheus: {query} → {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_attempts_are_counted_by_outcome_and_source_kind_without_secrets() {
    let fake = FakeRegistry::start();
    let image = images::busybox().build();
    let reference = fake.serve_image(&image, "metrics/private");
    fake.set_faults(Faults {
        basic_auth: Some(("alice".into(), "s3cret-pw".into())),
        ..Default::default()
    });
    let containerd = containerd();
    let (daemon, address) = daemon(&containerd, &fake);

    let wrong = common::scenario::password_auth("alice", "wrong-pw");
    let status = common::scenario::pull_err(&daemon, &reference, wrong).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    pull_ok(
        &daemon,
        &reference,
        common::scenario::password_auth("alice", "s3cret-pw"),
    )
    .await;

    let text = scrape(&address, &daemon);
    let attempts = |outcome: &str, source: &str| {
        format!("cri_imaged_credential_attempts_total{{outcome=\"{outcome}\",source=\"{source}\"}}")
    };
    expect(&text, &attempts("refused", "pull_secret"), 1.0);
    expect(&text, &attempts("refused", "anonymous"), 1.0);
    expect(&text, &attempts("accepted", "pull_secret"), 1.0);
    expect(
        &text,
        &format!(
            "cri_imaged_pulls_total{{result=\"unauthorized\",registry=\"{}\",source=\"origin\"}}",
            fake.host()
        ),
        1.0,
    );
    for secret in ["alice", "s3cret-pw", "wrong-pw"] {
        assert!(!text.contains(secret), "{secret} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_pulls_show_in_the_gauges_and_stalled_ones_are_counted_per_registry() {
    let fake = FakeRegistry::start();
    let images: Vec<images::OciImage> = (0..2)
        .map(|i| images::random_image(256 << 10, 1, &format!("m{i}")))
        .collect();
    let references: Vec<String> = images
        .iter()
        .enumerate()
        .map(|(i, image)| fake.serve_image(image, &format!("metrics/stall{i}")))
        .collect();
    // Each layer sends 1 KiB and then nothing.
    fake.set_faults(Faults {
        stall_blobs: images
            .iter()
            .map(|i| (i.host().layers[0].digest.clone(), 1024))
            .collect(),
        ..Default::default()
    });
    let containerd = containerd();
    let (daemon, address) = daemon_with_pull(
        &containerd,
        &fake,
        "max_concurrent_pulls = 1\nprogress_timeout = \"2s\"",
    );
    let mut pulls = Vec::new();
    for reference in &references {
        let mut client = daemon.client().await;
        let request = common::cri::pull_request(reference, None);
        pulls.push(tokio::spawn(
            async move { client.pull_image(request).await },
        ));
    }
    // One pull holds the only slot (stalled on its layer), the other waits for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(&address, &daemon);
        if value(&text, "cri_imaged_pulls_in_flight") == Some(1.0)
            && value(&text, "cri_imaged_pulls_queued") == Some(1.0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never one pull in flight and one queued:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pull in pulls {
        let status = pull
            .await
            .expect("pull task")
            .expect_err("a stalled pull fails");
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{}",
            status.message()
        );
    }
    let text = scrape(&address, &daemon);
    let host = fake.host();
    expect(
        &text,
        &format!("cri_imaged_registry_stalls_total{{registry=\"{host}\"}}"),
        2.0,
    );
    expect(
        &text,
        &format!(
            "cri_imaged_pulls_total{{result=\"stalled\",registry=\"{host}\",source=\"origin\"}}"
        ),
        2.0,
    );
    expect(&text, "cri_imaged_pulls_in_flight", 0.0);
    expect(&text, "cri_imaged_pulls_queued", 0.0);
    promtool_check_metrics(&text)
        .unwrap_or_else(|e| panic!("promtool check metrics: {e}\nthe text:\n{text}"));
}

/// The metric names a PromQL expression reads: identifiers that are not functions
/// (followed by `(`), keywords, label names (inside `{}`, `by (…)`, `without (…)`,
/// `on (…)`, `ignoring (…)`), strings, durations or Grafana variables.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    // Aggregation operators too: in `sum by (le) (…)` no `(` follows the name.
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    // Blank out strings, label matchers, ranges and grouping label lists.
    let mut cleaned = String::new();
    let mut chars = expr.chars().peekable();
    let mut depth = 0usize;
    let mut close = ' ';
    while let Some(c) = chars.next() {
        if depth > 0 {
            if c == '"' {
                for d in chars.by_ref() {
                    if d == '"' {
                        break;
                    }
                }
            } else if c == close {
                depth -= 1;
                cleaned.push(' ');
            }
            continue;
        }
        match c {
            '"' => {
                for d in chars.by_ref() {
                    if d == '"' {
                        break;
                    }
                }
                cleaned.push(' ');
            }
            '{' => (depth, close) = (1, '}'),
            '[' => (depth, close) = (1, ']'),
            _ => cleaned.push(c),
        }
    }
    // `by (…)` and friends: the parenthesised list after them holds label names.
    let mut names = BTreeSet::new();
    let tokens: Vec<(usize, &str)> = cleaned
        .match_indices(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$'))
        .fold((Vec::new(), 0), |(mut tokens, start), (i, sep)| {
            if i > start {
                tokens.push((start, &cleaned[start..i]));
            }
            (tokens, i + sep.len())
        })
        .0;
    let mut skip_list = false;
    for (start, token) in tokens {
        let after = cleaned[start + token.len()..].trim_start();
        if skip_list {
            if after.starts_with(')') {
                skip_list = false;
            }
            continue;
        }
        if [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ]
        .contains(&token)
        {
            skip_list = after.starts_with('(');
            continue;
        }
        let is_name = token
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        if !is_name || after.starts_with('(') || KEYWORDS.contains(&token.to_lowercase().as_str()) {
            continue;
        }
        names.insert(token.to_string());
    }
    names
}

/// Every `expr` in a Grafana dashboard, and the metrics of its templating queries.
fn dashboard_expressions(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(expr)) = q.get("query") {
                            out.push(expr.clone());
                        }
                    }
                    _ => dashboard_expressions(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_expressions(item, out);
            }
        }
        _ => {}
    }
}

#[test]
fn promql_metric_names_skip_functions_labels_keywords_and_variables() {
    let names = promql_metric_names(
        "histogram_quantile(0.9, sum by (le, registry) (rate(cri_imaged_pull_duration_seconds_bucket{registry=~\"$registry\"}[$__rate_interval])))",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["cri_imaged_pull_duration_seconds_bucket"]
    );
    let names = promql_metric_names(
        "sum(rate(a_total[5m])) / ignoring(x) group_left sum(b_total{c=\"d{e}\"}) or vector(0)",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_total", "b_total"]
    );
    let names = promql_metric_names("label_values(cri_imaged_pulls_total, registry)");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["cri_imaged_pulls_total", "registry"],
        "label_values' label argument looks like a metric; the caller drops it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_reads_only_series_the_daemon_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/cri-imaged.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut expressions = Vec::new();
    dashboard_expressions(&dashboard, &mut expressions);
    assert!(!expressions.is_empty(), "no PromQL in {path}");
    let mut used = BTreeSet::new();
    for expr in &expressions {
        let mut names = promql_metric_names(expr);
        if let Some(args) = expr.trim().strip_prefix("label_values(") {
            // label_values(metric, label): the label is no metric.
            if let Some((_, label)) = args.trim_end_matches(')').rsplit_once(',') {
                names.remove(label.trim());
            }
        }
        assert!(!names.is_empty(), "no metric in {expr:?}");
        used.extend(names);
    }

    let fake = FakeRegistry::start();
    let containerd = containerd();
    let (daemon, address) = daemon(&containerd, &fake);
    let exported = scrape(&address, &daemon);
    let mut names = BTreeSet::new();
    for line in exported.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let Some((name, kind)) = rest.split_once(' ') else {
            continue;
        };
        names.insert(name.to_string());
        if kind == "histogram" || kind == "summary" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    let unknown: Vec<&String> = used.difference(&names).collect();
    assert!(
        unknown.is_empty(),
        "{path} uses series the daemon does not export: {unknown:?}\nexported: {names:?}"
    );
    // The panels the dashboard promises, by the series behind them.
    for name in [
        "cri_imaged_pulls_total",
        "cri_imaged_pull_duration_seconds_bucket",
        "cri_imaged_downloaded_bytes_total",
        "cri_imaged_credential_attempts_total",
        "cri_imaged_pulls_in_flight",
        "cri_imaged_pulls_queued",
    ] {
        assert!(used.contains(name), "{path} charts no {name}");
    }
}
