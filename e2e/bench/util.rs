//! Measuring helpers of the benchmark: process stats from /proc, Prometheus text, histogram
//! quantiles, medians, host processes of the controller and the agents, the knobs, bounded writes,
//! and a converged controller's idle cost (shared by the scenarios that measure one).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crosstrace::api::TracingPolicy;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::{Report, support};

/// The idle windows (`CROSSTRACE_BENCH_IDLE_SECONDS`), never shorter than the controller's resync: a
/// converged controller's periodic work is its policies' resyncs, and a shorter window can fall between
/// them and see none.
pub fn idle_seconds() -> u64 {
    let resync = crosstrace::controller::Settings::default().resync.as_secs();
    knob("CROSSTRACE_BENCH_IDLE_SECONDS", resync).max(resync)
}

/// A knob from the environment, or its default.
pub fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v} does not parse")),
        _ => default,
    }
}

/// The median of some samples (the lower middle for an even count); 0 for none.
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

/// The `q` quantile (nearest rank) of some samples; 0 for none.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Seconds since `t0`.
pub fn since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// What /proc says about a process.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcStats {
    /// Resident set now, KiB (VmRSS).
    pub rss_kib: u64,
    /// Highest resident set so far, KiB (VmHWM).
    pub hwm_kib: u64,
    /// CPU time used so far (utime + stime), seconds.
    pub cpu_seconds: f64,
}

/// Reads /proc/<pid>/status and /proc/<pid>/stat.
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12 here.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = clock_ticks();
    ProcStats { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:"), cpu_seconds: (ticks(11) + ticks(12)) as f64 / hz }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// The samples of one metric family: (labels text, value).
pub fn samples(text: &str, family: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, value) = r.split_once("} ")?;
                (labels.to_string(), value)
            } else {
                (String::new(), rest.strip_prefix(' ')?)
            };
            Some((labels, value.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// The value of a label in a Prometheus label text (`a="b",c="d"`).
pub fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let start = labels.find(&key)? + key.len();
    let end = labels[start..].find('"')? + start;
    Some(&labels[start..end])
}

/// The cumulative buckets of a histogram: (upper bound, count), ascending, `+Inf` as infinity.
pub fn histogram(text: &str, family: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = samples(text, &format!("{family}_bucket"))
        .into_iter()
        .filter_map(|(labels, count)| {
            let le = label(&labels, "le")?;
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((bound, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The difference of two snapshots of the same histogram.
pub fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, count)| {
            let old = before.iter().find(|(b, _)| b == le).map_or(0.0, |(_, c)| *c);
            (*le, count - old)
        })
        .collect()
}

/// A `crosstrace` host process (controller or agent) of the binary Cargo built for this bench,
/// stopped by its PID when dropped.
pub struct Proc {
    pub child: Child,
    pub admin_port: u16,
    pub what: String,
    pub log: std::path::PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stats(&self) -> ProcStats {
        proc_stats(self.pid())
    }

    pub async fn metrics(&self) -> String {
        support::http_get(self.admin_port, "/metrics").await
    }

    /// Every reconcile's duration in seconds, as the controller logged it (JSON lines, `took_us`).
    pub fn reconcile_durations(&self) -> Vec<f64> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "reconciled")
            .filter_map(|v| v["fields"]["took_us"].as_f64())
            .map(|us| us / 1e6)
            .collect()
    }

    /// Where the slowest `share` of the reconciles spent their time: for each part the controller logs
    /// with a reconcile's duration (`edge_us`, `status_us`, ...), its median over those reconciles, in
    /// milliseconds, beside the median of their durations (`took`) and of what no part names (`rest`).
    pub fn slowest_reconciles(&self, share: f64) -> serde_json::Map<String, serde_json::Value> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut reconciles: Vec<serde_json::Map<String, serde_json::Value>> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "reconciled" && v["fields"]["took_us"].is_number())
            .filter_map(|v| v["fields"].as_object().cloned())
            .collect();
        reconciles
            .sort_by(|a, b| b["took_us"].as_f64().unwrap_or(0.0).total_cmp(&a["took_us"].as_f64().unwrap_or(0.0)));
        let slowest = &reconciles[..((reconciles.len() as f64 * share).ceil() as usize).min(reconciles.len())];
        let parts: Vec<&String> =
            slowest.first().map(|r| r.keys().filter(|k| k.ends_with("_us")).collect()).unwrap_or_default();
        let mut out = serde_json::Map::new();
        out.insert("reconciles".into(), slowest.len().into());
        let ms = |r: &serde_json::Map<String, serde_json::Value>, k: &str| {
            r.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0) / 1e3
        };
        for part in &parts {
            let values: Vec<f64> = slowest.iter().map(|r| ms(r, part)).collect();
            out.insert(format!("{}_ms", part.trim_end_matches("_us")), median(&values).into());
        }
        let rest: Vec<f64> = slowest
            .iter()
            .map(|r| ms(r, "took_us") - parts.iter().filter(|p| p.as_str() != "took_us").map(|p| ms(r, p)).sum::<f64>())
            .collect();
        out.insert("rest_ms".into(), median(&rest).into());
        out
    }

    pub fn log_tail(&self, lines: usize) -> String {
        support::agents::tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), lines)
    }

    /// The controller as the chart's ServiceAccount, with the production defaults (lease 15 s, renewed
    /// every 5 s; concurrency 4) and info logging.
    pub fn controller(tag: &str) -> Self {
        let kubeconfig = format!("{}/controller.kubeconfig", std::env::var("CROSSTRACE_E2E_STATE").unwrap_or_default());
        assert!(
            std::path::Path::new(&kubeconfig).exists(),
            "{kubeconfig} is missing: run e2e/install-chart.sh first (just bench does)"
        );
        let admin_port = support::agents::free_port();
        let log = std::env::temp_dir().join(format!("crosstrace-bench-controller-{tag}-{admin_port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_crosstrace"))
            .args([
                "controller",
                "--admin-addr",
                &format!("127.0.0.1:{admin_port}"),
                "--namespace",
                "crosstrace-system",
                "--write-concurrency",
                &crate::util::knob(
                    "CROSSTRACE_BENCH_WRITE_CONCURRENCY",
                    crosstrace::controller::DEFAULT_WRITE_CONCURRENCY,
                )
                .to_string(),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,crosstrace::controller::reconcile=debug,crosstrace::controller::limit=debug,crosstrace::controller::apply=debug")
            .env("CROSSTRACE_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("controller log"))
            .spawn()
            .expect("start crosstrace controller");
        Self { child, admin_port, what: format!("controller {tag}"), log }
    }

    /// The agent of node `i`, with the token install-chart.sh bound to the chart's agent pod there.
    pub fn agent(i: usize) -> Self {
        let node = support::agents::node_name(i);
        let state = std::env::var("CROSSTRACE_E2E_STATE").unwrap_or_default();
        let kubeconfig = format!("{state}/agent-{node}.kubeconfig");
        assert!(std::path::Path::new(&kubeconfig).exists(), "{kubeconfig} is missing: run e2e/install-chart.sh");
        let admin_port = support::agents::free_port();
        let log = std::env::temp_dir().join(format!("crosstrace-bench-agent-{node}-{admin_port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_crosstrace"))
            .args(["agent", "--node-name", &node])
            .args(["--ovsdb", &support::agents::ovsdb(i), "--unixctl", &support::agents::unixctl(i)])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("start crosstrace agent");
        Self { child, admin_port, what: format!("agent {node}"), log }
    }

    /// Waits until the admin port answers /metrics.
    pub async fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} did not open its admin port:\n{}", self.what, self.log_tail(40));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        support::stop(&mut self.child);
    }
}

