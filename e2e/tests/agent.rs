//! The node agent against REAL Open vSwitch (no mocks, no Kubernetes): every test starts its own
//! throwaway ovsdb-server and `ovs-vswitchd --enable-dummy=override` in a temporary directory, with a
//! bridge `br-int` of dummy ports p1..p3, and stops them (by pid) at the end.
//!
//! Packets are injected with `netdev-dummy/receive`; sFlow and IPFIX datagrams are received on
//! loopback and their headers decoded.
//!
//! Needs `openvswitch-switch` (ovsdb-server, ovs-vswitchd, ovsdb-tool, ovs-vsctl).

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crosstrace::agent::desired::Desired;
use crosstrace::agent::ensure::{self, OWNER, OWNER_KEY, REPLACED_KEY};
use crosstrace::agent::node::{self, Node, Report, Settings, State, Want};
use crosstrace::agent::ovsdb::{self, Client};
use crosstrace::agent::status;
use crosstrace::agent::unixctl::{self, Locator, PROBE_FLOW, Unixctl};
use crosstrace::api::node_tracing::BridgeExport;
use crosstrace::api::{ConflictPolicy, IpfixSpec, SflowSpec};
use crosstrace::lenient::Seen;
use kube::runtime::watcher::Event;
use tokio::sync::watch;

const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
const PATIENCE: Duration = Duration::from_secs(20);

/// One throwaway Open vSwitch.
struct Ovs {
    dir: PathBuf,
    ovsdb_server: Option<Child>,
    vswitchd: Option<Child>,
}

impl Ovs {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("crosstrace-ovs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ovs = Self { dir, ovsdb_server: None, vswitchd: None };
        let db = ovs.dir.join("conf.db");
        ovs.run("ovsdb-tool", &["create", db.to_str().unwrap(), SCHEMA]);
        ovs.start_ovsdb_server();
        ovs.vsctl(&["--no-wait", "init"]);
        ovs.start_vswitchd();
        ovs.vsctl(&["add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=dummy"]);
        for p in 1..=3 {
            let port = format!("p{p}");
            ovs.vsctl(&[
                "add-port",
                "br-int",
                &port,
                "--",
                "set",
                "interface",
                &port,
                "type=dummy",
                &format!("ofport_request={p}"),
            ]);
        }
        ovs
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for var in ["OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR", "OVS_SYSCONFDIR"] {
            c.env(var, &self.dir);
        }
        c.env("OVS_PKGDATADIR", "/usr/share/openvswitch");
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} runs (is openvswitch-switch installed?): {e}"));
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn db(&self) -> String {
        format!("unix:{}", self.path("db.sock").display())
    }

    fn vsctl(&self, args: &[&str]) -> String {
        let db = format!("--db={}", self.db());
        let mut all = vec![db.as_str(), "--timeout=10"];
        all.extend_from_slice(args);
        self.run("ovs-vsctl", &all)
    }

