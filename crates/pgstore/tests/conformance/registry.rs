//! `RegistryStore`: every method, its errors, the audit chain across
//! batches, and `load()` after reopening.

use crate::backends::Backend;
use m2mhub_identity::audit::{record_hash, AuditQuery, GENESIS_HASH};
use m2mhub_identity::claim::{ClaimInfo, ClaimRecord};
use m2mhub_identity::ids::hex;
use m2mhub_identity::psk::{PskInfo, PskRecord, SealedKey};
use m2mhub_identity::store::{AuditRow, LogBatch, PskUseUpdate, SeenUpdate};
use m2mhub_identity::token::{TokenInfo, TokenRecord};
use m2mhub_identity::user::{ApiTokenInfo, ApiTokenRecord, User, UserRecord};
use m2mhub_identity::{
    CertInfo, Device, DeviceProfile, Group, Policy, Registry, RegistryError, RegistryStore, Role,
    SecurityEventRecord, SecurityKind, Tenant,
};

crate::conformance!(
    tenants_and_groups,
    devices,
    device_tokens,
    psks_and_rotation,
    certificates,
    claim_tokens,
    operators_and_api_tokens,
    policies_and_profiles,
    audit_chain_across_batches,
    security_events_seen_and_psk_use,
    registry_over_the_store_keeps_its_chain_across_reopen,
);

fn already_exists(r: Result<(), RegistryError>) {
    assert!(
        matches!(r, Err(RegistryError::AlreadyExists(_))),
        "expected AlreadyExists, got {r:?}"
    );
}

fn not_found(r: Result<(), RegistryError>) {
    assert!(
        matches!(r, Err(RegistryError::NotFound(_))),
        "expected NotFound, got {r:?}"
    );
}

pub fn device(id: &str) -> Device {
    Device {
        id: id.into(),
        name: format!("device {id}"),
        tenant: "t1".into(),
        group: Some("g1".into()),
        profile: "default".into(),
        labels: [("site".to_string(), "north".to_string())].into(),
        enabled: true,
        created_ms: 1_000,
        last_seen_ms: None,
        last_addr: None,
    }
}

fn token(id: &str, device_id: &str, b: u8) -> TokenRecord {
    TokenRecord {
        info: TokenInfo {
            id: id.into(),
            device_id: device_id.into(),
            created_ms: 5,
            expires_ms: Some(99),
            revoked: false,
        },
        hash: [b; 32],
    }
}

fn psk(id: &str, device_id: &str, identity: &str) -> PskRecord {
    PskRecord {
        info: PskInfo {
            id: id.into(),
            device_id: device_id.into(),
            identity: identity.into(),
            created_ms: 7,
            expires_ms: None,
            revoked: false,
            replaced_by: None,
            last_used_ms: None,
        },
        sealed_key: SealedKey::new(vec![1, 2, 3, 250]),
    }
}

fn cert(device_id: &str, b: u8) -> CertInfo {
    CertInfo {
        device_id: device_id.into(),
        fingerprint: [b; 32],
        serial_hex: "0a0b".into(),
        not_after_ms: 9_000,
        issuer: "CN=test".into(),
        created_ms: 8,
        revoked_ms: None,
    }
}

fn tenant_t1(s: &dyn RegistryStore) {
    s.insert_tenant(&Tenant {
        id: "t1".into(),
        name: "Tenant one".into(),
        created_ms: 1,
    })
    .expect("tenant");
}

fn tenants_and_groups(b: &dyn Backend) {
    let s = b.registry();
    tenant_t1(&*s);
    already_exists(s.insert_tenant(&Tenant {
        id: "t1".into(),
        name: "again".into(),
        created_ms: 2,
    }));
    let g = Group {
        tenant: "t1".into(),
        id: "g1".into(),
        name: "Group one".into(),
        created_ms: 3,
    };
    s.insert_group(&g).expect("group");
    already_exists(s.insert_group(&g));
    let g2 = Group {
        id: "g2".into(),
        ..g.clone()
    };
    s.insert_group(&g2).expect("second group");
    s.delete_group("t1", "g2").expect("delete");
    not_found(s.delete_group("t1", "g2"));
    not_found(s.delete_group("t2", "g1"));
    drop(s);
    let snap = b.registry().load().expect("load after reopen");
    assert_eq!(
        snap.tenants,
        vec![Tenant {
            id: "t1".into(),
            name: "Tenant one".into(),
            created_ms: 1
        }]
    );
    assert_eq!(snap.groups, vec![g]);
}

