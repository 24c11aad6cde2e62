//! Operators: people (and scripts) who manage the platform.
//!
//! Passwords are hashed with Argon2id: operators log in rarely, so a
//! memory-hard hash that makes a stolen database expensive to crack costs
//! nothing noticeable. API tokens, used on every HTTP request, are random
//! 256-bit secrets hashed with SHA-256 and checked in memory.

use crate::error::{RegistryError, Result};
use crate::{now_ms, secret, validate_name, Registry, State};
use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The prefix of API token secrets.
pub const API_TOKEN_PREFIX: &str = "m2mapi_";

/// Operator roles, ordered: `Viewer < Operator < Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything in scope.
    Viewer,
    /// Also manages devices, credentials and rules.
    Operator,
    /// Also manages users, tenants and policies.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(RegistryError::Validation(format!(
                "unknown role {s:?} (admin, operator or viewer)"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    pub role: Role,
    /// `None`: platform-wide; otherwise confined to this tenant.
    pub tenant: Option<String>,
    pub created_ms: i64,
}

/// A user as stored: with the Argon2id PHC string.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub user: User,
    pub password_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenInfo {
    pub id: String,
    pub username: String,
    pub name: String,
    pub role: Role,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct ApiTokenRecord {
    pub info: ApiTokenInfo,
    pub hash: [u8; 32],
}

/// Who is making an API request, and with which rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub username: String,
    /// The effective role: the token's role, capped by the user's current
    /// role (demoting a user also demotes their existing tokens).
    pub role: Role,
    pub tenant: Option<String>,
    /// The API token used, if any (`None` for a password login).
    pub token_id: Option<String>,
}

