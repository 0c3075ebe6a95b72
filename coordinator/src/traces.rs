//! Each transaction's trace context, kept while its messages are sent.
//!
//! A transaction's work outlives the client's call that began it (COMMITs
//! are delivered after the client heard COMMITTED), and runs in tasks that
//! do not inherit the call's span, so the span context of the `transfer`
//! call is kept here by transaction id, and every later span of the
//! transaction (a log write, a message to a participant) is opened under
//! it (see `tandem::trace`).
//!
//! Bounded: at most [`TRACED_MAX`] transactions; past it the oldest entry
//! is dropped (that transaction's later spans are not made: a span opens
//! only under a sampled context, see `tandem::trace`),
//! never memory. An entry goes when its transaction ends (its end record),
//! or when it is the oldest and room is needed. Empty and never touched
//! when this process does not export traces.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tandem::domain::TxnId;
use tandem::trace::Context;
use tracing::Span;

/// Most transactions whose context is kept: several seconds of this
/// machine's fastest commit rate, far more than are in flight at once
/// (`--active-max`, 10,000 by default).
pub const TRACED_MAX: usize = 50_000;

#[derive(Default)]
pub(crate) struct TxnTraces {
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    contexts: HashMap<TxnId, Context>,
    /// Ids in the order they were kept; may hold ids already removed.
    order: VecDeque<TxnId>,
}

impl TxnTraces {
    /// Keeps `span`'s context as `txn`'s (nothing when not exporting).
    pub(crate) fn keep(&self, txn: &TxnId, span: &Span) {
        let Some(context) = tandem::trace::context(span) else { return };
        let mut kept = self.kept.lock().expect("traces lock poisoned");
        while kept.contexts.len() >= TRACED_MAX || kept.order.len() >= 2 * TRACED_MAX {
            let Some(oldest) = kept.order.pop_front() else { break };
            kept.contexts.remove(&oldest);
        }
        kept.contexts.insert(txn.clone(), context);
        kept.order.push_back(txn.clone());
    }

    /// A span `name` of `txn`, under its kept context (a disabled span when
    /// not exporting, or none is kept).
    pub(crate) fn span(&self, name: &str, txn: &TxnId) -> Span {
        if !tandem::trace::on() {
            return Span::none();
        }
        let context = self.kept.lock().expect("traces lock poisoned").contexts.get(txn).cloned();
        match context {
            Some(context) => tandem::trace::child(name, txn.as_str(), &context),
            None => tandem::trace::remote_child(name, txn.as_str(), ""),
        }
    }

    /// `txn` ended: its context is no longer needed.
    pub(crate) fn forget(&self, txn: &TxnId) {
        if !tandem::trace::on() {
            return;
        }
        self.kept.lock().expect("traces lock poisoned").contexts.remove(txn);
    }
}
