//! Node agents and Open vSwitch of the local real cluster: one `crosstrace agent` host process per
//! simulated node, pointed at that node's OVS (`CROSSTRACE_NODE_<i>_OVSDB` / `_UNIXCTL` from
//! `e2e/cluster.sh env`) and authenticated with the token `e2e/install-chart.sh` bound to the chart's
//! agent pod on that node; `ovs-vsctl` / `ovs-appctl` on a node's OVS; and a UDP flow collector on
//! loopback that decodes sFlow v5 datagrams and IPFIX (v10) messages.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the local cluster and `eval \"$(e2e/cluster.sh env)\"` (or run `just e2e`)")
    })
}

/// How many simulated nodes the cluster has (`CROSSTRACE_E2E_NODES`).
pub fn node_count() -> usize {
    env("CROSSTRACE_E2E_NODES").parse().expect("CROSSTRACE_E2E_NODES is a number")
}

/// The name of node `i` (`kwok-node-<i>`).
pub fn node_name(i: usize) -> String {
    env(&format!("CROSSTRACE_NODE_{i}"))
}

/// `unix:PATH` of node `i`'s OVSDB server.
pub fn ovsdb(i: usize) -> String {
    env(&format!("CROSSTRACE_NODE_{i}_OVSDB"))
}

/// The control socket of node `i`'s ovs-vswitchd.
pub fn unixctl(i: usize) -> String {
    env(&format!("CROSSTRACE_NODE_{i}_UNIXCTL"))
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().unwrap().port()
}

/// The last `lines` lines of a text.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        format!("{program} does not run (openvswitch-switch installed, PATH from cluster.sh env?): {e}")
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// `ovs-vsctl --db=<node i's OVSDB> ARGS`, or the error.
pub fn try_ovs_vsctl(i: usize, args: &[&str]) -> Result<String, String> {
    let db = format!("--db={}", ovsdb(i));
    let mut all = vec![db.as_str(), "--timeout=10"];
    all.extend_from_slice(args);
    run("ovs-vsctl", &all)
}

/// `ovs-vsctl --db=<node i's OVSDB> ARGS`; panics when it fails.
pub fn ovs_vsctl(i: usize, args: &[&str]) -> String {
    try_ovs_vsctl(i, args).unwrap_or_else(|e| panic!("node {i}: {e}"))
}

/// `ovs-appctl -t <node i's vswitchd control socket> ARGS`; panics when it fails.
pub fn ovs_appctl(i: usize, args: &[&str]) -> String {
    let target = unixctl(i);
    let mut all = vec!["-t", target.as_str()];
    all.extend_from_slice(args);
    run("ovs-appctl", &all).unwrap_or_else(|e| panic!("node {i}: {e}"))
}

/// The uuids of the rows of `table` (`sflow`, `ipfix`) on node `i` that match every `key=value` of
/// `external_ids` given.
pub fn rows_with(i: usize, table: &str, external_ids: &[(&str, &str)]) -> Vec<String> {
    let conditions: Vec<String> = external_ids.iter().map(|(k, v)| format!("external_ids:\"{k}\"=\"{v}\"")).collect();
    let mut args = vec!["--bare", "--columns=_uuid", "find", table];
    args.extend(conditions.iter().map(String::as_str));
    ovs_vsctl(i, &args).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// Creates node `i`'s br-int with its dummy ports p1..p3 again (as `e2e/cluster.sh` made it), unless
/// it exists.
pub fn ensure_br_int(i: usize) {
    let mut args = vec!["--", "--may-exist", "add-br", "br-int"];
    let ports: Vec<(String, String)> = (1..=3).map(|p| (format!("p{p}"), format!("ofport_request={p}"))).collect();
    for (port, ofport) in &ports {
        args.extend(["--", "--may-exist", "add-port", "br-int", port, "--", "set", "Interface", port, "type=dummy"]);
        args.push(ofport);
    }
    ovs_vsctl(i, &args);
}

/// The uuid a bridge column (`sflow`, `ipfix`) points at, `None` when empty.
pub fn bridge_exporter(i: usize, bridge: &str, column: &str) -> Option<String> {
    let v = ovs_vsctl(i, &["get", "bridge", bridge, column]);
    (v != "[]" && !v.is_empty()).then_some(v)
}

/// The ODP flow of a UDP packet from a per-node source (MAC 02:00:00:00:<i>:01, IP 10.0.<i>.1) on p1.
pub fn packet_of_node(i: usize) -> String {
    format!(
        "in_port(1),eth(src={},dst=02:00:00:00:ff:02),eth_type(0x0800),\
         ipv4(src={},dst=10.0.255.2,proto=17,tos=0,ttl=64,frag=no),udp(src=1234,dst=80)",
        source_mac(i).iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        source_ip(i)
    )
}

/// The source MAC of [`packet_of_node`].
pub fn source_mac(i: usize) -> [u8; 6] {
    [2, 0, 0, 0, u8::try_from(i).expect("few nodes"), 1]
}

/// The source IPv4 address of [`packet_of_node`].
pub fn source_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, u8::try_from(i).expect("few nodes"), 1)
}

