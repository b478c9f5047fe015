//! The match rules of one peer: tried in turn on each message it could receive, and found by
//! value for `RemoveMatch` without reading them all, so that removing a peak of 50k rules one
//! by one costs time in proportion to their number, not to its square.

use std::hash::BuildHasher;

use rustc_hash::{FxBuildHasher, FxHashMap as HashMap};

use crate::match_rule::MatchRule;

/// Up to this many rules, `remove` reads the list, and keeps its order; past it, a table of
/// places by hash finds a rule.
const LINEAR_MAX: usize = 32;

#[derive(Default)]
pub struct PeerRules {
    list: Vec<MatchRule>,
    /// A rule's hash → its places in `list` (equal rules, or a collision). Kept only while
    /// `list` holds more than `LINEAR_MAX` rules, so that a peer with a few rules pays nothing.
    places: HashMap<u64, Vec<usize>>,
    /// How many of the rules have `eavesdrop='true'`.
    eavesdropping: usize,
}

impl PeerRules {
    /// Rules as `BecomeMonitor` gives them.
    pub fn from_list(rules: Vec<MatchRule>) -> Self {
        let mut out = Self::default();
        for rule in rules {
            out.push(rule);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, MatchRule> {
        self.list.iter()
    }

    /// Whether any rule asks to see messages addressed to others.
    pub fn eavesdrops(&self) -> bool {
        self.eavesdropping > 0
    }

    pub fn push(&mut self, rule: MatchRule) {
        self.eavesdropping += usize::from(rule.eavesdrop());
        self.list.push(rule);
        if self.list.len() == LINEAR_MAX + 1 {
            for at in 0..self.list.len() {
                self.file(at);
            }
        } else if self.list.len() > LINEAR_MAX {
            self.file(self.list.len() - 1);
        }
    }

    /// Takes out one rule equal to `rule`.
    pub fn remove(&mut self, rule: &MatchRule) -> Option<MatchRule> {
        let removed = if self.places.is_empty() {
            let at = self.list.iter().position(|r| r == rule)?;
            self.list.remove(at)
        } else {
            let places = self.places.get(&hash(rule))?;
            let at = places.iter().copied().find(|&at| self.list[at] == *rule)?;
            self.unfile(at);
            let last = self.list.len() - 1;
            if at != last {
                // The last rule moves into the hole.
                self.unfile(last);
                self.list.swap(at, last);
                self.file(at);
            }
            let removed = self.list.pop()?;
            if self.list.len() <= LINEAR_MAX {
                self.places = HashMap::default();
            }
            removed
        };
        self.eavesdropping -= usize::from(removed.eavesdrop());
        Some(removed)
    }

    /// Notes the place of the rule at `at` under its hash.
    fn file(&mut self, at: usize) {
        let key = hash(&self.list[at]);
        self.places.entry(key).or_default().push(at);
    }

    /// Forgets the place of the rule at `at`.
    fn unfile(&mut self, at: usize) {
        let key = hash(&self.list[at]);
        if let Some(places) = self.places.get_mut(&key) {
            places.retain(|&p| p != at);
            if places.is_empty() {
                self.places.remove(&key);
            }
        }
    }
}

fn hash(rule: &MatchRule) -> u64 {
    FxBuildHasher.hash_one(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> MatchRule {
        MatchRule::parse(text).expect("valid rule")
    }

    #[test]
    fn removes_each_rule_once_past_the_linear_size() {
        let mut rules = PeerRules::default();
        let texts: Vec<String> = (0..200).map(|i| format!("member='M{}'", i % 150)).collect();
        for text in &texts {
            rules.push(rule(text));
        }
        rules.push(rule("eavesdrop='true'"));
        assert!(rules.eavesdrops());
        // Every rule, in an order unlike the one they came in, duplicates included.
        for text in texts.iter().rev().step_by(2).chain(texts.iter().step_by(2)) {
            assert!(rules.remove(&rule(text)).is_some(), "{text}");
        }
        assert_eq!(rules.len(), 1);
        assert!(rules.remove(&rule("member='M0'")).is_none());
        assert!(rules.remove(&rule("eavesdrop='true'")).is_some());
        assert!(rules.is_empty() && !rules.eavesdrops());
    }

    #[test]
    fn a_rule_that_is_not_there_is_not_found() {
        let mut rules =
            PeerRules::from_list((0..40).map(|i| rule(&format!("arg0='{i}'"))).collect());
        assert!(rules.remove(&rule("arg0='40'")).is_none());
        assert!(rules.remove(&rule("arg1='0'")).is_none());
        assert_eq!(rules.len(), 40);
        let left: Vec<String> = rules.iter().map(ToString::to_string).collect();
        assert!(left.contains(&"arg0='39'".to_owned()), "{left:?}");
    }
}
