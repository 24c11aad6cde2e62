//! A simulated device's side of remote diagnostics: on the command
//! `diagnostics.upload` (params `bundle_id`, `url`, `max_bytes`,
//! `expires_at`) it PUTs a small generated bundle — uptime, its last
//! reading, its counters — to the one-time URL, and answers the command
//! with the outcome.
//!
//! The upload is a minimal HTTP/1.1 client over a tokio `TcpStream`:
//! plain `http://` only, a `Content-Length` body, and only the status line
//! of the answer is read. A simulator needs no more, and this crate stays
//! free of an HTTP client dependency.

use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The command's name.
pub const COMMAND: &str = "diagnostics.upload";
/// The whole upload (connect, send, status line) must take no longer.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest status line read.
const MAX_STATUS_LINE: usize = 1024;

/// What the server asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRequest {
    /// The command's id, for the answer.
    pub command_id: Value,
    pub bundle_id: String,
    pub url: String,
    pub max_bytes: u64,
}

/// The upload request in a command message body, if it is one.
pub fn upload_request(body: &Value) -> Option<UploadRequest> {
    if body.get("name")?.as_str()? != COMMAND {
        return None;
    }
    let p = body.get("params")?;
    Some(UploadRequest {
        command_id: body.get("id").cloned().unwrap_or(Value::Null),
        bundle_id: p.get("bundle_id")?.as_str()?.to_string(),
        url: p.get("url")?.as_str()?.to_string(),
        max_bytes: p
            .get("max_bytes")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX),
    })
}

/// What a simulated device knows about itself, for its bundle.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    pub device_id: String,
    pub profile: String,
    pub running: bool,
    pub uptime: Duration,
    pub last_reading: Option<Value>,
    pub readings_sent: u64,
    pub commands_answered: u64,
    pub shadow_reports: u64,
}

/// The bundle: one JSON document.
pub fn bundle(state: &DeviceState, now_ms: i64) -> Vec<u8> {
    json!({
        "device_id": state.device_id,
        "generated_ms": now_ms,
        "firmware": concat!("m2mhub-sim/", env!("CARGO_PKG_VERSION")),
        "profile": state.profile,
        "state": if state.running { "running" } else { "stopped" },
        "uptime_s": state.uptime.as_secs(),
        "last_reading": state.last_reading,
        "counters": {
            "readings_sent": state.readings_sent,
            "commands_answered": state.commands_answered,
            "shadow_reports": state.shadow_reports,
        },
    })
    .to_string()
    .into_bytes()
}

/// A plain `http://` URL's `(authority, path)`: `host[:port]` to connect
/// to and send as `Host`, and the path with its query.
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// upload URLs are supported, not {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("bad upload URL {url:?}"));
    }
    Ok((authority.to_string(), path.to_string()))
}

/// `host[:port]` as a socket address string (port 80 by default).
fn connect_addr(authority: &str) -> String {
    let has_port = match authority.rfind(']') {
        // [v6] or [v6]:port
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    }
}

/// PUT `body` to `url`; the response's status code.
pub async fn put(url: &str, body: &[u8]) -> Result<u16, String> {
    let (authority, path) = split_url(url)?;
    let exchange = async {
        let mut s = TcpStream::connect(connect_addr(&authority))
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // A server that refuses early (413) may close before the body is
        // all sent: its status line still tells why.
        let _ = s.write_all(body).await;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < MAX_STATUS_LINE && !line.ends_with(b"\r\n") {
            match s.read(&mut byte).await {
                Ok(0) => break,
                Ok(_) => line.push(byte[0]),
                Err(e) => return Err(e.to_string()),
            }
        }
        status_code(&line)
    };
    tokio::time::timeout(UPLOAD_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("the upload to {authority} took longer than {UPLOAD_TIMEOUT:?}"))?
}

fn status_code(line: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next().and_then(|c| c.parse().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(format!("bad HTTP status line {:?}", text.trim_end())),
    }
}

