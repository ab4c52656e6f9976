//! A client of the ovs-vswitchd control socket (`ovs-appctl`'s protocol): one JSON-RPC request per
//! connection, `{"id":0,"method":"ofproto/trace","params":["br-int","in_port=LOCAL"]}`, answered with
//! `{"id":0,"result":"<text>","error":null}` or an error text.
//!
//! What the agent reads from it: the daemon's `version`, and `ofproto/trace`, whose "Datapath actions"
//! show the sampling actions of a bridge that exports. Open vSwitch 3.1 prints, for sFlow,
//! `sample(sample=1.6%,actions(userspace(pid=0,sFlow(vid=0,pcp=0,output=2147483650),actions)))` and,
//! for bridge IPFIX, `sample(sample=1.6%,actions(userspace(pid=0,ipfix(output_port=4294967295))))`
//! (per-flow IPFIX shows `flow_sample(`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::ovsdb::FrameDecoder;

/// What can go wrong talking to ovs-vswitchd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find the ovs-vswitchd control socket: {0}")]
    Locate(String),
    #[error("ovs-vswitchd control socket {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("ovs-vswitchd control socket {path}: no answer within {secs}s")]
    Timeout { path: String, secs: u64 },
    #[error("ovs-vswitchd control socket {path}: malformed reply: {detail}")]
    Malformed { path: String, detail: String },
    #[error("ovs-vswitchd {method} failed: {error}")]
    Command { method: String, error: String },
}

/// The request `ovs-appctl` sends.
pub fn request(id: u64, method: &str, params: &[&str]) -> Value {
    json!({"id": id, "method": method, "params": params})
}

/// The text of a reply, or the error ovs-vswitchd gave.
pub fn parse_reply(method: &str, reply: &Value) -> Result<String, String> {
    let Some(o) = reply.as_object() else {
        return Err(format!("not an object: {reply}"));
    };
    match o.get("error") {
        Some(Value::Null) | None => {}
        Some(Value::String(e)) => return Err(format!("{method}: {}", e.trim_end())),
        Some(other) => return Err(format!("{method}: {other}")),
    }
    match o.get("result") {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Null) | None => Ok(String::new()),
        // Newer daemons may answer JSON when asked to; keep it as text.
        Some(other) => Ok(other.to_string()),
    }
}

/// The `Datapath actions:` lines of an `ofproto/trace` output (one per recirculation).
pub fn datapath_actions(trace: &str) -> Vec<&str> {
    trace.lines().filter_map(|l| l.trim_start().strip_prefix("Datapath actions:")).map(str::trim).collect()
}

/// The sampling actions an `ofproto/trace` shows in the datapath.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sampling {
    /// `sFlow(`: the bridge exports sFlow.
    pub sflow: bool,
    /// `ipfix(`: the bridge exports IPFIX.
    pub ipfix: bool,
    /// `flow_sample(`: per-flow IPFIX sampling.
    pub flow_sample: bool,
}

pub fn sampling_in_trace(trace: &str) -> Sampling {
    let mut s = Sampling::default();
    for actions in datapath_actions(trace) {
        s.sflow |= actions.contains("sFlow(");
        s.ipfix |= actions.contains("ipfix(");
        s.flow_sample |= actions.contains("flow_sample(");
    }
    s
}

/// `ovs-vswitchd (Open vSwitch) 3.1.0` → `3.1.0`.
pub fn parse_version(text: &str) -> Option<String> {
    let first = text.lines().next()?.trim();
    let version = first.rsplit_once(')').map_or(first, |(_, v)| v).split_whitespace().next()?;
    version.chars().next().filter(char::is_ascii_digit).map(|_| version.to_string())
}

/// Where ovs-vswitchd listens, found again on every use so that a restarted daemon is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// A socket given by the user.
    fixed: Option<PathBuf>,
    /// The run directory: `ovs-vswitchd.pid` is there, and the socket is `ovs-vswitchd.<pid>.ctl`
    /// (what `ovs-appctl -t ovs-vswitchd` looks for) or `ovs-vswitchd.ctl` (a daemon started with
    /// `--unixctl=<rundir>/ovs-vswitchd.ctl`).
    rundir: PathBuf,
}

