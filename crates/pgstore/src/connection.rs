//! One PostgreSQL connection on a thread of its own.
//!
//! `postgres::Client` is the blocking face of `tokio-postgres`: every call
//! does a `block_on` on a runtime of the client's own, which panics on a
//! thread that already runs a tokio runtime — and the store traits are
//! called from async handlers. So each store owns one plain thread that
//! owns the client; a trait method sends a job over a channel and waits for
//! its answer on a one-shot reply channel. The thread also serializes the
//! store's calls, as the SQLite store's mutex does.
//!
//! A lost connection fails the call that saw it (a `Storage` error saying
//! so) and the next call connects again, so a restarted or failed-over
//! server costs one failed write, not a restart of m2mhub.

use crate::error::{PgError, PgResult};
use crate::url::PgUrl;
use m2mhub_identity::{RegistryError, Result};
use postgres::Client;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

type Job = Box<dyn FnOnce(&mut Link) + Send>;

/// Runs once on every new connection, before any job (the store's
/// `search_path`).
pub(crate) type Setup = fn(&mut Client) -> PgResult<()>;

/// The handle the store methods use; dropping it ends the thread.
pub(crate) struct Connection {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// The thread's side: the client, if connected, and how to connect again.
pub(crate) struct Link {
    url: PgUrl,
    setup: Setup,
    client: Option<Client>,
}

impl Link {
    /// A link that connects on first use, for a thread that runs its own
    /// loop (the telemetry writer) rather than serving jobs.
    pub(crate) fn new(url: &PgUrl, setup: Setup) -> Link {
        Link {
            url: url.clone(),
            setup,
            client: None,
        }
    }

    fn connect(&mut self) -> Result<&mut Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let mut config = self.url.config().clone();
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(Duration::from_secs(10));
            }
            // A server that vanished without a reset (a partition, a
            // powered-off host) fails the call within about 30 s instead of
            // holding the store's writers for the kernel's 15 minutes: probes
            // on an idle connection, a bound on unacknowledged writes.
            config.keepalives_idle(Duration::from_secs(15));
            config.keepalives_interval(Duration::from_secs(5));
            config.keepalives_retries(3);
            config.tcp_user_timeout(Duration::from_secs(30));
            let mut client = self.url.connect_with(&config).map_err(|e| {
                RegistryError::Storage(format!(
                    "cannot connect to PostgreSQL at {}: {}",
                    self.url.target(),
                    RegistryError::from(PgError::from(e))
                ))
            })?;
            (self.setup)(&mut client).map_err(RegistryError::from)?;
            tracing::debug!(server = %self.url.target(), "connected to PostgreSQL");
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| RegistryError::Storage("no PostgreSQL connection".into()))
    }

    /// Run `f` on a live connection; a connection found broken afterwards
    /// is dropped, so the next call connects again.
    pub(crate) fn call<T>(&mut self, f: impl FnOnce(&mut Client) -> PgResult<T>) -> Result<T> {
        let client = self.connect()?;
        let out = f(client);
        // The server may say it is ending the session (a FATAL error, an
        // administrator's or a shutdown's termination) before the client
        // has noticed the socket close: that connection is gone too.
        let ended = match &out {
            Err(PgError::Postgres(e)) => e.is_closed() || ends_session(e),
            _ => false,
        };
        if client.is_closed() || ended {
            self.client = None;
            let e = match out {
                Ok(_) => return out.map_err(Into::into),
                Err(e) => RegistryError::from(e),
            };
            tracing::warn!(server = %self.url.target(), error = %e, "lost the PostgreSQL connection; the next call reconnects");
            return Err(RegistryError::Storage(format!(
                "lost the connection to PostgreSQL at {} ({e}); the next call reconnects",
                self.url.target()
            )));
        }
        out.map_err(Into::into)
    }
}

/// An error after which the server has closed the session: FATAL, or
/// class 57 (operator intervention: terminated, shutting down).
fn ends_session(e: &postgres::Error) -> bool {
    let fatal = e
        .as_db_error()
        .is_some_and(|d| matches!(d.severity(), "FATAL" | "PANIC"));
    fatal || e.code().is_some_and(|c| c.code().starts_with("57"))
}

impl Connection {
    /// Connect (failing now if the server cannot be reached), run `init`
    /// once (the migrations) and `setup` on this and every later
    /// connection, then serve jobs on a thread named `name`. Even the first
    /// connect happens on that thread: `open` is called from async code too.
    pub(crate) fn open(
        name: &str,
        url: &PgUrl,
        init: impl FnOnce(&mut Client) -> PgResult<()> + Send + 'static,
        setup: Setup,
    ) -> Result<Connection> {
        let mut link = Link {
            url: url.clone(),
            setup: |_| Ok(()),
            client: None,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready, opened) = mpsc::sync_channel::<Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = link.call(init).and_then(|()| {
                    // A fresh connection with the store's own settings.
                    link.client = None;
                    link.setup = setup;
                    link.connect().map(|_| ())
                });
                let ok = result.is_ok();
                // `open` waits for this; if it is gone there is no one to tell.
                let _ = ready.send(result);
                if ok {
                    for job in rx {
                        job(&mut link);
                    }
                }
            })?;
        // Dropped on an error: the thread has returned, and is joined.
        let conn = Connection {
            jobs: Some(tx),
            thread: Some(thread),
        };
        opened.recv().map_err(|_| {
            RegistryError::Storage("the PostgreSQL store's thread stopped while opening".into())
        })??;
        Ok(conn)
    }

    /// Run `f` with the client on the connection's thread and wait for it.
    /// `f` owns what it needs (the caller clones its arguments in), since
    /// it runs on another thread.
    pub(crate) fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> PgResult<T> + Send + 'static,
    {
        let stopped = || RegistryError::Storage("the PostgreSQL store's thread has stopped".into());
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |link| {
            // The caller waits for this; if it is gone there is no one to tell.
            let _ = reply.send(link.call(f));
        });
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }
}

impl Connection {
    /// [`Connection::run`] with a value moved to the thread (the caller's
    /// record, cloned): `f` gets the client and the value.
    pub(crate) fn with<V, T>(
        &self,
        v: V,
        f: impl FnOnce(&mut Client, V) -> PgResult<T> + Send + 'static,
    ) -> Result<T>
    where
        V: Send + 'static,
        T: Send + 'static,
    {
        self.run(move |c| f(c, v))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once queued jobs ran.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a PostgreSQL store thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_server_is_a_clear_storage_error_without_the_password() {
        // Port 1 on loopback: nothing listens, the connect is refused.
        let url = PgUrl::parse("postgres://hub:pw-s3cret@127.0.0.1:1/meta").expect("url");
        let e = Connection::open("pg-test", &url, |_| Ok(()), |_| Ok(()))
            .err()
            .expect("no server");
        let m = e.to_string();
        assert!(matches!(e, RegistryError::Storage(_)), "{m}");
        assert!(
            m.contains("cannot connect to PostgreSQL at hub@127.0.0.1:1/meta"),
            "{m}"
        );
        assert!(!m.contains("pw-s3cret"), "{m}");
    }
}