fn devices(b: &dyn Backend) {
    let s = b.registry();
    let mut d = device("d1");
    s.insert_device(&d).expect("insert");
    already_exists(s.insert_device(&d));
    d.name = "renamed".into();
    d.group = None;
    d.profile = "p2".into();
    d.labels.insert("floor".into(), "2".into());
    d.enabled = false;
    s.update_device(&d).expect("update");
    not_found(s.update_device(&device("nope")));
    s.insert_device(&device("d2")).expect("second");
    s.insert_token(&token("tk-d2", "d2", 9))
        .expect("token of d2");
    s.insert_psk(&psk("psk-d2", "d2", "id-d2"))
        .expect("psk of d2");
    s.insert_certificate(&cert("d2", 4)).expect("cert of d2");
    s.delete_device("d2", 777).expect("delete");
    not_found(s.delete_device("d2", 778));
    drop(s);
    let snap = b.registry().load().expect("load after reopen");
    assert_eq!(snap.devices, vec![d]);
    // The deleted device's tokens and PSKs went with it; its certificate
    // stays listed (for the CRL), revoked at the deletion.
    assert!(snap.tokens.is_empty(), "{:?}", snap.tokens);
    assert!(snap.psks.is_empty());
    assert_eq!(snap.certs.len(), 1);
    assert_eq!(snap.certs[0].revoked_ms, Some(777));
}

fn device_tokens(b: &dyn Backend) {
    let s = b.registry();
    s.insert_device(&device("d1")).expect("device");
    let t = token("tk1", "d1", 1);
    s.insert_token(&t).expect("insert");
    already_exists(s.insert_token(&t));
    let mut info = t.info.clone();
    info.revoked = true;
    info.expires_ms = None;
    s.update_token(&info).expect("update");
    not_found(s.update_token(&TokenInfo {
        device_id: "other".into(),
        ..info.clone()
    }));
    drop(s);
    let snap = b.registry().load().expect("load");
    assert_eq!(snap.tokens.len(), 1);
    assert_eq!(snap.tokens[0].info, info);
    assert_eq!(snap.tokens[0].hash, [1; 32]);
}

fn psks_and_rotation(b: &dyn Backend) {
    let s = b.registry();
    s.insert_device(&device("d1")).expect("device");
    let old = psk("psk-1", "d1", "ident-1");
    s.insert_psk(&old).expect("insert");
    already_exists(s.insert_psk(&old));
    // One live key per identity.
    already_exists(s.insert_psk(&psk("psk-x", "d1", "ident-1")));
    let mut revoked = old.info.clone();
    revoked.revoked = true;
    revoked.replaced_by = Some("psk-2".into());
    let new = psk("psk-2", "d1", "ident-1");
    s.rotate_psk(&revoked, &new).expect("rotate");
    // A failed rotation changes nothing (the old key is gone: NotFound).
    let ghost = PskInfo {
        id: "psk-ghost".into(),
        ..revoked.clone()
    };
    not_found(s.rotate_psk(&ghost, &psk("psk-3", "d1", "ident-3")));
    let mut updated = new.info.clone();
    updated.revoked = true;
    s.update_psk(&updated).expect("update");
    not_found(s.update_psk(&ghost));
    drop(s);
    let snap = b.registry().load().expect("load");
    let infos: Vec<&PskInfo> = snap.psks.iter().map(|p| &p.info).collect();
    // In the order written: the rotation lists after what it replaced.
    assert_eq!(infos, vec![&revoked, &updated]);
    assert_eq!(snap.psks[1].sealed_key.as_bytes(), &[1, 2, 3, 250]);
}

fn certificates(b: &dyn Backend) {
    let s = b.registry();
    let c = cert("d1", 3);
    s.insert_certificate(&c).expect("insert");
    already_exists(s.insert_certificate(&c));
    let revoked = CertInfo {
        revoked_ms: Some(42),
        ..c.clone()
    };
    s.update_certificate(&revoked).expect("update");
    not_found(s.update_certificate(&cert("d1", 4)));
    drop(s);
    assert_eq!(b.registry().load().expect("load").certs, vec![revoked]);
}

