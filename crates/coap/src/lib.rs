//! CoAP for m2mhub: RFC 7252 over UDP, with Observe (RFC 7641) and
//! block-wise transfer (RFC 7959).
//!
//! # Model
//!
//! Everything that is protocol is sans-IO and driven by the caller's
//! clock, in layers that each own one concern:
//!
//! * [`message`] — the wire format: bytes in, [`message::Message`] out (and
//!   back), with the RFC's answer to a malformed message
//!   ([`message::Rejection`]: Reset for a CON, silence otherwise, 4.02 for an
//!   unrecognised critical option).
//! * [`exchange`] — the message layer for all peers of one socket
//!   ([`exchange::Endpoint`]): message ids and tokens, CON retransmission
//!   with randomised exponential back-off, duplicate detection answered from
//!   a cache, piggybacked or separate responses, Reset matching. Bounded
//!   tables refuse with 5.03 + Max-Age rather than grow.
//! * [`block`] and [`observe`] — block-wise reassembly and slicing, and the
//!   observer registry with its sequence numbers and CON cadence.
//! * [`server`] — the server core joining them with the per-address
//!   [`rate_limit`] and the amplification limit: the application sees
//!   whole [`Request`]s and answers whole [`Response`]s.
//!
//! [`udp`] is the only part that touches a socket or a runtime: a tokio task
//! that moves datagrams between a `UdpSocket` and the [`Server`], sleeps
//! until the core's next deadline and runs the application's [`Handler`]
//! per request; a [`Notifier`] pushes new representations to observers.
//! The core's tests step it with a fake clock — no sockets, no sleeps — and
//! the integration tests (`tests/`) run the driver on loopback against a
//! client built from the same [`exchange::Endpoint`] and against libcoap's
//! `coap-client`.
//!
//! [`dtls`] adds CoAPS (DTLS 1.2 with pre-shared keys, sans-IO sessions
//! from the `dimpl` crate) between the socket and the core; requests then
//! carry the device their session's key belongs to. On plain CoAP what
//! stands between a spoofed request and a large reply is the amplification
//! limit ([`CoapConfig::amplification_factor`]): unverified client
//! addresses get small answers, and a large GET is first answered with an
//! RFC 9175 Echo challenge (see [`server`]).

#![forbid(unsafe_code)]

pub mod block;
pub mod client;
pub mod config;
pub mod dtls;
pub mod exchange;
pub mod fuzz;
pub mod message;
pub mod observe;
pub mod rate_limit;
pub mod server;
pub mod udp;

pub use config::{CoapConfig, ConfigError};
pub use message::{Code, Message, MessageType, Token};
pub use server::{Request, Response, Server};
pub use udp::{CoapServer, Handler, Notifier, NotifyError, ServeError};
