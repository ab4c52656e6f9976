//! `just bench`: speed and memory of crosstrace at scale on the local real cluster, each figure next
//! to a baseline measured in the same run (issue 7). It prints a table and writes one JSON file per
//! scenario into `target/bench/` of the repository. Nothing here passes or fails on wall-clock time:
//! goals are printed as met or missed, with by how much.
//!
//! Scenarios (`CROSSTRACE_BENCH_SCENARIOS`, default `5,1,4,3,2,6`, run in that order so that the big
//! object count of 2 does not slow down the others; 6 comes last and leaves nothing behind):
//!   1 rollout speed (operator vs a minimal SSA client vs a kubectl loop)
//!   2 controller memory vs cluster size
//!   3 idle cost (API writes, CPU)
//!   4 reconcile latency and "policy change -> Ready"
//!   5 network layer (apply -> NODES n/n, real and stub nodes, vs direct OVSDB writes and vs the
//!     Kubernetes hops alone; agent RSS)
//!   6 many policies (P policies x T targets each: apply -> all Ready; converged writes, CPU, RSS)
//!
//! Method (issue 13): every ratio is the median of per-run paired ratios, the operator and its baselines
//! interleaved in each run (the order turned around every other run); the limit client is swept over
//! concurrencies and its best in a run is that run's limit; reconcile quantiles come from the raw
//! per-reconcile durations the controller logs; the steady RSS is the long-running process's after
//! CROSSTRACE_BENCH_LONG_ROLLOUTS rollouts and deletes (and a fresh one's beside it). Raw samples go
//! into the JSON.
//!
//! Knobs: CROSSTRACE_BENCH_RUNS (5), CROSSTRACE_BENCH_TARGETS (target counts of scenario 1, the later
//! scenarios at the largest; 1000,10000), CROSSTRACE_BENCH_REPLICAS (of every target; 1),
//! CROSSTRACE_BENCH_NAMESPACES (10), CROSSTRACE_BENCH_LIMIT_SWEEP (1,4,8,16,32),
//! CROSSTRACE_BENCH_LONG_ROLLOUTS (10), CROSSTRACE_BENCH_READY_TARGETS (100) and CROSSTRACE_BENCH_READY_RUNS
//! (20) for scenario 4's replicas-0 policy,
//! CROSSTRACE_BENCH_NONTARGETS (100000), CROSSTRACE_BENCH_PODS (20000), CROSSTRACE_BENCH_IDLE_SECONDS (300; scenarios 3 and 6
//! never shorter than the controller's resync, 300 s, so that every policy's resync falls in them),
//! CROSSTRACE_BENCH_KUBECTL_SAMPLE (100), CROSSTRACE_BENCH_WRITE_CONCURRENCY (the operator's default --write-concurrency),
//! CROSSTRACE_BENCH_MAX_CONCURRENT (the policy's rollout.maxConcurrent; default min(1000, targets)),
//! CROSSTRACE_BENCH_CHANGE_RUNS (runs of scenario 4; default RUNS), CROSSTRACE_BENCH_STUB_NODES (nodes of
//! scenario 5 without OVS, answered by stub agents; 2000, 0 = none), CROSSTRACE_BENCH_STUB_CONCURRENCY
//! (status writes of the stub agents in flight; 64), CROSSTRACE_BENCH_POLICIES (50) and
//! CROSSTRACE_BENCH_POLICY_TARGETS (200 per policy) for scenario 6, CROSSTRACE_BENCH_OUT (where the JSON
//! goes; target/bench of the repository).

#[path = "../support/mod.rs"]
mod support;

mod network;
mod policies;
mod util;
mod workloads;

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// One line of the printed table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub goal: String,
    pub verdict: String,
}

/// Everything a run measured: the table and the JSON of each scenario.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub json: BTreeMap<&'static str, Value>,
}

