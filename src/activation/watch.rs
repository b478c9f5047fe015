//! Watching the activation directories, so that a file added, changed or removed is picked up
//! without a reload request.
//!
//! A directory that does not exist (yet) is watched through its nearest existing ancestor, as
//! dbus-daemon does: `~/.local/share/dbus-1/services` often appears only after the bus started.
//! When a missing component appears, the watch moves down towards the directory; when a watched
//! directory goes away, it moves back up. Whenever the set of directories that exist and are
//! watched changes, or something changes inside one of them, the files are read again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{debug, warn};

/// Changes that come together (an editor's save, a package install) make one reload.
const SETTLE: Duration = Duration::from_millis(100);

/// What is watched in an activation directory itself: any change of its entries.
const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

/// What is watched in the nearest existing ancestor of a missing directory: only what can make
/// the next component of the path appear, or the ancestor itself go away.
const ANCESTOR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

/// How many times one pass moves watches before giving up until the next event: each round
/// descends at least one level (`mkdir -p a/b/c` creates several at once).
const MAX_ROUNDS: usize = 64;

/// Starts watching the directories `dirs` holds (and follows it when a reload changes them),
/// calling `reload` with the reason whenever the files in them may have changed, until it
/// returns false (the bus is gone). The watches are in place when this returns, so that nothing
/// written after the first read of the files is missed.
pub fn watch_dirs(
    mut dirs: watch::Receiver<Vec<PathBuf>>,
    reload: impl Fn(&'static str) -> bool + 'static,
) {
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(inotify) => InotifyFd(inotify),
        Err(e) => {
            warn!(
                "cannot watch activation directories (inotify: {e}); reload with SIGHUP or ReloadConfig"
            );
            return;
        }
    };
    let mut watches = Watches::new(dirs.borrow_and_update().clone());
    watches.reconcile(&inotify.0);
    // SAFETY: the `InotifyFd` owns its descriptor, moves into the `AsyncFd` with it, and always
    // returns that same descriptor.
    let fd = match unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll inotify: {e}; reload with SIGHUP or ReloadConfig");
            return;
        }
    };
    tokio::task::spawn_local(async move {
        loop {
            tokio::select! {
                batch = next_events(&fd) => {
                    let Some(batch) = batch else { return };
                    if watches.settle_and_absorb(&fd.get_ref().0, batch).await
                        && !reload("an activation directory changed")
                    {
                        return;
                    }
                }
                changed = dirs.changed() => {
                    // The bus is gone.
                    if changed.is_err() {
                        return;
                    }
                    let targets = dirs.borrow_and_update().clone();
                    if watches.retarget(&fd.get_ref().0, targets)
                        && !reload("new activation directories are watched")
                    {
                        return;
                    }
                }
            }
        }
    });
}

/// An `Inotify` that tokio can poll.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One inotify watch: on which directory (by identity, to notice a re-created one) and for what.
#[derive(Debug, Clone, Copy)]
struct Watched {
    wd: WatchDescriptor,
    mask: AddWatchFlags,
    /// Device and inode of the directory when the watch was added.
    identity: (u64, u64),
}

/// The activation directories and the watches that stand for them.
struct Watches {
    /// The activation directories, existing or not.
    targets: Vec<PathBuf>,
    /// Each watched path: an activation directory or the nearest existing ancestor of one.
    watched: HashMap<PathBuf, Watched>,
}

impl Watches {
    fn new(targets: Vec<PathBuf>) -> Watches {
        Watches {
            targets,
            watched: HashMap::new(),
        }
    }

    /// A reload changed the activation directories: watch the new set. Returns whether some
    /// directory is now watched that was not: what was written there after the reload read it
    /// and before the watch was added must be read again.
    fn retarget(&mut self, inotify: &Inotify, targets: Vec<PathBuf>) -> bool {
        debug!(dirs = ?targets, "activation directories changed");
        let before = self.present_targets();
        self.targets = targets;
        self.reconcile(inotify);
        !self.present_targets().is_subset(&before)
    }

