//! The device CA: creation, reloading, issuing, CRLs, the server identity.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData,
    RevokedCertParams, SanType, SerialNumber, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::files::{create_dir, read_optional, write_atomic};
use crate::master_key::hex;
use crate::{Error, MasterKey, Result, PURPOSE_CA_KEY, PURPOSE_SERVER_KEY};

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key.enc";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server.key.enc";

/// Ten years: long enough that operators of a small deployment never face a
/// CA rollover, which would mean re-provisioning every device.
const CA_VALIDITY_DAYS: i64 = 3650;
/// Server certificates are cheap to renew (they are re-issued at start-up),
/// so they get a short life.
const SERVER_VALIDITY_DAYS: i64 = 365;
/// A server certificate closer than this to expiry is replaced at start-up,
/// so a server restarted now and then never runs into the expiry.
const SERVER_RENEW_BEFORE_DAYS: i64 = 30;
/// Certificates start an hour in the past so a device whose clock lags a
/// little does not reject a certificate issued a moment ago.
const CLOCK_SKEW: Duration = Duration::hours(1);
/// Upper bound on a device certificate's validity (100 years): beyond that
/// the date arithmetic stops meaning anything.
const MAX_DEVICE_DAYS: u32 = 36_500;

/// A certificate just issued by the [`DeviceCa`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate in PEM (`CERTIFICATE` block).
    pub pem: String,
    /// The certificate in DER.
    pub der: Vec<u8>,
    /// The serial number's bytes (big-endian, as in the certificate and CRL).
    pub serial: Vec<u8>,
    /// `serial` as lowercase hex without separators.
    pub serial_hex: String,
    /// SHA-256 of `der`: how the registry recognises the certificate a
    /// device presents without storing or comparing whole certificates.
    pub fingerprint: [u8; 32],
    /// End of validity, Unix milliseconds.
    pub not_after_ms: i64,
}

/// The built-in device CA (see the crate documentation for the model).
///
/// It is `Send + Sync`, so the server can share one behind an `Arc`.
pub struct DeviceCa {
    /// The certificate as written on disk; what devices trust.
    ca_pem: String,
    ca_der: Vec<u8>,
    ca_not_after: OffsetDateTime,
    /// rcgen 0.13 signs with an issuer `Certificate`. It only uses the
    /// issuer's name, key identifier and key usages, which `from_ca_cert_der`
    /// takes from `ca.pem`, so this re-signed copy issues certificates that
    /// chain to the original `ca.pem` byte for byte.
    signer: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa")
            .field("fingerprint", &hex(&fingerprint(&self.ca_der)))
            .finish_non_exhaustive()
    }
}