fn validate_username(u: &str) -> Result<()> {
    if u.is_empty()
        || u.len() > 64
        || !u.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
    {
        return Err(RegistryError::Validation(format!(
            "username {u:?} must be 1 to 64 characters from a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

fn validate_password(p: &str) -> Result<()> {
    if p.chars().count() < 8 || p.len() > 1024 {
        return Err(RegistryError::Validation(
            "password must be 8 to 1024 characters".into(),
        ));
    }
    Ok(())
}

fn hash_password(password: &str) -> Result<String> {
    let salt_bytes: [u8; 16] = secret::random_bytes();
    let salt = SaltString::encode_b64(&salt_bytes)
        .map_err(|e| RegistryError::Storage(format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| RegistryError::Storage(format!("password hash: {e}")))
}

fn password_matches(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Platform-wide admins left if `except` were removed or demoted: the last
/// one may not go, or nobody could manage users any more.
fn other_platform_admins(st: &State, except: &str) -> usize {
    st.users
        .values()
        .filter(|u| {
            u.user.username != except && u.user.role == Role::Admin && u.user.tenant.is_none()
        })
        .count()
}

impl Registry {
    pub fn create_user(
        &self,
        username: &str,
        password: &str,
        role: Role,
        tenant: Option<&str>,
    ) -> Result<User> {
        validate_username(username)?;
        validate_password(password)?;
        {
            let st = self.shared.state.read();
            if let Some(t) = tenant {
                if !st.tenants.contains_key(t) {
                    return Err(RegistryError::NotFound(format!("tenant {t}")));
                }
            }
            if st.users.contains_key(username) {
                return Err(RegistryError::AlreadyExists(format!("user {username}")));
            }
        }
        // Hash outside the writer lock: Argon2 takes tens of milliseconds.
        let password_hash = hash_password(password)?;
        let s = &*self.shared;
        let _w = s.write.lock();
        if s.state.read().users.contains_key(username) {
            return Err(RegistryError::AlreadyExists(format!("user {username}")));
        }
        let rec = UserRecord {
            user: User {
                username: username.into(),
                role,
                tenant: tenant.map(str::to_string),
                created_ms: now_ms(),
            },
            password_hash,
        };
        s.store.insert_user(&rec)?;
        let user = rec.user.clone();
        s.state.write().users.insert(user.username.clone(), rec);
        Ok(user)
    }

    pub fn get_user(&self, username: &str) -> Result<User> {
        self.shared
            .state
            .read()
            .users
            .get(username)
            .map(|u| u.user.clone())
            .ok_or_else(|| RegistryError::NotFound(format!("user {username}")))
    }

    pub fn list_users(&self) -> Result<Vec<User>> {
        Ok(self
            .shared
            .state
            .read()
            .users
            .values()
            .map(|u| u.user.clone())
            .collect())
    }

    /// Delete a user and their API tokens. The last platform-wide admin
    /// cannot be deleted (Conflict).
    pub fn delete_user(&self, username: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        {
            let st = s.state.read();
            let u = st
                .users
                .get(username)
                .ok_or_else(|| RegistryError::NotFound(format!("user {username}")))?;
            if u.user.role == Role::Admin
                && u.user.tenant.is_none()
                && other_platform_admins(&st, username) == 0
            {
                return Err(RegistryError::Conflict(
                    "cannot delete the last platform admin".into(),
                ));
            }
        }
        s.store.delete_user(username)?;
        let mut st = s.state.write();
        st.users.remove(username);
        let ids: Vec<String> = st
            .api_tokens
            .values()
            .filter(|t| t.info.username == username)
            .map(|t| t.info.id.clone())
            .collect();
        for id in ids {
            if let Some(t) = st.api_tokens.remove(&id) {
                st.api_by_hash.remove(&t.hash);
            }
        }
        Ok(())
    }

    pub fn set_password(&self, username: &str, password: &str) -> Result<()> {
        validate_password(password)?;
        self.get_user(username)?;
        let hash = hash_password(password)?;
        self.modify_user(username, |_, u| {
            u.password_hash = hash;
            Ok(())
        })
    }

    /// Change a user's role. Demoting the last platform-wide admin is a
    /// Conflict.
    pub fn set_role(&self, username: &str, role: Role) -> Result<()> {
        self.modify_user(username, |st, u| {
            if role != Role::Admin
                && u.user.role == Role::Admin
                && u.user.tenant.is_none()
                && other_platform_admins(st, username) == 0
            {
                return Err(RegistryError::Conflict(
                    "cannot demote the last platform admin".into(),
                ));
            }
            u.user.role = role;
            Ok(())
        })
    }

    /// Read-check-write a user under the writer lock.
    fn modify_user(
        &self,
        username: &str,
        f: impl FnOnce(&State, &mut UserRecord) -> Result<()>,
    ) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let rec = {
            let st = s.state.read();
            let mut rec = st
                .users
                .get(username)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(format!("user {username}")))?;
            f(&st, &mut rec)?;
            rec
        };
        s.store.update_user(&rec)?;
        s.state.write().users.insert(username.into(), rec);
        Ok(())
    }

    /// Check a password. An unknown user and a wrong password both give
    /// `Unauthorized` after the same Argon2 work, so timing does not reveal
    /// which usernames exist.
    pub fn verify_password(&self, username: &str, password: &str) -> Result<User> {
        let rec = self.shared.state.read().users.get(username).cloned();
        match rec {
            Some(rec) if password_matches(&rec.password_hash, password) => Ok(rec.user),
            Some(_) => Err(RegistryError::Unauthorized),
            None => {
                let _ = password_matches(self.dummy_password_hash(), password);
                Err(RegistryError::Unauthorized)
            }
        }
    }

    /// Compute the hash unknown user names are checked against, so that
    /// even the first such login costs one Argon2 verification like any
    /// other (not a hash and a verification). Call it once at start, off
    /// the async workers: it takes as long as a login.
    pub fn prepare_password_checks(&self) {
        let _ = self.dummy_password_hash();
    }

    fn dummy_password_hash(&self) -> &str {
        self.shared
            .dummy_password_hash
            .get_or_init(|| hash_password("not-a-real-password").unwrap_or_default())
    }

    /// Create an API token for a user with at most the user's role.
    pub fn create_api_token(
        &self,
        username: &str,
        role: Role,
        expires_ms: Option<i64>,
        name: &str,
    ) -> Result<(ApiTokenInfo, String)> {
        validate_name("API token", name)?;
        let now = now_ms();
        if expires_ms.is_some_and(|e| e <= now) {
            return Err(RegistryError::Validation(
                "token expiry must be in the future".into(),
            ));
        }
        let s = &*self.shared;
        let _w = s.write.lock();
        let id = {
            let st = s.state.read();
            let u = st
                .users
                .get(username)
                .ok_or_else(|| RegistryError::NotFound(format!("user {username}")))?;
            if role > u.user.role {
                return Err(RegistryError::Validation(format!(
                    "a token's role ({role}) cannot exceed its user's role ({})",
                    u.user.role
                )));
            }
            loop {
                let id = secret::new_id("api");
                if !st.api_tokens.contains_key(&id) {
                    break id;
                }
            }
        };
        let secret = secret::new_secret(API_TOKEN_PREFIX);
        let rec = ApiTokenRecord {
            info: ApiTokenInfo {
                id,
                username: username.into(),
                name: name.into(),
                role,
                created_ms: now,
                expires_ms,
                revoked: false,
            },
            hash: secret::sha256(secret.as_bytes()),
        };
        s.store.insert_api_token(&rec)?;
        let info = rec.info.clone();
        let mut st = s.state.write();
        st.api_by_hash.insert(rec.hash, info.id.clone());
        st.api_tokens.insert(info.id.clone(), rec);
        Ok((info, secret))
    }

    /// API tokens of one user, or of everyone.
    pub fn list_api_tokens(&self, username: Option<&str>) -> Result<Vec<ApiTokenInfo>> {
        Ok(self
            .shared
            .state
            .read()
            .api_tokens
            .values()
            .filter(|t| username.is_none_or(|u| t.info.username == u))
            .map(|t| t.info.clone())
            .collect())
    }

    pub fn revoke_api_token(&self, id: &str) -> Result<()> {
        let s = &*self.shared;
        let _w = s.write.lock();
        let mut info = s
            .state
            .read()
            .api_tokens
            .get(id)
            .map(|t| t.info.clone())
            .ok_or_else(|| RegistryError::NotFound(format!("API token {id}")))?;
        if info.revoked {
            return Ok(());
        }
        info.revoked = true;
        s.store.update_api_token(&info)?;
        if let Some(t) = s.state.write().api_tokens.get_mut(id) {
            t.info = info;
        }
        Ok(())
    }

    /// Check an API token (in memory: one SHA-256 and a hash-map lookup).
    pub fn verify_api_token(&self, secret: &str, now_ms: i64) -> Result<Principal> {
        let hash = secret::sha256(secret.as_bytes());
        let st = self.shared.state.read();
        let t = st
            .api_by_hash
            .get(&hash)
            .and_then(|id| st.api_tokens.get(id))
            .ok_or(RegistryError::Unauthorized)?;
        if t.info.revoked || t.info.expires_ms.is_some_and(|e| now_ms >= e) {
            return Err(RegistryError::Unauthorized);
        }
        let u = st
            .users
            .get(&t.info.username)
            .ok_or(RegistryError::Unauthorized)?;
        Ok(Principal {
            username: u.user.username.clone(),
            role: t.info.role.min(u.user.role),
            tenant: u.user.tenant.clone(),
            token_id: Some(t.info.id.clone()),
        })
    }

    /// First start: if there is no user at all, create `admin` (platform-wide
    /// Admin) with a random 20-character password and return the
    /// credentials, once. Afterwards (also after a restart) returns `None`.
    pub fn ensure_admin(&self) -> Result<Option<(String, String)>> {
        if !self.shared.state.read().users.is_empty() {
            return Ok(None);
        }
        let password = secret::random_password(20);
        match self.create_user("admin", &password, Role::Admin, None) {
            Ok(_) => Ok(Some(("admin".into(), password))),
            // Another caller won the race.
            Err(RegistryError::AlreadyExists(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;

    #[test]
    fn users_roles_and_passwords() {
        let (_d, reg) = open();
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!("operator".parse::<Role>().expect("parse"), Role::Operator);
        reg.create_tenant("acme", "Acme").expect("tenant");
        let u = reg
            .create_user("alice", "correct horse", Role::Operator, Some("acme"))
            .expect("create");
        assert_eq!(u.tenant.as_deref(), Some("acme"));
        assert!(matches!(
            reg.create_user("alice", "whatever12", Role::Viewer, None),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(matches!(
            reg.create_user("Alice", "whatever12", Role::Viewer, None),
            Err(RegistryError::Validation(_))
        ));
        assert!(matches!(
            reg.create_user("bob", "short", Role::Viewer, None),
            Err(RegistryError::Validation(_))
        ));
        assert!(matches!(
            reg.create_user("bob", "long enough", Role::Viewer, Some("nope")),
            Err(RegistryError::NotFound(_))
        ));
        assert_eq!(
            reg.verify_password("alice", "correct horse").expect("ok"),
            u
        );
        assert!(matches!(
            reg.verify_password("alice", "wrong horse"),
            Err(RegistryError::Unauthorized)
        ));
        assert!(matches!(
            reg.verify_password("mallory", "correct horse"),
            Err(RegistryError::Unauthorized)
        ));
        reg.set_password("alice", "battery staple").expect("set");
        assert!(reg.verify_password("alice", "correct horse").is_err());
        assert!(reg.verify_password("alice", "battery staple").is_ok());
        reg.set_role("alice", Role::Admin).expect("role");
        assert_eq!(reg.get_user("alice").expect("get").role, Role::Admin);
        assert_eq!(reg.list_users().expect("list").len(), 1);
        reg.delete_user("alice").expect("delete");
        assert!(matches!(
            reg.delete_user("alice"),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn last_platform_admin_is_protected() {
        let (_d, reg) = open();
        reg.create_user("root", "long enough", Role::Admin, None)
            .expect("admin");
        assert!(matches!(
            reg.set_role("root", Role::Viewer),
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            reg.delete_user("root"),
            Err(RegistryError::Conflict(_))
        ));
        reg.create_user("root2", "long enough", Role::Admin, None)
            .expect("admin 2");
        reg.set_role("root", Role::Viewer).expect("now allowed");
    }

    #[test]
    fn api_tokens() {
        let (_d, reg) = open();
        reg.create_user("ops", "long enough", Role::Operator, None)
            .expect("user");
        assert!(matches!(
            reg.create_api_token("ops", Role::Admin, None, "ci"),
            Err(RegistryError::Validation(_))
        ));
        assert!(matches!(
            reg.create_api_token("nobody", Role::Viewer, None, "ci"),
            Err(RegistryError::NotFound(_))
        ));
        let now = now_ms();
        let (info, secret) = reg
            .create_api_token("ops", Role::Operator, Some(now + 60_000), "ci")
            .expect("token");
        assert!(secret.starts_with("m2mapi_") && secret.len() == 7 + 43);
        let p = reg.verify_api_token(&secret, now).expect("verify");
        assert_eq!(
            p,
            Principal {
                username: "ops".into(),
                role: Role::Operator,
                tenant: None,
                token_id: Some(info.id.clone())
            }
        );
        assert!(matches!(
            reg.verify_api_token(&secret, now + 60_000),
            Err(RegistryError::Unauthorized)
        ));
        assert!(matches!(
            reg.verify_api_token("m2mapi_nope", now),
            Err(RegistryError::Unauthorized)
        ));
        // Demoting the user caps the token's role.
        reg.set_role("ops", Role::Viewer).expect("demote");
        assert_eq!(
            reg.verify_api_token(&secret, now).expect("verify").role,
            Role::Viewer
        );
        assert_eq!(reg.list_api_tokens(Some("ops")).expect("list").len(), 1);
        reg.revoke_api_token(&info.id).expect("revoke");
        assert!(matches!(
            reg.verify_api_token(&secret, now),
            Err(RegistryError::Unauthorized)
        ));
        // Deleting the user removes their tokens.
        let (_i2, s2) = reg
            .create_api_token("ops", Role::Viewer, None, "two")
            .expect("token");
        reg.delete_user("ops").expect("delete");
        assert!(matches!(
            reg.verify_api_token(&s2, now),
            Err(RegistryError::Unauthorized)
        ));
        assert!(reg.list_api_tokens(None).expect("list").is_empty());
    }

    #[test]
    fn ensure_admin_once_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (user, pw) = {
            let reg = Registry::open(dir.path()).expect("open");
            let creds = reg.ensure_admin().expect("ensure").expect("first time");
            assert_eq!(creds.0, "admin");
            assert_eq!(creds.1.len(), 20);
            assert_eq!(reg.ensure_admin().expect("again"), None);
            creds
        };
        let reg = Registry::open(dir.path()).expect("reopen");
        assert_eq!(reg.ensure_admin().expect("after reopen"), None);
        let u = reg.verify_password(&user, &pw).expect("login");
        assert_eq!(u.role, Role::Admin);
        assert_eq!(u.tenant, None);
    }
}
