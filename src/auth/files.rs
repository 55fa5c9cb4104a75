//! Credential files on the node, re-read whenever they change: kubelet's
//! `config.json` / `.dockercfg` search paths, extra files from the config, and
//! directories of mounted `kubernetes.io/dockerconfigjson` / `dockercfg` secrets.
//!
//! Every lookup stats the files (a few syscalls, nothing next to a pull) and re-reads
//! only those whose size, mtime or inode changed, so an edit counts from the very
//! next pull without a restart or a polling task. A file's problems are logged when
//! the file changes, so each version of a broken file is reported once.

use super::dockerconfig::{self, Entry, Format};
use crate::file_stamp::Seen;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// The file name of a `kubernetes.io/dockerconfigjson` secret's one key.
pub const DOCKERCONFIGJSON: &str = ".dockerconfigjson";
/// The file name of a `kubernetes.io/dockercfg` secret's one key.
pub const DOCKERCFG: &str = ".dockercfg";

/// Where to look; plain data so tests pass their own `$HOME` and working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    /// kubelet's `--root-dir`.
    pub kubelet_root_dir: PathBuf,
    /// The daemon's working directory (kubelet's `{cwd}`); `None` skips it.
    pub cwd: Option<PathBuf>,
    /// `$HOME`; `None` skips `$HOME/.docker/config.json` and `$HOME/.dockercfg`.
    pub home: Option<PathBuf>,
    /// Extra config.json-format files, all merged (podman's auth.json too).
    pub files: Vec<PathBuf>,
    /// Directories of mounted pull secrets.
    pub secret_dirs: Vec<PathBuf>,
}

impl FileSettings {
    /// kubelet's search paths, in order: the first list (config.json) is searched
    /// first; the second (`.dockercfg`) only when no file in the first is valid.
    pub fn node_search_paths(&self) -> [Vec<PathBuf>; 2] {
        let mut json = vec![self.kubelet_root_dir.join("config.json")];
        let mut cfg = vec![self.kubelet_root_dir.join(DOCKERCFG)];
        if let Some(cwd) = &self.cwd {
            json.push(cwd.join("config.json"));
            cfg.push(cwd.join(DOCKERCFG));
        }
        if let Some(home) = &self.home {
            json.push(home.join(".docker").join("config.json"));
            cfg.push(home.join(DOCKERCFG));
        }
        json.push(PathBuf::from("/.docker/config.json"));
        cfg.push(PathBuf::from("/").join(DOCKERCFG));
        [json, cfg]
    }
}

/// An entry and the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcedEntry {
    pub entry: Entry,
    /// The file's path, as shown in logs, errors and `explain`.
    pub source: Arc<str>,
}

#[derive(Debug, Clone)]
enum Loaded {
    Missing,
    /// Unreadable or not valid JSON of the expected shape: skipped, as kubelet does.
    Broken,
    Valid(Arc<[Entry]>),
}

#[derive(Debug)]
struct Cached {
    seen: Seen,
    loaded: Loaded,
}

/// How much a missing file is worth saying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IfMissing {
    /// One of kubelet's search paths or a possible secret file: normal.
    Quiet,
    /// Named in the config: worth a warning (once).
    Warn,
}

/// The node's credential files, cached by version.
#[derive(Debug)]
pub struct FileKeyring {
    settings: FileSettings,
    cache: Mutex<HashMap<(PathBuf, FormatKey), Cached>>,
    /// Secret dirs last seen missing, so that is said once.
    missing_dirs: Mutex<HashMap<PathBuf, bool>>,
}

/// `Format` as a map key.
type FormatKey = bool;

fn format_key(f: Format) -> FormatKey {
    f == Format::ConfigJson
}

