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
//! - [`Durability::Deferred`]: as `Buffered`, but it does not wake the
//!   writer: it goes with the next group the writer takes for another
//!   submission, or within [`DEFERRED_LINGER_US`] at the latest. For
//!   records nobody waits for (the coordinator's end records): at one
//!   client the end record of one transaction then rides on the next one's
//!   staged record, and the writer thread wakes once a transaction, not
//!   twice.
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
//! Writing in place ([`set_write_in_place`], the participant's
//! `--write-in-place`): a small `Fsync` submission (at most
//! [`IN_PLACE_OPS_MAX`] operations, one transaction's records) that finds
//! the store idle (nothing queued, nothing being written, no lazy
//! submission waiting for an fsync, the last write ended at least
//! [`IN_PLACE_IDLE_US`] ago) is written and fsynced by the submitting
//! thread, and has completed when `submit` returns. One transaction at a
//! time, that saves handing the write to the writer thread and the answer
//! back: two wake-ups of another thread, each tens of microseconds on a VM
//! whose idle vCPUs halt. The submitter's thread is blocked meanwhile, so a
//! busy node (whose writes carry many transactions each) keeps handing
//! writes to the writer, which groups what arrives during a write.
//! Submissions that arrive from other threads during a write in place
//! queue and wait for it: order holds.
//!
//! The log: RocksDB's write-ahead log is recycled, and prepared at open
//! ([`WAL_PRIME_BYTES_DEFAULT`], `--wal-prime-mb`), so that a write and its
//! fsync rewrite a file in place rather than grow it: on ext4 that fsync
//! need not write the file's inode as well.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a store must have been idle (since its last write ended) for
/// an `Fsync` submission to be written in place (see the module
/// documentation). Under load writes follow each other within a fsync or
/// two (100-300 us here), and then the writer thread groups them; one
/// transaction at a time, a participant writes every 600 us or so.
pub const IN_PLACE_IDLE_US: u64 = 200;

/// Most operations of a submission written in place. A participant's
/// prepare, with the COMMIT of the transaction before riding on it, is 3
/// or 4 operations; a larger write carries several transactions, which
/// says the node is busy, and blocking its thread for the fsync would hold
/// back what arrives meanwhile (the bench at 64 clients, where the
/// participants' writes are 32-128 operations, wrote 70% of them in place
/// without this bound, at 0.97 of the throughput).
pub const IN_PLACE_OPS_MAX: usize = 8;

static WRITE_IN_PLACE: AtomicBool = AtomicBool::new(false);

/// Whether the stores this process opens from now on write an `Fsync`
/// submission in place when they are idle (see the module documentation).
/// Off in a process that never calls this.
pub fn set_write_in_place(on: bool) {
    WRITE_IN_PLACE.store(on, Ordering::Relaxed);
}

/// Most operations merged into one group (one WriteBatch, one fsync).
pub const GROUP_OPS_MAX: usize = 16_384;
/// Most operations waiting for the writer.
pub const QUEUE_OPS_MAX: usize = 262_144;
/// Longest a [`Durability::Lazy`] submission waits for another group's
/// fsync before the writer fsyncs for it.
pub const LAZY_LINGER_US: u64 = 1_000;
/// Longest a [`Durability::Deferred`] submission waits for another
/// submission's group before the writer writes it alone; and how long the
/// writer, after a write, waits for more before it sleeps until woken (a
/// deferred submission wakes a writer that sleeps so, and only then).
pub const DEFERRED_LINGER_US: u64 = 2_000;

