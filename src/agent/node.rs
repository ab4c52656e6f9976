//! The Open vSwitch side of the agent, free of Kubernetes: given what the node should export
//! ([`Want`]), keep OVSDB that way and report what is true ([`Report`]).
//!
//! [`Node::reconcile`] is one pass: read, plan, apply, wait for `cur_cfg`, read again, prove with
//! `ofproto/trace`. [`run`] drives passes: on a new [`Want`], on every `monitor` update (someone changed
//! a bridge's exporter or our rows: drift), when the ovs-vswitchd pid changes (a restarted daemon is
//! re-verified), every resync period, and with backoff while something is not converged. It reconnects
//! to OVSDB with backoff, checking the schema each time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::ensure::{self, Kind, Observed};
use super::ovsdb::{self, Client, OPEN_VSWITCH};
use super::unixctl::{self, Locator, PROBE_FLOW};
use crate::api::node_tracing::{BridgeExport, BridgeStatus};

/// What the node should export.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Want {
    /// The `NodeTracing` generation this comes from (`None`: the object is gone).
    pub generation: Option<i64>,
    pub bridges: Vec<BridgeExport>,
}

/// How a bridge of the spec stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// Applied and proven by `ofproto/trace`.
    Verified,
    /// On its way (ovs-vswitchd has not taken it yet, could not be traced yet).
    Pending,
    /// Cannot be applied as asked (sampling refused, no such bridge, OVSDB refused, OVS disabled it).
    Failed,
    /// The bridge exports somewhere crosstrace does not own.
    Conflict,
}

/// One bridge of the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct BridgeReport {
    pub status: BridgeStatus,
    pub state: State,
    /// The id of the request this answers ([`BridgeExport::request_id`]).
    pub request: String,
}

/// What is true on the node after a pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The generation of the [`Want`] this answers.
    pub generation: Option<i64>,
    /// One per bridge of the spec, in spec order.
    pub bridges: Vec<BridgeReport>,
    /// e.g. `3.1.0`.
    pub ovs_version: String,
    /// Problems not tied to a bridge of the spec: OVSDB unreachable, removal from a bridge that left
    /// the spec failed.
    pub problems: Vec<String>,
    /// Drift corrections since the start (a converged export found changed and re-applied).
    pub drift_corrections: u64,
}

impl Report {
    /// Whether everything is verified: nothing left to retry.
    pub fn converged(&self) -> bool {
        self.problems.is_empty() && self.bridges.iter().all(|b| b.state == State::Verified)
    }

    /// Whether another pass could change something without any outside event.
    fn worth_retrying(&self) -> bool {
        !self.problems.is_empty() || self.bridges.iter().any(|b| matches!(b.state, State::Pending | State::Failed))
    }
}

/// Where Open vSwitch is and how patient to be with it.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `unix:/var/run/openvswitch/db.sock`.
    pub ovsdb: String,
    /// The ovs-vswitchd control socket; `None`: from `ovs-vswitchd.pid` next to the OVSDB socket.
    pub unixctl: Option<PathBuf>,
    /// How long ovs-vswitchd may take to reach `next_cfg`.
    pub cfg_timeout: Duration,
    /// Full re-verification even without events.
    pub resync: Duration,
    /// How often the ovs-vswitchd pid is checked.
    pub pid_check: Duration,
    /// Longest wait between retries and reconnects.
    pub max_backoff: Duration,
    /// Connection keepalive.
    pub ovsdb_options: ovsdb::Options,
}

impl Settings {
    pub fn new(ovsdb: impl Into<String>, unixctl: Option<PathBuf>) -> Self {
        Self {
            ovsdb: ovsdb.into(),
            unixctl,
            cfg_timeout: Duration::from_secs(10),
            resync: Duration::from_secs(60),
            pid_check: Duration::from_secs(2),
            max_backoff: Duration::from_secs(30),
            ovsdb_options: ovsdb::Options::default(),
        }
    }