/// Sum of the write-verb samples of `apiserver_request_total`, by resource.
pub fn apiserver_writes(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (labels, value) in samples(text, "apiserver_request_total") {
        let verb = label(&labels, "verb").unwrap_or_default();
        if !matches!(verb, "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" | "CREATE" | "UPDATE" | "DELETECOLLECTION") {
            continue;
        }
        let resource = label(&labels, "resource").unwrap_or_default();
        let sub = label(&labels, "subresource").unwrap_or_default();
        let key = if sub.is_empty() { resource.to_string() } else { format!("{resource}/{sub}") };
        *out.entry(key).or_default() += value;
    }
    out
}

/// `after - before`, per key, leaving out zeros.
pub fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// Runs kubectl (the cluster's, from PATH) and fails loudly.
pub fn kubectl(args: &[&str]) -> String {
    let (ok, out, err) = support::kubectl(args);
    assert!(ok, "kubectl {args:?}: {err}");
    out
}

/// How long the bench waits for any one thing the cluster or the controller has to do.
pub const PATIENCE: Duration = Duration::from_secs(1800);

/// Applies `items` with at most `concurrency` requests in flight; panics on the first error.
pub async fn bounded<I, F, Fut>(items: I, concurrency: usize, f: F)
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    futures::stream::iter(items.into_iter().map(f))
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await
        .expect("bounded writes");
}

/// A create that found its object already there (left by an interrupted run) counts as done.
pub fn ignore_exists(r: Result<impl Sized, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the namespace, or sets its labels (server-side apply: a rerun after an interrupted one is fine).
pub async fn ensure_namespace(client: &Client, name: &str, labels: Value) {
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply("crosstrace-bench").force(), &Patch::Apply(&ns))
        .await
        .expect("namespace");
}

/// The policy is Ready for its current generation.
pub fn ready(p: &TracingPolicy) -> bool {
    let Some(status) = p.status.as_ref() else { return false };
    status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True" && c.observed_generation == p.metadata.generation)
}

/// The controller's own API writes so far (its `crosstrace_api_writes_total`).
pub fn writes(metrics: &str) -> f64 {
    support::sum_samples(metrics, "crosstrace_api_writes_total")
}

