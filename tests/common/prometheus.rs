//! A real Prometheus server (Debian's `prometheus`) scraping one target every second,
//! in its own temp dir and port, killed on drop; `promtool check metrics`; and a
//! plain HTTP GET for scraping `/metrics` the way Prometheus does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{require_tool, spawn_logged, terminate, wait_ready, HarnessError, IoContext, Result};

/// A port on 127.0.0.1 that was free a moment ago (for a process we start next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
}

/// An HTTP/1.1 answer: status, headers (names in lower case) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` (`host:port`), `Connection: close`, read to the end.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<HttpAnswer> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain;version=0.0.4\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_owned()
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

/// Runs `promtool check metrics` on `text` (stdin). Returns what promtool printed;
/// an error when it found a problem.
pub fn promtool_check_metrics(text: &str) -> Result<String> {
    let promtool = require_tool("promtool", "prometheus")?;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| "starting promtool".into())?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .ctx(|| "writing to promtool".into())?;
    let output = child
        .wait_with_output()
        .ctx(|| "waiting for promtool".into())?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(HarnessError::CommandFailed {
            command: "promtool check metrics".into(),
            status: output.status,
            stderr: printed,
        });
    }
    Ok(printed)
}

/// A running Prometheus scraping one target; stopped on drop.
pub struct Prometheus {
    child: Child,
    address: String,
    log: PathBuf,
    // Last: removed after the process is gone.
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`, path `/metrics`) every second.
    pub fn start(target: &str) -> Prometheus {
        super::must(Prometheus::try_start(target))
    }

    pub fn try_start(target: &str) -> Result<Prometheus> {
        let binary = require_tool("prometheus", "prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("cri-imaged-prometheus-")
            .tempdir()
            .ctx(|| "creating a temp dir".into())?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: cri-imaged\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .ctx(|| format!("writing {}", config.display()))?;
        let address = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join("prometheus.log");
        let mut child = spawn_logged(
            Command::new(binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={address}")),
            &log,
            "prometheus",
        )?;
        let ready = wait_ready(
            "prometheus",
            &mut child,
            &log,
            Duration::from_secs(60),
            || {
                http_get(&address, "/-/ready")
                    .ok()
                    .filter(|a| a.status == 200)
            },
        );
        if let Err(e) = ready {
            terminate(&mut child, Duration::from_secs(5));
            return Err(e);
        }
        Ok(Prometheus {
            child,
            address,
            log,
            _dir: dir,
        })
    }

    /// `host:port` of its web API.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn log(&self) -> String {
        super::read_log(&self.log)
    }

    /// The instant query `promql` through `/api/v1/query`: the JSON answer.
    pub fn query(&self, promql: &str) -> std::io::Result<serde_json::Value> {
        let query: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let answer = http_get(&self.address, &format!("/api/v1/query?query={query}"))?;
        serde_json::from_str(&answer.body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Polls `promql` until its one sample's value is `expected`, at most `limit`
    /// (only a bound on a hang: nothing asserts how long it took). Returns the last
    /// answer when it never was.
    pub fn wait_for_value(
        &self,
        promql: &str,
        expected: f64,
        limit: Duration,
    ) -> std::result::Result<serde_json::Value, String> {
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < limit {
            match self.query(promql) {
                Ok(answer) => {
                    let results = answer["data"]["result"].as_array().cloned();
                    let values: Vec<f64> = results
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|r| r["value"][1].as_str()?.parse().ok())
                        .collect();
                    if values == [expected] {
                        return Ok(answer);
                    }
                    last = answer.to_string();
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(last)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}
