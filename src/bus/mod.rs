//! The bus core: every connected peer, the names they own, their match rules and the calls they
//! wait on, and the routing of each message. It runs on one thread and never awaits, so the
//! order of messages is the order of events and no lock is ever needed.

pub mod activation;
pub mod admission;
mod match_index;
pub mod names;
mod peer_rules;
mod security;
pub mod settings;
pub mod systemd;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, trace, warn};
use zbus::Message;
use zbus::message::{Flags, Type};

use crate::activation::{Activation, Waiter};
use crate::config::Policy;
use crate::log_limit;
use crate::match_rule::{Fields, MatchContext, MatchRule};
use crate::socket::Socket;
use crate::wire::{FrameLimits, MAX_MESSAGE_SIZE, Outbox};
use activation::CoreEvent;
use match_index::MatchIndex;
use names::{NameEvent, NameRegistry};
use peer_rules::PeerRules;

/// A connection's number: its unique name is `:1.<id>`.
pub type PeerId = u64;

/// The bus driver's own name.
pub const DRIVER: &str = "org.freedesktop.DBus";
pub const DRIVER_PATH: &str = "/org/freedesktop/DBus";

/// What the bus and a connection's task share: the socket, the messages waiting to be written
/// to it, and a way to wake the task.
pub struct Conn {
    pub socket: Socket,
    pub outbox: RefCell<Outbox>,
    /// Wakes the connection's task: to wait until the socket takes more, or to close.
    pub wake: Notify,
    /// The bus has dropped this connection; its task ends.
    pub closing: Cell<bool>,
    /// The socket took less than the outbox held: the task waits until it takes more.
    pub write_blocked: Cell<bool>,
    /// The bus holds as much of this sender's messages as `max_incoming_bytes` and
    /// `max_incoming_unix_fds` allow: its socket is not read until they are delivered.
    pub paused: Cell<bool>,
}

impl Conn {
    pub fn new(socket: Socket) -> Rc<Conn> {
        Rc::new(Conn {
            socket,
            outbox: RefCell::new(Outbox::default()),
            wake: Notify::new(),
            closing: Cell::new(false),
            write_blocked: Cell::new(false),
            paused: Cell::new(false),
        })
    }

    /// Writes what the socket takes now; what it does not take waits for the task.
    pub fn flush(&self) {
        let result = self.outbox.borrow_mut().flush(self.socket.as_raw_fd());
        let blocked = matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        self.write_blocked.set(blocked);
        match result {
            Ok(()) => {}
            Err(_) if blocked => self.wake.notify_one(),
            Err(e) => {
                debug!("write failed: {e}");
                self.closing.set(true);
                self.wake.notify_one();
            }
        }
    }
}

/// Who is at the other end of a connection, as the kernel tells it.
#[derive(Debug)]
pub struct Credentials {
    pub uid: u32,
    pub pid: u32,
    pub gids: Vec<u32>,
    pub security_label: Option<Vec<u8>>,
    /// The client authenticated with ANONYMOUS: the bus does not vouch for its uid.
    pub anonymous: bool,
}

impl Credentials {
    /// The uid and groups the policy judges: for an anonymous client, the uid -1 and no
    /// groups, so that no `user` or `group` rule is about it, as in dbus-daemon.
    pub fn policy_identity(&self) -> (u32, &[u32]) {
        if self.anonymous {
            (u32::MAX, &[])
        } else {
            (self.uid, &self.gids)
        }
    }
}