impl DeviceCa {
    /// Load the CA from `<data_dir>/pki`, or create it (10-year validity, CN
    /// `m2mhub device CA <random suffix>`, key usage cert sign + CRL sign,
    /// basic constraints CA with path length 0) on first start. Returns
    /// whether it was created.
    ///
    /// `ca.pem` is written last, so it marks a finished creation: a
    /// `ca.key.enc` without `ca.pem` is the trace of an interrupted first
    /// start (no certificate can have been issued by it) and is replaced.
    /// The random suffix keeps the CA names of two installations apart, so a
    /// device configured for one does not appear to match the other.
    pub fn load_or_create(data_dir: &Path, key: &MasterKey) -> Result<(DeviceCa, bool)> {
        let dir = data_dir.join("pki");
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if let Some(pem_bytes) = read_optional(&cert_path)? {
            let sealed = read_optional(&key_path)?.ok_or_else(|| Error::Corrupt {
                path: key_path.clone(),
                reason: format!("missing, but {CA_CERT_FILE} exists: restore it from a backup"),
            })?;
            let ca = Self::load(&cert_path, &pem_bytes, &key_path, &sealed, key)?;
            return Ok((ca, false));
        }

        create_dir(&dir, 0o700)?;
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = now();
        let mut params = CertificateParams::default();
        let mut suffix = [0u8; 4];
        SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| Error::Random)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "m2mhub");
        dn.push(
            DnType::CommonName,
            format!("m2mhub device CA {}", hex(&suffix)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let cert = params.self_signed(&ca_key)?;
        let ca_pem = cert.pem();

        write_atomic(
            &key_path,
            &key.seal(PURPOSE_CA_KEY, ca_key.serialized_der()),
            0o600,
        )?;
        write_atomic(&cert_path, ca_pem.as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "created the device CA");
        let ca = Self::from_parts(&cert_path, ca_pem, ca_key)?;
        Ok((ca, true))
    }

    fn load(
        cert_path: &Path,
        pem_bytes: &[u8],
        key_path: &Path,
        sealed: &[u8],
        key: &MasterKey,
    ) -> Result<DeviceCa> {
        let ca_pem = String::from_utf8(pem_bytes.to_vec()).map_err(|_| Error::Corrupt {
            path: cert_path.to_path_buf(),
            reason: "not a PEM file".into(),
        })?;
        let key_der = key.open(PURPOSE_CA_KEY, sealed).map_err(|e| match e {
            Error::NotSealed(why) => Error::Corrupt {
                path: key_path.to_path_buf(),
                reason: format!("not a sealed key: {why}"),
            },
            other => other,
        })?;
        let ca_key = KeyPair::try_from(key_der).map_err(|e| Error::Corrupt {
            path: key_path.to_path_buf(),
            reason: format!("the decrypted CA key does not parse: {e}"),
        })?;
        Self::from_parts(cert_path, ca_pem, ca_key)
    }

    fn from_parts(cert_path: &Path, ca_pem: String, key: KeyPair) -> Result<DeviceCa> {
        let corrupt = |reason: String| Error::Corrupt {
            path: cert_path.to_path_buf(),
            reason,
        };
        let block = pem::parse(&ca_pem).map_err(|e| corrupt(e.to_string()))?;
        if block.tag() != "CERTIFICATE" {
            return Err(corrupt(format!(
                "expected a CERTIFICATE, found {}",
                block.tag()
            )));
        }
        let ca_der = block.into_contents();
        let (_, x509) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| corrupt(format!("not a certificate: {e}")))?;
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(corrupt(format!(
                "{CA_KEY_FILE} does not hold the private key of this certificate"
            )));
        }
        let ca_not_after = x509.validity().not_after.to_datetime();
        let params = CertificateParams::from_ca_cert_der(&ca_der.as_slice().into())?;
        let signer = params.self_signed(&key)?;
        Ok(DeviceCa {
            ca_pem,
            ca_der,
            ca_not_after,
            signer,
            key,
        })
    }

    /// The CA certificate (PEM), exactly as stored in `pki/ca.pem`.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The CA certificate (DER), for building trust stores.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// Issue a device certificate (CN = `device_id`, a URI SAN
    /// `urn:m2mhub:device:<id>`, client-auth EKU, `days` of validity, capped at
    /// the CA's own expiry) for the public key in a PEM CSR.
    ///
    /// The CSR's own subject and requested extensions are ignored: the identity
    /// is the registry's, not the device's claim. Its signature is verified, as
    /// that is what proves the requester holds the private key.
    pub fn issue_from_csr(&self, device_id: &str, csr_pem: &str, days: u32) -> Result<IssuedCert> {
        let block = pem::parse(csr_pem).map_err(|e| Error::InvalidCsr(e.to_string()))?;
        if !matches!(
            block.tag(),
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
        ) {
            return Err(Error::InvalidCsr(format!(
                "expected a CERTIFICATE REQUEST PEM block, found {}",
                block.tag()
            )));
        }
        let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(
            block.contents(),
        )
        .map_err(|e| Error::InvalidCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::InvalidCsr("trailing bytes after the CSR".into()));
        }
        csr.verify_signature().map_err(|_| Error::CsrSignature)?;
        let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| Error::InvalidCsr(format!("unsupported public key: {e}")))?;
        self.issue(device_id, &spki, days)
    }

    /// Generate an ECDSA P-256 key pair and issue a certificate for it, for
    /// devices that cannot make a CSR. The private key (PKCS#8 PEM) is returned
    /// once and not kept: the CA never needs it again.
    pub fn issue_with_key(&self, device_id: &str, days: u32) -> Result<(IssuedCert, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = self.issue(device_id, &key, days)?;
        Ok((cert, key.serialize_pem()))
    }

    fn issue(
        &self,
        device_id: &str,
        public_key: &impl PublicKeyData,
        days: u32,
    ) -> Result<IssuedCert> {
        validate_device_id(device_id)?;
        if days == 0 || days > MAX_DEVICE_DAYS {
            return Err(Error::InvalidArgument(format!(
                "certificate validity must be 1 to {MAX_DEVICE_DAYS} days, not {days}"
            )));
        }
        let now = now();
        let mut not_after = now + Duration::days(i64::from(days));
        if not_after > self.ca_not_after {
            // A certificate outliving its CA fails verification anyway once the
            // CA expires; saying so in the certificate is more honest.
            not_after = self.ca_not_after;
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(device_urn(device_id))?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        let serial = random_serial()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.signer, &self.key)?;
        tracing::debug!(device_id, serial = %hex(&serial), "issued a device certificate");
        Ok(IssuedCert::new(cert.der().to_vec(), serial, not_after))
    }

    /// A CRL (PEM) listing the given revoked serials (serial bytes, revocation
    /// time in Unix milliseconds), signed by the CA, next update in
    /// `next_update_hours` (at least 1).
    ///
    /// The CRL number is the current time in milliseconds: CRL numbers must
    /// increase, and the clock gives that without keeping a counter on disk.
    pub fn crl_pem(&self, revoked: &[(Vec<u8>, i64)], next_update_hours: u32) -> Result<String> {
        if next_update_hours == 0 {
            return Err(Error::InvalidArgument(
                "the CRL's next update must be at least 1 hour away".into(),
            ));
        }
        let now = now();
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at_ms)| {
                if serial.is_empty() || serial.len() > 20 {
                    return Err(Error::InvalidArgument(format!(
                        "a serial number has 1 to 20 bytes, not {}",
                        serial.len()
                    )));
                }
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: from_unix_ms(*at_ms)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let crl_number = (now.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::hours(i64::from(next_update_hours)),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.signer.params().key_identifier_method.clone(),
        };
        Ok(params.signed_by(&self.signer, &self.key)?.pem()?)
    }

    /// A TLS server certificate chain (server, then CA, PEM) and private key
    /// (PKCS#8 PEM) for the MQTT/HTTP listeners, signed by this CA.
    ///
    /// The pair is persisted under `pki/` (`server.pem`, `server.key.enc`
    /// sealed with `key`) and reused while it is valid for more than 30 more
    /// days, was issued by this CA and covers `localhost`, `127.0.0.1`, `::1`
    /// and `names`; otherwise a new one (1 year) replaces it. Reuse keeps the
    /// certificate stable across restarts for clients that pin it.
    pub fn server_identity(
        &self,
        data_dir: &Path,
        key: &MasterKey,
        names: &[String],
    ) -> Result<(String, String)> {
        let wanted = server_names(names)?;
        let dir = data_dir.join("pki");
        let cert_path = dir.join(SERVER_CERT_FILE);
        let key_path = dir.join(SERVER_KEY_FILE);
        if let (Some(cert), Some(sealed)) = (read_optional(&cert_path)?, read_optional(&key_path)?)
        {
            match self.reusable_server(&cert, &sealed, key, &wanted) {
                Ok((cert_pem, key_pem)) => return Ok((self.chain(&cert_pem), key_pem)),
                Err(why) => tracing::info!(%why, "issuing a new TLS server certificate"),
            }
        }

        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "m2mhub server");
        params.distinguished_name = dn;
        params.subject_alt_names = wanted
            .iter()
            .map(|name| {
                Ok(match name {
                    Name::Ip(ip) => SanType::IpAddress(*ip),
                    Name::Dns(dns) => SanType::DnsName(Ia5String::try_from(dns.clone())?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + Duration::days(SERVER_VALIDITY_DAYS)).min(self.ca_not_after);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&server_key, &self.signer, &self.key)?;
        let cert_pem = cert.pem();
        create_dir(&dir, 0o700)?;
        write_atomic(
            &key_path,
            &key.seal(PURPOSE_SERVER_KEY, server_key.serialized_der()),
            0o600,
        )?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "issued a TLS server certificate");
        Ok((self.chain(&cert_pem), server_key.serialize_pem()))
    }

    fn chain(&self, server_pem: &str) -> String {
        let mut chain = server_pem.trim_end().to_string();
        chain.push('\n');
        chain.push_str(self.ca_pem.trim_end());
        chain.push('\n');
        chain
    }

    /// Checks the stored server certificate; `Err` carries why it must be
    /// replaced (any defect just means issuing a new one).
    fn reusable_server(
        &self,
        cert: &[u8],
        sealed: &[u8],
        key: &MasterKey,
        wanted: &BTreeSet<Name>,
    ) -> std::result::Result<(String, String), String> {
        let cert_pem = String::from_utf8(cert.to_vec()).map_err(|_| "server.pem is not text")?;
        let block = pem::parse(&cert_pem).map_err(|e| format!("server.pem: {e}"))?;
        let (_, x509) = x509_parser::parse_x509_certificate(block.contents())
            .map_err(|e| format!("server.pem: {e}"))?;
        let (_, ca) = x509_parser::parse_x509_certificate(&self.ca_der)
            .map_err(|e| format!("ca.pem: {e}"))?;
        x509.verify_signature(Some(ca.public_key()))
            .map_err(|_| "the stored server certificate was not issued by this CA")?;
        let remaining = x509.validity().not_after.timestamp() - now().unix_timestamp();
        if remaining <= Duration::days(SERVER_RENEW_BEFORE_DAYS).whole_seconds() {
            return Err("the stored server certificate expires within 30 days".into());
        }
        let present = cert_names(&x509);
        if let Some(missing) = wanted.iter().find(|n| !present.contains(n)) {
            return Err(format!(
                "the stored server certificate does not cover {missing:?}"
            ));
        }
        let der = key
            .open(PURPOSE_SERVER_KEY, sealed)
            .map_err(|e| format!("server.key.enc: {e}"))?;
        let server_key = KeyPair::try_from(der).map_err(|e| format!("server.key.enc: {e}"))?;
        if server_key.public_key_der().as_slice() != x509.public_key().raw {
            return Err("server.key.enc does not match server.pem".into());
        }
        Ok((cert_pem, server_key.serialize_pem()))
    }
}

