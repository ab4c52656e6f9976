//! Measuring helpers of the benchmark: process stats from /proc, Prometheus text, histogram
//! quantiles, medians, host processes of the controller and the agents, and the knobs.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support;

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
            .env("RUST_LOG", "info,crosstrace::controller::reconcile=debug")
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