/// Injects `n` packets of [`packet_of_node`] on node `i`'s port p1 (`netdev-dummy/receive`).
pub fn inject(i: usize, n: usize) {
    let packet = packet_of_node(i);
    const PER_CALL: usize = 50;
    let mut left = n;
    while left > 0 {
        let batch = left.min(PER_CALL);
        let mut args = vec!["netdev-dummy/receive", "p1"];
        args.extend(std::iter::repeat_n(packet.as_str(), batch));
        ovs_appctl(i, &args);
        left -= batch;
    }
}

/// A `crosstrace agent` host process for one node, stopped (by its PID) when dropped.
pub struct AgentProcess {
    child: Child,
    pub node_index: usize,
    pub node: String,
    pub admin_port: u16,
    log: std::path::PathBuf,
}

impl AgentProcess {
    /// Starts the agent of node `node_index` with the chart's agent ServiceAccount token for that node.
    pub fn start(node_index: usize) -> Self {
        let node = node_name(node_index);
        let state = env("CROSSTRACE_E2E_STATE");
        let kubeconfig = format!("{state}/agent-{node}.kubeconfig");
        assert!(
            std::path::Path::new(&kubeconfig).exists(),
            "{kubeconfig} is missing: run e2e/install-chart.sh (it writes one agent kubeconfig per node, its token \
             bound to the chart's agent pod there)"
        );
        let admin_port = free_port();
        let log = std::env::temp_dir().join(format!("crosstrace-agent-{node}-{}-{admin_port}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("agent log file");
        let child = Command::new(env!("CARGO_BIN_EXE_crosstrace"))
            .args(["agent", "--node-name", &node, "--ovsdb", &ovsdb(node_index), "--unixctl", &unixctl(node_index)])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", super::log_filter())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start crosstrace agent");
        Self { child, node_index, node, admin_port, log }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops this agent by its PID (SIGTERM, then SIGKILL after 5 s), as a node losing its agent
    /// would: the export it made stays in OVS.
    pub fn stop(&mut self) {
        super::stop(&mut self.child);
    }
}

impl Drop for AgentProcess {
    /// SIGTERM (the agent leaves the export in place and stops), then SIGKILL after 5 s.
    fn drop(&mut self) {
        super::stop(&mut self.child);
    }
}

/// One agent per node of the cluster.
pub struct Agents {
    pub agents: Vec<AgentProcess>,
}

impl Agents {
    pub fn start_all() -> Self {
        Self { agents: (0..node_count()).map(AgentProcess::start).collect() }
    }

    /// The tails of every agent's log, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        self.agents.iter().map(|a| format!("--- agent {} ---\n{}\n", a.node, tail(&a.log(), lines))).collect()
    }
}

/// A UDP flow collector on 127.0.0.1 (ephemeral port).
pub struct Collector {
    socket: tokio::net::UdpSocket,
}

impl Collector {
    pub async fn bind() -> Self {
        Self { socket: tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind a UDP collector") }
    }

    /// `127.0.0.1:<port>`, the target to export to.
    pub fn target(&self) -> String {
        self.socket.local_addr().unwrap().to_string()
    }

    /// The next datagram and its source, or `None` after `wait`.
    pub async fn recv(&self, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 65536];
        match tokio::time::timeout(wait, self.socket.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
            _ => None,
        }
    }

