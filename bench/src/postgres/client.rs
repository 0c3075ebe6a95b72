//! The baselines' client: a bounded pool of sessions (a session is one
//! connection to each server it needs), and one transfer as a local
//! transaction or as a two-phase commit over two servers.
//!
//! Every transfer is written the fastest way that stays safe, so that the
//! baseline is the one a careful engineer would deploy: statements prepared
//! once per connection, the statements of one step pipelined in one round
//! trip, and locks taken in one global order so that no two transfers can
//! deadlock (a deadlock across two servers is one PostgreSQL cannot even
//! see).
//!
//! - `postgres-local`: BEGIN and the two UPDATEs, in account order, in one
//!   round trip; then COMMIT (or ROLLBACK when the debit found too little
//!   money). Two round trips, one WAL flush.
//! - `postgres-2pc`: the bench is the coordinator. The server of the lower
//!   participant first: BEGIN and its UPDATE (one round trip; a debit short
//!   of funds ends the transfer there). Then at once its PREPARE TRANSACTION
//!   and, on the other server, BEGIN, the UPDATE and PREPARE TRANSACTION
//!   (one round trip, two WAL flushes in parallel). Then COMMIT PREPARED on
//!   both (one round trip, two flushes), or ROLLBACK PREPARED. Three round
//!   trips, two flushes in sequence. The client hears COMMITTED when both
//!   COMMIT PREPAREDs are done.
//!
//! What this coordinator lacks, and tandem's has: a durable decision log.
//! The decision lives in the bench's memory, so a crash of the bench
//! between two COMMIT PREPAREDs would leave the other server's transaction
//! in doubt with no record of the outcome. The baseline is therefore
//! cheaper than a real PostgreSQL 2PC deployment, which must log its
//! decisions somewhere: a floor for PostgreSQL, not its full price.
//!
//! Every wait is bounded by the server: `lock_timeout` and
//! `statement_timeout` are the scenario's `call_timeout_ms`, so a transfer
//! stuck behind a lock ends as an abort with PostgreSQL's message.

use super::server;
use crate::scenario::Protocol;
use crate::workload::{OpOutcome, Transfers};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::Statement;

/// Takes `amount` ($1) from account $2 if it holds that much: 0 rows means
/// too little money (the row is left alone).
const DEBIT: &str = "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1";
const CREDIT: &str = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";

/// One connection to one server, with its prepared statements.
struct Conn {
    client: tokio_postgres::Client,
    debit: Statement,
    credit: Statement,
}

impl Conn {
    async fn open(port: u16, call_timeout_ms: u64) -> Result<Conn, tokio_postgres::Error> {
        let client = server::connect(port).await?;
        client
            .batch_execute(&format!("SET lock_timeout = {call_timeout_ms}; SET statement_timeout = {call_timeout_ms}"))
            .await?;
        let debit = client.prepare(DEBIT).await?;
        let credit = client.prepare(CREDIT).await?;
        Ok(Conn { client, debit, credit })
    }

    /// The UPDATE of one leg: the debit of `account`, or its credit.
    async fn update(&self, debit: bool, account: u64, amount: i64) -> Result<u64, tokio_postgres::Error> {
        let id = i64::try_from(account).expect("account ids fit in bigint (validated)");
        let statement = if debit { &self.debit } else { &self.credit };
        self.client.execute(statement, &[&amount, &id]).await
    }
}

/// One connection per server the protocol uses, opened on first use and
/// opened again after a failure left it in an unknown state.
struct Session {
    conns: Vec<Option<Conn>>,
}

