//! Who may connect, publish and subscribe.
//!
//! The session code only talks to the [`Authenticator`] and [`Authorizer`]
//! traits, so the device registry plugs in later without touching it. Two
//! implementations live here: [`StaticAuth`] (anonymous access when allowed,
//! plus an optional password file) and [`AllowAll`] for authorization.

use mqtt_codec::reason;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// The verified client certificate of a mutual-TLS connection.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    /// Subject common name, if the certificate has one.
    pub common_name: Option<String>,
    /// SHA-256 of the certificate's DER encoding: how the registry finds
    /// (and revokes) an individual certificate.
    pub fingerprint: [u8; 32],
    /// The certificate itself (DER), for authenticators that need more.
    pub der: Vec<u8>,
}

/// What a client presented when connecting.
#[derive(Debug)]
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub peer: SocketAddr,
    /// `tcp`, `tls` or `ws`.
    pub transport: &'static str,
    /// The verified client certificate (mutual TLS only).
    pub tls: Option<&'a TlsPeer>,
}

/// The authenticated principal, kept for the life of the connection and
/// handed to the authorizer on every publish and subscribe.
#[derive(Debug, Clone, Default)]
pub struct ClientIdentity {
    pub username: Option<Arc<str>>,
    /// The registered device this connection speaks for.
    pub device_id: Option<Arc<str>>,
    pub tenant: Option<Arc<str>>,
    pub group: Option<Arc<str>>,
    /// Set for a client that holds only a fleet-provisioning claim token
    /// (the claim token's id): it may use the provisioning topics only.
    pub claim: Option<Arc<str>>,
    /// Internal clients (the platform itself) bypass authorization.
    pub internal: bool,
}

impl ClientIdentity {
    /// Nothing known about the client: no user, device, tenant, group or
    /// claim, and not the platform itself.
    pub fn is_anonymous(&self) -> bool {
        let ClientIdentity {
            username,
            device_id,
            tenant,
            group,
            claim,
            internal,
        } = self;
        username.is_none()
            && device_id.is_none()
            && tenant.is_none()
            && group.is_none()
            && claim.is_none()
            && !internal
    }
}

#[derive(Debug)]
pub enum AuthDecision {
    Allow(ClientIdentity),
    /// Refuse with this MQTT 5 CONNACK reason code.
    Deny(u8),
}

pub trait Authenticator: Send + Sync + 'static {
    /// Decide on a CONNECT. Called on the connection's task: it must not block
    /// for long (no password hashing with memory-hard functions per CONNECT).
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision;
}

pub trait Authorizer: Send + Sync + 'static {
    fn can_publish(&self, client_id: &str, identity: &ClientIdentity, topic: &str) -> bool;
    fn can_subscribe(&self, client_id: &str, identity: &ClientIdentity, filter: &str) -> bool;
}

/// Authorizes everything: the foundation's default until the registry lands.
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn can_publish(&self, _: &str, _: &ClientIdentity, _: &str) -> bool {
        true
    }
    fn can_subscribe(&self, _: &str, _: &ClientIdentity, _: &str) -> bool {
        true
    }
}

/// Anonymous access (when allowed) and a password file.
///
/// The file has one `username:$sha256$<salt hex>$<digest hex>` line per user
/// (`m2mhub passwd` writes them); `#` starts a comment. A salted SHA-256 is
/// cheap enough for reconnect storms and never stores the password itself.
pub struct StaticAuth {
    allow_anonymous: bool,
    users: HashMap<String, PasswordHash>,
}

#[derive(Debug, Clone)]
struct PasswordHash {
    salt: Vec<u8>,
    digest: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("password file line {line}: {reason} (expected `username:$sha256$<salt hex>$<digest hex>`, written by `m2mhub passwd`)")]
    Syntax { line: usize, reason: &'static str },
}

impl StaticAuth {
    pub fn new(allow_anonymous: bool) -> Self {
        StaticAuth {
            allow_anonymous,
            users: HashMap::new(),
        }
    }

    /// Whether the password file has this user.
    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn with_password_file(mut self, path: &Path) -> Result<Self, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.users = parse_password_file(&text)?;
        Ok(self)
    }
}