impl Locator {
    /// `fixed` if given, else found in the rundir of the OVSDB socket (`/var/run/openvswitch/db.sock`).
    /// The pidfile there tells the daemon's pid either way (a changed pid is a restart).
    pub fn new(fixed: Option<PathBuf>, ovsdb_socket: &Path) -> Self {
        Self { fixed, rundir: ovsdb_socket.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf) }
    }

    fn pid(&self) -> Result<u32, Error> {
        let pidfile = self.rundir.join("ovs-vswitchd.pid");
        let text =
            std::fs::read_to_string(&pidfile).map_err(|e| Error::Locate(format!("{}: {e}", pidfile.display())))?;
        text.trim().parse().map_err(|_| Error::Locate(format!("{}: not a pid: {text:?}", pidfile.display())))
    }

    /// The control socket and the daemon's pid (when its pidfile is readable).
    pub fn resolve(&self) -> Result<(PathBuf, Option<u32>), Error> {
        if let Some(path) = &self.fixed {
            return Ok((path.clone(), self.pid().ok()));
        }
        let pid = self.pid()?;
        let by_pid = self.rundir.join(format!("ovs-vswitchd.{pid}.ctl"));
        let plain = self.rundir.join("ovs-vswitchd.ctl");
        let path = if !by_pid.exists() && plain.exists() { plain } else { by_pid };
        Ok((path, Some(pid)))
    }

    /// A client of the daemon that runs now.
    pub fn client(&self) -> Result<(Unixctl, Option<u32>), Error> {
        let (path, pid) = self.resolve()?;
        Ok((Unixctl::new(path), pid))
    }
}

/// A client of one control socket. Each call is a connection of its own.
#[derive(Clone, Debug)]
pub struct Unixctl {
    path: PathBuf,
    timeout: Duration,
}

impl Unixctl {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), timeout: Duration::from_secs(10) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a command and returns its text output.
    pub async fn call(&self, method: &str, params: &[&str]) -> Result<String, Error> {
        let path = self.path.display().to_string();
        let reply = tokio::time::timeout(self.timeout, self.exchange(method, params))
            .await
            .map_err(|_| Error::Timeout { path: path.clone(), secs: self.timeout.as_secs() })??;
        parse_reply(method, &reply).map_err(|error| Error::Command { method: method.into(), error })
    }

    async fn exchange(&self, method: &str, params: &[&str]) -> Result<Value, Error> {
        let path = self.path.display().to_string();
        let io = |source| Error::Io { path: path.clone(), source };
        let mut stream = UnixStream::connect(&self.path).await.map_err(io)?;
        let bytes = serde_json::to_vec(&request(0, method, params))
            .map_err(|e| Error::Malformed { path: path.clone(), detail: e.to_string() })?;
        stream.write_all(&bytes).await.map_err(io)?;
        let mut decoder = FrameDecoder::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let malformed = |detail: String| Error::Malformed { path: path.clone(), detail };
            match decoder.next_value() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => return Err(malformed(e.to_string())),
            }
            let n = stream.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                return Err(malformed("connection closed before a reply".into()));
            }
            decoder.push(&buf[..n]);
        }
    }

    /// The daemon's version text, e.g. `ovs-vswitchd (Open vSwitch) 3.1.0`.
    pub async fn version(&self) -> Result<String, Error> {
        self.call("version", &[]).await
    }

    /// `ofproto/trace BRIDGE FLOW`.
    pub async fn trace(&self, bridge: &str, flow: &str) -> Result<String, Error> {
        self.call("ofproto/trace", &[bridge, flow]).await
    }
}

/// The flow traced to prove a bridge samples: a frame from the bridge's own port, which every bridge
/// has, whatever its flow table does with it (ingress sampling comes first).
pub const PROBE_FLOW: &str = "in_port=LOCAL,dl_src=02:00:00:00:00:01,dl_dst=02:00:00:00:00:02";

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE_31: &str = "Flow: in_port=LOCAL,vlan_tci=0x0000,dl_src=02:00:00:00:00:01,dl_dst=02:00:00:00:00:02,dl_type=0x0000

