//! Reads one counter from the server's Prometheus endpoint over plain
//! HTTP/1.0 (enough for a loopback benchmark; no client library needed).

use crate::bench::BenchError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `m2mhub_tsdb_points_appended_total` from `url` (`http://host:port/path`).
pub async fn points_appended(url: &str) -> Result<u64, BenchError> {
    counter(url, "m2mhub_tsdb_points_appended_total").await
}

/// The value of the sample named `name` in the exposition at `url`.
pub async fn counter(url: &str, name: &str) -> Result<u64, BenchError> {
    let bad = |what: &str| BenchError::InvalidOptions(format!("metrics url {url:?}: {what}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| bad(&format!("cannot connect: {e}")))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| bad(&format!("cannot send: {e}")))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)
        .await
        .map_err(|e| bad(&format!("cannot read: {e}")))?;
    let text = String::from_utf8_lossy(&body);
    parse(&text, name).ok_or_else(|| bad(&format!("no sample {name}")))
}

fn parse(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_sample() {
        let t = "# HELP x y\nm2mhub_tsdb_points_appended_total 1234\nother 5\n";
        assert_eq!(
            super::parse(t, "m2mhub_tsdb_points_appended_total"),
            Some(1234)
        );
        assert_eq!(super::parse(t, "missing"), None);
    }
}
