//! The configuration's `<policy>` applied to connections, messages and names, and the
//! connection limits, with dbus-daemon's errors. The per-message checks run only when the policy
//! is not [`Policy::allows_all_messages`](crate::config::Policy::allows_all_messages).

use tracing::{debug, info, warn};
use zbus::message::{Header, Type};
use zbus::{Message, fdo};

use super::driver::messages;
use super::error::BusError;
use super::{Bus, Credentials, DRIVER, PeerId};
use crate::config::{MessageFacts, Party, Verdict};
use crate::log_limit;

/// Which way a message crossed the policy when it was refused.
#[derive(Clone, Copy)]
enum Direction {
    Send,
    Receive,
}

impl Bus {
    /// May a connection with `creds` join the bus? Refused when no `user`/`group` rule lets
    /// its user in (root always may). The error is the reason, for the log.
    pub fn admit(&self, creds: &Credentials) -> Result<(), String> {
        // An anonymous client got in through `<allow_anonymous/>`, whoever it is.
        if !creds.anonymous && !self.may_connect(creds) {
            return Err(format!("the policy does not let uid {} connect", creds.uid));
        }
        Ok(())
    }

    /// Could a peer with these credentials ever join? Checked at `accept`, before it takes any
    /// place. Where ANONYMOUS is offered (`anonymous`, under `<allow_anonymous/>`) anyone may;
    /// otherwise only through EXTERNAL (`external`), which takes those [`Bus::may_connect`] lets
    /// in: on a session bus with the stock policy, the bus's user and root.
    pub fn could_connect(&self, creds: &Credentials, external: bool, anonymous: bool) -> bool {
        anonymous || (external && self.may_connect(creds))
    }

    /// Counts peer `id` of `uid`, which `Hello` completes, within `max_completed_connections`
    /// and `max_connections_per_user` (past them, `LimitsExceeded`, as dbus-daemon answers
    /// `Hello`); it no longer counts as incomplete. For the bus's user and root,
    /// `max_completed_connections` counts only their own connections: other users that the
    /// policy lets in cannot use up the places of the bus's owner.
    pub fn complete_connection(&mut self, id: PeerId, uid: u32) -> Result<(), BusError> {
        let privileged = |u: u32| u == self.owner_uid || u == 0;
        let completed: usize = self
            .completed_by_uid
            .iter()
            .filter(|(of, _)| !privileged(uid) || privileged(**of))
            .map(|(_, count)| count)
            .sum();
        if completed >= self.limits.max_completed_connections {
            return Err(fdo::Error::LimitsExceeded(format!(
                "The maximum number of active connections ({completed}) has been reached"
            ))
            .into());
        }
        let of_user = self.completed_by_uid.entry(uid).or_default();
        if *of_user >= self.limits.max_connections_per_user {
            return Err(fdo::Error::LimitsExceeded(format!(
                "The maximum number of active connections for UID {uid} ({of_user}) has been reached"
            ))
            .into());
        }
        *of_user += 1;
        self.admission.complete(id);
        Ok(())
    }

    /// A completed connection of `uid` has gone.
    pub(super) fn connection_gone(&mut self, uid: u32) {
        if let Some(count) = self.completed_by_uid.get_mut(&uid) {
            *count -= 1;
            if *count == 0 {
                self.completed_by_uid.remove(&uid);
            }
        }
    }

    /// The policy's `user`/`group` rules (without a configuration, anyone who authenticated).
    pub fn may_connect(&self, creds: &Credentials) -> bool {
        creds.uid == 0
            || self
                .policy
                .as_ref()
                .is_none_or(|p| p.check_connect(creds.uid, &creds.gids, self.owner_uid))
    }

    /// May `id` own `name` (`<allow own>`/`own_prefix`)?
    pub fn may_own(&self, id: PeerId, name: &str) -> bool {
        let (Some(policy), Some(peer)) = (&self.policy, self.peers.get(&id)) else {
            return true;
        };
        let (uid, gids) = peer.creds.policy_identity();
        policy.check_own(name, uid, gids)
    }

    /// The send check of `from` and the receive check of `to` (none: the driver, an unowned
    /// name about to be activated, or every recipient of a broadcast). A refused message is
    /// logged, shown to the monitors when `show_monitors` (they have not seen it yet), and
    /// answered with `AccessDenied`; the caller drops it.
    pub(super) fn allow_message(
        &mut self,
        from: PeerId,
        to: Option<PeerId>,
        msg: &Message,
        show_monitors: bool,
    ) -> bool {
        self.check_message(from, to, msg, show_monitors, true)
    }

