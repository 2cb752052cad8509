//! Support for the ops tests: running `bizq`, plain HTTP requests to a process's ops or
//! dashboard listener, and reading Prometheus text.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::engine::{binary, url_of};

/// What a `bizq` run printed.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `bizq args…` against the test's database, with the given config file if any.
pub async fn bizq(pool: &PgPool, config: Option<&std::path::Path>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(binary("bizq"));
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args)
        .env_remove("BIZQ_CONFIG")
        .env("DATABASE_URL", url_of(pool))
        .env("RUST_LOG", "warn");
    let out = cmd.output().await.expect("bizq runs");
    Run {
        code: out.status.code().expect("bizq exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An HTTP response: status code, headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`; `extra` are raw header lines.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    extra: &[&str],
    body: &str,
) -> anyhow::Result<Response> {
    http_to_host(addr, Some(addr), method, path, extra, body).await
}

/// [`http`] sent to `addr` but naming `host` in its `Host` header (none for `None`), as a
/// browser does when a DNS name (say, a rebinding attacker's) resolves to `addr`.
pub async fn http_to_host(
    addr: &str,
    host: Option<&str>,
    method: &str,
    path: &str,
    extra: &[&str],
    body: &str,
) -> anyhow::Result<Response> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if let Some(host) = host {
        req.push_str(&format!("Host: {host}\r\n"));
    }
    req.push_str("Connection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header in {text:?}"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET and return the response.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<Response> {
    http(addr, "GET", path, &[], "").await
}

/// Prometheus text as `name{labels}` → value (labels as rendered, sorted by the exporter).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of every series of `name` whose labels contain all of `labels` (`key="value"`).
pub fn sum(metrics: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| {
            let (n, l) = k.split_once('{').unwrap_or((k.as_str(), ""));
            n == name && labels.iter().all(|want| l.contains(want))
        })
        .map(|(_, v)| v)
        .sum()
}

/// The metrics address a process registered in `workers`, waiting for the row.
pub async fn metrics_addr_of(pool: &PgPool, id: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let addr: Option<Option<String>> =
            sqlx::query_scalar("SELECT metrics_addr FROM workers WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
        if let Some(Some(a)) = addr {
            return Ok(a);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{id} never registered a metrics address"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
