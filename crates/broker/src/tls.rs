//! TLS server configuration from PEM files (rustls, ring provider), and
//! [`ReloadableConfig`], which lets a running listener take a renewed
//! certificate or a new revocation list without a restart.
//!
//! The protocol versions are rustls's safe defaults, TLS 1.2 and 1.3 only,
//! and its cipher suites: AEAD only (AES-GCM, ChaCha20-Poly1305), forward
//! secret key exchange (ECDHE on X25519, P-256, P-384) — no CBC, RC4, 3DES,
//! static RSA key exchange or SHA-1 signatures can be negotiated.

use parking_lot::RwLock;
use rustls::pki_types::{
    pem::PemObject, CertificateDer, CertificateRevocationListDer, PrivateKeyDer,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read private key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Build a server configuration. With `client_ca`, clients must present a
/// certificate signed by that CA (mutual TLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.display().to_string(),
            reason: "no PEM certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| TlsError::Certificate {
                path: ca.display().to_string(),
                reason: e.to_string(),
            })? {
                let c = c.map_err(|e| TlsError::Certificate {
                    path: ca.display().to_string(),
                    reason: e.to_string(),
                })?;
                roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Build a server configuration from PEM text. Client certificates signed
/// by any of `client_roots` are verified; with `require_client_cert` false
/// a client may also connect without one (and authenticate with a token),
/// which is how devices with certificates and devices with tokens share
/// one TLS listener.
///
/// `crls` (PEM) list revoked client certificates: one listed is refused at
/// the handshake. A certificate whose issuer has no CRL here is accepted
/// as before (the built-in device CA revokes through the registry).
pub fn server_config_pem(
    cert_chain_pem: &str,
    key_pem: &str,
    client_roots: &[String],
    crls: &[String],
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Certificate {
                path: "(server certificate)".into(),
                reason: e.to_string(),
            })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Key {
        path: "(server key)".into(),
        reason: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if client_roots.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for pem in client_roots {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| TlsError::Certificate {
                    path: "(client CA)".into(),
                    reason: e.to_string(),
                })?;
                roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
            }
        }
        let mut lists: Vec<CertificateRevocationListDer<'static>> = Vec::new();
        for pem in crls {
            for c in CertificateRevocationListDer::pem_slice_iter(pem.as_bytes()) {
                lists.push(c.map_err(|e| TlsError::Certificate {
                    path: "(client CRL)".into(),
                    reason: e.to_string(),
                })?);
            }
        }
        if crls.iter().any(|p| !p.trim().is_empty()) && lists.is_empty() {
            return Err(TlsError::Certificate {
                path: "(client CRL)".into(),
                reason: "no PEM X509 CRL found".into(),
            });
        }
        let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        if !lists.is_empty() {
            verifier = verifier.with_crls(lists).allow_unknown_revocation_status();
        }
        if !require_client_cert {
            verifier = verifier.allow_unauthenticated();
        }
        builder.with_client_cert_verifier(
            verifier
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?,
        )
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A server configuration shared by a listener's handshakes and replaced
/// as a whole (SIGHUP): each handshake takes the one current when it
/// starts, connections already open keep theirs.
#[derive(Clone)]
pub struct ReloadableConfig(Arc<RwLock<Arc<ServerConfig>>>);

impl ReloadableConfig {
    pub fn new(config: Arc<ServerConfig>) -> ReloadableConfig {
        ReloadableConfig(Arc::new(RwLock::new(config)))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.0.read().clone()
    }

    /// An acceptor for one handshake, with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current())
    }

    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write() = config;
    }
}

/// The client's verified certificate, if any: its subject common name and
/// fingerprint.
///
/// The common name comes from a minimal DER walk (find the commonName OID
/// 2.5.4.3 and read the string that follows): enough to name a device
/// without a full X.509 parser on the connection path.
pub fn peer(conn: &ServerConnection) -> Option<crate::auth::TlsPeer> {
    let cert = conn.peer_certificates()?.first()?;
    let der = cert.as_ref();
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(digest.as_ref());
    Some(crate::auth::TlsPeer {
        common_name: common_name(der),
        fingerprint,
        der: der.to_vec(),
    })
}

fn common_name(der: &[u8]) -> Option<String> {
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let pos = der.windows(CN_OID.len()).rposition(|w| w == CN_OID)?;
    let rest = der.get(pos + CN_OID.len()..)?;
    let len = *rest.get(1)? as usize;
    if len >= 0x80 {
        return None;
    }
    let value = rest.get(2..2 + len)?;
    String::from_utf8(value.to_vec()).ok()
}