/// What a failed statement said, short.
fn said(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// A transfer's result, and whether its session's connections are still in
/// a known state (no transaction open, nothing half sent).
struct Done {
    outcome: OpOutcome,
    detail: String,
    clean: bool,
}

impl Done {
    fn clean(outcome: OpOutcome, detail: impl Into<String>) -> Done {
        Done { outcome, detail: detail.into(), clean: true }
    }
}

/// Shared by every client of one baseline run.
struct Pool {
    protocol: Protocol,
    /// One server per participant for `postgres-2pc`; one for
    /// `postgres-local`.
    ports: Vec<u16>,
    accounts_per_participant: u64,
    call_timeout_ms: u64,
    idle: Mutex<Vec<Session>>,
    /// One permit per session: a transfer waits here for a free one (in an
    /// open loop, that wait counts in its latency).
    permits: tokio::sync::Semaphore,
    /// Transactions decided COMMIT whose COMMIT PREPARED did not go through
    /// on a server (server index, gid): finished after the run. At most one
    /// entry per transfer.
    unfinished_commits: Mutex<Vec<(usize, String)>>,
}

/// A handle on the pool: what each client of the workload holds.
#[derive(Clone)]
pub struct PgClient(Arc<Pool>);

impl PgClient {
    /// A pool of `sessions` sessions over the servers at `ports` (one per
    /// participant for `postgres-2pc`, one for `postgres-local`); their
    /// connections open on first use, or with [`PgClient::connect_all`].
    pub fn new(
        protocol: Protocol,
        ports: Vec<u16>,
        accounts_per_participant: u64,
        call_timeout_ms: u64,
        sessions: usize,
    ) -> PgClient {
        assert!(protocol.is_baseline() && sessions > 0 && !ports.is_empty());
        let idle = (0..sessions).map(|_| Session { conns: (0..ports.len()).map(|_| None).collect() }).collect();
        PgClient(Arc::new(Pool {
            protocol,
            ports,
            accounts_per_participant,
            call_timeout_ms,
            idle: Mutex::new(idle),
            permits: tokio::sync::Semaphore::new(sessions),
            unfinished_commits: Mutex::new(Vec::new()),
        }))
    }

    /// Opens every session's connections now, so that the measured run does
    /// not pay for them.
    pub async fn connect_all(&self) -> Result<(), String> {
        let mut sessions = std::mem::take(&mut *self.0.idle.lock().unwrap());
        let mut result = Ok(());
        for session in &mut sessions {
            for server in 0..self.0.ports.len() {
                if let Err(error) = self.0.connection(session, server).await {
                    result = Err(error);
                }
            }
        }
        self.0.idle.lock().unwrap().extend(sessions);
        result
    }

    /// Decided commits whose COMMIT PREPARED is still owed somewhere.
    pub fn unfinished_commits(&self) -> Vec<(usize, String)> {
        self.0.unfinished_commits.lock().unwrap().clone()
    }
}

/// Gives a session back to the pool, also when the transfer's future is
/// dropped halfway: then its connections are in an unknown state and are
/// closed (an open transaction rolls back with its connection).
struct Lease<'a> {
    pool: &'a Pool,
    session: Option<Session>,
    clean: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(mut session) = self.session.take() {
            if !self.clean {
                session.conns.iter_mut().for_each(|c| *c = None);
            }
            self.pool.idle.lock().unwrap().push(session);
        }
    }
}

