//! Idempotent ensure and removal of crosstrace's sFlow / IPFIX rows, as pure planning over what OVSDB
//! holds ([`Observed`] → [`Plan`] → [`transaction`]) plus the few calls that read and apply it.
//!
//! Rules:
//! - A bridge gets at most ONE sFlow row and ONE IPFIX row of ours, tagged in `external_ids` with
//!   [`OWNER_KEY`]=`crosstrace`, [`POLICY_KEY`] and [`GENERATION_KEY`]. A row already as wanted makes
//!   no operation at all, so ensuring twice makes no transaction.
//! - A bridge column that points at a row that is not ours is a conflict: left alone, unless the export
//!   says `Override`; then the foreign row's uuid and columns are recorded in our row
//!   ([`REPLACED_KEY`]) and put back when ours goes.
//! - Removal (the bridge or the exporter left the spec) clears the bridge column or restores what was
//!   replaced, and deletes our row: nothing of ours is left behind.
//! - Sampling denser than 1 in [`SAMPLING_FLOOR`] is refused whatever the spec says.
//! - Every change runs in one transaction per bridge, guarded by a `wait` on the bridge's columns as
//!   read (a concurrent change fails it; the next pass re-reads) and followed by `next_cfg += 1`, whose
//!   new value the caller waits for in `cur_cfg` (ovs-vswitchd took the change).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::ovsdb::{self, Client, Cond, Mutation, OPEN_VSWITCH, Op, canonical};
use crate::api::node_tracing::BridgeExport;
use crate::api::{ConflictPolicy, SAMPLING_FLOOR};

pub const OWNER_KEY: &str = "crosstrace.dev/owner";
pub const OWNER: &str = "crosstrace";
pub const POLICY_KEY: &str = "crosstrace.dev/policy";
pub const GENERATION_KEY: &str = "crosstrace.dev/generation";
/// JSON `{"uuid": "...", "row": {...}}` of the foreign exporter an `Override` replaced.
pub const REPLACED_KEY: &str = "crosstrace.dev/replaced";

/// Every table and column the agent reads or writes; checked against the server's schema first.
pub const SCHEMA_NEEDS: &[(&str, &[&str])] = &[
    ("Bridge", &["_uuid", "name", "sflow", "ipfix"]),
    ("sFlow", &["targets", "sampling", "polling", "header", "agent", "external_ids"]),
    ("IPFIX", &["targets", "sampling", "obs_domain_id", "cache_active_timeout", "external_ids"]),
    (OPEN_VSWITCH, &["cur_cfg", "next_cfg", "ovs_version"]),
];

/// The two kinds of exporter a bridge can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Sflow,
    Ipfix,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Sflow, Kind::Ipfix];

    pub fn table(self) -> &'static str {
        match self {
            Kind::Sflow => "sFlow",
            Kind::Ipfix => "IPFIX",
        }
    }

    /// The column of `Bridge` that points at the exporter.
    pub fn column(self) -> &'static str {
        match self {
            Kind::Sflow => "sflow",
            Kind::Ipfix => "ipfix",
        }
    }

    /// The columns crosstrace sets (besides `external_ids`).
    pub fn managed_columns(self) -> &'static [&'static str] {
        match self {
            Kind::Sflow => &["targets", "sampling", "polling", "header", "agent"],
            Kind::Ipfix => &["targets", "sampling", "obs_domain_id", "cache_active_timeout"],
        }
    }

    fn uuid_name(self, purpose: &str) -> String {
        format!("{purpose}_{}", self.column())
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.table())
    }
}

/// A row's columns (without `_uuid` and `_version`), as OVSDB encodes them.
pub type Row = Map<String, Value>;

/// A bridge as read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BridgeRow {
    pub uuid: String,
    pub name: String,
    pub sflow: Option<String>,
    pub ipfix: Option<String>,
}

impl BridgeRow {
    pub fn exporter(&self, kind: Kind) -> Option<&str> {
        match kind {
            Kind::Sflow => self.sflow.as_deref(),
            Kind::Ipfix => self.ipfix.as_deref(),
        }
    }
}

/// What OVSDB holds that matters to the agent, read in one transaction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// By bridge name.
    pub bridges: BTreeMap<String, BridgeRow>,
    /// sFlow rows by uuid.
    pub sflow: BTreeMap<String, Row>,
    /// IPFIX rows by uuid.
    pub ipfix: BTreeMap<String, Row>,
    pub cur_cfg: i64,
    pub next_cfg: i64,
    /// `Open_vSwitch.ovs_version` (set by the packaging's start script, often empty).
    pub ovs_version: Option<String>,
}

impl Observed {
    /// The read-only transaction that reads it.
    pub fn read_ops() -> Vec<Op> {
        let cols = |c: &[&str]| Some(c.iter().map(|c| c.to_string()).collect());
        vec![
            Op::Select {
                table: "Bridge".into(),
                conditions: vec![],
                columns: cols(&["_uuid", "name", "sflow", "ipfix"]),
            },
            Op::Select { table: Kind::Sflow.table().into(), conditions: vec![], columns: None },
            Op::Select { table: Kind::Ipfix.table().into(), conditions: vec![], columns: None },
            Op::Select {
                table: OPEN_VSWITCH.into(),
                conditions: vec![],
                columns: cols(&["cur_cfg", "next_cfg", "ovs_version"]),
            },
        ]
    }

