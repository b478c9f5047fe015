//! Rate limits for log lines that a peer can trigger over and over: refused connections, failed
//! handshakes, invalid messages, policy refusals. Without them, a client that repeats the same
//! mistake (or does so on purpose) fills the log: a flood of 5,000 refused connections wrote
//! 4,937 lines.
//!
//! Each kind of line has its own budget: [`BURST`] lines per window, then nothing but a count;
//! when the window ends, one summary line says how many lines of that kind were dropped. A
//! window that had to drop lines makes the next one twice as long (up to [`MAX_WINDOW`]), so a
//! sustained flood costs a few lines per several minutes; a quiet window brings it back to
//! [`WINDOW`].
//!
//! Only `info` and above are limited: `debug` and `trace` are detail the operator asked for.
//!
//! Windows are measured on tokio's clock, the one every timeout of the bus reads, so that a
//! test that pauses it sees windows end in its virtual time too.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tracing::Level;

/// Lines of one kind logged per window before the rest are only counted.
pub const BURST: u32 = 5;
/// The first window; the summary of dropped lines comes at its end.
pub const WINDOW: Duration = Duration::from_secs(5);
/// The longest window a sustained flood stretches it to.
pub const MAX_WINDOW: Duration = Duration::from_secs(300);

/// Connections closed before the handshake: a uid the bus would never let in, credentials that
/// cannot be read, a policy that refuses the authenticated user.
pub static REFUSED_CONNECTION: LogLimit = LogLimit::new("refused connections", Level::WARN);
/// Connections closed because too many others of their uid had not finished joining
/// (`max_incomplete_connections`), or because they did not within `auth_timeout`.
pub static INCOMPLETE_CLOSED: LogLimit =
    LogLimit::new("incomplete connections closed", Level::INFO);
/// Clients disconnected for breaking the protocol: an invalid message, a first message that is
/// not `Hello`, a monitor that sends.
pub static PROTOCOL_VIOLATION: LogLimit = LogLimit::new("protocol violations", Level::WARN);
/// Messages the policy refuses.
pub static POLICY_REFUSAL: LogLimit = LogLimit::new("policy refusals", Level::INFO);
/// Messages the policy refuses under a rule with `log="true"`.
pub static POLICY_REFUSAL_LOGGED: LogLimit =
    LogLimit::new("policy refusals of log=\"true\" rules", Level::WARN);
/// `Hello` refused by `max_completed_connections` or `max_connections_per_user`.
pub static HELLO_REFUSED: LogLimit = LogLimit::new("refused Hello calls", Level::WARN);
/// Receivers whose outgoing queue is full: calls to them refused, or they are disconnected.
pub static OUTGOING_FULL: LogLimit = LogLimit::new("full outgoing queues", Level::WARN);
/// Service starts refused: the service failed too often recently, or too many starts pend.
pub static START_REFUSED: LogLimit = LogLimit::new("refused service starts", Level::WARN);
/// Connections that become monitors.
pub static NEW_MONITOR: LogLimit = LogLimit::new("new monitors", Level::INFO);
/// `accept` failing, most likely because the bus is out of file descriptors.
pub static ACCEPT_FAILED: LogLimit = LogLimit::new("failed accepts", Level::WARN);

/// The budget of one kind of log line. Lives in a `static`; the bus runs on one thread, so the
/// lock is never contended.
pub struct LogLimit {
    kind: &'static str,
    level: Level,
    state: Mutex<State>,
}

struct State {
    /// When the current window began; none before the first line.
    start: Option<Instant>,
    window: Duration,
    logged: u32,
    dropped: u64,
    /// A timer will write the summary when the window ends.
    summary_scheduled: bool,
}

impl LogLimit {
    pub const fn new(kind: &'static str, level: Level) -> LogLimit {
        LogLimit {
            kind,
            level,
            state: Mutex::new(State {
                start: None,
                window: WINDOW,
                logged: 0,
                dropped: 0,
                summary_scheduled: false,
            }),
        }
    }

    /// Whether a line of this kind may be logged now. A `false` is counted, and the count is
    /// logged when the window ends: by a timer where a tokio runtime runs, or else at the next
    /// line of this kind.
    pub fn allow(&'static self) -> bool {
        let now = Instant::now();
        let Ok(mut state) = self.state.lock() else {
            return true;
        };
        self.close_window_if_over(&mut state, now);
        if state.start.is_none() {
            state.start = Some(now);
        }
        if state.logged < BURST {
            state.logged += 1;
            return true;
        }
        state.dropped += 1;
        if !state.summary_scheduled
            && let Some(end) = state.start.map(|start| start + state.window)
        {
            state.summary_scheduled = self.schedule_summary(end);
        }
        false
    }