impl FileKeyring {
    pub fn new(settings: FileSettings) -> Self {
        FileKeyring {
            settings,
            cache: Mutex::new(HashMap::new()),
            missing_dirs: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &FileSettings {
        &self.settings
    }

    /// Every usable entry, in source order: the node file kubelet would pick, the
    /// configured files in their order, then each secret directory's secrets by name.
    /// Files changed since the last call are re-read first.
    pub fn entries(&self) -> Vec<SourcedEntry> {
        let mut out = Vec::new();
        let [json, cfg] = self.settings.node_search_paths();
        let node = json
            .iter()
            .map(|p| (p, Format::ConfigJson))
            .chain(cfg.iter().map(|p| (p, Format::Dockercfg)))
            // First valid file wins, as in kubelet; the rest are not even read.
            .find_map(
                |(path, format)| match self.load(path, format, IfMissing::Quiet) {
                    Loaded::Valid(entries) => Some((path.clone(), entries)),
                    Loaded::Missing | Loaded::Broken => None,
                },
            );
        if let Some((path, entries)) = node {
            push(&mut out, &path, &entries);
        }
        for path in &self.settings.files {
            if let Loaded::Valid(entries) = self.load(path, Format::ConfigJson, IfMissing::Warn) {
                push(&mut out, path, &entries);
            }
        }
        for dir in &self.settings.secret_dirs {
            for (path, format) in self.secret_files(dir) {
                if let Loaded::Valid(entries) = self.load(&path, format, IfMissing::Quiet) {
                    push(&mut out, &path, &entries);
                }
            }
        }
        out
    }

    /// The secret files in `dir` ([`secret_files_in`]); a directory that cannot be
    /// listed is reported once and holds none.
    fn secret_files(&self, dir: &Path) -> Vec<(PathBuf, Format)> {
        match secret_files_in(dir) {
            Ok(files) => {
                self.note_dir(dir, true, None);
                files
            }
            Err(e) => {
                self.note_dir(dir, false, Some(&e));
                Vec::new()
            }
        }
    }

    fn note_dir(&self, dir: &Path, present: bool, error: Option<&std::io::Error>) {
        let mut seen = self
            .missing_dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.insert(dir.to_path_buf(), present) != Some(present) {
            if let Some(e) = error {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list secret directory; skipping it until it appears");
            }
        }
    }

    /// The file's entries, re-read if it changed since the last look.
    fn load(&self, path: &Path, format: Format, if_missing: IfMissing) -> Loaded {
        let seen = Seen::of(path);
        let key = (path.to_path_buf(), format_key(format));
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = cache.get(&key) {
            if cached.seen == seen {
                return cached.loaded.clone();
            }
        }
        // Only a change gets here, so each version of a file is logged once.
        let loaded = match seen {
            Seen::File(_) => read(path, format),
            Seen::Missing => {
                match if_missing {
                    IfMissing::Warn => {
                        tracing::warn!(path = %path.display(), "credentials file does not exist; it is read when it appears")
                    }
                    IfMissing::Quiet => {
                        tracing::debug!(path = %path.display(), "no credentials file here")
                    }
                }
                Loaded::Missing
            }
            Seen::Unreadable(kind) => {
                tracing::warn!(path = %path.display(), error = %kind, "cannot read credentials file; ignoring it");
                Loaded::Broken
            }
        };
        cache.insert(
            key,
            Cached {
                seen,
                loaded: loaded.clone(),
            },
        );
        loaded
    }
}

/// The secret files in `dir`: its own `.dockerconfigjson` / `.dockercfg` (the
/// directory is one mounted secret), then those of each subdirectory (one mounted
/// secret each), by name. Names starting with `..` are the kubelet atomic writer's
/// internals (`..data`, timestamped dirs) and are skipped.
fn secret_files_in(dir: &Path) -> std::io::Result<Vec<(PathBuf, Format)>> {
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|d| !d.file_name().to_string_lossy().starts_with(".."))
        .map(|d| d.path())
        // Follows symlinks: mounted secrets are symlinks into `..data`.
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    Ok(std::iter::once(dir.to_path_buf())
        .chain(subdirs)
        .flat_map(|d| {
            [
                (d.join(DOCKERCONFIGJSON), Format::ConfigJson),
                (d.join(DOCKERCFG), Format::Dockercfg),
            ]
        })
        .filter(|(p, _)| p.is_file())
        .collect())
}

/// Why `check-config` refuses the credential files. The daemon itself skips such
/// a file with a warning (as kubelet does); an operator checking the node wants to
/// hear about it. Never holds a secret: [`FileError`] names keys, not values.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("credentials file {0} (config key `credentials.files`) does not exist")]
    MissingFile(PathBuf),
    #[error(
        "cannot list pull-secret directory {path} (config key `credentials.secret_dirs`): {source}"
    )]
    SecretDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials file {path} is not valid: {source}")]
    Invalid {
        path: PathBuf,
        source: dockerconfig::FileError,
    },
}

