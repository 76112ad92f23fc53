//! Releasing what a testbed holds: at teardown, for leftovers of dead runs, and for a
//! testbed kept running by `xlb demo --keep`.
//!
//! Everything a testbed creates is named after its id `{pid}-{seq}` (pid of the creating
//! process): namespaces `xlb-{id}-*`, pins `/sys/fs/bpf/xlb-testbed/{id}`, work dir
//! `$TMPDIR/xlb-testbed-{id}` (logs, ready files, and `pids`: every process it started,
//! with start times). A kept testbed leaves a marker `/run/xlb-testbed/kept/{id}` so that
//! leftover cleanup does not take it for debris of a dead run.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{
    netns::{ip_batch, netns_path, NETNS_DIR},
    process::{pid_exists, read_pids_file, stop_foreign},
};

/// Parent of every testbed's pin directories.
pub const PIN_ROOT: &str = "/sys/fs/bpf/xlb-testbed";
const KEPT_DIR: &str = "/run/xlb-testbed/kept";
const WORK_PREFIX: &str = "xlb-testbed-";

pub(crate) fn pin_dir(id: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(id)
}

pub(crate) fn work_dir(id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{WORK_PREFIX}{id}"))
}

pub(crate) fn kept_marker(id: &str) -> PathBuf {
    Path::new(KEPT_DIR).join(id)
}

/// `"{pid}-{seq}"` -> pid.
fn parse_id(s: &str) -> Option<u32> {
    let (pid, seq) = s.split_once('-')?;
    seq.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// `"xlb-{pid}-{seq}-{name}"` -> (`"{pid}-{seq}"`, pid).
fn parse_netns(name: &str) -> Option<(String, u32)> {
    let mut parts = name.strip_prefix("xlb-")?.splitn(3, '-');
    let (pid, seq, rest) = (parts.next()?, parts.next()?, parts.next()?);
    if rest.is_empty() {
        return None;
    }
    let id = format!("{pid}-{seq}");
    Some((id.clone(), parse_id(&id)?))
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes the namespaces that exist (the veths in them go too).
pub(crate) fn delete_namespaces(namespaces: &[String]) -> Result<()> {
    let lines: Vec<String> = namespaces
        .iter()
        .filter(|ns| netns_path(ns).exists())
        .map(|ns| format!("netns del {ns}"))
        .collect();
    ip_batch(None, &lines, true)?;
    let left: Vec<&String> = namespaces
        .iter()
        .filter(|ns| netns_path(ns).exists())
        .collect();
    anyhow::ensure!(left.is_empty(), "namespaces not deleted: {left:?}");
    Ok(())
}

pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Removes what testbeds of processes that no longer exist left behind (a test killed
/// mid-run, a crashed demo): their processes (by recorded pid and start time), namespaces,
/// pin directories and work directories. Kept testbeds are left alone. Best effort:
/// another process may be cleaning the same leftovers concurrently.
pub(crate) fn remove_stale() {
    let me = std::process::id();
    let mut stale: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut consider = |id: String, pid: u32, ns: Option<String>| {
        if pid != me && !pid_exists(pid) && !kept_marker(&id).exists() {
            let e = stale.entry(id).or_default();
            e.extend(ns);
        }
    };
    for name in dir_names(Path::new(NETNS_DIR)) {
        if let Some((id, pid)) = parse_netns(&name) {
            consider(id, pid, Some(name));
        }
    }
    for name in dir_names(Path::new(PIN_ROOT)) {
        if let Some(pid) = parse_id(&name) {
            consider(name, pid, None);
        }
    }
    for name in dir_names(&std::env::temp_dir()) {
        if let Some(id) = name.strip_prefix(WORK_PREFIX) {
            if let Some(pid) = parse_id(id) {
                consider(id.to_string(), pid, None);
            }
        }
    }
    for (id, namespaces) in stale {
        for (pid, start) in read_pids_file(&work_dir(&id).join("pids")) {
            stop_foreign(pid, start);
        }
        let _ = delete_namespaces(&namespaces);
        let _ = remove_dir(&pin_dir(&id));
        let _ = remove_dir(&work_dir(&id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(parse_id("123-4"), Some(123));
        assert_eq!(parse_id("123"), None);
        assert_eq!(parse_id("x-4"), None);
        assert_eq!(
            parse_netns("xlb-123-4-pod-a"),
            Some(("123-4".to_string(), 123))
        );
        assert_eq!(
            parse_netns("xlb-123-4-node1"),
            Some(("123-4".to_string(), 123))
        );
        assert_eq!(parse_netns("xlb-123-4-"), None);
        assert_eq!(parse_netns("xlb-123-4"), None);
        assert_eq!(parse_netns("xlb-demo-node1"), None);
        assert_eq!(parse_netns("other-1-2-x"), None);
    }
}
