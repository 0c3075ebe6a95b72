//! The participant's driver: gRPC handlers, the store, and the background
//! tasks (decision queries for in-doubt transactions, garbage collection)
//! around the protocol core.
//!
//! Every call goes the same way: convert the request, lock the core, call
//! it, submit its effects to the store while still holding the lock (so the
//! store sees changes in the order memory did), unlock, wait until the
//! effects are durable, answer. Nothing is acknowledged before the store
//! says so; if the store fails, every later call fails too.

use crate::core::{Config, Core, Effects, Refusal, TxnState, Vote, OPS_PER_CALL_MAX};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::domain::{AccountId, Amount, Id, Leg, TxnId};
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_server::{Participant, ParticipantServer};
use tandem::store::Store;
use tandem::Error;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

/// Deadline of one decision query to a coordinator.
pub const QUERY_TIMEOUT_MS: u64 = 1_000;
/// How often the in-doubt transactions are looked at.
pub const RESOLVER_TICK_MS: u64 = 50;
/// Most decision queries started per tick.
pub const QUERIES_PER_TICK_MAX: usize = 256;
/// Most transactions listed by ListPrepared.
pub const LIST_PREPARED_MAX: usize = 1_000;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: Id,
    pub data_dir: PathBuf,
    /// Coordinator ids and the URLs where they answer decision queries.
    pub coordinators: Vec<(Id, String)>,
    pub in_doubt_after_ms: u64,
    pub finished_retention_ms: u64,
}

/// A running participant. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: Id,
    core: Mutex<Core>,
    store: Store,
    coordinators: BTreeMap<Id, CoordinatorClient<Channel>>,
    clock: Instant,
}

impl Node {
    /// Opens the store and recovers the core from it.
    pub fn open(config: NodeConfig) -> Result<Node, Error> {
        let store = Store::open(&config.data_dir)?;
        let mut records = store.scan_prefix(b"a/")?;
        records.extend(store.scan_prefix(b"t/")?);
        let mut coordinators = BTreeMap::new();
        for (id, url) in &config.coordinators {
            coordinators.insert(id.clone(), CoordinatorClient::new(tandem::server::channel(url)?));
        }
        let core_config = Config {
            node_id: config.node_id.clone(),
            coordinators: coordinators.keys().cloned().collect(),
            in_doubt_after_ms: config.in_doubt_after_ms,
            finished_retention_ms: config.finished_retention_ms,
        };
        let core = Core::recover(core_config, records, 0);
        info!(
            node = %config.node_id,
            accounts = core.accounts().len(),
            prepared = core.prepared_count(),
            "recovered from {}",
            config.data_dir.display()
        );
        Ok(Node {
            inner: Arc::new(Inner {
                node_id: config.node_id,
                core: Mutex::new(core),
                store,
                coordinators,
                clock: Instant::now(),
            }),
        })
    }

    fn now_ms(&self) -> u64 {
        self.inner.clock.elapsed().as_millis() as u64
    }

    /// Runs `step` on the core and waits until its effects are durable.
    async fn apply<T>(
        &self,
        ops_max: usize,
        step: impl FnOnce(&mut Core, u64) -> Result<(T, Effects), Error>,
    ) -> Result<T, Error> {
        let now_ms = self.now_ms();
        let (value, written) = {
            let mut core = self.inner.core.lock().expect("core lock poisoned");
            self.inner.store.check_room(ops_max)?;
            let (value, effects) = step(&mut core, now_ms)?;
            let written = self.inner.store.submit(effects.ops, effects.durability)?;
            (value, written)
        };
        written.await.unwrap_or_else(|_| Err(Error::Fatal("the writer thread stopped".into())))?;
        Ok(value)
    }

    pub async fn prepare(&self, txn: TxnId, coordinator: Id, legs: Vec<Leg>) -> Result<Vote, Error> {
        self.apply(OPS_PER_CALL_MAX, |core, now| core.prepare(txn, coordinator, legs, now)).await
    }

    pub async fn commit(&self, txn: &TxnId) -> Result<(), Error> {
        self.apply(OPS_PER_CALL_MAX, |core, now| Ok(((), core.commit(txn, now)?))).await
    }

