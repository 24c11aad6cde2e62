//! Counters of the identity decisions taken for the broker (CONNECT
//! accepted or refused, ACL denials), kept here rather than beside the
//! broker adapter so the API can render them at `/metrics` without
//! depending on the wiring that implements the broker's auth traits.

use std::sync::atomic::AtomicU64;

#[derive(Debug, Default)]
pub struct AuthStats {
    pub connect_allowed: AtomicU64,
    pub connect_denied: AtomicU64,
    pub acl_denied: AtomicU64,
    pub audit_dropped: AtomicU64,
    pub acl_events_suppressed: AtomicU64,
}
