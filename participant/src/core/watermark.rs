//! What this participant knows of each coordinator: its incarnation, its
//! retired incarnations, and its low watermark, so that deduplication needs
//! no time window and a coordinator that lost its log is recognised.
//!
//! # Incarnations
//!
//! A coordinator's log has an incarnation, a random number chosen when the
//! log is created, and every message it sends carries it (participant.proto,
//! PrepareRequest). This node keeps, per coordinator, the `current`
//! incarnation (the latest one it heard of) and the `retired` ones (heard
//! of before another replaced them). Random numbers have no order, so
//! "latest" means "heard of last": an incarnation, once retired, never
//! becomes current again, and a late message from it is known as late.
//!
//! A prepared transaction of a retired incarnation is an **orphan**: the
//! log that could decide it is gone, and the current incarnation's "no
//! record" would be a lie, not a presumed abort. So orphans are never asked
//! about and never aborted by presumption: they are listed (ListPrepared,
//! ReadBalances, the log) and wait for an operator's heuristic decision
//! (`heuristic.rs`).
//!
//! # Watermarks
//!
//! With each message, the current incarnation tells this node its low
//! watermark for it: every transaction of that incarnation below it is
//! finished as far as this node is concerned. The watermark only rises.
//! With it:
//! - a prepare with no record here below the watermark, or from a retired
//!   incarnation, is a late duplicate: it votes NO and reserves nothing
//!   (the coordinator has decided that transaction; if it committed, every
//!   participant voted YES and this one has since applied the commit);
//! - a commit with no record here was applied and its record collected;
//! - an abort with no record below the watermark needs no tombstone.
//!
//! So a finished record (and a tombstone) may go as soon as the watermark
//! passes it, and a late duplicate of any age is recognised: the state is a
//! few numbers per coordinator, not a retention window. The view is written
//! in the same store write as the message that taught it, before (in the
//! write-ahead log's order) any deletion it allows: a power loss that keeps
//! the deletion keeps the view.
//!
//! # Caveats
//!
//! A coordinator whose log is restored from a backup keeps its incarnation:
//! it would hand out positions again, and its watermark would seem to go
//! back (this node keeps the higher one, so its new transactions below it
//! would be refused as late: the coordinator aborts them, nothing is
//! applied twice). A coordinator must be moved by copying its whole data
//! directory, or started afresh on an empty one (a new incarnation).

use super::{Core, Stamp, Txn, TxnState};
use tandem::codec::{corrupt, Reader, Writer};
use tandem::domain::Id;
use tandem::store::Op;
use tandem::Error;

pub(crate) const VIEW_PREFIX: &[u8] = b"v/";
/// Most retired incarnations remembered per coordinator; past it the
/// oldest is forgotten (a late prepare from it would then be judged as
/// new: it could reserve funds until a decision query aborted it).
pub const RETIRED_INCARNATIONS_MAX: usize = 64;

/// One coordinator, as this node knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoordinatorView {
    pub current: u64,
    pub low_watermark: u64,
    /// Oldest first.
    pub retired: Vec<u64>,
}

/// How a message's incarnation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// No incarnation given (an older coordinator): time retention applies.
    Unstamped,
    Current,
    Retired,
}

fn view_key(coordinator: &Id) -> Vec<u8> {
    let mut key = VIEW_PREFIX.to_vec();
    key.extend_from_slice(coordinator.as_str().as_bytes());
    key
}

pub(crate) fn encode_view(view: &CoordinatorView) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.u64(view.current);
    w.u64(view.low_watermark);
    w.count_u8("the number of retired incarnations", view.retired.len())?;
    for retired in &view.retired {
        w.u64(*retired);
    }
    Ok(w.finish())
}

pub(crate) fn decode_view(bytes: &[u8]) -> Result<CoordinatorView, Error> {
    let mut r = Reader::new(bytes);
    let current = r.u64()?;
    let low_watermark = r.u64()?;
    let count = r.byte()? as usize;
    if count > RETIRED_INCARNATIONS_MAX {
        return Err(corrupt(format!("{count} retired incarnations; at most {RETIRED_INCARNATIONS_MAX} are kept")));
    }
    let retired = (0..count).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
    r.done()?;
    if current == 0 || retired.contains(&current) || retired.contains(&0) {
        return Err(corrupt(format!("incarnation {current:#x} with retired ones {retired:x?}")));
    }
    Ok(CoordinatorView { current, low_watermark, retired })
}

