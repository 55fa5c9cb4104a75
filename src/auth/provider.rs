//! Kubelet credential-provider exec plugins: the `kubelet.config.k8s.io`
//! CredentialProviderConfig, the `credentialprovider.kubelet.k8s.io` request on the
//! plugin's stdin and response on its stdout, and the response cache per `cacheKeyType`.
//!
//! Plugins run the way kubelet runs them, so the cloud providers' binaries (ECR,
//! GCR/Artifact Registry, ACR) work unchanged:
//! - the binary is `bin_dir/<name>`, with the configured `args`, and the daemon's
//!   environment plus the configured `env` (which wins);
//! - the request's `image` is the repository name without tag or digest
//!   (`docker.io/library/busybox`): kubelet looks credentials up for
//!   `ParseImageName(image)`'s repository, and plugins see only that;
//! - a plugin gets one minute, then it is killed;
//! - concurrent lookups of one image share one run (kubelet's singleflight on the image);
//! - a response is cached under the image, its registry host or one global key, for
//!   its `cacheDuration`, else the provider's `defaultCacheDuration`; zero means
//!   "do not cache". A lookup consults the image, then the registry, then the global entry.
//!
//! Where we differ: `tokenAttributes` (service-account tokens for plugins) is accepted
//! and ignored with a warning, as there is no pod to bind a token to; unknown fields in
//! a response are ignored rather than rejected; matching providers run concurrently.

use crate::auth::matcher::{AuthKey, ImageLocation, Matching};
use crate::reference::Reference;
use crate::registry::Credential;
use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt as _;

/// How long a plugin may run: kubelet's catch-all exec timeout.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

const CONFIG_KIND: &str = "CredentialProviderConfig";
/// The config versions kubelet decodes.
const CONFIG_API_VERSIONS: [&str; 3] = [
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];
/// The plugin API versions kubelet speaks; a provider names one in `apiVersion`.
const PLUGIN_API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];
const REQUEST_KIND: &str = "CredentialProviderRequest";
const RESPONSE_KIND: &str = "CredentialProviderResponse";
/// How much of a failing plugin's stderr goes into the log.
const STDERR_LOG_LIMIT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("credential provider config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential provider config directory {}: no *.json, *.yaml or *.yml file in it", path.display())]
    NoConfigFiles { path: PathBuf },
    /// The file is not YAML/JSON of the right shape. `field` is where decoding stopped.
    #[error("credential provider config {}: {field}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// The file decodes but kubelet's validation rejects it.
    #[error("credential provider config {}: {field}: {why}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        why: String,
    },
    #[error("credential provider bin dir {}: {source}", path.display())]
    BinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential provider config {}: {field}: plugin binary {}: {source}", path.display(), binary.display())]
    Binary {
        path: PathBuf,
        field: String,
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("credential provider config {}: {field}: plugin binary {} is not executable", path.display(), binary.display())]
    NotExecutable {
        path: PathBuf,
        field: String,
        binary: PathBuf,
    },
}

/// Why one plugin run gave no credentials. Logged, never returned: a failing
/// provider yields nothing and the pull goes on with the other candidates.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("could not encode the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("could not start the plugin: {0}")]
    Spawn(#[source] io::Error),
    #[error("could not collect the plugin's output: {0}")]
    Wait(#[source] io::Error),
    #[error("no answer within {0:?}; killed")]
    Timeout(Duration),
    #[error("the plugin exited with {status}; stderr: {stderr:?}")]
    Exit { status: ExitStatus, stderr: String },
    #[error("the plugin's stdout is not a JSON object ({category} error at line {line} column {column})")]
    NotJson {
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("response apiVersion {got:?} is not the requested {expected:?}")]
    ApiVersion { expected: String, got: String },
    #[error("response kind {0:?} is not {RESPONSE_KIND}")]
    Kind(String),
    // The decoder's own message is left out: it may quote a value, and values are secrets.
    #[error("response does not decode at {path} (line {line} column {column})")]
    Decode {
        path: String,
        line: usize,
        column: usize,
    },
    #[error("response cacheKeyType {0:?} is not Image, Registry or Global")]
    CacheKeyType(String),
    #[error("response cacheDuration {value:?}: {why}")]
    CacheDuration { value: String, why: &'static str },
}

/// One credential a provider returned, under its `auths`-style key. The caller
/// matches `key` against the image and orders the candidates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvidedAuth {
    /// The provider's `name` in the config.
    pub provider: String,
    /// A key of the response's `auth` map, e.g. `*.dkr.ecr.us-east-1.amazonaws.com`.
    pub key: String,
    /// Always `Credential::Basic`. Its `Debug` redacts the password.
    pub credential: Credential,
}

/// The configured credential providers. Cheap to clone; clones share the caches.
#[derive(Clone)]
pub struct Providers {
    providers: Arc<[Arc<Provider>]>,
    exec_timeout: Duration,
}

impl fmt::Debug for Providers {
    // Only names: a provider's env may carry secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Providers")
            .field("names", &self.names())
            .field("exec_timeout", &self.exec_timeout)
            .finish()
    }
}

