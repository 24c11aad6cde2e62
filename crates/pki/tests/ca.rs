//! Device CA behaviour, checked with the verifiers the TLS listener uses.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use m2mhub_pki::{make_csr, parse_pem_certs, DeviceCa, Error, MasterKey};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
    UnixTime,
};
use x509_parser::extensions::GeneralName;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for der in parse_pem_certs(ca_pem).unwrap() {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    Arc::new(roots)
}

fn client_verifier(ca_pem: &str, crls: Vec<String>) -> Arc<dyn ClientCertVerifier> {
    let crls = crls
        .iter()
        .map(|pem| CertificateRevocationListDer::from(pem::parse(pem).unwrap().into_contents()))
        .collect::<Vec<_>>();
    WebPkiClientVerifier::builder_with_provider(roots(ca_pem), provider())
        .with_crls(crls)
        .build()
        .unwrap()
}

fn verify_client(ca_pem: &str, crls: Vec<String>, der: &[u8]) -> Result<(), rustls::Error> {
    client_verifier(ca_pem, crls)
        .verify_client_cert(&CertificateDer::from(der.to_vec()), &[], UnixTime::now())
        .map(|_| ())
}

fn new_ca(dir: &Path) -> (DeviceCa, MasterKey) {
    let key = MasterKey::generate().unwrap();
    let (ca, created) = DeviceCa::load_or_create(dir, &key).unwrap();
    assert!(created);
    (ca, key)
}

fn key_der(pem_text: &str) -> PrivateKeyDer<'static> {
    let block = pem::parse(pem_text).unwrap();
    assert_eq!(block.tag(), "PRIVATE KEY");
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(block.into_contents()))
}

fn certs(pem_text: &str) -> Vec<CertificateDer<'static>> {
    parse_pem_certs(pem_text)
        .unwrap()
        .into_iter()
        .map(CertificateDer::from)
        .collect()
}

/// Runs a TLS handshake in memory between a server requiring client
/// certificates from `ca_pem` and a client presenting `client_chain`.
fn handshake(
    server_chain: &str,
    server_key: &str,
    ca_pem: &str,
    crls: Vec<String>,
    client_chain: &str,
    client_key: &str,
) -> Result<(), rustls::Error> {
    let server_config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier(ca_pem, crls))
        .with_single_cert(certs(server_chain), key_der(server_key))
        .unwrap();
    let client_config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca_pem))
        .with_client_auth_cert(certs(client_chain), key_der(client_key))
        .unwrap();
    let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
    let mut client = ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    client.writer().write_all(b"ping").unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        server.read_tls(&mut buf.as_slice()).unwrap();
        server.process_new_packets()?;
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        client.read_tls(&mut buf.as_slice()).unwrap();
        client.process_new_packets()?;
        let mut got = [0u8; 4];
        if !server.is_handshaking() {
            if let Ok(4) = server.reader().read(&mut got) {
                assert_eq!(&got, b"ping");
                return Ok(());
            }
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn device_ca_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<DeviceCa>();
    check::<MasterKey>();
}

#[test]
fn ca_is_created_once_and_reloaded_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, key) = new_ca(dir.path());
    let on_disk = std::fs::read_to_string(dir.path().join("pki/ca.pem")).unwrap();
    assert_eq!(ca.ca_pem(), on_disk);
    let sealed = std::fs::read(dir.path().join("pki/ca.key.enc")).unwrap();
    assert!(sealed.starts_with(b"M2MKEY1\n"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("pki/ca.key.enc"), 0o600);
        assert_eq!(mode("pki"), 0o700);
    }

    let (again, created) = DeviceCa::load_or_create(dir.path(), &key).unwrap();
    assert!(!created);
    assert_eq!(again.ca_pem(), ca.ca_pem());
    assert_eq!(
        std::fs::read(dir.path().join("pki/ca.key.enc")).unwrap(),
        sealed
    );

    // The CA's own certificate says what it is.
    let (_, x509) = x509_parser::parse_x509_certificate(ca.ca_der()).unwrap();
    let cn = x509.subject().iter_common_name().next().unwrap();
    assert!(cn.as_str().unwrap().starts_with("m2mhub device CA "));
    let bc = x509.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    let ku = x509.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let years = (x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp())
        / (365 * 86400);
    assert_eq!(years, 10);

    // Certificates issued by the reloaded CA chain to the original ca.pem,
    // and vice versa.
    let (cert, _) = again.issue_with_key("dev-1", 30).unwrap();
    verify_client(&ca.ca_pem(), vec![], &cert.der).unwrap();
    let (cert, _) = ca.issue_with_key("dev-2", 30).unwrap();
    verify_client(&again.ca_pem(), vec![], &cert.der).unwrap();
}

