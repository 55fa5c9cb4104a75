//! Kubelet credential-provider exec plugins, run for real: each test writes small
//! `#!/bin/sh` plugins into a temporary bin dir. They save the request from stdin,
//! append a line to a counter file per run (so caching is observable) and print a
//! CredentialProviderResponse.

mod common;

use common::log::{capture_log, captured_log};
use cri_imaged::auth::provider::{ProvidedAuth, ProviderError, Providers};
use cri_imaged::reference::Reference;
use cri_imaged::registry::Credential;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

const V1: &str = "credentialprovider.kubelet.k8s.io/v1";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::fs::create_dir(dir.path().join("bin")).unwrap_or_else(|e| panic!("mkdir: {e}"));
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bin(&self) -> PathBuf {
        self.path("bin")
    }

    /// Writes an executable `bin/<name>` whose body follows a line that saves the
    /// request and counts the run.
    fn plugin(&self, name: &str, body: &str) {
        let dir = self.dir.path().display();
        let script = format!(
            "#!/bin/sh\ncat > \"{dir}/{name}.request\"\necho run >> \"{dir}/{name}.count\"\n{body}\n"
        );
        let path = self.bin().join(name);
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("create: {e}"));
        f.write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("write: {e}"));
        drop(f);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
    }

    /// A plugin answering with one `auth` entry `key` → `user`/`pass-<user>`.
    fn responder(
        &self,
        name: &str,
        cache_key_type: &str,
        cache_duration: Option<&str>,
        key: &str,
        user: &str,
    ) {
        let duration =
            cache_duration.map_or(String::new(), |d| format!(",\"cacheDuration\":\"{d}\""));
        let body = format!(
            "printf '%s' '{{\"apiVersion\":\"{V1}\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"{cache_key_type}\"{duration},\"auth\":{{\"{key}\":{{\"username\":\"{user}\",\"password\":\"pass-{user}\"}}}}}}'"
        );
        self.plugin(name, &body);
    }

    /// How many times plugin `name` ran.
    fn runs(&self, name: &str) -> usize {
        std::fs::read_to_string(self.path(&format!("{name}.count")))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn request(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path(&format!("{name}.request")))
            .unwrap_or_else(|e| panic!("{name} saved no request: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("request {text:?}: {e}"))
    }

    fn write_config(&self, file: &str, text: &str) -> PathBuf {
        let path = self.path(file);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write config: {e}"));
        path
    }

    fn load(&self, text: &str) -> Providers {
        let config = self.write_config("providers.yaml", text);
        Providers::load(&config, &self.bin()).unwrap_or_else(|e| panic!("load: {e}"))
    }

    fn load_err(&self, file: &str, text: &str) -> (PathBuf, ProviderError) {
        let config = self.write_config(file, text);
        match Providers::load(&config, &self.bin()) {
            Ok(p) => panic!("config accepted: {p:?}\n{text}"),
            Err(e) => (config, e),
        }
    }
}

/// A config with one provider per `(name, matchImages, defaultCacheDuration)`.
fn config(providers: &[(&str, &[&str], &str)]) -> String {
    let mut out =
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n"
            .to_string();
    for (name, images, default) in providers {
        out += &format!("  - name: {name}\n    apiVersion: {V1}\n    defaultCacheDuration: \"{default}\"\n    matchImages:\n");
        for image in *images {
            out += &format!("      - \"{image}\"\n");
        }
    }
    out
}

fn image(s: &str) -> Reference {
    Reference::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn users(auths: &[ProvidedAuth]) -> Vec<(String, String, String)> {
    auths
        .iter()
        .map(|a| {
            let user = match &a.credential {
                Credential::Basic { username, .. } => username.clone(),
                other => panic!("not basic: {other:?}"),
            };
            (a.provider.clone(), a.key.clone(), user)
        })
        .collect()
}

fn triple(p: &str, k: &str, u: &str) -> (String, String, String) {
    (p.into(), k.into(), u.into())
}

#[tokio::test]
async fn match_images_select_which_providers_run() {
    let fx = Fixture::new();
    fx.responder("alpha", "Image", None, "*.a.io", "alice");
    fx.responder("beta", "Image", None, "b.io", "bob");
    fx.responder("any", "Image", None, "*.io", "anna");
    let providers = fx.load(&config(&[
        ("alpha", &["*.a.io"], "1h"),
        ("beta", &["b.io/team"], "1h"),
        ("any", &["*.a.io", "b.io"], "1h"),
    ]));

    let got = providers.lookup(&image("x.a.io/app:1")).await;
    assert_eq!(
        users(&got),
        [
            triple("alpha", "*.a.io", "alice"),
            triple("any", "*.io", "anna")
        ],
        "config order, both matching providers"
    );
    assert_eq!((fx.runs("alpha"), fx.runs("beta")), (1, 0));

    let got = providers.lookup(&image("b.io/team/app")).await;
    assert_eq!(
        users(&got),
        [triple("beta", "b.io", "bob"), triple("any", "*.io", "anna")]
    );

    // A path outside beta's prefix: only `any` (all of b.io) answers.
    let got = providers.lookup(&image("b.io/other/app")).await;
    assert_eq!(users(&got), [triple("any", "*.io", "anna")]);
    // An extra host label, another port, another host: no match.
    for other in ["y.x.a.io/app", "x.a.io:5000/app", "c.io/app"] {
        assert!(providers.lookup(&image(other)).await.is_empty(), "{other}");
    }
    assert_eq!(
        (fx.runs("alpha"), fx.runs("beta"), fx.runs("any")),
        (1, 1, 3)
    );
}

#[tokio::test]
async fn args_and_env_reach_the_plugin() {
    let fx = Fixture::new();
    let out = fx.path("seen");
    fx.plugin(
        "envy",
        &format!(
            "for a in \"$@\"; do echo \"arg=$a\"; done > \"{o}\"\n\
             echo \"var=$PROVIDER_TEST_VAR\" >> \"{o}\"\n\
             echo \"home=$HOME\" >> \"{o}\"\n\
             echo \"path=$PATH\" >> \"{o}\"\n\
             printf '%s' '{{\"apiVersion\":\"{V1}\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Image\"}}'",
            o = out.display()
        ),
    );
    let mut text = config(&[("envy", &["r.io"], "0s")]);
    text += "    args:\n      - get-credentials\n      - \"--flag=two words\"\n";
    text += "    env:\n      - name: PROVIDER_TEST_VAR\n        value: hello\n      - name: HOME\n        value: /configured-home\n";
    let providers = fx.load(&text);

    assert!(providers.lookup(&image("r.io/app")).await.is_empty());
    let seen = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("plugin did not run: {e}"));
    let lines: Vec<&str> = seen.lines().collect();
    let path = std::env::var("PATH").unwrap_or_default();
    assert_eq!(
        lines,
        [
            "arg=get-credentials",
            "arg=--flag=two words",
            "var=hello",
            "home=/configured-home",
            &format!("path={path}"),
        ],
        "args in order; configured env added; the daemon's env inherited, a configured name wins"
    );
}

#[tokio::test]
async fn the_request_on_stdin_is_kubelets() {
    let fx = Fixture::new();
    fx.responder("v1", "Image", None, "r.io", "u");
    fx.plugin(
        "beta",
        "printf '%s' '{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1beta1\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Image\",\"auth\":{\"docker.io\":{\"username\":\"b\",\"password\":\"p\"}}}'",
    );
    let mut text = config(&[("v1", &["127.0.0.1:5000"], "0s")]);
    text += "  - name: beta\n    apiVersion: credentialprovider.kubelet.k8s.io/v1beta1\n    defaultCacheDuration: 0s\n    matchImages: [docker.io]\n";
    let providers = fx.load(&text);

    assert_eq!(
        providers
            .lookup(&image("127.0.0.1:5000/team/app:v1"))
            .await
            .len(),
        1
    );
    // kubelet asks for the repository: no tag, no digest.
    assert_eq!(
        fx.request("v1"),
        serde_json::json!({"apiVersion": V1, "kind": "CredentialProviderRequest", "image": "127.0.0.1:5000/team/app"})
    );
    let digest = format!("busybox@sha256:{}", "a".repeat(64));
    assert_eq!(providers.lookup(&image(&digest)).await.len(), 1);
    assert_eq!(
        fx.request("beta"),
        serde_json::json!({
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1",
            "kind": "CredentialProviderRequest",
            "image": "docker.io/library/busybox"
        }),
        "the provider's apiVersion, a normalised Docker Hub name"
    );
}

#[tokio::test]
async fn image_cache_key_serves_the_same_repository() {
    let fx = Fixture::new();
    fx.responder("img", "Image", Some("1h"), "r.io", "u");
    let providers = fx.load(&config(&[("img", &["r.io"], "0s")]));
    let first = providers.lookup(&image("r.io/a:1")).await;
    assert_eq!(first.len(), 1);
    assert_eq!(providers.lookup(&image("r.io/a:1")).await, first);
    // kubelet keys the image cache by repository, so another tag is a hit too.
    assert_eq!(providers.lookup(&image("r.io/a:2")).await, first);
    assert_eq!(fx.runs("img"), 1);
    assert_eq!(providers.lookup(&image("r.io/b")).await.len(), 1);
    assert_eq!(fx.runs("img"), 2);
    // Clones share the cache.
    assert_eq!(providers.clone().lookup(&image("r.io/b")).await.len(), 1);
    assert_eq!(fx.runs("img"), 2);
}

#[tokio::test]
async fn registry_cache_key_serves_the_whole_registry() {
    let fx = Fixture::new();
    fx.responder("reg", "Registry", Some("1h"), "*.io", "u");
    let providers = fx.load(&config(&[("reg", &["*.io"], "0s")]));
    for repo in ["r.io/a", "r.io/b", "r.io/c/d:9"] {
        assert_eq!(providers.lookup(&image(repo)).await.len(), 1, "{repo}");
    }
    assert_eq!(fx.runs("reg"), 1);
    assert_eq!(providers.lookup(&image("q.io/a")).await.len(), 1);
    assert_eq!(fx.runs("reg"), 2);
}

#[tokio::test]
async fn global_cache_key_serves_every_image() {
    let fx = Fixture::new();
    fx.responder("glob", "Global", None, "*.io", "u");
    let providers = fx.load(&config(&[("glob", &["*.io"], "1h")]));
    for repo in ["r.io/a", "q.io/b", "z.io/c"] {
        assert_eq!(providers.lookup(&image(repo)).await.len(), 1, "{repo}");
    }
    assert_eq!(
        fx.runs("glob"),
        1,
        "defaultCacheDuration applies without cacheDuration"
    );
}

#[tokio::test]
async fn zero_cache_duration_runs_the_plugin_every_time() {
    let fx = Fixture::new();
    fx.responder("zero", "Global", Some("0s"), "r.io", "u");
    fx.responder("dflt", "Global", None, "r.io", "u");
    let providers = fx.load(&config(&[
        ("zero", &["r.io"], "1h"),
        ("dflt", &["r.io"], "0"),
    ]));
    for _ in 0..3 {
        assert_eq!(providers.lookup(&image("r.io/a")).await.len(), 2);
    }
    assert_eq!(
        (fx.runs("zero"), fx.runs("dflt")),
        (3, 3),
        "cacheDuration 0s overrides the default; a zero default without cacheDuration caches nothing"
    );
}

#[tokio::test]
async fn concurrent_lookups_of_one_image_share_one_run() {
    let fx = Fixture::new();
    // Nothing is cached, so only the single flight can merge the runs.
    fx.responder("once", "Image", Some("0s"), "r.io", "u");
    let providers = fx.load(&config(&[("once", &["r.io"], "0s")]));
    let img = image("r.io/a");
    let lookups = (0..5).map(|_| providers.lookup(&img));
    let results = futures_util::future::join_all(lookups).await;
    assert!(results.iter().all(|r| r.len() == 1), "{results:?}");
    assert_eq!(fx.runs("once"), 1);
    assert_eq!(providers.lookup(&img).await.len(), 1);
    assert_eq!(fx.runs("once"), 2, "the flight ends with the run");
}

#[tokio::test]
async fn failing_plugins_give_nothing_and_are_logged_by_name() {
    capture_log();
    let fx = Fixture::new();
    fx.plugin("exits", "echo 'no instance profile found' >&2\nexit 1");
    fx.plugin("garbage", "echo 'Error: not json'");
    fx.plugin(
        "wrongkind",
        &format!("printf '%s' '{{\"apiVersion\":\"{V1}\",\"kind\":\"CredentialProviderRequest\",\"cacheKeyType\":\"Image\",\"auth\":{{\"r.io\":{{\"username\":\"u\",\"password\":\"hunter2\"}}}}}}'"),
    );
    fx.plugin(
        "oldversion",
        "printf '%s' '{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1alpha1\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Image\"}'",
    );
    fx.plugin(
        "badtype",
        &format!("printf '%s' '{{\"apiVersion\":\"{V1}\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Image\",\"auth\":{{\"r.io\":{{\"username\":\"u\",\"password\":987654321}}}}}}'"),
    );
    fx.plugin("sleeper", "exec sleep 30");
    fx.responder("works", "Image", None, "r.io", "good");
    let names = [
        "exits",
        "garbage",
        "wrongkind",
        "oldversion",
        "badtype",
        "sleeper",
        "works",
    ];
    let spec: Vec<(&str, &[&str], &str)> =
        names.iter().map(|n| (*n, &["r.io"][..], "1h")).collect();
    let providers = fx
        .load(&config(&spec))
        .with_exec_timeout(Duration::from_millis(300));

    let got = providers.lookup(&image("r.io/app")).await;
    assert_eq!(
        users(&got),
        [triple("works", "r.io", "good")],
        "only the working provider counts"
    );

    let log = captured_log();
    let failure = |name: &str| {
        log.lines()
            .find(|l| l.contains("plugin failed") && l.contains(&format!("provider={name} ")))
            .unwrap_or_else(|| panic!("no failure line for {name} in:\n{log}"))
            .to_string()
    };
    assert!(failure("exits").contains("exit status: 1"), "{log}");
    assert!(
        failure("exits").contains("no instance profile found"),
        "{log}"
    );
    assert!(failure("garbage").contains("not a JSON object"), "{log}");
    assert!(
        failure("wrongkind").contains("CredentialProviderRequest"),
        "{log}"
    );
    assert!(failure("oldversion").contains("v1alpha1"), "{log}");
    assert!(failure("badtype").contains("auth.r.io.password"), "{log}");
    assert!(failure("sleeper").contains("killed"), "{log}");
    for secret in ["hunter2", "987654321", "pass-good"] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
    }

    // Failures are not cached: the next pull asks again.
    providers.lookup(&image("r.io/app")).await;
    assert_eq!((fx.runs("exits"), fx.runs("works")), (2, 1));
}