/// Obsolete write-ahead log files kept to be reused (RocksDB's
/// `recycle_log_file_num`).
pub const WAL_RECYCLED_FILES: usize = 2;
/// How much write-ahead log a store prepares at open when the process sets
/// nothing else (the binaries' `--wal-prime-mb`), and the most it may.
///
/// Why: RocksDB appends to a new log file, so every fsync (fdatasync) of
/// it also writes the file's inode, whose size changed: on this machine's
/// ext4 an fdatasync after a 200-byte append took 126-133 us at p50, one
/// after a write inside the file's size 89-90 us. A recycled log is
/// rewritten in place, within its old size, so its fsyncs skip the inode
/// (PostgreSQL fills its WAL segments with zeros when it creates them, for
/// the same reason). RocksDB recycles only logs it flushed, and starts a
/// new one at every open, so at open the store writes this much filler
/// into its log, twice, flushing after each (a marker key written and then
/// deleted makes each flush switch logs): the log it then writes to is a
/// recycled one of this size. The filler is log-only data
/// (`put_log_data`): it never reaches the memtable or a table file.
///
/// 16 MiB covers a bench run at a node (about 450 bytes of log a transfer);
/// past it the log grows again until the memtable (RocksDB's default, 64
/// MiB) is flushed, and from the second flush on every log is a recycled
/// one of a memtable's size, primed or not.
pub const WAL_PRIME_BYTES_DEFAULT: u64 = 16 << 20;
pub const WAL_PRIME_BYTES_MAX: u64 = 1 << 30;
/// The key that makes a priming flush switch logs; deleted at once.
const WAL_PRIME_MARKER: &[u8] = b"\xffstore/wal-prime";

static WAL_PRIME_BYTES: AtomicU64 = AtomicU64::new(0);

/// Sets how much write-ahead log every store this process opens from now
/// on prepares (see [`WAL_PRIME_BYTES_DEFAULT`]); 0, the default of a
/// process that never calls this (tests), prepares none.
pub fn set_wal_prime_bytes(bytes: u64) -> Result<(), Error> {
    if bytes > WAL_PRIME_BYTES_MAX {
        return Err(Error::InvalidInput(format!(
            "the write-ahead log to prepare is at most {} MiB, not {}",
            WAL_PRIME_BYTES_MAX >> 20,
            bytes >> 20
        )));
    }
    WAL_PRIME_BYTES.store(bytes, Ordering::Relaxed);
    Ok(())
}

/// The storage flag of every node.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreFlags {
    /// MiB of write-ahead log the store writes and recycles when it opens,
    /// so that the log it then appends to is rewritten in place, within its
    /// size: an fsync then skips the file's inode (about 40 us less a
    /// write on ext4 here). Costs about twice that much disk (the log and
    /// a recycled one), and 70-130 ms a start here for 16. The room is the log's already: a full
    /// disk shows once the log outgrows it, not at the next write. 0: none,
    /// the log grows as RocksDB's default.
    #[arg(long, value_name = "MIB", default_value_t = WAL_PRIME_BYTES_DEFAULT >> 20)]
    pub wal_prime_mb: u64,
}

impl StoreFlags {
    /// Makes the setting the process's (see [`set_wal_prime_bytes`]).
    pub fn apply(&self) -> Result<(), Error> {
        set_wal_prime_bytes(self.wal_prime_mb.saturating_mul(1 << 20))
    }
}

fn wal_prime_bytes() -> u64 {
    WAL_PRIME_BYTES.load(Ordering::Relaxed)
}

/// The write-ahead log's options of every store: recycled logs (see
/// [`WAL_PRIME_BYTES_DEFAULT`]). Public so that the bench's calibration
/// measures the fsync the nodes do.
pub fn set_wal_options(options: &mut Options) {
    // A memtable's log, once flushed, is reused in place for a later one
    // instead of being deleted. RocksDB reads recycled logs back with the
    // point-in-time recovery it uses by default (it refuses recycling
    // only with the recovery modes that cannot tell a recycled tail from
    // corruption).
    options.set_recycle_log_file_num(WAL_RECYCLED_FILES);
}

