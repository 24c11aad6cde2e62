//! What only a networked store has: a connection that can break, nodes that
//! open one database at once, a schema written by a newer build.

mod postgres {
    use m2mhub_identity::tenant::Tenant;
    use m2mhub_identity::{RegistryError, RegistryStore};
    use m2mhub_pgstore::testing::TestDatabase;
    use m2mhub_pgstore::{PgFleetStore, PgRegistryStore};

    fn database() -> TestDatabase {
        TestDatabase::create().unwrap_or_else(|e| panic!("{e}"))
    }

    fn admin(db: &TestDatabase) -> postgres::Client {
        postgres::Client::connect(db.url().expose(), postgres::NoTls).expect("admin connection")
    }

    fn tenant(id: &str) -> Tenant {
        Tenant {
            id: id.into(),
            name: id.into(),
            created_ms: 1,
        }
    }

    #[test]
    #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
    fn a_lost_connection_fails_one_call_and_the_next_reconnects() {
        let db = database();
        let s = PgRegistryStore::open(db.url()).expect("open");
        s.insert_tenant(&tenant("t1")).expect("t1");
        // The server ends every other session of this database (a restart
        // or a failover looks the same to the client).
        admin(&db)
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .expect("terminate");
        let r = s.insert_tenant(&tenant("t2"));
        match r {
            Err(RegistryError::Storage(m)) => {
                assert!(m.contains("lost the connection"), "{m}");
                assert!(!m.contains(db.url().expose()), "no password: {m}");
            }
            other => panic!("expected a Storage error, got {other:?}"),
        }
        s.insert_tenant(&tenant("t2")).expect("reconnected");
        let ids: Vec<String> = s
            .load()
            .expect("load")
            .tenants
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, vec!["t1", "t2"]);
    }

    #[test]
    #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
    fn nodes_opening_a_fresh_database_at_once_migrate_it_once() {
        let db = database();
        std::thread::scope(|s| {
            let nodes: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let r = PgRegistryStore::open(db.url()).expect("registry");
                        let f = PgFleetStore::open(db.url()).expect("fleet");
                        (r, f)
                    })
                })
                .collect();
            for n in nodes {
                n.join().expect("a node opened");
            }
        });
        let mut c = admin(&db);
        for (schema, domain, steps) in [
            (
                "identity",
                "identity",
                m2mhub_identity::sqlite::MIGRATIONS.len(),
            ),
            ("fleet", "fleet", m2mhub_fleet::sqlite::MIGRATIONS.len()),
        ] {
            let n: i64 = c
                .query_one(
                    &format!("SELECT COUNT(*) FROM {schema}.schema_migrations WHERE domain = $1"),
                    &[&domain],
                )
                .expect("count")
                .get(0);
            assert_eq!(n, i64::try_from(steps).expect("small"), "{schema}");
        }
        let anchors: i64 = c
            .query_one("SELECT COUNT(*) FROM identity.audit_anchor", &[])
            .expect("anchors")
            .get(0);
        assert_eq!(anchors, 1);
    }

    #[test]
    #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
    fn a_schema_newer_than_the_build_is_refused() {
        let db = database();
        drop(PgFleetStore::open(db.url()).expect("open"));
        admin(&db)
            .execute(
                "INSERT INTO fleet.schema_migrations (domain, version, applied_ms) VALUES ('fleet', 999, 0)",
                &[],
            )
            .expect("a future version");
        match PgFleetStore::open(db.url()) {
            Err(RegistryError::Storage(m)) => assert!(m.contains("newer than this build"), "{m}"),
            Err(e) => panic!("expected a Storage error, got {e:?}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
    }

    /// Two nodes share one database and audit at the same time: each
    /// batch continues the one chain, which verifies whole.
    #[test]
    #[ignore = "needs PostgreSQL: scripts/postgres.sh"]
    fn nodes_auditing_at_once_keep_one_chain() {
        let db = database();
        let open = || {
            m2mhub_identity::Registry::with_store(Box::new(
                PgRegistryStore::open(db.url()).expect("open"),
            ))
            .expect("registry")
        };
        let (a, b) = (open(), open());
        let before = a.verify_audit().expect("verify").records;
        std::thread::scope(|scope| {
            for (node, r) in [("a", &a), ("b", &b)] {
                scope.spawn(move || {
                    for i in 0..50 {
                        r.audit(
                            node,
                            "test.write",
                            &format!("t{i}"),
                            "ok",
                            serde_json::json!({}),
                        )
                        .expect("audit");
                        if i % 7 == 0 {
                            r.flush().expect("flush");
                        }
                    }
                    r.flush().expect("flush");
                });
            }
        });
        for r in [&a, &b] {
            let report = r.verify_audit().expect("verify");
            assert!(report.ok, "{report:?}");
            assert_eq!(report.records, before + 100, "{report:?}");
        }
    }
}