fn claim_tokens(b: &dyn Backend) {
    let s = b.registry();
    let c = ClaimRecord {
        info: ClaimInfo {
            id: "cl1".into(),
            name: "batch 7".into(),
            tenant: "t1".into(),
            group: None,
            profile: "default".into(),
            max_uses: 2,
            uses: 0,
            expires_ms: Some(10_000),
            revoked: false,
            created_ms: 6,
        },
        hash: [7; 32],
    };
    s.insert_claim(&c).expect("insert");
    already_exists(s.insert_claim(&c));
    // Another id with the same secret: the hash is unique.
    already_exists(s.insert_claim(&ClaimRecord {
        info: ClaimInfo {
            id: "cl2".into(),
            ..c.info.clone()
        },
        hash: [7; 32],
    }));
    let mut used = c.info.clone();
    used.uses = 1;
    s.redeem_claim(&used, &device("claimed-1"))
        .expect("redeem once");
    // A stale view (uses already 1 in the store) is a conflict and creates
    // no device.
    let r = s.redeem_claim(&used, &device("claimed-2"));
    assert!(matches!(r, Err(RegistryError::Conflict(_))), "{r:?}");
    used.uses = 2;
    s.redeem_claim(&used, &device("claimed-3"))
        .expect("redeem twice");
    used.uses = 3;
    let r = s.redeem_claim(&used, &device("claimed-4"));
    assert!(
        matches!(r, Err(RegistryError::Conflict(_))),
        "past max_uses: {r:?}"
    );
    let mut updated = used.clone();
    updated.uses = 2;
    updated.revoked = true;
    s.update_claim(&updated).expect("update");
    not_found(s.update_claim(&ClaimInfo {
        id: "nope".into(),
        ..updated.clone()
    }));
    drop(s);
    let snap = b.registry().load().expect("load");
    assert_eq!(snap.claims.len(), 1);
    assert_eq!(snap.claims[0].info, updated);
    assert_eq!(snap.claims[0].hash, [7; 32]);
    let mut ids: Vec<&str> = snap.devices.iter().map(|d| d.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["claimed-1", "claimed-3"]);
}

fn operators_and_api_tokens(b: &dyn Backend) {
    let s = b.registry();
    let u = UserRecord {
        user: User {
            username: "ops".into(),
            role: Role::Operator,
            tenant: Some("t1".into()),
            created_ms: 11,
        },
        password_hash: "$argon2id$v=19$x".into(),
    };
    s.insert_user(&u).expect("user");
    already_exists(s.insert_user(&u));
    let admin = UserRecord {
        user: User {
            username: "root".into(),
            role: Role::Admin,
            tenant: None,
            created_ms: 12,
        },
        password_hash: "h".into(),
    };
    s.insert_user(&admin).expect("admin");
    let mut changed = u.clone();
    changed.password_hash = "$argon2id$v=19$y".into();
    changed.user.role = Role::Viewer;
    s.update_user(&changed).expect("update");
    let mut ghost = u.clone();
    ghost.user.username = "ghost".into();
    not_found(s.update_user(&ghost));
    let api = |id: &str, user: &str, b: u8| ApiTokenRecord {
        info: ApiTokenInfo {
            id: id.into(),
            username: user.into(),
            name: "cli".into(),
            role: Role::Viewer,
            created_ms: 13,
            expires_ms: None,
            revoked: false,
        },
        hash: [b; 32],
    };
    s.insert_api_token(&api("at1", "ops", 1)).expect("token");
    already_exists(s.insert_api_token(&api("at1", "ops", 2)));
    already_exists(s.insert_api_token(&api("at9", "ops", 1)));
    s.insert_api_token(&api("at2", "root", 2))
        .expect("admin token");
    let mut revoked = api("at2", "root", 2).info;
    revoked.revoked = true;
    s.update_api_token(&revoked).expect("revoke");
    not_found(s.update_api_token(&api("nope", "root", 3).info));
    // Deleting a user deletes its tokens.
    s.delete_user("ops").expect("delete");
    not_found(s.delete_user("ops"));
    drop(s);
    let snap = b.registry().load().expect("load");
    assert_eq!(snap.users.len(), 1);
    assert_eq!(snap.users[0].user, admin.user);
    assert_eq!(snap.users[0].password_hash, "h");
    assert_eq!(snap.api_tokens.len(), 1);
    assert_eq!(snap.api_tokens[0].info, revoked);
}

