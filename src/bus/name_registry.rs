//! Well-known names: who owns each one, who waits in its queue, and the rules of `RequestName`
//! and `ReleaseName`.

use std::collections::{BTreeSet, VecDeque};

use rustc_hash::FxHashMap as HashMap;
use zbus::fdo::{ReleaseNameReply, RequestNameFlags, RequestNameReply};

use crate::connection::PeerId;

/// What a change of ownership must be told, in the order the signals are to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameEvent {
    Lost {
        name: String,
        peer: PeerId,
    },
    OwnerChanged {
        name: String,
        old: Option<PeerId>,
        new: Option<PeerId>,
    },
    Acquired {
        name: String,
        peer: PeerId,
    },
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    peer: PeerId,
    flags: RequestNameFlags,
}

/// All well-known names and their queues. The front of a queue is the primary owner.
#[derive(Default)]
pub struct NameRegistry {
    names: HashMap<String, VecDeque<Owner>>,
    /// The names each peer owns or waits for.
    by_peer: HashMap<PeerId, BTreeSet<String>>,
}

impl NameRegistry {
    /// The primary owner of `name`.
    pub fn owner(&self, name: &str) -> Option<PeerId> {
        self.names.get(name).and_then(|q| q.front()).map(|o| o.peer)
    }

    /// The primary owner followed by the queue.
    pub fn queue(&self, name: &str) -> Option<Vec<PeerId>> {
        self.names
            .get(name)
            .map(|q| q.iter().map(|o| o.peer).collect())
    }