impl Core {
    /// Learns what a message from `coordinator` stamped with `incarnation`
    /// and `low_watermark` says: a new incarnation retires the current one
    /// (its prepared transactions become orphans), the current one's
    /// watermark rises. Returns how the incarnation stands and the write
    /// that keeps what changed. A coordinator this node was not started
    /// with teaches nothing.
    pub(crate) fn observe(
        &mut self,
        coordinator: &Id,
        incarnation: u64,
        low_watermark: u64,
    ) -> Result<(Standing, Vec<Op>), Error> {
        if incarnation == 0 || !self.config.coordinators.contains(coordinator) {
            return Ok((Standing::Unstamped, Vec::new()));
        }
        let view = self.coordinator_views.entry(coordinator.clone()).or_default();
        if view.current == incarnation {
            if low_watermark <= view.low_watermark {
                return Ok((Standing::Current, Vec::new()));
            }
            view.low_watermark = low_watermark;
        } else if view.retired.contains(&incarnation) {
            return Ok((Standing::Retired, Vec::new()));
        } else {
            if view.current != 0 {
                view.retired.push(view.current);
                if view.retired.len() > RETIRED_INCARNATIONS_MAX {
                    view.retired.remove(0);
                }
            }
            let retired = view.current;
            view.current = incarnation;
            view.low_watermark = low_watermark;
            if retired != 0 {
                let orphans = self.orphan_prepared_of(coordinator);
                tracing::warn!(
                    %coordinator,
                    retired = format_args!("{retired:#018x}"),
                    current = format_args!("{incarnation:#018x}"),
                    orphans,
                    "the coordinator has a new incarnation (its log was lost or replaced): the transactions it left prepared here are orphaned and wait for an operator (ListPrepared, ResolveInDoubt)"
                );
            }
        }
        let view = &self.coordinator_views[coordinator];
        Ok((Standing::Current, vec![Op::Put(view_key(coordinator), encode_view(view)?)]))
    }

    /// A coordinator answered a decision query as `incarnation` (every
    /// answer says which): learnt as a stamp with no watermark.
    pub fn learn_incarnation(&mut self, coordinator: &Id, incarnation: u64) -> Result<Vec<Op>, Error> {
        Ok(self.observe(coordinator, incarnation, 0)?.1)
    }

    /// Why a message with no record here, from `coordinator` and at
    /// `position`, is late (see the module essay), if it is.
    pub(crate) fn late(&self, coordinator: &Id, standing: Standing, position: u64) -> Option<String> {
        match standing {
            Standing::Unstamped => None,
            Standing::Retired => Some(format!(
                "late: it comes from a retired incarnation of coordinator {coordinator} (one whose log was replaced)"
            )),
            Standing::Current => {
                let view = self.coordinator_views.get(coordinator)?;
                (position != 0 && position < view.low_watermark).then(|| {
                    format!(
                        "late: its position {position} is below coordinator {coordinator}'s watermark {} (that transaction is finished)",
                        view.low_watermark
                    )
                })
            }
        }
    }

    /// An orphan: a prepared transaction (no heuristic decision) whose
    /// incarnation this node has seen replaced.
    pub fn is_orphan(&self, txn: &Txn) -> bool {
        txn.state == TxnState::Prepared
            && txn.heuristic.is_none()
            && txn.incarnation != 0
            && self.coordinator_views.get(&txn.coordinator).is_some_and(|view| view.current != txn.incarnation)
    }

    /// Takes `coordinator`'s newly orphaned transactions out of the
    /// queries; returns how many of its prepared ones are orphans.
    fn orphan_prepared_of(&mut self, coordinator: &Id) -> usize {
        let Some(due) = self.due.remove(coordinator) else { return 0 };
        let mut still_due = std::collections::BTreeSet::new();
        let mut orphans = 0;
        for (at, id) in due {
            match self.txns.get(&id) {
                Some(txn) if self.is_orphan(txn) => orphans += 1,
                Some(_) => {
                    still_due.insert((at, id));
                }
                None => {}
            }
        }
        if !still_due.is_empty() {
            self.due.insert(coordinator.clone(), still_due);
        }
        orphans
    }

    /// How many prepared transactions here are orphans.
    pub fn orphan_count(&self) -> usize {
        self.prepared().into_iter().filter(|(_, txn)| self.is_orphan(txn)).count()
    }

    /// What this node knows of each coordinator.
    pub fn coordinator_views(&self) -> &std::collections::BTreeMap<Id, CoordinatorView> {
        &self.coordinator_views
    }

    /// The stamp of a prepared transaction, for its decision query.
    pub fn stamp_of(&self, txn: &Txn) -> Stamp {
        Stamp { incarnation: txn.incarnation, position: txn.position, low_watermark: 0, idempotency_key: None }
    }
}