    pub fn locator(&self) -> Locator {
        let socket = ovsdb::socket_path(&self.ovsdb).unwrap_or(&self.ovsdb);
        Locator::new(self.unixctl.clone(), std::path::Path::new(socket))
    }
}

/// Longest message kept in a bridge status (the API's bound).
const MAX_MESSAGE: usize = 1024;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 3;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

/// A bridge of the spec found verified.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verified {
    /// The policy generation it was verified at: a later change at the same generation is drift.
    generation: i64,
    /// The bridge's row: another uuid under the same name is the bridge deleted and created again.
    bridge_uuid: String,
}

/// The state the agent keeps between passes: a few words per bridge, nothing cached from the cluster.
/// Which rows are crosstrace's is always read from OVSDB (their tags), never remembered here.
pub struct Node {
    settings: Settings,
    locator: Locator,
    /// Bridges of the spec found verified.
    converged: BTreeMap<String, Verified>,
    /// Bridges of the spec that were verified and then disappeared from OVSDB, with when that was
    /// seen: the export comes back with the bridge, meanwhile the bridge is pending, not failed.
    vanished: BTreeMap<String, Timestamp>,
    /// The last event worth telling per bridge (drift, restart), with its generation.
    notes: BTreeMap<String, (i64, String)>,
    vswitchd_pid: Option<u32>,
    ovs_version: String,
    drift_corrections: u64,
}

impl Node {
    pub fn new(settings: Settings) -> Self {
        Self {
            locator: settings.locator(),
            settings,
            converged: BTreeMap::new(),
            vanished: BTreeMap::new(),
            notes: BTreeMap::new(),
            vswitchd_pid: None,
            ovs_version: String::new(),
            drift_corrections: 0,
        }
    }

    /// Whether the ovs-vswitchd pid differs from the one last seen (a restart).
    pub fn vswitchd_restarted(&self) -> bool {
        match (self.locator.resolve(), self.vswitchd_pid) {
            (Ok((_, Some(now))), Some(before)) => now != before,
            _ => false,
        }
    }

    /// Whether a bridge was found verified at this generation.
    fn verified_at(&self, bridge: &str, generation: i64) -> bool {
        self.converged.get(bridge).is_some_and(|v| v.generation == generation)
    }

    fn verified(&mut self, export: &BridgeExport, observed: &Observed) {
        let bridge_uuid = observed.bridges.get(&export.bridge).map(|b| b.uuid.clone()).unwrap_or_default();
        self.converged.insert(export.bridge.clone(), Verified { generation: export.policy_generation, bridge_uuid });
    }

    /// When a verified bridge is found again under a new row (deleted and created again): ` at <when
    /// it was seen gone>`, or an empty text when it came back before a pass saw it gone.
    fn recreated(&mut self, bridge: &str, observed: &Observed) -> Option<String> {
        let now = observed.bridges.get(bridge)?;
        let before = self.converged.get(bridge)?;
        if now.uuid == before.bridge_uuid {
            return None;
        }
        Some(self.vanished.remove(bridge).map(|since| format!(" at {since}")).unwrap_or_default())
    }

    fn note(&mut self, bridge: &str, generation: i64, text: String) {
        tracing::info!(bridge, %text, "drift");
        self.notes.insert(bridge.into(), (generation, text));
    }

