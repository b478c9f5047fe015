//! The router: where each message a peer sends goes. A message to the driver is handled by
//! it; one with a destination goes to that peer (or waits while its service starts), once the
//! policy, the reply tracker and the receiver's queue allow it; a signal without one goes to
//! every peer whose match rules take it. Monitors and eavesdroppers get their copies here.

use std::time::Duration;

use tracing::{debug, trace, warn};
use zbus::message::{Flags, Type};
use zbus::{Message, fdo};

use super::driver::messages;
use super::error::BusError;
use super::events::CoreEvent;
use super::{Bus, DRIVER, PeerId};
use crate::activation::Waiter;
use crate::log_limit;
use crate::match_rule::{Fields, MatchContext, MatchRule};

impl Bus {
    /// Handles one message a peer sent, already stamped with the peer's name by the reader.
    pub fn dispatch(&mut self, from: PeerId, msg: Message) {
        let Some(peer) = self.peers.get(&from) else {
            return;
        };
        if peer.monitor {
            if log_limit::PROTOCOL_VIOLATION.allow() {
                warn!(peer = %peer.unique, "disconnecting monitor: monitors may not send messages");
            }
            self.disconnect(from);
            return;
        }
        if !peer.registered && !is_hello(&msg) {
            if log_limit::PROTOCOL_VIOLATION.allow() {
                warn!(peer = %peer.unique, "disconnecting: the first message was not Hello");
            }
            self.disconnect(from);
            return;
        }
        // The destination is read from a second handle on the message, which `unicast` can take
        // while the name stays borrowed: no copy of it per message.
        let held = msg.clone();
        let header = held.header();
        trace!(
            from,
            kind = ?msg.message_type(),
            serial = msg.primary_header().serial_num().get(),
            destination = ?header.destination(),
            "routing"
        );
        match header.destination().map(|d| d.as_str()) {
            Some(DRIVER) => {
                // As in dbus-daemon, monitors see a signal to the driver (systemd's
                // `ActivationFailure`) after what it caused.
                let signal = msg.message_type() == Type::Signal;
                if !signal {
                    self.copy_to_watchers(&msg, None);
                }
                // Before `Hello`, only `Hello` gets here; dbus-daemon lets it through.
                let checked =
                    !self.policy_open && self.peers.get(&from).is_some_and(|p| p.registered);
                if checked && !self.allow_message(from, None, &msg, false) {
                    return;
                }
                self.driver_call(from, &msg);
                if signal {
                    self.copy_to_watchers(&msg, None);
                }
            }
            Some(dest) => self.unicast(from, msg, dest, true),
            None if !self.policy_open && !self.allow_message(from, None, &msg, true) => {}
            None => self.broadcast(&msg),
        }
    }

    /// Delivers a message that names its destination; one for an activatable name that has no
    /// owner waits while its service starts. A held message, delivered once its service has
    /// started, was shown to the watchers when it was sent (`show_watchers` false).
    pub(super) fn unicast(&mut self, from: PeerId, msg: Message, dest: &str, show_watchers: bool) {
        let msg_type = msg.message_type();
        let Some(to) = self.resolve(dest) else {
            let auto_start = !msg.primary_header().flags().contains(Flags::NO_AUTO_START);
            if auto_start && !dest.starts_with(':') && self.activation.is_activatable(dest) {
                if !self.policy_open && !self.allow_message(from, None, &msg, true) {
                    return;
                }
                // Monitors see the message after what starting its service sent (systemd's
                // `ActivationRequest`), as with dbus-daemon.
                let copy = msg.clone();
                self.activate(dest, Waiter::Deliver { from, msg });
                self.copy_to_watchers(&copy, None);
            } else {
                self.copy_to_watchers(&msg, None);
                if msg_type == Type::MethodCall {
                    self.reply_unknown_destination(from, &msg, dest);
                }
            }
            return;
        };
        let mut checked = self.policy_open;
        if matches!(msg_type, Type::MethodReturn | Type::Error)
            && !self.take_expected_reply(from, to, &msg)
        {
            // A configured policy decides on a reply nobody asked for, as in dbus-daemon. A bus
            // that restricts nothing drops it, as dbus-broker does: no client can slip an
            // answer into a call it was never sent.
            if self.policy_open || !self.allow_unrequested_reply(from, to, &msg) {
                debug!(from, to, "dropping a reply that answers no pending call");
                return;
            }
            checked = true;
        }
        if !msg.data().fds().is_empty() && !self.peers.get(&to).is_some_and(|p| p.unix_fds) {
            let text = "Tried to send a message with Unix file descriptors to a client that does not support them";
            self.reply_error(from, &msg, fdo::Error::NotSupported(text.into()));
            return;
        }
        if !checked && !self.allow_message(from, Some(to), &msg, true) {
            return;
        }
        if msg_type == Type::MethodCall
            && expects_reply(&msg)
            && !self.note_pending_call(from, to, &msg)
        {
            return;
        }
        if show_watchers {
            self.copy_to_watchers(&msg, Some(to));
        }
        self.deliver_or_handle_full(from, to, &msg);
    }

