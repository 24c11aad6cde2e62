//! Route table. New parts of the platform add their routes under `/api/v1`.

use crate::openapi::ApiBuilder;
use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde_json::json;

/// The whole HTTP surface. Every `/api/v1` route is added through
/// [`ApiBuilder`], so it is in the OpenAPI document by construction.
pub fn router(state: AppState) -> Router {
    use crate::openapi::Access::{Admin, Device, Operator, Public, Viewer};
    use crate::{alarms as al, commands as cm, device_http as dh, ota as fw, rules as ru};
    use crate::{device_events as ev, diagnostics as dg, profiles as pr, psk as k, telemetry as t};
    // The upload route streams bodies up to the configured bundle cap; the
    // 2 MB default of buffering extractors would otherwise apply there too.
    let upload_limit =
        usize::try_from(state.fleet.diagnostics_config().max_bundle_bytes).unwrap_or(usize::MAX);
    use crate::{
        devices as d, operators as o, provision as p, security as s, settings as st, shadows as sh,
    };
    let cluster = state.cluster.clone();
    let (api, ops) = ApiBuilder::<AppState>::new()
        .route("/", get(api_index), &[("GET", "API index", Public)])
        .route("/openapi.json", get(openapi_doc), &[("GET", "This OpenAPI document", Public)])
        .route("/broker", get(broker_stats), &[("GET", "Broker statistics", Viewer)])
        .route("/cluster", get(crate::cluster::show), &[("GET", "The cluster: this node's id, the live nodes with their load (connections, sessions, subscriptions, messages exchanged), and this node's fabric counters; `enabled: false` on a single node", Viewer)])
        .route("/broker/history", get(crate::broker_history::history), &[("GET", "The broker's rates over the last hour, one point a minute (messages in and out, connects, authentication failures, bytes in, drops, per second) and the connections open at each minute's end; the last point is the minute in progress. Kept in memory: a restart starts afresh", Viewer)])
        .route("/console/config", get(crate::console::config), &[("GET", "What the operator console's map uses: the tile server URL template (`null`: none, the embedded basemap alone) and its attribution", Viewer)])
        .route("/sessions", get(list_sessions), &[("GET", "MQTT sessions, paged", Viewer)])
        .route("/sessions/{client_id}", get(show_session), &[("GET", "One MQTT session", Viewer)])
        .route("/auth/login", post(o::login), &[("POST", "Log in with user name and password; returns an API token", Public)])
        .route("/auth/me", get(o::me), &[("GET", "Who the token belongs to", Viewer)])
        .route("/auth/tokens", get(o::list_api_tokens).post(o::create_api_token), &[
            ("GET", "The caller's API tokens", Viewer),
            ("POST", "Create an API token (role at most the caller's)", Viewer),
        ])
        .route("/auth/tokens/{id}", delete(o::revoke_api_token), &[("DELETE", "Revoke an API token", Viewer)])
        .route("/users", get(o::list_users).post(o::create_user), &[
            ("GET", "Operator accounts", Admin),
            ("POST", "Create an operator account", Admin),
        ])
        .route("/users/{username}", delete(o::delete_user), &[("DELETE", "Delete an operator account", Admin)])
        .route("/tenants", get(o::list_tenants).post(o::create_tenant), &[
            ("GET", "Tenants", Viewer),
            ("POST", "Create a tenant", Admin),
        ])
        .route("/tenants/{tenant}/groups", get(o::list_groups).post(o::create_group), &[
            ("GET", "Device groups of a tenant", Viewer),
            ("POST", "Create a device group", Operator),
        ])
        .route("/tenants/{tenant}/policies", get(o::list_policies), &[("GET", "Authorization policies of a tenant", Viewer)])
        .route("/tenants/{tenant}/policies/{name}", put(o::put_policy).delete(o::delete_policy), &[
            ("PUT", "Create or replace a policy", Admin),
            ("DELETE", "Delete a policy", Admin),
        ])
        .route("/devices", get(d::list).post(d::create), &[
            ("GET", "Devices: filter by tenant, group, profile, label, search, enabled, online; paged by `after`", Viewer),
            ("POST", "Register a device", Operator),
        ])
        .route("/devices/{id}", get(d::show).patch(d::update).delete(d::delete), &[
            ("GET", "One device, with its MQTT session", Viewer),
            ("PATCH", "Change a device (name, group, profile, labels, enabled)", Operator),
            ("DELETE", "Delete a device and its credentials", Operator),
        ])
        .route("/devices/{id}/tokens", get(d::list_tokens).post(d::issue_token), &[
            ("GET", "A device's token credentials (never the secrets)", Viewer),
            ("POST", "Issue a token credential (secret shown once)", Operator),
        ])
        .route("/devices/{id}/tokens/{token_id}", delete(d::revoke_token), &[("DELETE", "Revoke a token; live sessions are dropped", Operator)])
        .route("/devices/{id}/tokens/{token_id}/expire", post(d::expire_token), &[("POST", "Expire a token at a time (rollover)", Operator)])
        .route("/devices/{id}/certificates", get(d::list_certs).post(d::issue_cert_route), &[
            ("GET", "A device's certificates", Viewer),
            ("POST", "Issue a certificate from a CSR, or with a generated key", Operator),
        ])
        .route("/devices/{id}/certificates/{fingerprint}", delete(d::revoke_cert), &[("DELETE", "Revoke a certificate; live sessions are dropped", Operator)])
        .route("/devices/{id}/psks", get(k::list).post(k::issue), &[
            ("GET", "A device's DTLS pre-shared keys for CoAPS (never the keys)", Viewer),
            ("POST", "Issue a PSK (`identity`, default the device id; `expires_in_days`): 16 random bytes sealed under the master key; 201 with `key_hex`, shown once", Operator),
        ])
        .route("/devices/{id}/psks/{psk_id}", delete(k::revoke), &[("DELETE", "Revoke a PSK; DTLS sessions using it end", Operator)])
        .route("/devices/{id}/psks/{psk_id}/rotate", post(k::rotate), &[("POST", "Replace a PSK's key: a new PSK (new id, same identity and expiry) takes its place and the old one is revoked at once; 201 with `key_hex`, shown once", Operator)])
        .route("/devices/{id}/shadows", get(sh::list), &[("GET", "The names of a device's shadows (\"\" is the classic one)", Viewer)])
        .route("/devices/{id}/shadow", get(sh::get_classic).patch(sh::patch_classic).delete(sh::delete_classic), &[
            ("GET", "A device's classic shadow: desired, reported, delta, metadata, version", Viewer),
            ("PATCH", "Merge into the desired state (`{\"state\": {\"desired\": {…}}, \"version\": n}`; null deletes a key; a stale version is 409); the device is told", Operator),
            ("DELETE", "Delete the classic shadow", Operator),
        ])
        .route("/devices/{id}/shadow/{name}", get(sh::get_named).patch(sh::patch_named).delete(sh::delete_named), &[
            ("GET", "A device's named shadow", Viewer),
            ("PATCH", "Merge into a named shadow's desired state (created on first write)", Operator),
            ("DELETE", "Delete a named shadow", Operator),
        ])
        .route("/devices/{id}/events", get(ev::list), &[("GET", "A device's events (e.g. undecodable payloads), newest first: filter by kind; paged by `before`", Viewer)])
        .route("/devices/{id}/commands", get(cm::list).post(cm::send), &[
            ("GET", "A device's commands and their status, newest first; paged by `before`", Viewer),
            ("POST", "Send a command to a device (`name`, `params`, `timeout_secs`); 202 with the command", Operator),
        ])
        .route("/devices/{id}/diagnostics", get(dg::list).post(dg::request), &[
            ("GET", "A device's diagnostic bundles and requests, newest first (`?limit=`)", Viewer),
            ("POST", "Ask the device for a diagnostic bundle (`{\"reason\": …}` optional): it is sent the command `diagnostics.upload` with a one-time upload URL; 202 with the request", Operator),
        ])
        .route("/devices/{id}/diagnostics/{bundle}", get(dg::show).delete(dg::delete), &[
            ("GET", "One diagnostic bundle: status (requested, uploaded, expired, failed), size, SHA-256", Viewer),
            ("DELETE", "Delete a diagnostic bundle (or request) and its file", Operator),
        ])
        .route("/devices/{id}/diagnostics/{bundle}/content", get(dg::content), &[("GET", "Download an uploaded bundle (application/octet-stream)", Viewer)])
        .route("/diagnostics/upload/{token}", put(dg::upload).layer(DefaultBodyLimit::max(upload_limit)), &[("PUT", "A device uploads a diagnostic bundle to the one-time URL it was sent (the token is the credential); 413 past the size cap, 410 once used or expired", Public)])
        .route("/settings", get(st::list).post(st::create), &[
            ("GET", "Fleet-wide desired settings with their progress, newest first (`?tenant=`, `?limit=`)", Viewer),
            ("POST", "Set desired keys in the shadows of every device a selector picks (`group`, `label`, `profile`, `shadow`, `state`); 201 with progress", Operator),
        ])
        .route("/settings/{id}", get(st::show), &[("GET", "A fleet-wide setting: how many targets have reported its value, which are pending", Viewer)])
        .route("/ota/public-key", get(fw::public_key), &[("GET", "The Ed25519 public key devices pin to verify firmware signatures (of the image's SHA-256)", Public)])
        .route("/ota/artifacts", get(fw::list_artifacts).post(fw::upload).layer(axum::extract::DefaultBodyLimit::disable()), &[
            ("GET", "Firmware artifacts, newest first (`?tenant=`)", Viewer),
            ("POST", "Upload a firmware image as the body (`?name=&version=`, optional `hardware`, `profile`, `tenant`, external `signature` and `public_key`); streamed to disk, hashed and signed; 201", Operator),
        ])
        .route("/ota/artifacts/{artifact}", get(fw::show_artifact).delete(fw::delete_artifact), &[
            ("GET", "One artifact: version, size, SHA-256, signature", Viewer),
            ("DELETE", "Delete an artifact (refused with 409 while an unfinished campaign uses it)", Operator),
        ])
        .route("/ota/campaigns", get(fw::list_campaigns).post(fw::create_campaign), &[
            ("GET", "Firmware campaigns with job counts by state, newest first (`?tenant=`)", Viewer),
            ("POST", "Start a campaign (`artifact`; `selector` {group, label, profile} or `devices`; `waves` [{percent}|{count}], `wave_wait_s`, `max_starts_per_minute`, `failure_threshold`, `deadline_ms`, `job_timeout_s`); 201", Operator),
        ])
        .route("/ota/campaigns/{campaign}", get(fw::show_campaign), &[("GET", "A campaign: jobs by state overall and per wave, the failures with their reasons", Viewer)])
        .route("/ota/campaigns/{campaign}/jobs", get(fw::list_jobs), &[("GET", "A campaign's jobs (`?state=`, `?limit=`)", Viewer)])
        .route("/ota/campaigns/{campaign}/pause", post(fw::pause), &[("POST", "Pause: no device is told a new job until resumed", Operator)])
        .route("/ota/campaigns/{campaign}/resume", post(fw::resume), &[("POST", "Resume a paused campaign", Operator)])
        .route("/ota/campaigns/{campaign}/cancel", post(fw::cancel), &[("POST", "Cancel (`{\"reason\"}` optional): jobs not begun are cancelled, devices already told are told", Operator)])
        .route("/ota/download/{artifact}", get(fw::download), &[("GET", "A device downloads its job's image with the signed URL from its job (`Range` supported)", Public)])
        .route("/commands/{id}", get(cm::show), &[("GET", "One command and its status (pending, sent, delivered, answered, failed, timed_out)", Viewer)])
        .route("/dashboards", get(crate::dashboards::list).post(crate::dashboards::create), &[
            ("GET", "Dashboards (`?tenant=`; `?profile=`: the default dashboard of a device profile)", Viewer),
            ("POST", "Save a dashboard: `name`, `layout` {\"widgets\": [{\"type\": value|chart|gauge|map|alarms|devices|group, …}]}, optional `profile` (the default of that device profile, one per profile), `description`, `id`, `tenant`; 201", Operator),
        ])
        .route("/dashboards/{id}", get(crate::dashboards::show).put(crate::dashboards::update).delete(crate::dashboards::delete), &[
            ("GET", "One dashboard and its layout", Viewer),
            ("PUT", "Change a dashboard (absent fields stay; `profile: null` unsets)", Operator),
            ("DELETE", "Delete a dashboard; its share links stop working", Operator),
        ])
        .route("/dashboards/{id}/data", get(crate::dashboards::data), &[("GET", "What each widget of a dashboard shows, in layout order (latest values, chart buckets, positions, active alarms, device rows, group aggregates), read within the dashboard's tenant; `?device=` fills widgets that name no device (a profile's default dashboard)", Viewer)])
        .route("/dashboards/{id}/shares", get(crate::dashboards::list_shares).post(crate::dashboards::create_share), &[
            ("GET", "A dashboard's read-only share links (never their tokens)", Operator),
            ("POST", "Create a read-only share link (`expires_in`: 1h…365d, default 7d); 201 with the token, shown once, and the console path that opens it", Operator),
        ])
        .route("/dashboards/{id}/shares/{share}", delete(crate::dashboards::revoke_share), &[("DELETE", "Revoke a share link at once", Operator)])
        .route("/shared/{token}", get(crate::dashboards::shared), &[("GET", "A shared dashboard and its data, read-only, for the holder of its share token (no login; 404 once revoked or expired)", Public)])
        .route("/alarms", get(al::list), &[("GET", "Alarms, active and cleared, newest first: filter by tenant, device, status, severity, type; paged by `before`", Viewer)])
        .route("/alarms/summary", get(al::summary), &[("GET", "Active alarms by severity (`?tenant=`)", Viewer)])
        .route("/alarms/{id}", get(al::show), &[("GET", "One alarm", Viewer)])
        .route("/alarms/{id}/ack", post(al::ack), &[("POST", "Acknowledge an alarm (it stays active until cleared)", Operator)])
        .route("/alarms/{id}/clear", post(al::clear), &[("POST", "Clear an active alarm", Operator)])
        .route("/rules", get(ru::list).post(ru::create), &[
            ("GET", "Rules (SQL over the message stream, with actions) with their counters: filter by tenant", Viewer),
            ("POST", "Create a rule; refused with the position of the fault if it does not validate", Operator),
        ])
        .route("/rules/backtest", post(crate::backtest::backtest), &[("POST", "Backtest a rule over stored telemetry: `sql` and `actions`, or a stored rule's `rule_id` (its `sql`/`actions` replaced when given); `from`, `to` (epoch ms, RFC 3339, `-24h`), optional `devices` and `tenant`. The points are replayed in time order through the rule's compiled plan on the data's clock; answers every fire, repeat and clear with the actions it would have run (nothing is executed). At most 31 days (422), 2,000,000 points (413) and 20 s (422)", Operator)])
        .route("/rules/{id}", get(ru::show).put(ru::update).delete(ru::delete), &[
            ("GET", "One rule with its counters", Viewer),
            ("PUT", "Change a rule (absent fields stay); takes effect at once", Operator),
            ("DELETE", "Delete a rule", Operator),
        ])
        .route("/reports", get(crate::reports::list).post(crate::reports::create), &[
            ("GET", "Scheduled report definitions (`?tenant=`); webhook secrets are shown only as `secret_set`", Viewer),
            ("POST", "Create a scheduled report: `name`, `kind` ({type: energy, metric, mode: counter|sum} | {type: availability} | {type: alarms}), `schedule` {every: daily|weekly|monthly, at: HH:MM, weekday 1-7, day 1-31, time_zone: IANA name, UTC or +HH:MM}, optional `devices`, `delivery` {email: [...], webhook: {url, secret}}, `retention` {keep_runs, keep_days}, `enabled`; 201", Operator),
        ])
        .route("/reports/{id}", get(crate::reports::show).put(crate::reports::update).delete(crate::reports::delete), &[
            ("GET", "One report definition with its next run (`next_run_ms`)", Viewer),
            ("PUT", "Replace a report definition (a webhook without `secret` keeps the stored one for the same URL)", Operator),
            ("DELETE", "Delete a report, its runs and their files", Operator),
        ])
        .route("/reports/{id}/run", post(crate::reports::run), &[("POST", "Run a report now and deliver it: the period a scheduled run now would cover, or `{from_ms, to_ms}`; 201 with the run, 409 while it is running", Operator)])
        .route("/reports/{id}/runs", get(crate::reports::runs), &[("GET", "A report's runs, newest first (`?limit=`): period, rows, file sizes, each delivery's outcome", Viewer)])
        .route("/reports/{id}/runs/{run}/csv", get(crate::reports::csv), &[("GET", "Download a run's CSV", Viewer)])
        .route("/reports/{id}/runs/{run}/html", get(crate::reports::html), &[("GET", "Download a run's HTML (charts inline as SVG)", Viewer)])
        .route("/rules/{id}/enable", post(ru::enable), &[("POST", "Enable a rule", Operator)])
        .route("/rules/{id}/disable", post(ru::disable), &[("POST", "Disable a rule", Operator)])
        .route("/devices/{id}/telemetry", get(t::latest).post(dh::post_telemetry).layer(DefaultBodyLimit::max(dh::MAX_TELEMETRY_BODY)), &[
            ("GET", "Latest value of every metric of a device", Viewer),
            ("POST", "A device posts its readings, authenticated as itself: the same payloads as MQTT `devices/{id}/telemetry` (JSON object, or an array of them with `ts` each: the batch form; SenML JSON/CBOR packs; CBOR; a number), by Content-Type else sniffed. 204 once stored durably; 400/415 name the fix", Device),
        ])
        .route("/devices/{id}/commands/next", get(dh::next_command), &[("GET", "A device's command poll: its oldest command not yet delivered (200, now `delivered`), waiting up to `wait` (e.g. 30s, at most 60s) for one; 204 when none", Device)])
        .route("/devices/{id}/commands/{cid}/response", post(dh::command_response), &[("POST", "A device answers a command (JSON; `\"status\": \"failed\"` marks it failed); 409 when it is already finished", Device)])
        .route("/devices/{id}/series", get(t::series), &[("GET", "The metrics a device has reported, with their kinds", Viewer)])
        .route("/devices/{id}/telemetry/{metric}", get(t::raw), &[("GET", "Raw points of one metric in [from, to): paged by `cursor`; format=csv (with all=true: the whole range)", Viewer)])
        .route("/telemetry/aggregate", get(t::aggregate), &[("GET", "Per-bucket avg/min/max/sum/count/first/last of a metric for devices, a group or a tenant; combine=true merges them; format=csv", Viewer)])
        .route("/telemetry/retention", get(t::get_retention).put(t::put_retention), &[
            ("GET", "Telemetry retention: the default and the per-tenant/per-metric rules", Viewer),
            ("PUT", "Replace the per-tenant/per-metric retention rules", Admin),
        ])
        .route("/telemetry/stats", get(t::stats), &[("GET", "Time-series store and ingest figures", Viewer)])
        .route("/profiles", get(pr::list).post(pr::create), &[
            ("GET", "Device profiles (payload content type): filter by tenant", Viewer),
            ("POST", "Create a device profile", Operator),
        ])
        .route("/profiles/{name}", get(pr::show).put(pr::update).delete(pr::delete), &[
            ("GET", "One device profile (`?tenant=`)", Viewer),
            ("PUT", "Change a device profile's content type or description", Operator),
            ("DELETE", "Delete a device profile no device or claim token uses", Operator),
        ])
        .route("/claim-tokens", get(o::list_claims).post(o::create_claim), &[
            ("GET", "Fleet-provisioning claim tokens", Viewer),
            ("POST", "Create a claim token (secret shown once)", Operator),
        ])
        .route("/claim-tokens/{id}", delete(o::revoke_claim), &[("DELETE", "Revoke a claim token", Operator)])
        .route("/provision", post(p::http), &[("POST", "A device redeems a claim token for its identity and credentials", Public)])
        .route("/ca", get(s::ca), &[("GET", "The device CA certificate (PEM)", Public)])
        .route("/ca/crl", get(s::crl), &[("GET", "The device CA's revocation list (PEM)", Public)])
        .route("/audit", get(s::list_audit), &[("GET", "The audit log, paged", Admin)])
        .route("/audit/verify", get(s::verify_audit), &[("GET", "Verify the audit log's hash chain", Admin)])
        .stream("/live", get(crate::live::stream), &[("GET", "Server-sent events: `?device=` its latest values (every 250 ms), connections, alarms and shadow changes (`shadow`); else the fleet's positions, connections, alarms and shadow changes (`shadows`, batched each second) (`?tenant=`). `?kinds=telemetry,connection,alarm,shadow` keeps only those. Ends after 5 minutes: reconnect", Viewer)])
        .route("/security/events", get(s::list_events), &[("GET", "Security events", Viewer)])
        .route("/security/bans", get(s::list_bans).post(s::create_ban), &[
            ("GET", "Active bans", Viewer),
            ("POST", "Ban an IP address or a client id", Admin),
        ])
        .route("/security/bans/{key}", delete(s::delete_ban), &[("DELETE", "Lift a ban", Admin)])
        .finish();
    let doc = std::sync::Arc::new(crate::openapi::document(&ops));
    let api = api.fallback(api_not_found).layer(axum::Extension(doc));
    let limits = state.http.clone();
    Router::new()
        // The operator console (outside `/api/v1`; it is a client of it).
        .route("/", get(crate::console::index))
        .route("/console/{file}", get(crate::console::file))
        .route("/console/vendor/{file}", get(crate::console::vendor_file))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/mqtt", get(crate::websocket::upgrade))
        .route("/api/v1/", get(api_index))
        .nest("/api/v1", api)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::audit_durable::wait,
        ))
        .with_state(state)
        // Every route without a cap of its own (the uploads and device
        // telemetry above set theirs) buffers at most `http.max_body_bytes`.
        .layer(DefaultBodyLimit::max(limits.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            limits.clone(),
            crate::limits::per_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits.clone(),
            crate::limits::body_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            cluster,
            crate::cluster::announce_changes,
        ))
        .layer(axum::middleware::from_fn(crate::problem::catch_panic))
        .layer(axum::middleware::from_fn(crate::problem::uniform_errors))
        .layer(axum::middleware::from_fn_with_state(
            limits,
            crate::headers::secure,
        ))
}