#[test]
fn config_errors_name_the_file_and_the_field() {
    let fx = Fixture::new();
    fx.responder("present", "Image", None, "r.io", "u");
    let cases: [(&str, String, &str); 5] = [
        ("syntax.yaml", "providers: [".to_string(), "credential provider config"),
        ("unknown.yaml", config(&[("present", &["r.io"], "1h")]) + "    cacheKey: Image\n", "providers[0]"),
        ("nodur.json", r#"{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"present","apiVersion":"credentialprovider.kubelet.k8s.io/v1","matchImages":["r.io"],"defaultCacheDuration":"1 hour"}]}"#.to_string(), "providers[0].defaultCacheDuration"),
        ("missing.yaml", config(&[("present", &["r.io"], "1h"), ("absent", &["q.io"], "1h")]), "providers[1].name"),
        ("slash.yaml", config(&[("../present", &["r.io"], "1h")]), "providers[0].name"),
    ];
    for (file, text, field) in cases {
        let (path, err) = fx.load_err(file, &text);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{file}: {msg}");
        assert!(msg.contains(field), "{file}: {field} not in {msg}");
    }

    let (_, err) = fx.load_err("missing2.yaml", &config(&[("absent", &["q.io"], "1h")]));
    assert!(matches!(err, ProviderError::Binary { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&fx.bin().join("absent").display().to_string()),
        "{err}"
    );

    std::fs::write(fx.bin().join("noexec"), "#!/bin/sh\n").unwrap_or_else(|e| panic!("{e}"));
    let (_, err) = fx.load_err("noexec.yaml", &config(&[("noexec", &["q.io"], "1h")]));
    assert!(matches!(err, ProviderError::NotExecutable { .. }), "{err}");

    let config_path = fx.write_config("ok.yaml", &config(&[("present", &["r.io"], "1h")]));
    let err = Providers::load(&config_path, &fx.path("no-such-bin"))
        .err()
        .unwrap_or_else(|| panic!("missing bin dir accepted"));
    assert!(matches!(err, ProviderError::BinDir { .. }), "{err}");
    assert!(err.to_string().contains("no-such-bin"), "{err}");

    let err = Providers::load(&fx.path("absent.yaml"), &fx.bin())
        .err()
        .unwrap_or_else(|| panic!("missing config accepted"));
    assert!(matches!(err, ProviderError::Read { .. }), "{err}");
}

#[tokio::test]
async fn a_config_directory_merges_its_files_in_order() {
    let fx = Fixture::new();
    fx.responder("one", "Image", None, "r.io", "u1");
    fx.responder("two", "Image", None, "r.io", "u2");
    let dir = fx.path("conf.d");
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("20-two.yaml"), config(&[("two", &["r.io"], "1h")]))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("10-one.yml"), config(&[("one", &["r.io"], "1h")]))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("README"), "not a config").unwrap_or_else(|e| panic!("{e}"));
    let providers = Providers::load(&dir, &fx.bin()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(providers.names(), ["one", "two"]);
    let got = providers.lookup(&image("r.io/app")).await;
    assert_eq!(
        users(&got),
        [triple("one", "r.io", "u1"), triple("two", "r.io", "u2")]
    );

    std::fs::write(dir.join("30-dup.json"), config(&[("one", &["q.io"], "1h")]))
        .unwrap_or_else(|e| panic!("{e}"));
    let err = Providers::load(&dir, &fx.bin())
        .err()
        .unwrap_or_else(|| panic!("duplicate accepted"));
    let msg = err.to_string();
    assert!(
        msg.contains("30-dup.json") && msg.contains("providers[0].name"),
        "{msg}"
    );
}