/// Limits the bus enforces per connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_outgoing_bytes: usize,
    pub max_names_per_connection: usize,
    pub max_match_rules_per_connection: usize,
    pub max_replies_per_connection: usize,
    /// A call not answered within this time gets `NoReply` (none: calls wait forever).
    pub reply_timeout: Option<Duration>,
    /// Authenticated connections of one uid.
    pub max_connections_per_user: usize,
    /// Authenticated connections in all.
    pub max_completed_connections: usize,
    /// Services being started at once.
    pub max_pending_service_starts: usize,
    /// Largest message and most fds in one message; a bigger one disconnects its sender.
    pub frame: FrameLimits,
    /// Deadline for a client's whole handshake.
    pub auth_timeout: Duration,
    /// Connections in the handshake at once.
    pub max_incomplete_connections: usize,
    /// What a sender's messages held for starting services may take before the bus stops
    /// reading from it until they are delivered.
    pub max_incoming_bytes: usize,
    pub max_incoming_unix_fds: usize,
    /// Fds queued for one receiver; past it a message with fds is refused like one past
    /// `max_outgoing_bytes`.
    pub max_outgoing_unix_fds: usize,
    /// How long a client may leave a message half-sent after sending fds with it.
    pub pending_fd_timeout: Duration,
}

impl Default for Limits {
    /// The values of dbus-daemon's stock session configuration, but for the outgoing queue: a
    /// peer that does not read may hold at most 64 MiB of the bus's memory.
    fn default() -> Self {
        Limits {
            max_outgoing_bytes: 64 << 20,
            max_names_per_connection: 50_000,
            max_match_rules_per_connection: 50_000,
            max_replies_per_connection: 50_000,
            reply_timeout: None,
            max_connections_per_user: 100_000,
            max_completed_connections: 100_000,
            max_pending_service_starts: 10_000,
            frame: FrameLimits {
                max_message_size: MAX_MESSAGE_SIZE,
                max_fds: 16,
            },
            auth_timeout: Duration::from_secs(30),
            max_incomplete_connections: 64,
            max_incoming_bytes: 127 << 20,
            max_incoming_unix_fds: 250_000_000,
            max_outgoing_unix_fds: 250_000_000,
            pending_fd_timeout: Duration::from_secs(150),
        }
    }
}

pub struct Peer {
    pub conn: Rc<Conn>,
    pub unique: String,
    /// `Hello` has been answered.
    pub registered: bool,
    pub creds: Credentials,
    pub unix_fds: bool,
    pub rules: PeerRules,
    /// Whether this connection has become a monitor (its rules then see everything).
    pub monitor: bool,
    /// Calls this peer made that wait for a reply: serial → callee.
    pub awaiting: HashMap<u32, PeerId>,
    /// Calls to this peer that wait for its reply: (caller, serial).
    pub owed: HashSet<(PeerId, u32)>,
    /// This connection owns the name of a service the bus started; the death of its process
    /// ends the connection.
    pub service_owner: bool,
    /// This peer's messages the bus holds while their services start: bytes and fds.
    pub held: (usize, usize),
    /// A refused message of this peer has been logged at info.
    pub refusal_logged: bool,
    /// The bus dropped this peer after its `Hello` while it held more than `NAMES_PER_TURN`
    /// names: its connection's task gives them up a share per turn (`release_names`) before
    /// `disconnect` finishes. It is no longer `registered`, so nothing is routed to it.
    pub leaving: bool,
}

pub struct Bus {
    pub guid: String,
    /// The uid the bus runs as: it may reconfigure the bus.
    pub owner_uid: u32,
    pub machine_id: String,
    pub limits: Limits,
    pub peers: HashMap<PeerId, Peer>,
    pub names: NameRegistry,
    next_id: PeerId,
    /// Connections with messages queued since their last flush.
    dirty: Vec<Rc<Conn>>,
    /// The rules of all peers (and the monitors), by what broadcasts they could match.
    index: MatchIndex,
    /// Monitors and peers with eavesdropping rules: they see messages addressed to others.
    watchers: HashSet<PeerId>,
    pub activation: Activation,
    /// The configuration's `<policy>` rules; none (a bus built without a configuration) lets
    /// everything through.
    pub policy: Option<Policy>,
    /// The policy lets every message through: the per-message checks are skipped.
    pub policy_open: bool,
    /// Connections that `Hello` completed, by uid.
    completed_by_uid: HashMap<u32, usize>,
    /// Connections that have not yet: in the handshake, or waiting for `Hello`.
    pub admission: admission::Admission,
    /// Reads the configuration again for `ReloadConfig` and SIGHUP.
    pub reloader: Option<settings::Reloader>,
    /// Where timers and watchers report back to the core.
    events: tokio::sync::mpsc::UnboundedSender<CoreEvent>,
}