impl Pool {
    async fn connection<'s>(&self, session: &'s mut Session, server: usize) -> Result<&'s Conn, String> {
        let slot = &mut session.conns[server];
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            let conn = Conn::open(self.ports[server], self.call_timeout_ms)
                .await
                .map_err(|e| format!("cannot connect to PostgreSQL server {}: {}", server + 1, said(&e)))?;
            *slot = Some(conn);
        }
        Ok(slot.as_ref().expect("just opened"))
    }

    fn owner(&self, account: u64) -> usize {
        (account / self.accounts_per_participant) as usize
    }

    async fn transfer(&self, from: u64, to: u64, amount: i64, gid: &str) -> (OpOutcome, String, String) {
        let permit = self.permits.acquire().await.expect("the pool's semaphore is never closed");
        let session = self.idle.lock().unwrap().pop().expect("a session for every permit");
        let mut lease = Lease { pool: self, session: Some(session), clean: false };
        let session = lease.session.as_mut().expect("leased");
        let done = match self.protocol {
            Protocol::PostgresLocal => match self.connection(session, 0).await {
                Ok(conn) => local(conn, from, to, amount).await,
                Err(error) => Done::clean(OpOutcome::AbortedOther, error),
            },
            Protocol::PostgresTwoPhase => self.two_phase(session, from, to, amount, gid).await,
            other => unreachable!("{other} is not a PostgreSQL baseline"),
        };
        lease.clean = done.clean;
        drop(lease);
        drop(permit);
        (done.outcome, gid.to_string(), done.detail)
    }

    async fn two_phase(&self, session: &mut Session, from: u64, to: u64, amount: i64, gid: &str) -> Done {
        let (source, target) = (self.owner(from), self.owner(to));
        assert_ne!(source, target, "postgres-2pc: every transfer crosses two servers ({from} -> {to})");
        // Lock order: the lower server first, everywhere.
        let (low, high) = (source.min(target), source.max(target));
        for server in [low, high] {
            if let Err(error) = self.connection(session, server).await {
                return Done::clean(OpOutcome::AbortedOther, error);
            }
        }
        let (low_conn, high_conn) = (
            session.conns[low].as_ref().expect("connected above"),
            session.conns[high].as_ref().expect("connected above"),
        );
        let leg = |server: usize| if server == source { (true, from) } else { (false, to) };
        let ((low_debit, low_account), (high_debit, high_account)) = (leg(low), leg(high));
        let prepare = format!("PREPARE TRANSACTION '{gid}'");

        // Round trip 1: the lower server's leg.
        let (begin, updated) = tokio::join!(
            biased;
            low_conn.client.batch_execute("BEGIN"),
            low_conn.update(low_debit, low_account, amount),
        );
        let refusal = match (&begin, &updated) {
            (Ok(()), Ok(1)) => None,
            (Ok(()), Ok(0)) if low_debit => {
                Some((OpOutcome::AbortedInsufficientFunds, format!("insufficient funds on account {from}")))
            }
            (Ok(()), Ok(n)) => Some((OpOutcome::AbortedOther, format!("account {low_account}: {n} rows updated"))),
            (Err(e), Ok(_)) => {
                // The UPDATE ran outside a transaction: it may have committed.
                return Done {
                    outcome: OpOutcome::Unknown,
                    detail: format!("BEGIN failed: {}", said(e)),
                    clean: false,
                };
            }
            (_, Err(e)) => Some((OpOutcome::AbortedOther, format!("server {}: {}", low + 1, said(e)))),
        };
        if let Some((outcome, detail)) = refusal {
            let clean = low_conn.client.batch_execute("ROLLBACK").await.is_ok();
            return Done { outcome, detail, clean };
        }

        // Round trip 2: prepare the lower leg, and run and prepare the
        // higher one (its UPDATE waits for no answer: a debit short of funds
        // prepares nothing useful and is rolled back below).
        let (low_prepared, (high_begin, high_updated, high_prepared)) = tokio::join!(
            biased;
            low_conn.client.batch_execute(&prepare),
            async {
                tokio::join!(
                    biased;
                    high_conn.client.batch_execute("BEGIN"),
                    high_conn.update(high_debit, high_account, amount),
                    high_conn.client.batch_execute(&prepare),
                )
            },
        );
        if high_begin.is_err() && high_updated.is_ok() {
            // As above: an UPDATE outside a transaction may have committed.
            let detail = format!("BEGIN failed on server {}: the update ran alone", high + 1);
            return Done { outcome: OpOutcome::Unknown, detail, clean: false };
        }
        let commit =
            low_prepared.is_ok() && high_begin.is_ok() && matches!(high_updated, Ok(1)) && high_prepared.is_ok();
        if !commit {
            let (outcome, detail) = match (&low_prepared, &high_updated, &high_prepared) {
                (_, Ok(0), _) if high_debit => {
                    (OpOutcome::AbortedInsufficientFunds, format!("insufficient funds on account {from}"))
                }
                (Err(e), _, _) => (OpOutcome::AbortedOther, format!("server {}: PREPARE: {}", low + 1, said(e))),
                (_, Err(e), _) => (OpOutcome::AbortedOther, format!("server {}: {}", high + 1, said(e))),
                (_, _, Err(e)) => (OpOutcome::AbortedOther, format!("server {}: PREPARE: {}", high + 1, said(e))),
                (_, Ok(n), _) => (OpOutcome::AbortedOther, format!("account {high_account}: {n} rows updated")),
            };
            // Presumed abort: roll back whatever may be prepared. A failed
            // PREPARE has already rolled back; "does not exist" is fine.
            let rollback = format!("ROLLBACK PREPARED '{gid}'");
            let gone = |r: Result<(), tokio_postgres::Error>| match r {
                Ok(()) => true,
                Err(e) => e.code() == Some(&SqlState::UNDEFINED_OBJECT),
            };
            let (low_rolled, high_rolled) =
                tokio::join!(low_conn.client.batch_execute(&rollback), high_conn.client.batch_execute(&rollback),);
            // A leftover prepared transaction is rolled back after the run
            // (it has no commit decision); the connections start afresh.
            let clean = gone(low_rolled) && gone(high_rolled);
            return Done { outcome, detail, clean };
        }

        // The decision is COMMIT; round trip 3 delivers it.
        let commit = format!("COMMIT PREPARED '{gid}'");
        let (low_committed, high_committed) =
            tokio::join!(low_conn.client.batch_execute(&commit), high_conn.client.batch_execute(&commit));
        let mut detail = String::new();
        for (server, result) in [(low, low_committed), (high, high_committed)] {
            if let Err(error) = result {
                self.unfinished_commits.lock().unwrap().push((server, gid.to_string()));
                detail = format!(
                    "COMMIT PREPARED on server {} failed ({}); finished after the run",
                    server + 1,
                    said(&error)
                );
            }
        }
        let clean = detail.is_empty();
        Done { outcome: OpOutcome::Committed, detail, clean }
    }
}

