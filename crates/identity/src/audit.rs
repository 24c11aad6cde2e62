//! The append-only, tamper-evident audit log.
//!
//! Each record carries `prev_hash` (the previous record's hash; 64 zeros
//! for the first) and `hash = SHA-256(prev_hash bytes || canonical bytes)`,
//! where the canonical bytes are the sequence number and timestamp as 8-byte
//! big-endian integers followed by actor, action, target, outcome and the
//! detail's JSON text, each as a 4-byte big-endian length and its UTF-8
//! bytes. Editing a record breaks its hash; deleting one leaves a gap in the
//! sequence and a `prev_hash` that no longer matches; cutting the tail is
//! caught by the anchor (the last sequence number and hash, kept in a
//! separate row updated with every append).
//!
//! What this does not stop: someone with write access who recomputes every
//! hash and the anchor. Exporting the anchor elsewhere (logs, a metric,
//! another system) from time to time closes that gap.

use crate::error::{RegistryError, Result};
use crate::store::{AuditRow, RegistryStore};
use crate::{now_ms, secret, Registry, AUDIT_BACKLOG_LIMIT};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The hash that precedes the first record.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// Allowed outcomes.
pub const OUTCOMES: [&str; 3] = ["ok", "denied", "failed"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

impl TryFrom<AuditRow> for AuditRecord {
    type Error = RegistryError;
    fn try_from(r: AuditRow) -> Result<AuditRecord> {
        Ok(AuditRecord {
            detail: serde_json::from_str(&r.detail)?,
            seq: r.seq,
            ts_ms: r.ts_ms,
            actor: r.actor,
            action: r.action,
            target: r.target,
            outcome: r.outcome,
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only records with a larger sequence number.
    pub after_seq: Option<u64>,
    /// Only records with a smaller sequence number (paging backwards).
    pub before_seq: Option<u64>,
    /// Defaults to 100, at most 10,000.
    pub limit: Option<usize>,
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Newest first (for "latest events" views) instead of oldest first.
    pub newest_first: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Records examined.
    pub records: u64,
    pub ok: bool,
    /// The first sequence number that is missing, edited or out of chain.
    pub first_bad_seq: Option<u64>,
    pub reason: String,
    /// The anchor's sequence number.
    pub anchor_seq: u64,
}

fn push_field(buf: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// The record hash (see the module docs for the exact bytes).
#[allow(clippy::too_many_arguments)]
pub fn record_hash(
    prev: &[u8; 32],
    seq: u64,
    ts_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    outcome: &str,
    detail: &str,
) -> [u8; 32] {
    let mut buf = Vec::with_capacity(
        32 + 16 + 20 + actor.len() + action.len() + target.len() + outcome.len() + detail.len(),
    );
    buf.extend_from_slice(prev);
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(&ts_ms.to_be_bytes());
    for f in [actor, action, target, outcome, detail] {
        push_field(&mut buf, f);
    }
    secret::sha256(&buf)
}

fn row_hash(r: &AuditRow, prev: &[u8; 32]) -> [u8; 32] {
    record_hash(
        prev, r.seq, r.ts_ms, &r.actor, &r.action, &r.target, &r.outcome, &r.detail,
    )
}

/// Walk the chain in the store and compare its end with the anchor.
pub(crate) fn verify_store(store: &dyn RegistryStore) -> Result<AuditReport> {
    let mut expected_seq = 1u64;
    let mut prev = GENESIS_HASH;
    let mut records = 0u64;
    let mut bad: Option<(u64, String)> = None;
    store.scan_audit(&mut |r: AuditRow| {
        records += 1;
        if r.seq != expected_seq {
            bad = Some(if r.seq > expected_seq {
                (
                    expected_seq,
                    format!("record {expected_seq} is missing (next is {})", r.seq),
                )
            } else {
                (r.seq, format!("record {} is out of order", r.seq))
            });
            return false;
        }
        if r.prev_hash != secret::hex(&prev) {
            bad = Some((
                r.seq,
                format!(
                    "record {} does not follow the previous record (prev_hash mismatch)",
                    r.seq
                ),
            ));
            return false;
        }
        let h = row_hash(&r, &prev);
        if secret::hex(&h) != r.hash {
            bad = Some((
                r.seq,
                format!("record {} was altered (hash mismatch)", r.seq),
            ));
            return false;
        }
        prev = h;
        expected_seq += 1;
        true
    })?;
    let (anchor_seq, anchor_hash) = store.audit_anchor()?;
    let last = expected_seq - 1;
    if bad.is_none() {
        if anchor_seq > last {
            bad = Some((
                last + 1,
                format!(
                    "the log ends at record {last} but the anchor says {anchor_seq}: records were removed from the end"
                ),
            ));
        } else if anchor_seq < last {
            bad = Some((
                anchor_seq + 1,
                format!("records after the anchor ({anchor_seq}) were added outside the registry"),
            ));
        } else if anchor_hash != secret::hex(&prev) {
            bad = Some((
                last.max(1),
                "the last record does not match the anchor's hash".into(),
            ));
        }
    }
    Ok(match bad {
        None => AuditReport {
            records,
            ok: true,
            first_bad_seq: None,
            reason: format!("{records} records, chain intact"),
            anchor_seq,
        },
        Some((seq, reason)) => AuditReport {
            records,
            ok: false,
            first_bad_seq: Some(seq),
            reason,
            anchor_seq,
        },
    })
}

impl Registry {
    /// Append an audit record and return its sequence number. The sequence
    /// number and hash are assigned now, in order; the write happens on the
    /// background writer (so this is cheap enough for every auth event),
    /// except when the backlog is very large, when it writes synchronously.
    pub fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: serde_json::Value,
    ) -> Result<u64> {
        let seq = self.append_audit(actor, action, target, outcome, &detail)?;
        if self.audit_backlog() > AUDIT_BACKLOG_LIMIT {
            self.flush()?;
        }
        Ok(seq)
    }

    /// Like [`Registry::audit`] but never blocks on storage: when the backlog
    /// is over its limit the record is not written and `None` is returned,
    /// so a caller on a connection's hot path can count the drop instead.
    pub fn try_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: serde_json::Value,
    ) -> Option<u64> {
        if self.audit_backlog() > AUDIT_BACKLOG_LIMIT {
            return None;
        }
        self.append_audit(actor, action, target, outcome, &detail)
            .ok()
    }

    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: &serde_json::Value,
    ) -> Result<u64> {
        if !OUTCOMES.contains(&outcome) {
            return Err(RegistryError::Validation(format!(
                "audit outcome must be one of {OUTCOMES:?}"
            )));
        }
        if action.is_empty() {
            return Err(RegistryError::Validation("audit action is empty".into()));
        }
        let detail = serde_json::to_string(detail)?;
        let s = &*self.shared;
        let mut q = s.log.lock();
        let seq = q.last_seq + 1;
        let ts_ms = now_ms();
        let hash = record_hash(
            &q.last_hash,
            seq,
            ts_ms,
            actor,
            action,
            target,
            outcome,
            &detail,
        );
        let row = AuditRow {
            seq,
            ts_ms,
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            outcome: outcome.into(),
            detail,
            prev_hash: secret::hex(&q.last_hash),
            hash: secret::hex(&hash),
        };
        q.audit.push(row);
        q.audit_appended += 1;
        q.last_seq = seq;
        q.last_hash = hash;
        if q.audit.len() == 1 {
            s.wake.notify_one();
        }
        Ok(seq)
    }

    pub fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        self.flush()?;
        self.shared.store.list_audit(q)
    }

    /// Verify the whole chain against the anchor.
    pub fn verify_audit(&self) -> Result<AuditReport> {
        self.flush()?;
        verify_store(self.shared.store.as_ref())
    }

    /// Verify the audit log of a data directory without opening the
    /// registry (read-only; for `m2mhub audit verify --data-dir`).
    pub fn verify_audit_at(dir: &Path) -> Result<AuditReport> {
        let path = dir.join("registry.db");
        if !path.exists() {
            return Err(RegistryError::NotFound(format!("{}", path.display())));
        }
        let store = crate::sqlite::SqliteStore::open_read_only(&path)?;
        verify_store(&store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Once `audit_durable` returns for a mark, every record queued before
    /// it is in the database file: another connection reads it there (as a
    /// restart after `kill -9` would), without waiting for the background
    /// writer.
    #[test]
    fn a_durable_mark_is_in_the_file() {
        let (dir, reg) = crate::testutil::open();
        let before = reg.audit_mark();
        reg.audit_durable(before).expect("nothing to wait for");
        for i in 0..50 {
            reg.audit("admin", "device.create", &format!("d{i}"), "ok", json!({}))
                .expect("audit");
        }
        let mark = reg.audit_mark();
        assert_eq!(mark, before + 50);
        reg.audit_durable(mark).expect("durable");
        let other = crate::sqlite::SqliteStore::open_read_only(&dir.path().join("registry.db"))
            .expect("second connection");
        let found = crate::store::RegistryStore::list_audit(
            &other,
            &AuditQuery {
                limit: Some(1000),
                ..Default::default()
            },
        )
        .expect("list");
        for i in 0..50 {
            let target = format!("d{i}");
            assert!(
                found.iter().any(|r| r.target == target),
                "{target} not in the file"
            );
        }
    }

    fn filled(n: u64) -> (tempfile::TempDir, Registry) {
        let (d, reg) = crate::testutil::open();
        for i in 1..=n {
            let seq = reg
                .audit(
                    "admin",
                    "device.create",
                    &format!("dev-{i}"),
                    "ok",
                    json!({ "i": i, "z": [1, 2], "a": "x" }),
                )
                .expect("audit");
            assert_eq!(seq, i);
        }
        (d, reg)
    }

    fn sql(dir: &Path, stmt: &str) {
        let c = rusqlite::Connection::open(dir.join("registry.db")).expect("open db");
        c.execute(stmt, []).expect("tamper");
    }

    #[test]
    fn chain_verifies_and_lists() {
        let (d, reg) = filled(50);
        let r = reg.verify_audit().expect("verify");
        assert!(r.ok, "{r:?}");
        assert_eq!(r.records, 50);
        assert_eq!(r.anchor_seq, 50);
        let page = reg
            .list_audit(&AuditQuery {
                after_seq: Some(10),
                limit: Some(5),
                ..Default::default()
            })
            .expect("list");
        assert_eq!(
            page.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![11, 12, 13, 14, 15]
        );
        assert_eq!(page[0].detail["i"], 11);
        assert_eq!(page[1].prev_hash, page[0].hash);
        let newest = reg
            .list_audit(&AuditQuery {
                limit: Some(2),
                newest_first: true,
                ..Default::default()
            })
            .expect("list");
        assert_eq!(
            newest.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![50, 49]
        );
        reg.audit("bob", "user.login", "bob", "denied", json!({}))
            .expect("audit");
        let bob = reg
            .list_audit(&AuditQuery {
                actor: Some("bob".into()),
                ..Default::default()
            })
            .expect("list");
        assert_eq!(bob.len(), 1);
        let by_action = reg
            .list_audit(&AuditQuery {
                action: Some("user.login".into()),
                ..Default::default()
            })
            .expect("list");
        assert_eq!(by_action.len(), 1);
        assert!(reg.audit("x", "y", "z", "maybe", json!(null)).is_err());
        drop(reg);
        // The chain continues across a reopen.
        let reg = Registry::open(d.path()).expect("reopen");
        assert_eq!(reg.audit("a", "b", "c", "ok", json!(1)).expect("audit"), 52);
        assert!(reg.verify_audit().expect("verify").ok);
        drop(reg);
        let off = Registry::verify_audit_at(d.path()).expect("offline");
        assert!(off.ok && off.records == 52, "{off:?}");
    }

    #[test]
    fn edited_record_is_detected() {
        let (d, reg) = filled(20);
        reg.flush().expect("flush");
        sql(
            d.path(),
            "UPDATE audit_log SET detail = '{\"i\":999}' WHERE seq = 7",
        );
        let r = reg.verify_audit().expect("verify");
        assert!(!r.ok);
        assert_eq!(r.first_bad_seq, Some(7), "{r:?}");
        drop(reg);
        assert_eq!(
            Registry::verify_audit_at(d.path())
                .expect("offline")
                .first_bad_seq,
            Some(7)
        );
    }

    #[test]
    fn deleted_middle_record_is_detected() {
        let (d, reg) = filled(20);
        reg.flush().expect("flush");
        sql(d.path(), "DELETE FROM audit_log WHERE seq = 12");
        let r = reg.verify_audit().expect("verify");
        assert!(!r.ok);
        assert_eq!(r.first_bad_seq, Some(12), "{r:?}");
    }

    #[test]
    fn deleted_middle_record_with_renumbering_is_detected() {
        let (d, reg) = filled(20);
        reg.flush().expect("flush");
        sql(d.path(), "DELETE FROM audit_log WHERE seq = 12");
        sql(
            d.path(),
            "UPDATE audit_log SET seq = seq - 1 WHERE seq > 12",
        );
        let r = reg.verify_audit().expect("verify");
        assert!(!r.ok);
        assert_eq!(r.first_bad_seq, Some(12), "{r:?}");
    }

    #[test]
    fn truncated_tail_is_detected() {
        let (d, reg) = filled(20);
        reg.flush().expect("flush");
        sql(d.path(), "DELETE FROM audit_log WHERE seq = 20");
        let r = reg.verify_audit().expect("verify");
        assert!(!r.ok);
        assert_eq!(r.first_bad_seq, Some(20), "{r:?}");
        drop(reg);
        let r = Registry::verify_audit_at(d.path()).expect("offline");
        assert_eq!(r.first_bad_seq, Some(20), "{r:?}");
    }

    #[test]
    fn truncation_stays_visible_after_reopen_and_append() {
        let (d, reg) = filled(10);
        drop(reg);
        sql(d.path(), "DELETE FROM audit_log WHERE seq = 10");
        let reg = Registry::open(d.path()).expect("reopen");
        assert_eq!(reg.audit("a", "b", "c", "ok", json!(1)).expect("audit"), 11);
        let r = reg.verify_audit().expect("verify");
        assert_eq!(r.first_bad_seq, Some(10), "{r:?}");
    }

    #[test]
    fn deleted_first_record_is_detected() {
        let (d, reg) = filled(5);
        reg.flush().expect("flush");
        sql(d.path(), "DELETE FROM audit_log WHERE seq = 1");
        assert_eq!(reg.verify_audit().expect("verify").first_bad_seq, Some(1));
    }

    #[test]
    fn concurrent_appends_keep_the_chain() {
        let (_d, reg) = crate::testutil::open();
        std::thread::scope(|s| {
            for t in 0..4 {
                let reg = reg.clone();
                s.spawn(move || {
                    for i in 0..250 {
                        reg.audit(&format!("t{t}"), "x", &i.to_string(), "ok", json!({}))
                            .expect("audit");
                    }
                });
            }
        });
        let r = reg.verify_audit().expect("verify");
        assert!(r.ok && r.records == 1000, "{r:?}");
    }

    #[test]
    fn empty_log_verifies() {
        let (_d, reg) = crate::testutil::open();
        let r = reg.verify_audit().expect("verify");
        assert!(r.ok && r.records == 0, "{r:?}");
    }
}