    fn reply_unknown_destination(&mut self, from: PeerId, msg: &Message, dest: &str) {
        let error = if msg.primary_header().flags().contains(Flags::NO_AUTO_START) {
            fdo::Error::NameHasNoOwner(format!("Name \"{dest}\" does not exist"))
        } else {
            fdo::Error::ServiceUnknown(format!(
                "The name {dest} was not provided by any .service files"
            ))
        };
        self.reply_error(from, msg, error);
    }

    /// Records a call that waits for a reply, within the per-connection limit.
    fn note_pending_call(&mut self, from: PeerId, to: PeerId, msg: &Message) -> bool {
        let serial = msg.primary_header().serial_num().get();
        if self.replies.pending_of(from) >= self.limits.max_replies_per_connection {
            let text = "The maximum number of pending replies per connection has been reached";
            self.reply_error(from, msg, fdo::Error::LimitsExceeded(text.into()));
            return false;
        }
        self.replies.note((from, serial), to);
        if let Some(after) = self.limits.reply_timeout {
            self.arm_reply_timer(from, serial, to, after);
        }
        true
    }

    /// Whether `msg` (from `from` to `to`) answers a call `to` made to `from`; if so, the call is
    /// no longer pending.
    fn take_expected_reply(&mut self, from: PeerId, to: PeerId, msg: &Message) -> bool {
        let Some(serial) = msg.header().reply_serial() else {
            return false;
        };
        self.replies.answer((to, serial.get()), from)
    }

    /// Queues `msg` for `to`; past the limit of its queue, a call is refused to its sender and
    /// any other message costs the stuck receiver its connection.
    fn deliver_or_handle_full(&mut self, from: PeerId, to: PeerId, msg: &Message) {
        if self.deliver(to, msg) {
            return;
        }
        let Some(receiver) = self.peers.get(&to).map(|p| p.unique.clone()) else {
            return;
        };
        if msg.message_type() == Type::MethodCall {
            if log_limit::OUTGOING_FULL.allow() {
                warn!(%receiver, "outgoing queue full: refusing a call to it");
            }
            self.replies
                .forget((from, msg.primary_header().serial_num().get()));
            let text =
                format!("The outgoing queue of {receiver} is full: it does not read its messages");
            self.reply_error(from, msg, fdo::Error::LimitsExceeded(text));
        } else {
            if log_limit::OUTGOING_FULL.allow() {
                warn!(%receiver, "disconnecting: its outgoing queue is full and it does not read");
            }
            self.disconnect(to);
        }
    }

    /// Queues a message for a peer. Returns false when its queue is full.
    pub fn deliver(&mut self, to: PeerId, msg: &Message) -> bool {
        let Some(peer) = self.peers.get(&to) else {
            return true;
        };
        let conn = &peer.conn;
        let mut outbox = conn.outbox.borrow_mut();
        if outbox.queued_bytes() + msg.data().len() > self.limits.max_outgoing_bytes {
            return false;
        }
        let fds = msg.data().fds().len();
        if fds > 0 && outbox.queued_fds() + fds > self.limits.max_outgoing_unix_fds {
            return false;
        }
        if outbox.is_empty() {
            self.dirty.push(conn.clone());
        }
        outbox.push(msg.clone());
        true
    }

