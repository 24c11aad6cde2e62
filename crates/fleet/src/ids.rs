//! Numeric ids (alarms, device events) that stay unique when several nodes
//! share one store.
//!
//! Each node numbers from its own counter, in memory (a raise or a device
//! event must not wait for the database). On its own store (SQLite, one
//! process) that counter simply continues from the largest stored id. A
//! shared store (PostgreSQL) hands out *blocks* instead
//! ([`FleetStore::reserve_ids`]): a node numbers inside its block and
//! reserves the next one when it is used up — one round trip per
//! [`ID_BLOCK`] ids. Ids stay increasing per node but interleave across
//! nodes, which is all the listings need (newest first, `before` cursors).

use crate::store::FleetStore;
use m2mhub_identity::{RegistryError, Result};

/// What the ids number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Alarm,
    DeviceEvent,
}

impl IdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdKind::Alarm => "alarm",
            IdKind::DeviceEvent => "device_event",
        }
    }
}

/// How many ids a node reserves at a time from a shared store.
pub const ID_BLOCK: u64 = 1000;

/// A node's ids of one kind.
#[derive(Debug, Default)]
pub(crate) struct IdBlock {
    next: u64,
    /// One past the last id of the block; `u64::MAX` when the store needs
    /// no reservation.
    end: u64,
}

impl IdBlock {
    /// Ids after `last` (the largest stored), from a block of the store's
    /// when it hands them out.
    pub(crate) fn open(store: &dyn FleetStore, kind: IdKind, last: u64) -> Result<IdBlock> {
        Ok(match store.reserve_ids(kind, ID_BLOCK)? {
            None => IdBlock {
                next: last + 1,
                end: u64::MAX,
            },
            Some(first) => IdBlock {
                next: first,
                end: first.saturating_add(ID_BLOCK),
            },
        })
    }

    /// The next id, reserving a new block first when this one is used up.
    pub(crate) fn take(&mut self, store: &dyn FleetStore, kind: IdKind) -> Result<u64> {
        if self.next >= self.end {
            let first = store.reserve_ids(kind, ID_BLOCK)?.ok_or_else(|| {
                RegistryError::Storage(format!(
                    "the store stopped handing out {} ids",
                    kind.as_str()
                ))
            })?;
            self.next = first;
            self.end = first.saturating_add(ID_BLOCK);
        }
        let id = self.next;
        self.next += 1;
        Ok(id)
    }
}