    /// Takes in a batch of events, and what comes while it settles; moves the watches as the
    /// directories appeared or went. Returns whether the files must be read again.
    async fn settle_and_absorb(&mut self, inotify: &Inotify, mut batch: Vec<InotifyEvent>) -> bool {
        tokio::time::sleep(SETTLE).await;
        batch.extend(drain(inotify));
        let before = self.present_targets();
        let mut reload = false;
        for event in &batch {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                warn!("inotify queue overflowed; reading the activation files again");
                reload = true;
                continue;
            }
            reload |= self.is_target_watch(event.wd);
            let gone = AddWatchFlags::IN_IGNORED
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF;
            if event.mask.intersects(gone) {
                // The directory was deleted or moved away (or we removed its watch): whatever
                // now has its name is watched afresh.
                self.watched.retain(|_, w| w.wd != event.wd);
                self.unwatch(inotify, event.wd);
            }
        }
        self.reconcile(inotify);
        let after = self.present_targets();
        for appeared in after.difference(&before) {
            debug!("activation directory {} appeared", appeared.display());
        }
        for gone in before.difference(&after) {
            debug!("activation directory {} went away", gone.display());
        }
        reload || before != after
    }

    /// Whether `wd` watches an activation directory itself (not an ancestor).
    fn is_target_watch(&self, wd: WatchDescriptor) -> bool {
        self.watched
            .values()
            .any(|w| w.wd == wd && w.mask.contains(DIR_EVENTS))
    }

    /// The activation directories that exist and are watched themselves.
    fn present_targets(&self) -> BTreeSet<PathBuf> {
        self.targets
            .iter()
            .filter(|t| {
                self.watched
                    .get(*t)
                    .is_some_and(|w| w.mask.contains(DIR_EVENTS))
            })
            .cloned()
            .collect()
    }

    /// Makes the watches match the file system: each activation directory is watched itself if
    /// it exists, else through its nearest existing ancestor.
    fn reconcile(&mut self, inotify: &Inotify) {
        let mut wanted = wanted_watches(&self.targets);
        for _ in 0..MAX_ROUNDS {
            self.apply(inotify, &wanted);
            // A directory created between looking and watching raised no event: look again.
            let now = wanted_watches(&self.targets);
            if now == wanted {
                return;
            }
            wanted = now;
        }
        debug!("activation directories keep changing; watching again at the next event");
    }

    /// Removes the watches not in `wanted` (or on a directory that was replaced), and adds
    /// those missing.
    fn apply(&mut self, inotify: &Inotify, wanted: &BTreeMap<PathBuf, AddWatchFlags>) {
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(path, w)| {
                wanted.get(*path) != Some(&w.mask) || identity(path) != Some(w.identity)
            })
            .map(|(path, _)| path.clone())
            .collect();
        for path in stale {
            if let Some(old) = self.watched.remove(&path) {
                self.unwatch(inotify, old.wd);
            }
        }
        for (path, &mask) in wanted {
            if self.watched.contains_key(path) {
                continue;
            }
            match add_watch(inotify, path, mask) {
                Ok(watched) => {
                    debug!(dir = %path.display(), ancestor = !mask.contains(DIR_EVENTS), "watching");
                    self.watched.insert(path.clone(), watched);
                }
                Err(e) => debug!("cannot watch {}: {e}", path.display()),
            }
        }
    }

    /// Removes a watch, unless another path shares it (the same directory by another name).
    fn unwatch(&self, inotify: &Inotify, wd: WatchDescriptor) {
        if self.watched.values().any(|w| w.wd == wd) {
            return;
        }
        // It fails when the kernel removed it already (the directory is gone): nothing to do.
        let _ = inotify.rm_watch(wd);
    }
}

/// Adds a watch on `path` and notes which directory it is.
fn add_watch(inotify: &Inotify, path: &Path, mask: AddWatchFlags) -> Result<Watched, String> {
    let wd = inotify.add_watch(path, mask).map_err(|e| e.to_string())?;
    // Looked at after adding: if the directory was replaced in between, the next event on
    // either of them finds the mismatch.
    let identity = identity(path).ok_or("it went away")?;
    Ok(Watched { wd, mask, identity })
}

/// What to watch for `targets`: each one that exists, else its nearest existing ancestor.
fn wanted_watches(targets: &[PathBuf]) -> BTreeMap<PathBuf, AddWatchFlags> {
    let mut wanted: BTreeMap<PathBuf, AddWatchFlags> = BTreeMap::new();
    for target in targets {
        let Some(existing) = nearest_existing(target) else {
            continue;
        };
        let mask = if existing == *target {
            DIR_EVENTS
        } else {
            ANCESTOR_EVENTS
        };
        *wanted.entry(existing).or_insert(AddWatchFlags::empty()) |= mask;
    }
    wanted
}

/// `dir` if it is a directory, else its nearest ancestor that is (`.` for a relative path
/// none of whose components exist).
fn nearest_existing(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.is_dir())
        .map(Path::to_path_buf)
}

/// The device and inode of the directory at `path`.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Waits until inotify reports something, and returns it. `None` if it cannot be read any more.
async fn next_events(fd: &AsyncFd<InotifyFd>) -> Option<Vec<InotifyEvent>> {
    loop {
        let mut guard = match fd.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                warn!("inotify failed: {e}");
                return None;
            }
        };
        match fd.get_ref().0.read_events() {
            Ok(events) if !events.is_empty() => return Some(events),
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(e) => {
                warn!("cannot read inotify events: {e}");
                return None;
            }
        }
    }
}

/// The events waiting now (one read takes at most a few kilobytes).
fn drain(inotify: &Inotify) -> Vec<InotifyEvent> {
    let mut all = Vec::new();
    // Bounded, so that a flood of changes cannot keep the watcher here.
    for _ in 0..64 {
        match inotify.read_events() {
            Ok(events) if !events.is_empty() => all.extend(events),
            _ => break,
        }
    }
    all
}
