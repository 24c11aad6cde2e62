//! The CLI's HTTP client for `/api/v1`: one request per connection,
//! HTTP/1.1 over TCP or TLS (trusting the platform's own CA, or a given CA
//! file). Small on purpose: the CLI needs JSON in and out, nothing more.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where the CLI finds the server and its credentials: flags, then
/// `M2MHUB_SERVER` / `M2MHUB_TOKEN` / `M2MHUB_CA_FILE`, then the profile file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

impl Profile {
    /// `$M2MHUB_PROFILE`, else `$XDG_CONFIG_HOME/m2mhub/cli.toml`, else
    /// `~/.config/m2mhub/cli.toml`.
    pub fn path(env: &[(String, String)]) -> Option<PathBuf> {
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if let Some(p) = get("M2MHUB_PROFILE") {
            return Some(PathBuf::from(p));
        }
        let base = get("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| get("HOME").map(|h| Path::new(&h).join(".config")))?;
        Some(base.join("m2mhub").join("cli.toml"))
    }

    pub fn load(path: &Path) -> Result<Profile> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| anyhow!("profile {}: {}", path.display(), e.message())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Profile::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read profile {}", path.display())),
        }
    }

    /// Write with owner-only permissions: the file holds an API token.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = toml::to_string(self)?;
        write_owner_only(path, &text)
    }
}

/// Write a file only its owner can read (it holds a secret: an API token or
/// a private key).
pub fn write_owner_only(path: &Path, text: &str) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

/// A parsed `http://host:port` or `https://host:port` base address.
#[derive(Debug, Clone)]
struct Base {
    tls: bool,
    host: String,
    port: u16,
    prefix: String,
}

impl Base {
    /// `host[:port]` as the `Host` header wants it (RFC 9110 §7.2: the
    /// port unless it is the scheme's default). The server builds URLs it
    /// hands to devices (diagnostic uploads) from it.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn parse_base(url: &str) -> Result<Base> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("server address {url:?} must start with http:// or https:// (e.g. http://127.0.0.1:8080)");
    };
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
        None => (rest, String::new()),
    };
    let default_port = if tls { 443 } else { 80 };
    let bad_port = || anyhow!("bad port in server address {url:?}");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, rest) = v6
            .split_once(']')
            .ok_or_else(|| anyhow!("bad IPv6 address in {url:?}"))?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad_port())?,
            None => default_port,
        };
        (h.to_string(), port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad_port())?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() {
        bail!("server address {url:?} has no host");
    }
    Ok(Base {
        tls,
        host,
        port,
        prefix,
    })
}

pub struct ApiClient {
    base: Base,
    token: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// A response: status and JSON body (`Null` when empty).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Response {
    /// The body of a 2xx response, or an error made from the problem
    /// document the API returns.
    pub fn ok(self) -> Result<serde_json::Value> {
        if (200..300).contains(&self.status) {
            return Ok(self.body);
        }
        let detail = self
            .body
            .get("detail")
            .and_then(|d| d.as_str())
            .or_else(|| self.body.get("title").and_then(|d| d.as_str()))
            .unwrap_or("request failed");
        bail!("{} ({})", detail, self.status)
    }
}