#[test]
fn wrong_master_key_on_reload_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    new_ca(dir.path());
    let other = MasterKey::generate().unwrap();
    let err = DeviceCa::load_or_create(dir.path(), &other).unwrap_err();
    assert!(matches!(err, Error::WrongMasterKey { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(
            "the master key does not decrypt the CA key: set M2MHUB_MASTER_KEY to the key used \
             when the data directory was created"
        ),
        "{err}"
    );
}

#[test]
fn damaged_pki_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = new_ca(dir.path());
    let key_path = dir.path().join("pki/ca.key.enc");
    let sealed = std::fs::read(&key_path).unwrap();

    std::fs::write(&key_path, b"junk").unwrap();
    assert!(matches!(
        DeviceCa::load_or_create(dir.path(), &key),
        Err(Error::Corrupt { .. })
    ));
    std::fs::remove_file(&key_path).unwrap();
    assert!(matches!(
        DeviceCa::load_or_create(dir.path(), &key),
        Err(Error::Corrupt { .. })
    ));
    // Another CA's key sealed under the same master key does not match ca.pem.
    let other = tempfile::tempdir().unwrap();
    DeviceCa::load_or_create(other.path(), &key).unwrap();
    std::fs::copy(other.path().join("pki/ca.key.enc"), &key_path).unwrap();
    assert!(matches!(
        DeviceCa::load_or_create(dir.path(), &key),
        Err(Error::Corrupt { .. })
    ));
    std::fs::write(&key_path, &sealed).unwrap();
    std::fs::write(dir.path().join("pki/ca.pem"), b"not pem").unwrap();
    assert!(matches!(
        DeviceCa::load_or_create(dir.path(), &key),
        Err(Error::Corrupt { .. })
    ));

    // A key without ca.pem is an interrupted first start: start over.
    std::fs::remove_file(dir.path().join("pki/ca.pem")).unwrap();
    let (_, created) = DeviceCa::load_or_create(dir.path(), &key).unwrap();
    assert!(created);
}

#[test]
fn csr_is_issued_with_the_registry_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path());
    let (csr, _key) = make_csr("i-am-admin").unwrap();
    let cert = ca.issue_from_csr("sensor-42", &csr, 90).unwrap();

    verify_client(&ca.ca_pem(), vec![], &cert.der).unwrap();
    assert_eq!(parse_pem_certs(&cert.pem).unwrap(), vec![cert.der.clone()]);
    assert_eq!(cert.fingerprint, m2mhub_pki::fingerprint(&cert.der));
    assert_eq!(cert.serial.len(), 16);
    assert_eq!(cert.serial_hex.len(), 32);

    let (_, x509) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
    let cns: Vec<_> = x509
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap().to_string())
        .collect();
    assert_eq!(cns, ["sensor-42"]);
    assert_eq!(x509.raw_serial(), cert.serial.as_slice());
    let san = x509.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        [GeneralName::URI("urn:m2mhub:device:sensor-42")]
    );
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(
        x509.validity().not_after.timestamp() * 1000,
        cert.not_after_ms
    );
    let days = (x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp())
        as f64
        / 86400.0;
    assert!((90.0..90.1).contains(&days), "{days}");

    // Names and usages the CSR asks for are ignored too.
    let csr_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["admin.example.com".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let greedy = params.serialize_request(&csr_key).unwrap().pem().unwrap();
    let cert2 = ca.issue_from_csr("sensor-43", &greedy, 1).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&cert2.der).unwrap();
    let san = x509.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        [GeneralName::URI("urn:m2mhub:device:sensor-43")]
    );
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!x509.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(x509.public_key().raw, csr_key.public_key_der().as_slice());

    // A certificate from another CA is rejected.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = new_ca(other_dir.path());
    let foreign = other.issue_from_csr("sensor-42", &csr, 90).unwrap();
    assert!(verify_client(&ca.ca_pem(), vec![], &foreign.der).is_err());
}