/// Leaves `db` writing to a recycled log of at least `bytes` (see
/// [`WAL_PRIME_BYTES_DEFAULT`]); with 0, only removes a marker that a
/// crash in the middle of priming left behind. `db` must have been opened
/// with [`set_wal_options`].
pub fn prime_wal(db: &DB, bytes: u64) -> Result<(), rocksdb::Error> {
    if bytes == 0 {
        if db.get(WAL_PRIME_MARKER)?.is_some() {
            db.delete(WAL_PRIME_MARKER)?;
        }
        return Ok(());
    }
    const CHUNK_BYTES: u64 = 1 << 20;
    let filler = vec![0u8; CHUNK_BYTES as usize];
    for round in 0..2 {
        let mut batch = WriteBatch::default();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK_BYTES);
            batch.put_log_data(&filler[..n as usize]);
            left -= n;
        }
        if round == 0 {
            batch.put(WAL_PRIME_MARKER, b"");
        } else {
            batch.delete(WAL_PRIME_MARKER);
        }
        // Unsynced: filler need not survive; the flush syncs what matters.
        db.write(batch)?;
        db.flush()?;
    }
    Ok(())
}

/// When a submission completes; see the module documentation. Ordered
/// from the weakest to the strongest, so that `max` is what a submission
/// merging several must ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Durability {
    Deferred,
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
    /// Submissions in `pending` that are not [`Durability::Deferred`]: the
    /// writer takes a group as soon as there is one.
    urgent: usize,
    /// When the oldest deferred submission in `pending` must be written.
    deferred_deadline: Option<Instant>,
    /// The writer sleeps until woken, with no deadline of its own: a
    /// deferred submission must wake it.
    writer_sleeps: bool,
    /// A group is being written, by the writer thread or in place.
    writing: bool,
    /// The writer holds lazy submissions written but not yet fsynced: an
    /// fsync in place would cover them without completing them, so none
    /// is made.
    lazy_parked: bool,
    /// When the last write ended.
    last_write_end: Option<Instant>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake_writer: Condvar,
    failed: AtomicBool,
    /// The error that failed the store (set before `failed`).
    failure: Mutex<Option<String>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Write an `Fsync` submission in place when idle, and after how long idle.
    in_place_idle: Option<Duration>,
    /// Writes made in place (for tests; the metric counts them too).
    writes_in_place: AtomicU64,
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
        let in_place_idle = WRITE_IN_PLACE.load(Ordering::Relaxed).then_some(Duration::from_micros(IN_PLACE_IDLE_US));
        Store::open_with(path, wal_prime_bytes(), in_place_idle)
    }

    /// [`Store::open`], preparing `wal_prime_bytes` of write-ahead log
    /// whatever the process's setting, writing in place after
    /// `in_place_idle` idle (never with `None`).
    fn open_with(path: &Path, wal_prime_bytes: u64, in_place_idle: Option<Duration>) -> Result<Store, Error> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Fatal(format!("cannot create the data directory {}: {e}", path.display())))?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_max_background_jobs(2);
        set_wal_options(&mut options);
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
        prime_wal(&db, wal_prime_bytes)
            .map_err(|e| Error::Fatal(format!("cannot prepare the write-ahead log at {}: {e}", path.display())))?;
        let store = Store {
            db: Arc::new(db),
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                wake_writer: Condvar::new(),
                failed: AtomicBool::new(false),
                failure: Mutex::new(None),
                writer: Mutex::new(None),
                in_place_idle,
                writes_in_place: AtomicU64::new(0),
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
        if self.may_write_in_place(&queue, durability, ops.len()) {
            let _ = done.send(self.write_in_place(queue, &ops));
            return Ok(receiver);
        }
        queue.ops_queued += ops.len();
        queue.pending.push(Pending { ops, durability, done });
        let wake = if durability == Durability::Deferred {
            queue.deferred_deadline.get_or_insert_with(|| Instant::now() + Duration::from_micros(DEFERRED_LINGER_US));
            queue.writer_sleeps
        } else {
            queue.urgent += 1;
            true
        };
        drop(queue);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        Ok(receiver)
    }

    /// Whether a submission arriving now is written in place (see the
    /// module documentation).
    fn may_write_in_place(&self, queue: &Queue, durability: Durability, ops_count: usize) -> bool {
        let Some(idle) = self.shared.in_place_idle else { return false };
        durability == Durability::Fsync
            && ops_count <= IN_PLACE_OPS_MAX
            && queue.pending.is_empty()
            && !queue.writing
            && !queue.lazy_parked
            && queue.last_write_end.is_none_or(|end| end.elapsed() >= idle)
    }

    /// Writes and fsyncs `ops` on this thread, the writer held off
    /// meanwhile (submissions from other threads queue behind it).
    fn write_in_place(&self, mut queue: std::sync::MutexGuard<'_, Queue>, ops: &[Op]) -> Result<(), Error> {
        queue.writing = true;
        drop(queue);
        let result = self.write_ops([ops], true);
        if !ops.is_empty() {
            self.shared.writes_in_place.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tandem_store_writes_in_place_total").increment(1);
        }
        let mut queue = self.shared.queue.lock().expect("store queue lock poisoned");
        queue.writing = false;
        queue.last_write_end = Some(Instant::now());
        // The writer waits while a write is in place; it has work only if
        // something queued meanwhile, or the store is closing.
        let wake = !queue.pending.is_empty() || queue.closed;
        drop(queue);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        result
    }

    /// How many writes were made in place since the store opened.
    pub fn writes_in_place(&self) -> u64 {
        self.shared.writes_in_place.load(Ordering::Relaxed)
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

    /// Writes the operations of `op_lists` in one batch, fsynced if `sync`
    /// (with none, only fsyncs the log, if asked). A failure fails the store
    /// for good: the node must stop acknowledging.
    fn write_ops<'a>(&self, op_lists: impl IntoIterator<Item = &'a [Op]>, sync: bool) -> Result<(), Error> {
        let result = if self.shared.failed.load(Ordering::Acquire) {
            Err(Error::Fatal("the store failed earlier".into()))
        } else {
            let mut batch = WriteBatch::default();
            let mut ops = 0usize;
            for op in op_lists.into_iter().flatten() {
                match op {
                    Op::Put(key, value) => batch.put(key, value),
                    Op::Delete(key) => batch.delete(key),
                }
                ops += 1;
            }
            if ops == 0 {
                // Nothing to write (parked lazy submissions, or a sync):
                // only make what is written durable, if asked.
                if sync {
                    self.db.flush_wal(true).map_err(Error::from)
                } else {
                    Ok(())
                }
            } else {
                let mut write_options = WriteOptions::default();
                write_options.set_sync(sync);
                metrics::counter!("tandem_store_writes_total").increment(1);
                metrics::counter!("tandem_store_bytes_written_total").increment(batch.size_in_bytes() as u64);
                metrics::histogram!("tandem_store_write_group_size").record(ops as f64);
                let started = Instant::now();
                let written = self.db.write_opt(batch, &write_options).map_err(Error::from);
                metrics::histogram!("tandem_store_write_seconds").record(started.elapsed().as_secs_f64());
                written
            }
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
        result
    }

    fn run_writer(self) {
        let mut group: Vec<Pending> = Vec::new();
        // Lazy submissions written but not yet covered by an fsync, and when
        // the writer must fsync for them at the latest.
        let mut parked: Vec<Completion> = Vec::new();
        let mut parked_deadline: Option<Instant> = None;
        // Until when the writer, idle, waits with a deadline after a write
        // (so that deferred submissions need not wake it).
        let mut lingering_until: Option<Instant> = None;
        loop {
            let closing;
            {
                let mut queue = self.shared.queue.lock().expect("store queue lock poisoned");
                loop {
                    let now = Instant::now();
                    let due = |deadline: Option<Instant>| deadline.is_some_and(|deadline| now >= deadline);
                    if queue.writing {
                        // A submitter writes in place; it wakes the writer
                        // when done if anything queued meanwhile (and a
                        // deferred submission wakes a sleeping writer).
                        queue.writer_sleeps = true;
                        queue = self.shared.wake_writer.wait(queue).expect("store queue lock poisoned");
                        queue.writer_sleeps = false;
                        continue;
                    }
                    if queue.urgent > 0 || due(queue.deferred_deadline) || due(parked_deadline) {
                        break;
                    }
                    if queue.closed {
                        if queue.pending.is_empty() && parked.is_empty() {
                            return;
                        }
                        break;
                    }
                    let wake_at =
                        [parked_deadline, queue.deferred_deadline, lingering_until.filter(|until| *until > now)]
                            .into_iter()
                            .flatten()
                            .min();
                    match wake_at {
                        None => {
                            queue.writer_sleeps = true;
                            queue = self.shared.wake_writer.wait(queue).expect("store queue lock poisoned");
                            queue.writer_sleeps = false;
                        }
                        Some(deadline) => {
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
                queue.urgent -= group.iter().filter(|pending| pending.durability != Durability::Deferred).count();
                if !queue.pending.iter().any(|pending| pending.durability == Durability::Deferred) {
                    queue.deferred_deadline = None;
                }
                queue.writing = true;
            }
            let overdue = parked_deadline.is_some_and(|deadline| Instant::now() >= deadline) || closing;
            let sync =
                group.iter().any(|pending| pending.durability == Durability::Fsync) || (overdue && !parked.is_empty());
            let result = self.write_ops(group.iter().map(|pending| pending.ops.as_slice()), sync);
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
            lingering_until = Some(Instant::now() + Duration::from_micros(DEFERRED_LINGER_US));
            let mut queue = self.shared.queue.lock().expect("store queue lock poisoned");
            queue.writing = false;
            queue.lazy_parked = !parked.is_empty();
            queue.last_write_end = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's ordering and durability, checked the same way on
    /// every implementation: each case below runs it on one.
    async fn writes_are_readable_after_reopen_and_keep_their_order(disk: Disk) {
        let opened = disk.clone();
        writes_keep_their_order_through_reopen(
            move || opened.open().unwrap(),
            || {
                if let Disk::Memory(memory) = &disk {
                    // Everything was fsynced: a power loss keeps it all.
                    memory.power_loss();
                }
            },
        )
        .await;
    }

    async fn writes_keep_their_order_through_reopen(open: impl Fn() -> Arc<dyn Storage>, power_loss: impl Fn()) {
        {
            let store = open();
            let mut waits = Vec::new();
            for i in 0..100u32 {
                waits.push(
                    store
                        .submit(vec![Op::Put(b"k/same".to_vec(), i.to_be_bytes().to_vec())], Durability::Lazy)
                        .unwrap(),
                );
                waits.push(
                    store
                        .submit(vec![Op::Put(format!("d/{i:03}").into_bytes(), vec![1])], Durability::Deferred)
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
        power_loss();
        let store = open();
        assert_eq!(store.get(b"k/same").unwrap(), Some(99u32.to_be_bytes().to_vec()), "the last submitted write wins");
        assert_eq!(store.get(b"k/000").unwrap(), None);
        let rows = store.scan_prefix(b"k/0").unwrap();
        assert_eq!(rows.len(), 99);
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(store.scan_prefix_first(b"k/0", 5).unwrap().len(), 5);
        // Each deferred write came before a fsynced one: durable with it.
        assert_eq!(store.scan_prefix(b"d/").unwrap().len(), 100);
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

    #[tokio::test]
    async fn rocksdb_writing_in_place_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let open = move || -> Arc<dyn Storage> { Arc::new(Store::open_with(&path, 0, Some(Duration::ZERO)).unwrap()) };
        writes_keep_their_order_through_reopen(open, || {}).await;
    }
}

#[cfg(test)]
mod in_place_tests {
    use super::*;

    fn completed(written: &mut Written) -> bool {
        matches!(written.try_recv(), Ok(Ok(())))
    }

    #[tokio::test]
    async fn an_fsynced_write_to_an_idle_store_is_written_before_submit_returns_and_one_soon_after_queues() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), 0, Some(Duration::from_secs(3600))).unwrap();
        let mut first = store.submit(vec![Op::Put(b"k".to_vec(), b"1".to_vec())], Durability::Fsync).unwrap();
        assert!(completed(&mut first), "the first write of an idle store is made in place");
        assert_eq!(store.writes_in_place(), 1);
        // The store wrote less than an hour ago: the writer takes this one.
        let second = store.submit(vec![Op::Put(b"k".to_vec(), b"2".to_vec())], Durability::Fsync).unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(store.writes_in_place(), 1);
        assert_eq!(store.get(b"k").unwrap(), Some(b"2".to_vec()));
        store.close();
    }

    #[tokio::test]
    async fn only_small_fsynced_writes_to_an_empty_queue_are_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), 0, Some(Duration::ZERO)).unwrap();
        for i in 0..3u8 {
            let mut written = store.submit(vec![Op::Put(b"k".to_vec(), vec![i])], Durability::Fsync).unwrap();
            assert!(completed(&mut written));
        }
        assert_eq!(store.writes_in_place(), 3);
        // So does a write of many operations (a busy node's).
        let many = (0..=IN_PLACE_OPS_MAX as u32).map(|i| Op::Put(i.to_be_bytes().to_vec(), vec![1])).collect();
        store.submit(many, Durability::Fsync).unwrap().await.unwrap().unwrap();
        assert_eq!(store.writes_in_place(), 3);
        // Buffered and deferred writes go to the writer.
        store.submit(vec![Op::Put(b"b".to_vec(), vec![1])], Durability::Buffered).unwrap().await.unwrap().unwrap();
        assert_eq!(store.writes_in_place(), 3);
        // A lazy write waits for an fsync from the writer: the next fsynced
        // write, whether it finds the lazy one queued, being written, or
        // written and waiting, goes to the writer too, and covers it.
        let lazy = store.submit(vec![Op::Put(b"l".to_vec(), vec![1])], Durability::Lazy).unwrap();
        let fsynced = store.submit(vec![Op::Put(b"f".to_vec(), vec![1])], Durability::Fsync).unwrap();
        fsynced.await.unwrap().unwrap();
        lazy.await.unwrap().unwrap();
        assert_eq!(store.writes_in_place(), 3);
        // A deferred write queued ahead keeps a fsynced one from going in place.
        let deferred = store.submit(vec![Op::Put(b"d".to_vec(), vec![1])], Durability::Deferred).unwrap();
        store.submit(vec![Op::Put(b"k".to_vec(), vec![9])], Durability::Fsync).unwrap().await.unwrap().unwrap();
        deferred.await.unwrap().unwrap();
        assert_eq!(store.writes_in_place(), 3);
        assert_eq!(store.get(b"k").unwrap(), Some(vec![9]));
        store.close();
    }

    #[test]
    fn writes_submitted_by_other_threads_during_one_in_place_wait_for_it_and_close_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), 0, Some(Duration::ZERO)).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50u8 {
                        let key = format!("t{t}").into_bytes();
                        let written = store.submit(vec![Op::Put(key.clone(), vec![i])], Durability::Fsync).unwrap();
                        written.blocking_recv().unwrap().unwrap();
                        // Each thread's own writes apply in its order.
                        assert_eq!(store.get(&key).unwrap(), Some(vec![i]));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(store.writes_in_place() >= 1);
        store.close();
        drop(store);
        let store = Store::open_with(dir.path(), 0, None).unwrap();
        for t in 0..4u8 {
            assert_eq!(store.get(format!("t{t}").as_bytes()).unwrap(), Some(vec![49]));
        }
        store.close();
    }
}

