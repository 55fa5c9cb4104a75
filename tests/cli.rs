//! The binary's own verbs that need no daemon: `check-config` on the shipped example
//! configuration and on broken files, and `version`.

use std::path::Path;
use std::process::{Command, Output};

fn cri_imaged(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cri-imaged"))
        .args(args)
        .output()
        .expect("running cri-imaged")
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.example.toml");
    let out = cri_imaged(&["--config", example.to_str().unwrap(), "check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

#[test]
fn check_config_exits_64_naming_the_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let policy = write("policy.json", r#"{"default": [{"type": "acceptIfNice"}]}"#);
    let registries = write(
        "registries.conf",
        "[[registry]]\nprefix = \"a.io\"\nlocation = \"not a host\"\n",
    );
    let good_registries = write("good.conf", "");
    for (config, wants) in [
        (
            format!(
                "[registry]\npolicy_json = \"{policy}\"\nregistries_conf = \"{good_registries}\"\n"
            ),
            policy.clone(),
        ),
        (
            format!("[registry]\nregistries_conf = \"{registries}\"\n"),
            registries.clone(),
        ),
        (
            "[registry]\nproxy = \"socks5://proxy:1080\"\n".to_string(),
            "registry.proxy".to_string(),
        ),
        (
            "[pull]\nplatform = \"plan9\"\n".to_string(),
            "pull.platform".to_string(),
        ),
        ("[nonsense]\n".to_string(), "nonsense".to_string()),
    ] {
        let path = write("config.toml", &config);
        let out = cri_imaged(&["--config", &path, "check-config"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{config}: {stderr}");
        assert!(stderr.contains(&wants), "{config}: {stderr}");
    }
}

#[test]
fn version_names_the_commit_and_compiler() {
    let out = cri_imaged(&["version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!(
            "cri-imaged {} (commit ",
            env!("CARGO_PKG_VERSION")
        )) && text.contains("rustc "),
        "{text}"
    );
}