    /// Sends a signal without a destination to every peer whose rules match it.
    /// Whether a peer other than a monitor has a rule that takes `msg`. broker's own signals,
    /// which dbus-daemon does not have, go out only then: a monitor then sees the very sequence
    /// of messages that dbus-daemon sends (its test suite checks it).
    pub(super) fn has_listener(&self, msg: &Message) -> bool {
        let header = msg.header();
        let candidates = self.index.candidates(
            header.interface().map(|i| i.as_str()),
            header.member().map(|m| m.as_str()),
        );
        drop(header);
        self.matching_peers(msg, None, candidates)
            .iter()
            .any(|id| self.peers.get(id).is_some_and(|p| !p.monitor))
    }

    pub fn broadcast(&mut self, msg: &Message) {
        let header = msg.header();
        let candidates = self.index.candidates(
            header.interface().map(|i| i.as_str()),
            header.member().map(|m| m.as_str()),
        );
        drop(header);
        let recipients = self.matching_peers(msg, None, candidates);
        let mut refused = None;
        for to in recipients {
            if !self.policy_open && !self.allow_copy(to, msg, false) {
                refused.get_or_insert(to);
                continue;
            }
            if !self.deliver(to, msg) {
                if let Some(p) = self.peers.get(&to)
                    && log_limit::OUTGOING_FULL.allow()
                {
                    warn!(receiver = %p.unique, "disconnecting: its outgoing queue is full and it does not read");
                }
                self.disconnect(to);
            }
        }
        if let Some(to) = refused {
            self.report_refused_copy(to, msg);
        }
    }

    /// Copies a message with a destination to monitors and to peers that eavesdrop on it.
    pub(super) fn copy_to_watchers(&mut self, msg: &Message, addressed: Option<PeerId>) {
        if self.watchers.is_empty() {
            return;
        }
        let recipients = self.matching_peers(msg, addressed, self.watchers.iter().copied());
        for to in recipients {
            if !self.policy_open && !self.allow_copy(to, msg, true) {
                continue;
            }
            // Watchers lose a copy rather than anyone losing the original.
            self.deliver(to, msg);
        }
    }

    /// Those of `candidates` whose rules match `msg`. For a message with a destination, only
    /// monitors and rules with `eavesdrop='true'` match, and never the addressed peer itself.
    pub(super) fn matching_peers(
        &self,
        msg: &Message,
        addressed: Option<PeerId>,
        candidates: impl IntoIterator<Item = PeerId>,
    ) -> Vec<PeerId> {
        let header = msg.header();
        let fields = Fields::of(msg, &header);
        let has_destination = fields.destination().is_some();
        let destination_unique = addressed.and_then(|id| self.unique_name(id));
        let owner_of = |name: &str| self.names.owner(name).and_then(|id| self.unique_name(id));
        let ctx = MatchContext {
            owner_of: &owner_of,
            destination_unique,
        };
        let mut out = Vec::new();
        for id in candidates {
            let Some(peer) = self
                .peers
                .get(&id)
                .filter(|p| p.registered && Some(id) != addressed)
            else {
                continue;
            };
            let matched = if peer.monitor {
                peer.rules.is_empty() || peer.rules.iter().any(|r| r.matches_fields(&fields, &ctx))
            } else {
                peer.rules
                    .iter()
                    .any(|r| (!has_destination || r.eavesdrop()) && r.matches_fields(&fields, &ctx))
            };
            if matched {
                out.push(id);
            }
        }
        out
    }

