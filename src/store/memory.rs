//! A disk in memory with the faults a real one has, behind the same
//! [`Storage`] contract as RocksDB: for tests and simulations of whole
//! nodes, so that they need no files and can be told to lose what was not
//! fsynced, to fail an fsync, or to be full.
//!
//! The model, the same one the protocol relies on from a real disk:
//! - every write lands in the page cache at once (reads see it) and joins
//!   the unsynced writes, in order;
//! - an fsync makes every unsynced write durable (one append-only log, as
//!   RocksDB's WAL: an fsync covers everything written before it);
//! - [`MemoryDisk::crash_process`] ends the open store (its later calls
//!   fail) and keeps the page cache: the OS still has those writes;
//! - [`MemoryDisk::power_loss`] also drops every unsynced write;
//! - [`MemoryDisk::fail_next_fsync`] makes the next fsync fail: the store
//!   turns failed for good, and the writes it covered are in the page cache
//!   but not durable (a failed fsync says nothing of what reached the disk;
//!   a power loss then loses them);
//! - with a capacity ([`MemoryDisk::set_capacity_bytes`]), a write that
//!   would take the records past it fails the store, as a full disk does.
//!
//! - with an fsync latency ([`MemoryDisk::set_fsync_latency`]), a write
//!   asking for durability lands in the page cache at once and completes
//!   only once its fsync has taken that long (in tokio's time, which a
//!   simulation controls): a crash in between finds it unsynced, so the
//!   window between a write and its acknowledgement is there to be hit.
//!
//! `Lazy` submissions are fsynced as `Fsync` ones: completing only after an
//! fsync covers them is the contract, and the group commit that delays them
//! on RocksDB is an optimisation. There is no queue, so no `Busy`.

use super::{Durability, Op, Storage, Written};
use crate::Error;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// A simulated disk; clones share it. It outlives the stores opened on it.
#[derive(Clone, Default)]
pub struct MemoryDisk {
    state: Arc<Mutex<DiskState>>,
}

impl std::fmt::Debug for MemoryDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryDisk")
            .field("records", &state.cache.len())
            .field("unsynced", &state.unsynced.len())
            .field("capacity_bytes", &state.capacity_bytes)
            .finish()
    }
}

#[derive(Default)]
struct DiskState {
    /// What survives a power loss.
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    /// What reads see: `durable` with `unsynced` applied.
    cache: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of keys and values in `cache`, kept as it changes.
    cache_bytes: u64,
    /// Written, not yet fsynced, in the order written.
    unsynced: Vec<Op>,
    capacity_bytes: Option<u64>,
    fail_next_fsync: bool,
    /// How long an fsync takes (zero: it is done when the write returns).
    fsync_latency: std::time::Duration,
    /// Bumped by every crash: a store opened before it is gone.
    incarnation: u64,
    /// Whether a store of this incarnation is open (one at a time, as
    /// RocksDB's lock file allows).
    open: bool,
}

fn record_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl DiskState {
    fn used_bytes(&self) -> u64 {
        self.cache_bytes
    }

    /// What the cache would take after `ops`, without changing it: only the
    /// records they touch are looked at.
    fn bytes_after(&self, ops: &[Op]) -> u64 {
        let mut touched: BTreeMap<&[u8], u64> = BTreeMap::new();
        let mut bytes = self.cache_bytes;
        for op in ops {
            let (key, after) = match op {
                Op::Put(key, value) => (key.as_slice(), record_bytes(key, value)),
                Op::Delete(key) => (key.as_slice(), 0),
            };
            let before = touched
                .get(key)
                .copied()
                .unwrap_or_else(|| self.cache.get(key).map_or(0, |value| record_bytes(key, value)));
            bytes = bytes - before + after;
            touched.insert(key, after);
        }
        bytes
    }

    fn write_cache(&mut self, op: &Op) {
        let before = match op {
            Op::Put(key, value) => self.cache.insert(key.clone(), value.clone()).map(|old| record_bytes(key, &old)),
            Op::Delete(key) => self.cache.remove(key).map(|old| record_bytes(key, &old)),
        };
        let after = match op {
            Op::Put(key, value) => record_bytes(key, value),
            Op::Delete(_) => 0,
        };
        self.cache_bytes = self.cache_bytes - before.unwrap_or(0) + after;
    }
}

fn apply(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, op: &Op) {
    match op {
        Op::Put(key, value) => {
            map.insert(key.clone(), value.clone());
        }
        Op::Delete(key) => {
            map.remove(key);
        }
    }
}

impl MemoryDisk {
    pub fn new() -> MemoryDisk {
        MemoryDisk::default()
    }

    fn state(&self) -> MutexGuard<'_, DiskState> {
        // No code under this lock panics; a poisoned lock still holds a
        // consistent disk.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a store on this disk. Fails if one is open already.
    pub fn open(&self) -> Result<Arc<dyn Storage>, Error> {
        let mut state = self.state();
        if state.open {
            return Err(Error::Fatal("the disk is already open (lock held by another store)".into()));
        }
        state.open = true;
        Ok(Arc::new(MemoryStore {
            disk: self.clone(),
            incarnation: state.incarnation,
            failed: Arc::new(AtomicBool::new(false)),
            closed: AtomicBool::new(false),
        }))
    }