impl IssuedCert {
    fn new(der: Vec<u8>, serial: Vec<u8>, not_after: OffsetDateTime) -> Self {
        let pem = pem::encode_config(
            &pem::Pem::new("CERTIFICATE", der.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        IssuedCert {
            pem,
            fingerprint: fingerprint(&der),
            der,
            serial_hex: hex(&serial),
            serial,
            not_after_ms: not_after.unix_timestamp() * 1000,
        }
    }
}

/// A name a server certificate must cover. Kept as parsed values so that
/// `LOCALHOST` and `localhost`, or two spellings of an IPv6 address, compare
/// equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Dns(String),
    Ip(IpAddr),
}

fn server_names(names: &[String]) -> Result<BTreeSet<Name>> {
    let mut set = BTreeSet::from([
        Name::Dns("localhost".into()),
        Name::Ip(IpAddr::from([127, 0, 0, 1])),
        Name::Ip(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
    ]);
    for raw in names {
        let name = raw.trim();
        if name.is_empty() {
            continue;
        }
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = name.parse::<IpAddr>() {
            // A wildcard bind address is not a name anyone connects to.
            if !ip.is_unspecified() {
                set.insert(Name::Ip(ip));
            }
            continue;
        }
        let valid = name.len() <= 253
            && name.split('.').enumerate().all(|(i, label)| {
                (label == "*" && i == 0)
                    || (!label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
            });
        if !valid {
            return Err(Error::InvalidName(raw.clone()));
        }
        set.insert(Name::Dns(name.to_ascii_lowercase()));
    }
    Ok(set)
}

fn cert_names(x509: &X509Certificate<'_>) -> BTreeSet<Name> {
    let mut set = BTreeSet::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    set.insert(Name::Dns(dns.to_ascii_lowercase()));
                }
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        set.insert(Name::Ip(IpAddr::from(v4)));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        set.insert(Name::Ip(IpAddr::from(v6)));
                    }
                }
                _ => {}
            }
        }
    }
    set
}