    /// One pass. `Err` only when OVSDB itself failed (the connection); everything else is in the report.
    pub async fn reconcile(&mut self, client: &Client, want: &Want) -> Result<Report, ovsdb::Error> {
        let now = Timestamp::now();
        let observed = ensure::read(client).await?;
        let plans = ensure::plan(&want.bridges, &observed);
        let generation_of =
            |bridge: &str| want.bridges.iter().find(|b| b.bridge == bridge).map(|b| b.policy_generation);

        // A restarted ovs-vswitchd: say so, and verify again (below, as on every pass).
        let daemon = self.locator.client();
        let pid = daemon.as_ref().ok().and_then(|(_, pid)| *pid);
        if let (Some(before), Some(after)) = (self.vswitchd_pid, pid)
            && before != after
        {
            for b in &want.bridges {
                if self.verified_at(&b.bridge, b.policy_generation) {
                    self.note(
                        &b.bridge,
                        b.policy_generation,
                        format!("ovs-vswitchd restarted (pid {before} -> {after}) at {now}; export re-verified"),
                    );
                }
            }
            self.converged.clear();
        }
        if pid.is_some() {
            self.vswitchd_pid = pid;
        }

        let mut problems = Vec::new();
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        let mut target = None;
        for plan in plans.iter().filter(|p| !p.is_noop()) {
            let generation = generation_of(&plan.bridge);
            if let Some(g) = generation
                && self.verified_at(&plan.bridge, g)
            {
                self.drift_corrections += 1;
                let what = plan.changes.join("; ");
                let text = match self.recreated(&plan.bridge, &observed) {
                    Some(since) => format!(
                        "bridge {} was deleted{since} and created again; export re-applied at {now}: {what}",
                        plan.bridge
                    ),
                    None => format!("re-applied after drift at {now}: {what}"),
                };
                self.note(&plan.bridge, g, text);
            }
            tracing::info!(bridge = %plan.bridge, changes = ?plan.changes, "applying");
            match ensure::apply(client, plan).await {
                Ok(next) => target = target.max(next),
                Err(e @ (ovsdb::Error::Disconnected | ovsdb::Error::Io(_))) => return Err(e),
                Err(e) => {
                    let text = format!("OVSDB refused the change ({}): {e}", plan.changes.join("; "));
                    if generation.is_some() {
                        errors.insert(plan.bridge.clone(), text);
                    } else {
                        problems.push(format!("removing from bridge {}: {text}", plan.bridge));
                    }
                }
            }
        }
        let (observed, caught_up) = match target {
            Some(t) => {
                let caught_up = ensure::wait_for_cfg(client, t, self.settings.cfg_timeout).await?;
                (ensure::read(client).await?, caught_up)
            }
            None => {
                let caught_up = observed.cur_cfg >= observed.next_cfg;
                (observed, caught_up)
            }
        };
        let replans = ensure::plan(&want.bridges, &observed);

        let daemon = daemon.ok().map(|(d, _)| d);
        if let Some(d) = &daemon
            && let Ok(text) = d.version().await
            && let Some(v) = unixctl::parse_version(&text)
        {
            self.ovs_version = v;
        }
        if self.ovs_version.is_empty()
            && let Some(v) = &observed.ovs_version
        {
            self.ovs_version = v.clone();
        }

        let mut bridges = Vec::new();
        for export in &want.bridges {
            let plan = replans.iter().find(|p| p.bridge == export.bridge);
            let error = errors.remove(&export.bridge);
            let report = self.bridge_report(export, plan, &observed, error, caught_up, daemon.as_ref()).await;
            bridges.push(report);
        }
        // Forget what is not in the spec any more, and bridges that are back.
        self.converged.retain(|b, _| want.bridges.iter().any(|e| &e.bridge == b));
        self.vanished.retain(|b, _| self.converged.contains_key(b) && !observed.bridges.contains_key(b));
        self.notes.retain(|b, (g, _)| generation_of(b) == Some(*g));

        Ok(Report {
            generation: want.generation,
            bridges,
            ovs_version: self.ovs_version.clone(),
            problems,
            drift_corrections: self.drift_corrections,
        })
    }

