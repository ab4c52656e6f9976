//! A small OVSDB client (RFC 7047): JSON-RPC 1.0 over a unix socket, with no framing but the JSON
//! values themselves.
//!
//! The message building and parsing is pure ([`Op`], [`Message`], [`FrameDecoder`], the value helpers)
//! and unit-tested without a socket; [`Client`] adds the connection: requests matched to responses by
//! id, `echo` requests of the server answered, an `echo` of our own sent when the line is quiet (a
//! server that answers nothing for two probe intervals is taken for dead), and `update` notifications
//! of a `monitor` pushed to a channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// The database of Open vSwitch.
pub const OPEN_VSWITCH: &str = "Open_vSwitch";

/// Largest message accepted from the server: a larger one means a broken peer, not a big table.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// What can go wrong talking to OVSDB.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported OVSDB address {0:?}: only unix:PATH (or a bare path) is supported")]
    Address(String),
    #[error("connecting to {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("OVSDB connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the OVSDB connection is closed")]
    Disconnected,
    #[error("OVSDB request {method} got no answer within {secs}s")]
    Timeout { method: String, secs: u64 },
    #[error("malformed OVSDB message: {0}")]
    Malformed(String),
    #[error("OVSDB {method} failed: {error}")]
    Rpc { method: String, error: String },
    #[error("OVSDB operation #{index} ({op}) failed: {error}{}", details_suffix(.details))]
    Op { index: usize, op: String, error: String, details: String },
    #[error("the OVSDB schema lacks {0}")]
    Schema(String),
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() { String::new() } else { format!(": {details}") }
}

// ---------------------------------------------------------------------------------------------
// Value encoding (RFC 7047 section 5.1)
// ---------------------------------------------------------------------------------------------

/// `["set", [...]]`.
pub fn set(items: impl IntoIterator<Item = Value>) -> Value {
    json!(["set", items.into_iter().collect::<Vec<_>>()])
}

/// The empty set: how an optional column says "none".
pub fn empty() -> Value {
    set([])
}

/// `["map", [[k, v], ...]]` of strings.
pub fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
    json!(["map", pairs.into_iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()])
}

/// `["uuid", "..."]`.
pub fn uuid(id: &str) -> Value {
    json!(["uuid", id])
}

/// `["named-uuid", "..."]`: a row inserted earlier in the same transaction.
pub fn named_uuid(name: &str) -> Value {
    json!(["named-uuid", name])
}

/// An optional column: the atom, or the empty set.
pub fn optional(value: Option<Value>) -> Value {
    value.unwrap_or_else(empty)
}

// ---------------------------------------------------------------------------------------------
// Value decoding: lenient, never panics; anything unexpected reads as "nothing".
// ---------------------------------------------------------------------------------------------

/// The atoms of a set column: `["set", [a, b]]` → `[a, b]`, a bare atom → `[atom]`.
pub fn atoms(value: &Value) -> Vec<Value> {
    match value.as_array().map(Vec::as_slice) {
        Some([tag, Value::Array(items)]) if tag == "set" => items.clone(),
        _ => vec![value.clone()],
    }
}

/// The uuid of `["uuid", "..."]`.
pub fn uuid_of(value: &Value) -> Option<String> {
    match value.as_array().map(Vec::as_slice) {
        Some([tag, Value::String(id)]) if tag == "uuid" => Some(id.clone()),
        _ => None,
    }
}

/// An optional reference column (`["set", []]` or `["uuid", "..."]`).
pub fn optional_uuid(value: &Value) -> Option<String> {
    atoms(value).iter().find_map(uuid_of)
}

/// An optional integer column.
pub fn optional_int(value: &Value) -> Option<i64> {
    atoms(value).iter().find_map(Value::as_i64)
}

/// An optional string column.
pub fn optional_string(value: &Value) -> Option<String> {
    atoms(value).iter().find_map(|a| a.as_str().map(str::to_string))
}

