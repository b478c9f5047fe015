//! Connections that have not finished joining the bus, counted by uid: from `accept` through
//! the handshake until `Hello` is answered, as dbus-daemon counts its "incomplete" connections.
//! They are bounded by `max_incomplete_connections` and each has `auth_timeout` to finish.
//!
//! When a new connection takes the count past the limit, the bus does not refuse it: it closes
//! the oldest incomplete connection of the uid that holds the most. Refusing the newest would
//! let anyone who opens enough silent connections lock everyone else out; closing the oldest of
//! the biggest holder means that a uid can only ever push out its own connections once it holds
//! more than anyone else, and that a real client, which finishes joining in a few milliseconds,
//! gets in even while its own uid floods the bus.

use rustc_hash::FxHashMap as HashMap;
use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::rc::Rc;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::connection::PeerId;

/// One incomplete connection's place in the count.
pub struct Ticket {
    pub uid: u32,
    /// Order of arrival: the lowest of a uid is its oldest.
    seq: u64,
    /// The connection must have joined by then.
    pub deadline: Instant,
    /// Its peer, once the handshake is done.
    peer: Cell<Option<PeerId>>,
    /// It no longer counts: it joined, closed, or was pushed out.
    left: Cell<bool>,
    /// It was pushed out for a newer connection.
    evicted: Cell<bool>,
    wake: Notify,
}

/// Why an incomplete connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Pushed out: `max_incomplete_connections` was reached and its uid held the most.
    Evicted,
    /// It did not finish joining within `auth_timeout`.
    TimedOut,
}

impl Ticket {
    /// Resolves when the connection must close; `None` once it has joined (or closed) instead.
    pub async fn lost(&self) -> Option<Lost> {
        if !self.left.get() {
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(self.deadline) => {}
            }
        }
        if self.evicted.get() {
            Some(Lost::Evicted)
        } else if self.left.get() {
            None
        } else {
            Some(Lost::TimedOut)
        }
    }
}

/// The incomplete connections of every uid.
#[derive(Default)]
pub struct Admission {
    by_uid: HashMap<u32, BTreeMap<u64, Rc<Ticket>>>,
    /// Tickets of connections past the handshake, waiting for `Hello`.
    by_peer: HashMap<PeerId, Rc<Ticket>>,
    total: usize,
    next_seq: u64,
}

impl Admission {
    /// Counts a new connection of `uid`, which has until `deadline` to join. Past `cap`, the
    /// oldest connections of the biggest holders are pushed out (and returned, so the caller
    /// can say so); the new one always gets its place.
    pub fn enter(
        &mut self,
        uid: u32,
        deadline: Instant,
        cap: usize,
    ) -> (Rc<Ticket>, Vec<Rc<Ticket>>) {
        let ticket = Rc::new(Ticket {
            uid,
            seq: self.next_seq,
            deadline,
            peer: Cell::new(None),
            left: Cell::new(false),
            evicted: Cell::new(false),
            wake: Notify::new(),
        });
        self.next_seq += 1;
        self.by_uid
            .entry(uid)
            .or_default()
            .insert(ticket.seq, ticket.clone());
        self.total += 1;
        let mut evicted = Vec::new();
        while self.total > cap.max(1) {
            match self.evict_one() {
                Some(victim) => evicted.push(victim),
                None => break,
            }
        }
        (ticket, evicted)
    }

    /// Pushes out the oldest incomplete connection of the uid that holds the most (of two that
    /// hold as many, the one with the older connection). Also used when the bus runs out of
    /// file descriptors.
    pub fn evict_one(&mut self) -> Option<Rc<Ticket>> {
        let (_, held) = self
            .by_uid
            .iter()
            .filter_map(|(uid, held)| Some((uid, held, *held.first_key_value()?.0)))
            .max_by_key(|(_, held, oldest)| (held.len(), Reverse(*oldest)))
            .map(|(uid, held, _)| (*uid, held))?;
        let victim = held.first_key_value()?.1.clone();
        self.leave(&victim);
        victim.evicted.set(true);
        victim.wake.notify_one();
        Some(victim)
    }

