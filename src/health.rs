//! A node's health, said two ways that never disagree: the standard
//! `grpc.health.v1` service (what load balancers, `bench` and `tandemctl`
//! poll: SERVING or not) and GetHealth ([`Health::to_pb`]), which also says
//! why in words.
//!
//! Liveness is `""` and the node's own service name (`tandem.v1.Coordinator`,
//! `tandem.v1.Participant`): the node takes and acknowledges work.
//! Readiness, where a node has one distinct from liveness (the
//! coordinator's `tandem.v1.Coordinator.ready`: it reaches its
//! participants and has recovered), is a service name of its own; a node
//! without one is ready when it is live. Both are set only here, each with
//! its reason, and the reason is also what the node logs.

use crate::domain::clip_text;
use crate::pb;
use std::sync::Mutex;
use std::time::Instant;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// Longest reason GetHealth answers with (longer ones are clipped).
pub const HEALTH_REASON_LEN_MAX: usize = 4_096;

/// One node's liveness and readiness, with their reasons.
pub struct Health {
    reporter: HealthReporter,
    /// The node's own service name (liveness, with `""`).
    service: &'static str,
    /// The readiness service name, if the node has one.
    ready_service: Option<&'static str>,
    state: Mutex<State>,
}

struct State {
    live: Result<(), String>,
    ready: Result<(), String>,
    /// When the node last turned from healthy to not, or back.
    since: Instant,
}

impl State {
    fn healthy(&self) -> bool {
        self.live.is_ok() && self.ready.is_ok()
    }
}