async fn openapi_doc(
    axum::Extension(doc): axum::Extension<std::sync::Arc<serde_json::Value>>,
) -> impl IntoResponse {
    Json((*doc).clone())
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = state.broker.metrics_text();
    if let Some(c) = &state.cluster {
        use std::fmt::Write;
        for (name, help, v) in c.stats().counters() {
            let _ = write!(
                text,
                "# HELP m2mhub_cluster_{name}_total {help}\n# TYPE m2mhub_cluster_{name}_total counter\nm2mhub_cluster_{name}_total {v}\n"
            );
        }
    }
    if let Some(a) = &state.auth_stats {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        for (name, help, v) in [
            (
                "connect_allowed",
                "CONNECTs the registry accepted",
                a.connect_allowed.load(Relaxed),
            ),
            (
                "connect_denied",
                "CONNECTs the registry refused (bad or revoked credentials, disabled devices)",
                a.connect_denied.load(Relaxed),
            ),
            (
                "acl_denied",
                "PUBLISH/SUBSCRIBE refused by device policies",
                a.acl_denied.load(Relaxed),
            ),
            (
                "acl_events_suppressed",
                "ACL violations not recorded as security events (rate-limited)",
                a.acl_events_suppressed.load(Relaxed),
            ),
            (
                "audit_dropped",
                "audit records dropped because the writer fell behind",
                a.audit_dropped.load(Relaxed),
            ),
        ] {
            let _ = writeln!(text, "# HELP m2mhub_identity_{name}_total {help}");
            let _ = writeln!(text, "# TYPE m2mhub_identity_{name}_total counter");
            let _ = writeln!(text, "m2mhub_identity_{name}_total {v}");
        }
    }
    {
        use std::fmt::Write;
        for (name, help, v) in state.login.stats.counters() {
            let _ = writeln!(text, "# HELP m2mhub_login_{name}_total {help}");
            let _ = writeln!(text, "# TYPE m2mhub_login_{name}_total counter");
            let _ = writeln!(text, "m2mhub_login_{name}_total {v}");
        }
        for (name, help, v) in state.http.counters() {
            let _ = writeln!(text, "# HELP m2mhub_http_{name}_total {help}");
            let _ = writeln!(text, "# TYPE m2mhub_http_{name}_total counter");
            let _ = writeln!(text, "m2mhub_http_{name}_total {v}");
        }
    }
    crate::telemetry::metrics_text(&state, &mut text);
    if let Some(r) = &state.rules {
        use std::fmt::Write;
        for (name, help, v) in r.metrics() {
            let _ = writeln!(text, "# HELP m2mhub_rules_{name}_total {help}");
            let _ = writeln!(text, "# TYPE m2mhub_rules_{name}_total counter");
            let _ = writeln!(text, "m2mhub_rules_{name}_total {v}");
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn api_index() -> impl IntoResponse {
    Json(json!({
        "name": "m2mhub",
        "version": env!("CARGO_PKG_VERSION"),
        "links": { "broker": "/api/v1/broker", "sessions": "/api/v1/sessions" },
    }))
}

async fn broker_stats(
    caller: crate::caller::Caller,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, Problem> {
    caller.require(m2mhub_identity::Role::Viewer)?;
    let broker = &state.broker;
    let g = broker.gauges();
    let mut counters = serde_json::Map::new();
    for (name, _, v) in broker_counters(broker) {
        counters.insert(name.to_string(), json!(v));
    }
    Ok(Json(json!({
        "connections": g.connections,
        "sessions": g.sessions,
        "subscriptions": g.subscriptions,
        "retained_messages": g.retained,
        "uptime_seconds": g.uptime_secs,
        "counters": counters,
    })))
}

fn broker_counters(broker: &m2mhub_broker::Broker) -> Vec<(&'static str, &'static str, u64)> {
    broker.metrics().counters()
}

#[derive(serde::Deserialize)]
struct Page {
    /// Client id to continue after (the `next` of the previous page).
    after: Option<String>,
    limit: Option<usize>,
}

const MAX_PAGE: usize = 1000;

fn session_json(s: &m2mhub_broker::SessionInfo) -> serde_json::Value {
    json!({
        "client_id": s.client_id,
        "online": s.online,
        "protocol": if s.protocol_v5 { "5.0" } else { "3.1.1" },
        "persistent": s.persistent,
        "expiry_interval": s.expiry_interval,
        "offline_seconds": s.offline_secs,
        "subscriptions": s.subscriptions.iter().map(|(f, q)| json!({"filter": f, "qos": q})).collect::<Vec<_>>(),
        "queued": s.queued,
        "inflight": s.inflight,
        "dropped": s.dropped,
    })
}

/// Sessions, online and offline, paged by client id.
async fn list_sessions(
    caller: crate::caller::Caller,
    State(state): State<AppState>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<impl IntoResponse, Problem> {
    caller.require(m2mhub_identity::Role::Viewer)?;
    let broker = &state.broker;
    let Query(page) = page.map_err(crate::problem::bad_query)?;
    let limit = page.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    // Tenant users see only their own devices' sessions.
    let mut items = broker.sessions(page.after.as_deref(), limit);
    items.retain(|s| caller.sees_client(&state.registry, &s.client_id));
    let next = (items.len() == limit)
        .then(|| items.last().map(|s| s.client_id.clone()))
        .flatten();
    Ok(Json(json!({
        "items": items.iter().map(session_json).collect::<Vec<_>>(),
        "next": next,
    })))
}

async fn show_session(
    caller: crate::caller::Caller,
    State(state): State<AppState>,
    Path(client_id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    caller.require(m2mhub_identity::Role::Viewer)?;
    match state.broker.session(&client_id) {
        Some(s) if caller.sees_client(&state.registry, &client_id) => Ok(Json(session_json(&s))),
        _ => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no session with client id {client_id:?}"),
        )),
    }
}

async fn api_not_found(uri: Uri) -> Problem {
    Problem::not_found(&format!("/api/v1{}", uri.path()))
}

async fn not_found(uri: Uri) -> Problem {
    Problem::not_found(uri.path())
}
