//! `Server-Timing: app;dur=<ms>` on every HTTP response: the time the
//! server spent from receiving the request to having the response's
//! headers (for a streaming body, the time to the headers, not to the end).
//! Browsers show it in their network panel, and `scripts/bench_console.py`
//! reads it to tell server time from network and client time.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use std::time::{Duration, Instant};

/// The header's name (lower case, as `http` keeps names).
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// The header value for a duration: `app;dur=12.345` (milliseconds, three
/// decimals).
pub fn header_value(elapsed: Duration) -> HeaderValue {
    let ms = elapsed.as_secs_f64() * 1000.0;
    HeaderValue::try_from(format!("app;dur={ms:.3}"))
        .unwrap_or_else(|_| HeaderValue::from_static("app"))
}

/// Middleware: time the inner service and add the header to its response
/// (an existing `Server-Timing` from a handler is kept; this one is added).
pub async fn server_timing(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .append(SERVER_TIMING, header_value(start.elapsed()));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_with_three_decimals() {
        assert_eq!(
            header_value(Duration::from_micros(12_345)),
            "app;dur=12.345"
        );
        assert_eq!(header_value(Duration::ZERO), "app;dur=0.000");
        assert_eq!(header_value(Duration::from_nanos(1_600)), "app;dur=0.002");
        assert_eq!(header_value(Duration::from_secs(2)), "app;dur=2000.000");
    }
}
