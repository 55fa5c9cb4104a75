//! Real docker-registry (distribution 2.8) instances on 127.0.0.1 with a port of their
//! own: open over plain HTTP, TLS + htpasswd basic auth, TLS + token auth.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use super::tls::TestCa;
use super::token::{TokenOptions, TokenServer, TokenUser};
use super::{
    must, read_log, require_tool, run, spawn_logged, terminate, wait_ready, IoContext, Result,
};

/// A username and password. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

impl Credentials {
    pub fn new(username: &str, password: &str) -> Credentials {
        Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }
    }

    /// `user:pass`, as skopeo's `--creds` wants it.
    pub fn joined(&self) -> String {
        format!("{}:{}", self.username, self.password)
    }
}

/// How clients authenticate to a [`Registry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Plain HTTP, no auth.
    Open,
    /// TLS and HTTP basic auth against an htpasswd file.
    Htpasswd,
    /// TLS and bearer tokens from a [`TokenServer`].
    Token,
}

/// A running docker-registry; killed and deleted on drop.
pub struct Registry {
    child: Child,
    host: String,
    auth: RegistryAuth,
    ca: Option<TestCa>,
    credentials: Option<Credentials>,
    token: Option<TokenServer>,
    log: PathBuf,
    // Last: removed after the process is gone.
    dir: TempDir,
}

/// The user the harness pushes test images as, on token registries.
pub const TOKEN_PUSHER: &str = "pusher";

impl Registry {
    /// A plain-HTTP registry without auth.
    pub fn open() -> Registry {
        must(Registry::try_open())
    }

    /// A TLS registry (self-signed CA, see [`Registry::ca_path`]) with basic auth for
    /// one user.
    pub fn htpasswd(user: &str, password: &str) -> Registry {
        must(Registry::try_htpasswd(user, password))
    }

    /// A TLS registry with token auth. The token server knows `users` plus
    /// [`TOKEN_PUSHER`] (push to everything; see [`Registry::push_credentials`]).
    pub fn token(users: Vec<TokenUser>) -> Registry {
        must(Registry::try_token(TokenOptions {
            users,
            ..TokenOptions::default()
        }))
    }

    /// [`Registry::token`] with every token-server option (anonymous pulls, realm on
    /// `localhost` for delegated auth on another host, …).
    pub fn token_with(options: TokenOptions) -> Registry {
        must(Registry::try_token(options))
    }

    /// A TLS registry that demands a client certificate issued by its CA (mutual
    /// TLS); see [`Registry::client_certificate`].
    pub fn mutual_tls() -> Registry {
        must(Registry::try_mutual_tls())
    }

    /// A plain-HTTP pull-through cache in front of the open registry `remote`
    /// (docker-registry's `proxy.remoteurl` mode), the way clusters put Harbor,
    /// Spegel or Dragonfly in front of a registry.
    pub fn pull_through(remote: &Registry) -> Registry {
        must(Registry::try_pull_through(remote))
    }

    pub fn try_pull_through(remote: &Registry) -> Result<Registry> {
        let dir = temp_dir()?;
        let proxy = format!("proxy:\n  remoteurl: {}\n", remote.url());
        Registry::launch(dir, RegistryAuth::Open, None, None, None, &proxy)
    }

    pub fn try_open() -> Result<Registry> {
        let dir = temp_dir()?;
        Registry::launch(dir, RegistryAuth::Open, None, None, None, "")
    }

    pub fn try_mutual_tls() -> Result<Registry> {
        let dir = temp_dir()?;
        let ca = TestCa::create(&dir.path().join("ca"))?;
        // Issued before launch: skopeo pushes with it from the cert dir.
        ca.issue_client("client")?;
        Registry::launch(dir, RegistryAuth::Open, Some(ca), None, None, "")
    }

