//! Calibration in the same run: this machine's fsync latency and gRPC round
//! trip, measured just before the workload, so each protocol's latency can
//! be read as a ratio to the floor of its critical path.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use tandem::pb;
use tandem::pb::participant_client::ParticipantClient;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Calibration {
    /// p50 of one RocksDB put with sync=true, one writer, in microseconds.
    pub fsync_p50_us: f64,
    /// p50 of two sync puts to two databases started at the same moment,
    /// until both are done: what two participants' prepare fsyncs cost on
    /// this one disk. Reported beside the floor, not in it: the floor is the
    /// protocol's, this is the local cluster's.
    pub fsync_pair_p50_us: f64,
    /// p50 of one tonic unary call on loopback, one at a time, in microseconds.
    pub rtt_p50_us: f64,
}

impl Calibration {
    /// The latency floor of one transfer's critical path, in microseconds.
    ///
    /// - 2PC by parallel commit (`2pc`, the coordinator's default): client to
    ///   coordinator, coordinator to the participants (two round trips; the
    ///   prepares go out in parallel), and one fsync (the prepares' and the
    ///   coordinator's staged record's, all at the same time).
    /// - Classic 2PC (`2pc-classic`): the same round trips, the prepare fsync
    ///   and then the decision fsync.
    /// - Orchestrated saga: client to coordinator, then the debit and the
    ///   credit one after the other (three round trips); the saga log's start
    ///   record, the debit and the credit (three fsyncs). The saga log adds
    ///   one fsync: without it, a coordinator crash after the debit would lose
    ///   track of the money.
    /// - Choreographed saga: client to the source participant, the
    ///   TransferDebited event to the target and TransferCredited back (three
    ///   round trips); the debit, the credit and the completion (three
    ///   fsyncs: each event is made durable with its effects before it is
    ///   acknowledged).
    /// - The PostgreSQL baselines: none (0). Their critical path is
    ///   PostgreSQL's, over its own wire protocol: the report shows "-".
    pub fn floor_us(&self, protocol: crate::scenario::Protocol) -> f64 {
        match protocol {
            crate::scenario::Protocol::PostgresLocal | crate::scenario::Protocol::PostgresTwoPhase => 0.0,
            crate::scenario::Protocol::TwoPhaseCommit | crate::scenario::Protocol::TwoPhaseCommitBatched => {
                2.0 * self.rtt_p50_us + self.fsync_p50_us
            }
            crate::scenario::Protocol::TwoPhaseCommitClassic => 2.0 * self.rtt_p50_us + 2.0 * self.fsync_p50_us,
            crate::scenario::Protocol::Orchestrated | crate::scenario::Protocol::Choreographed => {
                3.0 * self.rtt_p50_us + 3.0 * self.fsync_p50_us
            }
        }
    }
}

const SAMPLES: usize = 300;

/// A scratch RocksDB whose log is recycled and primed as a node's is (see
/// `tandem::store::WAL_PRIME_BYTES_DEFAULT`): the floor is the fastest
/// fsync this disk gives a durable write, whatever the nodes were told.
fn scratch_db(path: &Path) -> Result<rocksdb::DB, String> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    tandem::store::set_wal_options(&mut options);
    let db = rocksdb::DB::open(&options, path).map_err(|e| format!("calibration RocksDB: {e}"))?;
    tandem::store::prime_wal(&db, CALIBRATION_WAL_PRIME_BYTES).map_err(|e| format!("calibration RocksDB: {e}"))?;
    Ok(db)
}

/// Enough recycled log for the calibration's writes (a few hundred small
/// puts), far less than a node's.
const CALIBRATION_WAL_PRIME_BYTES: u64 = 1 << 20;

fn sync_put(db: &rocksdb::DB, i: usize) -> Result<(), String> {
    let mut write_options = rocksdb::WriteOptions::default();
    write_options.set_sync(true);
    db.put_opt(format!("k{i}"), [0u8; 64], &write_options).map_err(|e| e.to_string())
}

/// Sync puts into a scratch RocksDB under `dir` (removed afterwards): the
/// p50 of one alone, and of two (in two databases) started together.
pub fn fsync_p50_us(dir: &Path) -> Result<(f64, f64), String> {
    let (path_a, path_b) = (dir.join("calibration-db-a"), dir.join("calibration-db-b"));
    let (a, b) = (scratch_db(&path_a)?, scratch_db(&path_b)?);
    let mut alone = Histogram::<u64>::new(3).unwrap();
    for i in 0..SAMPLES {
        let began = Instant::now();
        sync_put(&a, i)?;
        alone.record(began.elapsed().as_micros().max(1) as u64).unwrap();
    }
    let mut pair = Histogram::<u64>::new(3).unwrap();
    let start = std::sync::Barrier::new(2);
    let done = std::sync::Barrier::new(2);
    std::thread::scope(|scope| -> Result<(), String> {
        let other = scope.spawn(|| -> Result<(), String> {
            for i in 0..SAMPLES {
                start.wait();
                let result = sync_put(&b, i);
                done.wait();
                result?;
            }
            Ok(())
        });
        for i in 0..SAMPLES {
            start.wait();
            let began = Instant::now();
            let result = sync_put(&a, SAMPLES + i);
            done.wait();
            pair.record(began.elapsed().as_micros().max(1) as u64).unwrap();
            result?;
        }
        other.join().expect("calibration thread panicked")
    })?;
    drop((a, b));
    let _ = std::fs::remove_dir_all(&path_a);
    let _ = std::fs::remove_dir_all(&path_b);
    Ok((alone.value_at_quantile(0.5) as f64, pair.value_at_quantile(0.5) as f64))
}

/// Sequential GetBalance calls to a participant: a real tonic unary round
/// trip with next to no work on the server.
pub async fn rtt_p50_us(client: &mut ParticipantClient<Channel>, account: u64) -> Result<f64, String> {
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    for i in 0..SAMPLES + 50 {
        let began = Instant::now();
        client.get_balance(pb::GetBalanceRequest { account }).await.map_err(|e| e.message().to_string())?;
        if i >= 50 {
            histogram.record(began.elapsed().as_micros().max(1) as u64).unwrap();
        }
    }
    Ok(histogram.value_at_quantile(0.5) as f64)
}
