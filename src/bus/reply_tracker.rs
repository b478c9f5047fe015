//! The reply tracker: the method calls that wait for a reply. Only the callee's answer to a
//! pending call is delivered, a caller whose callee leaves gets `NoReply` for each call, and
//! each caller stays within `max_replies_per_connection`.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::connection::PeerId;

/// A call that waits for its reply: who made it, and its serial.
pub type Call = (PeerId, u32);

#[derive(Default)]
pub struct ReplyTracker {
    /// Caller → serial → callee. A caller's map stays while it is connected, so that a call and
    /// its reply cost no allocation.
    awaiting: HashMap<PeerId, HashMap<u32, PeerId>>,
    /// Callee → the calls it owes a reply.
    owed: HashMap<PeerId, HashSet<Call>>,
}

impl ReplyTracker {
    /// How many calls of `caller` wait for a reply.
    pub fn pending_of(&self, caller: PeerId) -> usize {
        self.awaiting.get(&caller).map_or(0, HashMap::len)
    }

    pub fn note(&mut self, call: Call, callee: PeerId) {
        self.awaiting
            .entry(call.0)
            .or_default()
            .insert(call.1, callee);
        self.owed.entry(callee).or_default().insert(call);
    }

    /// Whether `callee` owes `call` a reply; if so, it no longer does: what the bus delivers
    /// now (the callee's reply, or `NoReply`) answers it.
    pub fn answer(&mut self, call: Call, callee: PeerId) -> bool {
        let Some(calls) = self.awaiting.get_mut(&call.0) else {
            return false;
        };
        if calls.get(&call.1) != Some(&callee) {
            return false;
        }
        calls.remove(&call.1);
        if let Some(owed) = self.owed.get_mut(&callee) {
            owed.remove(&call);
        }
        true
    }

    /// Forgets `call`, refused before it reached its callee.
    pub fn forget(&mut self, call: Call) {
        let callee = self
            .awaiting
            .get_mut(&call.0)
            .and_then(|calls| calls.remove(&call.1));
        if let Some(owed) = callee.and_then(|callee| self.owed.get_mut(&callee)) {
            owed.remove(&call);
        }
    }

    /// `id` leaves, or becomes a monitor: the calls it made are forgotten. Returns the calls it
    /// owed, in the order they were made; they still wait, for the `NoReply` that answers them.
    pub fn peer_gone(&mut self, id: PeerId) -> Vec<Call> {
        for (serial, callee) in self.awaiting.remove(&id).unwrap_or_default() {
            if let Some(owed) = self.owed.get_mut(&callee) {
                owed.remove(&(id, serial));
            }
        }
        let mut owed: Vec<Call> = self
            .owed
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        owed.sort_unstable_by_key(|&(caller, serial)| (serial, caller));
        super::memory::shrink_map(&mut self.awaiting);
        super::memory::shrink_map(&mut self.owed);
        owed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_callee_answers_a_call_and_only_once() {
        let mut replies = ReplyTracker::default();
        replies.note((1, 7), 2);
        assert_eq!(replies.pending_of(1), 1);
        assert!(!replies.answer((1, 7), 3), "another peer cannot answer");
        assert!(!replies.answer((1, 8), 2), "nor a call that was not made");
        assert!(replies.answer((1, 7), 2));
        assert!(!replies.answer((1, 7), 2), "a call is answered once");
        assert_eq!(replies.pending_of(1), 0);
    }

    #[test]
    fn a_callee_that_leaves_owes_its_calls_in_the_order_they_were_made() {
        let mut replies = ReplyTracker::default();
        replies.note((1, 9), 5);
        replies.note((3, 2), 5);
        replies.note((1, 4), 5);
        replies.note((1, 5), 6);
        assert_eq!(replies.peer_gone(5), vec![(3, 2), (1, 4), (1, 9)]);
        // They wait for their NoReply.
        assert!(replies.answer((3, 2), 5));
        assert_eq!(replies.pending_of(1), 3);
    }

    #[test]
    fn a_caller_that_leaves_is_owed_nothing_more() {
        let mut replies = ReplyTracker::default();
        replies.note((1, 1), 2);
        replies.note((1, 2), 2);
        replies.forget((1, 2));
        assert_eq!(replies.pending_of(1), 1);
        assert!(replies.peer_gone(1).is_empty());
        assert!(
            replies.peer_gone(2).is_empty(),
            "the calls of a peer that left are forgotten"
        );
    }
}