    async fn bridge_report(
        &mut self,
        export: &BridgeExport,
        plan: Option<&ensure::Plan>,
        observed: &Observed,
        error: Option<String>,
        caught_up: bool,
        daemon: Option<&unixctl::Unixctl>,
    ) -> BridgeReport {
        let applied_generation = Kind::ALL
            .iter()
            .filter_map(|k| observed.exporter(&export.bridge, *k))
            .filter_map(|(_, row)| row.filter(|r| ensure::is_ours(r)))
            .filter_map(ensure::row_generation)
            .min()
            .unwrap_or(0);
        let mut status = BridgeStatus {
            bridge: export.bridge.clone(),
            policy: export.policy.clone(),
            applied_generation,
            ..BridgeStatus::default()
        };
        let request = export.request_id();
        let report = |status: BridgeStatus, state, message: String| BridgeReport {
            status: BridgeStatus { message: bounded(message), ..status },
            state,
            request: request.clone(),
        };
        let Some(plan) = plan.filter(|p| !p.missing) else {
            if self.verified_at(&export.bridge, export.policy_generation) {
                // Deleted after it exported (a re-created bridge, an OVS reconfiguration): the export
                // is re-applied as soon as the monitor sees it again, so this is not a failure.
                let since = *self.vanished.entry(export.bridge.clone()).or_insert_with(Timestamp::now);
                return report(
                    status,
                    State::Pending,
                    format!(
                        "bridge {} does not exist in Open vSwitch any more (gone since {since}); the export is re-applied when it is back",
                        export.bridge
                    ),
                );
            }
            return report(status, State::Failed, format!("bridge {} does not exist in Open vSwitch", export.bridge));
        };
        if !plan.conflicts.is_empty() {
            status.conflict = true;
            let described: Vec<String> =
                plan.conflicts.iter().map(|k| describe_foreign(*k, &export.bridge, observed)).collect();
            return report(
                status,
                State::Conflict,
                format!("{}; conflictPolicy Skip leaves it alone", described.join("; ")),
            );
        }
        if !plan.refused.is_empty() {
            return report(status, State::Failed, plan.refused.join("; "));
        }
        if let Some(error) = error {
            return report(status, State::Failed, error);
        }
        if !plan.is_noop() {
            // Changed again under us between the apply and the read-back: the monitor brings us back.
            return report(status, State::Pending, format!("not yet converged: {}", plan.changes.join("; ")));
        }
        if !caught_up {
            return report(
                status,
                State::Pending,
                format!(
                    "waiting for ovs-vswitchd to take the configuration (cur_cfg {} < next_cfg {})",
                    observed.cur_cfg, observed.next_cfg
                ),
            );
        }
        let wanted: Vec<Kind> =
            Kind::ALL.into_iter().filter(|k| matches!(ensure::desired_columns(*k, export), Ok(Some(_)))).collect();
        let note = self
            .notes
            .get(&export.bridge)
            .filter(|(g, _)| *g == export.policy_generation)
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        if wanted.is_empty() {
            status.applied = true;
            status.verified = true;
            self.verified(export, observed);
            return report(status, State::Verified, note);
        }
        status.applied = true;
        let Some(daemon) = daemon else {
            let why = self.locator.resolve().err().map_or_else(String::new, |e| e.to_string());
            return report(status, State::Pending, format!("applied in OVSDB; cannot verify: {why}"));
        };
        let trace = match daemon.trace(&export.bridge, PROBE_FLOW).await {
            Ok(t) => t,
            Err(e) => {
                return report(status, State::Pending, format!("applied in OVSDB; cannot verify: {e}"));
            }
        };
        let seen = unixctl::sampling_in_trace(&trace);
        let missing: Vec<Kind> = wanted
            .into_iter()
            .filter(|k| match k {
                Kind::Sflow => !seen.sflow,
                Kind::Ipfix => !(seen.ipfix || seen.flow_sample),
            })
            .collect();
        if !missing.is_empty() {
            status.applied = false;
            let names: Vec<String> = missing.iter().map(Kind::to_string).collect();
            return report(
                status,
                State::Failed,
                format!(
                    "exporter disabled by OVS: the rows are in OVSDB but ofproto/trace shows no {} sampling action in the datapath (check the agent interface/address and the targets; see the ovs-vswitchd log)",
                    names.join(" or ")
                ),
            );
        }
        status.verified = true;
        self.verified(export, observed);
        report(status, State::Verified, note)
    }
}

