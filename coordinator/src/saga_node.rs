//! The orchestrator's driver: runs orchestrated sagas by executing the
//! [`SagaCore`](crate::saga::SagaCore)'s actions over gRPC and the saga log,
//! and feeding step results back into it. Transient step failures are
//! retried here, with capped exponential backoff, up to the step budget.

use crate::core::{AbortReason, Outcome};
use crate::log;
use crate::node::{abort_reason_from_pb, Node, QueuedStep, Waiter};
use crate::saga::{Recovery, Retry, SagaAction, SagaId, SagaRecord, SagaSpec, Stage, StepKind, StepPhase, StepResult};
use std::time::Duration;
use tandem::domain::{clip_text, AccountId, Amount, Id, REASON_LEN_MAX};
use tandem::pb;
use tandem::store::Durability;
use tandem::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument, Span};

/// The first wait before a failed saga step is retried; it doubles up to the
/// max, kept short so that sagas resume soon after a participant is back
/// (at 1 s, the orchestrated saga took half a second to recover in the
/// default scenario; at 200 ms, 50 ms).
pub const STEP_RETRY_INITIAL_MS: u64 = 10;
pub const STEP_RETRY_MAX_MS: u64 = 200;

impl Node {
    pub(crate) fn saga_core(&self) -> std::sync::MutexGuard<'_, crate::saga::SagaCore> {
        self.inner.sagas.lock().expect("saga lock poisoned")
    }

    /// Runs `event` on the saga core and carries out its actions. The
    /// stage records it asks for are submitted to the log under the core's
    /// lock, so that a watermark computed afterwards is written behind them
    /// (see the saga core's essay); the rest is carried out after.
    pub(crate) fn saga_event(&self, event: impl FnOnce(&mut crate::saga::SagaCore) -> Vec<SagaAction>) {
        let rest = {
            let mut core = self.saga_core();
            let actions = event(&mut core);
            let mut rest = Vec::with_capacity(actions.len());
            for action in actions {
                match action {
                    SagaAction::Persist { saga, record, fsync: false } => {
                        debug!(%saga, stage = ?record.stage, "log saga stage");
                        // Ordered behind the earlier writes of this saga; a
                        // lost stage is redone after a restart.
                        let submitted = log::encode_saga(&record).and_then(|value| {
                            let ops = vec![tandem::store::Op::Put(log::key(log::SAGA_PREFIX, &saga), value)];
                            self.inner.store.submit(ops, Durability::Buffered)
                        });
                        if let Err(error) = submitted {
                            warn!(%saga, %error, "could not log a saga stage");
                        }
                    }
                    other => rest.push(other),
                }
            }
            rest
        };
        self.execute_saga(rest);
    }

    /// Runs one orchestrated transfer saga to a terminal outcome.
    pub async fn run_saga(
        &self,
        from: AccountId,
        to: AccountId,
        amount: Amount,
        recovery: Recovery,
        key: Option<Id>,
    ) -> Result<(SagaId, Outcome), Error> {
        let legs = tandem::domain::transfer_legs(from, to, amount)?;
        self.refuse_if_store_failed()?;
        let spec = SagaSpec {
            from,
            to,
            amount,
            from_participant: self.inner.directory.owner(from)?.clone(),
            to_participant: self.inner.directory.owner(to)?.clone(),
            recovery,
            idempotency_key: key.clone(),
            fingerprint: log::fingerprint(log::Asked::Saga(recovery), &legs),
            position: 0,
        };
        let (saga, outcome, actions) = {
            let _serialised = key.as_ref().map(|_| self.inner.keys.lock().expect("keys lock poisoned"));
            if let Some(key) = &key {
                if let Some(earlier) = self.keyed_result(key)? {
                    log::same_request(key, &earlier, log::Asked::Saga(recovery), &legs)?;
                    return Ok((earlier.txn, earlier.outcome));
                }
                let in_2pc = self.inner.core.lock().expect("core lock poisoned").key_in_flight(key).cloned();
                if let Some(txn) = in_2pc {
                    return Err(Error::Conflict(format!(
                        "a transaction with idempotency key {key} is in flight ({txn}); retry to get its outcome"
                    )));
                }
            }
            // The id is handed out under the lock that registers it.
            let mut core = self.saga_core();
            let (saga, position) = self.next_txn_id()?;
            let spec = SagaSpec { position, ..spec };
            let (reply, outcome) = oneshot::channel();
            self.inner
                .waiters
                .lock()
                .expect("waiters lock poisoned")
                .insert(saga.clone(), Waiter { reply, fingerprint: spec.fingerprint });
            if tandem::trace::on() {
                // The `transfer` span of the call: the parent of its steps.
                let span = Span::current();
                span.record("txn_id", saga.as_str());
                self.inner.traces.keep(&saga, &span);
            }
            match core.begin(saga.clone(), spec) {
                Ok(actions) => (saga, outcome, actions),
                Err(error) => {
                    self.inner.waiters.lock().expect("waiters lock poisoned").remove(&saga);
                    return Err(error);
                }
            }
        };
        self.execute_saga(actions);
        let outcome =
            outcome.await.unwrap_or_else(|_| Err(Error::Unavailable("the coordinator is stopping".into())))?;
        Ok((saga, outcome))
    }

    /// Carries out the saga core's actions; step results come back into it.
    pub(crate) fn execute_saga(&self, actions: Vec<SagaAction>) {
        for action in actions {
            debug!(?action, "execute saga action");
            match action {
                SagaAction::Persist { saga, record, fsync: true } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        let written = match log::encode_saga(&record) {
                            Ok(value) => {
                                let ops = vec![tandem::store::Op::Put(log::key(log::SAGA_PREFIX, &saga), value)];
                                node.inner.store.write(ops).await
                            }
                            Err(error) => Err(error),
                        };
                        match written {
                            Ok(()) => node.saga_event(|core| core.on_started(&saga)),
                            Err(error) => node.reply(&saga, Err(error)),
                        }
                    });
                }
                SagaAction::Persist { saga, record, fsync: false } => {
                    // Only recovery hands these here (every other stage
                    // record is submitted under the lock, `saga_event`).
                    let submitted = log::encode_saga(&record).and_then(|value| {
                        let ops = vec![tandem::store::Op::Put(log::key(log::SAGA_PREFIX, &saga), value)];
                        self.inner.store.submit(ops, Durability::Buffered)
                    });
                    if let Err(error) = submitted {
                        warn!(%saga, %error, "could not log a saga stage");
                    }
                }
                SagaAction::Step { saga, position, participant, kind, phase, account, amount, retry } => {
                    let node = self.clone();
                    let span = if tandem::trace::on() {
                        self.inner.traces.span(tandem::trace::saga_step_name(pb_kind(kind), pb_phase(phase)), &saga)
                    } else {
                        Span::none()
                    };
                    tokio::spawn(
                        async move {
                            let result = node
                                .send_step(&saga, position, &participant, kind, phase, account, amount, retry)
                                .await;
                            node.saga_event(|core| core.on_step(&saga, kind, phase, result));
                        }
                        .instrument(span),
                    );
                }
                SagaAction::Finish { saga, spec, outcome } => {
                    let state = match &outcome {
                        Outcome::Committed => "completed",
                        Outcome::Compensated(..) => "compensated",
                        Outcome::Aborted(..) => "aborted",
                        Outcome::DeadLettered(..) => "dead_lettered",
                    };
                    metrics::counter!("tandem_sagas_finished_total", "state" => state).increment(1);
                    self.inner.saga_deadlines.lock().expect("deadline lock poisoned").remove(&saga);
                    let written =
                        self.write_terminal_record(log::saga_finish_ops(&saga, &spec, &outcome, self.expires_ms()));
                    let node = self.clone();
                    tokio::spawn(async move {
                        let result = written.await;
                        node.inner.traces.forget(&saga);
                        if result.is_ok() {
                            // It no longer holds any saga watermark.
                            node.saga_core().on_finish_written(&saga);
                            // Its participants may drop its barriers now.
                            node.forget_saga_later(&spec.from_participant, &saga);
                            if spec.to_participant != spec.from_participant {
                                node.forget_saga_later(&spec.to_participant, &saga);
                            }
                        }
                        node.reply(&saga, result.map(|()| outcome));
                    });
                }
                SagaAction::DeadLetter { saga, record, outcome } => {
                    metrics::counter!("tandem_sagas_finished_total", "state" => "dead_lettered").increment(1);
                    self.inner.saga_deadlines.lock().expect("deadline lock poisoned").remove(&saga);
                    info!(%saga, reason = %record.reason, parked = record.parked, "saga dead-lettered");
                    let written = self.write_terminal_record(log::dead_letter_ops(&saga, &record, &outcome));
                    let node = self.clone();
                    tokio::spawn(async move {
                        let result = written.await;
                        node.reply(&saga, result.map(|()| outcome));
                    });
                }
                SagaAction::ResolveReply { saga, result } => {
                    let waiter = self.inner.resolve_waiters.lock().expect("resolve lock poisoned").remove(&saga);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(result);
                    }
                }
            }
        }
    }

    /// Queues a saga's terminal record now, so that it lands in the order
    /// the core decided (a dead letter before an operator's resolution of
    /// it), and resolves once it is written. The saga has left the core, so
    /// this record is all that keeps its idempotency key's outcome: a full
    /// queue is retried until it takes the write; only a failed store (which
    /// acknowledges nothing more) gives up.
    fn write_terminal_record(
        &self,
        ops: Result<Vec<tandem::store::Op>, Error>,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + 'static {
        let store = self.inner.store.clone();
        let mut submitted =
            ops.as_ref().map_err(Clone::clone).and_then(|ops| store.submit(ops.clone(), Durability::Buffered));
        let ops = ops.unwrap_or_default();
        async move {
            loop {
                match submitted {
                    Ok(wait) => {
                        return wait.await.unwrap_or_else(|_| Err(Error::Fatal("the writer stopped".into())));
                    }
                    Err(Error::Busy(_)) => {
                        tokio::time::sleep(Duration::from_millis(STEP_RETRY_INITIAL_MS)).await;
                        submitted = store.submit(ops.clone(), Durability::Buffered);
                    }
                    Err(error) => return Err(error),
                }
            }
        }
    }

    /// One saga step call through `participant`'s step queue (batched with
    /// the others waiting there): its answer, the error status it failed
    /// with, or `Err(())` when no answer came within `timeout`.
    async fn call_step(
        &self,
        participant: &Id,
        step: pb::SagaStepRequest,
        timeout: Duration,
    ) -> Result<Result<pb::SagaStepResponse, tonic::Status>, ()> {
        let (reply, answer) = oneshot::channel();
        self.outbound(participant).steps.push(QueuedStep { step, deadline: Instant::now() + timeout, reply });
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => Ok(result),
            _ => Err(()),
        }
    }

    /// Sends one saga step, retrying transient failures by `retry`.
    #[allow(clippy::too_many_arguments)]
    async fn send_step(
        &self,
        saga: &SagaId,
        position: u64,
        participant: &Id,
        kind: StepKind,
        phase: StepPhase,
        account: AccountId,
        amount: Amount,
        retry: Retry,
    ) -> StepResult {
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let deadline = *self
            .inner
            .saga_deadlines
            .lock()
            .expect("deadline lock poisoned")
            .entry(saga.clone())
            .or_insert_with(|| Instant::now() + Duration::from_millis(self.inner.config.saga_deadline_ms));
        let mut backoff_ms = STEP_RETRY_INITIAL_MS;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let step = pb::SagaStepRequest {
                saga_id: saga.to_string(),
                kind: pb_kind(kind),
                phase: pb_phase(phase),
                account,
                amount,
                coordinator_id: self.inner.config.node_id.to_string(),
                coordinator_incarnation: self.inner.incarnation,
                position,
                // Stamped when the batch goes out (`send_steps`).
                low_watermark: 0,
                // The step's span (see `execute_saga`).
                trace_parent: tandem::trace::traceparent(&Span::current()),
            };
            let error = match self.call_step(participant, step, timeout).await {
                Ok(Ok(response)) => return step_result_from_pb(participant, response),
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition
                    ) =>
                {
                    return StepResult::Refused(
                        AbortReason::Refused,
                        format!("{participant}: {}", clip_text(status.message(), REASON_LEN_MAX)),
                    );
                }
                Ok(Err(status)) => {
                    format!("{participant}: {:?} {}", status.code(), clip_text(status.message(), REASON_LEN_MAX))
                }
                Err(_) => format!("{participant} did not answer within {} ms", timeout.as_millis()),
            };
            let spent = match retry {
                Retry::Budgeted | Retry::Attempts if attempts >= self.inner.config.saga_step_attempts => {
                    Some(format!("{error} ({attempts} attempts)"))
                }
                Retry::Budgeted | Retry::UntilDeadline if Instant::now() >= deadline => Some(format!(
                    "{error} ({attempts} attempts; the saga deadline of {} ms passed)",
                    self.inner.config.saga_deadline_ms
                )),
                _ => None,
            };
            if let Some(why) = spent {
                warn!(%saga, ?kind, ?phase, attempts, %error, "saga step budget spent");
                return StepResult::Exhausted(why);
            }
            debug!(%saga, ?kind, ?phase, attempts, %error, "saga step failed; retrying");
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(STEP_RETRY_MAX_MS);
        }
    }

    pub(crate) fn saga_status(&self, saga: &SagaId, record: &SagaRecord) -> pb::SagaStatus {
        let state = match record.stage {
            Stage::DeadLettered | Stage::Releasing => pb::SagaState::DeadLettered,
            _ => pb::SagaState::Running,
        };
        pb::SagaStatus {
            saga_id: saga.to_string(),
            state: state as i32,
            from_account: record.spec.from,
            to_account: record.spec.to,
            amount: record.spec.amount,
            reason: record.reason.clone(),
            suspense_participant: record.spec.from_participant.to_string(),
            parked: record.parked > 0,
        }
    }

    pub(crate) fn saga_status_by_id(&self, saga: &SagaId) -> Option<pb::SagaStatus> {
        let record = self.saga_core().get(saga).cloned()?;
        Some(self.saga_status(saga, &record))
    }

    /// The first `limit` dead letters by saga id, and how many there are.
    pub(crate) fn dead_letters(&self, limit: usize) -> (Vec<pb::SagaStatus>, u64) {
        let list = self.saga_core().dead_letters();
        let listed = list.iter().take(limit).map(|(saga, record)| self.saga_status(saga, record)).collect();
        (listed, list.len() as u64)
    }

    /// An operator releases a dead letter's parked money to `to_account`
    /// (0: the saga's source account); `decision` says who and why
    /// ([`tandem::trust::operator_decision`]), kept in the end record.
    pub(crate) async fn resolve_dead_letter(
        &self,
        saga: &SagaId,
        to_account: AccountId,
        decision: String,
    ) -> Result<pb::SagaStatus, Error> {
        let (record, actions) = {
            let mut core = self.saga_core();
            // Its step is sent after the lock is released; no stage record.
            let record = core.get(saga).cloned().ok_or_else(|| Error::NotFound(format!("no dead letter {saga}")))?;
            let to_account = if to_account == 0 { record.spec.from } else { to_account };
            if self.inner.directory.owner(to_account)? != &record.spec.from_participant {
                return Err(Error::InvalidInput(format!(
                    "account {to_account} is not on {}, whose suspense account holds the money",
                    record.spec.from_participant
                )));
            }
            if record.parked == 0 && record.stage == Stage::DeadLettered {
                return Err(Error::InvalidInput(format!("{saga} has nothing parked")));
            }
            (record, core.resolve(saga, to_account, decision.clone())?)
        };
        let (reply, answer) = oneshot::channel();
        self.inner.resolve_waiters.lock().expect("resolve lock poisoned").insert(saga.clone(), reply);
        // Each release the operator asks for gets a full deadline.
        self.inner.saga_deadlines.lock().expect("deadline lock poisoned").remove(saga);
        self.execute_saga(actions);
        answer.await.unwrap_or_else(|_| Err(Error::Unavailable("the coordinator is stopping".into())))?;
        info!(%saga, to_account, %decision, "dead letter resolved");
        let mut status = self.saga_status(saga, &record);
        status.state = pb::SagaState::Resolved as i32;
        status.parked = false;
        // The same words as its end record.
        status.reason = crate::saga::resolved_reason(&record.reason, &decision);
        Ok(status)
    }
}