bridge(\"br-int\")
----------------
 0. priority 0
    NORMAL
     -> no learned MAC for destination, flooding

Final flow: unchanged
Megaflow: recirc_id=0,eth,in_port=LOCAL,dl_src=02:00:00:00:00:01,dl_dst=02:00:00:00:00:02,dl_type=0x0000
Datapath actions: sample(sample=1.6%,actions(userspace(pid=0,sFlow(vid=0,pcp=0,output=2147483650),actions))),sample(sample=1.6%,actions(userspace(pid=0,ipfix(output_port=4294967295)))),1,2
";

    #[test]
    fn finds_sampling_actions() {
        assert_eq!(datapath_actions(TRACE_31).len(), 1);
        let s = sampling_in_trace(TRACE_31);
        assert!(s.sflow && s.ipfix && !s.flow_sample);
        let plain = "Megaflow: x\nDatapath actions: 3,2\n";
        assert_eq!(sampling_in_trace(plain), Sampling::default());
        // The words elsewhere in the trace do not count.
        let elsewhere = "bridge(\"sFlow(\")\n ipfix( \nDatapath actions: drop\n";
        assert_eq!(sampling_in_trace(elsewhere), Sampling::default());
        assert_eq!(sampling_in_trace(""), Sampling::default());
        let recirc = "Datapath actions: ct,recirc(0x1)\n\nDatapath actions: flow_sample(probability=65535)\n";
        assert!(sampling_in_trace(recirc).flow_sample);
    }

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_reply("version", &json!({"id": 0, "result": "ovs-vswitchd (Open vSwitch) 3.1.0\n", "error": null}))
                .unwrap(),
            "ovs-vswitchd (Open vSwitch) 3.1.0\n"
        );
        assert_eq!(
            parse_reply("ofproto/trace", &json!({"id": 0, "result": null, "error": "no bridge named br-x\n"}))
                .unwrap_err(),
            "ofproto/trace: no bridge named br-x"
        );
        assert!(parse_reply("x", &json!([1])).is_err());
        assert!(parse_reply("x", &json!({"error": {"a": 1}})).is_err());
        assert_eq!(parse_reply("x", &json!({"id": 0})).unwrap(), "");
        assert_eq!(
            request(0, "ofproto/trace", &["br-int", "in_port=1"]),
            json!({"id": 0, "method": "ofproto/trace", "params": ["br-int", "in_port=1"]})
        );
    }

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("ovs-vswitchd (Open vSwitch) 3.1.0\n").as_deref(), Some("3.1.0"));
        assert_eq!(parse_version("ovs-vswitchd (Open vSwitch) 3.3.0\nDPDK 23.11.0\n").as_deref(), Some("3.3.0"));
        assert_eq!(parse_version("3.1.0").as_deref(), Some("3.1.0"));
        assert_eq!(parse_version("").as_deref(), None);
        assert_eq!(parse_version("ovs-vswitchd (Open vSwitch)").as_deref(), None);
    }

    #[test]
    fn locates_the_control_socket() {
        let dir = std::env::temp_dir().join(format!("crosstrace-unixctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let locator = Locator::new(None, &dir.join("db.sock"));
        assert!(locator.resolve().is_err());
        std::fs::write(dir.join("ovs-vswitchd.pid"), "4242\n").unwrap();
        assert_eq!(locator.resolve().unwrap(), (dir.join("ovs-vswitchd.4242.ctl"), Some(4242)));
        // A daemon started with --unixctl=<rundir>/ovs-vswitchd.ctl.
        std::fs::write(dir.join("ovs-vswitchd.ctl"), "").unwrap();
        assert_eq!(locator.resolve().unwrap(), (dir.join("ovs-vswitchd.ctl"), Some(4242)));
        let fixed = Locator::new(Some("/run/x.ctl".into()), &dir.join("db.sock"));
        assert_eq!(fixed.resolve().unwrap(), (PathBuf::from("/run/x.ctl"), Some(4242)));
        std::fs::write(dir.join("ovs-vswitchd.pid"), "x").unwrap();
        assert!(locator.resolve().is_err());
        assert_eq!(fixed.resolve().unwrap().1, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
