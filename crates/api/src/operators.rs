//! Operators: login, users and their API tokens, tenants, groups, policies
//! and claim tokens.

use crate::caller::Caller;
use crate::devices::audit;
use crate::lockout::Lockout;
use crate::problem::{bad_json, Problem};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use m2mhub_identity::{now_ms, ClaimSpec, Policy, Role, SecurityEvent, SecurityKind};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Lifetime of a token handed out by a password login.
const LOGIN_TOKEN_MS: i64 = 12 * 3600 * 1000;

fn parse_role(s: &str) -> Result<Role, Problem> {
    match s {
        "admin" => Ok(Role::Admin),
        "operator" => Ok(Role::Operator),
        "viewer" => Ok(Role::Viewer),
        other => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            format!("unknown role {other:?}: use admin, operator or viewer"),
        )),
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Admin => "admin",
        Role::Operator => "operator",
        Role::Viewer => "viewer",
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    username: String,
    password: String,
}

/// `POST /auth/login`. Throttled (`lockout.rs`): a locked user name or
/// address is refused with 429 before any hashing; the Argon2id check runs
/// on the blocking pool behind a bounded slot (503 when the queue is full).
pub async fn login(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Json<LoginBody>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    let Json(b) = body.map_err(bad_json)?;
    let addr = peer.map(|Extension(ConnectInfo(a))| a.ip());
    let guard = &state.login;
    guard.check(&b.username, addr).map_err(locked_out)?;
    let _slot = guard.hash_slot().await.map_err(|_| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many logins are being checked at once; try again shortly",
        )
        .retry_after(Duration::from_secs(1))
    })?;
    // Attempts that queued behind the one that locked the name are refused
    // as well, still without hashing.
    guard.check(&b.username, addr).map_err(locked_out)?;
    guard.checking();
    let registry = state.registry.clone();
    let username = b.username.clone();
    let checked =
        tokio::task::spawn_blocking(move || registry.verify_password(&username, &b.password))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "password check task failed");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the password check failed",
                )
            })?;
    drop(_slot);
    let user = match checked {
        Ok(u) => u,
        Err(_) => {
            let detail = match addr {
                Some(a) => json!({"addr": a.to_string()}),
                None => json!({}),
            };
            let name = shown_name(&b.username);
            let _ = state
                .registry
                .audit(&name, "auth.login", &name, "denied", detail);
            for lockout in guard.failed(&b.username, addr) {
                record_lockout(&state, &name, addr, &lockout);
            }
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong user name or password",
            ));
        }
    };
    guard.succeeded(&user.username);
    let expires = now_ms() + LOGIN_TOKEN_MS;
    let (info, secret) =
        state
            .registry
            .create_api_token(&user.username, user.role, Some(expires), "login")?;
    let _ = state.registry.audit(
        &user.username,
        "auth.login",
        &user.username,
        "ok",
        json!({"token_id": info.id}),
    );
    Ok(Json(json!({
        "token": secret,
        "expires_ms": expires,
        "username": user.username,
        "role": role_name(user.role),
        "tenant": user.tenant,
    })))
}

/// A user name as recorded for a failed login: no valid name is longer
/// than 64 bytes, and a made-up megabyte-long one must not bloat the audit
/// log.
fn shown_name(name: &str) -> String {
    const MAX: usize = 64;
    if name.len() <= MAX {
        return name.to_string();
    }
    let mut end = MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

/// 429 while a user name or address is locked out.
fn locked_out(wait: Duration) -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "login-locked",
        "too many failed logins for this user name or from this address; wait before trying again",
    )
    .retry_after(wait)
}

/// A lockout began: audit it (`auth.lockout`) and record a security event.
fn record_lockout(state: &AppState, username: &str, addr: Option<IpAddr>, l: &Lockout) {
    let detail = json!({
        "scope": l.key.scope(),
        "user": username,
        "addr": addr.map(|a| a.to_string()),
        "seconds": l.duration.as_secs(),
        "failures": l.failures,
        "strike": l.strike,
    });
    tracing::warn!(scope = l.key.scope(), key = %l.key, seconds = l.duration.as_secs(), strike = l.strike, "login lockout");
    if let Err(e) = state.registry.audit(
        username,
        "auth.lockout",
        &l.key.to_string(),
        "denied",
        detail.clone(),
    ) {
        tracing::error!(error = %e, "cannot audit a login lockout");
    }
    if let Err(e) = state.registry.record_security_event(SecurityEvent {
        kind: SecurityKind::LoginLockout,
        device_id: None,
        addr: addr.map(|a| a.to_string()),
        detail,
        ts_ms: None,
    }) {
        tracing::error!(error = %e, "cannot record a login lockout");
    }
}

