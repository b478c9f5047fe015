//! The bus core: every connected peer, the names they own, their match rules and the calls they
//! wait on, and the routing of each message. It runs on one thread and never awaits, so the
//! order of messages is the order of events and no lock is ever needed.

pub mod activation;
pub mod admission;
pub mod driver;
pub mod error;
pub mod events;
mod match_index;
mod memory;
mod name_registry;
mod peer_rules;
mod reply_tracker;
mod router;
mod security;
pub mod settings;
pub mod systemd;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::activation::{Activation, StartQueue};
use crate::config::Policy;
pub use crate::connection::{Conn, Credentials, PeerId};
use crate::match_rule::MatchRule;
use crate::wire::{FrameLimits, MAX_MESSAGE_SIZE};
use driver::messages;
pub use driver::messages::{DRIVER, DRIVER_PATH};
use events::CoreEvent;
use match_index::MatchIndex;
pub use memory::set_memory_release;
use memory::{release_memory_soon, shrink_map};
use name_registry::{NameEvent, NameRegistry};
use peer_rules::PeerRules;
use reply_tracker::ReplyTracker;

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
    conn: Rc<Conn>,
    unique: String,
    /// `Hello` has been answered.
    registered: bool,
    creds: Credentials,
    unix_fds: bool,
    rules: PeerRules,
    /// Whether this connection has become a monitor (its rules then see everything).
    monitor: bool,
    /// This connection owns the name of a service the bus started; the death of its process
    /// ends the connection.
    service_owner: bool,
    /// This peer's messages the bus holds while their services start: bytes and fds.
    held: (usize, usize),
    /// A refused message of this peer has been logged at info.
    refusal_logged: bool,
    /// The bus dropped this peer after its `Hello` while it held more than `NAMES_PER_TURN`
    /// names: its connection's task gives them up a share per turn (`release_names`) before
    /// `disconnect` finishes. It is no longer `registered`, so nothing is routed to it.
    leaving: bool,
}

pub struct Bus {
    guid: String,
    /// The uid the bus runs as: it may reconfigure the bus.
    owner_uid: u32,
    machine_id: String,
    limits: Limits,
    peers: HashMap<PeerId, Peer>,
    names: NameRegistry,
    next_id: PeerId,
    /// Connections with messages queued since their last flush.
    dirty: Vec<Rc<Conn>>,
    /// The rules of all peers (and the monitors), by what broadcasts they could match.
    index: MatchIndex,
    /// The calls that wait for a reply.
    replies: ReplyTracker,
    /// Monitors and peers with eavesdropping rules: they see messages addressed to others.
    watchers: HashSet<PeerId>,
    activation: Activation,
    /// The starts in progress and who waits for them.
    starts: StartQueue,
    /// The configuration's `<policy>` rules; none (a bus built without a configuration) lets
    /// everything through.
    policy: Option<Policy>,
    /// The policy lets every message through: the per-message checks are skipped.
    policy_open: bool,
    /// Connections that `Hello` completed, by uid.
    completed_by_uid: HashMap<u32, usize>,
    /// Connections that have not yet: in the handshake, or waiting for `Hello`.
    admission: admission::Admission,
    /// Reads the configuration again for `ReloadConfig` and SIGHUP.
    reloader: Option<settings::Reloader>,
    /// Where timers and watchers report back to the core.
    events: tokio::sync::mpsc::UnboundedSender<CoreEvent>,
}

