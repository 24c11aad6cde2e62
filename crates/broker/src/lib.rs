//! The m2mhub MQTT broker.
//!
//! Model: every accepted stream becomes one task (`connection.rs`) that owns
//! the stream and, after CONNECT, a [`Session`] shared with publishers. A
//! PUBLISH is decoded once into an `Arc<Message>`, matched against the
//! subscription trie (`topic_tree.rs`, read-locked: publishers on different
//! cores never block each other) and pushed into each matching session's
//! bounded queue; the owning connection drains its queue in batches and
//! writes them with one system call. Retained messages and persistent
//! sessions are written to `m2mhub-store` (group commit) before the
//! publisher is acknowledged. Authentication and authorization go through
//! the traits in [`auth`], so the device registry plugs in from outside.
//! A [`PublishHook`] lets the platform act on every authorized PUBLISH and
//! hold its acknowledgement until that work is durable (acknowledgements
//! stay in receive order; the connection keeps reading meanwhile).
//! The MQTT session protocol itself (acknowledgements, QoS 2, flow control,
//! keep alive, will delay, takeover) is a sans-IO state machine in
//! `protocol/`, tested with a fake clock; the connection task drives it.
#![forbid(unsafe_code)]

mod ack_queue;
pub mod auth;
pub mod ban;
mod broker;
pub mod cluster;
pub mod config;
mod connection;
mod deadlines;
pub mod events;
mod lazy_buf;
mod limits;
mod listener;
pub mod message;
pub mod metrics;
mod outbound;
mod park;
mod persist;
mod protocol;
mod rate_baseline;
mod retained;
mod route_cache;
pub mod session;
mod signal;
mod sys;
pub mod tls;
mod topic_tree;
mod transport;

pub use ban::{BanInfo, BanKey};
pub use broker::{store_dir, Broker, BrokerError, BrokerParts, ObserverId, SessionInfo};
pub use config::BrokerConfig;
pub use events::{
    AckGate, ConnectionEvents, PublishHook, SecurityEvent, SecurityEventKind, SecurityEvents,
};
pub use limits::TokenBucket;
pub use session::Session;
pub use transport::Transport;
