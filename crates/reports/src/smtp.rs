//! A small SMTP submission client: EHLO, STARTTLS or implicit TLS, AUTH
//! PLAIN, one message with attachments, QUIT.
//!
//! Why not `lettre`: with rustls it brings IDNA/ICU and about thirty more
//! crates to build on two cores, for what reports need — one message to a
//! few recipients through one configured relay. Everything here is base64
//! in MIME parts, so no line of the body can end the DATA phase. The
//! password is sent only over TLS and never logged (`SmtpConfig`'s `Debug`
//! leaves it out).

use base64::Engine;
use rustls_pki_types::ServerName;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How the connection to the relay is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain TCP, upgraded with STARTTLS before anything else (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: only for a relay on this machine; AUTH is refused.
    None,
}

/// The relay reports are mailed through.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sender address (`MAIL FROM` and `From:`).
    pub from: String,
    /// PEM certificates trusted besides the system's (a private CA).
    pub extra_roots_pem: Option<String>,
    pub timeout: Duration,
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// One message.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: Vec<String>,
    pub subject: String,
    /// The body, as HTML.
    pub html: String,
    /// `(file name, content type, content)`.
    pub attachments: Vec<(String, String, Vec<u8>)>,
    /// Unique per message; becomes the Message-ID's left part.
    pub id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    #[error("I/O with the mail relay: {0}")]
    Io(#[from] std::io::Error),
    #[error("the mail relay answered {code} to {step}: {text}")]
    Refused {
        step: &'static str,
        code: u16,
        text: String,
    },
    #[error("the mail relay sent a malformed reply")]
    BadReply,
    #[error("the mail relay does not offer {0}")]
    Unsupported(&'static str),
    #[error("the mail relay did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Config(String),
}

/// Send `mail` through the relay, within the configured timeout.
pub async fn send(cfg: &SmtpConfig, mail: &Mail) -> Result<(), SmtpError> {
    match tokio::time::timeout(cfg.timeout, send_inner(cfg, mail)).await {
        Ok(r) => r,
        Err(_) => Err(SmtpError::Timeout(cfg.timeout)),
    }
}

async fn send_inner(cfg: &SmtpConfig, mail: &Mail) -> Result<(), SmtpError> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| SmtpError::Connect(addr.clone(), e))?;
    match cfg.security {
        SmtpSecurity::Tls => {
            let tls = tls_connect(cfg, tcp).await?;
            let mut s = Session::new(tls);
            s.expect("greeting", 220).await?;
            s.ehlo().await?;
            s.transact(cfg, mail, true).await
        }
        SmtpSecurity::StartTls => {
            let mut s = Session::new(tcp);
            s.expect("greeting", 220).await?;
            let ext = s.ehlo().await?;
            if !ext.iter().any(|e| e.eq_ignore_ascii_case("STARTTLS")) {
                return Err(SmtpError::Unsupported("STARTTLS"));
            }
            s.command("STARTTLS", "STARTTLS", 220).await?;
            // Anything the relay sent before the handshake would be read
            // as if it came over TLS (CVE-2011-0411-style injection).
            if !s.buf.is_empty() {
                return Err(SmtpError::BadReply);
            }
            let tls = tls_connect(cfg, s.io).await?;
            let mut s = Session::new(tls);
            s.ehlo().await?;
            s.transact(cfg, mail, true).await
        }
        SmtpSecurity::None => {
            let mut s = Session::new(tcp);
            s.expect("greeting", 220).await?;
            s.ehlo().await?;
            s.transact(cfg, mail, false).await
        }
    }
}