    /// Drops whatever arrived so far.
    pub async fn drain(&self) {
        while self.recv(Duration::from_millis(50)).await.is_some() {}
    }
}

/// A bounds-checked big-endian reader: malformed input is an error, never a panic.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.data.len());
        let end = end.ok_or_else(|| format!("truncated: wanted {n} bytes at {} of {}", self.at, self.data.len()))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.bytes(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    fn left(&self) -> usize {
        self.data.len() - self.at
    }
}

/// An sFlow v5 flow sample (format 1) as far as the tests need it.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSample {
    pub sampling_rate: u32,
    /// Source MAC of the raw packet header record (record format 1, Ethernet), if any.
    pub source_mac: Option<[u8; 6]>,
}

/// An sFlow v5 datagram header and its samples.
#[derive(Clone, Debug, PartialEq)]
pub struct SflowDatagram {
    pub version: u32,
    /// Agent address type (1 = IPv4).
    pub address_type: u32,
    pub agent: Ipv4Addr,
    pub sequence: u32,
    /// Sample formats (1: flow sample, 2: counter sample, ...).
    pub formats: Vec<u32>,
    pub flow_samples: Vec<FlowSample>,
}

/// Decodes an sFlow v5 datagram (header, sample formats, flow samples' sampled Ethernet source).
pub fn decode_sflow(d: &[u8]) -> Result<SflowDatagram, String> {
    let mut r = Reader::new(d);
    let version = r.u32()?;
    if version != 5 {
        return Err(format!("not sFlow v5: version {version}"));
    }
    let address_type = r.u32()?;
    if address_type != 1 {
        return Err(format!("agent address type {address_type}, expected 1 (IPv4)"));
    }
    let a = r.bytes(4)?;
    let agent = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
    let _sub_agent = r.u32()?;
    let sequence = r.u32()?;
    let _uptime = r.u32()?;
    let samples = r.u32()?;
    let mut formats = Vec::new();
    let mut flow_samples = Vec::new();
    for _ in 0..samples {
        let format = r.u32()? & 0xfff;
        let length = r.u32()? as usize;
        let body = r.bytes(length)?;
        formats.push(format);
        if format == 1 {
            flow_samples.push(decode_flow_sample(body)?);
        }
    }
    Ok(SflowDatagram { version, address_type, agent, sequence, formats, flow_samples })
}

fn decode_flow_sample(body: &[u8]) -> Result<FlowSample, String> {
    let mut r = Reader::new(body);
    let _sequence = r.u32()?;
    let _source_id = r.u32()?;
    let sampling_rate = r.u32()?;
    let _pool = r.u32()?;
    let _drops = r.u32()?;
    let _input = r.u32()?;
    let _output = r.u32()?;
    let records = r.u32()?;
    let mut source_mac = None;
    for _ in 0..records {
        let format = r.u32()? & 0xfff;
        let length = r.u32()? as usize;
        let data = r.bytes(length)?;
        if format == 1 {
            // Raw packet header: protocol (1 = Ethernet), frame length, stripped, header length, header.
            let mut h = Reader::new(data);
            let protocol = h.u32()?;
            let _frame = h.u32()?;
            let _stripped = h.u32()?;
            let header_length = h.u32()? as usize;
            let header = h.bytes(header_length)?;
            if protocol == 1 && header.len() >= 12 {
                source_mac = Some(header[6..12].try_into().unwrap());
            }
        }
    }
    Ok(FlowSample { sampling_rate, source_mac })
}

