//! `BPF_MAP_UPDATE_BATCH` (Linux 5.6+): many hash-map entries written in one bpf(2) call.
//! aya 0.14 has no batch API, so this is the raw syscall on the map's fd. The kernel
//! writes the entries in order, one `bpf_map_update_value` each, exactly as that many
//! `BPF_MAP_UPDATE_ELEM` calls would, and stops at the first failure: an entry is
//! visible to readers no earlier than the entries before it, which the writer's
//! ordering relies on. What a batch saves is the per-entry syscall, fd lookup and
//! key/value allocation.
use std::os::fd::{AsFd, AsRawFd};

use aya::{maps::MapData, Pod};

/// `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries per bpf(2) call: bounds the time one call holds the thread (the kernel
/// reschedules between entries anyway) without costing syscalls that matter.
const ENTRIES_PER_CALL: usize = 16_384;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h), all `__aligned_u64`
/// pointers as u64.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries to write. Out: entries written.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

// The kernel checks the size we pass against its own layout (bytes past its end must be
// zero; ours has none past `flags`).
const _: () = assert!(std::mem::size_of::<BatchAttr>() == 56);

/// A batch that stopped partway.
#[derive(Debug, thiserror::Error)]
#[error("writing map {map}: batch update stopped after {written} of {total} entries: {source}")]
pub struct BatchError {
    pub map: &'static str,
    /// Entries written (the first `written` of the slice), in order.
    pub written: usize,
    pub total: usize,
    #[source]
    pub source: std::io::Error,
}

/// Writes `keys[i] -> values[i]` for every i, in order, with `BPF_ANY` semantics (insert
/// or replace). On failure, the first `written` entries are in the map and the rest are
/// not. `map` names the map in the error.
pub fn update<K: Pod, V: Pod>(
    map: &MapData,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let fd = map.fd().as_fd().as_raw_fd();

    let mut written = 0;
    while written < keys.len() {
        let end = keys.len().min(written + ENTRIES_PER_CALL);
        let (k, v) = (&keys[written..end], &values[written..end]);
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is the kernel's batch layout; `keys` and `values` point at
        // `count` Pod keys and values of the map's sizes (aya checked them when it typed
        // the map), and outlive the call. The kernel writes back only `count`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        if ret < 0 {
            let source = std::io::Error::last_os_error();
            return Err(BatchError {
                map: name,
                // The kernel reports how far it got, also on failure.
                written: written + (attr.count as usize).min(k.len()),
                total: keys.len(),
                source,
            });
        }
        written = end;
    }
    Ok(())
}