pub async fn me(caller: Caller) -> Json<Value> {
    Json(
        json!({"username": caller.username, "role": role_name(caller.role), "tenant": caller.tenant}),
    )
}

pub async fn list_users(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Admin)?;
    let users = state.registry.list_users()?;
    let items: Vec<Value> = users
        .iter()
        .filter(|u| caller.is_platform() || u.tenant == caller.tenant)
        .map(|u| json!({"username": u.username, "role": role_name(u.role), "tenant": u.tenant, "created_ms": u.created_ms}))
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    username: String,
    password: String,
    role: String,
    tenant: Option<String>,
}

pub async fn create_user(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<UserBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Admin)?;
    let Json(b) = body.map_err(bad_json)?;
    let role = parse_role(&b.role)?;
    let tenant = caller.scope(b.tenant.as_deref())?;
    let u = state
        .registry
        .create_user(&b.username, &b.password, role, tenant.as_deref())?;
    audit(
        &state,
        &caller,
        "user.create",
        &u.username,
        json!({"role": b.role, "tenant": tenant}),
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({"username": u.username, "role": role_name(u.role), "tenant": u.tenant})),
    ))
}

pub async fn delete_user(
    caller: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Admin)?;
    if name == caller.username {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "you cannot delete yourself",
        ));
    }
    let users = state.registry.list_users()?;
    let Some(u) = users.iter().find(|u| u.username == name) else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no user {name:?}"),
        ));
    };
    if !caller.is_platform() && u.tenant != caller.tenant {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no user {name:?}"),
        ));
    }
    state.registry.delete_user(&name)?;
    audit(&state, &caller, "user.delete", &name, json!({}));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenBody {
    name: String,
    role: Option<String>,
    expires_ms: Option<i64>,
}

/// A new API token for the caller (at most the caller's role).
pub async fn create_api_token(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<ApiTokenBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let Json(b) = body.map_err(bad_json)?;
    let role = match &b.role {
        Some(r) => parse_role(r)?,
        None => caller.role,
    };
    if !caller.covers(role) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "a token cannot grant more than its own role ({})",
                role_name(caller.role)
            ),
        ));
    }
    let (info, secret) =
        state
            .registry
            .create_api_token(&caller.username, role, b.expires_ms, &b.name)?;
    audit(
        &state,
        &caller,
        "api_token.create",
        &caller.username,
        json!({"token_id": info.id, "role": role_name(role)}),
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": info, "secret": secret})),
    ))
}

pub async fn list_api_tokens(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    let items = state.registry.list_api_tokens(Some(&caller.username))?;
    Ok(Json(json!({ "items": items })))
}

pub async fn revoke_api_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let mine = state.registry.list_api_tokens(Some(&caller.username))?;
    if !mine.iter().any(|t| t.id == id) {
        // Someone else's token: only a platform administrator may revoke it;
        // to anyone else it does not exist.
        if !(caller.is_platform() && caller.require(Role::Admin).is_ok()) {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no API token {id:?}"),
            ));
        }
    }
    state.registry.revoke_api_token(&id)?;
    audit(&state, &caller, "api_token.revoke", &id, json!({}));
    Ok(StatusCode::NO_CONTENT)
}

// ---- tenants, groups, policies ----

pub async fn list_tenants(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let items: Vec<_> = state
        .registry
        .list_tenants()?
        .into_iter()
        .filter(|t| caller.tenant.as_deref().is_none_or(|own| own == t.id))
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedBody {
    id: String,
    name: Option<String>,
}

pub async fn create_tenant(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<NamedBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Admin)?;
    if !caller.is_platform() {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only platform administrators create tenants",
        ));
    }
    let Json(b) = body.map_err(bad_json)?;
    let t = state
        .registry
        .create_tenant(&b.id, b.name.as_deref().unwrap_or(&b.id))?;
    audit(&state, &caller, "tenant.create", &t.id, json!({}));
    Ok((StatusCode::CREATED, Json(json!(t))))
}

pub async fn list_groups(
    caller: Caller,
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let tenant = caller.scope(Some(&tenant))?;
    let items = state.registry.list_groups(tenant.as_deref())?;
    Ok(Json(json!({ "items": items })))
}

