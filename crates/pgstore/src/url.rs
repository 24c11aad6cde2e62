//! The server's address as configured: a `postgres://` URL (or a libpq
//! key=value string) that carries a password, so it is never printed whole.

use m2mhub_identity::{RegistryError, Result};
use std::fmt;
use std::str::FromStr;

/// A PostgreSQL connection string whose `Debug` and `Display` hide the
/// password, so settings and errors can be logged as they are.
#[derive(Clone)]
pub struct PgUrl {
    text: String,
    config: postgres::Config,
    /// TLS with a pinned CA ([`PgUrl::with_ca`]); `None`: plain TCP.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl PgUrl {
    /// Parse `postgres://user:password@host:port/dbname` or
    /// `host=… user=… password=… dbname=…`.
    pub fn parse(text: &str) -> Result<PgUrl> {
        let config = postgres::Config::from_str(text.trim()).map_err(|e| {
            RegistryError::Validation(format!(
                "not a PostgreSQL URL ({e}); use postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ))
        })?;
        if config.get_hosts().is_empty() {
            return Err(RegistryError::Validation(
                "the PostgreSQL URL names no host; use postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                    .into(),
            ));
        }
        if config.get_ssl_mode() == postgres::config::SslMode::Require {
            return Err(RegistryError::Validation(
                "sslmode=require needs the CA that signed the server's certificate: set storage.postgres_ca (the connection is then verified TLS)".into(),
            ));
        }
        Ok(PgUrl {
            text: text.trim().to_string(),
            config,
            tls: None,
        })
    }

    /// Connect over TLS only, verifying the server's certificate against
    /// the CA(s) in `ca_file` and the URL's host name (or address).
    pub fn with_ca(mut self, ca_file: &std::path::Path) -> Result<PgUrl> {
        let tls = crate::tls::client_config(ca_file).map_err(RegistryError::Validation)?;
        self.config.ssl_mode(postgres::config::SslMode::Require);
        self.tls = Some(tls);
        Ok(self)
    }

    /// Whether connections use TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Open one blocking client (TLS when configured).
    pub(crate) fn connect_with(
        &self,
        config: &postgres::Config,
    ) -> std::result::Result<postgres::Client, postgres::Error> {
        match &self.tls {
            Some(tls) => config.connect(crate::tls::MakeRustls(tls.clone())),
            None => config.connect(postgres::NoTls),
        }
    }

    /// The connection string as written, password included: only for
    /// handing to another process (tests), never for logs.
    pub fn expose(&self) -> &str {
        &self.text
    }

    pub(crate) fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// The same server, another database (tests create one each).
    pub fn with_dbname(&self, dbname: &str) -> PgUrl {
        let mut config = self.config.clone();
        config.dbname(dbname);
        let text = match self.text.rsplit_once('/') {
            Some((base, tail)) if self.text.starts_with("postgres") => {
                let query = tail.split_once('?').map(|(_, q)| format!("?{q}"));
                format!("{base}/{dbname}{}", query.unwrap_or_default())
            }
            _ => format!("{} dbname={dbname}", self.text),
        };
        PgUrl {
            text,
            config,
            tls: self.tls.clone(),
        }
    }

    /// `user@host:port/dbname`: what logs and errors say.
    pub fn target(&self) -> String {
        let c = &self.config;
        let host = match c.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = c.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{host}:{port}/{}",
            c.get_user().unwrap_or("?"),
            c.get_dbname().unwrap_or("?")
        )
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres://{} (password hidden)", self.target())
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let u = PgUrl::parse("postgres://hub:s3cr3t-pw@127.0.0.1:5433/meta").expect("parse");
        for shown in [u.to_string(), format!("{u:?}"), u.target()] {
            assert!(!shown.contains("s3cr3t-pw"), "{shown}");
            assert!(shown.contains("hub@127.0.0.1:5433/meta"), "{shown}");
        }
        let other = u.with_dbname("t1");
        assert_eq!(other.expose(), "postgres://hub:s3cr3t-pw@127.0.0.1:5433/t1");
        assert_eq!(other.config().get_dbname(), Some("t1"));
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        let e = PgUrl::parse("postgres://[nope").expect_err("bad");
        assert!(
            e.to_string().contains("postgres://USER:PASSWORD@HOST"),
            "{e}"
        );
    }
}
