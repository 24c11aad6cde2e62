//! Device commands: a request sent to one device (by a rule or an
//! operator), and what became of it.
//!
//! A command's id is a short random string that travels with it as the
//! MQTT 5 correlation data, so the device's response finds its command.
//! Its status only moves forward — pending → sent → delivered → one of
//! answered, failed, timed out — whatever order the broker's
//! acknowledgements and the device's answer arrive in: a stale update is
//! ignored (`update_command` returns `Ok(None)`), and a finished command
//! never changes again.
//!
//! Like alarms, commands are written by the registry's background writer:
//! the open ones (not finished) are held in memory, with their deadlines
//! in order so [`Fleet::expire_commands`] looks only at those due, and
//! every change marks the command for the next write. The newest
//! [`KEPT_PER_DEVICE`] finished commands of each device are kept.

use crate::alarm::check_target;
use crate::{random_id, Fleet, RegistryError, Result};
use m2mhub_identity::ids::validate_id;
use m2mhub_identity::now_ms;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Open (unfinished) commands at most, across tenants.
pub const OPEN_LIMIT: usize = 100_000;
/// Finished commands kept per device (older ones are deleted).
pub const KEPT_PER_DEVICE: usize = 1_000;
/// The longest timeout a command may have (a week).
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3_600_000;
/// Parameters, response and error are limited to this many bytes (JSON).
pub const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_ORIGIN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Recorded, not yet published to the device.
    Pending,
    /// Published on the device's command topic.
    Sent,
    /// The device acknowledged the message (PUBACK).
    Delivered,
    /// The device answered (the response is recorded).
    Answered,
    /// It could not be sent, or the device answered with an error.
    Failed,
    /// No answer within the command's timeout.
    TimedOut,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 6] = [
        CommandStatus::Pending,
        CommandStatus::Sent,
        CommandStatus::Delivered,
        CommandStatus::Answered,
        CommandStatus::Failed,
        CommandStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Pending => "pending",
            CommandStatus::Sent => "sent",
            CommandStatus::Delivered => "delivered",
            CommandStatus::Answered => "answered",
            CommandStatus::Failed => "failed",
            CommandStatus::TimedOut => "timed_out",
        }
    }

    /// Answered, failed or timed out: the command will not change again.
    pub fn is_finished(self) -> bool {
        self.rank() == 3
    }

    fn rank(self) -> u8 {
        match self {
            CommandStatus::Pending => 0,
            CommandStatus::Sent => 1,
            CommandStatus::Delivered => 2,
            CommandStatus::Answered | CommandStatus::Failed | CommandStatus::TimedOut => 3,
        }
    }

    /// Whether a command in `self` may move to `next`.
    pub fn can_become(self, next: CommandStatus) -> bool {
        next.rank() > self.rank()
    }
}

impl std::str::FromStr for CommandStatus {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<CommandStatus> {
        CommandStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                RegistryError::Validation(format!(
                    "command status {s:?} must be one of pending, sent, delivered, answered, failed, timed_out"
                ))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// `cmd-` and 16 hex digits; the MQTT 5 correlation data.
    pub id: String,
    pub tenant: String,
    pub device_id: String,
    /// What to do, e.g. `shutdown` (a valid topic level).
    pub name: String,
    pub params: serde_json::Value,
    pub status: CommandStatus,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The device's answer.
    pub response: Option<serde_json::Value>,
    /// Why it failed or timed out.
    pub error: Option<String>,
    /// `rule:<id>` or `operator:<name>`.
    pub origin: String,
    /// Counted from `created_ms`; an unfinished command times out then.
    pub timeout_ms: u64,
}

impl Command {
    /// When an unfinished command times out.
    pub fn deadline_ms(&self) -> i64 {
        self.created_ms
            .saturating_add(i64::try_from(self.timeout_ms).unwrap_or(i64::MAX))
    }
}

/// What `create_command` needs.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub tenant: String,
    pub device_id: String,
    pub name: String,
    pub params: serde_json::Value,
    /// `rule:<id>` or `operator:<name>`.
    pub origin: String,
    /// 1 ms to [`MAX_TIMEOUT_MS`].
    pub timeout_ms: u64,
}

/// A status change, with what arrived with it.
#[derive(Debug, Clone)]
pub struct CommandUpdate {
    pub status: CommandStatus,
    /// Recorded when given (an answer).
    pub response: Option<serde_json::Value>,
    /// Recorded when given (a failure).
    pub error: Option<String>,
}