/// A string→string map column; pairs of other types are skipped.
pub fn string_map(value: &Value) -> BTreeMap<String, String> {
    match value.as_array().map(Vec::as_slice) {
        Some([tag, Value::Array(pairs)]) if tag == "map" => pairs
            .iter()
            .filter_map(|p| match p.as_array().map(Vec::as_slice) {
                Some([Value::String(k), Value::String(v)]) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A canonical form of a column value for comparisons: sets as sorted atom lists (so that the atom
/// `"x"` equals `["set", ["x"]]`), maps as sorted pairs.
pub fn canonical(value: &Value) -> Value {
    if let Some([tag, Value::Array(pairs)]) = value.as_array().map(Vec::as_slice)
        && tag == "map"
    {
        let mut pairs = pairs.clone();
        pairs.sort_by_key(|p| p.to_string());
        return json!(["map", pairs]);
    }
    let mut items = atoms(value);
    items.sort_by_key(|a| a.to_string());
    Value::Array(items)
}

// ---------------------------------------------------------------------------------------------
// Operations of `transact` (RFC 7047 section 5.2)
// ---------------------------------------------------------------------------------------------

/// A `where` clause: `[column, function, value]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    pub column: String,
    pub function: &'static str,
    pub value: Value,
}

impl Cond {
    pub fn eq(column: &str, value: Value) -> Self {
        Self { column: column.into(), function: "==", value }
    }

    /// The row whose `_uuid` is `id`.
    pub fn uuid(id: &str) -> Self {
        Self::eq("_uuid", uuid(id))
    }

    fn to_json(&self) -> Value {
        json!([self.column, self.function, self.value])
    }
}

/// A mutation: `[column, mutator, value]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mutation {
    pub column: String,
    pub mutator: &'static str,
    pub value: Value,
}

impl Mutation {
    pub fn add(column: &str, value: Value) -> Self {
        Self { column: column.into(), mutator: "+=", value }
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Select {
        table: String,
        conditions: Vec<Cond>,
        /// `None`: every column.
        columns: Option<Vec<String>>,
    },
    Insert {
        table: String,
        row: Map<String, Value>,
        uuid_name: Option<String>,
    },
    Update {
        table: String,
        conditions: Vec<Cond>,
        row: Map<String, Value>,
    },
    Mutate {
        table: String,
        conditions: Vec<Cond>,
        mutations: Vec<Mutation>,
    },
    Delete {
        table: String,
        conditions: Vec<Cond>,
    },
    /// Fails the transaction unless the selected rows' `columns` equal (`==`) or differ from (`!=`)
    /// `rows`, after waiting up to `timeout_ms` (0: no waiting).
    Wait {
        table: String,
        conditions: Vec<Cond>,
        columns: Vec<String>,
        equal: bool,
        rows: Vec<Map<String, Value>>,
        timeout_ms: Option<u64>,
    },
    /// Written to the database log with the transaction.
    Comment(String),
}

fn conds(conditions: &[Cond]) -> Value {
    Value::Array(conditions.iter().map(Cond::to_json).collect())
}

impl Op {
    /// The `op` name.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Select { .. } => "select",
            Op::Insert { .. } => "insert",
            Op::Update { .. } => "update",
            Op::Mutate { .. } => "mutate",
            Op::Delete { .. } => "delete",
            Op::Wait { .. } => "wait",
            Op::Comment(_) => "comment",
        }
    }

    /// The JSON object of the operation.
    pub fn to_json(&self) -> Value {
        match self {
            Op::Select { table, conditions, columns } => {
                let mut op = json!({"op": "select", "table": table, "where": conds(conditions)});
                if let Some(columns) = columns {
                    op["columns"] = json!(columns);
                }
                op
            }
            Op::Insert { table, row, uuid_name } => {
                let mut op = json!({"op": "insert", "table": table, "row": row});
                if let Some(name) = uuid_name {
                    op["uuid-name"] = json!(name);
                }
                op
            }
            Op::Update { table, conditions, row } => {
                json!({"op": "update", "table": table, "where": conds(conditions), "row": row})
            }
            Op::Mutate { table, conditions, mutations } => json!({
                "op": "mutate",
                "table": table,
                "where": conds(conditions),
                "mutations": mutations.iter().map(|m| json!([m.column, m.mutator, m.value])).collect::<Vec<_>>(),
            }),
            Op::Delete { table, conditions } => {
                json!({"op": "delete", "table": table, "where": conds(conditions)})
            }
            Op::Wait { table, conditions, columns, equal, rows, timeout_ms } => {
                let mut op = json!({
                    "op": "wait",
                    "table": table,
                    "where": conds(conditions),
                    "columns": columns,
                    "until": if *equal { "==" } else { "!=" },
                    "rows": rows,
                });
                if let Some(ms) = timeout_ms {
                    op["timeout"] = json!(ms);
                }
                op
            }
            Op::Comment(text) => json!({"op": "comment", "comment": text}),
        }
    }
}

/// The `params` of `transact`: the database name, then the operations.
pub fn transact_params(db: &str, ops: &[Op]) -> Value {
    let mut params = vec![json!(db)];
    params.extend(ops.iter().map(Op::to_json));
    Value::Array(params)
}

/// Checks the `result` of a `transact` against its operations: one result object per operation, no
/// `error` in any of them (a failed commit adds an extra result that carries the error).
pub fn parse_transact_result(ops: &[Op], result: &Value) -> Result<Vec<Value>, Error> {
    let results =
        result.as_array().ok_or_else(|| Error::Malformed(format!("transact result is not an array: {result}")))?;
    for (index, r) in results.iter().enumerate() {
        if let Some(error) = r.get("error").filter(|e| !e.is_null()) {
            let op = ops.get(index).map_or("commit", Op::name).to_string();
            return Err(Error::Op {
                index,
                op,
                error: error.as_str().map_or_else(|| error.to_string(), str::to_string),
                details: r.get("details").and_then(Value::as_str).unwrap_or_default().to_string(),
            });
        }
    }
    if results.len() < ops.len() {
        return Err(Error::Malformed(format!(
            "transact returned {} results for {} operations",
            results.len(),
            ops.len()
        )));
    }
    Ok(results[..ops.len()].to_vec())
}

/// The rows of a `select` result.
pub fn rows(result: &Value) -> Result<Vec<Map<String, Value>>, Error> {
    result
        .get("rows")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Malformed(format!("select result without rows: {result}")))
        .map(|rows| rows.iter().filter_map(|r| r.as_object().cloned()).collect())
}

// ---------------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------------

/// The tables and columns of a database schema (what `get_schema` returns, reduced to names).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schema {
    pub name: String,
    pub version: String,
    pub tables: BTreeMap<String, BTreeSet<String>>,
}