/// What hands freed memory back to the system; the binary sets it, as it chooses the allocator.
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// How long after a peer leaves the bus hands back what was freed: long enough for the peer's
/// task to drop its queues, and a burst of departures costs one release.
const RELEASE_DELAY: Duration = Duration::from_secs(1);

/// How many names a leaving peer gives up per turn: about 1 ms of `NameOwnerChanged`.
const NAMES_PER_TURN: usize = 256;

thread_local! {
    /// A release is due: later calls of [`release_memory_soon`] join it.
    static RELEASE_SCHEDULED: Cell<bool> = const { Cell::new(false) };
}

/// Sets what [`release_memory_soon`] runs: allocators keep freed pages for reuse, so what a
/// peak took (a client that queued 100k replies, or made 50k match rules) would stay with the
/// process after the client leaves.
pub fn set_memory_release(release: fn()) {
    // Set once at start; a second call changes nothing.
    let _ = RELEASE_MEMORY.set(release);
}

/// Has freed memory handed back to the system in `RELEASE_DELAY`, once for all calls until then.
/// Call it on the bus's thread, within its task set.
pub fn release_memory_soon() {
    let Some(&release) = RELEASE_MEMORY.get() else {
        return;
    };
    if RELEASE_SCHEDULED.with(|due| due.replace(true)) {
        return;
    }
    tokio::task::spawn_local(async move {
        tokio::time::sleep(RELEASE_DELAY).await;
        RELEASE_SCHEDULED.with(|due| due.set(false));
        let started = std::time::Instant::now();
        release();
        debug!(took = ?started.elapsed(), "handed freed memory back to the system");
    });
}

