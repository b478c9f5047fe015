//! What happens outside the message flow that the bus core must react to: processes that
//! exit, timers that run out, activation directories that change. Their sources send a
//! `CoreEvent`; the server's loop hands each one to the core (`Bus::handle_event`).

use crate::connection::PeerId;
use crate::supervisor::{InstanceGone, ProcessEvent};

/// What happens outside the message flow that the bus core must react to.
#[derive(Debug)]
pub enum CoreEvent {
    /// The reaper collected a process.
    Exited(ProcessEvent),
    /// Every process of one service start has ended (its keeper exited).
    InstanceGone(InstanceGone),
    /// A start has run out of time (`generation` tells which start).
    StartTimedOut { name: String, generation: u64 },
    /// The process that owns the names of this connection has exited.
    OwnerExited { peer: PeerId },
    /// The activation files should be read again.
    Reload(&'static str),
    /// `reply_timeout` has passed for the call `serial` that `caller` made to `callee`.
    ReplyTimedOut {
        caller: PeerId,
        serial: u32,
        callee: PeerId,
    },
}