    /// Parses the results of [`Observed::read_ops`].
    pub fn from_results(results: &[Value]) -> Result<Self, ovsdb::Error> {
        let [bridges, sflow, ipfix, ovs, ..] = results else {
            return Err(ovsdb::Error::Malformed(format!("expected 4 select results, got {}", results.len())));
        };
        let exporters = |result: &Value| -> Result<BTreeMap<String, Row>, ovsdb::Error> {
            Ok(ovsdb::rows(result)?
                .into_iter()
                .filter_map(|mut row| {
                    let id = row.remove("_uuid").as_ref().and_then(ovsdb::uuid_of)?;
                    row.remove("_version");
                    Some((id, row))
                })
                .collect())
        };
        let bridges = ovsdb::rows(bridges)?
            .into_iter()
            .filter_map(|row| {
                let uuid = row.get("_uuid").and_then(ovsdb::uuid_of)?;
                let name = row.get("name")?.as_str()?.to_string();
                let reference = |c: &str| row.get(c).and_then(ovsdb::optional_uuid);
                Some((name.clone(), BridgeRow { uuid, name, sflow: reference("sflow"), ipfix: reference("ipfix") }))
            })
            .collect();
        let ovs_rows = ovsdb::rows(ovs)?;
        let ovs = ovs_rows.first().ok_or_else(|| {
            ovsdb::Error::Malformed("the Open_vSwitch table has no row (was `ovs-vsctl init` run?)".into())
        })?;
        let int = |c: &str| ovs.get(c).and_then(ovsdb::optional_int).unwrap_or(0);
        Ok(Self {
            bridges,
            sflow: exporters(sflow)?,
            ipfix: exporters(ipfix)?,
            cur_cfg: int("cur_cfg"),
            next_cfg: int("next_cfg"),
            ovs_version: ovs.get("ovs_version").and_then(ovsdb::optional_string).filter(|v| !v.is_empty()),
        })
    }

    pub fn rows(&self, kind: Kind) -> &BTreeMap<String, Row> {
        match kind {
            Kind::Sflow => &self.sflow,
            Kind::Ipfix => &self.ipfix,
        }
    }

    /// The exporter of a kind on a bridge: its uuid and, when it exists, its row.
    pub fn exporter(&self, bridge: &str, kind: Kind) -> Option<(&str, Option<&Row>)> {
        let id = self.bridges.get(bridge)?.exporter(kind)?;
        Some((id, self.rows(kind).get(id)))
    }

    /// How many bridges point at this exporter row.
    fn references(&self, kind: Kind, id: &str) -> usize {
        self.bridges.values().filter(|b| b.exporter(kind) == Some(id)).count()
    }
}

/// The `external_ids` of a row.
pub fn external_ids(row: &Row) -> BTreeMap<String, String> {
    row.get("external_ids").map(ovsdb::string_map).unwrap_or_default()
}

/// Whether crosstrace owns this row.
pub fn is_ours(row: &Row) -> bool {
    external_ids(row).get(OWNER_KEY).map(String::as_str) == Some(OWNER)
}

/// The policy generation a row of ours was written for.
pub fn row_generation(row: &Row) -> Option<i64> {
    external_ids(row).get(GENERATION_KEY)?.parse().ok()
}

/// The columns an export wants for a kind: `Ok(None)` when it wants none of that kind, `Err` when the
/// settings are refused.
pub fn desired_columns(kind: Kind, export: &BridgeExport) -> Result<Option<Row>, String> {
    let check = |sampling: u32, targets: &[String]| {
        if sampling < SAMPLING_FLOOR {
            return Err(format!("{kind} sampling 1 in {sampling} refused: the floor is 1 in {SAMPLING_FLOOR}"));
        }
        if targets.is_empty() {
            return Err(format!("{kind} needs at least one target"));
        }
        Ok(())
    };
    let targets = |t: &[String]| ovsdb::set(t.iter().map(|t| json!(t)));
    let mut row = Row::new();
    match kind {
        Kind::Sflow => {
            let Some(s) = &export.sflow else {
                return Ok(None);
            };
            check(s.sampling, &s.targets)?;
            row.insert("targets".into(), targets(&s.targets));
            row.insert("sampling".into(), json!(s.sampling));
            row.insert("polling".into(), json!(s.polling));
            row.insert("header".into(), json!(s.header));
            let agent = (!s.agent.is_empty()).then(|| json!(s.agent));
            row.insert("agent".into(), ovsdb::optional(agent));
        }
        Kind::Ipfix => {
            let Some(i) = &export.ipfix else {
                return Ok(None);
            };
            check(i.sampling, &i.targets)?;
            row.insert("targets".into(), targets(&i.targets));
            row.insert("sampling".into(), json!(i.sampling));
            row.insert("obs_domain_id".into(), json!(i.obs_domain_id));
            row.insert("cache_active_timeout".into(), json!(i.cache_active_timeout));
        }
    }
    Ok(Some(row))
}