impl CommandUpdate {
    /// A device's answer, whatever carried it (MQTT, HTTP, CoAP): answered,
    /// or failed when it says `"status": "failed"`; the answer is recorded.
    pub fn answer(response: serde_json::Value) -> CommandUpdate {
        let failed = response.get("status").and_then(serde_json::Value::as_str) == Some("failed");
        CommandUpdate {
            status: if failed {
                CommandStatus::Failed
            } else {
                CommandStatus::Answered
            },
            response: Some(response),
            error: None,
        }
    }

    /// Just a new status.
    pub fn status(status: CommandStatus) -> CommandUpdate {
        CommandUpdate {
            status,
            response: None,
            error: None,
        }
    }
}

/// The in-memory side of commands.
#[derive(Debug, Default)]
pub(crate) struct CommandBook {
    open: HashMap<String, Command>,
    /// (deadline, id) of every open command.
    deadlines: BTreeSet<(i64, String)>,
    /// Open commands changed since the last write.
    dirty: HashSet<String>,
    /// Finished commands not written yet (they have left `open`).
    finished: Vec<Command>,
    /// Creation order of open commands (two created in the same
    /// millisecond still have an order), for devices that poll.
    order: HashMap<String, u64>,
    next_order: u64,
}

impl CommandBook {
    pub(crate) fn load(open: Vec<Command>) -> CommandBook {
        let mut book = CommandBook::default();
        let mut open = open;
        open.sort_by_key(|c| c.created_ms);
        for c in open {
            book.order.insert(c.id.clone(), book.next_order);
            book.next_order += 1;
            book.deadlines.insert((c.deadline_ms(), c.id.clone()));
            book.open.insert(c.id.clone(), c);
        }
        book
    }

    fn finish(&mut self, id: &str) {
        self.order.remove(id);
        if let Some(c) = self.open.remove(id) {
            self.deadlines.remove(&(c.deadline_ms(), c.id.clone()));
            self.dirty.remove(id);
            self.finished.push(c);
        }
    }

    /// Drop an open command another node finished (the store has it): not
    /// written again from here.
    fn forget_finished_elsewhere(&mut self, id: &str) {
        self.order.remove(id);
        if let Some(c) = self.open.remove(id) {
            self.deadlines.remove(&(c.deadline_ms(), c.id.clone()));
            self.dirty.remove(id);
        }
    }

    fn get(&self, id: &str) -> Option<&Command> {
        self.open
            .get(id)
            .or_else(|| self.finished.iter().find(|c| c.id == id))
    }

    pub(crate) fn take_batch(&mut self) -> Vec<Command> {
        let mut out = std::mem::take(&mut self.finished);
        for id in self.dirty.drain() {
            if let Some(c) = self.open.get(&id) {
                out.push(c.clone());
            }
        }
        out
    }

    /// Put back a batch whose write failed (see `AlarmBook::requeue`).
    pub(crate) fn requeue(&mut self, batch: Vec<Command>) {
        for c in batch {
            if self.open.contains_key(&c.id) {
                self.dirty.insert(c.id);
            } else if !self.finished.iter().any(|f| f.id == c.id) {
                self.finished.push(c);
            }
        }
    }

    pub(crate) fn forget_device(&mut self, device_id: &str) {
        let ids: Vec<String> = self
            .open
            .values()
            .filter(|c| c.device_id == device_id)
            .map(|c| c.id.clone())
            .collect();
        for id in ids {
            if let Some(c) = self.open.remove(&id) {
                self.deadlines.remove(&(c.deadline_ms(), id.clone()));
            }
            self.order.remove(&id);
            self.dirty.remove(&id);
        }
        self.finished.retain(|c| c.device_id != device_id);
    }
}