pub async fn create_group(
    caller: Caller,
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    body: Result<Json<NamedBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let tenant = caller.scope(Some(&tenant))?.unwrap_or_default();
    let Json(b) = body.map_err(bad_json)?;
    let g = state
        .registry
        .create_group(&tenant, &b.id, b.name.as_deref().unwrap_or(&b.id))?;
    audit(
        &state,
        &caller,
        "group.create",
        &format!("{tenant}/{}", g.id),
        json!({}),
    );
    Ok((StatusCode::CREATED, Json(json!(g))))
}

pub async fn list_policies(
    caller: Caller,
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let tenant = caller.scope(Some(&tenant))?.unwrap_or_default();
    let items = state.registry.list_policies(&tenant)?;
    Ok(Json(json!({ "items": items })))
}

pub async fn put_policy(
    caller: Caller,
    State(state): State<AppState>,
    Path((tenant, name)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Admin)?;
    let tenant = caller.scope(Some(&tenant))?.unwrap_or_default();
    let Json(mut v) = body.map_err(bad_json)?;
    // Indexing a JSON value that is not an object would panic.
    let Some(fields) = v.as_object_mut() else {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "a policy is a JSON object: {\"group\": null, \"publish\": [filters], \"subscribe\": [filters]}",
        ));
    };
    fields.insert("name".into(), json!(name));
    let policy: Policy = serde_json::from_value(v.clone()).map_err(|e| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", format!("a policy is {{\"group\": null, \"publish\": [filters], \"subscribe\": [filters]}}: {e}"))
    })?;
    state.registry.put_policy(&tenant, policy)?;
    revalidate_tenant(&state, &tenant);
    audit(
        &state,
        &caller,
        "policy.put",
        &format!("{tenant}/{name}"),
        v.clone(),
    );
    Ok(Json(v))
}

pub async fn delete_policy(
    caller: Caller,
    State(state): State<AppState>,
    Path((tenant, name)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Admin)?;
    let tenant = caller.scope(Some(&tenant))?.unwrap_or_default();
    state.registry.delete_policy(&tenant, &name)?;
    revalidate_tenant(&state, &tenant);
    audit(
        &state,
        &caller,
        "policy.delete",
        &format!("{tenant}/{name}"),
        json!({}),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Subscriptions made under the old policy must not outlive it.
fn revalidate_tenant(state: &AppState, tenant: &str) {
    let removed = state
        .broker
        .revalidate_subscriptions(|id| id.tenant.as_deref() == Some(tenant));
    if removed > 0 {
        tracing::info!(
            tenant,
            removed,
            "subscriptions removed after a policy change"
        );
    }
}

// ---- claim tokens ----

pub async fn list_claims(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, Problem> {
    caller.require(Role::Viewer)?;
    let tenant = caller.scope(None)?;
    let items = state.registry.list_claim_tokens(tenant.as_deref())?;
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    /// A label for operators.
    name: Option<String>,
    tenant: Option<String>,
    group: Option<String>,
    profile: Option<String>,
    max_uses: u32,
    /// Expiry, Unix milliseconds (default: 24 hours from now).
    expires_ms: Option<i64>,
}

pub async fn create_claim(
    caller: Caller,
    State(state): State<AppState>,
    body: Result<Json<ClaimBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    caller.require(Role::Operator)?;
    let Json(b) = body.map_err(bad_json)?;
    let tenant = caller
        .scope(b.tenant.as_deref())?
        .unwrap_or_else(|| m2mhub_identity::DEFAULT_TENANT.into());
    let (info, secret) = state.registry.create_claim_token(ClaimSpec {
        name: b.name.unwrap_or_default(),
        tenant: tenant.clone(),
        group: b.group,
        profile: b.profile,
        max_uses: b.max_uses,
        expires_ms: Some(b.expires_ms.unwrap_or_else(|| now_ms() + 24 * 3600 * 1000)),
    })?;
    audit(
        &state,
        &caller,
        "claim.create",
        &info.id,
        json!({"tenant": tenant, "max_uses": b.max_uses}),
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({"claim": info, "secret": secret})),
    ))
}

pub async fn revoke_claim(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let tenant = caller.scope(None)?;
    let visible = state.registry.list_claim_tokens(tenant.as_deref())?;
    if !visible.iter().any(|c| c.id == id) {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no claim token {id:?}"),
        ));
    }
    state.registry.revoke_claim_token(&id)?;
    audit(&state, &caller, "claim.revoke", &id, json!({}));
    Ok(StatusCode::NO_CONTENT)
}