async fn tls_connect(
    cfg: &SmtpConfig,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SmtpError> {
    let tls_err = |e: String| SmtpError::Tls(cfg.host.clone(), e);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = &cfg.extra_roots_pem {
        let mut rd = pem.as_bytes();
        for cert in rustls_pemfile_certs(&mut rd).map_err(tls_err)? {
            roots.add(cert).map_err(|e| tls_err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(cfg.host.clone()).map_err(|e| tls_err(e.to_string()))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(e.to_string()))
}

/// The certificates of a PEM text.
fn rustls_pemfile_certs(
    rd: &mut &[u8],
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(rd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("extra CA certificates: {e}"))
}

/// Replies longer than this are refused (a relay's are a few hundred bytes).
const MAX_REPLY: usize = 64 * 1024;

struct Session<S> {
    io: S,
    /// Bytes read past the last reply.
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(io: S) -> Self {
        Session {
            io,
            buf: Vec::new(),
        }
    }

    /// One reply: its code and its lines' texts.
    async fn reply(&mut self) -> Result<(u16, Vec<String>), SmtpError> {
        let mut lines = Vec::new();
        loop {
            let line = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                    break String::from_utf8_lossy(&line[..i]).into_owned();
                }
                if self.buf.len() > MAX_REPLY {
                    return Err(SmtpError::BadReply);
                }
                let mut chunk = [0u8; 1024];
                let n = self.io.read(&mut chunk).await?;
                if n == 0 {
                    return Err(SmtpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            };
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or(SmtpError::BadReply)?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Ok((code, lines));
            }
        }
    }

    async fn expect(&mut self, step: &'static str, want: u16) -> Result<Vec<String>, SmtpError> {
        let (code, lines) = self.reply().await?;
        if code != want {
            return Err(SmtpError::Refused {
                step,
                code,
                text: lines.join(" "),
            });
        }
        Ok(lines)
    }

    async fn command(
        &mut self,
        step: &'static str,
        line: &str,
        want: u16,
    ) -> Result<Vec<String>, SmtpError> {
        self.io.write_all(format!("{line}\r\n").as_bytes()).await?;
        self.io.flush().await?;
        self.expect(step, want).await
    }

    /// EHLO; the extensions offered (first word of each line after the
    /// greeting line).
    async fn ehlo(&mut self) -> Result<Vec<String>, SmtpError> {
        let lines = self.command("EHLO", "EHLO m2mhub", 250).await?;
        Ok(lines
            .iter()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
            .collect())
    }

    async fn transact(
        &mut self,
        cfg: &SmtpConfig,
        mail: &Mail,
        secure: bool,
    ) -> Result<(), SmtpError> {
        if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
            if !secure {
                return Err(SmtpError::Config(
                    "refusing to send the SMTP password without TLS (reports.smtp.security)".into(),
                ));
            }
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("\0{user}\0{pass}").as_bytes());
            // The command holds the password: never log it.
            self.command("AUTH", &format!("AUTH PLAIN {token}"), 235)
                .await?;
        }
        self.command("MAIL FROM", &format!("MAIL FROM:<{}>", cfg.from), 250)
            .await?;
        for to in &mail.to {
            let (code, lines) = {
                self.io
                    .write_all(format!("RCPT TO:<{to}>\r\n").as_bytes())
                    .await?;
                self.io.flush().await?;
                self.reply().await?
            };
            if code != 250 && code != 251 {
                return Err(SmtpError::Refused {
                    step: "RCPT TO",
                    code,
                    text: lines.join(" "),
                });
            }
        }
        self.command("DATA", "DATA", 354).await?;
        let msg = message(cfg, mail);
        self.io.write_all(dot_stuff(&msg).as_bytes()).await?;
        self.command("end of DATA", ".", 250).await?;
        // The message is accepted; a relay that drops QUIT changes nothing.
        let _ = self.command("QUIT", "QUIT", 221).await;
        Ok(())
    }
}

/// Lines starting with `.` get another (RFC 5321 §4.5.2); the message ends
/// with CRLF so the terminating `.` line follows.
fn dot_stuff(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len() + 16);
    for line in msg.split("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

fn b64_lines(data: &[u8]) -> String {
    let enc = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = String::with_capacity(enc.len() + enc.len() / 38);
    for chunk in enc.as_bytes().chunks(76) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push_str("\r\n");
    }
    out
}

/// An RFC 2047 encoded word when the text is not plain printable ASCII.
fn header_text(s: &str) -> String {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        s.to_string()
    } else {
        format!(
            "=?utf-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
        )
    }
}

/// The message: headers, an HTML part and the attachments, all base64.
pub fn message(cfg: &SmtpConfig, mail: &Mail) -> String {
    let boundary = format!("m2mhub-{}", mail.id);
    let date =
        jiff::fmt::rfc2822::to_string(&jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC))
            .unwrap_or_default();
    let mut m = String::new();
    m.push_str(&format!("From: <{}>\r\n", cfg.from));
    let to: Vec<String> = mail.to.iter().map(|t| format!("<{t}>")).collect();
    m.push_str(&format!("To: {}\r\n", to.join(", ")));
    m.push_str(&format!("Subject: {}\r\n", header_text(&mail.subject)));
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!("Message-ID: <{}@m2mhub>\r\n", mail.id));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ));
    m.push_str(&b64_lines(mail.html.as_bytes()));
    for (name, ctype, data) in &mail.attachments {
        m.push_str(&format!(
            "--{boundary}\r\nContent-Type: {ctype}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ));
        m.push_str(&b64_lines(data));
    }
    m.push_str(&format!("--{boundary}--"));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_not_in_debug_output() {
        let cfg = SmtpConfig {
            host: "h".into(),
            port: 1,
            security: SmtpSecurity::StartTls,
            username: Some("u".into()),
            password: Some("hunter2".into()),
            from: "r@example.com".into(),
            extra_roots_pem: None,
            timeout: Duration::from_secs(1),
        };
        let d = format!("{cfg:?}");
        assert!(!d.contains("hunter2") && d.contains("redacted"), "{d}");
    }

    #[test]
    fn dot_lines_are_stuffed() {
        assert_eq!(dot_stuff("a\r\n.b\r\n."), "a\r\n..b\r\n..\r\n");
    }
}