/// Device ids end up in the CN and, percent-encoded, in a URN; printable
/// ASCII keeps both unambiguous and avoids look-alike Unicode identities.
fn validate_device_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidDeviceId(id.to_string()));
    }
    Ok(())
}

/// `urn:m2mhub:device:<id>`, with characters outside RFC 3986's unreserved
/// set (and `:`) percent-encoded so the SAN is always a valid URI.
pub(crate) fn device_urn(id: &str) -> String {
    let mut urn = String::from("urn:m2mhub:device:");
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            urn.push(char::from(b));
        } else {
            urn.push_str(&format!("%{b:02X}"));
        }
    }
    urn
}

/// 16 random bytes with the top bit cleared (so the DER INTEGER is positive
/// and needs no padding byte) and the next bit set (so there is no leading
/// zero to strip): the bytes returned are exactly the serial's encoding, which
/// is what a CRL and a presented certificate are matched on.
fn random_serial() -> Result<Vec<u8>> {
    let mut serial = vec![0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| Error::Random)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// The current time to whole seconds, as certificates store it, so
/// `not_after_ms` matches the certificate exactly.
fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    OffsetDateTime::from_unix_timestamp(now.unix_timestamp()).unwrap_or(now)
}

fn from_unix_ms(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map_err(|_| Error::InvalidArgument(format!("revocation time {ms} ms is out of range")))
}