fn parse_password_file(text: &str) -> Result<HashMap<String, PasswordHash>, PasswordFileError> {
    let mut users = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = |reason| PasswordFileError::Syntax {
            line: i + 1,
            reason,
        };
        let (user, hash) = line.split_once(':').ok_or(syntax("missing ':'"))?;
        if user.is_empty() {
            return Err(syntax("empty user name"));
        }
        let rest = hash
            .strip_prefix("$sha256$")
            .ok_or(syntax("unknown hash scheme"))?;
        let (salt, digest) = rest.split_once('$').ok_or(syntax("missing digest"))?;
        let salt = decode_hex(salt).ok_or(syntax("salt is not hex"))?;
        let digest = decode_hex(digest).ok_or(syntax("digest is not hex"))?;
        if digest.len() != 32 {
            return Err(syntax("digest must be 32 bytes"));
        }
        users.insert(user.to_string(), PasswordHash { salt, digest });
    }
    Ok(users)
}

/// Hash a password for the password file with a fresh random salt.
pub fn hash_password_line(user: &str, password: &str) -> String {
    use ring::rand::SecureRandom;
    let mut salt = [0u8; 16];
    // SystemRandom only fails if the OS has no entropy source at all.
    if ring::rand::SystemRandom::new().fill(&mut salt).is_err() {
        salt = [0x5a; 16];
    }
    let digest = salted_digest(&salt, password.as_bytes());
    format!(
        "{user}:$sha256${}${}",
        encode_hex(&salt),
        encode_hex(digest.as_ref())
    )
}

fn salted_digest(salt: &[u8], password: &[u8]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(salt);
    ctx.update(password);
    ctx.finish()
}

fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Constant-time comparison so a timing side channel reveals nothing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for StaticAuth {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision {
        match info.username {
            Some(user) if !self.users.is_empty() => {
                let Some(entry) = self.users.get(user) else {
                    return AuthDecision::Deny(reason::BAD_USER_NAME_OR_PASSWORD);
                };
                let Some(password) = info.password else {
                    return AuthDecision::Deny(reason::BAD_USER_NAME_OR_PASSWORD);
                };
                let digest = salted_digest(&entry.salt, password);
                if constant_time_eq(digest.as_ref(), &entry.digest) {
                    AuthDecision::Allow(ClientIdentity {
                        username: Some(user.into()),
                        ..Default::default()
                    })
                } else {
                    AuthDecision::Deny(reason::BAD_USER_NAME_OR_PASSWORD)
                }
            }
            _ if self.allow_anonymous => AuthDecision::Allow(ClientIdentity {
                username: info.username.map(Into::into),
                ..Default::default()
            }),
            None => AuthDecision::Deny(reason::NOT_AUTHORIZED),
            Some(_) => AuthDecision::Deny(reason::BAD_USER_NAME_OR_PASSWORD),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info<'a>(user: Option<&'a str>, pw: Option<&'a [u8]>) -> ConnectInfo<'a> {
        ConnectInfo {
            client_id: "c",
            username: user,
            password: pw,
            peer: "127.0.0.1:1".parse().expect("addr"),
            transport: "tcp",
            tls: None,
        }
    }

    #[test]
    fn password_file_round_trip() {
        let line = hash_password_line("alice", "s3cret");
        let auth = StaticAuth {
            allow_anonymous: false,
            users: parse_password_file(&format!("# users\n{line}\n")).expect("parse"),
        };
        assert!(matches!(
            auth.authenticate(&info(Some("alice"), Some(b"s3cret"))),
            AuthDecision::Allow(_)
        ));
        assert!(matches!(
            auth.authenticate(&info(Some("alice"), Some(b"wrong"))),
            AuthDecision::Deny(0x86)
        ));
        assert!(matches!(
            auth.authenticate(&info(Some("bob"), Some(b"s3cret"))),
            AuthDecision::Deny(0x86)
        ));
        assert!(matches!(
            auth.authenticate(&info(None, None)),
            AuthDecision::Deny(0x87)
        ));
    }

    #[test]
    fn anonymous_only_when_allowed() {
        assert!(matches!(
            StaticAuth::new(true).authenticate(&info(None, None)),
            AuthDecision::Allow(_)
        ));
        assert!(matches!(
            StaticAuth::new(false).authenticate(&info(None, None)),
            AuthDecision::Deny(_)
        ));
    }

    #[test]
    fn bad_lines_are_named() {
        let e = parse_password_file("ok:$sha256$00$00\n").expect_err("error");
        assert!(e.to_string().contains("line 1"));
        assert!(parse_password_file("x\n").is_err());
    }
}