    pub async fn abort(&self, txn: &TxnId) -> Result<(), Error> {
        self.apply(OPS_PER_CALL_MAX, |core, now| Ok(((), core.abort(txn, now)?))).await
    }

    /// Serves the participant, health and reflection services on `listener`
    /// until `shutdown` resolves, with the background tasks running; then
    /// stops taking calls, lets the store write what is queued, and returns.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<ParticipantServer<Node>>().await;
        let resolver = tokio::spawn(self.clone().resolve_in_doubt());
        let collector = tokio::spawn(self.clone().collect_garbage());
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let result = tandem::server::server_builder()
            .add_service(health_service)
            .add_service(tandem::server::reflection_service())
            .add_service(ParticipantServer::new(self.clone()).max_decoding_message_size(16 * 1024 * 1024))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        resolver.abort();
        collector.abort();
        self.inner.store.close();
        info!(node = %self.inner.node_id, "stopped");
        result.map_err(|e| Error::Unavailable(format!("the server failed: {e}")))
    }

    /// Asks the coordinators about transactions that stayed prepared too
    /// long, with backoff, and applies the decisions they give.
    async fn resolve_in_doubt(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(RESOLVER_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let due = {
                let now = self.now_ms();
                self.inner.core.lock().expect("core lock poisoned").due_queries(now, QUERIES_PER_TICK_MAX)
            };
            for (txn, coordinator) in due {
                let node = self.clone();
                tokio::spawn(async move { node.query_decision(txn, coordinator).await });
            }
        }
    }

    async fn query_decision(&self, txn: TxnId, coordinator: Id) {
        let Some(client) = self.inner.coordinators.get(&coordinator) else {
            warn!(%txn, %coordinator, "in doubt with a coordinator this node does not know");
            return;
        };
        let mut request = Request::new(pb::QueryDecisionRequest {
            txn_id: txn.to_string(),
            participant_id: self.inner.node_id.to_string(),
        });
        request.set_timeout(Duration::from_millis(QUERY_TIMEOUT_MS));
        let answer = client.clone().query_decision(request).await;
        let decision = match answer {
            Ok(response) => pb::Decision::try_from(response.into_inner().decision).unwrap_or(pb::Decision::Unspecified),
            Err(status) => {
                debug!(%txn, %coordinator, error = %status.message(), "decision query failed; will ask again");
                return;
            }
        };
        debug!(%txn, %coordinator, ?decision, "decision query answered");
        let applied = match decision {
            pb::Decision::Commit => self.commit(&txn).await,
            pb::Decision::Abort => self.abort(&txn).await,
            pb::Decision::Pending | pb::Decision::Unspecified => Ok(()),
        };
        match applied {
            Ok(()) if decision != pb::Decision::Pending => {
                info!(%txn, ?decision, "in-doubt transaction resolved by query")
            }
            Ok(()) => {}
            Err(error) => warn!(%txn, %error, "applying the queried decision failed"),
        }
    }

    async fn collect_garbage(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let result = self.apply(10_000, |core, now| Ok(((), core.collect_garbage(now)))).await;
            if let Err(error) = result {
                warn!(%error, "garbage collection failed");
            }
        }
    }
}

fn refusal_to_pb(refusal: Refusal) -> pb::Refusal {
    match refusal {
        Refusal::InsufficientFunds => pb::Refusal::InsufficientFunds,
        Refusal::UnknownAccount => pb::Refusal::UnknownAccount,
        Refusal::BalanceOverflow => pb::Refusal::BalanceOverflow,
        Refusal::AlreadyAborted => pb::Refusal::AlreadyAborted,
        Refusal::UnknownCoordinator => pb::Refusal::UnknownCoordinator,
        Refusal::ConflictingPrepare => pb::Refusal::ConflictingPrepare,
    }
}

fn balance_to_pb(account: AccountId, balance: &crate::core::Account) -> pb::Balance {
    pb::Balance {
        account,
        posted: balance.posted,
        reserved: balance.reserved,
        incoming: balance.incoming,
        available: balance.available(),
    }
}