struct Provider {
    name: String,
    binary: PathBuf,
    match_images: Vec<AuthKey>,
    default_cache: Duration,
    api_version: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    state: Mutex<State>,
}

// ---------------------------------------------------------------------------
// The config file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    providers: Vec<ProviderSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ProviderSpec {
    #[serde(default)]
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    #[serde(default, deserialize_with = "go_duration_field")]
    default_cache_duration: Option<i64>,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    /// Service-account tokens for plugins (newer kubelets). We have no pod or
    /// service account to bind a token to, so the block is accepted and ignored.
    #[serde(default)]
    token_attributes: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: String,
}

fn go_duration_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let text = String::deserialize(d)?;
    parse_go_duration(&text)
        .map(Some)
        .map_err(|why| serde::de::Error::custom(format!("{text:?} is not a Go duration: {why}")))
}

/// The files a config path names: the file itself, or a directory's `*.json`,
/// `*.yaml` and `*.yml` files in lexicographic order (newer kubelets accept both).
fn config_files(config: &Path) -> Result<Vec<PathBuf>, ProviderError> {
    let read_err = |source| ProviderError::Read {
        path: config.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(config).map_err(read_err)?;
    if !meta.is_dir() {
        return Ok(vec![config.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(config).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        let wanted = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "yaml" | "yml")
        );
        if wanted && !entry.file_type().map_err(read_err)?.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ProviderError::NoConfigFiles {
            path: config.to_path_buf(),
        });
    }
    Ok(files)
}

fn parse_config(path: &Path, text: &str) -> Result<ConfigFile, ProviderError> {
    let syntax = |field: String, message: String| ProviderError::Syntax {
        path: path.to_path_buf(),
        field,
        message,
    };
    // kubelet's decoder takes JSON or YAML; JSON gets the JSON parser for its messages.
    if text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        let config: ConfigFile = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| syntax(e.path().to_string(), e.into_inner().to_string()))?;
        de.end()
            .map_err(|e| syntax(".".to_string(), e.to_string()))?;
        Ok(config)
    } else {
        serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text))
            .map_err(|e| syntax(e.path().to_string(), e.into_inner().to_string()))
    }
}