fn describe_foreign(kind: Kind, bridge: &str, observed: &Observed) -> String {
    match observed.exporter(bridge, kind) {
        Some((id, row)) => {
            let targets = row
                .and_then(|r| r.get("targets"))
                .map(|t| {
                    ovsdb::atoms(t).iter().filter_map(|a| a.as_str().map(str::to_string)).collect::<Vec<_>>().join(",")
                })
                .unwrap_or_default();
            format!("bridge {bridge} already exports {kind} to {targets} (row {id}, not crosstrace's)")
        }
        None => format!("bridge {bridge} already exports {kind} (not crosstrace's)"),
    }
}

/// The monitor that wakes the agent: every column it manages, and the bridges' references.
fn monitor_requests() -> serde_json::Value {
    let mut requests = serde_json::Map::new();
    for (table, columns) in ensure::SCHEMA_NEEDS {
        if *table == OPEN_VSWITCH {
            continue; // cur_cfg moves with every change of anyone: not a reason to look again
        }
        let columns: Vec<&str> = columns.iter().copied().filter(|c| *c != "_uuid").collect();
        requests.insert(
            (*table).into(),
            json!([{"columns": columns, "select": {"initial": false, "insert": true, "delete": true, "modify": true}}]),
        );
    }
    serde_json::Value::Object(requests)
}

