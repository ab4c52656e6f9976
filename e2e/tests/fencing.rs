//! End to end, on the local real cluster: a leader frozen (SIGSTOP) for longer than its lease while a
//! workload rollout is in flight, its policy deleted meanwhile, makes no write once the lease could
//! have moved to the standby, and exits when resumed; the standby reverts everything and nothing is
//! left injected. Issue 11's acceptance: the scenario five times over, the leader alternating.
//!
//! "Could have moved" is the moment the others may take the lease over: the frozen leader's last
//! `renewTime` plus the lease duration. Every write the controller sends is logged at debug ("API
//! write", JSON log lines with their time), so the frozen leader's own log is the witness.

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use crosstrace::layers::workloads::RECORD_ANNOTATION;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::*;

/// The lease duration `ControllerProcess` starts the controller with (`--lease-duration 6`).
const LEASE_SECONDS: i64 = 6;
const ROUNDS: usize = 5;
const DEPLOYMENTS: usize = 6;
const FIRST_PORT: u16 = 18141;

/// One Deployment at a time, so that writes keep coming for a while.
fn policy(name: &str, tag: &str) -> Value {
    tracing_policy(
        name,
        json!({
            "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
            "workloads": {
                "namespaceSelector": {"matchLabels": {"tracing": tag}},
                "selector": {"matchLabels": {"app.kubernetes.io/part-of": "fenced"}},
                "kinds": ["Deployment"],
            },
            "rollout": {"maxConcurrent": 1, "progressDeadlineSeconds": 60},
        }),
    )
}

/// How many Deployments of the namespace carry an injection.
async fn injected(client: &Client, ns: &str) -> usize {
    let list = Api::<Deployment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
    list.iter().filter(|d| d.annotations().contains_key(RECORD_ANNOTATION)).count()
}

/// The lease's holder, and when the others may take it over (its `renewTime` + its duration); `None`
/// while nobody holds it.
async fn lease(client: &Client) -> Option<(String, Timestamp)> {
    let leases = Api::<Lease>::namespaced(client.clone(), "crosstrace-system");
    let spec = leases.get_opt("crosstrace-controller").await.expect("reading the leader lease")?.spec?;
    let renewed = spec.renew_time?.0;
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS as i32));
    let holder = spec.holder_identity.filter(|h| !h.is_empty())?;
    Some((holder, renewed + SignedDuration::from_secs(seconds)))
}

/// A replica's Lease identity is `<hostname>-<pid>`.
fn holds(holder: &str, process: &ControllerProcess) -> bool {
    holder.ends_with(&format!("-{}", process.pid()))
}

/// What a controller's JSON log says about its writes, by `moved_at`.
#[derive(Debug, Default)]
struct Writes {
    /// Writes logged before.
    before: usize,
    /// Writes logged at or after, whole log lines.
    late: Vec<String>,
    /// Writes its fence refused.
    refused: usize,
}

fn writes_by(log: &str, moved_at: Timestamp) -> Writes {
    let mut writes = Writes::default();
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
        let message = entry["fields"]["message"].as_str().unwrap_or_default();
        let error = entry["fields"]["error"].as_str().unwrap_or_default();
        if error.contains("may no longer hold the leader lease") {
            writes.refused += 1;
        }
        if message == "API write" {
            let at: Timestamp = entry["timestamp"].as_str().expect("a timestamp").parse().expect("RFC 3339");
            if at >= moved_at {
                writes.late.push(line.to_string());
            } else {
                writes.before += 1;
            }
        }
    }
    writes
}

/// Waits for the resumed leader to exit: its renewal finds the fence closed and gives the lease up.
async fn exit_of(leader: &mut ControllerProcess, round: usize) -> std::process::ExitStatus {
    for _ in 0..80 {
        if let Some(status) = leader.exit_status() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("round {round}: the resumed leader did not exit within 20 s\n{}", leader.log());
}

fn start(port: u16) -> ControllerProcess {
    ControllerProcess::start_with_env(port, &controller_kubeconfig(), &[("CROSSTRACE_LOG_FORMAT", "json")])
}

#[tokio::test]
async fn a_frozen_leader_makes_no_write_after_its_lease_could_have_moved() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("e2e-fence-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-fence", json!({"tracing": tag})).await;
    for i in 0..DEPLOYMENTS {
        create_app(&client, &ns.name, &format!("app-{i}"), "fenced", json!([])).await;
    }

    let mut port = FIRST_PORT;
    let mut replicas = vec![start(port), start(port + 1)];
    port += 2;
    let mut refused_in_all = 0;
    for round in 0..ROUNDS {
        let (holder, _) = eventually("a leader", || async {
            let (holder, until) = lease(&client).await?;
            (replicas.iter().any(|r| holds(&holder, r)) && until > Timestamp::now()).then_some((holder, until))
        })
        .await;
        let leader_at = replicas.iter().position(|r| holds(&holder, r)).unwrap();
        let mut leader = replicas.remove(leader_at);

        let name = format!("{tag}-{round}");
        apply_policy(&client, &policy(&name, &tag)).await;
        eventually_with(
            &format!("round {round}: a rollout in flight"),
            || leader.log(),
            || async {
                let n = injected(&client, &ns.name).await;
                (n > 0 && n < DEPLOYMENTS).then_some(())
            },
        )
        .await;

        leader.signal("STOP");
        // A renewal already on its way lands before the lease is read.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (still, moved_at) = lease(&client).await.expect("the frozen replica's lease");
        assert_eq!(still, holder, "round {round}: the frozen replica still holds the lease");
        // The user deletes the policy while the leader is frozen: the standby must revert, and the old
        // leader must not write injections for it once it resumes.
        delete_if_exists(&Api::<crosstrace::api::TracingPolicy>::all(client.clone()), &name).await;
        eventually(&format!("round {round}: the standby took the lease over"), || async {
            let (now_holder, _) = lease(&client).await?;
            (now_holder != holder && Timestamp::now() > moved_at).then_some(())
        })
        .await;

        leader.signal("CONT");
        let status = exit_of(&mut leader, round).await;
        let log = leader.log();
        assert!(!status.success(), "round {round}: a leader that lost its lease exits with an error\n{log}");
        let writes = writes_by(&log, moved_at);
        eprintln!("round {round}: lease could move at {moved_at}; {writes:?}");
        assert!(writes.before > 0, "round {round}: the leader was writing before it was frozen\n{log}");
        assert!(
            writes.late.is_empty(),
            "round {round}: the frozen leader wrote after its lease could have moved ({moved_at}):\n{}",
            writes.late.join("\n")
        );
        refused_in_all += writes.refused;

        delete_policy_and_wait(&client, &name).await;
        assert_eq!(injected(&client, &ns.name).await, 0, "round {round}: every injection is reverted");
        replicas.push(start(port));
        port += 1;
    }
    assert!(
        refused_in_all > 0,
        "in {ROUNDS} rounds the resumed leader never tried a write: the scenario did not exercise the fence"
    );
}
