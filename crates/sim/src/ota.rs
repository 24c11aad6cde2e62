//! The simulated devices' side of OTA firmware updates, done for real: a
//! device told of a job (`devices/{id}/ota/job`) downloads the image over
//! HTTP (resuming with `Range` when the transfer is cut), hashes it as it
//! arrives, checks the SHA-256 and the Ed25519 signature against the pinned
//! platform key, "installs" it, reboots (reconnects) and reports the new
//! version. Some devices can be made to fail ([`OtaOptions::failure_rate`])
//! so a campaign's automatic abort can be seen.
//!
//! The image is never kept: like a device writing to flash, it is hashed as
//! it streams, so a thousand simulated devices cost no more memory than one.

use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How simulated devices take part in OTA.
#[derive(Debug, Clone, Default)]
pub struct OtaOptions {
    /// The platform's firmware public key (raw 32 bytes) devices pin.
    /// `None`: the signature is not checked (only the SHA-256).
    pub public_key: Option<Vec<u8>>,
    /// Share of installs that fail (0..1).
    pub failure_rate: f64,
    /// Share of downloads cut half way and resumed with `Range` (0..1).
    pub interrupt_rate: f64,
}

/// What a job document says (the fields a device needs).
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub job_id: String,
    pub version: String,
    pub size: u64,
    pub sha256: String,
    pub signature: Vec<u8>,
    pub url: String,
}

/// A job document: `Some` for a job to do, `None` for no job or a
/// cancellation.
pub fn parse_job(body: &[u8]) -> Option<JobSpec> {
    use base64::Engine;
    let v: Value = serde_json::from_slice(body).ok()?;
    if v.get("state")?.as_str()? != "notified" && !is_in_progress(v.get("state")?.as_str()?) {
        return None;
    }
    let a = v.get("artifact")?;
    Some(JobSpec {
        job_id: v.get("jobId")?.as_str()?.to_string(),
        version: a.get("version")?.as_str()?.to_string(),
        size: a.get("size")?.as_u64()?,
        sha256: a.get("sha256")?.as_str()?.to_string(),
        signature: base64::engine::general_purpose::STANDARD
            .decode(a.get("signature")?.as_str()?)
            .ok()?,
        url: v.get("url")?.as_str()?.to_string(),
    })
}

fn is_in_progress(s: &str) -> bool {
    matches!(s, "downloading" | "verifying" | "installing")
}

/// A status report's payload.
pub fn status(
    job_id: &str,
    state: &str,
    progress: Option<u8>,
    reason: Option<&str>,
    version: Option<&str>,
) -> Vec<u8> {
    let mut v = json!({"jobId": job_id, "state": state});
    if let Some(p) = progress {
        v["progress"] = json!(p);
    }
    if let Some(r) = reason {
        v["reason"] = json!(r);
    }
    if let Some(ver) = version {
        v["version"] = json!(ver);
    }
    v.to_string().into_bytes()
}

/// How a download went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub sha256: [u8; 32],
    pub bytes: u64,
    /// The transfer was cut and resumed with `Range`.
    pub resumed: bool,
}

/// Download `url` (plain `http://` only), hashing as it streams; when
/// `cut_at` is given, drop the connection after that many bytes and resume
/// from there with a `Range` request, as a device that lost its link would.
pub async fn download(url: &str, size: u64, cut_at: Option<u64>) -> Result<Downloaded, String> {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got: u64 = 0;
    let mut resumed = false;
    let mut cut = cut_at.filter(|c| *c > 0 && *c < size);
    for attempt in 0..5 {
        let stop = cut.take();
        match get_range(url, got, stop, &mut hash).await {
            Ok(n) => {
                got += n;
                if got >= size {
                    break;
                }
                resumed = true;
            }
            Err(e) if attempt < 4 => {
                tracing::debug!(error = %e, "download interrupted; resuming");
                resumed = true;
            }
            Err(e) => return Err(e),
        }
    }
    if got != size {
        return Err(format!("downloaded {got} of {size} bytes"));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(hash.finish().as_ref());
    Ok(Downloaded {
        sha256: digest,
        bytes: got,
        resumed,
    })
}

/// One GET from byte `from` (a `Range` request when not 0), feeding
/// `hash`, until the body ends or `stop` bytes of it came. Returns the
/// bytes read.
async fn get_range(
    url: &str,
    from: u64,
    stop: Option<u64>,
    hash: &mut ring::digest::Context,
) -> Result<u64, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("only http:// download URLs are supported by the simulator: {url}")
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(host))
        .await
        .map_err(|_| format!("connecting to {host} timed out"))?
        .map_err(|e| format!("cannot connect to {host}: {e}"))?;
    let range = if from > 0 {
        format!("Range: bytes={from}-\r\n")
    } else {
        String::new()
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{range}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // Head.
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    let head_end = loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err("response head too large".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    let want = if from > 0 { 206 } else { 200 };
    if status != want {
        let body = String::from_utf8_lossy(&buf[head_end..])
            .chars()
            .take(300)
            .collect::<String>();
        return Err(format!("HTTP {status} (expected {want}): {body}"));
    }
    let length: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or("no Content-Length")?;
    let limit = stop.map_or(length, |s| s.saturating_sub(from).min(length));
    let mut got: u64 = 0;
    let mut feed = |bytes: &[u8], got: &mut u64| {
        let take = (limit - *got).min(bytes.len() as u64) as usize;
        hash.update(&bytes[..take]);
        *got += take as u64;
    };
    feed(&buf[head_end..], &mut got);
    while got < limit {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
            .await
            .map_err(|_| "the download stalled".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        feed(&chunk[..n], &mut got);
    }
    Ok(got)
}

/// Whether a download matches the job: the SHA-256, then the signature
/// against the pinned key (if any). `Err` is the `failed` reason.
pub fn verify(job: &JobSpec, d: &Downloaded, public_key: Option<&[u8]>) -> Result<(), String> {
    let hex: String = d.sha256.iter().map(|b| format!("{b:02x}")).collect();
    if hex != job.sha256 {
        return Err(format!(
            "SHA-256 mismatch: got {hex}, the job says {}",
            job.sha256
        ));
    }
    if let Some(key) = public_key {
        let ok = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(&d.sha256, &job.signature)
            .is_ok();
        if !ok {
            return Err("the signature does not verify against the pinned key".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_documents_are_read_and_cancellations_are_not_jobs() {
        let doc = json!({
            "jobId": "ota-1", "state": "notified",
            "artifact": {"version": "2.0", "size": 3, "sha256": "ab", "signature": "AAAA"},
            "url": "http://127.0.0.1:1/x"
        });
        let j = parse_job(doc.to_string().as_bytes()).expect("a job");
        assert_eq!(
            (j.job_id.as_str(), j.version.as_str(), j.size),
            ("ota-1", "2.0", 3)
        );
        assert_eq!(j.signature, vec![0, 0, 0]);
        assert!(parse_job(br#"{"jobId":"ota-1","state":"cancelled"}"#).is_none());
        assert!(parse_job(br#"{"jobId":null}"#).is_none());
        assert!(parse_job(b"garbage").is_none());
    }
}