/// How many names a leaving peer gives up per turn: about 1 ms of `NameOwnerChanged`.
const NAMES_PER_TURN: usize = 256;

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
            replies: ReplyTracker::default(),
            watchers: HashSet::default(),
            activation,
            starts: StartQueue::default(),
            policy: None,
            policy_open: true,
            completed_by_uid: HashMap::default(),
            admission: admission::Admission::default(),
            reloader: None,
            events,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What reads the configuration again for `ReloadConfig` and SIGHUP.
    pub fn set_reloader(&mut self, reloader: settings::Reloader) {
        self.reloader = Some(reloader);
    }

    /// Counts a new connection of `uid` among the incomplete ones, until its `Hello` or its
    /// `auth_timeout`; also returns those it pushed out (see [`admission`]).
    pub fn enter_incomplete(
        &mut self,
        uid: u32,
    ) -> (Rc<admission::Ticket>, Vec<Rc<admission::Ticket>>) {
        let deadline = tokio::time::Instant::now() + self.limits.auth_timeout;
        let cap = self.limits.max_incomplete_connections;
        self.admission.enter(uid, deadline, cap)
    }

    /// An incomplete connection has gone.
    pub fn leave_incomplete(&mut self, ticket: &admission::Ticket) {
        self.admission.leave(ticket);
    }

    /// Closes the oldest incomplete connection of the uid that holds the most (out of fds).
    pub fn evict_incomplete(&mut self) -> Option<Rc<admission::Ticket>> {
        self.admission.evict_one()
    }

    /// Adds an authenticated connection, which `ticket` counted among the incomplete ones. It
    /// gets its unique name now and announces it at `Hello`.
    pub fn add_peer(
        &mut self,
        conn: Rc<Conn>,
        creds: Credentials,
        unix_fds: bool,
        ticket: &Rc<admission::Ticket>,
    ) -> PeerId {
        let id = self.next_id;
        self.next_id += 1;
        self.admission.attach(ticket, id);
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

    /// Reacts to an event from outside the message flow.
    pub fn handle_event(&mut self, event: CoreEvent) {
        match event {
            CoreEvent::Exited(exit) => self.process_exited(exit),
            CoreEvent::StartTimedOut { name, generation } => {
                self.start_timed_out(&name, generation)
            }
            CoreEvent::OwnerExited { peer } => self.owner_exited(peer),
            CoreEvent::InstanceGone(gone) => self.instance_gone(&gone),
            CoreEvent::Reload(why) => {
                info!("reloading activation files: {why}");
                self.reload_activation();
            }
            CoreEvent::ReplyTimedOut {
                caller,
                serial,
                callee,
            } => self.send_no_reply(caller, serial, callee, NO_REPLY_TIMEOUT),
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
                NameEvent::OwnerChanged { .. } if !self.owner_changes_heard() => continue,
                NameEvent::OwnerChanged { name, old, new } => {
                    let old = old
                        .and_then(|id| self.unique_name(id))
                        .unwrap_or("")
                        .to_owned();
                    let new = new
                        .and_then(|id| self.unique_name(id))
                        .unwrap_or("")
                        .to_owned();
                    messages::name_owner_changed(name, &old, &new).map(|m| (None, m))
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
                    messages::signal(member, Some(unique), &(name.as_str(),))
                        .map(|m| (Some(*peer), m))
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

    /// At stop: shuts down every peer's socket in both directions, so that each client, a
    /// service the bus started among them, sees the bus go (EOF) at once, whoever else still
    /// holds the socket; each connection's task then ends as after a client's close. Returns
    /// how many there were.
    pub fn shut_down_connections(&mut self) -> usize {
        for peer in self.peers.values() {
            let fd = peer.conn.socket.as_raw_fd();
            if let Err(e) = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both) {
                debug!(peer = %peer.unique, "cannot shut the connection down: {e}");
            }
            peer.conn.closing.set(true);
            peer.conn.wake.notify_one();
        }
        self.peers.len()
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
        if self.peers.remove(&id).is_none() {
            return;
        }
        self.watchers.remove(&id);
        for (caller, serial) in self.replies.peer_gone(id) {
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
        if !self.owner_changes_heard() {
            return;
        }
        match messages::name_owner_changed(name, old, new) {
            Ok(msg) => self.broadcast(&msg),
            Err(e) => warn!("cannot build NameOwnerChanged: {e}"),
        }
    }

    /// Whether any peer (a monitor included) has a rule that could take `NameOwnerChanged`.
    /// Most connections come and go unheard: building the signal twice per connection for
    /// nobody took about 7 % of the bus's time under churn (connect, `Hello`, close).
    fn owner_changes_heard(&self) -> bool {
        self.index.may_match(messages::DRIVER, "NameOwnerChanged")
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
        let owed = self.replies.peer_gone(id);
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
        for (caller, serial) in owed {
            self.send_no_reply(caller, serial, id, NO_REPLY_DISCONNECTED);
        }
    }
}

const NO_REPLY_DISCONNECTED: &str =
    "Message recipient disconnected from message bus without replying";
/// dbus-daemon's words for a call that `reply_timeout` ended.
const NO_REPLY_TIMEOUT: &str = "Message did not receive a reply (timeout by message bus)";

fn read_machine_id() -> String {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() == 32)
        .unwrap_or_else(|| crate::address::random_hex(16))
}
