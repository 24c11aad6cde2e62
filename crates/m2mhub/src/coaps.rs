//! The wiring between identity's PSK credentials and the CoAPS listener:
//! the DTLS handshake's key lookup (the sealed key opened with the master
//! key, never kept), and the check that ends a session once its key is
//! revoked, rotated or expired or its device disabled. Every lookup is
//! audited like a CONNECT (`coap.auth`): refusals always, successes once
//! per device and address per hour.

use m2mhub_coap::dtls::{PskGrant, PskStore};
use m2mhub_identity::{now_ms, PskCheck, Registry};
use m2mhub_pki::PskKeys;
use parking_lot::Mutex;
use serde_json::json;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// Successful handshakes are audited at most this often per device and
/// address.
const AUDIT_INTERVAL_MS: i64 = 3_600_000;
const AUDIT_MAP_LIMIT: usize = 100_000;

pub struct RegistryPsks {
    pub registry: Registry,
    pub keys: PskKeys,
    audited: Mutex<HashMap<(String, IpAddr), i64>>,
}

impl RegistryPsks {
    pub fn new(registry: Registry, keys: PskKeys) -> RegistryPsks {
        RegistryPsks {
            registry,
            keys,
            audited: Mutex::new(HashMap::new()),
        }
    }

    fn audit(&self, actor: &str, peer: SocketAddr, outcome: &str, why: &str) {
        if outcome == "ok" {
            let now = now_ms();
            let mut seen = self.audited.lock();
            let key = (actor.to_string(), peer.ip());
            if seen.get(&key).is_some_and(|t| now - t < AUDIT_INTERVAL_MS) {
                return;
            }
            if seen.len() >= AUDIT_MAP_LIMIT {
                seen.clear();
            }
            seen.insert(key, now);
        }
        let _ = self.registry.try_audit(
            actor,
            "coap.auth",
            actor,
            outcome,
            json!({"addr": peer.to_string(), "transport": "coaps", "method": "psk", "reason": why}),
        );
    }
}

impl PskStore for RegistryPsks {
    fn lookup(&self, identity: &[u8], peer: SocketAddr) -> Option<(Vec<u8>, PskGrant)> {
        let Ok(id) = std::str::from_utf8(identity) else {
            self.audit(
                "(binary identity)",
                peer,
                "failed",
                "the PSK identity is not UTF-8",
            );
            return None;
        };
        let id: String = id.chars().take(128).collect();
        let now = now_ms();
        match self.registry.psk_lookup(&id, now) {
            PskCheck::Valid {
                device,
                psk_id,
                sealed_key,
            } => match self.keys.open(&device.id, sealed_key.as_bytes()) {
                Ok(key) => {
                    self.registry.record_psk_use(&psk_id, now);
                    self.audit(&device.id, peer, "ok", "ok");
                    Some((
                        key,
                        PskGrant {
                            device: device.id.as_str().into(),
                            credential: psk_id.as_str().into(),
                        },
                    ))
                }
                Err(e) => {
                    tracing::error!(device = %device.id, error = %e, "a stored PSK does not open with the master key");
                    self.audit(&device.id, peer, "failed", "the stored key does not open");
                    None
                }
            },
            PskCheck::Unknown => {
                self.audit(&id, peer, "failed", "unknown PSK identity");
                None
            }
            PskCheck::Revoked => {
                self.audit(&id, peer, "denied", "revoked");
                None
            }
            PskCheck::Expired => {
                self.audit(&id, peer, "denied", "expired");
                None
            }
            PskCheck::Disabled => {
                self.audit(&id, peer, "denied", "device disabled");
                None
            }
        }
    }

    fn still_valid(&self, grant: &PskGrant) -> bool {
        self.registry.psk_still_valid(&grant.credential, now_ms())
    }
}