    /// The handshake of `ticket`'s connection is done: it is peer `id` until `Hello`.
    pub fn attach(&mut self, ticket: &Rc<Ticket>, id: PeerId) {
        if ticket.left.get() {
            return;
        }
        ticket.peer.set(Some(id));
        self.by_peer.insert(id, ticket.clone());
    }

    /// Peer `id` said `Hello`: it has joined and no longer counts.
    pub fn complete(&mut self, id: PeerId) {
        if let Some(ticket) = self.by_peer.get(&id).cloned() {
            self.leave(&ticket);
        }
    }

    /// `ticket` no longer counts (it joined, or its connection closed). Idempotent.
    pub fn leave(&mut self, ticket: &Ticket) {
        if ticket.left.replace(true) {
            return;
        }
        if let Some(id) = ticket.peer.get() {
            self.by_peer.remove(&id);
        }
        if let Some(held) = self.by_uid.get_mut(&ticket.uid) {
            held.remove(&ticket.seq);
            if held.is_empty() {
                self.by_uid.remove(&ticket.uid);
            }
        }
        self.total -= 1;
        ticket.wake.notify_one();
    }

    /// Incomplete connections in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Incomplete connections of `uid`.
    pub fn of_uid(&self, uid: u32) -> usize {
        self.by_uid.get(&uid).map_or(0, BTreeMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(60)
    }

    #[test]
    fn past_the_cap_the_oldest_of_the_biggest_holder_goes() {
        let mut admission = Admission::default();
        let mut flood = Vec::new();
        for _ in 0..3 {
            let (ticket, evicted) = admission.enter(1000, later(), 4);
            assert!(evicted.is_empty());
            flood.push(ticket);
        }
        let (owner, evicted) = admission.enter(0, later(), 4);
        assert!(evicted.is_empty());
        // The flooder holds the most: its oldest goes, whoever arrives.
        let (_, evicted) = admission.enter(0, later(), 4);
        assert_eq!(evicted.len(), 1);
        assert!(Rc::ptr_eq(&evicted[0], &flood[0]));
        assert!(flood[0].evicted.get() && flood[0].left.get());
        let (newest, evicted) = admission.enter(1000, later(), 4);
        assert!(
            Rc::ptr_eq(&evicted[0], &flood[1]),
            "its own oldest, not the newcomer"
        );
        assert!(!owner.left.get() && !newest.left.get());
        assert_eq!(
            (
                admission.total(),
                admission.of_uid(1000),
                admission.of_uid(0)
            ),
            (4, 2, 2)
        );
    }

    #[test]
    fn a_tie_pushes_out_the_older_connection() {
        let mut admission = Admission::default();
        let (first, _) = admission.enter(1, later(), 2);
        let (_second, _) = admission.enter(2, later(), 2);
        let (_, evicted) = admission.enter(3, later(), 2);
        assert!(Rc::ptr_eq(&evicted[0], &first));
    }

    #[test]
    fn hello_and_close_leave_the_count_once() {
        let mut admission = Admission::default();
        let (ticket, _) = admission.enter(7, later(), 10);
        admission.attach(&ticket, 42);
        admission.complete(42);
        assert_eq!(admission.total(), 0);
        admission.leave(&ticket);
        admission.complete(42);
        assert_eq!((admission.total(), admission.of_uid(7)), (0, 0));
        assert!(admission.by_peer.is_empty() && admission.by_uid.is_empty());
    }

    #[tokio::test]
    async fn lost_says_why_or_none_once_joined() {
        let mut admission = Admission::default();
        let (joined, _) = admission.enter(1, later(), 1);
        admission.attach(&joined, 1);
        admission.complete(1);
        assert_eq!(joined.lost().await, None);
        let (late, _) = admission.enter(1, Instant::now(), 2);
        assert_eq!(late.lost().await, Some(Lost::TimedOut));
        let (_, _) = admission.enter(1, later(), 1);
        assert_eq!(late.lost().await, Some(Lost::Evicted));
    }
}