impl Report {
    pub fn row(&mut self, scenario: &'static str, metric: impl Into<String>, value: impl Into<String>) -> &mut Row {
        self.rows.push(Row {
            scenario,
            metric: metric.into(),
            value: value.into(),
            baseline: String::new(),
            ratio: String::new(),
            goal: String::new(),
            verdict: String::new(),
        });
        self.rows.last_mut().unwrap()
    }
}

impl Row {
    pub fn baseline(&mut self, b: impl Into<String>) -> &mut Self {
        self.baseline = b.into();
        self
    }
    pub fn ratio(&mut self, r: f64) -> &mut Self {
        self.ratio = format!("{r:.2}x");
        self
    }
    /// A goal `value <= limit` (`lower` false: `value >= limit`), with how far it misses.
    pub fn goal(&mut self, text: &str, value: f64, limit: f64, lower_is_better: bool) -> &mut Self {
        self.goal = text.into();
        let met = if lower_is_better { value <= limit } else { value >= limit };
        self.verdict = if met {
            "met".into()
        } else if limit == 0.0 {
            format!("MISSED by {value:.1}")
        } else if lower_is_better {
            format!("MISSED ({:.2}x the goal)", value / limit)
        } else {
            format!("MISSED ({:.2}x short)", limit / value.max(f64::MIN_POSITIVE))
        };
        self
    }
}

/// Seconds, printed.
pub fn secs(s: f64) -> String {
    if s < 1.0 { format!("{:.0} ms", s * 1000.0) } else { format!("{s:.1} s") }
}

/// KiB, printed as MiB.
pub fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

fn print_table(rows: &[Row]) {
    let headers = ["scenario", "metric", "value", "baseline (same run)", "ratio", "goal", "verdict"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.to_string(),
                r.metric.clone(),
                r.value.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                r.goal.clone(),
                r.verdict.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let line = |values: Vec<&str>| {
        let cols: Vec<String> = values.iter().enumerate().map(|(i, v)| format!("{v:<w$}", w = widths[i])).collect();
        format!("| {} |", cols.join(" | "))
    };
    println!("{}", line(headers.to_vec()));
    println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
    for c in &cells {
        println!("{}", line(c.iter().map(String::as_str).collect()));
    }
}

/// The commit measured (`git describe --always --dirty`: a run of uncommitted code says so).
fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::main]
async fn main() {
    let client = support::client().await;
    let scenarios: Vec<u8> = util::knob::<String>("CROSSTRACE_BENCH_SCENARIOS", "5,1,4,3,2,6".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let out_dir = match std::env::var("CROSSTRACE_BENCH_OUT") {
        Ok(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
        _ => std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench"),
    };
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let machine = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "nodes": support::agents::node_count(),
        "started": util::kubectl(&["version", "-o", "json"]).parse::<Value>().ok().map(|v| v["serverVersion"]["gitVersion"].clone()),
        "commit": commit(),
    });
    println!("crosstrace bench: scenarios {scenarios:?}, machine {machine}");
    let mut report = Report::default();
    // What is measured is written after every group of scenarios: a later one failing loses nothing.
    let write = |report: &Report, last: bool| {
        if last {
            println!();
            print_table(&report.rows);
        }
        for (name, value) in &report.json {
            let mut value = value.clone();
            value["machine"] = machine.clone();
            let path = out_dir.join(format!("{name}.json"));
            std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).expect("write JSON");
            if last {
                println!("wrote {}", path.display());
            }
        }
        let all = json!({"machine": machine, "rows": report.rows});
        std::fs::write(out_dir.join("table.json"), serde_json::to_string_pretty(&all).unwrap()).expect("write table");
    };
    if scenarios.contains(&5) {
        network::run(&client, &mut report).await;
        write(&report, false);
    }
    if scenarios.iter().any(|s| (1..=4).contains(s)) {
        workloads::run(&client, &scenarios, &mut report).await;
        write(&report, false);
    }
    if scenarios.contains(&6) {
        policies::run(&client, &mut report).await;
    }
    write(&report, true);
}
