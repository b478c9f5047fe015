//! Watching the activation directories, so that a file added, changed or removed is picked up
//! without a reload request.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use crate::bus::activation::CoreEvent;

/// Changes that come together (an editor's save, a package install) make one reload.
const SETTLE: Duration = Duration::from_millis(100);

/// Asks for a reload whenever something changes in one of `dirs`. Directories that do not exist
/// yet are not watched.
pub async fn watch_dirs(dirs: Vec<PathBuf>, events: UnboundedSender<CoreEvent>) {
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(inotify) => inotify,
        Err(e) => {
            warn!(
                "cannot watch activation directories (inotify: {e}); reload with SIGHUP or ReloadConfig"
            );
            return;
        }
    };
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF;
    for dir in dirs.iter().filter(|d| d.is_dir()) {
        if let Err(e) = inotify.add_watch(dir.as_path(), flags) {
            debug!("cannot watch {}: {e}", dir.display());
        }
    }
    // SAFETY: the `AsyncFd` holds a `BorrowedFd` of `inotify`, which outlives it in this function.
    let fd = match unsafe { AsyncFd::register_with_interest(inotify.as_fd(), Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll inotify: {e}");
            return;
        }
    };
    loop {
        if !wait_for_change(&fd, &inotify).await {
            return;
        }
        tokio::time::sleep(SETTLE).await;
        // What came in while settling belongs to the same change.
        let _ = inotify.read_events();
        if events
            .send(CoreEvent::Reload("an activation directory changed"))
            .is_err()
        {
            return;
        }
    }
}

/// Waits until inotify reports something. Returns false if it cannot be read any more.
async fn wait_for_change(fd: &AsyncFd<BorrowedFd<'_>>, inotify: &Inotify) -> bool {
    loop {
        let mut guard = match fd.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                warn!("inotify failed: {e}");
                return false;
            }
        };
        match inotify.read_events() {
            Ok(events) if !events.is_empty() => return true,
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(e) => {
                warn!("cannot read inotify events: {e}");
                return false;
            }
        }
    }
}