fn policies_and_profiles(b: &dyn Backend) {
    let s = b.registry();
    let p = Policy {
        name: "fleet-read".into(),
        group: None,
        publish: vec![],
        subscribe: vec!["tenants/t1/broadcast".into()],
    };
    s.put_policy("t1", &p).expect("put");
    // Put again: replaced, not duplicated.
    let p2 = Policy {
        group: Some("g1".into()),
        publish: vec!["devices/{device_id}/x".into()],
        ..p.clone()
    };
    s.put_policy("t1", &p2).expect("replace");
    s.put_policy("t2", &p).expect("same name, other tenant");
    s.delete_policy("t2", "fleet-read").expect("delete");
    not_found(s.delete_policy("t2", "fleet-read"));

    let prof = DeviceProfile {
        tenant: "t1".into(),
        name: "sensor".into(),
        content_type: Some("application/json".into()),
        description: "JSON sensors".into(),
        created_ms: 14,
    };
    s.insert_profile(&prof).expect("profile");
    already_exists(s.insert_profile(&prof));
    let changed = DeviceProfile {
        content_type: None,
        description: "anything".into(),
        ..prof.clone()
    };
    s.update_profile(&changed).expect("update");
    not_found(s.update_profile(&DeviceProfile {
        name: "ghost".into(),
        ..prof.clone()
    }));
    let other = DeviceProfile {
        name: "gone".into(),
        ..prof.clone()
    };
    s.insert_profile(&other).expect("other");
    s.delete_profile("t1", "gone").expect("delete");
    not_found(s.delete_profile("t1", "gone"));
    drop(s);
    let snap = b.registry().load().expect("load");
    assert_eq!(snap.policies, vec![("t1".to_string(), p2)]);
    assert_eq!(snap.profiles, vec![changed]);
}

/// `n` chained audit rows after `(seq, hash)`.
fn chain(after: (u64, [u8; 32]), n: u64, actor: &str) -> Vec<AuditRow> {
    let (mut seq, mut prev) = after;
    (0..n)
        .map(|i| {
            seq += 1;
            let detail = format!("{{\"i\":{i}}}");
            let action = if i % 2 == 0 { "device.create" } else { "login" };
            let ts_ms = 1_000 + i64::try_from(seq).expect("small");
            let h = record_hash(&prev, seq, ts_ms, actor, action, "d1", "ok", &detail);
            let row = AuditRow {
                seq,
                ts_ms,
                actor: actor.into(),
                action: action.into(),
                target: "d1".into(),
                outcome: "ok".into(),
                detail,
                prev_hash: hex(&prev),
                hash: hex(&h),
            };
            prev = h;
            row
        })
        .collect()
}

fn audit_only(rows: &[AuditRow]) -> LogBatch<'_> {
    LogBatch {
        audit: rows,
        events: &[],
        seen: &[],
        psk_used: &[],
    }
}