#[cfg(test)]
mod deferred_tests {
    use super::*;

    #[tokio::test]
    async fn a_deferred_write_completes_with_the_next_write_or_alone_after_its_linger() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for round in 0..20u8 {
            // Followed by a fsynced write: done, at the latest, when that is.
            let mut deferred =
                store.submit(vec![Op::Put(b"k".to_vec(), vec![round, 1])], Durability::Deferred).unwrap();
            store.write(vec![Op::Put(b"s".to_vec(), vec![round])]).await.unwrap();
            assert_eq!(
                deferred.try_recv(),
                Ok(Ok(())),
                "round {round}: the deferred write went with or before the fsync"
            );
            // Alone: written within its linger, though nothing wakes the writer.
            let alone = store.submit(vec![Op::Put(b"k".to_vec(), vec![round, 2])], Durability::Deferred).unwrap();
            tokio::time::timeout(Duration::from_secs(5), alone).await.unwrap().unwrap().unwrap();
            assert_eq!(store.get(b"k").unwrap(), Some(vec![round, 2]));
            // Then a buffered write of the same key: the order holds.
            let deferred = store.submit(vec![Op::Put(b"k".to_vec(), vec![round, 3])], Durability::Deferred).unwrap();
            let buffered = store.submit(vec![Op::Put(b"k".to_vec(), vec![round, 4])], Durability::Buffered).unwrap();
            buffered.await.unwrap().unwrap();
            deferred.await.unwrap().unwrap();
            assert_eq!(store.get(b"k").unwrap(), Some(vec![round, 4]));
        }
        // Closing writes what is still deferred.
        let deferred = store.submit(vec![Op::Put(b"last".to_vec(), vec![1])], Durability::Deferred).unwrap();
        store.close();
        deferred.await.unwrap().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get(b"last").unwrap(), Some(vec![1]));
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