    pub fn try_htpasswd(user: &str, password: &str) -> Result<Registry> {
        require_tool("htpasswd", "apache2-utils")?;
        let dir = temp_dir()?;
        let ca = TestCa::create(&dir.path().join("ca"))?;
        let line = run(Command::new("htpasswd").args(["-Bbn", user, password]))?.stdout;
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, &line).ctx(|| format!("writing {}", htpasswd.display()))?;
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: cri-imaged-test\n    path: {}\n",
            htpasswd.display()
        );
        let credentials = Credentials::new(user, password);
        Registry::launch(
            dir,
            RegistryAuth::Htpasswd,
            Some(ca),
            Some(credentials),
            None,
            &auth,
        )
    }

    pub fn try_token(mut options: TokenOptions) -> Result<Registry> {
        let dir = temp_dir()?;
        let ca = TestCa::create(&dir.path().join("ca"))?;
        let pusher = Credentials::new(TOKEN_PUSHER, &random_password());
        options
            .users
            .push(TokenUser::new(&pusher.username, &pusher.password).push("*"));
        let token = TokenServer::start(&ca, options)?;
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            token.realm(),
            token.service(),
            token.issuer(),
            ca.cert_path().display()
        );
        Registry::launch(
            dir,
            RegistryAuth::Token,
            Some(ca),
            Some(pusher),
            Some(token),
            &auth,
        )
    }

    fn launch(
        dir: TempDir,
        auth: RegistryAuth,
        ca: Option<TestCa>,
        credentials: Option<Credentials>,
        token: Option<TokenServer>,
        auth_yaml: &str,
    ) -> Result<Registry> {
        require_tool("docker-registry", "docker-registry")?;
        let tls = match &ca {
            Some(ca) => {
                let server = ca.issue_server("registry")?;
                let client_cas = match ca.issued("client") {
                    Some(_) => format!("    clientcas:\n      - {}\n", ca.cert_path().display()),
                    None => String::new(),
                };
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n{client_cas}",
                    server.cert.display(),
                    server.key.display()
                )
            }
            None => String::new(),
        };
        // Port 0: the registry picks a free port and logs it, so parallel instances
        // never race for one.
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  secret: cri-imaged-test\n{tls}{auth_yaml}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)
            .ctx(|| format!("writing {}", config_path.display()))?;
        let log = dir.path().join("registry.log");
        let mut child = spawn_logged(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path),
            &log,
            "docker-registry",
        )?;
        let waited = wait_ready(
            "docker-registry",
            &mut child,
            &log,
            Duration::from_secs(30),
            || listening_port(&read_log(&log)),
        );
        let port = match waited {
            Ok(port) => port,
            Err(e) => {
                terminate(&mut child, Duration::from_secs(2));
                return Err(e);
            }
        };
        if let Some(ca) = &ca {
            // skopeo's --cert-dir and containerd's hosts.toml read the CA from here.
            let certs = dir.path().join("certs");
            std::fs::create_dir_all(&certs).ctx(|| format!("creating {}", certs.display()))?;
            std::fs::copy(ca.cert_path(), certs.join("ca.crt"))
                .ctx(|| "copying the registry CA".into())?;
            // skopeo offers `*.cert` + `*.key` from the same directory.
            if let Some(client) = ca.issued("client") {
                std::fs::copy(&client.cert, certs.join("client.cert"))
                    .ctx(|| "copying the client certificate".into())?;
                std::fs::copy(&client.key, certs.join("client.key"))
                    .ctx(|| "copying the client key".into())?;
            }
        }
        Ok(Registry {
            child,
            host: format!("127.0.0.1:{port}"),
            auth,
            ca,
            credentials,
            token,
            log,
            dir,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://…` or `https://…`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.host)
    }

    pub fn scheme(&self) -> &'static str {
        if self.is_tls() {
            "https"
        } else {
            "http"
        }
    }

    pub fn is_tls(&self) -> bool {
        self.ca.is_some()
    }

    pub fn auth(&self) -> RegistryAuth {
        self.auth
    }

    /// The CA that signed the registry's (and token server's) certificate.
    pub fn ca(&self) -> Option<&TestCa> {
        self.ca.as_ref()
    }

    /// Path of the CA certificate (PEM), for TLS registries.
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(TestCa::cert_path)
    }

    pub fn ca_pem(&self) -> Option<String> {
        self.ca.as_ref().map(TestCa::cert_pem)
    }

    /// A directory holding only `ca.crt` (skopeo `--dest-cert-dir` layout).
    /// (certificate, key) PEM files of the client certificate a
    /// [`Registry::mutual_tls`] registry demands.
    pub fn client_certificate(&self) -> Option<(PathBuf, PathBuf)> {
        let client = self.ca.as_ref()?.issued("client")?;
        Some((client.cert, client.key))
    }

    pub fn cert_dir(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(|_| self.dir.path().join("certs"))
    }

    /// The htpasswd user, or the token registry's pusher. `None` for open registries.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Who may push test images here (`None`: anyone).
    pub fn push_credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token.as_ref()
    }

    /// The docker-registry process's ID (to read its CPU time from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The registry's own log (access log included).
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// The port in docker-registry's `listening on 127.0.0.1:PORT` line.
fn listening_port(log: &str) -> Option<u16> {
    let rest = &log[log.find("listening on 127.0.0.1:")? + "listening on 127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn temp_dir() -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix("cri-imaged-registry-")
        .tempdir()
        .ctx(|| "creating a temp dir".into())
}

fn random_password() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 12];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    hex::encode(bytes)
}