    /// `allow_message` for a reply to `to` that answers no call of its: dbus-daemon lets the
    /// policy decide on it, as a reply nobody requested (`send_requested_reply="false"`).
    pub(super) fn allow_unrequested_reply(
        &mut self,
        from: PeerId,
        to: PeerId,
        msg: &Message,
    ) -> bool {
        self.check_message(from, Some(to), msg, true, false)
    }

    fn check_message(
        &mut self,
        from: PeerId,
        to: Option<PeerId>,
        msg: &Message,
        show_monitors: bool,
        requested_reply: bool,
    ) -> bool {
        let header = msg.header();
        let mut facts = facts_of(&header, msg);
        facts.requested_reply &= requested_reply;
        let verdict = self.send_verdict(from, to, &facts);
        let refused = if !verdict.allowed {
            Some((Direction::Send, verdict))
        } else if let Some(to) = to {
            let verdict = self.receive_verdict(Some(from), to, &facts, false);
            (!verdict.allowed).then_some((Direction::Receive, verdict))
        } else {
            None
        };
        let requested_reply = facts.requested_reply;
        drop(header);
        match refused {
            None => true,
            Some((direction, verdict)) => {
                if show_monitors {
                    self.copy_to_monitors(msg);
                }
                self.refuse(from, to, msg, (direction, verdict), requested_reply);
                false
            }
        }
    }

    /// May `to` get a copy of `msg` that it matched: a broadcast (both checks), or with
    /// `eavesdropping`, a message addressed to someone else (its receive check). Monitors get
    /// everything, as in dbus-daemon. A refusal is silent, but for a debug line.
    pub(super) fn allow_copy(&self, to: PeerId, msg: &Message, eavesdropping: bool) -> bool {
        if self.peers.get(&to).is_none_or(|p| p.monitor) {
            return true;
        }
        let header = msg.header();
        let facts = facts_of(&header, msg);
        let from = header
            .sender()
            .filter(|s| s.as_str() != DRIVER)
            .and_then(|s| super::peer_id_of(s.as_str()));
        let allowed = (eavesdropping
            || from.is_none_or(|from| self.send_verdict(from, Some(to), &facts).allowed))
            && self
                .receive_verdict(from, to, &facts, eavesdropping)
                .allowed;
        if !allowed {
            debug!(to, member = ?facts.member, "policy keeps a copy of a message from a peer");
        }
        allowed
    }

    /// After a broadcast: the policy kept it from `to` (the first recipient it was kept from),
    /// and dbus-daemon tells the sender so once.
    pub(super) fn report_refused_copy(&mut self, to: PeerId, msg: &Message) {
        let header = msg.header();
        let Some(from) = header
            .sender()
            .filter(|s| s.as_str() != DRIVER)
            .and_then(|s| super::peer_id_of(s.as_str()))
        else {
            return;
        };
        let facts = facts_of(&header, msg);
        let send = self.send_verdict(from, Some(to), &facts);
        let refusal = if send.allowed {
            (
                Direction::Receive,
                self.receive_verdict(Some(from), to, &facts, false),
            )
        } else {
            (Direction::Send, send)
        };
        let requested_reply = facts.requested_reply;
        drop(header);
        self.refuse(from, Some(to), msg, refusal, requested_reply);
    }

    /// The receive check of `to` for a message of the driver. As in dbus-daemon, a refused one
    /// is answered with an `AccessDenied` addressed to the driver itself, which only the
    /// monitors see.
    pub(super) fn allow_from_driver(&mut self, to: PeerId, msg: &Message) -> bool {
        let header = msg.header();
        let facts = facts_of(&header, msg);
        let verdict = self.receive_verdict(None, to, &facts, false);
        drop(header);
        if verdict.allowed {
            return true;
        }
        let text = format!(
            "Rejected receive message, {} matched rules; type=\"{}\", sender=\"(unset)\" ((bus)) \
             destination=\"{}\"",
            verdict.matched_rules,
            type_name(msg.message_type()),
            self.unique_name(to).unwrap_or("(unset)"),
        );
        debug!("{text}");
        match messages::error(msg, &fdo::Error::AccessDenied(text).into()) {
            Ok(error) => self.copy_to_monitors(&error),
            Err(e) => warn!("cannot build AccessDenied: {e}"),
        }
        false
    }

    fn send_verdict(&self, from: PeerId, to: Option<PeerId>, facts: &MessageFacts<'_>) -> Verdict {
        let open = Verdict {
            allowed: true,
            log: false,
            matched_rules: 0,
        };
        let (Some(policy), Some(sender)) = (&self.policy, self.peers.get(&from)) else {
            return open;
        };
        let names = to.map(|to| self.names_of_peer(to));
        let receiver = names.as_deref().map_or(Party::Bus, Party::Peer);
        let (uid, gids) = sender.creds.policy_identity();
        policy.check_send(uid, gids, facts, receiver)
    }