/// A provider as written, before its binary is checked.
struct Validated {
    file: PathBuf,
    field: String,
    name: String,
    match_images: Vec<AuthKey>,
    default_cache: Duration,
    api_version: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// kubelet's validation of one file; `seen` carries provider names across files.
fn validate(
    path: &Path,
    config: ConfigFile,
    seen: &mut HashSet<String>,
) -> Result<Vec<Validated>, ProviderError> {
    let invalid = |field: String, why: String| ProviderError::Invalid {
        path: path.to_path_buf(),
        field,
        why,
    };
    match config.kind.as_deref() {
        Some(CONFIG_KIND) => {}
        Some(other) => {
            return Err(invalid(
                "kind".into(),
                format!("{other:?} is not {CONFIG_KIND}"),
            ))
        }
        None => return Err(invalid("kind".into(), format!("required: {CONFIG_KIND}"))),
    }
    match config.api_version.as_deref() {
        Some(v) if CONFIG_API_VERSIONS.contains(&v) => {}
        v => {
            return Err(invalid(
                "apiVersion".into(),
                format!("{v:?} is not one of {CONFIG_API_VERSIONS:?}"),
            ))
        }
    }
    if config.providers.is_empty() {
        return Err(invalid(
            "providers".into(),
            "at least one provider is required".into(),
        ));
    }
    let mut out = Vec::new();
    for (i, spec) in config.providers.into_iter().enumerate() {
        let at = |field: &str| format!("providers[{i}].{field}");
        let name = spec.name;
        if name.is_empty() {
            return Err(invalid(at("name"), "required".into()));
        }
        if name.contains('/') || name.contains(' ') || name == "." || name == ".." {
            return Err(invalid(
                at("name"),
                format!("{name:?} must be a file name in the bin dir: no '/', no spaces, not '.' or '..'"),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(invalid(
                at("name"),
                format!("{name:?} names another provider too"),
            ));
        }
        if spec.api_version.is_empty() {
            return Err(invalid(at("apiVersion"), "required".into()));
        }
        if !PLUGIN_API_VERSIONS.contains(&spec.api_version.as_str()) {
            return Err(invalid(
                at("apiVersion"),
                format!(
                    "{:?} is not one of {PLUGIN_API_VERSIONS:?}",
                    spec.api_version
                ),
            ));
        }
        if spec.match_images.is_empty() {
            return Err(invalid(
                at("matchImages"),
                "at least one pattern is required".into(),
            ));
        }
        let mut match_images = Vec::new();
        for (j, pattern) in spec.match_images.iter().enumerate() {
            let key = AuthKey::parse(pattern)
                .map_err(|e| invalid(format!("providers[{i}].matchImages[{j}]"), e.to_string()))?;
            match_images.push(key);
        }
        let default_cache = match spec.default_cache_duration {
            None => return Err(invalid(at("defaultCacheDuration"), "required".into())),
            Some(n) => nanos_to_duration(n).ok_or_else(|| {
                invalid(at("defaultCacheDuration"), "must be zero or more".into())
            })?,
        };
        if spec.token_attributes.is_some() {
            tracing::warn!(
                file = %path.display(),
                provider = %name,
                "credential provider tokenAttributes ignored: no pod service account to bind a token to; the plugin runs without one"
            );
        }
        out.push(Validated {
            file: path.to_path_buf(),
            field: at("name"),
            name,
            match_images,
            default_cache,
            api_version: spec.api_version,
            args: spec.args,
            env: spec.env.into_iter().map(|v| (v.name, v.value)).collect(),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Go durations (`metav1.Duration` is `time.ParseDuration` text).

/// Parses Go's duration syntax (`"12h"`, `"1h30m"`, `"1.5s"`, `"-2m"`, `"0"`) into
/// nanoseconds, as `time.ParseDuration` does, overflow beyond `i64` included.
fn parse_go_duration(text: &str) -> Result<i64, &'static str> {
    let mut s = text;
    let negative = match s.as_bytes().first() {
        Some(b'-') => {
            s = &s[1..];
            true
        }
        Some(b'+') => {
            s = &s[1..];
            false
        }
        _ => false,
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err("empty");
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_digits = &s[..int_len];
        s = &s[int_len..];
        let mut frac_digits = "";
        if let Some(rest) = s.strip_prefix('.') {
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_digits = &rest[..n];
            s = &rest[n..];
        }
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err("expected a number");
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(s.len(), |(i, _)| i);
        let unit: u64 = match &s[..unit_len] {
            "" => return Err("missing unit"),
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err("unknown unit (ns, us, ms, s, m, h)"),
        };
        s = &s[unit_len..];
        let overflow = "too large";
        let int: u64 = if int_digits.is_empty() {
            0
        } else {
            int_digits.parse().map_err(|_too_many_digits| overflow)?
        };
        let mut value = int.checked_mul(unit).ok_or(overflow)?;
        if !frac_digits.is_empty() {
            // As Go does: the fraction in floating point, truncated to whole nanoseconds.
            let frac: f64 = format!("0.{frac_digits}")
                .parse()
                .map_err(|_digits_only| "expected a number")?;
            value = value
                .checked_add((frac * unit as f64) as u64)
                .ok_or(overflow)?;
        }
        total = total.checked_add(value).ok_or(overflow)?;
    }
    let limit = if negative {
        i64::MIN.unsigned_abs()
    } else {
        i64::MAX as u64
    };
    if total > limit {
        return Err("too large");
    }
    Ok(if negative {
        0i64.wrapping_sub_unsigned(total)
    } else {
        total as i64
    })
}

/// `None` for a negative duration.
fn nanos_to_duration(nanos: i64) -> Option<Duration> {
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}

// ---------------------------------------------------------------------------
// Request and response.

#[derive(serde::Serialize)]
struct Request<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: &'static str,
    image: &'a str,
}

fn encode_request(api_version: &str, image: &str) -> Result<Vec<u8>, ExecError> {
    serde_json::to_vec(&Request {
        api_version,
        kind: REQUEST_KIND,
        image,
    })
    .map_err(ExecError::Encode)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheKeyType {
    Image,
    Registry,
    Global,
}

/// A decoded response. No `Debug`: it holds passwords.
struct Response {
    cache_key_type: CacheKeyType,
    /// `None`: use the provider's default. Nanoseconds, as Go; negative never caches.
    cache_duration: Option<i64>,
    auths: Auths,
}

type Auths = Arc<[(String, Credential)]>;

#[derive(Deserialize)]
struct Header {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResponse {
    #[serde(default)]
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: Option<BTreeMap<String, RawAuth>>,
}

#[derive(Deserialize)]
struct RawAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

fn decode_response(stdout: &[u8], expected_api_version: &str) -> Result<Response, ExecError> {
    // kubelet reads apiVersion and kind first and insists on the version it sent.
    let header: Header = serde_json::from_slice(stdout).map_err(|e| ExecError::NotJson {
        category: match e.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "unexpected end",
        },
        line: e.line(),
        column: e.column(),
    })?;
    if header.api_version != expected_api_version {
        return Err(ExecError::ApiVersion {
            expected: expected_api_version.to_string(),
            got: header.api_version,
        });
    }
    if header.kind != RESPONSE_KIND {
        return Err(ExecError::Kind(header.kind));
    }
    let mut de = serde_json::Deserializer::from_slice(stdout);
    let raw: RawResponse = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ExecError::Decode {
            path,
            line: inner.line(),
            column: inner.column(),
        }
    })?;
    let cache_key_type = match raw.cache_key_type.as_str() {
        "Image" => CacheKeyType::Image,
        "Registry" => CacheKeyType::Registry,
        "Global" => CacheKeyType::Global,
        _ => return Err(ExecError::CacheKeyType(raw.cache_key_type)),
    };
    let cache_duration = match raw.cache_duration {
        None => None,
        Some(text) => Some(
            parse_go_duration(&text)
                .map_err(|why| ExecError::CacheDuration { value: text, why })?,
        ),
    };
    let auths = raw
        .auth
        .unwrap_or_default()
        .into_iter()
        .map(|(key, a)| {
            (
                key,
                Credential::Basic {
                    username: a.username,
                    password: a.password,
                },
            )
        })
        .collect();
    Ok(Response {
        cache_key_type,
        cache_duration,
        auths,
    })
}

// ---------------------------------------------------------------------------
// Cache and single flight.

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    /// The request's image (repository name).
    Image(String),
    /// The registry host[:port].
    Registry(String),
    Global,
}

struct Entry {
    auths: Auths,
    /// `None`: the duration overflowed `Instant`; kept until restart.
    expires: Option<Instant>,
}

/// One plugin run in progress, awaited by every lookup of the same image.
type Flight = Shared<BoxFuture<'static, Option<Auths>>>;

#[derive(Default)]
struct State {
    cache: HashMap<CacheKey, Entry>,
    inflight: HashMap<String, Flight>,
}

impl State {
    fn purge(&mut self, now: Instant) {
        self.cache
            .retain(|_, e| e.expires.is_none_or(|expires| now <= expires));
    }

    /// kubelet's order: the image's entry, then its registry's, then the global one.
    fn cached(&self, image: &str, registry: &str, now: Instant) -> Option<Auths> {
        [
            CacheKey::Image(image.to_string()),
            CacheKey::Registry(registry.to_string()),
            CacheKey::Global,
        ]
        .iter()
        .filter_map(|k| self.cache.get(k))
        .find(|e| e.expires.is_none_or(|expires| now <= expires))
        .map(|e| Arc::clone(&e.auths))
    }

    fn store(
        &mut self,
        kind: CacheKeyType,
        image: &str,
        registry: &str,
        auths: Auths,
        ttl: Duration,
        now: Instant,
    ) {
        if ttl.is_zero() {
            return;
        }
        let key = match kind {
            CacheKeyType::Image => CacheKey::Image(image.to_string()),
            CacheKeyType::Registry => CacheKey::Registry(registry.to_string()),
            CacheKeyType::Global => CacheKey::Global,
        };
        let expires = now.checked_add(ttl);
        self.cache.insert(key, Entry { auths, expires });
    }
}

// ---------------------------------------------------------------------------
// Providers.

impl Providers {
    /// Reads the CredentialProviderConfig (YAML or JSON; a directory of them, as
    /// newer kubelets accept) and checks each provider's binary exists in `bin_dir`.
    pub fn load(config: &Path, bin_dir: &Path) -> Result<Providers, ProviderError> {
        let mut seen = HashSet::new();
        let mut validated = Vec::new();
        for file in config_files(config)? {
            let text = std::fs::read_to_string(&file).map_err(|source| ProviderError::Read {
                path: file.clone(),
                source,
            })?;
            let parsed = parse_config(&file, &text)?;
            validated.extend(validate(&file, parsed, &mut seen)?);
        }
        let bin_meta = std::fs::metadata(bin_dir).map_err(|source| ProviderError::BinDir {
            path: bin_dir.to_path_buf(),
            source,
        })?;
        if !bin_meta.is_dir() {
            return Err(ProviderError::BinDir {
                path: bin_dir.to_path_buf(),
                source: io::Error::from(io::ErrorKind::NotADirectory),
            });
        }
        let mut providers = Vec::new();
        for v in validated {
            let binary = bin_dir.join(&v.name);
            let meta = std::fs::metadata(&binary).map_err(|source| ProviderError::Binary {
                path: v.file.clone(),
                field: v.field.clone(),
                binary: binary.clone(),
                source,
            })?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err(ProviderError::NotExecutable {
                    path: v.file,
                    field: v.field,
                    binary,
                });
            }
            tracing::info!(
                provider = %v.name,
                binary = %binary.display(),
                api_version = %v.api_version,
                "credential provider registered"
            );
            providers.push(Arc::new(Provider {
                name: v.name,
                binary,
                match_images: v.match_images,
                default_cache: v.default_cache,
                api_version: v.api_version,
                args: v.args,
                env: v.env,
                state: Mutex::new(State::default()),
            }));
        }
        Ok(Providers {
            providers: providers.into(),
            exec_timeout: EXEC_TIMEOUT,
        })
    }

    /// No providers: every lookup is empty.
    pub fn empty() -> Providers {
        Providers {
            providers: Arc::new([]),
            exec_timeout: EXEC_TIMEOUT,
        }
    }

    /// The same providers (sharing their caches) with another exec timeout than
    /// kubelet's minute. For tests.
    pub fn with_exec_timeout(mut self, timeout: Duration) -> Providers {
        self.exec_timeout = timeout;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Provider names in config order.
    pub fn names(&self) -> Vec<&str> {
        self.providers.iter().map(|p| p.name.as_str()).collect()
    }

    /// Credentials from every provider whose `matchImages` matches `image`, running
    /// the plugin or answering from its cache; in config order, each provider's
    /// `auth` keys in lexicographic order. The caller matches each key against the
    /// image and orders the candidates. A plugin failure is logged and yields nothing.
    pub async fn lookup(&self, image: &Reference) -> Vec<ProvidedAuth> {
        let location = ImageLocation::new(image.domain(), image.path());
        let runs = self
            .providers
            .iter()
            .filter(|p| {
                p.match_images
                    .iter()
                    .any(|k| k.matches(&location, Matching::Kubelet))
            })
            .map(|p| async move { (p, p.provide(image, self.exec_timeout).await) });
        let mut out = Vec::new();
        for (provider, auths) in futures_util::future::join_all(runs).await {
            for (key, credential) in auths.iter().flat_map(|a| a.iter()) {
                out.push(ProvidedAuth {
                    provider: provider.name.clone(),
                    key: key.clone(),
                    credential: credential.clone(),
                });
            }
        }
        out
    }
}

impl Provider {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves a usable cache.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn provide(self: &Arc<Self>, image: &Reference, timeout: Duration) -> Option<Auths> {
        // What kubelet hands plugins and keys its single flight and image cache by.
        let request_image = image.name();
        let registry = image.domain();
        let flight = {
            let mut state = self.lock();
            let now = Instant::now();
            state.purge(now);
            if let Some(hit) = state.cached(&request_image, registry, now) {
                tracing::debug!(provider = %self.name, image = %request_image, "credential provider answered from its cache");
                return Some(hit);
            }
            state
                .inflight
                .entry(request_image.clone())
                .or_insert_with(|| {
                    // A task, so the run finishes and fills the cache even when
                    // every waiting pull is cancelled.
                    let task = tokio::spawn(Arc::clone(self).run(
                        request_image.clone(),
                        registry.to_string(),
                        timeout,
                    ));
                    task.map(|joined| joined.ok().flatten()).boxed().shared()
                })
                .clone()
        };
        let answer = flight.clone().await;
        if answer.is_none() {
            // `run` clears its own entry; this covers a run that panicked, so a
            // dead flight cannot answer for the image forever.
            let mut state = self.lock();
            if state
                .inflight
                .get(&request_image)
                .is_some_and(|f| f.ptr_eq(&flight))
            {
                state.inflight.remove(&request_image);
            }
        }
        answer
    }

    async fn run(
        self: Arc<Self>,
        image: String,
        registry: String,
        timeout: Duration,
    ) -> Option<Auths> {
        let result = self.exec(&image, timeout).await;
        let mut state = self.lock();
        state.inflight.remove(&image);
        match result {
            Err(error) => {
                tracing::warn!(
                    provider = %self.name,
                    image = %image,
                    %error,
                    "credential provider plugin failed; it gives no credentials"
                );
                None
            }
            Ok(response) => {
                tracing::debug!(
                    provider = %self.name,
                    image = %image,
                    keys = ?response.auths.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
                    "credential provider plugin answered"
                );
                let ttl = match response.cache_duration {
                    None => self.default_cache,
                    // A negative duration is already expired.
                    Some(nanos) => nanos_to_duration(nanos).unwrap_or(Duration::ZERO),
                };
                state.store(
                    response.cache_key_type,
                    &image,
                    &registry,
                    Arc::clone(&response.auths),
                    ttl,
                    Instant::now(),
                );
                Some(response.auths)
            }
        }
    }

    async fn exec(&self, image: &str, timeout: Duration) -> Result<Response, ExecError> {
        let request = encode_request(&self.api_version, image)?;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(&self.args)
            // Added to the inherited environment; a configured name overrides.
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = spawn(&mut command).await.map_err(ExecError::Spawn)?;
        let stdin = child.stdin.take();
        let write = async move {
            if let Some(mut stdin) = stdin {
                // A plugin may exit without reading its stdin; Go's exec ignores
                // that broken pipe, and so do we. The exit status tells the rest.
                let _ = stdin.write_all(&request).await;
                let _ = stdin.shutdown().await;
            }
        };
        let run = async {
            let ((), output) = tokio::join!(write, child.wait_with_output());
            output
        };
        let output = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_elapsed| ExecError::Timeout(timeout))?
            .map_err(ExecError::Wait)?;
        if !output.status.success() {
            return Err(ExecError::Exit {
                status: output.status,
                stderr: trimmed_stderr(&output.stderr),
            });
        }
        decode_response(&output.stdout, &self.api_version)
    }
}

/// Spawns, retrying briefly on ETXTBSY: a binary just written (or being replaced)
/// may still be open for writing in a process forked meanwhile.
async fn spawn(command: &mut tokio::process::Command) -> io::Result<tokio::process::Child> {
    let mut attempts = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempts < 5 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            result => return result,
        }
    }
}