impl Schema {
    pub fn from_json(value: &Value) -> Result<Self, Error> {
        let tables = value
            .get("tables")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::Malformed("schema without tables".into()))?;
        Ok(Self {
            name: value.get("name").and_then(Value::as_str).unwrap_or_default().into(),
            version: value.get("version").and_then(Value::as_str).unwrap_or_default().into(),
            tables: tables
                .iter()
                .map(|(name, table)| {
                    let mut columns: BTreeSet<String> = table
                        .get("columns")
                        .and_then(Value::as_object)
                        .map(|c| c.keys().cloned().collect())
                        .unwrap_or_default();
                    columns.extend(["_uuid".to_string(), "_version".to_string()]);
                    (name.clone(), columns)
                })
                .collect(),
        })
    }

    /// Fails naming every `table.column` of `needs` the schema lacks.
    pub fn require(&self, needs: &[(&str, &[&str])]) -> Result<(), Error> {
        let missing: Vec<String> = needs
            .iter()
            .flat_map(|(table, columns)| {
                columns.iter().filter_map(move |c| {
                    let has = self.tables.get(*table).is_some_and(|t| t.contains(*c));
                    (!has).then(|| format!("{table}.{c}"))
                })
            })
            .collect();
        if missing.is_empty() { Ok(()) } else { Err(Error::Schema(missing.join(", "))) }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON-RPC messages and stream framing
// ---------------------------------------------------------------------------------------------

/// A JSON-RPC 1.0 message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    /// A request with a null id: no answer expected (`update` of a monitor).
    Notification {
        method: String,
        params: Value,
    },
    Response {
        id: Value,
        result: Value,
        error: Value,
    },
}