/// What to do on one bridge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub bridge: String,
    /// The bridge does not exist (only for a bridge of the spec).
    pub missing: bool,
    /// The body of the transaction; empty when the bridge is as wanted.
    pub ops: Vec<Op>,
    /// What the ops do, for people (`sFlow: created`).
    pub changes: Vec<String>,
    /// Exporters left alone because they are not ours (conflictPolicy Skip).
    pub conflicts: Vec<Kind>,
    /// Settings refused (sampling floor), left as they are.
    pub refused: Vec<String>,
    /// The bridge's exporter columns as read, for the `wait` that guards the transaction.
    guard: Option<(String, Row)>,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.ops.is_empty()
    }
}

fn reference(id: Option<&str>) -> Value {
    id.map_or_else(ovsdb::empty, ovsdb::uuid)
}

/// Plans one bridge: `desired` is its export, `None` to remove everything of ours from it.
pub fn plan_bridge(desired: Option<&BridgeExport>, bridge: &BridgeRow, observed: &Observed) -> Plan {
    let mut plan = Plan { bridge: bridge.name.clone(), ..Plan::default() };
    let mut inserts = Vec::new();
    let mut row_updates = Vec::new();
    let mut deletes = Vec::new();
    let mut bridge_update = Row::new();

    for kind in Kind::ALL {
        let want = match desired.map(|d| desired_columns(kind, d)).transpose() {
            Ok(w) => w.flatten(),
            Err(e) => {
                plan.refused.push(e);
                continue;
            }
        };
        let current = bridge.exporter(kind);
        let current_row = current.and_then(|id| observed.rows(kind).get(id));
        let ours = current_row.is_some_and(is_ours);
        match (want, desired) {
            (Some(columns), Some(export)) => {
                let mut tags: BTreeMap<String, String> =
                    if ours { current_row.map(external_ids).unwrap_or_default() } else { BTreeMap::new() };
                tags.insert(OWNER_KEY.into(), OWNER.into());
                tags.insert(POLICY_KEY.into(), export.policy.clone());
                tags.insert(GENERATION_KEY.into(), export.policy_generation.to_string());
                match (current, current_row) {
                    (None, _) => {
                        inserts.push(insert(kind, columns, &tags, "new"));
                        bridge_update.insert(kind.column().into(), ovsdb::named_uuid(&kind.uuid_name("new")));
                        plan.changes.push(format!("{kind}: created"));
                    }
                    (Some(id), Some(row)) if ours => {
                        let mut differ: Vec<&str> = kind
                            .managed_columns()
                            .iter()
                            .copied()
                            .filter(|c| row.get(*c).map(canonical) != columns.get(*c).map(canonical))
                            .collect();
                        if external_ids(row) != tags {
                            differ.push("external_ids");
                        }
                        if !differ.is_empty() {
                            let mut update = columns;
                            update.insert("external_ids".into(), string_map(&tags));
                            row_updates.push(Op::Update {
                                table: kind.table().into(),
                                conditions: vec![Cond::uuid(id)],
                                row: update,
                            });
                            plan.changes.push(format!("{kind}: updated {}", differ.join(", ")));
                        }
                    }
                    (Some(id), foreign) => match export.conflict_policy {
                        ConflictPolicy::Skip => plan.conflicts.push(kind),
                        ConflictPolicy::Override => {
                            let record = json!({"uuid": id, "row": foreign.cloned().unwrap_or_default()});
                            tags.insert(REPLACED_KEY.into(), record.to_string());
                            inserts.push(insert(kind, columns, &tags, "new"));
                            bridge_update.insert(kind.column().into(), ovsdb::named_uuid(&kind.uuid_name("new")));
                            plan.changes.push(format!("{kind}: replaced foreign exporter {id}"));
                        }
                    },
                }
            }
            // Not wanted (or the bridge left the spec): remove ours, restore what it replaced.
            _ => {
                let (Some(id), Some(row)) = (current, current_row) else {
                    continue;
                };
                if !ours {
                    continue;
                }
                match restore(kind, row, observed) {
                    Some(Restore::Existing(old)) => {
                        bridge_update.insert(kind.column().into(), ovsdb::uuid(&old));
                        plan.changes.push(format!("{kind}: removed, foreign exporter {old} put back"));
                    }
                    Some(Restore::Insert(old_row)) => {
                        let name = kind.uuid_name("restored");
                        inserts.push(Op::Insert {
                            table: kind.table().into(),
                            row: old_row,
                            uuid_name: Some(name.clone()),
                        });
                        bridge_update.insert(kind.column().into(), ovsdb::named_uuid(&name));
                        plan.changes.push(format!("{kind}: removed, replaced exporter restored"));
                    }
                    None => {
                        bridge_update.insert(kind.column().into(), ovsdb::empty());
                        plan.changes.push(format!("{kind}: removed"));
                    }
                }
                // Another bridge pointing at our row (someone copied the reference) keeps it alive;
                // OVSDB collects it once the last reference goes.
                if observed.references(kind, id) <= 1 {
                    deletes.push(Op::Delete { table: kind.table().into(), conditions: vec![Cond::uuid(id)] });
                }
            }
        }
    }

    plan.ops.extend(inserts);
    plan.ops.extend(row_updates);
    if !bridge_update.is_empty() {
        plan.ops.push(Op::Update {
            table: "Bridge".into(),
            conditions: vec![Cond::uuid(&bridge.uuid)],
            row: bridge_update,
        });
    }
    plan.ops.extend(deletes);
    if !plan.ops.is_empty() {
        let mut guard = Row::new();
        for kind in Kind::ALL {
            guard.insert(kind.column().into(), reference(bridge.exporter(kind)));
        }
        plan.guard = Some((bridge.uuid.clone(), guard));
    }
    plan
}

