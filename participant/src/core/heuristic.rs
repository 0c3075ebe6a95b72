//! Heuristic decisions: an operator forces an in-doubt (or orphaned)
//! transaction to commit or abort, and the participant keeps an audit
//! trail of it.
//!
//! 2PC's price is that a participant that voted YES waits for its
//! coordinator. When the coordinator will never answer (its log is lost:
//! the transaction is an orphan, `watermark.rs`) or the wait costs more
//! than the risk, an operator decides in its place ([`Core::resolve_heuristically`],
//! the ResolveInDoubt call, operator role only), with a reason. The choice
//! is applied like a commit or an abort, and written durably (fsync) with
//! the transaction's legs, the reason and the time: the record is never
//! collected.
//!
//! If the coordinator later delivers an outcome
//! ([`Core::coordinator_decided`], from a Commit, CommitBatch or Abort),
//! nothing is applied a second time: the outcome is recorded beside the
//! heuristic one and acknowledged, so the coordinator can finish. When the
//! two agree the decision is confirmed; when they differ the outcome is
//! **heuristic-mixed** (the textbook's heuristic hazard): this node applied
//! what the rest of the transaction did not. It is logged at error level,
//! listed (ListPrepared), and the money is accounted for: ReadBalances
//! reports, per account and in total, the heuristic excess (what this node
//! holds beyond what the coordinator's outcome gives it: the legs applied
//! against an abort, or minus the legs left unapplied against a commit),
//! so that an audit and the bench's checker can reconcile the ledger and
//! show the hazard instead of hiding it.

use super::{Core, Effects, TxnState};
use tandem::codec::{corrupt, Reader, Writer};
use tandem::domain::{clip_text, AccountId, Amount, TxnId, REASON_STORED_LEN_MAX};
use tandem::store::{Durability, Op};
use tandem::Error;

/// An outcome, as an operator or a coordinator decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    Commit,
    Abort,
}

/// An operator's heuristic decision on one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heuristic {
    /// What the operator applied (the record's state says the same).
    pub applied: Decided,
    pub reason: String,
    /// When, in the node's ms clock.
    pub at_ms: u64,
    /// The outcome the coordinator delivered afterwards, if it did.
    pub coordinator_said: Option<Decided>,
}

impl Heuristic {
    /// The coordinator delivered the other outcome.
    pub fn mixed(&self) -> bool {
        self.coordinator_said.is_some_and(|said| said != self.applied)
    }
}

fn decided_code(decided: Option<Decided>) -> u8 {
    match decided {
        None => 0,
        Some(Decided::Commit) => 2,
        Some(Decided::Abort) => 3,
    }
}

pub(crate) fn encode(w: &mut Writer, heuristic: Option<&Heuristic>) -> Result<(), Error> {
    let Some(heuristic) = heuristic else {
        w.byte(0);
        return Ok(());
    };
    w.byte(1);
    w.byte(decided_code(heuristic.coordinator_said));
    w.u64(heuristic.at_ms);
    w.text("a heuristic decision's reason", &heuristic.reason)
}

/// Reads the heuristic part of a transaction record whose state is `state`.
pub(crate) fn decode(r: &mut Reader, state: TxnState) -> Result<Option<Heuristic>, Error> {
    match r.byte()? {
        0 => return Ok(None),
        1 => {}
        other => return Err(corrupt(format!("heuristic flag {other}"))),
    }
    let coordinator_said = match r.byte()? {
        0 => None,
        2 => Some(Decided::Commit),
        3 => Some(Decided::Abort),
        other => return Err(corrupt(format!("a coordinator's outcome {other}"))),
    };
    let at_ms = r.u64()?;
    let reason = r.text()?;
    let applied = match state {
        TxnState::Committed => Decided::Commit,
        TxnState::Aborted => Decided::Abort,
        TxnState::Prepared => return Err(corrupt("a heuristic decision on a prepared transaction")),
    };
    Ok(Some(Heuristic { applied, reason, at_ms, coordinator_said }))
}