#[cfg(test)]
mod wal_prime_tests {
    use super::*;

    /// The write-ahead log files in `dir`, by number, with their sizes.
    fn logs(dir: &Path) -> Vec<(String, u64)> {
        let mut logs: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".log"))
            .map(|entry| (entry.file_name().to_string_lossy().into_owned(), entry.metadata().unwrap().len()))
            .collect();
        logs.sort();
        logs
    }

    #[tokio::test]
    async fn a_primed_store_fsyncs_inside_its_logs_size_and_reads_back_what_it_wrote_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let prime = 1 << 20;
        {
            let store = Store::open_with(dir.path(), prime, None).unwrap();
            let (active, size) = logs(dir.path()).pop().expect("a log file");
            assert!(size >= prime, "the log written to ({active}) is a recycled one of {size} bytes");
            for i in 0..100u32 {
                store.write(vec![Op::Put(format!("k/{i:03}").into_bytes(), vec![1; 100])]).await.unwrap();
            }
            // Written and fsynced inside the file: its size, and so its
            // inode, did not change.
            assert_eq!(logs(dir.path()).pop().unwrap(), (active, size));
            assert_eq!(store.get(WAL_PRIME_MARKER).unwrap(), None, "the marker is gone");
            assert_eq!(store.scan_prefix(b"").unwrap().len(), 100, "priming left no record");
            store.close();
        }
        // Reopened without priming, from the recycled log.
        let store = Store::open_with(dir.path(), 0, None).unwrap();
        let rows = store.scan_prefix(b"").unwrap();
        assert_eq!(rows.len(), 100);
        assert!(rows.iter().all(|(_, value)| value == &vec![1; 100]));
        store.close();
        drop(store);
        // And primed again: still all there.
        let store = Store::open_with(dir.path(), prime, None).unwrap();
        assert_eq!(store.scan_prefix(b"").unwrap().len(), 100);
        store.close();
    }

    #[tokio::test]
    async fn a_marker_left_by_a_crash_while_priming_is_removed_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open_with(dir.path(), 0, None).unwrap();
            store.write(vec![Op::Put(WAL_PRIME_MARKER.to_vec(), Vec::new())]).await.unwrap();
            store.close();
        }
        let store = Store::open_with(dir.path(), 0, None).unwrap();
        assert_eq!(store.get(WAL_PRIME_MARKER).unwrap(), None);
        store.close();
    }

    #[test]
    fn a_setting_past_the_bound_is_refused() {
        assert!(matches!(set_wal_prime_bytes(WAL_PRIME_BYTES_MAX + 1), Err(Error::InvalidInput(_))));
    }
}
