//! The durable store of a node: the [`Storage`] seam every node writes
//! through, its RocksDB implementation [`Store`] (on disk, behind one writer
//! thread that commits in groups), and its in-memory twin
//! [`memory::MemoryDisk`] for tests and simulations (which can lose unsynced
//! writes, fail an fsync, and run out of space). [`Disk`] says which one a
//! node opens.
//!
//! Contract, the same for every implementation: a submission completes (the
//! future of [`Storage::write`], the receiver of [`Storage::submit`])
//! according to its [`Durability`]:
//! - [`Durability::Fsync`]: after its ops are in RocksDB's WAL and the WAL
//!   is fsynced;
//! - [`Durability::Lazy`]: also only after an fsync covers its ops, but it
//!   does not ask for one of its own: it rides on the next `Fsync` group, and
//!   if none comes within [`LAZY_LINGER_US`], the writer fsyncs for it;
//! - [`Durability::Buffered`]: once its ops are written to the WAL (they
//!   survive a crash of the process, not of the machine).
//!
//! Writes are applied in the order they were submitted, so a caller that
//! mutates its memory and submits under one lock keeps memory and disk in
//! the same order. Because the WAL is one append-only log, an fsync makes
//! every earlier write durable too; that is what lets lazy submissions ride
//! on later ones.
//!
//! Group commit: while one group is being written, later submissions queue;
//! the writer takes everything queued (up to [`GROUP_OPS_MAX`] operations)
//! into one `WriteBatch` and at most one fsync, then completes every
//! submission the write made durable. Nothing is completed before its
//! durability holds. If a write or fsync fails, the store turns failed: the
//! waiting submissions and every later one get [`Error::Fatal`], and the
//! node stops acknowledging. A failed fsync is never retried and assumed to
//! have worked.
//!
//! The queue is bounded ([`QUEUE_OPS_MAX`] operations): past it a submission
//! gets [`Error::Busy`] and changes nothing.
//!
//! What survives what: a write that completed with `Fsync` or `Lazy`
//! survives a crash of the process and a power loss; one that completed
//! with `Buffered` survives a crash of the process only (the OS has it).
//! An error from a write or an fsync says nothing of what reached the disk:
//! the store is then failed for good, and the node must reopen it and read
//! back what is there (the participant does, see its `node.rs`).

use crate::Error;
use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most operations merged into one group (one WriteBatch, one fsync).
pub const GROUP_OPS_MAX: usize = 16_384;
/// Most operations waiting for the writer.
pub const QUEUE_OPS_MAX: usize = 262_144;
/// Longest a [`Durability::Lazy`] submission waits for another group's
/// fsync before the writer fsyncs for it.
pub const LAZY_LINGER_US: u64 = 1_000;

/// When a submission completes; see the module documentation. Ordered
/// from the weakest to the strongest, so that `max` is what a submission
/// merging several must ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Durability {
    Buffered,
    Lazy,
    Fsync,
}

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

type Completion = oneshot::Sender<Result<(), Error>>;

/// Resolves once a submission's durability holds, with the write's result.
pub type Written = oneshot::Receiver<Result<(), Error>>;

/// Where a node keeps its records, whatever keeps them. See the module
/// documentation for the durability contract every implementation keeps.
pub trait Storage: Send + Sync + 'static {
    /// Queues `ops`; the receiver yields once `durability` holds for them.
    /// Fails at once if the store has failed or its queue is full; then
    /// nothing was queued. Writes apply in the order they were submitted.
    fn submit(&self, ops: Vec<Op>, durability: Durability) -> Result<Written, Error>;
    /// Fails with [`Error::Busy`] unless `ops_count` more operations fit in
    /// the queue (and with [`Error::Fatal`] once the store failed).
    fn check_room(&self, ops_count: usize) -> Result<(), Error>;
    /// Point read of what is written (durable or about to be).
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;
    /// The first `limit` keys and values whose key starts with `prefix`, in
    /// key order.
    fn scan_prefix_first(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error>;
    /// Whether a write or fsync has failed; then the node must not acknowledge.
    fn has_failed(&self) -> bool;
    /// What failed, for an operator (health, logs); `None` while the store
    /// has not failed.
    fn failure(&self) -> Option<String> {
        self.has_failed().then(|| "a write or fsync failed".to_string())
    }
    /// Stops taking writes, completes those already queued, and releases
    /// the store (it can be opened again afterwards).
    fn close(&self);
}