    fn receive_verdict(
        &self,
        from: Option<PeerId>,
        to: PeerId,
        facts: &MessageFacts<'_>,
        eavesdropping: bool,
    ) -> Verdict {
        let open = Verdict {
            allowed: true,
            log: false,
            matched_rules: 0,
        };
        let (Some(policy), Some(receiver)) = (&self.policy, self.peers.get(&to)) else {
            return open;
        };
        let names = from.map(|from| self.names_of_peer(from));
        let sender = names.as_deref().map_or(Party::Bus, Party::Peer);
        let (uid, gids) = receiver.creds.policy_identity();
        policy.check_receive(uid, gids, facts, sender, eavesdropping)
    }

    /// A connection's unique name and every name it owns or waits for.
    fn names_of_peer(&self, id: PeerId) -> Vec<String> {
        let mut names = self.names.names_of(id);
        if let Some(unique) = self.unique_name(id) {
            names.push(unique.to_owned());
        }
        names
    }

    /// Logs a refused message and answers it with `AccessDenied`, in dbus-daemon's words.
    fn refuse(
        &mut self,
        from: PeerId,
        to: Option<PeerId>,
        msg: &Message,
        (direction, verdict): (Direction, Verdict),
        requested_reply: bool,
    ) {
        let header = msg.header();
        let name = |id: Option<PeerId>| {
            id.and_then(|id| self.unique_name(id))
                .unwrap_or("(unset)")
                .to_owned()
        };
        let text = format!(
            "Rejected {} message, {} matched rules; type=\"{}\", sender=\"{}\" interface=\"{}\" \
             member=\"{}\" error name=\"{}\" requested_reply=\"{}\" destination=\"{}\" ({})",
            match direction {
                Direction::Send => "send",
                Direction::Receive => "receive",
            },
            verdict.matched_rules,
            type_name(msg.message_type()),
            name(Some(from)),
            header.interface().map_or("(unset)", |i| i.as_str()),
            header.member().map_or("(unset)", |m| m.as_str()),
            header.error_name().map_or("(unset)", |e| e.as_str()),
            u8::from(requested_reply),
            header.destination().map_or("(unset)", |d| d.as_str()),
            to.map_or_else(|| "bus".to_owned(), |to| name(Some(to))),
        );
        drop(header);
        // dbus-daemon logs every refusal; a client could flood the log that way, so each
        // connection's first refusal is logged for the operator and the rest at debug, and
        // those lines are rate-limited, as a client may open many connections.
        let first = self
            .peers
            .get_mut(&from)
            .is_some_and(|p| !std::mem::replace(&mut p.refusal_logged, true));
        if verdict.log && log_limit::POLICY_REFUSAL_LOGGED.allow() {
            warn!("{text}");
        } else if verdict.log {
            debug!("{text}");
        } else if first && log_limit::POLICY_REFUSAL.allow() {
            info!("{text} (further refusals of this connection are logged at debug)");
        } else {
            debug!("{text}");
        }
        // Like dbus-daemon, any refused message is answered, even a signal (which libdbus
        // flags as expecting no reply): the sender learns why it went nowhere.
        match messages::error(msg, &fdo::Error::AccessDenied(text).into()) {
            Ok(error) => self.send_from_driver(from, &error),
            Err(e) => warn!("cannot build AccessDenied: {e}"),
        }
    }

    /// Shows `msg` to the monitors whose rules match it.
    fn copy_to_monitors(&mut self, msg: &Message) {
        let monitors: Vec<PeerId> = self
            .watchers
            .iter()
            .copied()
            .filter(|id| self.peers.get(id).is_some_and(|p| p.monitor))
            .collect();
        for to in self.matching_peers(msg, None, monitors) {
            self.deliver(to, msg);
        }
    }
}

/// What the policy looks at in `msg`. A reply is taken as requested; `allow_unrequested_reply`
/// says otherwise.
fn facts_of<'a>(header: &'a Header<'a>, msg: &Message) -> MessageFacts<'a> {
    let is_reply = header.reply_serial().is_some();
    MessageFacts {
        message_type: msg.message_type(),
        path: header.path().map(|p| p.as_str()),
        interface: header.interface().map(|i| i.as_str()),
        member: header.member().map(|m| m.as_str()),
        error_name: header.error_name().map(|e| e.as_str()),
        destination: header.destination().map(|d| d.as_str()),
        sender: header.sender().map(|s| s.as_str()),
        is_reply,
        requested_reply: is_reply,
        unix_fds: header.unix_fds().unwrap_or(0),
    }
}

fn type_name(kind: Type) -> &'static str {
    match kind {
        Type::MethodCall => "method_call",
        Type::MethodReturn => "method_return",
        Type::Error => "error",
        Type::Signal => "signal",
    }
}