/// Waits until the controller has made no write for `quiet`.
pub async fn wait_quiet(controller: &Proc, quiet: Duration) {
    let mut last = writes(&controller.metrics().await);
    let mut since_change = Instant::now();
    let deadline = Instant::now() + PATIENCE;
    while since_change.elapsed() < quiet && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = writes(&controller.metrics().await);
        if now != last {
            last = now;
            since_change = Instant::now();
        }
    }
}

/// What a converged controller costs over a window with nothing to do: its own API writes, its Lease
/// renewals (leader election writes them by design, so they are counted apart), its reconciles and CPU,
/// and the apiserver's write counts by resource.
pub struct Idle {
    pub window_s: u64,
    pub writes: f64,
    pub lease_renewals: usize,
    pub reconciles: f64,
    pub cpu_seconds: f64,
    pub apiserver_writes: BTreeMap<String, f64>,
}

impl Idle {
    /// Watches `controller` for `window_s` seconds.
    pub async fn measure(client: &Client, controller: &Proc, window_s: u64) -> Self {
        let leases = Api::<Lease>::namespaced(client.clone(), "crosstrace-system");
        let renewals = Arc::new(Mutex::new(0usize));
        let lease_task = {
            let renewals = renewals.clone();
            tokio::spawn(async move {
                let mut last = String::new();
                loop {
                    if let Ok(l) = leases.get("crosstrace-controller").await {
                        let rv = l.resource_version().unwrap_or_default();
                        if !last.is_empty() && rv != last {
                            *renewals.lock().unwrap() += 1;
                        }
                        last = rv;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        // The controller's metrics, the apiserver's write counts and the controller's /proc stats, together.
        let snapshot = || async {
            let metrics = controller.metrics().await;
            let request = http::Request::get("/metrics").body(vec![]).unwrap();
            let apiserver = client.request_text(request).await.expect("apiserver /metrics");
            (metrics, apiserver_writes(&apiserver), controller.stats())
        };
        let (m0, a0, s0) = snapshot().await;
        println!("  idle window: {window_s} s");
        tokio::time::sleep(Duration::from_secs(window_s)).await;
        let (m1, a1, s1) = snapshot().await;
        lease_task.abort();
        let lease_renewals = *renewals.lock().unwrap();
        Self {
            window_s,
            writes: writes(&m1) - writes(&m0),
            lease_renewals,
            reconciles: support::sum_samples(&m1, "crosstrace_reconciles_total")
                - support::sum_samples(&m0, "crosstrace_reconciles_total"),
            cpu_seconds: s1.cpu_seconds - s0.cpu_seconds,
            apiserver_writes: delta(&a0, &a1),
        }
    }

    pub fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu_seconds / self.window_s as f64
    }

    /// The apiserver's writes to the resources crosstrace writes, by any client.
    fn crosstrace_resource_writes(&self) -> f64 {
        ["tracingpolicies", "tracingpolicies/status", "nodetracings", "events", "configmaps"]
            .iter()
            .map(|r| self.apiserver_writes.get(*r).copied().unwrap_or(0.0))
            .sum()
    }

    /// The rows of the table: writes (goal 0), the apiserver's view, CPU (goal below `cpu_goal_percent`).
    pub fn rows(&self, report: &mut Report, scenario: &'static str, cpu_goal_percent: f64) {
        let window = self.window_s;
        report
            .row(scenario, format!("controller API writes in {window} s (its metrics)"), format!("{:.0}", self.writes))
            .baseline(format!("+ {} lease renewals (by design)", self.lease_renewals))
            .goal("0 writes", self.writes, 0.0, true);
        report
            .row(
                scenario,
                "apiserver writes to crosstrace's resources (all clients)",
                format!("{:.0}", self.crosstrace_resource_writes()),
            )
            .baseline(format!("all writes in the cluster {:.0}", self.apiserver_writes.values().sum::<f64>()));
        report
            .row(
                scenario,
                format!("controller CPU ({:.0} reconciles)", self.reconciles),
                format!("{:.2} s = {:.3}% of a core", self.cpu_seconds, self.cpu_percent()),
            )
            .goal(&format!("< {cpu_goal_percent}% of a core"), self.cpu_percent(), cpu_goal_percent, true);
    }

    pub fn json(&self) -> Value {
        json!({
            "window_s": self.window_s, "controller_writes": self.writes, "lease_renewals": self.lease_renewals,
            "reconciles": self.reconciles, "controller_cpu_s": self.cpu_seconds, "cpu_percent_of_core": self.cpu_percent(),
            "apiserver_write_deltas_by_resource": self.apiserver_writes,
            "note": "apiserver_request_total has no user label: the deltas are every client's (kwok's node leases and pod status, the controller manager...). The controller's own writes are counted by its crosstrace_api_writes_total; its Lease renewals (leader election, by design) are counted by watching the Lease's resourceVersion.",
        })
    }
}