    /// Adds a match rule of a peer.
    pub fn add_rule(&mut self, id: PeerId, rule: MatchRule) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        self.index.add(id, rule.interface(), rule.member());
        // Only an eavesdropping rule can make the peer a watcher: checking all its rules on
        // each `AddMatch` made a flood of them cost time in the square of their number.
        let eavesdrop = rule.eavesdrop();
        peer.rules.push(rule);
        if eavesdrop {
            self.watchers.insert(id);
        }
    }

    /// Removes one match rule of a peer equal to `rule`; false if it has none.
    pub fn remove_rule(&mut self, id: PeerId, rule: &MatchRule) -> bool {
        let Some(peer) = self.peers.get_mut(&id) else {
            return false;
        };
        let Some(rule) = peer.rules.remove(rule) else {
            return false;
        };
        self.index.remove(id, rule.interface(), rule.member());
        self.refresh_watcher(id);
        true
    }

    /// Takes every rule of a peer out of the index.
    pub(super) fn unindex_rules(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        for rule in peer.rules.iter() {
            self.index.remove(id, rule.interface(), rule.member());
        }
        if peer.monitor {
            self.index.remove(id, None, None);
        }
    }

    /// Files a peer under the watchers (it may see messages addressed to others), or not.
    pub(super) fn refresh_watcher(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        if peer.monitor || peer.rules.eavesdrops() {
            self.watchers.insert(id);
        } else {
            self.watchers.remove(&id);
        }
    }

    /// Sends an error in reply to `call`, unless the caller said it expects no reply.
    pub fn reply_error(&mut self, to: PeerId, call: &Message, error: impl Into<BusError>) {
        if call.message_type() != Type::MethodCall || !expects_reply(call) {
            return;
        }
        let error = error.into();
        match messages::error(call, &error) {
            Ok(reply) => self.send_from_driver(to, &reply),
            Err(e) => warn!("cannot build error {}: {e}", error.name()),
        }
    }

    /// Delivers a message from the driver to one peer, showing it to monitors too.
    pub fn send_from_driver(&mut self, to: PeerId, msg: &Message) {
        self.copy_to_watchers(msg, Some(to));
        if !self.policy_open && !self.allow_from_driver(to, msg) {
            return;
        }
        if !self.deliver(to, msg) {
            if log_limit::OUTGOING_FULL.allow() {
                warn!(
                    peer = to,
                    "disconnecting: its outgoing queue is full and it does not read"
                );
            }
            self.disconnect(to);
        }
    }

    /// After `after`, the call `serial` of `caller` to `callee` gets `NoReply` unless it was
    /// answered (one timer per call, only when `reply_timeout` is configured).
    fn arm_reply_timer(&self, caller: PeerId, serial: u32, callee: PeerId, after: Duration) {
        let events = self.events.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(after).await;
            // The bus may be gone at shutdown; nothing is left to time out then.
            let _ = events.send(CoreEvent::ReplyTimedOut {
                caller,
                serial,
                callee,
            });
        });
    }

    /// Answers a pending call with `NoReply` and `text`, unless it was answered already.
    pub(super) fn send_no_reply(
        &mut self,
        caller: PeerId,
        serial: u32,
        callee: PeerId,
        text: &str,
    ) {
        let Some(unique) = self.unique_name(caller).map(str::to_owned) else {
            return;
        };
        if !self.replies.answer((caller, serial), callee) {
            return;
        }
        match messages::no_reply(serial, &unique, text) {
            Ok(msg) => self.send_from_driver(caller, &msg),
            Err(e) => warn!("cannot build NoReply: {e}"),
        }
    }
}

/// Whether `msg` is the `Hello` call, the only message a connection may send before it.
fn is_hello(msg: &Message) -> bool {
    let header = msg.header();
    msg.message_type() == Type::MethodCall
        && header.destination().map(|d| d.as_str()) == Some(DRIVER)
        && header.member().map(|m| m.as_str()) == Some("Hello")
        && header.interface().is_none_or(|i| i.as_str() == DRIVER)
}

/// Whether the sender of `msg` wants a reply (or an error) to it.
pub(super) fn expects_reply(msg: &Message) -> bool {
    !msg.primary_header()
        .flags()
        .contains(Flags::NO_REPLY_EXPECTED)
}
