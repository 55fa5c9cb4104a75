//! A throwaway certificate authority for one test: the CA, server certificates for
//! 127.0.0.1/localhost, and the token-signing certificate, all made with the openssl CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{require_tool, run, HarnessError, IoContext, Result};

/// Extensions for each kind of certificate. Go (docker-registry) and webpki (rustls)
/// both insist on a subjectAltName and on basicConstraints telling CA from leaf.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = cri-imaged test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[signing]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
";

/// A CA whose files live in `dir` (owned by the caller's temp dir).
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
}

/// A key pair with a certificate issued by a [`TestCa`], as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`): both rustls and ring read it.
    pub key: PathBuf,
}

impl TestCa {
    /// Creates a P-256 CA in `dir` (`ca.crt`, `ca.key`).
    pub fn create(dir: &Path) -> Result<TestCa> {
        require_tool("openssl", "openssl")?;
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let cnf = dir.join("openssl.cnf");
        std::fs::write(&cnf, OPENSSL_CNF).ctx(|| format!("writing {}", cnf.display()))?;
        let ca = TestCa {
            dir: dir.to_path_buf(),
        };
        new_key(&ca.key_path())?;
        run(Command::new("openssl")
            .args(["req", "-new", "-x509", "-days", "2", "-config"])
            .arg(&cnf)
            .args([
                "-extensions",
                "ca",
                "-subj",
                "/CN=cri-imaged test CA",
                "-key",
            ])
            .arg(ca.key_path())
            .arg("-out")
            .arg(ca.cert_path()))?;
        Ok(ca)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The CA certificate as PEM text.
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(self.cert_path()).unwrap_or_default()
    }

    /// A server certificate valid for `127.0.0.1` and `localhost`.
    pub fn issue_server(&self, name: &str) -> Result<Issued> {
        self.issue(name, "server", "/CN=127.0.0.1")
    }

    /// The certificate issued earlier as `name`, if any.
    pub fn issued(&self, name: &str) -> Option<Issued> {
        let issued = Issued {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        issued.cert.is_file().then_some(issued)
    }

    /// A client certificate (mutual TLS).
    pub fn issue_client(&self, name: &str) -> Result<Issued> {
        self.issue(name, "client", "/CN=cri-imaged test client")
    }

    /// A certificate for the key that signs registry tokens (JWT `x5c`).
    pub fn issue_signing(&self, name: &str) -> Result<Issued> {
        self.issue(name, "signing", "/CN=cri-imaged test token signer")
    }

    fn issue(&self, name: &str, extensions: &str, subject: &str) -> Result<Issued> {
        let issued = Issued {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        let csr = self.dir.join(format!("{name}.csr"));
        let cnf = self.dir.join("openssl.cnf");
        new_key(&issued.key)?;
        run(Command::new("openssl")
            .args(["req", "-new", "-config"])
            .arg(&cnf)
            .args(["-subj", subject, "-key"])
            .arg(&issued.key)
            .arg("-out")
            .arg(&csr))?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial"])
            .arg(serial())
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(self.cert_path())
            .arg("-CAkey")
            .arg(self.key_path())
            .arg("-extfile")
            .arg(&cnf)
            .args(["-extensions", extensions, "-out"])
            .arg(&issued.cert))?;
        Ok(issued)
    }

    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&self.cert_path())? {
            roots.add(cert)?;
        }
        Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
    }
}

impl Issued {
    /// A rustls server configuration presenting this certificate.
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let certs = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|source| HarnessError::Pem {
            path: self.key.clone(),
            source,
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The certificate in DER, for a JWT `x5c` header.
    pub fn cert_der(&self) -> Result<Vec<u8>> {
        let mut certs = read_certs(&self.cert)?;
        Ok(certs.remove(0).as_ref().to_vec())
    }

    /// The private key as PKCS#8 DER, for ring.
    pub fn key_pkcs8_der(&self) -> Result<Vec<u8>> {
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|source| HarnessError::Pem {
            path: self.key.clone(),
            source,
        })?;
        Ok(key.secret_der().to_vec())
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| HarnessError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(HarnessError::Pem {
            path: path.to_path_buf(),
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// A P-256 key in PKCS#8 PEM.
fn new_key(path: &Path) -> Result<()> {
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(path))?;
    Ok(())
}

/// Distinct serials per certificate so no client confuses two leaves of one CA.
fn serial() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{}",
        (nanos & 0xffff_ffff_ffff) * 1000 + NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