impl Core {
    /// An operator forces the prepared transaction `txn_id` to `decided`,
    /// with `reason` (1 to [`REASON_STORED_LEN_MAX`] bytes, clipped): the
    /// legs are applied (commit) or released (abort) and the decision is
    /// written with them, fsynced before the answer. Refused, changing
    /// nothing, for a transaction that is not prepared here.
    pub fn resolve_heuristically(
        &mut self,
        txn_id: &TxnId,
        decided: Decided,
        reason: &str,
        now_ms: u64,
    ) -> Result<Effects, Error> {
        if reason.trim().is_empty() {
            return Err(Error::InvalidInput("a heuristic decision needs a reason (who decided, and why)".into()));
        }
        let Some(txn) = self.txns.get(txn_id) else {
            return Err(Error::NotFound(format!(
                "{txn_id} is not held here (never prepared, or finished and collected)"
            )));
        };
        if txn.state != TxnState::Prepared {
            let state = match (&txn.heuristic, txn.state) {
                (Some(_), _) => "already decided heuristically",
                (None, TxnState::Committed) => "committed",
                _ => "aborted",
            };
            return Err(Error::FailedPrecondition(format!("{txn_id} is not in doubt here: it is {state}")));
        }
        let mut record = txn.clone();
        self.unindex_prepared(txn_id);
        record.state = match decided {
            Decided::Commit => TxnState::Committed,
            Decided::Abort => TxnState::Aborted,
        };
        record.heuristic = Some(Heuristic {
            applied: decided,
            reason: clip_text(reason, REASON_STORED_LEN_MAX),
            at_ms: now_ms,
            coordinator_said: None,
        });
        let mut ops = vec![Op::Put(super::txn_key(txn_id), super::encode_txn(&record)?)];
        match decided {
            Decided::Commit => ops.extend(self.post(&record.legs)),
            Decided::Abort => self.release(&record.legs),
        }
        tracing::warn!(txn = %txn_id, ?decided, reason = %record.heuristic.as_ref().map_or("", |h| h.reason.as_str()), "heuristic decision by an operator");
        self.txns.insert(txn_id.clone(), record);
        // Back in the indexes a heuristic decision is in: its idempotency
        // key stays held (the core's "Keys that outlive a lost log").
        self.index(txn_id, now_ms);
        Ok(Effects { ops, durability: Durability::Fsync })
    }

    /// The coordinator delivers `said` for a transaction an operator
    /// decided heuristically: recorded beside that decision (the first
    /// delivery only), never applied; acknowledged once the record is
    /// durable.
    pub(crate) fn coordinator_decided(
        &mut self,
        txn_id: &TxnId,
        said: Decided,
        _now_ms: u64,
    ) -> Result<Effects, Error> {
        let Some(txn) = self.txns.get(txn_id) else { return Ok(Effects::none()) };
        let Some(heuristic) = &txn.heuristic else { return Ok(Effects::none()) };
        if heuristic.coordinator_said.is_some() {
            return Ok(Effects::after_earlier_writes_are_durable());
        }
        let mut record = txn.clone();
        let heuristic = record.heuristic.as_mut().expect("checked above");
        heuristic.coordinator_said = Some(said);
        if heuristic.mixed() {
            tracing::error!(
                txn = %txn_id,
                operator_applied = ?heuristic.applied,
                coordinator_said = ?said,
                reason = %heuristic.reason,
                "HEURISTIC MIXED: the coordinator's outcome differs from the operator's heuristic decision; this node keeps the operator's and reports the difference (ReadBalances heuristic_excess, ListPrepared)"
            );
        } else {
            tracing::info!(txn = %txn_id, ?said, "the coordinator's outcome confirms the heuristic decision");
        }
        let ops = vec![Op::Put(super::txn_key(txn_id), super::encode_txn(&record)?)];
        self.txns.insert(txn_id.clone(), record);
        Ok(Effects { ops, durability: Durability::Lazy })
    }

    /// Every heuristic decision held, by transaction id.
    pub fn heuristic_decisions(&self) -> Vec<(&TxnId, &super::Txn)> {
        self.heuristic_ids.iter().filter_map(|id| self.txns.get_key_value(id)).collect()
    }

    /// What each account holds beyond what the coordinators' outcomes give
    /// it, from heuristic-mixed transactions (see the module essay); only
    /// accounts with a non-zero excess.
    pub fn heuristic_excess(&self) -> std::collections::BTreeMap<AccountId, i128> {
        let mut excess = std::collections::BTreeMap::new();
        for (_, txn) in self.heuristic_decisions() {
            let Some(heuristic) = &txn.heuristic else { continue };
            if !heuristic.mixed() {
                continue;
            }
            for leg in &txn.legs {
                let amount = leg.amount as i128;
                let signed: i128 = match heuristic.applied {
                    Decided::Commit => amount,
                    Decided::Abort => -amount,
                };
                *excess.entry(leg.account).or_insert(0) += signed;
            }
        }
        excess.retain(|_, amount: &mut i128| *amount != 0);
        excess
    }
}

/// The sum of an excess map, if it fits an `Amount`.
pub fn excess_total(excess: &std::collections::BTreeMap<AccountId, i128>) -> Option<Amount> {
    Amount::try_from(excess.values().sum::<i128>()).ok()
}