fn serving(status: &Result<(), String>) -> ServingStatus {
    if status.is_ok() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

impl Health {
    /// A node serving `service`, live, and not ready (`not_ready_yet`)
    /// until [`Health::set_ready`] says so when it has `ready_service`;
    /// and the `grpc.health.v1` service to serve beside it.
    pub async fn new(
        service: &'static str,
        ready_service: Option<&'static str>,
        not_ready_yet: &str,
    ) -> (Health, HealthServer<HealthService>) {
        let reporter = HealthReporter::new();
        let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let ready = match ready_service {
            Some(_) => Err(not_ready_yet.to_string()),
            None => Ok(()),
        };
        let health = Health {
            reporter,
            service,
            ready_service,
            state: Mutex::new(State { live: Ok(()), ready, since: Instant::now() }),
        };
        health.reporter.set_service_status("", ServingStatus::Serving).await;
        health.reporter.set_service_status(service, ServingStatus::Serving).await;
        if let Some(ready_service) = ready_service {
            health.reporter.set_service_status(ready_service, ServingStatus::NotServing).await;
        }
        (health, server)
    }

    /// The reporter, for services of the node's own (the coordinator's
    /// per-participant reachability).
    pub fn reporter(&self) -> &HealthReporter {
        &self.reporter
    }

    /// Sets liveness: `Err(reason)` is NOT_SERVING on `""` and the node's
    /// service. A node without a readiness service is ready when live.
    pub async fn set_live(&self, live: Result<(), String>) {
        let changed = self.update(|state| {
            let changed = state.live.is_ok() != live.is_ok();
            state.live = live.clone();
            changed
        });
        if changed {
            let status = serving(&live);
            self.reporter.set_service_status("", status).await;
            self.reporter.set_service_status(self.service, status).await;
        }
    }

    /// Sets readiness: `Err(reason)` is NOT_SERVING on the readiness
    /// service. Nothing is reported for a node without one.
    pub async fn set_ready(&self, ready: Result<(), String>) {
        let Some(ready_service) = self.ready_service else { return };
        let changed = self.update(|state| {
            let changed = state.ready.is_ok() != ready.is_ok();
            state.ready = ready.clone();
            changed
        });
        if changed {
            self.reporter.set_service_status(ready_service, serving(&ready)).await;
        }
    }

    /// Applies `change` under the lock (never held across an await) and
    /// restarts the clock when the node turned healthy or unhealthy.
    fn update(&self, change: impl FnOnce(&mut State) -> bool) -> bool {
        let mut state = self.state.lock().expect("health lock poisoned");
        let was_healthy = state.healthy();
        let changed = change(&mut state);
        if state.healthy() != was_healthy {
            state.since = Instant::now();
        }
        changed
    }

    /// Whether the node is live.
    pub fn is_live(&self) -> bool {
        self.state.lock().expect("health lock poisoned").live.is_ok()
    }

    /// GetHealth's answer.
    pub fn to_pb(&self) -> pb::NodeHealth {
        let state = self.state.lock().expect("health lock poisoned");
        let ready = state.live.is_ok() && state.ready.is_ok();
        let reason = match (&state.live, &state.ready) {
            (Err(why), _) | (Ok(()), Err(why)) => clip_text(why, HEALTH_REASON_LEN_MAX),
            (Ok(()), Ok(())) => String::new(),
        };
        pb::NodeHealth {
            live: state.live.is_ok(),
            ready,
            reason,
            for_ms: u64::try_from(state.since.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::HealthCheckRequest;

    /// What the standard service answers for `service`.
    async fn check(health: &Health, service: &str) -> ServingStatus {
        let request = tonic::Request::new(HealthCheckRequest { service: service.into() });
        let answer = HealthService::from_health_reporter(health.reporter().clone()).check(request).await.unwrap();
        ServingStatus::try_from(answer.into_inner().status).unwrap()
    }

    #[tokio::test]
    async fn the_standard_service_and_get_health_say_the_same_with_the_reason() {
        let (health, _server) =
            Health::new("tandem.v1.Coordinator", Some("tandem.v1.Coordinator.ready"), "probing").await;
        assert_eq!(check(&health, "").await, ServingStatus::Serving);
        assert_eq!(check(&health, "tandem.v1.Coordinator").await, ServingStatus::Serving);
        assert_eq!(check(&health, "tandem.v1.Coordinator.ready").await, ServingStatus::NotServing);
        let answer = health.to_pb();
        assert!(answer.live && !answer.ready && answer.reason == "probing", "{answer:?}");

        health.set_ready(Ok(())).await;
        assert_eq!(check(&health, "tandem.v1.Coordinator.ready").await, ServingStatus::Serving);
        let answer = health.to_pb();
        assert!(answer.live && answer.ready && answer.reason.is_empty(), "{answer:?}");

        // Not live: both names say it, readiness with it, and the reason
        // is liveness's (clipped).
        health.set_ready(Err("p2 unreachable".into())).await;
        health.set_live(Err(format!("the decision log failed: {}", "x".repeat(5_000)))).await;
        assert_eq!(check(&health, "").await, ServingStatus::NotServing);
        assert_eq!(check(&health, "tandem.v1.Coordinator").await, ServingStatus::NotServing);
        let answer = health.to_pb();
        assert!(!answer.live && !answer.ready, "{answer:?}");
        assert!(answer.reason.starts_with("the decision log failed: xxx"), "{}", answer.reason);
        assert!(answer.reason.len() <= HEALTH_REASON_LEN_MAX);

        health.set_live(Ok(())).await;
        assert_eq!(check(&health, "").await, ServingStatus::Serving);
        assert_eq!(health.to_pb().reason, "p2 unreachable");
    }

    #[tokio::test]
    async fn a_node_without_a_readiness_service_is_ready_when_live() {
        let (health, _server) = Health::new("tandem.v1.Participant", None, "").await;
        assert!(health.to_pb().ready);
        health.set_ready(Err("ignored".into())).await;
        assert!(health.to_pb().ready);
        health.set_live(Err("the store failed: no space left on device".into())).await;
        let answer = health.to_pb();
        assert!(!answer.live && !answer.ready && answer.reason.contains("no space"), "{answer:?}");
        assert_eq!(check(&health, "tandem.v1.Participant").await, ServingStatus::NotServing);
    }
}