    /// The process holding the store died: its store is gone, the page
    /// cache (unsynced writes included) stays.
    pub fn crash_process(&self) {
        let mut state = self.state();
        state.incarnation += 1;
        state.open = false;
    }

    /// The machine lost power: as a process crash, and every write not yet
    /// fsynced is lost.
    pub fn power_loss(&self) {
        let mut state = self.state();
        state.incarnation += 1;
        state.open = false;
        state.unsynced.clear();
        state.cache = state.durable.clone();
        state.cache_bytes = state.cache.iter().map(|(key, value)| record_bytes(key, value)).sum();
    }

    /// The disk is lost (replaced by an empty one, or its data directory
    /// deleted): as a power loss, and every record is gone.
    pub fn lose_everything(&self) {
        let mut state = self.state();
        state.incarnation += 1;
        state.open = false;
        state.unsynced.clear();
        state.durable.clear();
        state.cache.clear();
        state.cache_bytes = 0;
    }

    /// The next fsync fails (once).
    pub fn fail_next_fsync(&self) {
        self.state().fail_next_fsync = true;
    }

    /// Every later fsync takes `latency` (see the module documentation).
    pub fn set_fsync_latency(&self, latency: std::time::Duration) {
        self.state().fsync_latency = latency;
    }

    /// The disk is healthy again: no limit, and no fsync armed to fail.
    pub fn heal(&self) {
        let mut state = self.state();
        state.capacity_bytes = None;
        state.fail_next_fsync = false;
    }

    /// At most this many bytes of keys and values (`None`: no limit).
    pub fn set_capacity_bytes(&self, capacity: Option<u64>) {
        self.state().capacity_bytes = capacity;
    }

    /// Bytes of keys and values the records take now.
    pub fn used_bytes(&self) -> u64 {
        self.state().used_bytes()
    }

    pub fn free_bytes(&self) -> u64 {
        let state = self.state();
        state.capacity_bytes.map_or(u64::MAX, |capacity| capacity.saturating_sub(state.used_bytes()))
    }

    /// What a power loss now would leave: the durable records, in key order.
    pub fn durable_records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.state().durable.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

struct MemoryStore {
    disk: MemoryDisk,
    incarnation: u64,
    failed: Arc<AtomicBool>,
    closed: AtomicBool,
}

impl MemoryStore {
    /// The disk, if this store is still the open one of its incarnation.
    fn live_disk(&self) -> Result<MutexGuard<'_, DiskState>, Error> {
        let state = self.disk.state();
        if state.incarnation != self.incarnation {
            return Err(Error::Unavailable("the process that held this store crashed".into()));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Unavailable("the store is closed".into()));
        }
        Ok(state)
    }

    fn fail(&self, why: &str) -> Error {
        self.failed.store(true, Ordering::Release);
        Error::Fatal(why.to_string())
    }

    /// Writes `ops` to the page cache; returns whether an fsync must follow.
    fn write(&self, ops: Vec<Op>, durability: Durability) -> Result<bool, Error> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Fatal("the store failed earlier; this node no longer acknowledges writes".into()));
        }
        let mut state = self.live_disk()?;
        if state.capacity_bytes.is_some_and(|capacity| state.bytes_after(&ops) > capacity) {
            return Err(self.fail("IO error: No space left on device (a disk in memory)"));
        }
        for op in ops {
            state.write_cache(&op);
            state.unsynced.push(op);
        }
        Ok(!matches!(durability, Durability::Buffered | Durability::Deferred))
    }
}

/// Makes every unsynced write of `disk` durable, as the store of
/// `incarnation` (whose failure flag is `failed`); `None` if that process
/// crashed meanwhile (nobody is left to hear the answer).
fn fsync(disk: &MemoryDisk, incarnation: u64, failed: &AtomicBool) -> Option<Result<(), Error>> {
    let mut state = disk.state();
    if state.incarnation != incarnation {
        return None;
    }
    if failed.load(Ordering::Acquire) {
        return Some(Err(Error::Fatal("the store failed earlier; this node no longer acknowledges writes".into())));
    }
    if std::mem::take(&mut state.fail_next_fsync) {
        failed.store(true, Ordering::Release);
        return Some(Err(Error::Fatal("IO error: fsync failed (a disk in memory)".into())));
    }
    let unsynced = std::mem::take(&mut state.unsynced);
    unsynced.iter().for_each(|op| apply(&mut state.durable, op));
    Some(Ok(()))
}