impl Message {
    pub fn parse(value: Value) -> Result<Self, Error> {
        let Value::Object(mut o) = value else {
            return Err(Error::Malformed(format!("a JSON-RPC message must be an object, got {value}")));
        };
        let id = o.remove("id").unwrap_or(Value::Null);
        if let Some(method) = o.remove("method") {
            let method = method
                .as_str()
                .ok_or_else(|| Error::Malformed(format!("method is not a string: {method}")))?
                .to_string();
            let params = o.remove("params").unwrap_or(Value::Null);
            return Ok(if id.is_null() {
                Message::Notification { method, params }
            } else {
                Message::Request { id, method, params }
            });
        }
        if o.contains_key("result") || o.contains_key("error") {
            return Ok(Message::Response {
                id,
                result: o.remove("result").unwrap_or(Value::Null),
                error: o.remove("error").unwrap_or(Value::Null),
            });
        }
        Err(Error::Malformed(format!("neither request nor response: {}", Value::Object(o))))
    }
}

/// A request object.
pub fn request(id: Value, method: &str, params: Value) -> Value {
    json!({"id": id, "method": method, "params": params})
}

/// A response object.
pub fn response(id: Value, result: Value) -> Value {
    json!({"id": id, "result": result, "error": null})
}

/// An error response object.
pub fn error_response(id: Value, error: &str) -> Value {
    json!({"id": id, "result": null, "error": error})
}

/// Splits a byte stream into consecutive JSON values (OVSDB sends them back to back, no delimiter).
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete value, `Ok(None)` when more bytes are needed, `Err` on bytes that can never
    /// become JSON (the connection is then unusable).
    pub fn next_value(&mut self) -> Result<Option<Value>, Error> {
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match stream.next() {
            None => {
                // Only whitespace is left.
                self.buf.clear();
                Ok(None)
            }
            Some(Ok(value)) => {
                let used = stream.byte_offset();
                self.buf.drain(..used);
                Ok(Some(value))
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buf.len() > MAX_MESSAGE_BYTES {
                    Err(Error::Malformed(format!("a message larger than {MAX_MESSAGE_BYTES} bytes")))
                } else {
                    Ok(None)
                }
            }
            Some(Err(e)) => Err(Error::Malformed(e.to_string())),
        }
    }

    /// Bytes held that are not a complete value yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The socket path of an OVSDB address: `unix:PATH`, or a bare path.
pub fn socket_path(address: &str) -> Result<&str, Error> {
    if let Some(path) = address.strip_prefix("unix:") {
        return Ok(path);
    }
    if address.starts_with('/') || address.starts_with('.') {
        return Ok(address);
    }
    Err(Error::Address(address.into()))
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// A `monitor` update notification: the monitor id and its `<table-updates>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub monitor_id: Value,
    pub tables: Value,
}

/// Timing of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// After this long without a byte from the server, send an `echo`; after twice this long, give up.
    pub probe: Duration,
    /// Longest wait for the answer to a request.
    pub request_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { probe: Duration::from_secs(5), request_timeout: Duration::from_secs(30) }
    }
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Value, Error>>>>;

struct Shared {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
}

impl Shared {
    async fn send(&self, value: &Value) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Malformed(e.to_string()))?;
        let mut w = self.writer.lock().await;
        w.write_all(&bytes).await?;
        Ok(())
    }
}