impl dyn Storage {
    /// Submits `ops` and waits until they are fsynced.
    pub async fn write(&self, ops: Vec<Op>) -> Result<(), Error> {
        let written = self.submit(ops, Durability::Fsync)?;
        written.await.unwrap_or_else(|_| Err(Error::Fatal("the writer stopped".into())))
    }

    /// Makes every write submitted before it durable without writing anything.
    pub async fn sync(&self) -> Result<(), Error> {
        self.write(Vec::new()).await
    }

    /// Every key and value whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        self.scan_prefix_first(prefix, usize::MAX)
    }
}

/// Which storage a node opens: RocksDB in a directory (the binaries), or a
/// simulated disk in memory (tests and simulations), which outlives the
/// node so that a restarted node finds what reached it.
#[derive(Clone, Debug)]
pub enum Disk {
    Path(PathBuf),
    Memory(memory::MemoryDisk),
}

impl Disk {
    pub fn open(&self) -> Result<std::sync::Arc<dyn Storage>, Error> {
        match self {
            Disk::Path(path) => Ok(std::sync::Arc::new(Store::open(path)?)),
            Disk::Memory(disk) => disk.open(),
        }
    }

    /// Bytes free for this node's records.
    pub fn free_bytes(&self) -> Result<u64, Error> {
        match self {
            Disk::Path(path) => Store::free_bytes(path),
            Disk::Memory(disk) => Ok(disk.free_bytes()),
        }
    }
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disk::Path(path) => write!(f, "{}", path.display()),
            Disk::Memory(_) => write!(f, "a disk in memory"),
        }
    }
}

pub mod memory;

struct Pending {
    ops: Vec<Op>,
    durability: Durability,
    done: Completion,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    ops_queued: usize,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake_writer: Condvar,
    failed: AtomicBool,
    /// The error that failed the store (set before `failed`).
    failure: Mutex<Option<String>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A RocksDB database with a group-committing writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    shared: Arc<Shared>,
}

impl Storage for Store {
    fn submit(&self, ops: Vec<Op>, durability: Durability) -> Result<Written, Error> {
        Store::submit(self, ops, durability)
    }

    fn check_room(&self, ops_count: usize) -> Result<(), Error> {
        Store::check_room(self, ops_count)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Store::get(self, key)
    }

    fn scan_prefix_first(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        Store::scan_prefix_first(self, prefix, limit)
    }

    fn has_failed(&self) -> bool {
        Store::has_failed(self)
    }

    fn failure(&self) -> Option<String> {
        Store::failure(self)
    }

    fn close(&self) {
        Store::close(self)
    }
}