fn json_len(v: &serde_json::Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

fn check_payload(what: &str, v: &serde_json::Value) -> Result<()> {
    if json_len(v) > MAX_PAYLOAD {
        return Err(RegistryError::Validation(format!(
            "command {what} must be at most {MAX_PAYLOAD} bytes of JSON"
        )));
    }
    Ok(())
}

impl Fleet {
    /// Record a new command, `pending`. Whoever publishes it then moves it
    /// on with [`Fleet::update_command`].
    pub fn create_command(&self, new: NewCommand) -> Result<Command> {
        validate_id("command name", &new.name)?;
        check_payload("parameters", &new.params)?;
        if new.origin.is_empty()
            || new.origin.len() > MAX_ORIGIN
            || new.origin.chars().any(char::is_control)
        {
            return Err(RegistryError::Validation(format!(
                "command origin must be 1 to {MAX_ORIGIN} characters without control characters"
            )));
        }
        if new.timeout_ms == 0 || new.timeout_ms > MAX_TIMEOUT_MS {
            return Err(RegistryError::Validation(format!(
                "command timeout must be between 1 ms and {} s",
                MAX_TIMEOUT_MS / 1000
            )));
        }
        let s = &*self.shared;
        check_target(&s.identity, &new.tenant, &new.device_id)?;
        let now = now_ms();
        let mut book = s.commands.lock();
        if book.open.len() >= OPEN_LIMIT {
            return Err(RegistryError::Conflict(format!(
                "{OPEN_LIMIT} commands are unfinished: wait for them to be answered or time out"
            )));
        }
        let id = loop {
            let id = random_id("cmd-");
            if !book.open.contains_key(&id) {
                break id;
            }
        };
        let c = Command {
            id,
            tenant: new.tenant,
            device_id: new.device_id,
            name: new.name,
            params: new.params,
            status: CommandStatus::Pending,
            created_ms: now,
            updated_ms: now,
            response: None,
            error: None,
            origin: new.origin,
            timeout_ms: new.timeout_ms,
        };
        book.deadlines.insert((c.deadline_ms(), c.id.clone()));
        book.dirty.insert(c.id.clone());
        let order = book.next_order;
        book.next_order += 1;
        book.order.insert(c.id.clone(), order);
        book.open.insert(c.id.clone(), c.clone());
        Ok(c)
    }

    /// Move a command forward. `Ok(None)` when the update is stale (not a
    /// step forward, e.g. a late acknowledgement after the answer, or
    /// anything after the command finished): nothing changes.
    pub fn update_command(&self, id: &str, u: CommandUpdate) -> Result<Option<Command>> {
        if let Some(r) = &u.response {
            check_payload("response", r)?;
        }
        if u.error.as_ref().is_some_and(|e| e.len() > MAX_PAYLOAD) {
            return Err(RegistryError::Validation(format!(
                "command error must be at most {MAX_PAYLOAD} bytes"
            )));
        }
        let s = &*self.shared;
        {
            let mut book = s.commands.lock();
            if let Some(c) = book.open.get_mut(id) {
                if !advance(c, u) {
                    return Ok(None);
                }
                let c = c.clone();
                if c.status.is_finished() {
                    book.finish(id);
                } else {
                    book.dirty.insert(c.id.clone());
                }
                return Ok(Some(c));
            }
        }
        // Not open here. Another node sharing the store may have created
        // it (the device answered through this node): move the stored one
        // forward. Holding the flush lock, no batch is between this node's
        // book and the store.
        let _f = s.flush_lock.lock();
        if s.commands.lock().get(id).is_some() {
            // Finished here (a stale update).
            return Ok(None);
        }
        let Some(mut c) = s.store.get_command(id)? else {
            return Err(RegistryError::NotFound(format!("command {id}")));
        };
        if c.status.is_finished() || !advance(&mut c, u) {
            return Ok(None);
        }
        s.store.append(&crate::store::FleetBatch {
            device_events: &[],
            device_events_kept: crate::device_event::KEPT_PER_DEVICE,
            alarms: &[],
            alarms_kept: crate::alarm::CLEARED_KEPT_PER_DEVICE,
            commands: std::slice::from_ref(&c),
            commands_kept: KEPT_PER_DEVICE,
        })?;
        Ok(Some(c))
    }

    /// Time out every unfinished command whose deadline is at or before
    /// `now_ms`, and return them (as timed out).
    pub fn expire_commands(&self, now_ms: i64) -> Vec<Command> {
        let s = &*self.shared;
        // A command due here may have been answered through another node
        // sharing the store: the stored copy says so, and is kept. (With a
        // store of its own the book is ahead of the store, which then never
        // holds a finished copy of a command open here.)
        let due: Vec<String> = {
            let book = s.commands.lock();
            book.deadlines
                .iter()
                .take_while(|(d, _)| *d <= now_ms)
                .map(|(_, id)| id.clone())
                .collect()
        };
        if !due.is_empty() {
            let _f = s.flush_lock.lock();
            for id in due {
                if let Ok(Some(stored)) = s.store.get_command(&id) {
                    if stored.status.is_finished() {
                        s.commands.lock().forget_finished_elsewhere(&id);
                    }
                }
            }
        }
        let mut book = self.shared.commands.lock();
        let mut out = Vec::new();
        while let Some((deadline, id)) = book.deadlines.first().cloned() {
            if deadline > now_ms {
                break;
            }
            if let Some(c) = book.open.get_mut(&id) {
                c.error = Some(format!(
                    "no answer within {} ms (last status: {})",
                    c.timeout_ms,
                    c.status.as_str()
                ));
                c.status = CommandStatus::TimedOut;
                c.updated_ms = now_ms;
                out.push(c.clone());
            }
            book.finish(&id);
            book.deadlines.remove(&(deadline, id));
        }
        out
    }

    /// One command, open or finished.
    pub fn get_command(&self, id: &str) -> Result<Command> {
        let s = &*self.shared;
        // Holding the flush lock, no batch is between the book and the
        // store.
        let _f = s.flush_lock.lock();
        if let Some(c) = s.commands.lock().get(id) {
            return Ok(c.clone());
        }
        s.store
            .get_command(id)?
            .ok_or_else(|| RegistryError::NotFound(format!("command {id}")))
    }

    /// A device's commands, newest first: of `tenant` if given, older than
    /// the command `before` if given (the paging cursor), at most `limit`
    /// (1 to 1,000).
    pub fn list_commands(
        &self,
        tenant: Option<&str>,
        device_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Command>> {
        self.flush()?;
        self.shared
            .store
            .list_commands(tenant, device_id, before, limit.clamp(1, 1_000))
    }

    /// Hand a device that polls for commands (HTTP, CoAP) its oldest
    /// command not yet delivered: it becomes `delivered` in the same step,
    /// so two polls never get the same command. `None` when nothing waits.
    pub fn take_next_command(&self, device_id: &str) -> Option<Command> {
        let mut book = self.shared.commands.lock();
        let next = book
            .open
            .values()
            .filter(|c| {
                c.device_id == device_id
                    && matches!(c.status, CommandStatus::Pending | CommandStatus::Sent)
            })
            .min_by_key(|c| book.order.get(&c.id).copied().unwrap_or(u64::MAX))?
            .id
            .clone();
        let c = book.open.get_mut(&next)?;
        c.status = CommandStatus::Delivered;
        c.updated_ms = now_ms();
        let c = c.clone();
        book.dirty.insert(next);
        Some(c)
    }

    /// How many commands are unfinished.
    pub fn open_commands(&self) -> usize {
        self.shared.commands.lock().open.len()
    }
}

/// Apply `u` if it is a step forward for `c`; false (and `c` unchanged)
/// when it is stale.
fn advance(c: &mut Command, u: CommandUpdate) -> bool {
    if !c.status.can_become(u.status) {
        return false;
    }
    c.status = u.status;
    c.updated_ms = now_ms();
    if u.response.is_some() {
        c.response = u.response;
    }
    if u.error.is_some() {
        c.error = u.error;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::open;
    use m2mhub_identity::NewDevice;
    use serde_json::json;

    fn setup() -> (tempfile::TempDir, Fleet) {
        let (d, reg) = open();
        reg.identity()
            .create_tenant("acme", "Acme")
            .expect("tenant");
        for id in ["d1", "d2"] {
            reg.identity()
                .create_device(NewDevice {
                    id: Some(id.into()),
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .expect("device");
        }
        (d, reg)
    }

    fn new(device: &str, name: &str, timeout_ms: u64) -> NewCommand {
        NewCommand {
            tenant: "acme".into(),
            device_id: device.into(),
            name: name.into(),
            params: json!({"delay": 5}),
            origin: "rule:r1".into(),
            timeout_ms,
        }
    }

    fn step(reg: &Fleet, id: &str, s: CommandStatus) -> Option<Command> {
        reg.update_command(id, CommandUpdate::status(s))
            .expect("update")
    }

    #[test]
    fn status_only_moves_forward() {
        let (_d, reg) = setup();
        let c = reg
            .create_command(new("d1", "shutdown", 30_000))
            .expect("create");
        assert_eq!(c.status, CommandStatus::Pending);
        assert!(c.id.starts_with("cmd-") && c.id.len() == 20, "{}", c.id);
        assert_eq!(
            step(&reg, &c.id, CommandStatus::Sent).map(|c| c.status),
            Some(CommandStatus::Sent)
        );
        assert!(
            step(&reg, &c.id, CommandStatus::Sent).is_none(),
            "not a step forward"
        );
        assert!(step(&reg, &c.id, CommandStatus::Pending).is_none());
        assert!(step(&reg, &c.id, CommandStatus::Delivered).is_some());
        let a = reg
            .update_command(
                &c.id,
                CommandUpdate {
                    status: CommandStatus::Answered,
                    response: Some(json!({"ok": true})),
                    error: None,
                },
            )
            .expect("answer")
            .expect("applied");
        assert_eq!(a.response, Some(json!({"ok": true})));
        // A late acknowledgement, a timeout, a failure: all too late.
        for s in [
            CommandStatus::Delivered,
            CommandStatus::TimedOut,
            CommandStatus::Failed,
        ] {
            assert!(step(&reg, &c.id, s).is_none());
        }
        reg.flush().expect("flush");
        assert!(
            step(&reg, &c.id, CommandStatus::Failed).is_none(),
            "also once written"
        );
        let got = reg.get_command(&c.id).expect("get");
        assert_eq!(got.status, CommandStatus::Answered);
        assert_eq!(got.response, Some(json!({"ok": true})));
        assert_eq!(got.params, json!({"delay": 5}));
        assert_eq!(got.origin, "rule:r1");
        assert_eq!(reg.open_commands(), 0);

        // Skipping steps is fine; failing records the error.
        let f = reg
            .create_command(new("d1", "reboot", 30_000))
            .expect("create");
        let failed = reg
            .update_command(
                &f.id,
                CommandUpdate {
                    status: CommandStatus::Failed,
                    response: None,
                    error: Some("device offline".into()),
                },
            )
            .expect("fail")
            .expect("applied");
        assert_eq!(failed.error.as_deref(), Some("device offline"));
        assert!(matches!(
            reg.update_command("cmd-nope", CommandUpdate::status(CommandStatus::Sent)),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn validation() {
        let (_d, reg) = setup();
        let bad = |c: NewCommand| reg.create_command(c).expect_err("refused");
        assert!(matches!(
            bad(new("d1", "", 1_000)),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(new("d1", "a/b", 1_000)),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(new("d1", "x", 0)),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(new("d1", "x", MAX_TIMEOUT_MS + 1)),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(NewCommand {
                origin: String::new(),
                ..new("d1", "x", 1_000)
            }),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(NewCommand {
                params: json!("x".repeat(MAX_PAYLOAD)),
                ..new("d1", "x", 1_000)
            }),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(NewCommand {
                tenant: "default".into(),
                ..new("d1", "x", 1_000)
            }),
            RegistryError::Validation(_)
        ));
        assert!(matches!(
            bad(NewCommand {
                tenant: "nope".into(),
                ..new("d1", "x", 1_000)
            }),
            RegistryError::NotFound(_)
        ));
        assert!("timed_out".parse::<CommandStatus>().is_ok());
        assert!("done".parse::<CommandStatus>().is_err());
    }

    #[test]
    fn unanswered_commands_time_out() {
        let (_d, reg) = setup();
        let a = reg.create_command(new("d1", "a", 100)).expect("create");
        let b = reg.create_command(new("d1", "b", 10_000)).expect("create");
        let c = reg.create_command(new("d2", "c", 100)).expect("create");
        step(&reg, &a.id, CommandStatus::Delivered);
        step(&reg, &c.id, CommandStatus::Answered);
        assert!(reg.expire_commands(a.created_ms + 99).is_empty());
        let expired = reg.expire_commands(a.deadline_ms().max(c.deadline_ms()));
        assert_eq!(expired.len(), 1, "the answered one does not time out");
        assert_eq!(expired[0].id, a.id);
        assert_eq!(expired[0].status, CommandStatus::TimedOut);
        assert!(
            expired[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("100 ms") && e.contains("delivered")),
            "{:?}",
            expired[0].error
        );
        assert!(
            step(&reg, &a.id, CommandStatus::Answered).is_none(),
            "too late"
        );
        assert_eq!(
            reg.get_command(&a.id).expect("get").status,
            CommandStatus::TimedOut
        );
        assert!(reg.expire_commands(a.deadline_ms() + 1).is_empty(), "once");
        assert_eq!(reg.expire_commands(b.deadline_ms()).len(), 1);
        assert_eq!(reg.open_commands(), 0);
    }

    #[test]
    fn listing_is_per_device_newest_first_and_paged() {
        let (_d, reg) = setup();
        let mut ids = Vec::new();
        for i in 0..12 {
            ids.push(
                reg.create_command(new("d1", &format!("c{i}"), 60_000))
                    .expect("create")
                    .id,
            );
        }
        reg.create_command(new("d2", "other", 60_000))
            .expect("create");
        step(&reg, &ids[3], CommandStatus::Failed);
        let p1 = reg
            .list_commands(Some("acme"), "d1", None, 5)
            .expect("list");
        let p2 = reg
            .list_commands(Some("acme"), "d1", p1.last().map(|c| c.id.as_str()), 5)
            .expect("list");
        let p3 = reg
            .list_commands(None, "d1", p2.last().map(|c| c.id.as_str()), 5)
            .expect("list");
        assert_eq!((p1.len(), p2.len(), p3.len()), (5, 5, 2));
        let mut all: Vec<String> = p1
            .iter()
            .chain(&p2)
            .chain(&p3)
            .map(|c| c.id.clone())
            .collect();
        assert_eq!(all.len(), 12);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 12, "no command twice");
        assert!(p1
            .windows(2)
            .all(|w| (w[0].created_ms, &w[0].id) > (w[1].created_ms, &w[1].id)));
        assert!(reg
            .list_commands(Some("default"), "d1", None, 5)
            .expect("list")
            .is_empty());
        assert!(reg
            .list_commands(None, "d1", Some("cmd-unknown"), 5)
            .expect("list")
            .is_empty());
        let failed = p1
            .iter()
            .chain(&p2)
            .chain(&p3)
            .find(|c| c.id == ids[3])
            .expect("listed");
        assert_eq!(failed.status, CommandStatus::Failed);
    }

    #[test]
    fn reopen_keeps_open_commands_expirable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (open_cmd, done) = {
            let reg = crate::testutil::open_in(dir.path());
            reg.identity()
                .create_device(NewDevice {
                    id: Some("d1".into()),
                    ..Default::default()
                })
                .expect("device");
            let c = reg
                .create_command(NewCommand {
                    tenant: "default".into(),
                    ..new("d1", "a", 1_000)
                })
                .expect("create");
            step(&reg, &c.id, CommandStatus::Sent);
            let d = reg
                .create_command(NewCommand {
                    tenant: "default".into(),
                    ..new("d1", "b", 1_000)
                })
                .expect("create");
            step(&reg, &d.id, CommandStatus::Answered);
            (c, d.id)
        };
        let reg = crate::testutil::open_in(dir.path());
        assert_eq!(reg.open_commands(), 1);
        assert_eq!(
            reg.get_command(&open_cmd.id).expect("get").status,
            CommandStatus::Sent
        );
        assert_eq!(
            reg.get_command(&done).expect("get").status,
            CommandStatus::Answered
        );
        let expired = reg.expire_commands(open_cmd.deadline_ms());
        assert_eq!(expired.len(), 1);
        reg.identity().delete_device("d1").expect("delete");
        assert!(matches!(
            reg.get_command(&done),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            reg.get_command(&open_cmd.id),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn polling_takes_the_oldest_undelivered_command_once() {
        let (_d, reg) = setup();
        let a = reg.create_command(new("d1", "first", 60_000)).expect("a");
        let b = reg.create_command(new("d1", "second", 60_000)).expect("b");
        let other = reg.create_command(new("d2", "theirs", 60_000)).expect("c");
        step(&reg, &b.id, CommandStatus::Sent);
        let got = reg.take_next_command("d1").expect("one waits");
        assert_eq!(got.id, a.id);
        assert_eq!(got.status, CommandStatus::Delivered);
        let got = reg.take_next_command("d1").expect("the second");
        assert_eq!(got.id, b.id);
        assert!(reg.take_next_command("d1").is_none(), "each command once");
        // A late "sent" from the publisher does not move it back.
        assert!(step(&reg, &a.id, CommandStatus::Sent).is_none());
        assert_eq!(
            reg.get_command(&a.id).expect("a").status,
            CommandStatus::Delivered
        );
        assert_eq!(reg.take_next_command("d2").map(|c| c.id), Some(other.id));
    }
}