    fn start_ovsdb_server(&mut self) {
        let _ = std::fs::remove_file(self.path("db.sock"));
        let child = self
            .command("ovsdb-server")
            .arg(self.path("conf.db"))
            .arg(format!("--remote=punix:{}", self.path("db.sock").display()))
            .arg(format!("--unixctl={}", self.path("ovsdb-server.ctl").display()))
            .arg(format!("--pidfile={}", self.path("ovsdb-server.pid").display()))
            .arg(format!("--log-file={}", self.path("ovsdb-server.log").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ovsdb-server starts");
        self.ovsdb_server = Some(child);
        wait_for(|| self.path("db.sock").exists(), "ovsdb-server socket");
    }

    fn start_vswitchd(&mut self) {
        let _ = std::fs::remove_file(self.path("ovs-vswitchd.pid"));
        let child = self
            .command("ovs-vswitchd")
            .arg(self.db())
            .arg("--enable-dummy=override")
            .arg("--disable-system")
            .arg(format!("--pidfile={}", self.path("ovs-vswitchd.pid").display()))
            .arg(format!("--log-file={}", self.path("ovs-vswitchd.log").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ovs-vswitchd starts");
        let pid = child.id();
        self.vswitchd = Some(child);
        let ctl = self.path(&format!("ovs-vswitchd.{pid}.ctl"));
        wait_for(|| ctl.exists() && self.path("ovs-vswitchd.pid").exists(), "ovs-vswitchd control socket");
    }

    fn stop(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart_vswitchd(&mut self) {
        Self::stop(&mut self.vswitchd);
        self.start_vswitchd();
    }

    fn restart_ovsdb_server(&mut self) {
        Self::stop(&mut self.ovsdb_server);
        self.start_ovsdb_server();
    }

    fn unixctl(&self) -> Unixctl {
        let pid = self.vswitchd.as_ref().unwrap().id();
        Unixctl::new(self.path(&format!("ovs-vswitchd.{pid}.ctl")))
    }

    fn settings(&self) -> Settings {
        let mut s = Settings::new(self.db(), None);
        s.pid_check = Duration::from_millis(300);
        s.max_backoff = Duration::from_secs(2);
        s
    }

    /// `ovs-vsctl find TABLE` as (uuid, external_ids text) pairs.
    fn rows(&self, table: &str) -> Vec<(String, String)> {
        let out = self.vsctl(&["--format=csv", "--no-headings", "--columns=_uuid,external_ids", "find", table]);
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (id, ext) = l.split_once(',').unwrap();
                (id.to_string(), ext.to_string())
            })
            .collect()
    }

    /// Rows tagged as crosstrace's, found by ovs-vsctl's own condition syntax.
    fn ours(&self, table: &str) -> usize {
        let condition = format!("external_ids:\"{OWNER_KEY}\"={OWNER}");
        self.vsctl(&["--bare", "--columns=_uuid", "find", table, &condition])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        Self::stop(&mut self.vswitchd);
        Self::stop(&mut self.ovsdb_server);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("OVS logs kept in {}", self.dir.display());
        }
    }
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sflow(target: &str) -> SflowSpec {
    SflowSpec { targets: vec![target.into()], sampling: 64, polling: 10, header: 128, agent: "127.0.0.1".into() }
}

fn ipfix(target: &str) -> IpfixSpec {
    IpfixSpec { targets: vec![target.into()], sampling: 64, obs_domain_id: 7, cache_active_timeout: 0 }
}

fn export(sflow: Option<SflowSpec>, ipfix: Option<IpfixSpec>) -> BridgeExport {
    BridgeExport {
        bridge: "br-int".into(),
        policy: "storefront".into(),
        policy_generation: 1,
        sflow,
        ipfix,
        conflict_policy: ConflictPolicy::Skip,
        ..BridgeExport::default()
    }
}

fn want(bridges: Vec<BridgeExport>) -> Want {
    Want { generation: Some(1), bridges }
}

async fn connect(ovs: &Ovs) -> Client {
    let client = Client::connect(&ovs.db()).await.expect("connect to OVSDB");
    client
        .get_schema(ovsdb::OPEN_VSWITCH)
        .await
        .expect("get_schema")
        .require(ensure::SCHEMA_NEEDS)
        .expect("the schema has every column the agent uses");
    client
}

const CFG: Duration = Duration::from_secs(10);

/// Injects `n` UDP packets on p1 (ODP flow syntax; 25 per call).
async fn inject(ovs: &Ovs, n: usize) {
    let ctl = ovs.unixctl();
    let flow = "in_port(1),eth(src=02:00:00:00:00:01,dst=02:00:00:00:00:02),eth_type(0x0800),ipv4(src=10.0.0.1,dst=10.0.0.2,proto=17,tos=0,ttl=64,frag=no),udp(src=1234,dst=80)";
    for _ in 0..n.div_ceil(25) {
        let mut args = vec!["p1"];
        args.extend(std::iter::repeat_n(flow, 25));
        ctl.call("netdev-dummy/receive", &args).await.expect("netdev-dummy/receive");
    }
}

fn collector() -> (UdpSocket, String) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let target = socket.local_addr().unwrap().to_string();
    (socket, target)
}

/// Datagrams received until `enough` says so or the patience runs out.
fn receive(socket: &UdpSocket, mut enough: impl FnMut(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while start.elapsed() < PATIENCE && !enough(&got) {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// The sFlow v5 datagram header: (version, agent address, number of samples, sample formats).
fn sflow_header(d: &[u8]) -> (u32, Option<Ipv4Addr>, u32, Vec<u32>) {
    let version = u32_at(d, 0);
    let address_type = u32_at(d, 4);
    assert_eq!(address_type, 1, "agent address type IPv4");
    let agent = Ipv4Addr::new(d[8], d[9], d[10], d[11]);
    // sub-agent id, sequence, uptime
    let samples = u32_at(d, 24);
    let mut formats = Vec::new();
    let mut at = 28;
    for _ in 0..samples {
        if at + 8 > d.len() {
            break;
        }
        formats.push(u32_at(d, at) & 0xfff);
        at += 8 + u32_at(d, at + 4) as usize;
    }
    (version, Some(agent), samples, formats)
}

/// The set ids of an IPFIX message (2: template set, >= 256: data set).
fn ipfix_sets(m: &[u8]) -> Vec<u16> {
    let mut ids = Vec::new();
    let mut at = 16;
    while at + 4 <= m.len() {
        let id = u16::from_be_bytes([m[at], m[at + 1]]);
        let len = u16::from_be_bytes([m[at + 2], m[at + 3]]) as usize;
        ids.push(id);
        if len < 4 {
            break;
        }
        at += len;
    }
    ids
}

async fn trace(ovs: &Ovs) -> unixctl::Sampling {
    let text = ovs.unixctl().trace("br-int", PROBE_FLOW).await.expect("ofproto/trace");
    unixctl::sampling_in_trace(&text)
}

#[tokio::test]
async fn ensure_creates_one_tagged_row_twice_is_no_transaction_and_removal_leaves_nothing() {
    let ovs = Ovs::start("ensure");
    let client = connect(&ovs).await;
    let desired = vec![export(Some(sflow("127.0.0.1:6343")), None)];

    let (outcomes, caught_up) = ensure::ensure(&client, &desired, CFG).await.unwrap();
    assert!(caught_up, "ovs-vswitchd took the change");
    assert_eq!(outcomes.len(), 1);
    assert!(outcomes[0].transacted && outcomes[0].error.is_none(), "{outcomes:?}");
    assert_eq!(outcomes[0].changes, vec!["sFlow: created"]);
    assert_eq!(ovs.rows("sflow").len(), 1);
    assert_eq!(ovs.ours("sflow"), 1, "{:?}", ovs.rows("sflow"));
    let on_bridge = ovs.vsctl(&["get", "bridge", "br-int", "sflow"]);
    assert_eq!(on_bridge, ovs.rows("sflow")[0].0);
    let ext = ovs.vsctl(&["get", "sflow", &on_bridge, "external_ids"]);
    assert!(ext.contains("\"crosstrace.dev/policy\"=storefront"), "{ext}");
    assert!(ext.contains("\"crosstrace.dev/generation\"=\"1\""), "{ext}");
    assert_eq!(ovs.vsctl(&["get", "sflow", &on_bridge, "sampling"]), "64");

    // Twice: no transaction at all (next_cfg does not move either).
    let next_cfg = ovs.vsctl(&["get", "open_vswitch", ".", "next_cfg"]);
    let (outcomes, caught_up) = ensure::ensure(&client, &desired, CFG).await.unwrap();
    assert!(outcomes.is_empty(), "{outcomes:?}");
    assert!(caught_up);
    assert_eq!(ovs.vsctl(&["get", "open_vswitch", ".", "next_cfg"]), next_cfg);
    assert!(ensure::plan(&desired, &ensure::read(&client).await.unwrap()).iter().all(ensure::Plan::is_noop));

    // ofproto/trace proves it; the daemon's version is readable.
    let seen = trace(&ovs).await;
    assert!(seen.sflow && !seen.ipfix, "{seen:?}");
    let version = ovs.unixctl().version().await.unwrap();
    assert!(unixctl::parse_version(&version).is_some_and(|v| v.starts_with('3')), "{version}");

    // A changed spec updates the row in place.
    let mut changed = desired.clone();
    changed[0].sflow.as_mut().unwrap().sampling = 128;
    changed[0].policy_generation = 2;
    let (outcomes, _) = ensure::ensure(&client, &changed, CFG).await.unwrap();
    assert_eq!(outcomes[0].changes, vec!["sFlow: updated sampling, external_ids"]);
    assert_eq!(ovs.vsctl(&["get", "bridge", "br-int", "sflow"]), on_bridge);
    assert_eq!(ovs.vsctl(&["get", "sflow", &on_bridge, "sampling"]), "128");

    // Removal: nothing of ours left, the bridge column cleared, the datapath clean.
    let (outcomes, caught_up) = ensure::ensure(&client, &[], CFG).await.unwrap();
    assert!(caught_up);
    assert_eq!(outcomes[0].changes, vec!["sFlow: removed"]);
    assert!(ovs.rows("sflow").is_empty());
    assert_eq!(ovs.vsctl(&["get", "bridge", "br-int", "sflow"]), "[]");
    assert!(!trace(&ovs).await.sflow);
}

#[tokio::test]
async fn sflow_datagrams_reach_a_collector_on_loopback() {
    let ovs = Ovs::start("sflow");
    let client = connect(&ovs).await;
    let (socket, target) = collector();
    let (_, caught_up) = ensure::ensure(&client, &[export(Some(sflow(&target)), None)], CFG).await.unwrap();
    assert!(caught_up);
    assert!(trace(&ovs).await.sflow);

    inject(&ovs, 1000).await;
    let datagrams = receive(&socket, |got| got.iter().any(|d| sflow_header(d).3.contains(&1)));
    assert!(!datagrams.is_empty(), "no sFlow datagram arrived");
    for d in &datagrams {
        let (version, agent, _, _) = sflow_header(d);
        assert_eq!(version, 5, "sFlow v5");
        assert_eq!(agent, Some(Ipv4Addr::LOCALHOST), "the agent address");
    }
    let flow_samples: usize = datagrams.iter().map(|d| sflow_header(d).3.iter().filter(|f| **f == 1).count()).sum();
    assert!(flow_samples > 0, "no flow sample among {} datagrams", datagrams.len());
    eprintln!("sFlow: {} datagrams, {flow_samples} flow samples from 1000 packets at 1:64", datagrams.len());
}

#[tokio::test]
async fn ipfix_messages_reach_a_collector_on_loopback() {
    let ovs = Ovs::start("ipfix");
    let client = connect(&ovs).await;
    let (socket, target) = collector();
    let (_, caught_up) = ensure::ensure(&client, &[export(None, Some(ipfix(&target)))], CFG).await.unwrap();
    assert!(caught_up);
    assert_eq!(ovs.ours("ipfix"), 1);
    let seen = trace(&ovs).await;
    assert!(seen.ipfix && !seen.sflow, "{seen:?}");

    inject(&ovs, 1000).await;
    // A data set (id >= 256) after the template set (id 2).
    let messages =
        receive(&socket, |got| got.iter().any(|m| u32_at(m, 12) == 7 && ipfix_sets(m).iter().any(|id| *id >= 256)));
    assert!(!messages.is_empty(), "no IPFIX message arrived");
    for m in &messages {
        assert_eq!(u16::from_be_bytes([m[0], m[1]]), 10, "IPFIX version 10");
        assert_eq!(u16::from_be_bytes([m[2], m[3]]) as usize, m.len(), "message length");
        // The flow templates and records carry our observation domain; OVS sends its exporting
        // process statistics (an options template, set 3, and its record) in domain 0.
        if ipfix_sets(m).contains(&2) {
            assert_eq!(u32_at(m, 12), 7, "observation domain id of the templates");
        }
    }
    let data = messages.iter().filter(|m| u32_at(m, 12) == 7 && ipfix_sets(m).iter().any(|id| *id >= 256)).count();
    assert!(data > 0, "no data set among {} messages", messages.len());
    eprintln!("IPFIX: {} messages, {data} with flow records", messages.len());
}

#[tokio::test]
async fn a_foreign_exporter_is_a_conflict_unless_override_which_restores_it() {
    let ovs = Ovs::start("conflict");
    let foreign = ovs.vsctl(&[
        "--",
        "--id=@s",
        "create",
        "sflow",
        "agent=127.0.0.1",
        "target=\"10.9.9.9:6343\"",
        "header=64",
        "sampling=1000",
        "polling=20",
        "external_ids:team=net",
        "--",
        "set",
        "bridge",
        "br-int",
        "sflow=@s",
    ]);
    let client = connect(&ovs).await;
    let mut node = Node::new(ovs.settings());

    let skip = want(vec![export(Some(sflow("127.0.0.1:6343")), None)]);
    let report = node.reconcile(&client, &skip).await.unwrap();
    let b = &report.bridges[0];
    assert_eq!(b.state, State::Conflict, "{report:?}");
    assert!(b.status.conflict && !b.status.applied);
    assert!(b.status.message.contains("10.9.9.9:6343"), "{}", b.status.message);
    assert_eq!(ovs.vsctl(&["get", "bridge", "br-int", "sflow"]), foreign);
    assert_eq!(ovs.rows("sflow").len(), 1);
    assert_eq!(ovs.vsctl(&["get", "sflow", &foreign, "sampling"]), "1000");

    // Override: replaced, recorded.
    let mut over = skip.clone();
    over.bridges[0].conflict_policy = ConflictPolicy::Override;
    let report = node.reconcile(&client, &over).await.unwrap();
    let b = &report.bridges[0];
    assert_eq!(b.state, State::Verified, "{report:?}");
    assert!(b.status.applied && b.status.verified && !b.status.conflict);
    assert_eq!(ovs.rows("sflow").len(), 1);
    assert_eq!(ovs.ours("sflow"), 1);
    let ours = ovs.vsctl(&["get", "bridge", "br-int", "sflow"]);
    assert_ne!(ours, foreign);
    let record = ovs.vsctl(&["get", "sflow", &ours, &format!("external_ids:\"{REPLACED_KEY}\"")]);
    assert!(record.contains("10.9.9.9:6343"), "{record}");

    // Removal restores it, contents and all.
    let report = node.reconcile(&client, &want(vec![])).await.unwrap();
    assert!(report.bridges.is_empty() && report.problems.is_empty(), "{report:?}");
    assert_eq!(ovs.ours("sflow"), 0);
    let restored = ovs.vsctl(&["get", "bridge", "br-int", "sflow"]);
    assert_eq!(ovs.rows("sflow").len(), 1);
    for (column, value) in [
        ("targets", "[\"10.9.9.9:6343\"]"),
        ("sampling", "1000"),
        ("polling", "20"),
        ("header", "64"),
        ("agent", "\"127.0.0.1\""),
        ("external_ids", "{team=net}"),
    ] {
        assert_eq!(ovs.vsctl(&["get", "sflow", &restored, column]), value, "{column}");
    }
}

#[tokio::test]
async fn sampling_below_the_floor_and_a_disabled_exporter_are_reported() {
    let ovs = Ovs::start("refuse");
    let client = connect(&ovs).await;
    let mut node = Node::new(ovs.settings());

    let mut dense = sflow("127.0.0.1:6343");
    dense.sampling = 8;
    let report = node.reconcile(&client, &want(vec![export(Some(dense), None)])).await.unwrap();
    let b = &report.bridges[0];
    assert_eq!(b.state, State::Failed);
    assert!(b.status.message.contains("floor"), "{}", b.status.message);
    assert!(ovs.rows("sflow").is_empty(), "nothing written");

    // An agent interface that does not exist: OVS takes the row but disables the exporter.
    let mut bad = sflow("127.0.0.1:6343");
    bad.agent = "nosuchdev0".into();
    let report = node.reconcile(&client, &want(vec![export(Some(bad), None)])).await.unwrap();
    let b = &report.bridges[0];
    assert_eq!(b.state, State::Failed, "{report:?}");
    assert!(!b.status.applied && !b.status.verified);
    assert!(b.status.message.contains("disabled by OVS"), "{}", b.status.message);
    assert_eq!(ovs.ours("sflow"), 1);

    // A bridge that does not exist.
    let mut elsewhere = export(Some(sflow("127.0.0.1:6343")), None);
    elsewhere.bridge = "br-nope".into();
    let report = node.reconcile(&client, &want(vec![elsewhere])).await.unwrap();
    assert_eq!(report.bridges[0].state, State::Failed);
    assert!(report.bridges[0].status.message.contains("does not exist"));
    assert_eq!(ovs.ours("sflow"), 0, "br-int left the spec: removed");
    assert_eq!(report.ovs_version.chars().next(), Some('3'));
}

/// The agent's Open vSwitch loop on `ovs`, as `crosstrace agent` runs it, with the channels that
/// drive it: the desire in, the reports out, the stop switch.
struct Loop {
    want: watch::Sender<Option<Want>>,
    reports: watch::Receiver<Option<Report>>,
    stop: watch::Sender<bool>,
    /// Whether OVSDB is reachable (the agent's /readyz).
    ready: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Loop {
    fn start(ovs: &Ovs) -> Self {
        let (want, want_rx) = watch::channel(None);
        let (report_tx, reports) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(node::run(ovs.settings(), want_rx, report_tx, ready.clone(), stop_rx));
        Self { want, reports, stop, ready, task }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("the loop stops").unwrap();
    }
}

/// `ovs-vsctl` arguments that create `bridge` on the dummy datapath.
fn add_bridge(bridge: &str) -> Vec<&str> {
    vec!["add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=dummy"]
}

async fn wait_report(
    reports: &mut watch::Receiver<Option<Report>>,
    what: &str,
    ok: impl Fn(&Report) -> bool,
) -> Report {
    let check = |r: &Option<Report>| r.as_ref().is_some_and(&ok);
    let found = match tokio::time::timeout(PATIENCE, reports.wait_for(check)).await {
        Ok(Ok(r)) => r.clone(),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("timed out waiting for {what}: last {:?}", *reports.borrow()))
}

#[tokio::test]
async fn drift_restarts_and_reconnects_are_handled_by_the_loop() {
    let mut ovs = Ovs::start("drift");
    let mut agent = Loop::start(&ovs);
    agent.want.send(Some(want(vec![export(Some(sflow("127.0.0.1:6343")), Some(ipfix("127.0.0.1:4739")))]))).unwrap();
    wait_report(&mut agent.reports, "verified", |r| r.converged() && !r.bridges.is_empty()).await;
    assert!(agent.ready.load(std::sync::atomic::Ordering::Relaxed));

    // Someone clears the bridge's sFlow: re-applied within seconds, and said so.
    let started = Instant::now();
    ovs.vsctl(&["clear", "bridge", "br-int", "sflow"]);
    let r = wait_report(&mut agent.reports, "drift corrected", |r| r.converged() && r.drift_corrections >= 1).await;
    eprintln!("drift corrected in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(r.bridges[0].status.message.contains("re-applied after drift"), "{r:?}");
    assert_eq!(ovs.ours("sflow"), 1);
    assert!(trace(&ovs).await.sflow);

    // Someone edits our row: put back too.
    let ours = ovs.vsctl(&["get", "bridge", "br-int", "sflow"]);
    ovs.vsctl(&["set", "sflow", &ours, "sampling=4"]);
    wait_report(&mut agent.reports, "edit corrected", |r| r.converged() && r.drift_corrections >= 2).await;
    assert_eq!(ovs.vsctl(&["get", "sflow", &ours, "sampling"]), "64");

    // ovs-vswitchd restarts: re-verified, and said so.
    ovs.restart_vswitchd();
    let r = wait_report(&mut agent.reports, "re-verified after restart", |r| {
        r.converged() && r.bridges[0].status.message.contains("restarted")
    })
    .await;
    assert!(r.bridges[0].status.verified);
    assert!(trace(&ovs).await.sflow);

    // ovsdb-server restarts: the agent reconnects (the problem shows meanwhile) and converges again.
    ovs.restart_ovsdb_server();
    wait_report(&mut agent.reports, "converged after reconnect", |r| r.converged()).await;
    ovs.vsctl(&["clear", "bridge", "br-int", "ipfix"]);
    wait_report(&mut agent.reports, "drift after reconnect", |r| r.converged() && r.drift_corrections >= 3).await;
    assert_eq!(ovs.ours("ipfix"), 1);

    // The NodeTracing goes away: nothing of ours left.
    agent.want.send(Some(Want::default())).unwrap();
    wait_report(&mut agent.reports, "removal", |r| r.bridges.is_empty()).await;
    assert_eq!(ovs.ours("sflow") + ovs.ours("ipfix"), 0);
    assert!(ovs.rows("sflow").is_empty() && ovs.rows("ipfix").is_empty());

    agent.stop().await;
}

// Two threads: the agent's loop goes on while the test waits on ovs-vsctl (blocking).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_ours_that_no_node_tracing_asks_for_are_removed_when_the_agent_starts() {
    let ovs = Ovs::start("orphans");
    ovs.vsctl(&add_bridge("br-ex"));
    // A foreign sFlow exporter on br-ex, and a foreign IPFIX exporter on br-int.
    let foreign_sflow = ovs.vsctl(&[
        "--",
        "--id=@s",
        "create",
        "sflow",
        "agent=127.0.0.1",
        "targets=\"10.9.9.9:6343\"",
        "sampling=1000",
        "external_ids:team=net",
        "--",
        "set",
        "bridge",
        "br-ex",
        "sflow=@s",
    ]);
    let foreign_ipfix = ovs.vsctl(&[
        "--",
        "--id=@i",
        "create",
        "ipfix",
        "targets=\"10.9.9.9:4739\"",
        "external_ids:team=net",
        "--",
        "set",
        "bridge",
        "br-int",
        "ipfix=@i",
    ]);

    // An earlier run of the agent exported sFlow on br-int and, overriding, on br-ex; then it stopped
    // (the export stays) and its NodeTracing was deleted meanwhile.
    {
        let client = connect(&ovs).await;
        let mut on_ex = export(Some(sflow("127.0.0.1:6343")), None);
        on_ex.bridge = "br-ex".into();
        on_ex.conflict_policy = ConflictPolicy::Override;
        let before = want(vec![export(Some(sflow("127.0.0.1:6343")), None), on_ex]);
        let report = Node::new(ovs.settings()).reconcile(&client, &before).await.unwrap();
        assert!(report.converged(), "{report:?}");
        assert_eq!(ovs.ours("sflow"), 2);
    }

    // The agent starts: its watch lists no NodeTracing for this node, and that is the desire.
    let mut desired = Desired::new("n1");
    assert_eq!(desired.observe(Seen::Event(Event::Init)), None);
    let nothing = desired.observe(Seen::Event(Event::InitDone)).expect("known after the listing");
    let mut agent = Loop::start(&ovs);
    agent.want.send(Some(nothing)).unwrap();
    let r = wait_report(&mut agent.reports, "removal", |r| r.bridges.is_empty() && r.problems.is_empty()).await;
    assert_eq!(r.generation, None);
    let leftovers = || ovs.ours("sflow") + ovs.ours("ipfix");
    wait_for(|| leftovers() == 0, "no row of crosstrace");
    assert_eq!(ovs.vsctl(&["get", "bridge", "br-int", "sflow"]), "[]");
    assert_eq!(ovs.vsctl(&["get", "bridge", "br-int", "ipfix"]), foreign_ipfix, "the foreign IPFIX row is untouched");
    let restored = ovs.vsctl(&["get", "bridge", "br-ex", "sflow"]);
    assert_ne!(restored, "[]", "the exporter crosstrace replaced is back");
    for (column, value) in [("targets", "[\"10.9.9.9:6343\"]"), ("sampling", "1000"), ("external_ids", "{team=net}")] {
        assert_eq!(
            ovs.vsctl(&["get", "sflow", &restored, column]),
            value,
            "{column} of {restored} (was {foreign_sflow})"
        );
    }

    // A row of ours appearing later (an older agent, a restored backup) goes as well: every pass
    // reads which rows are crosstrace's from OVSDB, and the monitor wakes the loop.
    let owner = format!("external_ids:\"{OWNER_KEY}\"={OWNER}");
    ovs.vsctl(&[
        "--",
        "--id=@s",
        "create",
        "sflow",
        "targets=\"127.0.0.1:6343\"",
        &owner,
        "--",
        "set",
        "bridge",
        "br-int",
        "sflow=@s",
    ]);
    let started = Instant::now();
    wait_for(|| leftovers() == 0, "the stray row of crosstrace to be removed");
    assert!(started.elapsed() < Duration::from_secs(5), "removed within seconds, took {:?}", started.elapsed());
    assert_eq!(ovs.vsctl(&["get", "bridge", "br-ex", "sflow"]), restored, "foreign rows stay as they are");
    assert_eq!(ovs.vsctl(&["get", "bridge", "br-int", "ipfix"]), foreign_ipfix);
    agent.stop().await;
}

#[tokio::test]
async fn a_bridge_deleted_and_created_again_is_re_applied_and_pending_meanwhile() {
    let ovs = Ovs::start("rebridge");
    let mut agent = Loop::start(&ovs);
    let spec = want(vec![export(Some(sflow("127.0.0.1:6343")), Some(ipfix("127.0.0.1:4739")))]);
    agent.want.send(Some(spec)).unwrap();
    wait_report(&mut agent.reports, "verified", |r| r.converged() && !r.bridges.is_empty()).await;

    // Deleted: its rows go with it (OVSDB collects them); the bridge is pending, not failed.
    ovs.vsctl(&["del-br", "br-int"]);
    let gone = |r: &Report| r.bridges.first().is_some_and(|b| b.status.message.contains("any more"));
    let r = wait_report(&mut agent.reports, "the bridge gone", gone).await;
    let b = &r.bridges[0];
    assert_eq!(b.state, State::Pending, "{r:?}");
    assert!(!b.status.applied && !b.status.verified);
    assert!(b.status.message.contains("re-applied when it is back"), "{}", b.status.message);
    let status = status::node_status(&r, None, k8s_openapi::jiff::Timestamp::now());
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.status, "False", "a bridge gone after it exported is not a failure: {degraded:?}");
    assert_eq!(ovs.ours("sflow") + ovs.ours("ipfix"), 0);

    // Created again: re-applied within seconds, reported applied and verified, and why.
    let started = Instant::now();
    ovs.vsctl(&add_bridge("br-int"));
    let r = wait_report(&mut agent.reports, "re-applied", |r| r.converged() && r.drift_corrections >= 1).await;
    eprintln!("bridge re-applied {:?} after it came back", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    let b = &r.bridges[0].status;
    assert!(b.applied && b.verified && b.applied_generation == 1, "{b:?}");
    assert!(b.message.contains("was deleted at") && b.message.contains("created again"), "{}", b.message);
    assert_eq!((ovs.ours("sflow"), ovs.ours("ipfix")), (1, 1));
    let seen = trace(&ovs).await;
    assert!(seen.sflow && seen.ipfix, "{seen:?}");

    // Deleted and created again in one transaction, faster than a pass: re-applied the same way.
    ovs.vsctl(&["del-br", "br-int", "--", "add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=dummy"]);
    let r = wait_report(&mut agent.reports, "re-applied again", |r| r.converged() && r.drift_corrections >= 2).await;
    assert!(r.bridges[0].status.message.contains("created again"), "{r:?}");
    assert_eq!((ovs.ours("sflow"), ovs.ours("ipfix")), (1, 1));
    agent.stop().await;
}

#[tokio::test]
async fn the_client_keeps_a_quiet_connection_alive_and_monitors() {
    let ovs = Ovs::start("client");
    let options = ovsdb::Options { probe: Duration::from_millis(200), request_timeout: Duration::from_secs(5) };
    let client = Client::connect_with(&ovs.db(), options).await.unwrap();
    assert!(client.list_dbs().await.unwrap().contains(&"Open_vSwitch".to_string()));
    // Quiet for many probe intervals: our echoes keep it open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!client.is_closed());
    client.echo().await.unwrap();

    let mut updates = client.take_updates().unwrap();
    client
        .monitor(ovsdb::OPEN_VSWITCH, serde_json::json!("t"), serde_json::json!({"Bridge": [{"columns": ["sflow"]}]}))
        .await
        .unwrap();
    ovs.vsctl(&[
        "--",
        "--id=@s",
        "create",
        "sflow",
        "target=\"10.1.1.1:6343\"",
        "--",
        "set",
        "bridge",
        "br-int",
        "sflow=@s",
    ]);
    let update = tokio::time::timeout(PATIENCE, updates.recv()).await.expect("an update").expect("the channel is open");
    assert_eq!(update.monitor_id, serde_json::json!("t"));
    assert!(update.tables.get("Bridge").is_some(), "{:?}", update.tables);

    // A transaction error names the operation, and the connection survives it.
    let err = client
        .transact(
            ovsdb::OPEN_VSWITCH,
            &[ovsdb::Op::Insert {
                table: "sFlow".into(),
                row: serde_json::from_value(serde_json::json!({"sampling": "not a number"})).unwrap(),
                uuid_name: None,
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ovsdb::Error::Op { index: 0, .. }), "{err}");
    client.echo().await.unwrap();

    // The locator finds the daemon from the pidfile next to the OVSDB socket.
    let locator = Locator::new(None, &ovs.path("db.sock"));
    let (ctl, pid) = locator.resolve().unwrap();
    assert_eq!(pid, ovs.vswitchd.as_ref().map(Child::id));
    assert_eq!(ctl, ovs.unixctl().path());
}