/// SHA-256 of a certificate's DER encoding.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Parse a PEM certificate bundle (e.g. a user-supplied device CA) and return
/// the DER certificates, in order. Blocks other than `CERTIFICATE` are an
/// error rather than skipped: a private key pasted into a trust bundle is a
/// mistake worth reporting.
pub fn parse_pem_certs(pem_text: &str) -> Result<Vec<Vec<u8>>> {
    let blocks = pem::parse_many(pem_text).map_err(|e| Error::InvalidPem(e.to_string()))?;
    if blocks.is_empty() {
        return Err(Error::InvalidPem("no CERTIFICATE block found".into()));
    }
    blocks
        .into_iter()
        .enumerate()
        .map(|(i, block)| {
            if block.tag() != "CERTIFICATE" {
                return Err(Error::InvalidPem(format!(
                    "block {} is a {}, not a CERTIFICATE",
                    i + 1,
                    block.tag()
                )));
            }
            let der = block.into_contents();
            x509_parser::parse_x509_certificate(&der).map_err(|e| {
                Error::InvalidPem(format!("block {} is not an X.509 certificate: {e}", i + 1))
            })?;
            Ok(der)
        })
        .collect()
}

/// Make a CSR for tests and simulators: returns `(csr_pem, key_pem)` for a
/// fresh ECDSA P-256 key with subject CN `common_name`.
pub fn make_csr(common_name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Where the CA certificate lives (`<data_dir>/pki/ca.pem`), so messages to
/// operators can say which file to hand to devices.
pub fn ca_cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join("pki").join(CA_CERT_FILE)
}
