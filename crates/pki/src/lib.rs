//! m2mhub's built-in device certificate authority.
//!
//! # Model
//!
//! Devices authenticate to m2mhub with X.509 client certificates. So that an
//! operator does not need an external PKI to get started, m2mhub keeps its own
//! small CA under `<data_dir>/pki/`:
//!
//! - `ca.pem`: the CA certificate (public; hand it to devices and to anything
//!   that verifies device certificates);
//! - `ca.key.enc`: the CA's ECDSA P-256 private key, *sealed* with AES-256-GCM
//!   under a 32-byte [`MasterKey`] (format: magic `M2MKEY1\n`, a random 96-bit
//!   nonce, then ciphertext and tag; the key's purpose, e.g. `"CA key"`, is
//!   the associated data so a sealed server key cannot be swapped in for the CA
//!   key);
//! - `server.pem` / `server.key.enc`: a TLS server certificate for the MQTT and
//!   HTTP listeners, issued by the same CA when the operator configures none, so
//!   `m2mhub serve` speaks TLS on 8883 out of the box.
//!
//! Devices' DTLS pre-shared keys are sealed under the same master key
//! ([`PskKeys`]), bound to their device id; the registry stores the sealed
//! bytes.
//!
//! The master key comes from the environment (`M2MHUB_MASTER_KEY`, 64 hex
//! characters or base64; the caller passes the value) or from
//! `<data_dir>/master.key`, created with mode 0600 on first start. Keeping the
//! key apart from the data lets an operator move the key out of the data
//! directory (into a secret store feeding the environment) so that a copy of
//! the data directory, e.g. a backup, does not reveal the CA key.
//!
//! Device certificates carry the registry's device id, never what the device
//! asked for: [`DeviceCa::issue_from_csr`] takes only the public key from a
//! CSR (after checking the CSR's signature, which proves possession of the
//! private key) and writes the subject itself. Revocation is published as a CRL
//! ([`DeviceCa::crl_pem`]) that the TLS listener loads into its verifier.
#![forbid(unsafe_code)]

mod ca;
mod files;
mod master_key;
mod psk;
mod signing;

use std::path::PathBuf;

pub use ca::{ca_cert_path, fingerprint, make_csr, parse_pem_certs, DeviceCa, IssuedCert};
pub use master_key::{KeySource, MasterKey, MASTER_KEY_ENV, MASTER_KEY_FILE};
pub use psk::{PskKeys, PSK_LEN, PURPOSE_DTLS_PSK};
pub use signing::{
    url_token_key, verify_firmware, FirmwareSigner, PURPOSE_FIRMWARE_KEY, PURPOSE_URL_TOKEN_KEY,
};

/// Associated data (purpose) under which the CA private key is sealed.
pub const PURPOSE_CA_KEY: &str = "CA key";
/// Associated data (purpose) under which the TLS server private key is sealed.
pub const PURPOSE_SERVER_KEY: &str = "TLS server key";

/// Errors of the PKI: bad key material, corrupt files, refused CSRs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The master key text is neither 64 hex characters nor base64 of 32 bytes.
    /// The value itself is never included: it is a secret.
    #[error("invalid master key: {0}")]
    InvalidMasterKey(&'static str),
    /// AES-GCM authentication failed. This cannot tell a wrong key from a
    /// modified file, but a wrong key is by far the common cause (a data
    /// directory moved without its key), so the message leads with that.
    #[error(
        "the master key does not decrypt the {purpose}: set M2MHUB_MASTER_KEY to the key used \
         when the data directory was created (or the sealed file was modified)"
    )]
    WrongMasterKey { purpose: String },
    /// A sealed blob lacks the magic or is too short to hold nonce and tag.
    #[error("not a sealed m2mhub key ({0})")]
    NotSealed(&'static str),
    /// A file under `pki/` exists but does not hold what it should.
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// Device ids go into the certificate's CN and a URI SAN.
    #[error(
        "invalid device id {0:?}: expected 1 to 128 printable ASCII characters without spaces"
    )]
    InvalidDeviceId(String),
    /// The CSR could not be parsed, or its key type is not supported.
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    /// The CSR's self-signature does not verify, so it does not prove that
    /// the requester holds the private key.
    #[error("invalid CSR: its signature does not verify")]
    CsrSignature,
    /// A PEM certificate bundle could not be parsed.
    #[error("invalid certificate PEM: {0}")]
    InvalidPem(String),
    /// A host name for the server certificate is not a DNS name or IP address.
    #[error("invalid server name {0:?}")]
    InvalidName(String),
    /// Out-of-range validity or times.
    #[error("{0}")]
    InvalidArgument(String),
    /// Certificate generation failed inside rcgen.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