    /// Ends the window if its time is over: the summary of what it dropped, and the length of
    /// the next one.
    fn close_window_if_over(&self, state: &mut State, now: Instant) {
        let Some(start) = state.start else {
            return;
        };
        if now < start + state.window {
            return;
        }
        if state.dropped > 0 {
            self.summarize(state.dropped, state.window);
            state.window = (state.window * 2).min(MAX_WINDOW);
        } else {
            state.window = WINDOW;
        }
        state.start = None;
        state.logged = 0;
        state.dropped = 0;
    }

    /// Has a timer write the summary at `end`, even if no line of this kind comes again.
    fn schedule_summary(&'static self, end: Instant) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        runtime.spawn(async move {
            tokio::time::sleep_until(end).await;
            if let Ok(mut state) = self.state.lock() {
                state.summary_scheduled = false;
                self.close_window_if_over(&mut state, Instant::now());
            }
        });
        true
    }

    fn summarize(&self, dropped: u64, window: Duration) {
        let kind = self.kind;
        let secs = window.as_secs();
        macro_rules! summary {
            ($log:ident) => {
                tracing::$log!(
                    kind,
                    dropped,
                    "{dropped} more log lines of {kind} were dropped in {secs} s (at most \
                     {BURST} per window are written)"
                )
            };
        }
        match self.level {
            Level::ERROR => summary!(error),
            Level::WARN => summary!(warn),
            Level::INFO => summary!(info),
            Level::DEBUG => summary!(debug),
            _ => summary!(trace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_lines_are_counted() {
        static LIMIT: LogLimit = LogLimit::new("test lines", Level::INFO);
        let allowed = (0..100).filter(|_| LIMIT.allow()).count();
        assert_eq!(allowed, BURST as usize);
        let state = LIMIT.state.lock().unwrap();
        assert_eq!(state.dropped, 100 - u64::from(BURST));
    }

    #[test]
    fn a_window_that_dropped_lines_doubles_the_next_and_a_quiet_one_resets_it() {
        static LIMIT: LogLimit = LogLimit::new("test lines", Level::INFO);
        let t0 = Instant::now();
        let mut state = LIMIT.state.lock().unwrap();
        state.start = Some(t0);
        state.dropped = 3;
        LIMIT.close_window_if_over(&mut state, t0 + WINDOW);
        assert_eq!(
            (state.window, state.dropped, state.start),
            (WINDOW * 2, 0, None)
        );
        state.start = Some(t0);
        LIMIT.close_window_if_over(&mut state, t0 + WINDOW * 2);
        assert_eq!(
            state.window, WINDOW,
            "a window without drops resets the length"
        );
        state.start = Some(t0);
        state.window = MAX_WINDOW;
        state.dropped = 1;
        LIMIT.close_window_if_over(&mut state, t0 + MAX_WINDOW);
        assert_eq!(state.window, MAX_WINDOW, "never longer than MAX_WINDOW");
    }

    /// The summary timer and the window read the same clock: with tokio's clock paused, the
    /// window that dropped lines ends (and the next is twice as long) once `WINDOW` has passed
    /// in virtual time, and not a moment before.
    #[tokio::test(start_paused = true)]
    async fn the_summary_comes_when_the_window_ends_in_paused_time() {
        static LIMIT: LogLimit = LogLimit::new("test lines", Level::INFO);
        let wall = std::time::Instant::now();
        let dropped = (0..BURST + 3).filter(|_| !LIMIT.allow()).count();
        assert_eq!(dropped, 3);
        let open = |limit: &LogLimit| {
            let state = limit.state.lock().unwrap();
            (state.summary_scheduled, state.dropped, state.window)
        };
        assert_eq!(open(&LIMIT), (true, 3, WINDOW));
        tokio::time::sleep(WINDOW - Duration::from_millis(1)).await;
        assert_eq!(open(&LIMIT), (true, 3, WINDOW), "the window ended early");
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The summary task, woken at the same instant, runs before this one goes on.
        tokio::task::yield_now().await;
        assert_eq!(open(&LIMIT), (false, 0, WINDOW * 2));
        assert!(wall.elapsed() < WINDOW / 2, "waited {:?}", wall.elapsed());
    }
}