/// Gives back the spare room of a map that holds less than a quarter of what it has room for:
/// a hash map never shrinks by itself, so one peak (50k names) would keep its table for good.
/// Halving at a quarter keeps the cost of shrinking in proportion to the removals.
fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut std::collections::HashMap<K, V, S>,
) {
    /// Small tables are not worth the copy.
    const FLOOR: usize = 1024;
    if map.capacity() > FLOOR && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// Parses `:1.N` into N.
pub fn peer_id_of(unique: &str) -> Option<PeerId> {
    unique.strip_prefix(":1.")?.parse().ok()
}

impl Bus {
    pub fn new(
        guid: String,
        limits: Limits,
        activation: Activation,
        events: tokio::sync::mpsc::UnboundedSender<CoreEvent>,
    ) -> Bus {
        Bus {
            guid,
            owner_uid: nix::unistd::getuid().as_raw(),
            machine_id: read_machine_id(),
            limits,
            peers: HashMap::default(),
            names: NameRegistry::default(),
            next_id: 1,
            dirty: Vec::new(),
            index: MatchIndex::default(),
            watchers: HashSet::default(),
            activation,
            policy: None,
            policy_open: true,
            completed_by_uid: HashMap::default(),
            admission: admission::Admission::default(),
            reloader: None,
            events,
        }
    }

    /// Adds an authenticated connection. It gets its unique name now and announces it at `Hello`.
    pub fn add_peer(&mut self, conn: Rc<Conn>, creds: Credentials, unix_fds: bool) -> PeerId {
        let id = self.next_id;
        self.next_id += 1;
        self.peers.insert(
            id,
            Peer {
                conn,
                unique: format!(":1.{id}"),
                registered: false,
                creds,
                unix_fds,
                rules: PeerRules::default(),
                monitor: false,
                awaiting: HashMap::default(),
                owed: HashSet::default(),
                service_owner: false,
                held: (0, 0),
                refusal_logged: false,
                leaving: false,
            },
        );
        id
    }

    /// The registered peer that `name` (unique or well-known) stands for.
    pub fn resolve(&self, name: &str) -> Option<PeerId> {
        let id = if name.starts_with(':') {
            peer_id_of(name)?
        } else {
            self.names.owner(name)?
        };
        self.peers
            .get(&id)
            .filter(|p| p.registered && !p.monitor)
            .map(|_| id)
    }

    pub fn unique_name(&self, id: PeerId) -> Option<&str> {
        self.peers.get(&id).map(|p| p.unique.as_str())
    }

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
    fn unicast(&mut self, from: PeerId, msg: Message, dest: &str, show_watchers: bool) {
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
            self.reply_error(
                from,
                &msg,
                "org.freedesktop.DBus.Error.NotSupported",
                "Tried to send a message with Unix file descriptors to a client that does not support them",
            );
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
        let (name, text) = if msg.primary_header().flags().contains(Flags::NO_AUTO_START) {
            (
                "org.freedesktop.DBus.Error.NameHasNoOwner",
                format!("Name \"{dest}\" does not exist"),
            )
        } else {
            (
                "org.freedesktop.DBus.Error.ServiceUnknown",
                format!("The name {dest} was not provided by any .service files"),
            )
        };
        self.reply_error(from, msg, name, &text);
    }

    /// Records a call that waits for a reply, within the per-connection limit.
    fn note_pending_call(&mut self, from: PeerId, to: PeerId, msg: &Message) -> bool {
        let serial = msg.primary_header().serial_num().get();
        let Some(caller) = self.peers.get_mut(&from) else {
            return false;
        };
        if caller.awaiting.len() >= self.limits.max_replies_per_connection {
            let text = "The maximum number of pending replies per connection has been reached";
            self.reply_error(from, msg, "org.freedesktop.DBus.Error.LimitsExceeded", text);
            return false;
        }
        caller.awaiting.insert(serial, to);
        if let Some(callee) = self.peers.get_mut(&to) {
            callee.owed.insert((from, serial));
        }
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
        let serial = serial.get();
        let Some(caller) = self.peers.get_mut(&to) else {
            return false;
        };
        if caller.awaiting.get(&serial) != Some(&from) {
            return false;
        }
        caller.awaiting.remove(&serial);
        if let Some(callee) = self.peers.get_mut(&from) {
            callee.owed.remove(&(to, serial));
        }
        true
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
            if let Some(caller) = self.peers.get_mut(&from) {
                caller
                    .awaiting
                    .remove(&msg.primary_header().serial_num().get());
            }
            let text =
                format!("The outgoing queue of {receiver} is full: it does not read its messages");
            self.reply_error(
                from,
                msg,
                "org.freedesktop.DBus.Error.LimitsExceeded",
                &text,
            );
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
    fn copy_to_watchers(&mut self, msg: &Message, addressed: Option<PeerId>) {
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
    fn matching_peers(
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
    fn unindex_rules(&mut self, id: PeerId) {
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
    fn refresh_watcher(&mut self, id: PeerId) {
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
    pub fn reply_error(&mut self, to: PeerId, call: &Message, name: &str, text: &str) {
        if call.message_type() != Type::MethodCall || !expects_reply(call) {
            return;
        }
        match driver_error(call, name, text) {
            Ok(reply) => self.send_from_driver(to, &reply),
            Err(e) => warn!("cannot build error {name}: {e}"),
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

    /// Turns name events into the driver's signals, in order; a name that gets an owner may
    /// complete a start.
    pub fn announce(&mut self, events: Vec<NameEvent>) {
        let mut owned = Vec::new();
        for event in events {
            if let NameEvent::OwnerChanged {
                name,
                new: Some(new),
                ..
            } = &event
            {
                owned.push((name.clone(), *new));
            }
            let built = match &event {
                NameEvent::OwnerChanged { name, old, new } => {
                    let old = old
                        .and_then(|id| self.unique_name(id))
                        .unwrap_or("")
                        .to_owned();
                    let new = new
                        .and_then(|id| self.unique_name(id))
                        .unwrap_or("")
                        .to_owned();
                    driver_signal(
                        "NameOwnerChanged",
                        None,
                        &(name.as_str(), old.as_str(), new.as_str()),
                    )
                    .map(|m| (None, m))
                }
                NameEvent::Acquired { name, peer } | NameEvent::Lost { name, peer } => {
                    let member = if matches!(event, NameEvent::Acquired { .. }) {
                        "NameAcquired"
                    } else {
                        "NameLost"
                    };
                    let Some(unique) = self.unique_name(*peer) else {
                        continue;
                    };
                    driver_signal(member, Some(unique), &(name.as_str(),)).map(|m| (Some(*peer), m))
                }
            };
            match built {
                Ok((None, msg)) => self.broadcast(&msg),
                Ok((Some(to), msg)) => self.send_from_driver(to, &msg),
                Err(e) => warn!("cannot build a driver signal: {e}"),
            }
        }
        for (name, owner) in owned {
            self.name_owned(&name, owner);
        }
    }

    /// Writes what each connection touched since the last flush has queued.
    pub fn take_dirty(&mut self) -> Vec<Rc<Conn>> {
        std::mem::take(&mut self.dirty)
    }

    /// Drops a peer: its names pass on, its callers get `NoReply`, everyone hears it is gone.
    pub fn disconnect(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.conn.closing.set(true);
        peer.conn.wake.notify_one();
        let joined = peer.registered || peer.leaving;
        // Unregistered, it receives nothing more, but its unique name still reads in the signals.
        peer.registered = false;
        if joined && !peer.monitor && self.names.count_for(id) > NAMES_PER_TURN {
            // Its task, woken above, gives up the names and calls this again.
            peer.leaving = true;
            return;
        }
        let announced = joined && !peer.monitor;
        let completed = joined.then_some(peer.creds.uid);
        if announced {
            debug!(peer = %peer.unique, "disconnected");
            let unique = peer.unique.clone();
            let events = self.names.remove_peer(id);
            self.announce(events);
            self.broadcast_owner_changed(&unique, &unique, "");
        }
        if let Some(uid) = completed {
            self.connection_gone(uid);
        }
        self.unindex_rules(id);
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        self.watchers.remove(&id);
        for (caller, serial) in in_call_order(peer.owed) {
            self.send_no_reply(caller, serial, id, NO_REPLY_DISCONNECTED);
        }
        self.names.shrink();
        self.index.shrink();
        shrink_map(&mut self.peers);
        // What the peer held (queues, rules, names) is freed now or when its task ends.
        release_memory_soon();
    }

    /// Gives up to `NAMES_PER_TURN` of the names that leaving peer `id` holds, and announces
    /// them; returns whether it holds more. One peer that leaves with 50k names would otherwise
    /// hold every other connection up for the 50k `NameOwnerChanged` that follow.
    pub fn release_names(&mut self, id: PeerId) -> bool {
        if !self.peers.get(&id).is_some_and(|p| p.leaving) {
            return false;
        }
        let events = self.names.remove_some(id, NAMES_PER_TURN);
        self.announce(events);
        self.names.count_for(id) > 0
    }

    pub fn broadcast_owner_changed(&mut self, name: &str, old: &str, new: &str) {
        match driver_signal("NameOwnerChanged", None, &(name, old, new)) {
            Ok(msg) => self.broadcast(&msg),
            Err(e) => warn!("cannot build NameOwnerChanged: {e}"),
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
    fn send_no_reply(&mut self, caller: PeerId, serial: u32, callee: PeerId, text: &str) {
        let Some(peer) = self.peers.get_mut(&caller) else {
            return;
        };
        if peer.awaiting.get(&serial) != Some(&callee) {
            return;
        }
        peer.awaiting.remove(&serial);
        let unique = peer.unique.clone();
        if let Some(callee) = self.peers.get_mut(&callee) {
            callee.owed.remove(&(caller, serial));
        }
        match no_reply_error(serial, &unique, text) {
            Ok(msg) => self.send_from_driver(caller, &msg),
            Err(e) => warn!("cannot build NoReply: {e}"),
        }
    }

    /// Turns a peer into a monitor: it loses its names and its unique name, and from now on
    /// receives copies of what its rules match.
    pub fn make_monitor(&mut self, id: PeerId, rules: Vec<MatchRule>) {
        // Each name is released as by `ReleaseName`, so the monitor hears `NameLost` for it.
        for name in self.names.names_of(id) {
            let (_, events) = self.names.release(&name, id);
            self.announce(events);
        }
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let unique = peer.unique.clone();
        let owed = std::mem::take(&mut peer.owed);
        peer.awaiting.clear();
        // Clients such as busctl wait for the loss of their unique name before they monitor.
        self.announce(vec![NameEvent::Lost {
            name: unique.clone(),
            peer: id,
        }]);
        self.broadcast_owner_changed(&unique, &unique, "");
        self.unindex_rules(id);
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.rules = PeerRules::from_list(rules);
            peer.monitor = true;
        }
        // A monitor's own rules are tried on every message it could see.
        self.index.add(id, None, None);
        self.refresh_watcher(id);
        for (caller, serial) in in_call_order(owed) {
            self.send_no_reply(caller, serial, id, NO_REPLY_DISCONNECTED);
        }
    }
}

const NO_REPLY_DISCONNECTED: &str =
    "Message recipient disconnected from message bus without replying";
/// dbus-daemon's words for a call that `reply_timeout` ended.
const NO_REPLY_TIMEOUT: &str = "Message did not receive a reply (timeout by message bus)";

/// Pending calls in the order they were made, so that their `NoReply` errors come in that order.
fn in_call_order(calls: HashSet<(PeerId, u32)>) -> Vec<(PeerId, u32)> {
    let mut calls: Vec<_> = calls.into_iter().collect();
    calls.sort_unstable_by_key(|&(caller, serial)| (serial, caller));
    calls
}

fn is_hello(msg: &Message) -> bool {
    let header = msg.header();
    msg.message_type() == Type::MethodCall
        && header.destination().map(|d| d.as_str()) == Some(DRIVER)
        && header.member().map(|m| m.as_str()) == Some("Hello")
        && header.interface().is_none_or(|i| i.as_str() == DRIVER)
}

pub fn expects_reply(msg: &Message) -> bool {
    !msg.primary_header()
        .flags()
        .contains(Flags::NO_REPLY_EXPECTED)
}

/// A signal from the driver; `to` makes it unicast.
pub fn driver_signal<B>(member: &str, to: Option<&str>, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + zbus::DynamicType,
{
    let mut builder = Message::signal(DRIVER_PATH, DRIVER, member).sender(DRIVER);
    if let Some(to) = to {
        builder = builder.destination(to);
    }
    builder.build(body)
}

/// An error from the driver in reply to `call`.
pub fn driver_error(call: &Message, name: &str, text: &str) -> zbus::Result<Message> {
    let header = call.header();
    let mut builder = Message::error(&header, name).sender(DRIVER);
    if let Some(sender) = header.sender() {
        builder = builder.destination(sender.as_str());
    }
    builder.build(&(text,))
}

fn no_reply_error(serial: u32, to: &str, text: &str) -> zbus::Result<Message> {
    let call = Message::method_call("/", "x")
        .serial(std::num::NonZeroU32::new(serial).ok_or(zbus::Error::InvalidSerial)?)
        .sender(to)
        .build(&())?;
    driver_error(&call, "org.freedesktop.DBus.Error.NoReply", text)
}

fn read_machine_id() -> String {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() == 32)
        .unwrap_or_else(|| crate::address::random_hex(16))
}
