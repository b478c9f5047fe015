//! The broker's process tree, read from `/proc`.
//!
//! The broker is a child subreaper, so every process that a service's start led to (its
//! children, a daemon that double-forked and called `setsid`, orphans re-parented to the
//! broker) is a descendant of the broker's own pid. One scan reads every `/proc/PID/stat` once
//! into a parent map and walks it from the broker down; a process that forks during the scan
//! may be missed, so callers that must catch everything scan again until a scan finds nothing.

use std::collections::{HashMap, HashSet};
use std::io;

/// One process under the broker, as one scan saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descendant {
    pub pid: u32,
    pub parent: u32,
    /// The state letter of `/proc/PID/stat`: `R`, `S`, `D`, `T` (stopped), `Z` (zombie) ...
    pub state: char,
}

impl Descendant {
    /// A zombie has ended: it only waits to be reaped, and no signal reaches it.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// Stopped by a signal (`T`) or by a tracer (`t`): it cannot fork until it continues.
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// Every process below the broker (zombies included), parents before their children.
pub fn descendants() -> io::Result<Vec<Descendant>> {
    descendants_of(std::process::id())
}

/// Every process below `root` (zombies included), parents before their children. A keeper
/// walks from its own pid: as a subreaper, everything its service started stays below it.
pub fn descendants_of(root: u32) -> io::Result<Vec<Descendant>> {
    Ok(walk(&scan()?, root))
}

/// The parent and state of `pid` from `/proc/<pid>/stat`; `None` once it is gone.
pub fn stat_of(pid: u32) -> Option<(u32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// One pass over `/proc`: each process's parent and state. A process that vanishes between
/// the listing and the read is skipped.
fn scan() -> io::Result<HashMap<u32, (u32, char)>> {
    let mut table = HashMap::new();
    let entries = std::fs::read_dir("/proc")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot list /proc: {e}")))?;
    for entry in entries {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = stat_of(pid) {
            table.insert(pid, stat);
        }
    }
    Ok(table)
}

/// The processes below `root` in `table` (pid → (parent, state)), breadth first.
fn walk(table: &HashMap<u32, (u32, char)>, root: u32) -> Vec<Descendant> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &(parent, _)) in table {
        children.entry(parent).or_default().push(pid);
    }
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut next = vec![root];
    while let Some(parent) = next.pop() {
        for &pid in children.get(&parent).into_iter().flatten() {
            // pid 0's "children" (1 and 2) are never below the broker; a cycle cannot occur,
            // but the guard keeps a corrupt table from looping.
            if pid == root || pid == 0 || !seen.insert(pid) {
                continue;
            }
            let state = table.get(&pid).map_or('X', |&(_, state)| state);
            found.push(Descendant { pid, parent, state });
            next.push(pid);
        }
    }
    found
}

/// `"pid (comm) state ppid ..."` → (ppid, state). The command name may hold spaces and
/// parentheses, so the fields are read after its last `)`. A process being torn down (`X`) is
/// not reported.
fn parse_stat(text: &str) -> Option<(u32, char)> {
    let after_comm = text.get(text.rfind(')')? + 1..)?;
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    (state != 'X').then_some((parent, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(parse_stat("42 (sh) S 7 42 42 0"), Some((7, 'S')));
        assert_eq!(parse_stat("42 (a) b (c) Z 1 0 0"), Some((1, 'Z')));
        assert_eq!(parse_stat("42 (x) X 1 0 0"), None);
        assert_eq!(parse_stat("42 (truncated"), None);
        assert_eq!(parse_stat("42 (x) R notanumber"), None);
    }

    #[test]
    fn the_walk_finds_every_generation_and_nothing_else() {
        // 10 is the root; 11 and 12 its children, 13 a grandchild, 14 a great-grandchild;
        // 20 and 21 belong to someone else.
        let table = HashMap::from([
            (10, (1, 'S')),
            (11, (10, 'S')),
            (12, (10, 'Z')),
            (13, (11, 'T')),
            (14, (13, 'R')),
            (20, (1, 'S')),
            (21, (20, 'S')),
        ]);
        let mut found = walk(&table, 10);
        found.sort_by_key(|d| d.pid);
        let pids: Vec<u32> = found.iter().map(|d| d.pid).collect();
        assert_eq!(pids, [11, 12, 13, 14]);
        let alive: Vec<u32> = found
            .iter()
            .filter(|d| d.is_alive())
            .map(|d| d.pid)
            .collect();
        assert_eq!(alive, [11, 13, 14]);
        assert!(found[2].is_stopped());
        assert_eq!(found[3].parent, 13);
    }

    #[test]
    fn a_real_child_is_found_below_this_process() {
        // `sleep` is the test process's own child until it is killed below.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let found = descendants().expect("scan /proc");
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found
                .iter()
                .any(|d| d.pid == child.id() && d.parent == std::process::id()),
            "{found:?}"
        );
    }
}