fn trimmed_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.len() <= STDERR_LOG_LIMIT {
        return text.to_string();
    }
    let mut end = STDERR_LOG_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_time_parse_duration() {
        let s = 1_000_000_000i64;
        let cases: [(&str, i64); 14] = [
            ("0", 0),
            ("0s", 0),
            ("-0", 0),
            ("12h", 12 * 3600 * s),
            ("1h30m", 5400 * s),
            ("1.5h", 5400 * s),
            ("300ms", 300_000_000),
            ("2h45m10s", (2 * 3600 + 45 * 60 + 10) * s),
            ("-2m", -120 * s),
            ("+5s", 5 * s),
            ("1us", 1_000),
            ("1\u{b5}s", 1_000),
            (".5s", s / 2),
            ("1.s", s),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "", "-", "5", "1d", "h", ".s", "1h 30m", "3000000h", "s5", "12 h",
        ] {
            assert!(
                parse_go_duration(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    fn config(text: &str) -> Result<Vec<Validated>, ProviderError> {
        let path = Path::new("/etc/kubernetes/credential-providers.yaml");
        let parsed = parse_config(path, text)?;
        validate(path, parsed, &mut HashSet::new())
    }

    const ECR_YAML: &str = r#"
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "*.dkr.ecr.*.amazonaws.com.cn"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: node
"#;

    #[test]
    fn ecr_style_yaml_config_is_accepted() {
        let v = config(ECR_YAML).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "ecr-credential-provider");
        assert_eq!(v[0].match_images.len(), 2);
        assert_eq!(v[0].default_cache, Duration::from_secs(12 * 3600));
        assert_eq!(v[0].args, ["get-credentials"]);
        assert_eq!(v[0].env, [("AWS_PROFILE".into(), "node".into())]);
    }

    #[test]
    fn json_config_and_older_versions_are_accepted() {
        let text = r#"{
          "apiVersion": "kubelet.config.k8s.io/v1beta1",
          "kind": "CredentialProviderConfig",
          "providers": [{
            "name": "acr-credential-provider",
            "matchImages": ["*.azurecr.io"],
            "defaultCacheDuration": "10m",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1alpha1"
          }]
        }"#;
        let v = config(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v[0].default_cache, Duration::from_secs(600));
        assert_eq!(
            v[0].api_version,
            "credentialprovider.kubelet.k8s.io/v1alpha1"
        );
    }

    #[test]
    fn token_attributes_are_accepted_and_ignored() {
        let text = ECR_YAML.replace(
            "    env:",
            "    tokenAttributes:\n      serviceAccountTokenAudience: sts.amazonaws.com\n      requireServiceAccount: true\n    env:",
        );
        assert_eq!(config(&text).unwrap_or_else(|e| panic!("{e}")).len(), 1);
    }

    /// Each bad config names the field that is wrong.
    #[test]
    fn bad_configs_name_the_field() {
        let cases: [(&str, &str, &str); 13] = [
            ("kind: CredentialProviderConfig", "kind: KubeletConfiguration", "kind"),
            ("apiVersion: kubelet.config.k8s.io/v1\n", "apiVersion: v1\n", "apiVersion"),
            ("ecr-credential-provider", "bin/ecr", "providers[0].name"),
            ("ecr-credential-provider", "\"..\"", "providers[0].name"),
            ("ecr-credential-provider", "\"\"", "providers[0].name"),
            ("\"12h\"", "\"12 hours\"", "providers[0].defaultCacheDuration"),
            ("\"12h\"", "\"-1h\"", "providers[0].defaultCacheDuration"),
            ("    defaultCacheDuration: \"12h\"\n", "", "providers[0].defaultCacheDuration"),
            ("credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v2", "providers[0].apiVersion"),
            ("      - \"*.dkr.ecr.*.amazonaws.com\"\n      - \"*.dkr.ecr.*.amazonaws.com.cn\"\n", "      - \"[.io\"\n", "providers[0].matchImages[0]"),
            ("    matchImages:\n      - \"*.dkr.ecr.*.amazonaws.com\"\n      - \"*.dkr.ecr.*.amazonaws.com.cn\"\n", "", "providers[0].matchImages"),
            ("    args:", "    argz:", "providers[0]"),
            ("        value: node", "        valu: node", "providers[0].env[0]"),
        ];
        for (from, to, field) in cases {
            let text = ECR_YAML.replacen(from, to, 1);
            assert_ne!(text, ECR_YAML, "{from:?} not in the sample");
            let err = config(&text)
                .err()
                .unwrap_or_else(|| panic!("{to:?} accepted"));
            let msg = err.to_string();
            assert!(
                msg.starts_with(
                    "credential provider config /etc/kubernetes/credential-providers.yaml: "
                ),
                "{msg}"
            );
            assert!(msg.contains(&format!(": {field}")), "{field} not in {msg}");
        }
    }

    #[test]
    fn duplicate_names_and_empty_provider_lists_are_rejected() {
        let twice = ECR_YAML.to_string()
            + "  - name: ecr-credential-provider\n    matchImages: [\"r.io\"]\n    defaultCacheDuration: 0s\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n";
        let msg = config(&twice)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("providers[1].name"), "{msg}");
        let none =
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders: []\n";
        let msg = config(none)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains(": providers: "), "{msg}");
    }

    #[test]
    fn request_is_kubelets_json() {
        let bytes = encode_request("credentialprovider.kubelet.k8s.io/v1", "r.io/team/app")
            .unwrap_or_else(|e| panic!("{e}"));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "kind": "CredentialProviderRequest",
                "image": "r.io/team/app",
            })
        );
    }

    const V1: &str = "credentialprovider.kubelet.k8s.io/v1";

    #[test]
    fn responses_decode_and_are_checked() {
        let ok = br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse",
            "cacheKeyType":"Registry","cacheDuration":"6h",
            "auth":{"b.io":{"username":"u2","password":"p2"},"a.io":{"username":"u1","password":"p1"}}}"#;
        let r = decode_response(ok, V1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.cache_key_type, CacheKeyType::Registry);
        assert_eq!(r.cache_duration, Some(6 * 3600 * 1_000_000_000));
        let keys: Vec<&str> = r.auths.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a.io", "b.io"]);

        let no_duration = br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Global"}"#;
        let r = decode_response(no_duration, V1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.cache_duration, None);
        assert!(r.auths.is_empty());

        let bad: [(&[u8], &str); 6] = [
            (b"not json", "not a JSON object"),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1beta1","kind":"CredentialProviderResponse","cacheKeyType":"Image"}"#, "apiVersion"),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","cacheKeyType":"Image"}"#, "kind"),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Pod"}"#, "cacheKeyType"),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse"}"#, "cacheKeyType"),
            (br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","cacheDuration":"soon"}"#, "cacheDuration"),
        ];
        for (body, word) in bad {
            let msg = decode_response(body, V1)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(msg.contains(word), "{word} not in {msg:?}");
        }
    }

    #[test]
    fn decode_errors_never_quote_the_secret() {
        let body = br#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse",
            "cacheKeyType":"Image","auth":{"r.io":{"username":"u","password":987654321}}}"#;
        let msg = decode_response(body, V1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("auth.r.io.password"), "{msg}");
        assert!(!msg.contains("987654321"), "{msg}");
    }

    fn auths(user: &str) -> Auths {
        Arc::from(vec![(
            "r.io".to_string(),
            Credential::Basic {
                username: user.into(),
                password: "p".into(),
            },
        )])
    }

    #[test]
    fn cache_is_consulted_image_then_registry_then_global() {
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut s = State::default();
        s.store(
            CacheKeyType::Global,
            "g.io/x",
            "g.io",
            auths("global"),
            hour,
            now,
        );
        s.store(
            CacheKeyType::Registry,
            "r.io/x",
            "r.io",
            auths("registry"),
            hour,
            now,
        );
        s.store(
            CacheKeyType::Image,
            "r.io/x",
            "r.io",
            auths("image"),
            hour,
            now,
        );
        let user = |hit: Option<Auths>| match hit.as_deref() {
            Some([(_, Credential::Basic { username, .. })]) => username.clone(),
            _ => String::new(),
        };
        assert_eq!(user(s.cached("r.io/x", "r.io", now)), "image");
        assert_eq!(user(s.cached("r.io/y", "r.io", now)), "registry");
        assert_eq!(user(s.cached("o.io/z", "o.io", now)), "global");
    }

    #[test]
    fn expired_entries_are_not_served_and_are_purged() {
        let now = Instant::now();
        let mut s = State::default();
        s.store(
            CacheKeyType::Image,
            "r.io/x",
            "r.io",
            auths("a"),
            Duration::from_secs(60),
            now,
        );
        s.store(
            CacheKeyType::Registry,
            "q.io/x",
            "q.io",
            auths("b"),
            Duration::ZERO,
            now,
        );
        assert_eq!(s.cache.len(), 1, "a zero duration is not cached");
        let later = now + Duration::from_secs(61);
        assert!(s.cached("r.io/x", "r.io", later).is_none());
        assert!(s
            .cached("r.io/x", "r.io", now + Duration::from_secs(60))
            .is_some());
        s.purge(later);
        assert!(s.cache.is_empty());
    }

    #[test]
    fn stderr_is_trimmed_and_bounded() {
        assert_eq!(trimmed_stderr(b"  oops\n"), "oops");
        let long = "é".repeat(STDERR_LOG_LIMIT);
        let t = trimmed_stderr(long.as_bytes());
        assert!(t.len() <= STDERR_LOG_LIMIT + '…'.len_utf8());
        assert!(t.ends_with('…'));
    }

    #[test]
    fn debug_output_shows_no_env_or_password() {
        let p = ProvidedAuth {
            provider: "ecr".into(),
            key: "r.io".into(),
            credential: Credential::Basic {
                username: "AWS".into(),
                password: "hunter2".into(),
            },
        };
        assert!(!format!("{p:?}").contains("hunter2"));
        assert!(format!("{:?}", Providers::empty()).contains("names"));
    }
}
