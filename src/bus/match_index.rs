//! An index of match rules by the interface and member they name, so that a broadcast is tried
//! only against the peers whose rules could match it, not against every rule on the bus.

use std::hash::{Hash, Hasher};

use rustc_hash::{FxHashMap as HashMap, FxHasher};

use crate::connection::PeerId;

/// Peers filed under a hash of (interface, member) of each of their rules; a rule without one
/// of them is filed under `None` for it. A lookup reads the four buckets a message can fall in.
/// Hash collisions only add candidates: the rules themselves decide.
#[derive(Default)]
pub struct MatchIndex {
    /// Bucket → peer → how many of its rules are filed there.
    buckets: HashMap<u64, HashMap<PeerId, usize>>,
}

fn key(interface: Option<&str>, member: Option<&str>) -> u64 {
    let mut hasher = FxHasher::default();
    (interface, member).hash(&mut hasher);
    hasher.finish()
}

impl MatchIndex {
    pub fn add(&mut self, peer: PeerId, interface: Option<&str>, member: Option<&str>) {
        *self
            .buckets
            .entry(key(interface, member))
            .or_default()
            .entry(peer)
            .or_default() += 1;
    }

    pub fn remove(&mut self, peer: PeerId, interface: Option<&str>, member: Option<&str>) {
        let bucket_key = key(interface, member);
        let Some(bucket) = self.buckets.get_mut(&bucket_key) else {
            return;
        };
        if let Some(count) = bucket.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                bucket.remove(&peer);
            }
        }
        if bucket.is_empty() {
            self.buckets.remove(&bucket_key);
        }
    }

    /// Gives back the room of a table that a peak of rules left mostly empty.
    pub fn shrink(&mut self) {
        super::memory::shrink_map(&mut self.buckets);
    }

    /// Whether any peer has a rule that could match a message of this interface and member:
    /// [`candidates`](Self::candidates) is not empty. Allocates nothing.
    pub fn may_match(&self, interface: &str, member: &str) -> bool {
        [
            key(None, None),
            key(None, Some(member)),
            key(Some(interface), None),
            key(Some(interface), Some(member)),
        ]
        .iter()
        .any(|k| self.buckets.get(k).is_some_and(|b| !b.is_empty()))
    }

    /// The peers with a rule that could match a message of this interface and member, each once.
    pub fn candidates(&self, interface: Option<&str>, member: Option<&str>) -> Vec<PeerId> {
        let mut keys = vec![key(None, None)];
        if member.is_some() {
            keys.push(key(None, member));
        }
        if interface.is_some() {
            keys.push(key(interface, None));
            if member.is_some() {
                keys.push(key(interface, member));
            }
        }
        let mut out: Vec<PeerId> = keys
            .iter()
            .filter_map(|k| self.buckets.get(k))
            .flat_map(|b| b.keys().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_peers_by_interface_and_member_and_wildcards() {
        let mut index = MatchIndex::default();
        index.add(1, Some("a.I"), Some("M"));
        index.add(2, Some("a.I"), None);
        index.add(3, None, Some("M"));
        index.add(4, None, None);
        index.add(5, Some("b.I"), Some("M"));
        index.add(6, Some("a.I"), Some("N"));
        assert_eq!(index.candidates(Some("a.I"), Some("M")), vec![1, 2, 3, 4]);
        assert_eq!(index.candidates(None, Some("M")), vec![3, 4]);
        assert_eq!(index.candidates(Some("a.I"), None), vec![2, 4]);
    }

    #[test]
    fn may_match_agrees_with_candidates() {
        let mut index = MatchIndex::default();
        assert!(!index.may_match("a.I", "M"));
        for (interface, member) in [
            (Some("a.I"), Some("M")),
            (Some("a.I"), None),
            (None, Some("M")),
            (None, None),
        ] {
            index.add(1, interface, member);
            assert!(index.may_match("a.I", "M"), "{interface:?} {member:?}");
            assert!(!index.may_match("b.I", "N") || (interface, member) == (None, None));
            index.remove(1, interface, member);
            assert!(!index.may_match("a.I", "M"));
        }
        index.add(1, Some("b.I"), Some("M"));
        index.add(1, Some("a.I"), Some("N"));
        assert!(!index.may_match("a.I", "M"));
    }

    #[test]
    fn a_peer_stays_while_any_of_its_rules_is_filed() {
        let mut index = MatchIndex::default();
        index.add(1, None, Some("M"));
        index.add(1, None, Some("M"));
        index.add(1, Some("x.Y"), Some("M"));
        assert_eq!(index.candidates(Some("x.Y"), Some("M")), vec![1]);
        index.remove(1, None, Some("M"));
        assert_eq!(index.candidates(None, Some("M")), vec![1]);
        index.remove(1, None, Some("M"));
        assert!(index.candidates(None, Some("M")).is_empty());
        index.remove(1, Some("x.Y"), Some("M"));
        assert!(index.buckets.is_empty());
    }
}