fn audit_chain_across_batches(b: &dyn Backend) {
    let s = b.registry();
    assert_eq!(
        s.audit_anchor().expect("anchor"),
        (0, hex(&GENESIS_HASH)),
        "a new store is anchored at the genesis hash"
    );
    let first = chain((0, GENESIS_HASH), 3, "alice");
    s.append(&audit_only(&first)).expect("batch 1");
    let last = first.last().expect("rows");
    assert_eq!(s.audit_anchor().expect("anchor"), (3, last.hash.clone()));
    let tail = (3, m2mhub_identity::ids::unhex32(&last.hash).expect("hash"));
    let second = chain(tail, 4, "bob");
    s.append(&audit_only(&second)).expect("batch 2");
    // An empty batch leaves the anchor alone.
    s.append(&audit_only(&[])).expect("empty batch");
    let end = second.last().expect("rows").clone();
    // A batch built on a stale tail (sequence numbers already taken)...
    let stale = chain(tail, 2, "carol");
    if !b.shared() {
        // ...is refused whole, the anchor included (a shared store chains
        // it on instead: see the end of this test).
        already_exists(s.append(&audit_only(&stale)));
    }
    assert_eq!(s.audit_anchor().expect("anchor"), (7, end.hash.clone()));
    drop(s);

    let s = b.registry();
    let snap = s.load().expect("load after reopen");
    assert_eq!(snap.audit_tail.0, 7);
    assert_eq!(hex(&snap.audit_tail.1), end.hash);
    let mut seen = Vec::new();
    s.scan_audit(&mut |r| {
        seen.push(r);
        true
    })
    .expect("scan");
    let all: Vec<AuditRow> = first.iter().chain(&second).cloned().collect();
    assert_eq!(seen, all);
    // The callback stops the scan.
    let mut n = 0;
    s.scan_audit(&mut |_| {
        n += 1;
        n < 2
    })
    .expect("scan");
    assert_eq!(n, 2);

    let q = |f: fn(&mut AuditQuery)| {
        let mut q = AuditQuery::default();
        f(&mut q);
        s.list_audit(&q)
            .expect("list")
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<u64>>()
    };
    assert_eq!(q(|_| {}), vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(q(|q| q.after_seq = Some(5)), vec![6, 7]);
    assert_eq!(q(|q| q.before_seq = Some(3)), vec![1, 2]);
    assert_eq!(q(|q| q.actor = Some("bob".into())), vec![4, 5, 6, 7]);
    assert_eq!(q(|q| q.action = Some("login".into())), vec![2, 5, 7]);
    assert_eq!(
        q(|q| {
            q.newest_first = true;
            q.limit = Some(2);
        }),
        vec![7, 6]
    );
    assert_eq!(
        q(|q| {
            q.actor = Some("bob".into());
            q.action = Some("device.create".into());
            q.after_seq = Some(4);
        }),
        vec![6]
    );
    let rec = &s
        .list_audit(&AuditQuery {
            after_seq: Some(6),
            ..Default::default()
        })
        .expect("list")[0];
    assert_eq!(rec.detail, serde_json::json!({"i": 3}));
    assert_eq!(rec.hash, end.hash);
    if b.shared() {
        // ...continues the chain where the store's tail really is, so the
        // audit log stays one chain when nodes append at once.
        s.append(&audit_only(&stale))
            .expect("a stale batch continues the chain");
        let mut rows = Vec::new();
        s.scan_audit(&mut |r| {
            rows.push(r);
            true
        })
        .expect("scan");
        assert_eq!(rows.len(), 9);
        assert_eq!((rows[7].seq, rows[7].actor.as_str()), (8, "carol"));
        assert_eq!(rows[7].prev_hash, rows[6].hash);
        assert_eq!(rows[8].prev_hash, rows[7].hash);
        assert_eq!(s.audit_anchor().expect("anchor"), (9, rows[8].hash.clone()));
    }
}

fn security_events_seen_and_psk_use(b: &dyn Backend) {
    let s = b.registry();
    s.insert_device(&device("d1")).expect("device");
    s.insert_psk(&psk("psk-1", "d1", "i1")).expect("psk");
    let ev = |seq: u64| SecurityEventRecord {
        seq,
        ts_ms: 100 + i64::try_from(seq).expect("small"),
        kind: SecurityKind::NewAddress,
        device_id: Some("d1".into()),
        addr: Some("192.0.2.1".into()),
        detail: serde_json::json!({"n": seq}),
    };
    let events = [ev(1), ev(2), ev(3)];
    s.append(&LogBatch {
        audit: &[],
        events: &events,
        seen: &[
            SeenUpdate {
                device_id: "d1".into(),
                ms: 5_000,
                addr: "192.0.2.1".into(),
            },
            // A device deleted meanwhile is skipped.
            SeenUpdate {
                device_id: "gone".into(),
                ms: 5_000,
                addr: "192.0.2.9".into(),
            },
        ],
        psk_used: &[
            PskUseUpdate {
                psk_id: "psk-1".into(),
                ms: 6_000,
            },
            PskUseUpdate {
                psk_id: "gone".into(),
                ms: 6_000,
            },
        ],
    })
    .expect("append");
    assert_eq!(s.list_security_events(None, 10).expect("all"), events);
    assert_eq!(
        s.list_security_events(Some(1), 1).expect("page"),
        vec![ev(2)]
    );
    drop(s);
    let snap = b.registry().load().expect("load");
    assert_eq!(snap.security_seq, 3);
    assert_eq!(snap.devices[0].last_seen_ms, Some(5_000));
    assert_eq!(snap.devices[0].last_addr.as_deref(), Some("192.0.2.1"));
    assert_eq!(snap.psks[0].info.last_used_ms, Some(6_000));
}

/// The registry itself on the store: its audit records chain across its
/// background writer's batches and across a reopen, and verify.
fn registry_over_the_store_keeps_its_chain_across_reopen(b: &dyn Backend) {
    {
        let reg = Registry::with_store(b.registry()).expect("registry");
        for i in 0..5 {
            reg.audit(
                "alice",
                "device.create",
                &format!("d{i}"),
                "ok",
                serde_json::json!({"i": i}),
            )
            .expect("audit");
            if i == 2 {
                reg.flush().expect("flush between batches");
            }
        }
        let report = reg.verify_audit().expect("verify");
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records, 5);
    }
    let reg = Registry::with_store(b.registry()).expect("reopen");
    reg.audit("bob", "login", "bob", "ok", serde_json::json!({}))
        .expect("audit after reopen");
    let report = reg.verify_audit().expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 6);
    assert_eq!(report.anchor_seq, 6);
}