#[tonic::async_trait]
impl Participant for Node {
    async fn prepare(&self, request: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
        let request = request.into_inner();
        let txn = Id::parse("txn_id", &request.txn_id)?;
        let coordinator = Id::parse("coordinator_id", &request.coordinator_id)?;
        let legs: Vec<Leg> = request.legs.iter().map(Leg::from).collect();
        debug!(%txn, %coordinator, ?legs, "prepare received");
        let vote = Node::prepare(self, txn.clone(), coordinator, legs).await?;
        debug!(%txn, ?vote, "prepare answered");
        Ok(Response::new(match vote {
            Vote::Yes => pb::PrepareResponse { vote: pb::Vote::Yes as i32, refusal: 0, reason: String::new() },
            Vote::No(refusal, reason) => {
                pb::PrepareResponse { vote: pb::Vote::No as i32, refusal: refusal_to_pb(refusal) as i32, reason }
            }
        }))
    }

    async fn commit(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
        let txn = Id::parse("txn_id", &request.into_inner().txn_id)?;
        Node::commit(self, &txn).await?;
        debug!(%txn, "commit acknowledged");
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn abort(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
        let txn = Id::parse("txn_id", &request.into_inner().txn_id)?;
        Node::abort(self, &txn).await?;
        debug!(%txn, "abort acknowledged");
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn open_accounts(
        &self,
        request: Request<pb::OpenAccountsRequest>,
    ) -> Result<Response<pb::OpenAccountsResponse>, Status> {
        let accounts: Vec<(AccountId, Amount)> =
            request.into_inner().accounts.iter().map(|a| (a.account, a.initial_balance)).collect();
        let count = accounts.len();
        self.apply(count, |core, _| Ok(((), core.open_accounts(&accounts)?))).await?;
        info!(count, "accounts opened");
        Ok(Response::new(pb::OpenAccountsResponse { opened: count as u32 }))
    }

    async fn get_balance(&self, request: Request<pb::GetBalanceRequest>) -> Result<Response<pb::Balance>, Status> {
        let account = request.into_inner().account;
        let balance = self.inner.core.lock().expect("core lock poisoned").account(account)?;
        Ok(Response::new(balance_to_pb(account, &balance)))
    }

    async fn read_balances(
        &self,
        request: Request<pb::ReadBalancesRequest>,
    ) -> Result<Response<pb::ReadBalancesResponse>, Status> {
        let include_accounts = request.into_inner().include_accounts;
        let core = self.inner.core.lock().expect("core lock poisoned");
        let mut response = pb::ReadBalancesResponse {
            participant_id: self.inner.node_id.to_string(),
            account_count: core.accounts().len() as u64,
            prepared_count: core.prepared_count() as u64,
            ..Default::default()
        };
        for (id, account) in core.accounts() {
            response.total_posted += account.posted;
            response.total_reserved += account.reserved;
            response.total_incoming += account.incoming;
            if include_accounts {
                response.accounts.push(balance_to_pb(*id, account));
            }
        }
        Ok(Response::new(response))
    }

    async fn list_prepared(
        &self,
        request: Request<pb::ListPreparedRequest>,
    ) -> Result<Response<pb::ListPreparedResponse>, Status> {
        let limit = match request.into_inner().limit as usize {
            0 => LIST_PREPARED_MAX,
            n => n.min(LIST_PREPARED_MAX),
        };
        let now = self.now_ms();
        let core = self.inner.core.lock().expect("core lock poisoned");
        let prepared = core.prepared();
        let total = prepared.len() as u64;
        let prepared = prepared
            .into_iter()
            .take(limit)
            .map(|(id, txn)| {
                debug_assert_eq!(txn.state, TxnState::Prepared);
                pb::PreparedTransfer {
                    txn_id: id.to_string(),
                    coordinator_id: txn.coordinator.to_string(),
                    legs: txn.legs.iter().copied().map(pb::Leg::from).collect(),
                    prepared_for_ms: now.saturating_sub(txn.prepared_at_ms),
                }
            })
            .collect();
        Ok(Response::new(pb::ListPreparedResponse { prepared, total }))
    }
}