#[test]
fn bad_csrs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path());
    let (csr, _) = make_csr("dev").unwrap();
    let mut der = pem::parse(&csr).unwrap().into_contents();
    // The signature is the last field: flip a bit in its last byte.
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let bad = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    assert!(matches!(
        ca.issue_from_csr("dev", &bad, 30),
        Err(Error::CsrSignature)
    ));
    assert!(matches!(
        ca.issue_from_csr("dev", "not a pem", 30),
        Err(Error::InvalidCsr(_))
    ));
    assert!(matches!(
        ca.issue_from_csr("dev", &ca.ca_pem(), 30),
        Err(Error::InvalidCsr(_))
    ));
    assert!(matches!(
        ca.issue_from_csr(
            "dev",
            &pem::encode(&pem::Pem::new(
                "CERTIFICATE REQUEST",
                vec![0x30, 0x03, 1, 2, 3]
            )),
            30
        ),
        Err(Error::InvalidCsr(_))
    ));
    assert!(matches!(
        ca.issue_from_csr("bad id", &csr, 30),
        Err(Error::InvalidDeviceId(_))
    ));
    assert!(matches!(
        ca.issue_from_csr("", &csr, 30),
        Err(Error::InvalidDeviceId(_))
    ));
    assert!(matches!(
        ca.issue_from_csr("dev", &csr, 0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn odd_device_ids_are_percent_encoded_in_the_urn() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path());
    let (cert, _) = ca.issue_with_key("plant/7#a", 1).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
    let san = x509.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        [GeneralName::URI("urn:m2mhub:device:plant%2F7%23a")]
    );
}

#[test]
fn issued_keys_complete_a_mutual_tls_handshake_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, key) = new_ca(dir.path());
    let (server_chain, server_key) = ca.server_identity(dir.path(), &key, &[]).unwrap();
    let (cert, device_key) = ca.issue_with_key("dev-7", 30).unwrap();

    handshake(
        &server_chain,
        &server_key,
        &ca.ca_pem(),
        vec![],
        &cert.pem,
        &device_key,
    )
    .unwrap();

    // Device from a CSR, using the key that made the CSR.
    let (csr, csr_key) = make_csr("whatever").unwrap();
    let from_csr = ca.issue_from_csr("dev-8", &csr, 30).unwrap();
    handshake(
        &server_chain,
        &server_key,
        &ca.ca_pem(),
        vec![],
        &from_csr.pem,
        &csr_key,
    )
    .unwrap();

    // Revoked: the listener's verifier, loaded with the CRL, refuses it; an
    // unrevoked certificate still passes.
    let crl = ca
        .crl_pem(&[(cert.serial.clone(), 1_700_000_000_000)], 24)
        .unwrap();
    let err = handshake(
        &server_chain,
        &server_key,
        &ca.ca_pem(),
        vec![crl.clone()],
        &cert.pem,
        &device_key,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("Revoked"), "{err:?}");
    verify_client(&ca.ca_pem(), vec![crl], &from_csr.der).unwrap();

    // A device certificate from another CA is refused by the handshake.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = new_ca(other_dir.path());
    let (foreign, foreign_key) = other.issue_with_key("dev-7", 30).unwrap();
    assert!(handshake(
        &server_chain,
        &server_key,
        &ca.ca_pem(),
        vec![],
        &foreign.pem,
        &foreign_key,
    )
    .is_err());
}

#[test]
fn crl_lists_the_revoked_serials() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path());
    let a = ca.issue_with_key("a", 10).unwrap().0;
    let b = ca.issue_with_key("b", 10).unwrap().0;
    let crl_pem = ca
        .crl_pem(
            &[
                (a.serial.clone(), 1_700_000_000_000),
                (b.serial.clone(), 1_700_000_123_456),
            ],
            6,
        )
        .unwrap();
    let block = pem::parse(&crl_pem).unwrap();
    assert_eq!(block.tag(), "X509 CRL");
    let (_, crl) = x509_parser::parse_x509_crl(block.contents()).unwrap();
    let listed: Vec<(Vec<u8>, i64)> = crl
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.revocation_date.timestamp()))
        .collect();
    assert_eq!(
        listed,
        [(a.serial, 1_700_000_000), (b.serial, 1_700_000_123)]
    );
    let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.ca_der()).unwrap();
    crl.verify_signature(ca_x509.public_key()).unwrap();
    assert_eq!(crl.issuer(), ca_x509.subject());
    let next = crl.next_update().unwrap().timestamp() - crl.last_update().timestamp();
    assert_eq!(next, 6 * 3600);

    // An empty CRL is valid too, and bad input is an error, not a panic.
    let empty = ca.crl_pem(&[], 1).unwrap();
    let empty = pem::parse(&empty).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(empty.contents()).unwrap();
    assert_eq!(crl.iter_revoked_certificates().count(), 0);
    assert!(ca.crl_pem(&[], 0).is_err());
    assert!(ca.crl_pem(&[(vec![], 0)], 1).is_err());
    assert!(ca.crl_pem(&[(vec![1], i64::MAX)], 1).is_err());
}

