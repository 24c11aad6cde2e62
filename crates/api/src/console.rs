//! The operator console: a single-page app of a few hand-written files
//! (`crates/api/console/`) and a few vendored libraries with an embedded
//! basemap (`crates/api/console/vendor/`, see its `LICENSES.md`), embedded
//! in the binary so `m2mhub serve` shows it on a machine with no internet
//! and no build tools. It talks only to `/api/v1`, like any other client;
//! authorization is the API's job.
//!
//! The files are not content-hashed, so they are served with `no-cache`
//! and a strong ETag computed at compile time: browsers revalidate on each
//! load and get a 304 until the binary changes. Every response carries a
//! strict Content-Security-Policy: the app loads nothing but its own files
//! and builds its DOM without inline scripts or styles. The one exception
//! is the map's tile server (`console.tile_url`): its origin, and only it,
//! may serve images, so the policy is computed from the setting
//! ([`ConsoleConfig`]).

use crate::caller::Caller;
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::OnceLock;

/// Only our own origin, for everything; no inline code, no framing. `{img}`
/// is where the tile server's origin goes.
const CSP_TEMPLATE: &str = "default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self'{img}; connect-src 'self'; object-src 'none'; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The default tile server: OpenStreetMap's standard tiles (their usage
/// policy asks for the attribution below and modest traffic, which an
/// operator console's handful of users is).
pub const DEFAULT_TILE_URL: &str = "https://tile.openstreetmap.org/{z}/{x}/{y}.png";
/// The attribution OpenStreetMap's licence requires next to its tiles.
pub const DEFAULT_TILE_ATTRIBUTION: &str = "© OpenStreetMap contributors";

/// A tile URL that cannot be used, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TileUrlError {
    #[error("must start with https:// or http://")]
    Scheme,
    #[error(
        "must name a host (letters, digits, '.', '-', an optional :port, and {{s}} for subdomains)"
    )]
    Host,
    #[error("must contain {{z}}, {{x}} and {{y}}")]
    Placeholders,
    #[error("must not contain spaces, quotes, ';' or ','")]
    Characters,
}

/// What the console's map is told, and the Content-Security-Policy that
/// follows from it: validated once, when the server starts.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    tile_url: String,
    tile_attribution: String,
    csp: HeaderValue,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig::new(DEFAULT_TILE_URL, DEFAULT_TILE_ATTRIBUTION)
            .unwrap_or_else(|_| ConsoleConfig::without_tiles())
    }
}

impl ConsoleConfig {
    /// `tile_url` in Leaflet's form (`https://{s}.tile.example/{z}/{x}/{y}.png`),
    /// or empty for no tiles (the embedded basemap alone).
    pub fn new(tile_url: &str, tile_attribution: &str) -> Result<ConsoleConfig, TileUrlError> {
        let tile_url = tile_url.trim();
        if tile_url.is_empty() {
            return Ok(ConsoleConfig::without_tiles());
        }
        let origin = tile_origin(tile_url)?;
        let csp = CSP_TEMPLATE.replace("{img}", &format!(" {origin}"));
        Ok(ConsoleConfig {
            tile_url: tile_url.to_string(),
            tile_attribution: tile_attribution.to_string(),
            // tile_origin admitted only characters a header value takes.
            csp: HeaderValue::from_str(&csp).map_err(|_| TileUrlError::Characters)?,
        })
    }

    fn without_tiles() -> ConsoleConfig {
        ConsoleConfig {
            tile_url: String::new(),
            tile_attribution: String::new(),
            csp: HeaderValue::from_static(CSP_WITHOUT_TILES),
        }
    }

    /// The Content-Security-Policy of the console's files.
    pub fn content_security_policy(&self) -> &HeaderValue {
        &self.csp
    }

    pub fn tile_url(&self) -> &str {
        &self.tile_url
    }
}