/// One connection to an OVSDB server. Dropping it closes the connection.
pub struct Client {
    shared: Arc<Shared>,
    next_id: AtomicU64,
    options: Options,
    updates: Mutex<Option<mpsc::Receiver<Update>>>,
    closed: watch::Receiver<bool>,
    reader: JoinHandle<()>,
    address: String,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Notifications buffered before the oldest is dropped: an update only says "look again", so losing
/// some of a burst loses nothing.
const UPDATE_QUEUE: usize = 64;

impl Client {
    /// Connects to `unix:PATH` with default timing.
    pub async fn connect(address: &str) -> Result<Self, Error> {
        Self::connect_with(address, Options::default()).await
    }

    pub async fn connect_with(address: &str, options: Options) -> Result<Self, Error> {
        let path = socket_path(address)?;
        let stream = UnixStream::connect(path).await.map_err(|source| Error::Connect { path: path.into(), source })?;
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared { writer: tokio::sync::Mutex::new(write), pending: Mutex::new(HashMap::new()) });
        let (updates_tx, updates_rx) = mpsc::channel(UPDATE_QUEUE);
        let (closed_tx, closed_rx) = watch::channel(false);
        let reader =
            tokio::spawn(read_loop(read, shared.clone(), updates_tx, closed_tx, options.probe, address.to_string()));
        Ok(Self {
            shared,
            next_id: AtomicU64::new(1),
            options,
            updates: Mutex::new(Some(updates_rx)),
            closed: closed_rx,
            reader,
            address: address.into(),
        })
    }