/// Connects, checks the schema and starts the monitor.
pub async fn connect(
    settings: &Settings,
) -> Result<(Client, tokio::sync::mpsc::Receiver<ovsdb::Update>), ovsdb::Error> {
    let client = Client::connect_with(&settings.ovsdb, settings.ovsdb_options).await?;
    client.get_schema(OPEN_VSWITCH).await?.require(ensure::SCHEMA_NEEDS)?;
    client.monitor(OPEN_VSWITCH, json!("crosstrace"), monitor_requests()).await?;
    let updates = client.take_updates().ok_or(ovsdb::Error::Disconnected)?;
    Ok((client, updates))
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// How soon after a monitor update the pass runs: a burst of updates makes one pass.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Drives passes until `shutdown` turns true. `want` `None` means "not known yet" (nothing is done);
/// each pass's report is published on `report`; `ready` tells whether OVSDB is reachable.
pub async fn run(
    settings: Settings,
    mut want: watch::Receiver<Option<Want>>,
    report: watch::Sender<Option<Report>>,
    ready: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut node = Node::new(settings.clone());
    let mut backoff = Duration::from_millis(250);
    let publish_problem = |problem: String| {
        report.send_modify(|r| {
            let r = r.get_or_insert_with(Report::default);
            if r.problems != [problem.clone()] {
                r.problems = vec![problem.clone()];
            }
            for b in &mut r.bridges {
                b.state = b.state.max(State::Pending);
            }
        });
    };
    loop {
        if *shutdown.borrow() {
            return;
        }
        let (client, mut updates) = match connect(&settings).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, ovsdb = %settings.ovsdb, retry_in = ?backoff, "OVSDB not usable");
                publish_problem(format!("OVSDB at {}: {e}", settings.ovsdb));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut shutdown) => return,
                }
                backoff = (backoff * 2).min(settings.max_backoff);
                continue;
            }
        };
        tracing::info!(ovsdb = %settings.ovsdb, "connected to OVSDB");
        ready.store(true, Ordering::Relaxed);
        backoff = Duration::from_millis(250);
        let mut retry = Duration::from_millis(500);
        let mut due = Some(Instant::now());
        let mut last_pass = Instant::now();
        let mut tick = tokio::time::interval(settings.pid_check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sleep_until = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = tokio::time::sleep_until(sleep_until), if due.is_some() => {
                    due = None;
                    let current = want.borrow_and_update().clone();
                    let Some(current) = current else { continue };
                    last_pass = Instant::now();
                    match node.reconcile(&client, &current).await {
                        Ok(r) => {
                            if r.worth_retrying() {
                                due = Some(Instant::now() + retry);
                                retry = (retry * 2).min(settings.max_backoff);
                            } else {
                                retry = Duration::from_millis(500);
                            }
                            report.send_if_modified(|old| {
                                let changed = old.as_ref() != Some(&r);
                                *old = Some(r);
                                changed
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reconcile against OVSDB failed");
                            publish_problem(format!("OVSDB at {}: {e}", settings.ovsdb));
                            if client.is_closed() {
                                break;
                            }
                            due = Some(Instant::now() + retry);
                            retry = (retry * 2).min(settings.max_backoff);
                        }
                    }
                }
                changed = want.changed() => {
                    if changed.is_err() {
                        return; // the owner is gone
                    }
                    due = Some(Instant::now());
                    retry = Duration::from_millis(500);
                }
                update = updates.recv() => {
                    if update.is_none() {
                        break; // connection closed
                    }
                    let soon = Instant::now() + DEBOUNCE;
                    due = Some(due.map_or(soon, |d| d.min(soon)));
                }
                _ = tick.tick() => {
                    if node.vswitchd_restarted() || last_pass.elapsed() >= settings.resync {
                        due = Some(Instant::now());
                    }
                }
            }
        }
        ready.store(false, Ordering::Relaxed);
        publish_problem(format!("lost the OVSDB connection to {}", settings.ovsdb));
        tracing::warn!(ovsdb = %settings.ovsdb, "OVSDB connection lost; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded_on_char_boundaries() {
        let m = bounded("é".repeat(2000));
        assert!(m.len() <= MAX_MESSAGE && m.ends_with("..."));
        assert_eq!(bounded("short".into()), "short");
    }

    #[test]
    fn the_monitor_watches_managed_columns_but_not_cfg() {
        let m = monitor_requests();
        assert!(m.get(OPEN_VSWITCH).is_none());
        assert_eq!(m["Bridge"][0]["columns"], json!(["name", "sflow", "ipfix"]));
        assert!(m["sFlow"][0]["columns"].as_array().unwrap().contains(&json!("external_ids")));
        assert_eq!(m["IPFIX"][0]["select"]["initial"], false);
    }

    #[test]
    fn a_verified_bridge_found_under_a_new_row_was_created_again() {
        let mut node = Node::new(Settings::new("unix:/nonexistent/db.sock", None));
        let export = BridgeExport { bridge: "br-int".into(), policy_generation: 2, ..BridgeExport::default() };
        let observed = |uuid: &str| Observed {
            bridges: [(
                "br-int".to_string(),
                ensure::BridgeRow { uuid: uuid.into(), name: "br-int".into(), sflow: None, ipfix: None },
            )]
            .into(),
            ..Observed::default()
        };
        node.verified(&export, &observed("b-1"));
        assert!(node.verified_at("br-int", 2) && !node.verified_at("br-int", 3) && !node.verified_at("br-ex", 2));
        assert_eq!(node.recreated("br-int", &observed("b-1")), None, "same row: drift, not a new bridge");
        assert_eq!(node.recreated("br-int", &observed("b-2")), Some(String::new()), "gone and back between passes");
        node.vanished.insert("br-int".into(), Timestamp::from_second(100).unwrap());
        assert_eq!(node.recreated("br-int", &observed("b-2")).as_deref(), Some(" at 1970-01-01T00:01:40Z"));
        assert!(node.vanished.is_empty());
        assert_eq!(node.recreated("br-int", &Observed::default()), None, "still gone");
    }

    #[test]
    fn reports_know_when_to_retry() {
        let bridge = |state| BridgeReport { status: BridgeStatus::default(), state, request: String::new() };
        let mut r = Report::default();
        assert!(r.converged() && !r.worth_retrying());
        r.bridges = vec![bridge(State::Verified), bridge(State::Conflict)];
        assert!(!r.converged() && !r.worth_retrying());
        r.bridges.push(bridge(State::Pending));
        assert!(r.worth_retrying());
        r.bridges = vec![];
        r.problems = vec!["down".into()];
        assert!(r.worth_retrying());
    }
}