impl ApiClient {
    pub fn new(server: &str, token: Option<String>, ca_file: Option<&Path>) -> Result<ApiClient> {
        let base = parse_base(server)?;
        let tls = if base.tls {
            let mut roots = rustls::RootCertStore::empty();
            let Some(ca) = ca_file else {
                bail!("an https server needs --ca-file (the platform CA is <data_dir>/pki/ca.pem) or M2MHUB_CA_FILE");
            };
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read CA file {}", ca.display()))?
            {
                roots.add(c.with_context(|| format!("bad PEM in {}", ca.display()))?)?;
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(ApiClient { base, token, tls })
    }

    pub async fn get(&self, path: &str) -> Result<Response> {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Response> {
        self.request("POST", path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &serde_json::Value) -> Result<Response> {
        self.request("PATCH", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Response> {
        self.request("DELETE", path, None).await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response> {
        let (status, raw) = self
            .request_raw(method, path, body.map_or(Payload::None, Payload::Json))
            .await?;
        Ok(Response {
            status,
            body: json_body(&raw),
        })
    }

    /// `POST` the file at `file` as the body, streamed from disk (a
    /// firmware image).
    pub async fn upload(&self, path: &str, file: &Path) -> Result<Response> {
        let (status, raw) = self.request_raw("POST", path, Payload::File(file)).await?;
        Ok(Response {
            status,
            body: json_body(&raw),
        })
    }

    /// A GET whose body is bytes (a download): the body of a 2xx
    /// response, or the error made from the problem document.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let (status, raw) = self.request_raw("GET", path, Payload::None).await?;
        if (200..300).contains(&status) {
            return Ok(raw);
        }
        Response {
            status,
            body: json_body(&raw),
        }
        .ok()
        .map(|_| raw)
    }

    /// Status and raw body.
    async fn request_raw(
        &self,
        method: &str,
        path: &str,
        body: Payload<'_>,
    ) -> Result<(u16, Vec<u8>)> {
        let addr = format!("{}:{}", self.base.host, self.base.port);
        let fut = async {
            let tcp = TcpStream::connect(&addr)
                .await
                .with_context(|| format!("cannot reach the m2mhub server at {addr}: is it running? (set --server or M2MHUB_SERVER)"))?;
            match &self.tls {
                Some(connector) => {
                    let name = rustls::pki_types::ServerName::try_from(self.base.host.clone())
                        .map_err(|_| anyhow!("bad server name {}", self.base.host))?;
                    let stream = connector
                        .connect(name, tcp)
                        .await
                        .context("TLS handshake with the server failed")?;
                    self.exchange(stream, method, path, body).await
                }
                None => self.exchange(tcp, method, path, body).await,
            }
        };
        // An image upload may take a while; anything else answers fast.
        let limit = if matches!(body, Payload::File(_)) {
            600
        } else {
            30
        };
        tokio::time::timeout(Duration::from_secs(limit), fut)
            .await
            .map_err(|_| anyhow!("the server at {addr} did not answer within {limit} s"))?
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        method: &str,
        path: &str,
        body: Payload<'_>,
    ) -> Result<(u16, Vec<u8>)> {
        let payload = match body {
            Payload::Json(v) => serde_json::to_vec(v)?,
            _ => Vec::new(),
        };
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: m2mhub-cli/{}\r\n",
            self.base.prefix,
            self.base.authority(),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        match body {
            Payload::Json(_) => head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                payload.len()
            )),
            Payload::File(f) => {
                let len = std::fs::metadata(f)
                    .with_context(|| format!("cannot read {}", f.display()))?
                    .len();
                head.push_str(&format!(
                    "Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n"
                ));
            }
            Payload::None => {}
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&payload).await?;
        if let Payload::File(f) = body {
            let mut file = tokio::fs::File::open(f)
                .await
                .with_context(|| format!("cannot read {}", f.display()))?;
            tokio::io::copy(&mut file, &mut stream).await?;
        }
        stream.flush().await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.or_else(|e| {
            // Servers may close TLS without close_notify after a full response.
            if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() {
                Ok(0)
            } else {
                Err(e)
            }
        })?;
        split_response(&raw)
    }
}

/// A request body.
#[derive(Clone, Copy)]
enum Payload<'a> {
    None,
    Json(&'a serde_json::Value),
    File(&'a Path),
}

/// A response body as JSON; text that is not JSON as a string; nothing
/// as `Null`.
fn json_body(body: &[u8]) -> serde_json::Value {
    if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(body).into_owned())
        })
    }
}

#[cfg(test)]
fn parse_response(raw: &[u8]) -> Result<Response> {
    let (status, body) = split_response(raw)?;
    Ok(Response {
        status,
        body: json_body(&body),
    })
}

/// Status and (de-chunked) body of a whole HTTP/1.1 response.
fn split_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("the server sent an incomplete HTTP response"))?;
    let head = std::str::from_utf8(&raw[..split]).context("non-UTF-8 HTTP headers")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("the server sent a malformed status line"))?;
    let chunked = lines.any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunked encoding"))?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_addresses() {
        let b = parse_base("http://127.0.0.1:8080").expect("base");
        assert_eq!(
            (b.tls, b.host.as_str(), b.port, b.prefix.as_str()),
            (false, "127.0.0.1", 8080, "")
        );
        let b = parse_base("https://hub.example/m2m/").expect("base");
        assert_eq!(
            (b.tls, b.host.as_str(), b.port, b.prefix.as_str()),
            (true, "hub.example", 443, "/m2m")
        );
        assert_eq!(b.authority(), "hub.example");
        let b = parse_base("http://[::1]:9000").expect("base");
        assert_eq!((b.host.as_str(), b.port), ("::1", 9000));
        assert_eq!(b.authority(), "[::1]:9000");
        assert!(parse_base("127.0.0.1:8080").is_err());
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\n\r\n{\"detail\":\"no device\"}").expect("parse");
        assert_eq!(r.status, 404);
        assert_eq!(r.ok().expect_err("error").to_string(), "no device (404)");
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n").expect("parse");
        assert_eq!(r.body, serde_json::json!([1, 2]));
    }
}