    /// Connects, retrying with exponential backoff (from 250 ms up to `max_backoff`) until it works.
    pub async fn connect_with_backoff(address: &str, options: Options, max_backoff: Duration) -> Self {
        let mut delay = Duration::from_millis(250);
        loop {
            match Self::connect_with(address, options).await {
                Ok(client) => return client,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot reach OVSDB");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max_backoff);
                }
            }
        }
    }

    /// The address this client talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The `update` notifications of this connection's monitors; `None` after the first call. The
    /// channel closes when the connection does.
    pub fn take_updates(&self) -> Option<mpsc::Receiver<Update>> {
        self.updates.lock().ok()?.take()
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Sends a request and waits for its result.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, Error> {
        if self.is_closed() {
            return Err(Error::Disconnected);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.insert(id, tx);
        }
        // The reader marks the connection closed before it drops every waiter: either it dropped ours,
        // or we see the mark here.
        if self.is_closed() {
            self.forget(id);
            return Err(Error::Disconnected);
        }
        let sent = self.shared.send(&request(json!(id), method, params)).await;
        if let Err(e) = sent {
            self.forget(id);
            return Err(e);
        }
        match tokio::time::timeout(self.options.request_timeout, rx).await {
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(Error::Rpc { error, .. }))) => Err(Error::Rpc { method: method.into(), error }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                self.forget(id);
                Err(Error::Timeout { method: method.into(), secs: self.options.request_timeout.as_secs() })
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.remove(&id);
        }
    }

    /// `echo`: the server answers with the same params.
    pub async fn echo(&self) -> Result<(), Error> {
        let params = json!(["crosstrace"]);
        let result = self.request("echo", params.clone()).await?;
        if result == params { Ok(()) } else { Err(Error::Malformed(format!("echo answered {result}"))) }
    }

    /// `list_dbs`.
    pub async fn list_dbs(&self) -> Result<Vec<String>, Error> {
        let result = self.request("list_dbs", json!([])).await?;
        Ok(result
            .as_array()
            .map(|dbs| dbs.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// `get_schema`.
    pub async fn get_schema(&self, db: &str) -> Result<Schema, Error> {
        let result = self.request("get_schema", json!([db])).await?;
        Schema::from_json(&result)
    }

    /// `transact`: the results of the operations, one per operation, or the first error.
    pub async fn transact(&self, db: &str, ops: &[Op]) -> Result<Vec<Value>, Error> {
        let result = self.request("transact", transact_params(db, ops)).await?;
        parse_transact_result(ops, &result)
    }

    /// `monitor`: the initial contents; later changes arrive on [`Client::take_updates`]. `requests`
    /// maps each table to its `<monitor-request>`s, e.g. `{"Bridge": [{"columns": ["sflow"]}]}`.
    pub async fn monitor(&self, db: &str, monitor_id: Value, requests: Value) -> Result<Value, Error> {
        self.request("monitor", json!([db, monitor_id, requests])).await
    }
}

async fn read_loop(
    mut read: tokio::net::unix::OwnedReadHalf,
    shared: Arc<Shared>,
    updates: mpsc::Sender<Update>,
    closed: watch::Sender<bool>,
    probe: Duration,
    address: String,
) {
    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut probing = false;
    let reason: String = 'conn: loop {
        let n = match tokio::time::timeout(probe, read.read(&mut buf)).await {
            Err(_) if probing => break 'conn "no answer to echo".into(),
            Err(_) => {
                probing = true;
                let echo = request(json!("echo"), "echo", json!([]));
                if let Err(e) = shared.send(&echo).await {
                    break 'conn e.to_string();
                }
                continue;
            }
            Ok(Ok(0)) => break 'conn "closed by the server".into(),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => break 'conn e.to_string(),
        };
        probing = false;
        decoder.push(&buf[..n]);
        loop {
            let value = match decoder.next_value() {
                Ok(Some(v)) => v,
                Ok(None) => break,
                Err(e) => break 'conn e.to_string(),
            };
            let message = match Message::parse(value) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an OVSDB message");
                    continue;
                }
            };
            match message {
                Message::Response { id, result, error } => {
                    let Some(id) = id.as_u64() else {
                        continue; // our own echo probes use a string id
                    };
                    let waiter = shared.pending.lock().ok().and_then(|mut p| p.remove(&id));
                    if let Some(waiter) = waiter {
                        let answer = if error.is_null() {
                            Ok(result)
                        } else {
                            Err(Error::Rpc {
                                method: String::new(),
                                error: error.as_str().map_or_else(|| error.to_string(), str::to_string),
                            })
                        };
                        let _ = waiter.send(answer);
                    }
                }
                Message::Request { id, method, params } => {
                    let reply =
                        if method == "echo" { response(id, params) } else { error_response(id, "unknown method") };
                    if let Err(e) = shared.send(&reply).await {
                        break 'conn e.to_string();
                    }
                }
                Message::Notification { method, params } => {
                    if method.starts_with("update") {
                        let (monitor_id, tables) = match params.as_array().map(Vec::as_slice) {
                            Some([id, tables, ..]) => (id.clone(), tables.clone()),
                            _ => (Value::Null, params),
                        };
                        // A full queue already says "look again".
                        let _ = updates.try_send(Update { monitor_id, tables });
                    }
                }
            }
        }
    };
    tracing::info!(%address, %reason, "OVSDB connection closed");
    let _ = closed.send(true);
    if let Ok(mut pending) = shared.pending.lock() {
        pending.clear(); // waiters see Disconnected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_values() {
        assert_eq!(set([json!("a"), json!("b")]), json!(["set", ["a", "b"]]));
        assert_eq!(empty(), json!(["set", []]));
        assert_eq!(map([("k", "v"), ("x", "y")]), json!(["map", [["k", "v"], ["x", "y"]]]));
        assert_eq!(uuid("u-1"), json!(["uuid", "u-1"]));
        assert_eq!(named_uuid("row"), json!(["named-uuid", "row"]));
        assert_eq!(optional(Some(json!(3))), json!(3));
        assert_eq!(optional(None), json!(["set", []]));
    }

    #[test]
    fn decodes_values_leniently() {
        assert_eq!(atoms(&json!(["set", [1, 2]])), vec![json!(1), json!(2)]);
        assert_eq!(atoms(&json!("x")), vec![json!("x")]);
        assert_eq!(optional_uuid(&json!(["uuid", "a"])), Some("a".into()));
        assert_eq!(optional_uuid(&json!(["set", []])), None);
        assert_eq!(optional_uuid(&json!(["set", [["uuid", "b"]]])), Some("b".into()));
        assert_eq!(optional_uuid(&json!(42)), None);
        assert_eq!(optional_int(&json!(64)), Some(64));
        assert_eq!(optional_int(&json!(["set", []])), None);
        assert_eq!(optional_string(&json!("lo")), Some("lo".into()));
        let m = string_map(&json!(["map", [["a", "1"], ["b", 2], "junk", ["c", "3"]]]));
        assert_eq!(m.len(), 2);
        assert_eq!(m["c"], "3");
        assert!(string_map(&json!({"not": "a map"})).is_empty());
        assert!(string_map(&Value::Null).is_empty());
    }

    #[test]
    fn canonical_form_ignores_set_encoding_and_order() {
        assert_eq!(canonical(&json!("x")), canonical(&json!(["set", ["x"]])));
        assert_eq!(canonical(&json!(["set", ["b", "a"]])), canonical(&json!(["set", ["a", "b"]])));
        assert_eq!(
            canonical(&json!(["map", [["b", "2"], ["a", "1"]]])),
            canonical(&json!(["map", [["a", "1"], ["b", "2"]]]))
        );
        assert_ne!(canonical(&json!(64)), canonical(&json!(["set", []])));
    }

    #[test]
    fn builds_every_operation() {
        let select = Op::Select {
            table: "Bridge".into(),
            conditions: vec![Cond::eq("name", json!("br-int"))],
            columns: Some(vec!["_uuid".into(), "sflow".into()]),
        };
        assert_eq!(
            select.to_json(),
            json!({"op": "select", "table": "Bridge", "where": [["name", "==", "br-int"]], "columns": ["_uuid", "sflow"]})
        );
        let mut row = Map::new();
        row.insert("targets".into(), set([json!("127.0.0.1:6343")]));
        let insert = Op::Insert { table: "sFlow".into(), row: row.clone(), uuid_name: Some("new_sflow".into()) };
        assert_eq!(
            insert.to_json(),
            json!({"op": "insert", "table": "sFlow", "row": {"targets": ["set", ["127.0.0.1:6343"]]}, "uuid-name": "new_sflow"})
        );
        let update = Op::Update { table: "Bridge".into(), conditions: vec![Cond::uuid("b-1")], row };
        assert_eq!(update.to_json()["where"], json!([["_uuid", "==", ["uuid", "b-1"]]]));
        let mutate = Op::Mutate {
            table: "Open_vSwitch".into(),
            conditions: vec![],
            mutations: vec![Mutation::add("next_cfg", json!(1))],
        };
        assert_eq!(
            mutate.to_json(),
            json!({"op": "mutate", "table": "Open_vSwitch", "where": [], "mutations": [["next_cfg", "+=", 1]]})
        );
        let delete = Op::Delete { table: "sFlow".into(), conditions: vec![Cond::uuid("s-1")] };
        assert_eq!(
            delete.to_json(),
            json!({"op": "delete", "table": "sFlow", "where": [["_uuid", "==", ["uuid", "s-1"]]]})
        );
        let mut expect = Map::new();
        expect.insert("sflow".into(), empty());
        let wait = Op::Wait {
            table: "Bridge".into(),
            conditions: vec![Cond::uuid("b-1")],
            columns: vec!["sflow".into()],
            equal: true,
            rows: vec![expect],
            timeout_ms: Some(0),
        };
        assert_eq!(
            wait.to_json(),
            json!({"op": "wait", "table": "Bridge", "where": [["_uuid", "==", ["uuid", "b-1"]]], "columns": ["sflow"], "until": "==", "rows": [{"sflow": ["set", []]}], "timeout": 0})
        );
        assert_eq!(Op::Comment("hi".into()).to_json(), json!({"op": "comment", "comment": "hi"}));
        assert_eq!(
            transact_params("Open_vSwitch", &[Op::Comment("c".into())]),
            json!(["Open_vSwitch", {"op": "comment", "comment": "c"}])
        );
    }

    #[test]
    fn transact_results_are_checked() {
        let ops = vec![Op::Comment("a".into()), Op::Comment("b".into())];
        assert_eq!(parse_transact_result(&ops, &json!([{}, {}])).unwrap().len(), 2);
        let err =
            parse_transact_result(&ops, &json!([{}, {"error": "constraint violation", "details": "no"}])).unwrap_err();
        assert!(matches!(err, Error::Op { index: 1, ref op, .. } if op == "comment"), "{err}");
        // A failed commit: one result more than operations.
        let err =
            parse_transact_result(&ops, &json!([{}, {}, {"error": "referential integrity violation"}])).unwrap_err();
        assert!(matches!(err, Error::Op { index: 2, ref op, .. } if op == "commit"), "{err}");
        // Malformed replies are errors, not panics.
        assert!(parse_transact_result(&ops, &json!({"rows": []})).is_err());
        assert!(parse_transact_result(&ops, &json!([{}])).is_err());
        assert!(parse_transact_result(&ops, &Value::Null).is_err());
        assert!(rows(&json!({"rows": [{"a": 1}, 7]})).unwrap().len() == 1);
        assert!(rows(&json!({"count": 1})).is_err());
    }

    #[test]
    fn parses_messages() {
        assert_eq!(
            Message::parse(json!({"id": 3, "result": [], "error": null})).unwrap(),
            Message::Response { id: json!(3), result: json!([]), error: Value::Null }
        );
        assert_eq!(
            Message::parse(json!({"id": "echo", "method": "echo", "params": []})).unwrap(),
            Message::Request { id: json!("echo"), method: "echo".into(), params: json!([]) }
        );
        assert_eq!(
            Message::parse(json!({"id": null, "method": "update", "params": [1, {}]})).unwrap(),
            Message::Notification { method: "update".into(), params: json!([1, {}]) }
        );
        assert!(Message::parse(json!([1, 2])).is_err());
        assert!(Message::parse(json!({"id": 1})).is_err());
        assert!(Message::parse(json!({"id": 1, "method": 7})).is_err());
        assert_eq!(request(json!(1), "echo", json!([])), json!({"id": 1, "method": "echo", "params": []}));
        assert_eq!(response(json!("x"), json!([])), json!({"id": "x", "result": [], "error": null}));
    }

    #[test]
    fn decodes_back_to_back_values_split_anywhere() {
        let stream = br#"{"id":1,"result":{"a":"}{"},"error":null}  {"id":null,"method":"update","params":[0,{}]}{"id":2,"result":[],"error":null}"#;
        for split in 0..stream.len() {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in [&stream[..split], &stream[split..]] {
                d.push(chunk);
                while let Some(v) = d.next_value().unwrap() {
                    got.push(v);
                }
            }
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(got[0]["result"]["a"], "}{");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = FrameDecoder::default();
        d.push(b"{\"id\":1} ]");
        assert!(d.next_value().unwrap().is_some());
        assert!(d.next_value().is_err());
        let mut d = FrameDecoder::default();
        d.push(b"\xff\xfe");
        assert!(d.next_value().is_err());
    }

    #[test]
    fn schema_checks_columns() {
        let schema = Schema::from_json(&json!({
            "name": "Open_vSwitch", "version": "8.3.1",
            "tables": {"Bridge": {"columns": {"sflow": {}, "name": {}}}, "sFlow": {"columns": {"targets": {}}}}
        }))
        .unwrap();
        assert!(schema.require(&[("Bridge", &["sflow", "_uuid"]), ("sFlow", &["targets"])]).is_ok());
        let err = schema.require(&[("Bridge", &["ipfix"]), ("IPFIX", &["targets"])]).unwrap_err();
        assert_eq!(err.to_string(), "the OVSDB schema lacks Bridge.ipfix, IPFIX.targets");
        assert!(Schema::from_json(&json!({"name": "x"})).is_err());
        assert!(Schema::from_json(&json!([])).is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(socket_path("unix:/var/run/openvswitch/db.sock").unwrap(), "/var/run/openvswitch/db.sock");
        assert_eq!(socket_path("/tmp/db.sock").unwrap(), "/tmp/db.sock");
        assert!(socket_path("tcp:127.0.0.1:6640").is_err());
    }
}
