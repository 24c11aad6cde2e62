//! Who is calling: the operator behind a bearer API token, with a role and
//! (for tenant users) a tenant. Every protected handler takes a [`Caller`]
//! and states the least role it needs; tenant users only ever see their
//! own tenant's resources (others answer 404, not 403, so existence does
//! not leak).

use crate::problem::Problem;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use m2mhub_identity::{Device, Role};

#[derive(Debug, Clone)]
pub struct Caller {
    pub username: String,
    pub role: Role,
    pub tenant: Option<String>,
}

fn rank(role: Role) -> u8 {
    match role {
        Role::Viewer => 1,
        Role::Operator => 2,
        Role::Admin => 3,
    }
}

impl Caller {
    /// Refuse with 403 unless the caller has at least `min`.
    pub fn require(&self, min: Role) -> Result<(), Problem> {
        if rank(self.role) >= rank(min) {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this needs the {min:?} role; you are {:?}", self.role).to_lowercase(),
            ))
        }
    }

    /// The tenant a request may act on: a tenant user's own, whatever they
    /// asked; a platform user's choice.
    pub fn scope(&self, requested: Option<&str>) -> Result<Option<String>, Problem> {
        match (&self.tenant, requested) {
            (Some(own), Some(r)) if r != own => Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no tenant {r:?}"),
            )),
            (Some(own), _) => Ok(Some(own.clone())),
            (None, r) => Ok(r.map(str::to_string)),
        }
    }

    /// 404 for a device of another tenant.
    pub fn see(&self, device: &Device) -> Result<(), Problem> {
        match &self.tenant {
            Some(t) if *t != device.tenant => Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no device {:?}", device.id),
            )),
            _ => Ok(()),
        }
    }

    pub fn is_platform(&self) -> bool {
        self.tenant.is_none()
    }

    /// Refuse with 403 unless the caller is a platform-wide admin (for
    /// actions whose effect is not confined to one tenant, like IP bans).
    pub fn require_platform_admin(&self) -> Result<(), Problem> {
        self.require(Role::Admin)?;
        if self.is_platform() {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this affects every tenant: only platform administrators may do it",
            ))
        }
    }

    /// Whether `role` is no more than the caller's own.
    pub fn covers(&self, role: Role) -> bool {
        rank(role) <= rank(self.role)
    }

    /// Whether a client id (a device id) belongs to the caller's tenant.
    pub fn sees_client(&self, registry: &m2mhub_identity::Registry, client_id: &str) -> bool {
        match &self.tenant {
            None => true,
            Some(t) => registry.get_device(client_id).is_ok_and(|d| d.tenant == *t),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let unauthorized = |detail: &str| {
            Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail.to_string())
        };
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("send `Authorization: Bearer <API token>` (POST /api/v1/auth/login returns one)"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <API token>`"))?;
        let p = state
            .registry
            .verify_api_token(token.trim(), m2mhub_identity::now_ms())
            .map_err(|_| unauthorized("the API token is unknown, revoked or expired"))?;
        Ok(Caller {
            username: p.username,
            role: p.role,
            tenant: p.tenant,
        })
    }
}