#[test]
fn server_identity_is_reused_and_renewed_when_names_change() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, key) = new_ca(dir.path());
    let names = vec!["mqtt.example.com".to_string(), "10.0.0.5".to_string()];
    let (chain, server_key) = ca.server_identity(dir.path(), &key, &names).unwrap();
    let ders = parse_pem_certs(&chain).unwrap();
    assert_eq!(ders.len(), 2);
    assert_eq!(ders[1], ca.ca_der());

    let verifier = WebPkiServerVerifier::builder_with_provider(roots(&ca.ca_pem()), provider())
        .build()
        .unwrap();
    for name in [
        "localhost",
        "127.0.0.1",
        "::1",
        "mqtt.example.com",
        "10.0.0.5",
    ] {
        verifier
            .verify_server_cert(
                &CertificateDer::from(ders[0].clone()),
                &[],
                &ServerName::try_from(name).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(verifier
        .verify_server_cert(
            &CertificateDer::from(ders[0].clone()),
            &[],
            &ServerName::try_from("other.example.com").unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_err());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir.path().join("pki/server.key.enc")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    // Same names (in another order and case): reused, even after a reload.
    let (ca2, _) = DeviceCa::load_or_create(dir.path(), &key).unwrap();
    let again = ca2
        .server_identity(
            dir.path(),
            &key,
            &["10.0.0.5".into(), "MQTT.example.com".into()],
        )
        .unwrap();
    assert_eq!(again, (chain.clone(), server_key.clone()));
    // A subset of the names is covered too.
    assert_eq!(ca2.server_identity(dir.path(), &key, &[]).unwrap().0, chain);

    // A new name: a new certificate.
    let renewed = ca2
        .server_identity(dir.path(), &key, &["broker.local".into()])
        .unwrap();
    assert_ne!(renewed.0, chain);
    assert_ne!(renewed.1, server_key);

    // A server certificate from another CA (data directory swapped) is replaced.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = new_ca(other_dir.path());
    std::fs::copy(
        dir.path().join("pki/server.pem"),
        other_dir.path().join("pki/server.pem"),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("pki/server.key.enc"),
        other_dir.path().join("pki/server.key.enc"),
    )
    .unwrap();
    let (other_chain, _) = other.server_identity(other_dir.path(), &key, &[]).unwrap();
    assert_eq!(parse_pem_certs(&other_chain).unwrap()[1], other.ca_der());
    assert_ne!(parse_pem_certs(&other_chain).unwrap()[0], ders[0]);

    assert!(matches!(
        ca.server_identity(dir.path(), &key, &["bad name!".into()]),
        Err(Error::InvalidName(_))
    ));
}

#[test]
fn pem_bundles_are_parsed_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path());
    let (cert, key_pem) = ca.issue_with_key("x", 1).unwrap();
    let bundle = format!("{}\n{}", cert.pem, ca.ca_pem());
    assert_eq!(
        parse_pem_certs(&bundle).unwrap(),
        vec![cert.der.clone(), ca.ca_der().to_vec()]
    );
    assert!(parse_pem_certs("").is_err());
    assert!(parse_pem_certs("hello").is_err());
    assert!(parse_pem_certs(&key_pem).is_err());
    let not_x509 = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
    assert!(matches!(
        parse_pem_certs(&not_x509),
        Err(Error::InvalidPem(_))
    ));
}

/// CSRs made by OpenSSL (checked in, so the test needs no openssl binary): an
/// RSA key asking for CA powers and a DNS name, and a P-384 key. Both are
/// issued as plain device certificates for the registry's id.
#[test]
fn openssl_csrs_are_accepted_and_their_requests_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = new_ca(dir.path());
    for (file, id) in [
        ("openssl-rsa-with-extensions.csr", "rsa-device"),
        ("openssl-p384.csr", "p384-device"),
    ] {
        let csr = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(file),
        )
        .unwrap();
        let cert = ca
            .issue_from_csr(id, &csr, 7)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        verify_client(&ca.ca_pem(), vec![], &cert.der).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
        let cn = x509.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), id);
        assert_eq!(x509.subject().iter_organization().count(), 0);
        assert!(!x509.basic_constraints().unwrap().unwrap().value.ca);
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 1);
    }
}
