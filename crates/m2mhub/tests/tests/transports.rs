//! MQTT over TLS (server authentication and mutual TLS) and over WebSocket.

use crate::common::*;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use mqtt_codec::{decode, Packet, Protocol, QoS};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(
    trust: &CertificateDer<'static>,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).expect("trust anchor");
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(vec![cert], key)
            .expect("client cert"),
        None => b.with_no_client_auth(),
    })
}

fn key_der(k: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()))
}

fn write(dir: &Path, name: &str, pem: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, pem).expect("write PEM");
    p.display().to_string()
}

/// TLS handshake, then MQTT CONNECT; returns the CONNACK reason code, or
/// None if the TLS session or the connection failed first.
async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    client_id: &str,
) -> Option<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("TCP");
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").expect("name");
    let tls = within("TLS handshake", connector.connect(name, tcp))
        .await
        .ok()?;
    let mut raw = Raw::over(Box::new(tls), Protocol::V5);
    let connect = bytes_of(&Packet::Connect(Box::new(v5(client_id))), Protocol::V5);
    if !raw.try_send_raw(&connect).await {
        return None;
    }
    match raw.next(WAIT).await {
        Next::Packet(Packet::ConnAck(a)) => Some(a.reason_code),
        Next::Packet(other) => panic!("expected CONNACK, got {other:?}"),
        Next::Closed => None,
        Next::Timeout => panic!("no answer over TLS"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_accepts_mqtt_with_a_self_signed_certificate() {
    let pems = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = write(pems.path(), "cert.pem", &ck.cert.pem());
    let key = write(pems.path(), "key.pem", &ck.key_pair.serialize_pem());
    let srv = TestServer::with(|s| {
        s.mqtt.tls_cert = cert;
        s.mqtt.tls_key = key;
    })
    .await;
    let mqtts = srv.get().mqtts_addr.expect("TLS listener");
    let code = tls_connect(mqtts, client_config(ck.cert.der(), None), "tls-1").await;
    assert_eq!(code, Some(0), "CONNACK success over TLS");

    // A full round trip over TLS, to a plain TCP subscriber.
    let (mut sub, _) = Raw::connect_ok(srv.mqtt(), v5("tls-sub")).await;
    sub.subscribe(1, "tls/t", QoS::AtLeastOnce).await;
    let tcp = tokio::net::TcpStream::connect(mqtts).await.expect("TCP");
    let tls = tokio_rustls::TlsConnector::from(client_config(ck.cert.der(), None))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS");
    let mut p = Raw::over(Box::new(tls), Protocol::V5);
    assert_eq!(p.handshake(v5("tls-pub")).await.reason_code, 0);
    p.publish(publish("tls/t", QoS::AtLeastOnce, 1, "secret"))
        .await;
    assert_eq!(text(&sub.recv_publish().await), "secret");

    // A client that does not trust the certificate fails the handshake.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    assert_eq!(
        tls_connect(
            mqtts,
            client_config(other.cert.der(), None),
            "tls-untrusted"
        )
        .await,
        None
    );
}

struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = p.self_signed(&ca_key).expect("CA cert");
        Pki { ca_cert, ca_key }
    }

    fn issue(&self, cn: &str, server: bool) -> (rcgen::Certificate, KeyPair) {
        self.issue_numbered(cn, server, None)
    }

    /// [`Pki::issue`] with a chosen serial number (for a CRL to name).
    fn issue_numbered(
        &self,
        cn: &str,
        server: bool,
        serial: Option<u64>,
    ) -> (rcgen::Certificate, KeyPair) {
        let sans = if server {
            vec!["localhost".to_string()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.serial_number = serial.map(rcgen::SerialNumber::from);
        let key = KeyPair::generate().expect("key");
        let cert = p
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign");
        (cert, key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_signed_by_the_ca() {
    let pems = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("m2mhub test CA");
    let (server_cert, server_key) = pki.issue("localhost", true);
    let cert = write(pems.path(), "server.pem", &server_cert.pem());
    let key = write(pems.path(), "server-key.pem", &server_key.serialize_pem());
    let ca = write(pems.path(), "ca.pem", &pki.ca_cert.pem());
    let srv = TestServer::with(|s| {
        s.mqtt.tls_cert = cert;
        s.mqtt.tls_key = key;
        s.mqtt.tls_client_ca = ca;
        s.mqtt.allow_anonymous = false;
        s.mqtt.accept_unregistered_certs = true;
    })
    .await;
    srv.get()
        .registry
        .create_device(m2mhub_identity::NewDevice {
            id: Some("device-1".into()),
            ..Default::default()
        })
        .expect("device");
    let mqtts = srv.get().mqtts_addr.expect("TLS listener");
    let trust = pki.ca_cert.der().clone();

    // No client certificate and no credentials: TLS works (token devices
    // share the listener) but the CONNECT is refused.
    assert_eq!(
        tls_connect(mqtts, client_config(&trust, None), "mtls-none").await,
        Some(0x87),
        "a client without a certificate or credentials must be refused"
    );
    // A certificate from another CA: refused.
    let rogue = Pki::new("rogue CA");
    let (rc, rk) = rogue.issue("device-rogue", false);
    assert_eq!(
        tls_connect(
            mqtts,
            client_config(&trust, Some((rc.der().clone(), key_der(&rk)))),
            "mtls-rogue"
        )
        .await,
        None
    );
    // A certificate signed by the configured CA: accepted.
    let (dc, dk) = pki.issue("device-1", false);
    assert_eq!(
        tls_connect(
            mqtts,
            client_config(&trust, Some((dc.der().clone(), key_der(&dk)))),
            "device-1"
        )
        .await,
        Some(0)
    );
}

/// MQTT over a WebSocket: binary frames carry the byte stream.
struct Ws {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    buf: BytesMut,
}

impl Ws {
    async fn connect(http: std::net::SocketAddr) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let mut req = format!("ws://{http}/mqtt")
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        let (ws, resp) = within("WebSocket upgrade", tokio_tungstenite::connect_async(req))
            .await
            .expect("WebSocket connect");
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("mqtt"),
            "subprotocol mqtt negotiated"
        );
        Ws {
            ws,
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, p: &Packet) {
        let b = bytes_of(p, Protocol::V5).freeze();
        within(
            "WebSocket send",
            self.ws
                .send(tokio_tungstenite::tungstenite::Message::Binary(b)),
        )
        .await
        .expect("send");
    }

    async fn recv(&mut self) -> Packet {
        within("packet over WebSocket", async {
            loop {
                if let Some(p) = decode(&mut self.buf, Protocol::V5, usize::MAX).expect("decode") {
                    return p;
                }
                match self.ws.next().await {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
                        self.buf.extend_from_slice(&b)
                    }
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_)))
                    | Some(Ok(tokio_tungstenite::tungstenite::Message::Pong(_))) => {}
                    other => panic!("unexpected WebSocket message {other:?}"),
                }
            }
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_mqtt_round_trip() {
    let srv = TestServer::start().await;
    let mut ws = Ws::connect(srv.http()).await;
    ws.send(&Packet::Connect(Box::new(v5("ws-client")))).await;
    match ws.recv().await {
        Packet::ConnAck(a) => assert_eq!(a.reason_code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    ws.send(&Packet::Subscribe(mqtt_codec::Subscribe {
        packet_id: 1,
        properties: Default::default(),
        filters: vec![(
            "ws/#".into(),
            mqtt_codec::SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
    }))
    .await;
    match ws.recv().await {
        Packet::SubAck(a) => assert_eq!(a.reason_codes, vec![1]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Published over the WebSocket, received over the WebSocket.
    ws.send(&Packet::Publish(publish(
        "ws/self",
        QoS::AtLeastOnce,
        2,
        "hello",
    )))
    .await;
    let mut got_ack = false;
    let mut got_msg = false;
    while !(got_ack && got_msg) {
        match ws.recv().await {
            Packet::PubAck(a) => {
                assert_eq!(a.packet_id, 2);
                got_ack = true;
            }
            Packet::Publish(p) => {
                assert_eq!((p.topic.as_str(), text(&p).as_str()), ("ws/self", "hello"));
                ws.send(&Packet::PubAck(mqtt_codec::PubResponse::new(
                    p.packet_id.expect("pid"),
                    0,
                )))
                .await;
                got_msg = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // And from a TCP client to the WebSocket client.
    let (mut p, _) = Raw::connect_ok(srv.mqtt(), v3("ws-tcp-pub")).await;
    p.publish(publish("ws/tcp", QoS::AtMostOnce, 0, "from tcp"))
        .await;
    match ws.recv().await {
        Packet::Publish(m) => assert_eq!(text(&m), "from tcp"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// The certificate a TLS handshake with `addr` is shown, or `None` if the
/// handshake failed (the client certificate refused).
async fn handshake(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    id: &str,
) -> Option<(CertificateDer<'static>, Raw)> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("TCP");
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").expect("name");
    let tls = within("TLS handshake", connector.connect(name, tcp))
        .await
        .ok()?;
    let shown = tls.get_ref().1.peer_certificates()?.first()?.clone();
    let mut raw = Raw::over(Box::new(tls), Protocol::V5);
    // TLS 1.3 refuses a client certificate after the handshake: the first
    // read fails then. A CONNECT answered proves the session is up.
    let connect = bytes_of(&Packet::Connect(Box::new(v5(id))), Protocol::V5);
    if !raw.try_send_raw(&connect).await {
        return None;
    }
    match raw.next(WAIT).await {
        Next::Packet(Packet::ConnAck(a)) => {
            assert_eq!(a.reason_code, 0, "{id} authenticated by its certificate");
            Some((shown, raw))
        }
        _ => None,
    }
}

/// A CRL over `revoked` serial numbers, signed by `pki`'s CA.
fn crl(pki: &Pki, revoked: &[u64]) -> String {
    rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(2099, 1, 1),
        crl_number: rcgen::SerialNumber::from(revoked.len() as u64 + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(*s),
                revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&pki.ca_cert, &pki.ca_key)
    .expect("CRL")
    .pem()
    .expect("CRL PEM")
}

/// A client certificate of `pki` with serial number `serial`.
fn client_cert(
    pki: &Pki,
    cn: &str,
    serial: u64,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let (cert, key) = pki.issue_numbered(cn, false, Some(serial));
    (cert.der().clone(), key_der(&key))
}

/// Certificate renewal and revocation without a restart: the server's
/// certificate files are replaced and a CRL for the client CA is changed,
/// then `kill -HUP` makes the server read them again. New handshakes get
/// the new certificate and the new CRL; a session opened before stays up.
/// A file that does not load leaves the running configuration in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_the_revocation_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("operations CA");
    let (first, first_key) = pki.issue("localhost", true);
    let cert = write(dir.path(), "server.pem", &first.pem());
    let key = write(dir.path(), "server-key.pem", &first_key.serialize_pem());
    let ca = write(dir.path(), "ca.pem", &pki.ca_cert.pem());
    let crl_path = write(dir.path(), "crl.pem", &crl(&pki, &[2]));
    {
        // The devices, registered before the server opens the registry.
        let registry = m2mhub_identity::Registry::open(&dir.path().join("data").join("registry"))
            .expect("registry");
        for id in ["device-1", "device-2"] {
            registry
                .create_device(m2mhub_identity::NewDevice {
                    id: Some(id.into()),
                    ..Default::default()
                })
                .expect("device");
        }
    }
    let srv = BinServer::start_with(
        &dir.path().join("data"),
        &dir.path().join("server.log"),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
        &[
            ("M2MHUB_MQTT_TLS_CLIENT_CRL", crl_path.as_str()),
            // The device id is the certificate's common name.
            ("M2MHUB_MQTT_ACCEPT_UNREGISTERED_CERTS", "true"),
        ],
    )
    .await;
    let trust = pki.ca_cert.der().clone();
    let device1 = client_cert(&pki, "device-1", 1);
    let device2 = client_cert(&pki, "device-2", 2);
    let with = |id: &(CertificateDer<'static>, PrivateKeyDer<'static>)| {
        client_config(&trust, Some((id.0.clone(), id.1.clone_key())))
    };

    let (shown, mut open) = handshake(srv.mqtts, with(&device1), "device-1")
        .await
        .expect("device-1's certificate is not revoked");
    assert_eq!(&shown, first.der(), "the first server certificate");
    assert!(
        handshake(srv.mqtts, with(&device2), "device-2")
            .await
            .is_none(),
        "device-2's certificate is on the CRL"
    );

    // Renewal: a new certificate and key in the same files; a CRL that
    // revokes device-1 instead of device-2.
    let (second, second_key) = pki.issue("localhost", true);
    write(dir.path(), "server.pem", &second.pem());
    write(dir.path(), "server-key.pem", &second_key.serialize_pem());
    write(dir.path(), "crl.pem", &crl(&pki, &[1]));
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &srv.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -HUP");
    };
    hup();
    let mut renewed = None;
    for _ in 0..50 {
        if let Some((shown, _)) = handshake(srv.mqtts, with(&device2), "device-2").await {
            if &shown == second.der() {
                renewed = Some(shown);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        renewed.is_some(),
        "after SIGHUP: the new certificate, device-2 accepted"
    );
    assert!(
        handshake(srv.mqtts, with(&device1), "device-1")
            .await
            .is_none(),
        "device-1 is revoked now"
    );
    // The session opened before the reload is still served.
    open.send(&Packet::PingReq).await;
    assert!(matches!(open.recv().await, Packet::PingResp));

    // A broken file: the reload is refused and logged, nothing changes.
    write(dir.path(), "server-key.pem", "not a key");
    hup();
    let log = dir.path().join("server.log");
    let mut refused = false;
    for _ in 0..50 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("TLS files not reloaded")
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (shown, _) = handshake(srv.mqtts, with(&device2), "device-2")
        .await
        .expect("still served");
    assert_eq!(&shown, second.der());
}