/// An IPFIX message header and its sets.
#[derive(Clone, Debug, PartialEq)]
pub struct IpfixMessage {
    pub version: u16,
    pub length: u16,
    pub sequence: u32,
    pub domain: u32,
    /// (set id, set body): 2 template set, 3 options template set, >= 256 data set.
    pub sets: Vec<(u16, Vec<u8>)>,
}

/// Decodes an IPFIX message header and splits it into sets.
pub fn decode_ipfix(m: &[u8]) -> Result<IpfixMessage, String> {
    let mut r = Reader::new(m);
    let version = r.u16()?;
    if version != 10 {
        return Err(format!("not IPFIX: version {version}"));
    }
    let length = r.u16()?;
    if usize::from(length) != m.len() {
        return Err(format!("message length {length} but {} bytes received", m.len()));
    }
    let _export_time = r.u32()?;
    let sequence = r.u32()?;
    let domain = r.u32()?;
    let mut sets = Vec::new();
    while r.left() >= 4 {
        let id = r.u16()?;
        let len = usize::from(r.u16()?);
        if len < 4 {
            return Err(format!("set {id} has length {len}"));
        }
        sets.push((id, r.bytes(len - 4)?.to_vec()));
    }
    Ok(IpfixMessage { version, length, sequence, domain, sets })
}

/// A template field: (information element id, enterprise number, length; 65535 = variable).
type Field = (u16, u32, u16);

/// The templates an IPFIX exporter sent, to decode its data records.
#[derive(Default)]
pub struct IpfixTemplates {
    /// By (exporter address, observation domain, template id).
    templates: BTreeMap<(SocketAddr, u32, u16), Vec<Field>>,
}

impl IpfixTemplates {
    /// Learns the templates of a message and returns its data records, each as a map from
    /// information element id (IANA, enterprise 0 only) to value. Data sets of unknown templates are skipped.
    pub fn records(&mut self, from: SocketAddr, m: &IpfixMessage) -> Result<Vec<BTreeMap<u16, Vec<u8>>>, String> {
        let mut out = Vec::new();
        for (id, body) in &m.sets {
            match *id {
                2 | 3 => self.learn(from, m.domain, *id == 3, body)?,
                id if id >= 256 => {
                    let Some(fields) = self.templates.get(&(from, m.domain, id)) else { continue };
                    // The shortest record: fixed lengths, one length byte per variable-length field.
                    let shortest: usize = fields.iter().map(|f| if f.2 == 65535 { 1 } else { usize::from(f.2) }).sum();
                    let mut r = Reader::new(body);
                    while shortest > 0 && r.left() >= shortest {
                        let mut record = BTreeMap::new();
                        for (ie, enterprise, len) in fields {
                            let len = match *len {
                                65535 => match r.u8()? {
                                    255 => usize::from(r.u16()?),
                                    n => usize::from(n),
                                },
                                n => usize::from(n),
                            };
                            let value = r.bytes(len)?;
                            if *enterprise == 0 {
                                record.insert(*ie, value.to_vec());
                            }
                        }
                        out.push(record);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    fn learn(&mut self, from: SocketAddr, domain: u32, options: bool, body: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(body);
        while r.left() >= 4 {
            let id = r.u16()?;
            let count = r.u16()?;
            if id < 256 {
                break; // padding
            }
            if options {
                let _scope_count = r.u16()?;
            }
            let mut fields = Vec::new();
            for _ in 0..count {
                let raw = r.u16()?;
                let len = r.u16()?;
                let enterprise = if raw & 0x8000 != 0 { r.u32()? } else { 0 };
                fields.push((raw & 0x7fff, enterprise, len));
            }
            self.templates.insert((from, domain, id), fields);
        }
        Ok(())
    }
}

/// IANA IPFIX information elements the tests read.
pub const IE_SOURCE_IPV4: u16 = 8;
pub const IE_SOURCE_MAC: u16 = 56;