impl Store {
    /// Opens (or creates) the database at `path` and starts the writer.
    pub fn open(path: &Path) -> Result<Store, Error> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Fatal(format!("cannot create the data directory {}: {e}", path.display())))?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_max_background_jobs(2);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Point reads that find nothing are the common case (a coordinator
        // looks up every request's idempotency key, and most are new):
        // bloom filters answer them without searching the memtable's skip
        // list or reading an SST file's blocks. 10 bits a key: about 1%
        // false positives, which then read as before.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        options.set_block_based_table_factory(&table);
        options.set_memtable_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.05);
        let db = DB::open(&options, path)
            .map_err(|e| Error::Fatal(format!("cannot open RocksDB at {}: {e}", path.display())))?;
        let store = Store {
            db: Arc::new(db),
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                wake_writer: Condvar::new(),
                failed: AtomicBool::new(false),
                failure: Mutex::new(None),
                writer: Mutex::new(None),
            }),
        };
        let writer = store.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run_writer())
            .map_err(|e| Error::Fatal(format!("cannot start the writer thread: {e}")))?;
        *store.shared.writer.lock().expect("writer handle lock poisoned") = Some(handle);
        Ok(store)
    }

    /// Queues `ops` for the writer. The receiver yields once `durability`
    /// holds for them. Fails at once if the store has failed or the queue is
    /// full; then nothing was queued.
    pub fn submit(&self, ops: Vec<Op>, durability: Durability) -> Result<oneshot::Receiver<Result<(), Error>>, Error> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(Error::Fatal("the store failed earlier; this node no longer acknowledges writes".into()));
        }
        let (done, receiver) = oneshot::channel();
        let mut queue = self.shared.queue.lock().expect("store queue lock poisoned");
        if queue.closed {
            return Err(Error::Unavailable("the node is shutting down".into()));
        }
        if queue.ops_queued + ops.len() > QUEUE_OPS_MAX {
            return Err(Error::Busy(format!("the write queue is full ({QUEUE_OPS_MAX} operations)")));
        }
        queue.ops_queued += ops.len();
        queue.pending.push(Pending { ops, durability, done });
        drop(queue);
        self.shared.wake_writer.notify_one();
        Ok(receiver)
    }

    /// Fails with [`Error::Busy`] unless `ops_count` more operations fit in
    /// the queue. A caller that serialises all its submissions under one lock
    /// calls this before changing its memory, so a later `submit` cannot be
    /// refused for room.
    pub fn check_room(&self, ops_count: usize) -> Result<(), Error> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(Error::Fatal("the store failed earlier; this node no longer acknowledges writes".into()));
        }
        let queue = self.shared.queue.lock().expect("store queue lock poisoned");
        if queue.ops_queued + ops_count > QUEUE_OPS_MAX {
            return Err(Error::Busy(format!("the write queue is full ({QUEUE_OPS_MAX} operations)")));
        }
        Ok(())
    }

    /// Submits `ops` and waits until they are fsynced.
    pub async fn write(&self, ops: Vec<Op>) -> Result<(), Error> {
        let receiver = self.submit(ops, Durability::Fsync)?;
        receiver.await.unwrap_or_else(|_| Err(Error::Fatal("the writer thread stopped".into())))
    }

    /// Makes every write submitted before it durable (one fsync of the WAL)
    /// without writing anything.
    pub async fn sync(&self) -> Result<(), Error> {
        self.write(Vec::new()).await
    }

    /// Point read of what is written (durable or about to be).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.db.get(key)?)
    }

    /// Every key and value whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        self.scan_prefix_first(prefix, usize::MAX)
    }

    /// The first `limit` keys and values whose key starts with `prefix`.
    pub fn scan_prefix_first(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        let mut out = Vec::new();
        // The raw iterator lends each key and value: one copy each, where
        // the boxed iterator allocates them and the copy follows.
        let mut iter = self.db.raw_iterator();
        iter.seek(prefix);
        while out.len() < limit {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
            iter.next();
        }
        iter.status()?;
        Ok(out)
    }

    /// Bytes free for an unprivileged writer on the filesystem that holds
    /// `path` (statvfs).
    pub fn free_bytes(path: &Path) -> Result<u64, Error> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidInput(format!("{} holds a NUL byte", path.display())))?;
        // SAFETY: `stat` is plain old data that statvfs fills; `c_path` is a
        // NUL-terminated string that outlives the call.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(Error::Unavailable(format!("cannot read the free space of {}: {error}", path.display())));
        }
        Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
    }

    /// Whether a write or fsync has failed; then the node must not acknowledge.
    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// The error that failed the store, if it failed.
    pub fn failure(&self) -> Option<String> {
        if !self.has_failed() {
            return None;
        }
        self.shared.failure.lock().expect("failure lock poisoned").clone()
    }

    /// Stops taking writes, writes those already queued, and waits for the
    /// writer thread to finish.
    pub fn close(&self) {
        self.shared.queue.lock().expect("store queue lock poisoned").closed = true;
        self.shared.wake_writer.notify_one();
        let handle = self.shared.writer.lock().expect("writer handle lock poisoned").take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    fn run_writer(self) {
        let mut write_options = WriteOptions::default();
        let mut group: Vec<Pending> = Vec::new();
        // Lazy submissions written but not yet covered by an fsync, and when
        // the writer must fsync for them at the latest.
        let mut parked: Vec<Completion> = Vec::new();
        let mut parked_deadline: Option<Instant> = None;
        loop {
            let closing;
            {
                let mut queue = self.shared.queue.lock().expect("store queue lock poisoned");
                loop {
                    if !queue.pending.is_empty() || (queue.closed && !parked.is_empty()) {
                        break;
                    }
                    if queue.closed {
                        return;
                    }
                    match parked_deadline {
                        None => queue = self.shared.wake_writer.wait(queue).expect("store queue lock poisoned"),
                        Some(deadline) => {
                            let now = Instant::now();
                            if now >= deadline {
                                break;
                            }
                            queue = self
                                .shared
                                .wake_writer
                                .wait_timeout(queue, deadline - now)
                                .expect("store queue lock poisoned")
                                .0;
                        }
                    }
                }
                closing = queue.closed;
                // Take the oldest submissions up to GROUP_OPS_MAX operations
                // (at least one, however large), keeping their order.
                let mut ops_taken = 0;
                let mut count = 0;
                for pending in &queue.pending {
                    if count > 0 && ops_taken + pending.ops.len() > GROUP_OPS_MAX {
                        break;
                    }
                    ops_taken += pending.ops.len();
                    count += 1;
                }
                group.extend(queue.pending.drain(..count));
                queue.ops_queued -= ops_taken;
            }
            let overdue = parked_deadline.is_some_and(|deadline| Instant::now() >= deadline) || closing;
            let sync =
                group.iter().any(|pending| pending.durability == Durability::Fsync) || (overdue && !parked.is_empty());
            let result = if self.shared.failed.load(Ordering::Acquire) {
                Err(Error::Fatal("the store failed earlier".into()))
            } else if group.iter().all(|pending| pending.ops.is_empty()) {
                // Nothing to write (parked lazy submissions, or a sync):
                // only make what is written durable, if asked.
                if sync {
                    self.db.flush_wal(true).map_err(Error::from)
                } else {
                    Ok(())
                }
            } else {
                let mut batch = WriteBatch::default();
                for pending in &group {
                    for op in &pending.ops {
                        match op {
                            Op::Put(key, value) => batch.put(key, value),
                            Op::Delete(key) => batch.delete(key),
                        }
                    }
                }
                write_options.set_sync(sync);
                let ops: usize = group.iter().map(|pending| pending.ops.len()).sum();
                metrics::counter!("tandem_store_writes_total").increment(1);
                metrics::counter!("tandem_store_bytes_written_total").increment(batch.size_in_bytes() as u64);
                metrics::histogram!("tandem_store_write_group_size").record(ops as f64);
                let started = Instant::now();
                let written = self.db.write_opt(batch, &write_options).map_err(Error::from);
                metrics::histogram!("tandem_store_write_seconds").record(started.elapsed().as_secs_f64());
                written
            };
            if sync {
                metrics::counter!("tandem_store_fsyncs_total").increment(1);
            }
            if let Err(error) = &result {
                tracing::error!(%error, "a write to the store failed; this node stops acknowledging");
                let mut failure = self.shared.failure.lock().expect("failure lock poisoned");
                failure.get_or_insert_with(|| error.to_string());
                drop(failure);
                self.shared.failed.store(true, Ordering::Release);
            }
            let failed = result.is_err();
            // Older submissions first: the parked lazy ones this fsync covers.
            if sync || failed {
                for done in parked.drain(..) {
                    let _ = done.send(result.clone());
                }
                parked_deadline = None;
            }
            for pending in group.drain(..) {
                if pending.durability == Durability::Lazy && !sync && !failed {
                    parked.push(pending.done);
                    parked_deadline.get_or_insert_with(|| Instant::now() + Duration::from_micros(LAZY_LINGER_US));
                } else {
                    // A submitter that went away no longer waits; nothing to tell.
                    let _ = pending.done.send(result.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's ordering and durability, checked the same way on
    /// every implementation: each case below runs it on one.
    async fn writes_are_readable_after_reopen_and_keep_their_order(disk: Disk) {
        {
            let store = disk.open().unwrap();
            let mut waits = Vec::new();
            for i in 0..100u32 {
                waits.push(
                    store
                        .submit(vec![Op::Put(b"k/same".to_vec(), i.to_be_bytes().to_vec())], Durability::Lazy)
                        .unwrap(),
                );
                waits.push(
                    store.submit(vec![Op::Put(format!("k/{i:03}").into_bytes(), vec![1])], Durability::Fsync).unwrap(),
                );
            }
            for wait in waits {
                wait.await.unwrap().unwrap();
            }
            store.write(vec![Op::Delete(b"k/000".to_vec())]).await.unwrap();
            store.close();
        }
        if let Disk::Memory(memory) = &disk {
            // Everything above was fsynced: a power loss keeps it all.
            memory.power_loss();
        }
        let store = disk.open().unwrap();
        assert_eq!(store.get(b"k/same").unwrap(), Some(99u32.to_be_bytes().to_vec()), "the last submitted write wins");
        assert_eq!(store.get(b"k/000").unwrap(), None);
        let rows = store.scan_prefix(b"k/0").unwrap();
        assert_eq!(rows.len(), 99);
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(store.scan_prefix_first(b"k/0", 5).unwrap().len(), 5);
    }

    #[tokio::test]
    async fn rocksdb_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        writes_are_readable_after_reopen_and_keep_their_order(Disk::Path(dir.path().to_path_buf())).await;
    }

    #[tokio::test]
    async fn the_disk_in_memory_keeps_the_contract() {
        writes_are_readable_after_reopen_and_keep_their_order(Disk::Memory(memory::MemoryDisk::new())).await;
    }
}

#[cfg(test)]
mod lazy_tests {
    use super::*;

    #[tokio::test]
    async fn a_lazy_write_alone_is_fsynced_after_the_linger_and_buffered_writes_complete_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let began = Instant::now();
        store.submit(vec![Op::Put(b"b".to_vec(), vec![1])], Durability::Buffered).unwrap().await.unwrap().unwrap();
        let lazy = store.submit(vec![Op::Put(b"l".to_vec(), vec![1])], Durability::Lazy).unwrap();
        lazy.await.unwrap().unwrap();
        assert!(began.elapsed() >= Duration::from_micros(LAZY_LINGER_US), "the lazy write waited for its fsync");
        assert_eq!(store.get(b"l").unwrap(), Some(vec![1]));
        store.close();
    }

    #[tokio::test]
    async fn a_sync_writes_nothing_and_releases_a_parked_lazy_write_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lazy = store.submit(vec![Op::Put(b"l".to_vec(), vec![1])], Durability::Lazy).unwrap();
        store.sync().await.unwrap();
        // The sync's fsync covered the lazy write: it is complete already.
        let mut lazy = lazy;
        assert_eq!(lazy.try_recv().expect("completed by the sync"), Ok(()));
        assert_eq!(store.scan_prefix(b"").unwrap().len(), 1, "the sync wrote no record");
        store.close();
    }
}