/// The policy without a tile server: `'self'` alone everywhere (the
/// template without `{img}`, which a test checks).
const CSP_WITHOUT_TILES: &str = "default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The CSP source of a tile URL: `scheme://host[:port]`, with a `{s}`
/// subdomain placeholder as `*.` (any subdomain of the rest). Strict on
/// characters, since the result goes into a security header: a `;` or a
/// space would add directives of its own.
fn tile_origin(url: &str) -> Result<String, TileUrlError> {
    if url
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | ';' | ','))
    {
        return Err(TileUrlError::Characters);
    }
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(s, _)| matches!(*s, "https" | "http"))
        .ok_or(TileUrlError::Scheme)?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.strip_prefix("{s}.").map_or(authority, |h| h);
    let wildcard = host.len() != authority.len();
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => (n, Some(p)),
        Some(_) => return Err(TileUrlError::Host),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && !name.starts_with(['.', '-'])
        && !name.ends_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if !name_ok {
        return Err(TileUrlError::Host);
    }
    let path = &rest[authority.len()..];
    if !["{z}", "{x}", "{y}"].iter().all(|p| path.contains(p)) {
        return Err(TileUrlError::Placeholders);
    }
    let mut origin = format!("{scheme}://");
    if wildcard {
        origin.push_str("*.");
    }
    origin.push_str(&name.to_ascii_lowercase());
    if let Some(p) = port {
        origin.push(':');
        origin.push_str(p);
    }
    Ok(origin)
}

/// `GET /api/v1/console/config`: what the console's map needs to know.
pub async fn config(caller: Caller, State(state): State<AppState>) -> Result<Response, Problem> {
    caller.require(m2mhub_identity::Role::Viewer)?;
    let c = &state.console;
    Ok(Json(json!({
        "tile_url": if c.tile_url.is_empty() { None } else { Some(&c.tile_url) },
        "tile_attribution": c.tile_attribution,
    }))
    .into_response())
}

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// Computed on first use: hashing the vendored files (the basemap is
    /// half a megabyte) in `const` evaluation would slow every build.
    etag: OnceLock<u64>,
}

impl Asset {
    fn etag(&self) -> u64 {
        *self.etag.get_or_init(|| fnv1a(self.body.as_bytes()))
    }
}

const fn asset(body: &'static str, content_type: &'static str) -> Asset {
    Asset {
        body,
        content_type,
        etag: OnceLock::new(),
    }
}

/// FNV-1a: enough to tell two builds' files apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// A file of `console/`, embedded.
macro_rules! embed {
    ($path:literal, $type:expr) => {
        asset(include_str!(concat!("../console/", $path)), $type)
    };
}

static INDEX: Asset = embed!("index.html", HTML);

/// The console's own files (`/console/{file}`).
static FILES: [(&str, Asset); 4] = [
    ("app.js", embed!("app.js", JS)),
    ("charts.js", embed!("charts.js", JS)),
    ("map.js", embed!("map.js", JS)),
    ("app.css", embed!("app.css", CSS)),
];

/// The vendored libraries and the basemap (`/console/vendor/{file}`).
static VENDOR: [(&str, Asset); 7] = [
    ("leaflet.js", embed!("vendor/leaflet.js", JS)),
    ("leaflet.css", embed!("vendor/leaflet.css", CSS)),
    (
        "leaflet.markercluster.js",
        embed!("vendor/leaflet.markercluster.js", JS),
    ),
    ("markercluster.css", embed!("vendor/markercluster.css", CSS)),
    ("uplot.js", embed!("vendor/uplot.js", JS)),
    ("uplot.css", embed!("vendor/uplot.css", CSS)),
    (
        "basemap.json",
        embed!("vendor/basemap.json", "application/json"),
    ),
];

fn lookup(name: &str) -> Option<&'static Asset> {
    if name == "index.html" {
        return Some(&INDEX);
    }
    FILES.iter().find(|(n, _)| *n == name).map(|(_, a)| a)
}

fn lookup_vendor(name: &str) -> Option<&'static Asset> {
    VENDOR.iter().find(|(n, _)| *n == name).map(|(_, a)| a)
}