/// What a strict reading of the credential files found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Every file read, in the daemon's order.
    pub files: Vec<PathBuf>,
    /// Entries the daemon would skip, each prefixed with its file (never a value).
    pub warnings: Vec<String>,
}

impl FileSettings {
    /// Reads every credential file these settings name or search, strictly: each of
    /// kubelet's search paths that exists, every configured file (it must exist) and
    /// every secret in the secret directories (they must be listable). A file that
    /// cannot be read or parsed is an error; an unusable entry is a warning.
    pub fn check(&self) -> Result<CheckReport, CheckError> {
        let mut files: Vec<(PathBuf, Format)> = Vec::new();
        let mut report = CheckReport::default();
        // kubelet's search paths are tried in order until one file reads; one that
        // does not is skipped by the daemon too, so it is a warning here, not an
        // error (the paths include the working directory, which differs between
        // an operator's shell and the service).
        let [json, cfg] = self.node_search_paths();
        let node = json
            .into_iter()
            .map(|p| (p, Format::ConfigJson))
            .chain(cfg.into_iter().map(|p| (p, Format::Dockercfg)));
        for (path, format) in node.filter(|(p, _)| p.exists()) {
            let read = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| dockerconfig::parse(&bytes, format).map_err(|e| e.to_string()));
            match read {
                Ok(parsed) => {
                    let shown = path.display();
                    report
                        .warnings
                        .extend(parsed.warnings.iter().map(|w| format!("{shown}: {w}")));
                    report.files.push(path);
                    break;
                }
                Err(e) => report.warnings.push(format!(
                    "{}: skipped (the next search path is tried): {e}",
                    path.display()
                )),
            }
        }
        for path in &self.files {
            if !path.exists() {
                return Err(CheckError::MissingFile(path.clone()));
            }
            files.push((path.clone(), Format::ConfigJson));
        }
        for dir in &self.secret_dirs {
            files.extend(
                secret_files_in(dir).map_err(|source| CheckError::SecretDir {
                    path: dir.clone(),
                    source,
                })?,
            );
        }
        for (path, format) in files {
            let bytes = std::fs::read(&path).map_err(|source| CheckError::Read {
                path: path.clone(),
                source,
            })?;
            let parsed =
                dockerconfig::parse(&bytes, format).map_err(|source| CheckError::Invalid {
                    path: path.clone(),
                    source,
                })?;
            let shown = path.display();
            report
                .warnings
                .extend(parsed.warnings.iter().map(|w| format!("{shown}: {w}")));
            report.files.push(path);
        }
        Ok(report)
    }
}

fn push(out: &mut Vec<SourcedEntry>, path: &Path, entries: &[Entry]) {
    let source: Arc<str> = Arc::from(path.display().to_string());
    out.extend(entries.iter().map(|entry| SourcedEntry {
        entry: entry.clone(),
        source: source.clone(),
    }));
}