fn string_map(tags: &BTreeMap<String, String>) -> Value {
    ovsdb::map(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn insert(kind: Kind, mut columns: Row, tags: &BTreeMap<String, String>, purpose: &str) -> Op {
    columns.insert("external_ids".into(), string_map(tags));
    Op::Insert { table: kind.table().into(), row: columns, uuid_name: Some(kind.uuid_name(purpose)) }
}

enum Restore {
    /// The replaced row still exists (another bridge kept it): point back at it.
    Existing(String),
    /// Insert a copy of the recorded row.
    Insert(Row),
}

fn restore(kind: Kind, ours: &Row, observed: &Observed) -> Option<Restore> {
    let record: Value = serde_json::from_str(external_ids(ours).get(REPLACED_KEY)?).ok()?;
    if let Some(old) = record.get("uuid").and_then(Value::as_str)
        && observed.rows(kind).contains_key(old)
    {
        return Some(Restore::Existing(old.to_string()));
    }
    let mut row = record.get("row")?.as_object()?.clone();
    row.remove("_uuid");
    row.remove("_version");
    (!row.is_empty()).then_some(Restore::Insert(row))
}

/// Plans every bridge: those of the spec, and those that carry a row of ours but left the spec.
pub fn plan(desired: &[BridgeExport], observed: &Observed) -> Vec<Plan> {
    let mut plans = Vec::new();
    let wanted: BTreeSet<&str> = desired.iter().map(|d| d.bridge.as_str()).collect();
    for export in desired {
        match observed.bridges.get(&export.bridge) {
            Some(bridge) => plans.push(plan_bridge(Some(export), bridge, observed)),
            None => plans.push(Plan { bridge: export.bridge.clone(), missing: true, ..Plan::default() }),
        }
    }
    for bridge in observed.bridges.values() {
        if wanted.contains(bridge.name.as_str()) {
            continue;
        }
        let plan = plan_bridge(None, bridge, observed);
        if !plan.is_noop() {
            plans.push(plan);
        }
    }
    plans
}

/// The whole transaction of a plan: a comment, the guard, the body, `next_cfg += 1`, and a select of
/// the new `next_cfg` (the last result). Empty for a plan with nothing to do.
pub fn transaction(plan: &Plan) -> Vec<Op> {
    if plan.ops.is_empty() {
        return Vec::new();
    }
    let mut ops = vec![Op::Comment(format!("crosstrace: {} {}", plan.bridge, plan.changes.join("; ")))];
    if let Some((uuid, row)) = &plan.guard {
        ops.push(Op::Wait {
            table: "Bridge".into(),
            conditions: vec![Cond::uuid(uuid)],
            columns: row.keys().cloned().collect(),
            equal: true,
            rows: vec![row.clone()],
            timeout_ms: Some(0),
        });
    }
    ops.extend(plan.ops.iter().cloned());
    ops.push(Op::Mutate {
        table: OPEN_VSWITCH.into(),
        conditions: vec![],
        mutations: vec![Mutation::add("next_cfg", json!(1))],
    });
    ops.push(Op::Select { table: OPEN_VSWITCH.into(), conditions: vec![], columns: Some(vec!["next_cfg".into()]) });
    ops
}

/// Reads the state.
pub async fn read(client: &Client) -> Result<Observed, ovsdb::Error> {
    let ops = Observed::read_ops();
    let results = client.transact(OPEN_VSWITCH, &ops).await?;
    Observed::from_results(&results)
}

/// Runs a plan's transaction; returns the `next_cfg` it set, `None` when there was nothing to do.
pub async fn apply(client: &Client, plan: &Plan) -> Result<Option<i64>, ovsdb::Error> {
    let ops = transaction(plan);
    if ops.is_empty() {
        return Ok(None);
    }
    let results = client.transact(OPEN_VSWITCH, &ops).await?;
    let next = results
        .last()
        .map(ovsdb::rows)
        .transpose()?
        .and_then(|rows| rows.first().and_then(|r| r.get("next_cfg").cloned()))
        .and_then(|v| ovsdb::optional_int(&v))
        .ok_or_else(|| ovsdb::Error::Malformed("no next_cfg after the transaction".into()))?;
    Ok(Some(next))
}

/// Waits until ovs-vswitchd reports `cur_cfg >= target` (it took the configuration); `false` on timeout.
pub async fn wait_for_cfg(client: &Client, target: i64, timeout: Duration) -> Result<bool, ovsdb::Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let ops = [Op::Select { table: OPEN_VSWITCH.into(), conditions: vec![], columns: Some(vec!["cur_cfg".into()]) }];
    let mut delay = Duration::from_millis(20);
    loop {
        let results = client.transact(OPEN_VSWITCH, &ops).await?;
        let cur = results
            .first()
            .map(ovsdb::rows)
            .transpose()?
            .and_then(|rows| rows.first().and_then(|r| r.get("cur_cfg").cloned()))
            .and_then(|v| ovsdb::optional_int(&v))
            .unwrap_or(0);
        if cur >= target {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// What an ensure did on one bridge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub bridge: String,
    /// Whether a transaction was sent for this bridge.
    pub transacted: bool,
    pub changes: Vec<String>,
    /// The transaction failed.
    pub error: Option<String>,
}

/// Ensure in one call: read, plan, apply each bridge's transaction, wait until ovs-vswitchd took them.
/// Returns the outcomes of the bridges that needed something, and whether `cur_cfg` caught up.
pub async fn ensure(
    client: &Client,
    desired: &[BridgeExport],
    cfg_timeout: Duration,
) -> Result<(Vec<Outcome>, bool), ovsdb::Error> {
    let observed = read(client).await?;
    let mut outcomes = Vec::new();
    let mut target = None;
    for plan in plan(desired, &observed) {
        if plan.is_noop() {
            continue;
        }
        let mut outcome =
            Outcome { bridge: plan.bridge.clone(), transacted: true, changes: plan.changes.clone(), error: None };
        match apply(client, &plan).await {
            Ok(next) => target = target.max(next),
            Err(e @ (ovsdb::Error::Disconnected | ovsdb::Error::Io(_))) => return Err(e),
            Err(e) => outcome.error = Some(e.to_string()),
        }
        outcomes.push(outcome);
    }
    let caught_up = match target {
        Some(t) => wait_for_cfg(client, t, cfg_timeout).await?,
        None => observed.cur_cfg >= observed.next_cfg,
    };
    Ok((outcomes, caught_up))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IpfixSpec, SflowSpec};

    fn sflow(sampling: u32) -> SflowSpec {
        SflowSpec {
            targets: vec!["127.0.0.1:6343".into()],
            sampling,
            polling: 10,
            header: 128,
            agent: "127.0.0.1".into(),
        }
    }

    fn export(conflict_policy: ConflictPolicy) -> BridgeExport {
        BridgeExport {
            bridge: "br-int".into(),
            policy: "storefront".into(),
            policy_generation: 3,
            sflow: Some(sflow(64)),
            ipfix: None,
            conflict_policy,
            ..BridgeExport::default()
        }
    }

    fn bridge(sflow: Option<&str>, ipfix: Option<&str>) -> BridgeRow {
        BridgeRow {
            uuid: "b-1".into(),
            name: "br-int".into(),
            sflow: sflow.map(Into::into),
            ipfix: ipfix.map(Into::into),
        }
    }

    fn observed(b: BridgeRow, sflow: &[(&str, Value)]) -> Observed {
        Observed {
            bridges: [(b.name.clone(), b)].into(),
            sflow: sflow.iter().map(|(id, row)| (id.to_string(), row.as_object().unwrap().clone())).collect(),
            ipfix: BTreeMap::new(),
            cur_cfg: 5,
            next_cfg: 5,
            ovs_version: None,
        }
    }

    /// Our sFlow row for `export(..)` as the server returns it (single atoms unwrapped).
    fn our_row(generation: i64) -> Value {
        json!({
            "targets": "127.0.0.1:6343", "sampling": 64, "polling": 10, "header": 128, "agent": "127.0.0.1",
            "external_ids": ["map", [
                ["crosstrace.dev/generation", generation.to_string()],
                ["crosstrace.dev/owner", "crosstrace"],
                ["crosstrace.dev/policy", "storefront"],
            ]],
        })
    }

    #[test]
    fn creates_a_tagged_row_in_one_guarded_transaction() {
        let o = observed(bridge(None, None), &[]);
        let p = plan_bridge(Some(&export(ConflictPolicy::Skip)), &o.bridges["br-int"], &o);
        assert_eq!(p.changes, vec!["sFlow: created"]);
        let ops: Vec<Value> = transaction(&p).iter().map(Op::to_json).collect();
        assert_eq!(
            ops,
            vec![
                json!({"op": "comment", "comment": "crosstrace: br-int sFlow: created"}),
                json!({"op": "wait", "table": "Bridge", "where": [["_uuid", "==", ["uuid", "b-1"]]],
                       "columns": ["ipfix", "sflow"], "until": "==",
                       "rows": [{"ipfix": ["set", []], "sflow": ["set", []]}], "timeout": 0}),
                json!({"op": "insert", "table": "sFlow", "uuid-name": "new_sflow", "row": {
                    "targets": ["set", ["127.0.0.1:6343"]], "sampling": 64, "polling": 10, "header": 128,
                    "agent": "127.0.0.1",
                    "external_ids": ["map", [
                        ["crosstrace.dev/generation", "3"],
                        ["crosstrace.dev/owner", "crosstrace"],
                        ["crosstrace.dev/policy", "storefront"],
                    ]],
                }}),
                json!({"op": "update", "table": "Bridge", "where": [["_uuid", "==", ["uuid", "b-1"]]],
                       "row": {"sflow": ["named-uuid", "new_sflow"]}}),
                json!({"op": "mutate", "table": "Open_vSwitch", "where": [], "mutations": [["next_cfg", "+=", 1]]}),
                json!({"op": "select", "table": "Open_vSwitch", "where": [], "columns": ["next_cfg"]}),
            ]
        );
    }

    #[test]
    fn ensure_of_a_converged_bridge_is_no_transaction() {
        let o = observed(bridge(Some("s-1"), None), &[("s-1", our_row(3))]);
        let p = plan_bridge(Some(&export(ConflictPolicy::Skip)), &o.bridges["br-int"], &o);
        assert!(p.is_noop(), "{p:?}");
        assert!(transaction(&p).is_empty());
        assert!(plan(&[export(ConflictPolicy::Skip)], &o).iter().all(Plan::is_noop));
    }

    #[test]
    fn a_changed_spec_updates_our_row_in_place() {
        let o = observed(bridge(Some("s-1"), None), &[("s-1", our_row(2))]);
        let mut e = export(ConflictPolicy::Skip);
        e.sflow.as_mut().unwrap().sampling = 128;
        let p = plan_bridge(Some(&e), &o.bridges["br-int"], &o);
        assert_eq!(p.changes, vec!["sFlow: updated sampling, external_ids"]);
        assert_eq!(p.ops.len(), 1);
        let op = p.ops[0].to_json();
        assert_eq!(op["op"], "update");
        assert_eq!(op["table"], "sFlow");
        assert_eq!(op["where"], json!([["_uuid", "==", ["uuid", "s-1"]]]));
        assert_eq!(op["row"]["sampling"], 128);
        assert_eq!(op["row"]["external_ids"][1][0], json!(["crosstrace.dev/generation", "3"]));
    }

    #[test]
    fn a_foreign_exporter_is_a_conflict_and_untouched() {
        let foreign = json!({"targets": "10.9.9.9:6343", "sampling": 1000, "external_ids": ["map", []]});
        let o = observed(bridge(Some("f-1"), None), &[("f-1", foreign)]);
        let p = plan_bridge(Some(&export(ConflictPolicy::Skip)), &o.bridges["br-int"], &o);
        assert_eq!(p.conflicts, vec![Kind::Sflow]);
        assert!(p.is_noop());
    }

    #[test]
    fn override_records_the_foreign_row_and_removal_restores_it() {
        let foreign = json!({"targets": "10.9.9.9:6343", "sampling": 1000, "polling": ["set", []],
                             "header": ["set", []], "agent": ["set", []], "external_ids": ["map", [["team", "net"]]]});
        let o = observed(bridge(Some("f-1"), None), &[("f-1", foreign.clone())]);
        let p = plan_bridge(Some(&export(ConflictPolicy::Override)), &o.bridges["br-int"], &o);
        assert!(p.conflicts.is_empty());
        assert_eq!(p.changes, vec!["sFlow: replaced foreign exporter f-1"]);
        let Op::Insert { row, .. } = &p.ops[0] else { panic!("{p:?}") };
        let tags = external_ids(row);
        let record: Value = serde_json::from_str(&tags[REPLACED_KEY]).unwrap();
        assert_eq!(record, json!({"uuid": "f-1", "row": foreign}));

        // Later: ours on the bridge (the foreign row was collected), export removed.
        let mut ours = our_row(3);
        ours["external_ids"][1].as_array_mut().unwrap().push(json!([REPLACED_KEY, tags[REPLACED_KEY]]));
        let o = observed(bridge(Some("s-1"), None), &[("s-1", ours.clone())]);
        let p = plan_bridge(None, &o.bridges["br-int"], &o);
        assert_eq!(p.changes, vec!["sFlow: removed, replaced exporter restored"]);
        let ops: Vec<Value> = p.ops.iter().map(Op::to_json).collect();
        assert_eq!(
            ops,
            vec![
                json!({"op": "insert", "table": "sFlow", "uuid-name": "restored_sflow", "row": foreign}),
                json!({"op": "update", "table": "Bridge", "where": [["_uuid", "==", ["uuid", "b-1"]]],
                       "row": {"sflow": ["named-uuid", "restored_sflow"]}}),
                json!({"op": "delete", "table": "sFlow", "where": [["_uuid", "==", ["uuid", "s-1"]]]}),
            ]
        );

        // If the foreign row survived (another bridge uses it), point back at it instead.
        let mut o = observed(bridge(Some("s-1"), None), &[("s-1", ours), ("f-1", foreign)]);
        o.bridges.insert(
            "br-ex".into(),
            BridgeRow { uuid: "b-2".into(), name: "br-ex".into(), sflow: Some("f-1".into()), ipfix: None },
        );
        let p = plan_bridge(None, &o.bridges["br-int"], &o);
        assert_eq!(p.ops[0].to_json()["row"], json!({"sflow": ["uuid", "f-1"]}));
    }

    #[test]
    fn removal_clears_the_column_and_deletes_our_row() {
        let o = observed(bridge(Some("s-1"), None), &[("s-1", our_row(3))]);
        let plans = plan(&[], &o);
        assert_eq!(plans.len(), 1);
        let ops: Vec<Value> = plans[0].ops.iter().map(Op::to_json).collect();
        assert_eq!(
            ops,
            vec![
                json!({"op": "update", "table": "Bridge", "where": [["_uuid", "==", ["uuid", "b-1"]]],
                       "row": {"sflow": ["set", []]}}),
                json!({"op": "delete", "table": "sFlow", "where": [["_uuid", "==", ["uuid", "s-1"]]]}),
            ]
        );
        // Removing sFlow from the export but keeping IPFIX removes only sFlow.
        let mut e = export(ConflictPolicy::Skip);
        e.sflow = None;
        e.ipfix = Some(IpfixSpec {
            targets: vec!["127.0.0.1:4739".into()],
            sampling: 64,
            obs_domain_id: 1,
            cache_active_timeout: 0,
        });
        let p = plan_bridge(Some(&e), &o.bridges["br-int"], &o);
        assert_eq!(p.changes, vec!["sFlow: removed", "IPFIX: created"]);
        // Foreign rows are never removed.
        let foreign = json!({"targets": "10.9.9.9:6343", "external_ids": ["map", []]});
        let o = observed(bridge(Some("f-1"), None), &[("f-1", foreign)]);
        assert!(plan(&[], &o).is_empty());
    }

    #[test]
    fn sampling_below_the_floor_is_refused() {
        let o = observed(bridge(None, None), &[]);
        let mut e = export(ConflictPolicy::Skip);
        e.sflow = Some(sflow(8));
        let p = plan_bridge(Some(&e), &o.bridges["br-int"], &o);
        assert!(p.is_noop());
        assert_eq!(p.refused, vec!["sFlow sampling 1 in 8 refused: the floor is 1 in 64"]);
    }

    /// A node as the tables show it: `(bridge, sflow, ipfix)` references and the rows by uuid.
    fn node(
        bridges: &[(&str, Option<&str>, Option<&str>)],
        sflow: &[(&str, Value)],
        ipfix: &[(&str, Value)],
    ) -> Observed {
        let rows = |rows: &[(&str, Value)]| -> BTreeMap<String, Row> {
            rows.iter().map(|(id, row)| (id.to_string(), row.as_object().unwrap().clone())).collect()
        };
        Observed {
            bridges: bridges
                .iter()
                .map(|(name, s, i)| {
                    let row = BridgeRow {
                        uuid: format!("uuid-{name}"),
                        name: (*name).into(),
                        sflow: s.map(Into::into),
                        ipfix: i.map(Into::into),
                    };
                    ((*name).to_string(), row)
                })
                .collect(),
            sflow: rows(sflow),
            ipfix: rows(ipfix),
            cur_cfg: 5,
            next_cfg: 5,
            ovs_version: None,
        }
    }

    fn our_ipfix(policy: &str) -> Value {
        json!({"targets": "127.0.0.1:4739", "sampling": 64, "obs_domain_id": 1, "cache_active_timeout": 0,
               "external_ids": ["map", [[OWNER_KEY, OWNER], [POLICY_KEY, policy], [GENERATION_KEY, "1"]]]})
    }

    /// What the plans do, bridge by bridge: `(bridge, changes)` of the plans with operations.
    fn removals(plans: &[Plan]) -> Vec<(String, Vec<String>)> {
        plans.iter().filter(|p| !p.is_noop()).map(|p| (p.bridge.clone(), p.changes.clone())).collect()
    }

    /// The rows a set of plans deletes, by table.
    fn deleted(plans: &[Plan]) -> Vec<(String, String)> {
        plans
            .iter()
            .flat_map(|p| &p.ops)
            .filter_map(|op| match op {
                Op::Delete { table, conditions } => Some((table.clone(), conditions[0].value[1].as_str()?.to_string())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn with_nothing_desired_every_row_of_ours_goes_and_only_those() {
        // The agent starts and its NodeTracing is gone: ours on two bridges and both tables, one that
        // replaced a foreign exporter (Override), and a foreign IPFIX row on br-int that must stay.
        let foreign_sflow =
            json!({"targets": "10.9.9.9:6343", "sampling": 1000, "external_ids": ["map", [["team", "net"]]]});
        let mut replaced = our_row(3);
        let record = json!({"uuid": "gone-1", "row": foreign_sflow}).to_string();
        replaced["external_ids"][1].as_array_mut().unwrap().push(json!([REPLACED_KEY, record]));
        let foreign_ipfix = json!({"targets": "10.9.9.9:4739", "external_ids": ["map", []]});
        let o = node(
            &[("br-int", Some("s-1"), Some("f-i")), ("br-ex", Some("s-2"), Some("i-1")), ("br-idle", None, None)],
            &[("s-1", our_row(3)), ("s-2", replaced)],
            &[("i-1", our_ipfix("old-policy")), ("f-i", foreign_ipfix)],
        );
        let plans = plan(&[], &o);
        assert_eq!(
            removals(&plans),
            vec![
                (
                    "br-ex".to_string(),
                    vec!["sFlow: removed, replaced exporter restored".to_string(), "IPFIX: removed".into()]
                ),
                ("br-int".to_string(), vec!["sFlow: removed".to_string()]),
            ]
        );
        let mut gone = deleted(&plans);
        gone.sort();
        assert_eq!(
            gone,
            [("IPFIX", "i-1"), ("sFlow", "s-1"), ("sFlow", "s-2")].map(|(t, id)| (t.to_string(), id.to_string()))
        );
        // The foreign row's bridge column is not in any update; the replaced one is re-inserted as it was.
        for p in &plans {
            for op in &p.ops {
                let op = op.to_json();
                if op["op"] == "update" && op["table"] == "Bridge" {
                    assert!(op["row"].get("ipfix").is_none() || p.bridge == "br-ex", "{op}");
                }
                if op["op"] == "insert" {
                    assert_eq!(op["row"], foreign_sflow, "the replaced exporter as recorded: {op}");
                }
            }
        }
        // Once removed, the same state plans nothing: removal is idempotent.
        let clean = node(&[("br-int", None, Some("f-i"))], &[], &[("f-i", json!({"external_ids": ["map", []]}))]);
        assert!(removals(&plan(&[], &clean)).is_empty());
    }

    #[test]
    fn a_bridge_that_left_the_spec_loses_our_rows_the_others_keep_theirs() {
        // The NodeTracing still exists but no longer lists br-int (its policy was deleted while the
        // agent was down); br-ex is still wanted, as it is.
        let mut wanted = export(ConflictPolicy::Skip);
        wanted.bridge = "br-ex".into();
        let o = node(
            &[("br-int", Some("s-1"), Some("i-1")), ("br-ex", Some("s-2"), None)],
            &[("s-1", our_row(3)), ("s-2", our_row(3))],
            &[("i-1", our_ipfix("storefront"))],
        );
        let plans = plan(&[wanted.clone()], &o);
        assert_eq!(
            removals(&plans),
            vec![("br-int".to_string(), vec!["sFlow: removed".to_string(), "IPFIX: removed".into()])]
        );
        assert_eq!(
            deleted(&plans),
            [("sFlow", "s-1"), ("IPFIX", "i-1")].map(|(t, id)| (t.to_string(), id.to_string()))
        );

        // A bridge still in the spec that no longer wants IPFIX loses only its IPFIX row.
        let o =
            node(&[("br-ex", Some("s-2"), Some("i-1"))], &[("s-2", our_row(3))], &[("i-1", our_ipfix("storefront"))]);
        let plans = plan(&[wanted], &o);
        assert_eq!(removals(&plans), vec![("br-ex".to_string(), vec!["IPFIX: removed".to_string()])]);
        assert_eq!(deleted(&plans), [("IPFIX".to_string(), "i-1".to_string())]);
    }

    #[test]
    fn a_row_of_ours_still_wanted_elsewhere_loses_only_the_stale_reference() {
        // Someone pointed br-copy at our br-int row: br-copy is not in the spec, br-int is.
        let mut wanted = export(ConflictPolicy::Skip);
        wanted.bridge = "br-int".into();
        let o = node(&[("br-int", Some("s-1"), None), ("br-copy", Some("s-1"), None)], &[("s-1", our_row(3))], &[]);
        let plans = plan(&[wanted], &o);
        assert_eq!(removals(&plans), vec![("br-copy".to_string(), vec!["sFlow: removed".to_string()])]);
        assert!(deleted(&plans).is_empty(), "br-int still uses it: {plans:?}");
        // With nothing desired, both references go; OVSDB collects the row with the last one (sFlow
        // rows live only while referenced), so neither transaction deletes a row the other still uses.
        let plans = plan(&[], &o);
        assert_eq!(removals(&plans).len(), 2);
        assert!(deleted(&plans).is_empty(), "{plans:?}");
    }

    #[test]
    fn a_missing_bridge_is_reported() {
        let o = observed(bridge(None, None), &[]);
        let mut e = export(ConflictPolicy::Skip);
        e.bridge = "br-nope".into();
        let plans = plan(&[e], &o);
        assert_eq!(plans.len(), 1);
        assert!(plans[0].missing);
    }

    #[test]
    fn parses_what_the_server_returns() {
        let results = vec![
            json!({"rows": [
                {"_uuid": ["uuid", "b-1"], "name": "br-int", "sflow": ["uuid", "s-1"], "ipfix": ["set", []]},
                {"_uuid": ["uuid", "b-2"], "name": "br-ex", "sflow": ["set", []], "ipfix": ["set", []]},
                {"name": "no-uuid"}, 17,
            ]}),
            json!({"rows": [{"_uuid": ["uuid", "s-1"], "_version": ["uuid", "v"], "targets": "x:1",
                             "external_ids": ["map", [[OWNER_KEY, OWNER], [GENERATION_KEY, "7"]]]}]}),
            json!({"rows": []}),
            json!({"rows": [{"cur_cfg": 4, "next_cfg": 5, "ovs_version": ["set", []]}]}),
        ];
        let o = Observed::from_results(&results).unwrap();
        assert_eq!(o.bridges.len(), 2);
        assert_eq!(o.bridges["br-int"].sflow.as_deref(), Some("s-1"));
        assert_eq!(o.bridges["br-int"].ipfix, None);
        let (id, row) = o.exporter("br-int", Kind::Sflow).unwrap();
        assert_eq!(id, "s-1");
        assert!(row.is_some_and(is_ours));
        assert_eq!(row.and_then(row_generation), Some(7));
        assert!(!o.sflow["s-1"].contains_key("_version"));
        assert_eq!((o.cur_cfg, o.next_cfg, o.ovs_version.clone()), (4, 5, None));
        // Malformed replies are errors, never panics.
        assert!(Observed::from_results(&results[..3]).is_err());
        let mut no_ovs = results.clone();
        no_ovs[3] = json!({"rows": []});
        assert!(Observed::from_results(&no_ovs).is_err());
        let mut junk = results;
        junk[1] = json!("junk");
        assert!(Observed::from_results(&junk).is_err());
    }
}