fn pb_kind(kind: StepKind) -> i32 {
    let kind = match kind {
        StepKind::Debit => pb::StepKind::Debit,
        StepKind::Credit => pb::StepKind::Credit,
        StepKind::Release => pb::StepKind::Release,
    };
    kind as i32
}

fn pb_phase(phase: StepPhase) -> i32 {
    let phase = match phase {
        StepPhase::Action => pb::StepPhase::Action,
        StepPhase::Compensation => pb::StepPhase::Compensation,
        StepPhase::CompensateToSuspense => pb::StepPhase::CompensateToSuspense,
    };
    phase as i32
}

/// A participant's answer to a saga step, as the core takes it (its reason
/// clipped to `REASON_LEN_MAX`).
fn step_result_from_pb(participant: &Id, response: pb::SagaStepResponse) -> StepResult {
    match pb::StepOutcome::try_from(response.outcome) {
        Ok(pb::StepOutcome::Applied) => StepResult::Applied,
        Ok(pb::StepOutcome::EmptyCompensation) => StepResult::Empty,
        Ok(pb::StepOutcome::HangingIgnored) => StepResult::Hanging,
        _ => StepResult::Refused(
            abort_reason_from_pb(response.refusal),
            format!("{participant}: {}", clip_text(&response.reason, REASON_LEN_MAX)),
        ),
    }
}