/// Reads and parses one file, logging the outcome (never the content).
fn read(path: &Path, format: Format) -> Loaded {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read credentials file; ignoring it");
            return Loaded::Broken;
        }
    };
    match dockerconfig::parse(&bytes, format) {
        Ok(parsed) => {
            for warning in &parsed.warnings {
                tracing::warn!(path = %path.display(), "{warning}");
            }
            tracing::info!(path = %path.display(), entries = parsed.entries.len(), "read credentials file");
            Loaded::Valid(parsed.entries.into())
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "credentials file is not valid; ignoring it until it changes");
            Loaded::Broken
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::registry::Credential;
    use base64::Engine as _;

    /// A config.json text: `{"auths": {KEY: {"auth": base64(USER:PASS)}, …}}`.
    pub(in crate::auth) fn auths(pairs: &[(&str, &str)]) -> String {
        let body: Vec<String> = pairs
            .iter()
            .map(|(k, up)| {
                format!(
                    "\"{k}\": {{\"auth\": \"{}\"}}",
                    base64::engine::general_purpose::STANDARD.encode(up)
                )
            })
            .collect();
        format!("{{\"auths\": {{{}}}}}", body.join(","))
    }

    fn flat(pairs: &[(&str, &str)]) -> String {
        let text = auths(pairs);
        text["{\"auths\": ".len()..text.len() - 1].to_string()
    }

    fn summary(k: &FileKeyring) -> Vec<(String, String, String)> {
        k.entries()
            .into_iter()
            .map(|s| {
                let user = match s.entry.credential {
                    Credential::Basic { username, .. } => username,
                    other => other.kind().to_string(),
                };
                (s.entry.key.raw, user, s.source.to_string())
            })
            .collect()
    }

    struct Dirs {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        settings: FileSettings,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["kubelet", "cwd", "home/.docker"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let settings = FileSettings {
            kubelet_root_dir: root.join("kubelet"),
            cwd: Some(root.join("cwd")),
            home: Some(root.join("home")),
            files: vec![],
            secret_dirs: vec![],
        };
        Dirs {
            _tmp: tmp,
            root,
            settings,
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn search_paths_are_kubelets() {
        let s = FileSettings {
            kubelet_root_dir: "/var/lib/kubelet".into(),
            cwd: Some("/work".into()),
            home: Some("/root".into()),
            ..FileSettings::default()
        };
        let [json, cfg] = s.node_search_paths();
        assert_eq!(
            json,
            [
                "/var/lib/kubelet/config.json",
                "/work/config.json",
                "/root/.docker/config.json",
                "/.docker/config.json"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            cfg,
            [
                "/var/lib/kubelet/.dockercfg",
                "/work/.dockercfg",
                "/root/.dockercfg",
                "/.dockercfg"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn first_valid_node_file_wins_and_dockercfg_only_without_config_json() {
        let d = dirs();
        let home_json = d.root.join("home/.docker/config.json");
        let cwd_json = d.root.join("cwd/config.json");
        let kubelet_json = d.root.join("kubelet/config.json");
        let kubelet_cfg = d.root.join("kubelet/.dockercfg");
        write(&kubelet_cfg, &flat(&[("r.io", "legacy:pw")]));
        let k = FileKeyring::new(d.settings.clone());
        assert_eq!(
            summary(&k),
            vec![(
                "r.io".into(),
                "legacy".into(),
                kubelet_cfg.display().to_string()
            )]
        );
        write(&home_json, &auths(&[("r.io", "home:pw")]));
        assert_eq!(summary(&k)[0].1, "home");
        write(&cwd_json, &auths(&[("r.io", "cwd:pw")]));
        assert_eq!(summary(&k)[0].1, "cwd");
        // A broken first file is skipped (kubelet: the first *valid* file wins).
        write(&kubelet_json, "{ not json");
        assert_eq!(summary(&k)[0].1, "cwd");
        write(&kubelet_json, &auths(&[("r.io", "kubelet:pw")]));
        let s = summary(&k);
        assert_eq!(s.len(), 1, "only one node file counts: {s:?}");
        assert_eq!(s[0].1, "kubelet");
    }

    #[test]
    fn listed_files_and_secret_dirs_merge_in_order() {
        let mut d = dirs();
        let extra = d.root.join("auth.json");
        let secrets = d.root.join("secrets");
        for s in ["b-secret", "a-secret", "..data"] {
            std::fs::create_dir_all(secrets.join(s)).unwrap();
        }
        write(
            &d.root.join("kubelet/config.json"),
            &auths(&[("r.io", "node:pw")]),
        );
        write(&extra, &auths(&[("*.r.io", "extra:pw")]));
        write(
            &secrets.join("b-secret").join(DOCKERCONFIGJSON),
            &auths(&[("r.io", "b:pw")]),
        );
        write(
            &secrets.join("a-secret").join(DOCKERCFG),
            &flat(&[("r.io", "a:pw")]),
        );
        write(
            &secrets.join("..data").join(DOCKERCONFIGJSON),
            &auths(&[("r.io", "internal:pw")]),
        );
        write(
            &secrets.join(DOCKERCONFIGJSON),
            &auths(&[("r.io", "top:pw")]),
        );
        d.settings.files = vec![extra.clone(), d.root.join("missing.json")];
        d.settings.secret_dirs = vec![secrets.clone(), d.root.join("no-such-dir")];
        let k = FileKeyring::new(d.settings.clone());
        let users: Vec<String> = summary(&k).into_iter().map(|s| s.1).collect();
        assert_eq!(users, ["node", "extra", "top", "a", "b"]);
    }

    #[test]
    fn check_refuses_broken_configured_files_and_warns_of_skipped_ones() {
        let mut d = dirs();
        let node = d.root.join("kubelet/config.json");
        let secrets = d.root.join("secrets");
        std::fs::create_dir_all(secrets.join("pull")).unwrap();
        write(&node, "{\"auths\": {\"r.io\": {}}}");
        write(
            &secrets.join("pull").join(DOCKERCONFIGJSON),
            &auths(&[("q.io", "u:pw")]),
        );
        d.settings.secret_dirs = vec![secrets.clone()];
        let report = d.settings.check().unwrap();
        assert_eq!(
            report.files,
            [node.clone(), secrets.join("pull").join(DOCKERCONFIGJSON)]
        );
        assert_eq!(
            report.warnings,
            [format!(
                "{}: auths key \"r.io\": no credentials in the entry",
                node.display()
            )]
        );

        let broken = |settings: &FileSettings| settings.check().unwrap_err().to_string();
        // A node search-path file the daemon would skip is a warning: the daemon
        // goes on to the next path, and the working directory in the list is the
        // operator's shell's here, not the service's.
        write(&node, "{\"auths\": [\"secret\"]}");
        let report = d.settings.check().unwrap();
        let w = report.warnings.join("\n");
        assert!(
            w.contains(&node.display().to_string())
                && w.contains("\"auths\"")
                && w.contains("skipped"),
            "{w}"
        );
        assert!(!w.contains("secret\""), "{w}");
        std::fs::remove_file(&node).unwrap();

        let mut missing = d.settings.clone();
        missing.files = vec![d.root.join("auth.json")];
        let e = broken(&missing);
        assert!(
            e.contains("auth.json") && e.contains("credentials.files"),
            "{e}"
        );

        let mut no_dir = d.settings.clone();
        no_dir.secret_dirs = vec![d.root.join("no-such-dir")];
        assert!(broken(&no_dir).contains("credentials.secret_dirs"));
    }

    #[test]
    fn changed_files_are_reread_and_broken_ones_keep_the_rest_working() {
        let mut d = dirs();
        let extra = d.root.join("extra.json");
        let other = d.root.join("other.json");
        d.settings.files = vec![extra.clone(), other.clone()];
        let k = FileKeyring::new(d.settings.clone());
        assert!(summary(&k).is_empty());
        write(&extra, &auths(&[("r.io", "one:pw")]));
        write(&other, &auths(&[("q.io", "other:pw")]));
        assert_eq!(summary(&k).len(), 2);
        // Same size, new content: the inode or mtime tells.
        let tmp = d.root.join("extra.json.tmp");
        write(&tmp, &auths(&[("r.io", "two:pw")]));
        std::fs::rename(&tmp, &extra).unwrap();
        assert_eq!(summary(&k)[0].1, "two");
        write(&extra, "{\"auths\": {");
        let s = summary(&k);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].1, "other");
        write(&extra, &auths(&[("r.io", "fixed:pw")]));
        assert_eq!(summary(&k)[0].1, "fixed");
        std::fs::remove_file(&extra).unwrap();
        assert_eq!(summary(&k).len(), 1);
    }
}