/// `GET /`: the app's page (its routes live in the URL fragment).
pub async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    respond(&INDEX, &headers, &state.console)
}

/// `GET /console/{file}`: one of the embedded files, or a 404 problem.
pub async fn file(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(
        lookup(&name),
        || format!("/console/{name}"),
        &headers,
        &state,
    )
}

/// `GET /console/vendor/{file}`: a vendored library or the basemap.
pub async fn vendor_file(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let found = lookup_vendor(&name);
    serve(
        found,
        || format!("/console/vendor/{name}"),
        &headers,
        &state,
    )
}

fn serve(
    found: Option<&Asset>,
    path: impl FnOnce() -> String,
    headers: &HeaderMap,
    state: &AppState,
) -> Response {
    match found {
        Some(a) => respond(a, headers, &state.console),
        None => Problem::not_found(&path()).into_response(),
    }
}

fn respond(a: &Asset, headers: &HeaderMap, console: &ConsoleConfig) -> Response {
    let etag = format!("\"{:016x}\"", a.etag());
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(a.content_type),
            )],
            a.body,
        )
            .into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        console.content_security_policy().clone(),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_has_a_distinct_etag() {
        let mut all: Vec<u64> = FILES
            .iter()
            .chain(VENDOR.iter())
            .map(|(_, a)| a.etag())
            .collect();
        all.push(INDEX.etag());
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1 + FILES.len() + VENDOR.len());
        assert!(lookup("app.js").is_some());
        assert!(lookup("nope.js").is_none());
        assert!(lookup("../lib.rs").is_none());
        assert!(lookup_vendor("leaflet.js").is_some());
        assert!(lookup_vendor("../app.js").is_none());
    }

    #[test]
    fn the_policy_admits_the_tile_servers_origin_and_nothing_else() {
        let c = ConsoleConfig::default();
        let csp = c.content_security_policy().to_str().unwrap_or_default();
        assert!(
            csp.contains("img-src 'self' https://tile.openstreetmap.org;"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(c.tile_url(), DEFAULT_TILE_URL);

        let c = ConsoleConfig::new(
            "https://{s}.Tiles.example.net:8443/osm/{z}/{x}/{y}@2x.png",
            "x",
        )
        .expect("valid");
        let csp = c.content_security_policy().to_str().unwrap_or_default();
        assert!(
            csp.contains("img-src 'self' https://*.tiles.example.net:8443;"),
            "{csp}"
        );

        // No tiles: the policy of our own origin alone.
        let c = ConsoleConfig::new("  ", "").expect("empty is valid");
        let csp = c.content_security_policy().to_str().unwrap_or_default();
        assert!(csp.contains("img-src 'self';"), "{csp}");
        assert_eq!(csp, CSP_TEMPLATE.replace("{img}", ""));
    }

    #[test]
    fn unusable_tile_urls_are_refused_with_the_reason() {
        for (url, err) in [
            ("ftp://t.example/{z}/{x}/{y}.png", TileUrlError::Scheme),
            ("tile.example/{z}/{x}/{y}.png", TileUrlError::Scheme),
            ("https:///{z}/{x}/{y}.png", TileUrlError::Host),
            ("https://user@t.example/{z}/{x}/{y}.png", TileUrlError::Host),
            ("https://t.example:http/{z}/{x}/{y}.png", TileUrlError::Host),
            ("https://t.example/{z}/{x}.png", TileUrlError::Placeholders),
            (
                "https://t.example/{z}/{x}/{y}.png; script-src *",
                TileUrlError::Characters,
            ),
            (
                "https://t.example/{z}/{x}/{y}.png'",
                TileUrlError::Characters,
            ),
            (
                "https://a.example,https://b.example/{z}/{x}/{y}",
                TileUrlError::Characters,
            ),
        ] {
            assert_eq!(ConsoleConfig::new(url, "").err(), Some(err), "{url}");
        }
    }
}