    /// Every name that has an owner.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The names `peer` owns or waits for.
    pub fn names_of(&self, peer: PeerId) -> Vec<String> {
        self.by_peer
            .get(&peer)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many names `peer` owns or waits for.
    pub fn count_for(&self, peer: PeerId) -> usize {
        self.by_peer.get(&peer).map_or(0, BTreeSet::len)
    }

    /// `RequestName`, with the semantics of the specification and dbus-daemon.
    pub fn request(
        &mut self,
        name: &str,
        peer: PeerId,
        flags: RequestNameFlags,
    ) -> (RequestNameReply, Vec<NameEvent>) {
        let Some(queue) = self.names.get_mut(name) else {
            self.names
                .insert(name.to_owned(), VecDeque::from([Owner { peer, flags }]));
            self.note(peer, name);
            return (RequestNameReply::PrimaryOwner, acquired(name, None, peer));
        };
        let primary = queue[0];
        if primary.peer == peer {
            queue[0].flags = flags;
            return (RequestNameReply::AlreadyOwner, Vec::new());
        }
        let waiting_at = queue.iter().position(|o| o.peer == peer);
        if flags.contains(RequestNameFlags::REPLACE_EXISTING)
            && primary.flags.contains(RequestNameFlags::ALLOW_REPLACEMENT)
        {
            if let Some(at) = waiting_at {
                queue.remove(at);
            }
            queue.pop_front();
            queue.push_front(Owner { peer, flags });
            let mut events = vec![NameEvent::Lost {
                name: name.to_owned(),
                peer: primary.peer,
            }];
            // The replaced owner waits right behind the new one, unless it asked not to queue.
            if !primary.flags.contains(RequestNameFlags::DO_NOT_QUEUE) {
                queue.insert(1, primary);
            } else {
                self.forget(primary.peer, name);
            }
            self.note(peer, name);
            events.extend(acquired(name, Some(primary.peer), peer));
            return (RequestNameReply::PrimaryOwner, events);
        }
        if flags.contains(RequestNameFlags::DO_NOT_QUEUE) {
            if let Some(at) = waiting_at {
                queue.remove(at);
                self.forget(peer, name);
            }
            return (RequestNameReply::Exists, Vec::new());
        }
        // As dbus-daemon: one who asked to replace the owner waits right behind it.
        if flags.contains(RequestNameFlags::REPLACE_EXISTING) {
            if let Some(at) = waiting_at {
                queue.remove(at);
            }
            queue.insert(1, Owner { peer, flags });
        } else {
            match waiting_at {
                Some(at) => queue[at].flags = flags,
                None => queue.push_back(Owner { peer, flags }),
            }
        }
        self.note(peer, name);
        (RequestNameReply::InQueue, Vec::new())
    }

    /// `ReleaseName`.
    pub fn release(&mut self, name: &str, peer: PeerId) -> (ReleaseNameReply, Vec<NameEvent>) {
        let Some(queue) = self.names.get(name) else {
            return (ReleaseNameReply::NonExistent, Vec::new());
        };
        if !queue.iter().any(|o| o.peer == peer) {
            return (ReleaseNameReply::NotOwner, Vec::new());
        }
        let was_primary = queue[0].peer == peer;
        let mut events = Vec::new();
        if was_primary {
            events.push(NameEvent::Lost {
                name: name.to_owned(),
                peer,
            });
        }
        events.extend(self.remove(name, peer));
        (ReleaseNameReply::Released, events)
    }

    /// Gives back the room of tables that a peak of names left mostly empty.
    pub fn shrink(&mut self) {
        super::memory::shrink_map(&mut self.names);
        super::memory::shrink_map(&mut self.by_peer);
    }

    /// Drops every name of a peer that is gone. No `NameLost` goes to the departed peer.
    pub fn remove_peer(&mut self, peer: PeerId) -> Vec<NameEvent> {
        self.remove_some(peer, usize::MAX)
    }

    /// Drops up to `max` names of a peer that is gone, in name order.
    pub fn remove_some(&mut self, peer: PeerId, max: usize) -> Vec<NameEvent> {
        let mut events = Vec::new();
        for _ in 0..max {
            let Some(name) = self.by_peer.get_mut(&peer).and_then(BTreeSet::pop_first) else {
                break;
            };
            events.extend(self.remove(&name, peer));
        }
        if self.by_peer.get(&peer).is_some_and(BTreeSet::is_empty) {
            self.by_peer.remove(&peer);
        }
        events
    }

    /// Takes `peer` out of the queue of `name`; if it was the primary owner, the next in line
    /// takes over.
    fn remove(&mut self, name: &str, peer: PeerId) -> Vec<NameEvent> {
        self.forget(peer, name);
        let Some(queue) = self.names.get_mut(name) else {
            return Vec::new();
        };
        let Some(at) = queue.iter().position(|o| o.peer == peer) else {
            return Vec::new();
        };
        queue.remove(at);
        if at != 0 {
            return Vec::new();
        }
        match queue.front() {
            Some(next) => acquired(name, Some(peer), next.peer),
            None => {
                self.names.remove(name);
                vec![NameEvent::OwnerChanged {
                    name: name.to_owned(),
                    old: Some(peer),
                    new: None,
                }]
            }
        }
    }

    fn note(&mut self, peer: PeerId, name: &str) {
        self.by_peer
            .entry(peer)
            .or_default()
            .insert(name.to_owned());
    }

    fn forget(&mut self, peer: PeerId, name: &str) {
        if let Some(names) = self.by_peer.get_mut(&peer) {
            names.remove(name);
            if names.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }
}

fn acquired(name: &str, old: Option<PeerId>, new: PeerId) -> Vec<NameEvent> {
    vec![
        NameEvent::OwnerChanged {
            name: name.to_owned(),
            old,
            new: Some(new),
        },
        NameEvent::Acquired {
            name: name.to_owned(),
            peer: new,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "org.example.Name";

    #[test]
    fn first_request_owns_and_second_queues() {
        let mut r = NameRegistry::default();
        assert_eq!(
            r.request(N, 1, RequestNameFlags::empty()).0,
            RequestNameReply::PrimaryOwner
        );
        assert_eq!(
            r.request(N, 1, RequestNameFlags::empty()).0,
            RequestNameReply::AlreadyOwner
        );
        assert_eq!(
            r.request(N, 2, RequestNameFlags::empty()).0,
            RequestNameReply::InQueue
        );
        assert_eq!(
            r.request(N, 3, RequestNameFlags::DO_NOT_QUEUE).0,
            RequestNameReply::Exists
        );
        assert_eq!(r.queue(N), Some(vec![1, 2]));
    }

    #[test]
    fn replacement_needs_both_flags() {
        let mut r = NameRegistry::default();
        r.request(N, 1, RequestNameFlags::empty());
        assert_eq!(
            r.request(N, 2, RequestNameFlags::REPLACE_EXISTING).0,
            RequestNameReply::InQueue
        );
        r.request(N, 4, RequestNameFlags::empty());
        assert_eq!(
            r.request(N, 5, RequestNameFlags::REPLACE_EXISTING).0,
            RequestNameReply::InQueue
        );
        assert_eq!(
            r.queue(N),
            Some(vec![1, 5, 2, 4]),
            "a would-be replacer waits behind the owner"
        );
        r.release(N, 5);
        r.release(N, 4);
        r.request(N, 1, RequestNameFlags::ALLOW_REPLACEMENT);
        let (reply, events) = r.request(N, 3, RequestNameFlags::REPLACE_EXISTING);
        assert_eq!(reply, RequestNameReply::PrimaryOwner);
        assert_eq!(
            events,
            vec![
                NameEvent::Lost {
                    name: N.into(),
                    peer: 1
                },
                NameEvent::OwnerChanged {
                    name: N.into(),
                    old: Some(1),
                    new: Some(3)
                },
                NameEvent::Acquired {
                    name: N.into(),
                    peer: 3
                },
            ]
        );
        // The replaced owner waits right behind the new one, ahead of the old queue.
        assert_eq!(r.queue(N), Some(vec![3, 1, 2]));
    }

    #[test]
    fn replaced_owner_with_do_not_queue_leaves() {
        let mut r = NameRegistry::default();
        r.request(
            N,
            1,
            RequestNameFlags::ALLOW_REPLACEMENT | RequestNameFlags::DO_NOT_QUEUE,
        );
        r.request(N, 2, RequestNameFlags::REPLACE_EXISTING);
        assert_eq!(r.queue(N), Some(vec![2]));
        assert_eq!(r.count_for(1), 0);
    }

    #[test]
    fn do_not_queue_takes_a_waiter_out_of_the_queue() {
        let mut r = NameRegistry::default();
        r.request(N, 1, RequestNameFlags::empty());
        r.request(N, 2, RequestNameFlags::empty());
        assert_eq!(
            r.request(N, 2, RequestNameFlags::DO_NOT_QUEUE).0,
            RequestNameReply::Exists
        );
        assert_eq!(r.queue(N), Some(vec![1]));
    }

    #[test]
    fn release_passes_the_name_on() {
        let mut r = NameRegistry::default();
        assert_eq!(r.release(N, 1).0, ReleaseNameReply::NonExistent);
        r.request(N, 1, RequestNameFlags::empty());
        r.request(N, 2, RequestNameFlags::empty());
        assert_eq!(r.release(N, 3).0, ReleaseNameReply::NotOwner);
        let (reply, events) = r.release(N, 1);
        assert_eq!(reply, ReleaseNameReply::Released);
        assert_eq!(
            events[0],
            NameEvent::Lost {
                name: N.into(),
                peer: 1
            }
        );
        assert_eq!(r.owner(N), Some(2));
        assert_eq!(r.release(N, 2).0, ReleaseNameReply::Released);
        assert_eq!(r.owner(N), None);
        assert_eq!(r.names().count(), 0);
    }

    #[test]
    fn releasing_a_queued_name_sends_nothing() {
        let mut r = NameRegistry::default();
        r.request(N, 1, RequestNameFlags::empty());
        r.request(N, 2, RequestNameFlags::empty());
        assert_eq!(r.release(N, 2), (ReleaseNameReply::Released, vec![]));
    }

    #[test]
    fn removing_a_peer_hands_over_every_name() {
        let mut r = NameRegistry::default();
        r.request("a.A", 1, RequestNameFlags::empty());
        r.request("b.B", 1, RequestNameFlags::empty());
        r.request("b.B", 2, RequestNameFlags::empty());
        r.request("c.C", 2, RequestNameFlags::empty());
        r.request("c.C", 1, RequestNameFlags::empty());
        let events = r.remove_peer(1);
        assert!(events.contains(&NameEvent::OwnerChanged {
            name: "a.A".into(),
            old: Some(1),
            new: None
        }));
        assert!(events.contains(&NameEvent::Acquired {
            name: "b.B".into(),
            peer: 2
        }));
        assert!(!events.iter().any(|e| matches!(e, NameEvent::Lost { .. })));
        assert_eq!(r.queue("c.C"), Some(vec![2]));
        assert_eq!(r.names_of(2), vec!["b.B".to_string(), "c.C".to_string()]);
        assert_eq!(r.owner("c.C"), Some(2));
    }
}