/// Build and upload the bundle; the command's answer body.
pub async fn run(req: &UploadRequest, state: &DeviceState, now_ms: i64) -> Value {
    let body = bundle(state, now_ms);
    let failed = |error: String| json!({"id": req.command_id, "status": "failed", "bundle_id": req.bundle_id, "error": error});
    if body.len() as u64 > req.max_bytes {
        return failed(format!(
            "the bundle ({} bytes) is larger than allowed ({})",
            body.len(),
            req.max_bytes
        ));
    }
    match put(&req.url, &body).await {
        Ok(code) if (200..300).contains(&code) => json!({
            "id": req.command_id, "status": "ok", "bundle_id": req.bundle_id, "size": body.len(),
        }),
        Ok(code) => failed(format!("the upload was refused with HTTP {code}")),
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls_and_status_lines() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/api/v1/diagnostics/upload/ab").expect("url"),
            (
                "127.0.0.1:8080".to_string(),
                "/api/v1/diagnostics/upload/ab".to_string()
            )
        );
        assert!(split_url("https://hub/x").is_err());
        assert!(split_url("http://user@hub/x").is_err());
        assert_eq!(connect_addr("hub"), "hub:80");
        assert_eq!(connect_addr("[::1]"), "[::1]:80");
        assert_eq!(connect_addr("[::1]:9"), "[::1]:9");
        assert_eq!(status_code(b"HTTP/1.1 413 Payload Too Large\r\n"), Ok(413));
        assert!(status_code(b"SSH-2.0\r\n").is_err());
    }

    #[test]
    fn only_the_upload_command_is_an_upload_request() {
        let cmd = json!({"id": "cmd-1", "name": COMMAND, "params": {
            "bundle_id": "diag-1", "url": "http://h/x", "max_bytes": 10, "expires_at": 1}});
        let r = upload_request(&cmd).expect("request");
        assert_eq!((r.bundle_id.as_str(), r.max_bytes), ("diag-1", 10));
        assert!(upload_request(&json!({"id": "c", "name": "shutdown"})).is_none());
        assert!(upload_request(&json!({"name": COMMAND, "params": {}})).is_none());
    }

    /// A one-shot server that records the request and answers `status`.
    async fn server(status: u16) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then the Content-Length body.
            loop {
                let n = s.read(&mut buf).await.expect("read");
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .expect("content-length");
                    if got.len() >= end + 4 + len || n == 0 {
                        break;
                    }
                }
            }
            let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            s.write_all(answer.as_bytes()).await.expect("answer");
            got
        });
        (format!("http://{addr}/api/v1/diagnostics/upload/tok"), task)
    }

    #[tokio::test]
    async fn uploads_the_bundle_and_reports_the_outcome() {
        let state = DeviceState {
            device_id: "d1".into(),
            profile: "factory".into(),
            running: true,
            uptime: Duration::from_secs(42),
            last_reading: Some(json!({"rpm": 1200})),
            readings_sent: 7,
            ..Default::default()
        };
        let (url, task) = server(200).await;
        let req = UploadRequest {
            command_id: json!("cmd-1"),
            bundle_id: "diag-1".into(),
            url,
            max_bytes: 10_000,
        };
        let answer = run(&req, &state, 1).await;
        assert_eq!(answer["status"], "ok", "{answer}");
        let got = String::from_utf8(task.await.expect("server")).expect("utf-8");
        assert!(
            got.starts_with("PUT /api/v1/diagnostics/upload/tok HTTP/1.1\r\n"),
            "{got}"
        );
        let body: Value =
            serde_json::from_str(got.split("\r\n\r\n").nth(1).expect("body")).expect("json");
        assert_eq!(body["uptime_s"], 42);
        assert_eq!(body["last_reading"]["rpm"], 1200);
        assert_eq!(body["counters"]["readings_sent"], 7);

        let (url, _task) = server(413).await;
        let answer = run(&UploadRequest { url, ..req.clone() }, &state, 1).await;
        assert_eq!(answer["status"], "failed");
        assert!(answer["error"].as_str().expect("error").contains("413"));

        let small = UploadRequest {
            max_bytes: 5,
            ..req
        };
        let answer = run(&small, &state, 1).await;
        assert_eq!(answer["status"], "failed");
    }
}