impl Storage for MemoryStore {
    fn submit(&self, ops: Vec<Op>, durability: Durability) -> Result<Written, Error> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Fatal("the store failed earlier; this node no longer acknowledges writes".into()));
        }
        let (done, written) = oneshot::channel();
        match self.write(ops, durability) {
            Err(error) => {
                let _ = done.send(Err(error));
            }
            Ok(false) => {
                let _ = done.send(Ok(()));
            }
            Ok(true) => {
                let latency = self.disk.state().fsync_latency;
                let runtime = tokio::runtime::Handle::try_current();
                match runtime {
                    Ok(runtime) if !latency.is_zero() => {
                        let (disk, incarnation, failed) = (self.disk.clone(), self.incarnation, self.failed.clone());
                        runtime.spawn(async move {
                            tokio::time::sleep(latency).await;
                            if let Some(result) = fsync(&disk, incarnation, &failed) {
                                let _ = done.send(result);
                            }
                        });
                    }
                    _ => {
                        if let Some(result) = fsync(&self.disk, self.incarnation, &self.failed) {
                            let _ = done.send(result);
                        }
                    }
                }
            }
        }
        Ok(written)
    }

    fn check_room(&self, _ops_count: usize) -> Result<(), Error> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Fatal("the store failed earlier; this node no longer acknowledges writes".into()));
        }
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.live_disk()?.cache.get(key).cloned())
    }

    fn scan_prefix_first(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        let state = self.live_disk()?;
        Ok(state
            .cache
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = self.disk.state();
        if state.incarnation == self.incarnation {
            state.open = false;
        }
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: u8) -> Op {
        Op::Put(key.as_bytes().to_vec(), vec![value])
    }

    async fn submit(store: &Arc<dyn Storage>, ops: Vec<Op>, durability: Durability) -> Result<(), Error> {
        store.submit(ops, durability)?.await.unwrap()
    }

    #[tokio::test]
    async fn a_process_crash_keeps_unsynced_writes_and_a_power_loss_drops_them() {
        let disk = MemoryDisk::new();
        let store = disk.open().unwrap();
        submit(&store, vec![put("synced", 1)], Durability::Fsync).await.unwrap();
        submit(&store, vec![put("buffered", 2)], Durability::Buffered).await.unwrap();
        assert!(disk.open().is_err(), "one store at a time");

        disk.crash_process();
        assert!(store.get(b"synced").is_err(), "the crashed process's store is gone");
        let store = disk.open().unwrap();
        assert_eq!(store.get(b"buffered").unwrap(), Some(vec![2]), "the OS kept it");

        disk.power_loss();
        let store = disk.open().unwrap();
        assert_eq!(store.get(b"synced").unwrap(), Some(vec![1]));
        assert_eq!(store.get(b"buffered").unwrap(), None, "never fsynced: lost");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_fsync_completes_only_after_its_latency_and_a_power_loss_before_it_loses_the_write() {
        let disk = MemoryDisk::new();
        disk.set_fsync_latency(std::time::Duration::from_millis(5));
        let store = disk.open().unwrap();
        let began = tokio::time::Instant::now();
        submit(&store, vec![put("first", 1)], Durability::Fsync).await.unwrap();
        assert!(began.elapsed() >= std::time::Duration::from_millis(5), "completed before its fsync took its time");
        assert_eq!(disk.durable_records().len(), 1);

        let mut pending = store.submit(vec![put("second", 2)], Durability::Lazy).unwrap();
        assert_eq!(store.get(b"second").unwrap(), Some(vec![2]), "readable at once from the page cache");
        assert!(pending.try_recv().is_err(), "not complete before the fsync");
        disk.power_loss();
        assert!(pending.await.is_err(), "the crashed process never hears back");
        assert_eq!(disk.open().unwrap().get(b"second").unwrap(), None, "never fsynced: lost");
    }

    #[tokio::test]
    async fn a_failed_fsync_fails_the_store_for_good_and_its_writes_are_not_durable() {
        let disk = MemoryDisk::new();
        let store = disk.open().unwrap();
        disk.fail_next_fsync();
        assert!(matches!(submit(&store, vec![put("k", 1)], Durability::Fsync).await, Err(Error::Fatal(_))));
        assert!(store.has_failed());
        assert!(matches!(store.check_room(1), Err(Error::Fatal(_))));
        assert!(store.submit(vec![put("k", 2)], Durability::Fsync).is_err(), "no write after a failure");
        assert!(disk.durable_records().is_empty(), "the failed fsync made nothing durable");
        store.close();
        disk.power_loss();
        assert_eq!(disk.open().unwrap().get(b"k").unwrap(), None);
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_write_that_does_not_fit_and_frees_room_on_deletes() {
        let disk = MemoryDisk::new();
        disk.set_capacity_bytes(Some(10));
        let store = disk.open().unwrap();
        submit(&store, vec![Op::Put(b"k".to_vec(), vec![0; 8])], Durability::Fsync).await.unwrap();
        assert_eq!(disk.free_bytes(), 1);
        let full = submit(&store, vec![Op::Put(b"l".to_vec(), vec![0; 8])], Durability::Fsync).await;
        assert!(matches!(full, Err(Error::Fatal(message)) if message.contains("No space")));
        assert!(store.has_failed());
        store.close();
        // A new store on the same disk: deleting makes room.
        let store = disk.open().unwrap();
        submit(&store, vec![Op::Delete(b"k".to_vec())], Durability::Fsync).await.unwrap();
        assert_eq!(disk.free_bytes(), 10);
    }
}