/// One local transaction over one connection.
async fn local(conn: &Conn, from: u64, to: u64, amount: i64) -> Done {
    // Rows locked in account order: no two transfers wait for each other
    // in a cycle.
    let debit_first = from < to;
    let (first, second) = if debit_first { ((true, from), (false, to)) } else { ((false, to), (true, from)) };
    let (begin, first_rows, second_rows) = tokio::join!(
        biased;
        conn.client.batch_execute("BEGIN"),
        conn.update(first.0, first.1, amount),
        conn.update(second.0, second.1, amount),
    );
    if begin.is_err() && (first_rows.is_ok() || second_rows.is_ok()) {
        // An UPDATE ran outside a transaction: it may have committed alone.
        return Done { outcome: OpOutcome::Unknown, detail: "BEGIN failed; an update ran alone".into(), clean: false };
    }
    let (debited, credited) = if debit_first { (first_rows, second_rows) } else { (second_rows, first_rows) };
    let refusal = match (&begin, &debited, &credited) {
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Some((OpOutcome::AbortedOther, said(e))),
        (_, Ok(0), _) => Some((OpOutcome::AbortedInsufficientFunds, format!("insufficient funds on account {from}"))),
        (_, Ok(1), Ok(1)) => None,
        (_, Ok(d), Ok(c)) => Some((OpOutcome::AbortedOther, format!("{d} rows debited, {c} credited"))),
    };
    if let Some((outcome, detail)) = refusal {
        let clean = conn.client.batch_execute("ROLLBACK").await.is_ok();
        return Done { outcome, detail, clean };
    }
    match conn.client.batch_execute("COMMIT").await {
        Ok(()) => Done::clean(OpOutcome::Committed, ""),
        // The server answered no: nothing was committed.
        Err(e) if e.as_db_error().is_some() => Done::clean(OpOutcome::AbortedOther, format!("COMMIT: {}", said(&e))),
        // No answer: committed or not, nobody can tell (no idempotency
        // record; the check reports it).
        Err(e) => Done { outcome: OpOutcome::Unknown, detail: format!("COMMIT: {}", said(&e)), clean: false },
    }
}

impl Transfers for PgClient {
    fn send(
        &mut self,
        protocol: Protocol,
        from: u64,
        to: u64,
        amount: i64,
        key: &str,
        _timeout: Duration,
    ) -> impl std::future::Future<Output = (OpOutcome, String, String)> + Send {
        assert_eq!(protocol, self.0.protocol);
        // The key becomes a PREPARE TRANSACTION literal: it must need no
        // quoting (the workload makes it of letters, digits and dashes).
        assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && key.len() < 200, "{key:?}");
        let pool = self.0.clone();
        let key = key.to_string();
        async move { pool.transfer(from, to, amount, &key).await }
    }
}