#[tokio::test]
async fn secrets_stay_out_of_debug_output_and_logs() {
    capture_log();
    let fx = Fixture::new();
    fx.responder("ecr", "Image", None, "r.io", "AWS");
    let mut text = config(&[("ecr", &["r.io"], "1h")]);
    text += "    env:\n      - name: AWS_SECRET_ACCESS_KEY\n        value: env-secret-value\n";
    let providers = fx.load(&text);
    let got = providers.lookup(&image("r.io/app")).await;
    assert_eq!(got.len(), 1);
    assert!(
        matches!(&got[0].credential, Credential::Basic { password, .. } if password == "pass-AWS")
    );
    let debug = format!("{providers:?} {got:?}");
    assert!(debug.contains("ecr"), "{debug}");
    let log = captured_log();
    for secret in ["pass-AWS", "env-secret-value"] {
        assert!(!debug.contains(secret), "{secret} in Debug: {debug}");
        assert!(!log.contains(secret), "{secret} in log: {log}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("credential provider plugin answered")
                && l.contains("provider=ecr ")),
        "{log}"
    );
}

#[tokio::test]
async fn no_providers_means_no_credentials() {
    let providers = Providers::empty();
    assert!(providers.is_empty());
    assert!(providers.lookup(&image("r.io/app")).await.is_empty());
}

#[test]
fn providers_and_their_lookups_are_send() {
    fn shared<T: Send + Sync + Clone>() {}
    fn send<F: std::future::Future + Send>(_: F) {}
    shared::<Providers>();
    let providers = Providers::empty();
    let img = image("r.io/app");
    send(providers.lookup(&img));
}
