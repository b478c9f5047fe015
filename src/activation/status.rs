//! What the supervisor interface (`org.broker.Supervisor1`) reports about each activatable
//! service: its state, main process, start time and count, and how it last ended or failed.
//!
//! The bus updates a record where a start begins, succeeds (the name is taken), fails, and where
//! the service's process exits. Each update says whether the state changed, so that the bus can
//! emit `ServiceStateChanged` exactly once per change.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::supervisor::ExitKind;

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    /// Never started, stopped, or exited after running.
    #[default]
    Inactive,
    /// Spawned, and its name not yet taken.
    Starting,
    /// Its name is owned.
    Running,
    /// Its last start failed.
    Failed,
}

impl State {
    /// The state's name on the bus and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Inactive => "inactive",
            State::Starting => "starting",
            State::Running => "running",
            State::Failed => "failed",
        }
    }
}

/// What is known of one service.
#[derive(Debug, Clone, Default)]
struct Record {
    state: State,
    /// The process that owns the name (while running) or was spawned (while starting).
    main_pid: u32,
    /// The process spawned by the last start: its pid is its process group's id.
    group: u32,
    started_at: Option<SystemTime>,
    starts: u32,
    last_exit: String,
    last_failure: String,
}

/// A copy of one service's record, for the driver to reply with.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: State,
    pub main_pid: u32,
    /// Microseconds since the epoch of the last start; 0 if never started.
    pub started_at_us: u64,
    pub starts: u32,
    pub last_exit: String,
    pub last_failure: String,
}

/// The records of every service started since the bus began, by name.
#[derive(Debug, Default)]
pub struct ServiceStatus {
    records: BTreeMap<String, Record>,
}

impl ServiceStatus {
    /// The record of `name`; a service never started has the default one.
    pub fn snapshot(&self, name: &str) -> Snapshot {
        let record = self.records.get(name).cloned().unwrap_or_default();
        let started_at_us = record
            .started_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let alive = matches!(record.state, State::Starting | State::Running);
        Snapshot {
            state: record.state,
            main_pid: if alive { record.main_pid } else { 0 },
            started_at_us,
            starts: record.starts,
            last_exit: record.last_exit,
            last_failure: record.last_failure,
        }
    }

    /// A start of `name` spawned `pid`. Returns whether the state changed.
    pub fn starting(&mut self, name: &str, pid: u32) -> bool {
        let record = self.records.entry(name.to_owned()).or_default();
        record.main_pid = pid;
        record.group = pid;
        record.started_at = Some(SystemTime::now());
        record.starts = record.starts.saturating_add(1);
        set_state(record, State::Starting)
    }

    /// `name` was taken by a connection of process `pid`.
    pub fn running(&mut self, name: &str, pid: u32) -> bool {
        let record = self.records.entry(name.to_owned()).or_default();
        if pid != 0 {
            record.main_pid = pid;
        }
        set_state(record, State::Running)
    }

    /// A start of `name` failed with `message`.
    pub fn failed(&mut self, name: &str, message: &str) -> bool {
        let record = self.records.entry(name.to_owned()).or_default();
        record.last_failure = message.to_owned();
        record.main_pid = 0;
        set_state(record, State::Failed)
    }

    /// Process `pid` was reaped with `status`: it becomes the last exit of the service whose
    /// main or spawned process it was, and a running service whose main process it was is
    /// inactive. Returns the services whose state changed.
    pub fn process_exited(&mut self, pid: u32, status: ExitKind) -> Vec<String> {
        let mut changed = Vec::new();
        for (name, record) in &mut self.records {
            if pid == 0 || (record.main_pid != pid && record.group != pid) {
                continue;
            }
            // A running daemon's spawned parent exiting is not the service's exit.
            if record.main_pid == pid || record.state != State::Running {
                record.last_exit = status.to_string();
            }
            if record.main_pid == pid && record.state == State::Running {
                record.main_pid = 0;
                if set_state(record, State::Inactive) {
                    changed.push(name.clone());
                }
            }
        }
        changed
    }

    /// The process `pid` that owned a running service's name is gone (seen through its pidfd,
    /// possibly before it is reaped). Returns the services whose state changed.
    pub fn owner_gone(&mut self, pid: u32) -> Vec<String> {
        let mut changed = Vec::new();
        for (name, record) in &mut self.records {
            if pid != 0 && record.main_pid == pid && record.state == State::Running {
                // Kept for `process_exited` to name the exit, which may come later.
                record.group = if record.group == 0 { pid } else { record.group };
                if set_state(record, State::Inactive) {
                    changed.push(name.clone());
                }
            }
        }
        changed
    }

    /// The processes to signal to stop `name`: its main process and its spawned process's
    /// group id (0 when unknown). `None` when it is neither starting nor running.
    pub fn stop_targets(&self, name: &str) -> Option<(u32, u32)> {
        let record = self.records.get(name)?;
        matches!(record.state, State::Starting | State::Running)
            .then_some((record.main_pid, record.group))
    }
}

/// Moves `record` to `state`; whether that is a change.
fn set_state(record: &mut Record, state: State) -> bool {
    let changed = record.state != state;
    record.state = state;
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_that_runs_then_exits_goes_back_to_inactive() {
        let mut status = ServiceStatus::default();
        assert!(status.starting("a.B", 10));
        assert!(status.running("a.B", 11));
        assert_eq!(status.snapshot("a.B").main_pid, 11);
        assert_eq!(
            status.process_exited(10, ExitKind::Exited(0)),
            Vec::<String>::new()
        );
        assert_eq!(
            status.process_exited(11, ExitKind::Signaled(9, false)),
            ["a.B"]
        );
        let snap = status.snapshot("a.B");
        assert_eq!(snap.state, State::Inactive);
        assert_eq!(snap.last_exit, "killed by signal 9 (SIGKILL)");
        assert_eq!((snap.starts, snap.main_pid), (1, 0));
        assert!(snap.started_at_us > 0);
    }

    #[test]
    fn a_failed_start_keeps_its_message_and_exit() {
        let mut status = ServiceStatus::default();
        status.starting("a.B", 10);
        assert_eq!(
            status.process_exited(10, ExitKind::Exited(3)),
            Vec::<String>::new()
        );
        assert!(status.failed("a.B", "Process a.B exited with status 3"));
        let snap = status.snapshot("a.B");
        assert_eq!(snap.state, State::Failed);
        assert_eq!(snap.last_exit, "exited with status 3");
        assert_eq!(snap.last_failure, "Process a.B exited with status 3");
        assert_eq!(status.stop_targets("a.B"), None);
    }

    #[test]
    fn the_owner_seen_gone_first_still_gets_its_exit_named() {
        let mut status = ServiceStatus::default();
        status.starting("a.B", 10);
        status.running("a.B", 12);
        assert_eq!(status.owner_gone(12), ["a.B"]);
        assert!(status.process_exited(12, ExitKind::Exited(1)).is_empty());
        assert_eq!(status.snapshot("a.B").last_exit, "exited with status 1");
        assert_eq!(status.snapshot("never.Started").state, State::Inactive);
    }
}
