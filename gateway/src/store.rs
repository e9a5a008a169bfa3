//! The store: the one owner of the SQLite database.
//!
//! A dedicated thread holds the connection; everyone else sends it commands through a channel
//! and never waits on disk. Writes that arrive together share one transaction, so a burst of
//! readings costs one commit, not one disk sync each. Transactions that add to the outbox are
//! synced to disk before anyone hears of the new rows (`synchronous = FULL`); everything else
//! uses WAL with `synchronous = NORMAL`, which survives a crash of the process.
//!
//! Tables: `alert_history` (every transition), `outbox` (alerts and summaries waiting for the
//! upstream's PUBACK), `rollups` (windowed statistics per device and metric), `readings` (raw
//! readings, if configured), `devices` (per-device counters), `counters` (gateway-wide) and
//! `retained` (the embedded broker's retained messages, written by `broker::retained`).
//! When the database outgrows its budget, the oldest raw readings go first, then the oldest
//! rollups; alerts and the outbox are never dropped to make room.
//!
//! [`Reader`] opens the same file read-only for the CLI while the gateway runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::aggregate::{Closed, StateRollup};
use crate::alert::{AlertDoc, now_millis};
use crate::rules::{AlertState, Millis};
use crate::stats::{DeviceCounters, Stats};
use crate::value::Value;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "watchpost.db";

/// Most commands handled in one go.
const BATCH: usize = 4096;
/// How often the budget and the raw retention are enforced.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);
/// Rows removed per statement when making room.
const EVICT_CHUNK: i64 = 5000;

/// Schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE alert_history (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        id        TEXT NOT NULL,
        rule      TEXT NOT NULL,
        device    TEXT NOT NULL,
        metric    TEXT NOT NULL,
        severity  TEXT NOT NULL,
        state     TEXT NOT NULL,
        value     REAL NOT NULL,
        threshold REAL NOT NULL,
        since     TEXT NOT NULL,
        at        TEXT NOT NULL,
        recorded_ms INTEGER NOT NULL
    );
    CREATE INDEX alert_history_at ON alert_history (recorded_ms);
    ",
    "
    CREATE TABLE outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id   TEXT NOT NULL,
        topic      TEXT NOT NULL,
        payload    BLOB NOT NULL,
        retain     INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE rollups (
        device   TEXT NOT NULL,
        metric   TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        len_ms   INTEGER NOT NULL,
        count    INTEGER NOT NULL,
        min      REAL NOT NULL,
        max      REAL NOT NULL,
        mean     REAL NOT NULL,
        last     REAL NOT NULL,
        PRIMARY KEY (device, metric, start_ms)
    ) WITHOUT ROWID;
    CREATE INDEX rollups_start ON rollups (start_ms);
    CREATE TABLE readings (
        device TEXT NOT NULL,
        metric TEXT NOT NULL,
        at_ms  INTEGER NOT NULL,
        value  REAL NOT NULL,
        seq    INTEGER
    );
    CREATE INDEX readings_at ON readings (at_ms);
    CREATE INDEX readings_stream ON readings (device, metric, at_ms);
    CREATE TABLE devices (
        device        TEXT PRIMARY KEY,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms  INTEGER NOT NULL,
        messages      INTEGER NOT NULL DEFAULT 0,
        readings      INTEGER NOT NULL DEFAULT 0,
        decode_errors INTEGER NOT NULL DEFAULT 0,
        lost          INTEGER NOT NULL DEFAULT 0,
        duplicated    INTEGER NOT NULL DEFAULT 0,
        out_of_order  INTEGER NOT NULL DEFAULT 0,
        restarts      INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    ",
    "
    CREATE TABLE alert_state (
        rule       TEXT NOT NULL,
        device     TEXT NOT NULL,
        metric     TEXT NOT NULL,
        raised     INTEGER NOT NULL,
        since_ms   INTEGER NOT NULL,
        threshold  REAL NOT NULL,
        topic      TEXT NOT NULL,
        doc        TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (rule, device, metric)
    ) WITHOUT ROWID;
    ",
    // States: a value column holds a number or a state (text `true`, `open`: see `value`),
    // state alerts have no threshold, and state streams have rollups of their own.
    "
    ALTER TABLE alert_history RENAME TO alert_history_v3;
    CREATE TABLE alert_history (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        id        TEXT NOT NULL,
        rule      TEXT NOT NULL,
        device    TEXT NOT NULL,
        metric    TEXT NOT NULL,
        severity  TEXT NOT NULL,
        state     TEXT NOT NULL,
        value     NOT NULL,
        threshold REAL,
        since     TEXT NOT NULL,
        at        TEXT NOT NULL,
        recorded_ms INTEGER NOT NULL
    );
    INSERT INTO alert_history SELECT * FROM alert_history_v3;
    DROP TABLE alert_history_v3;
    CREATE INDEX alert_history_at ON alert_history (recorded_ms);
    ALTER TABLE alert_state RENAME TO alert_state_v3;
    CREATE TABLE alert_state (
        rule       TEXT NOT NULL,
        device     TEXT NOT NULL,
        metric     TEXT NOT NULL,
        raised     INTEGER NOT NULL,
        since_ms   INTEGER NOT NULL,
        threshold  REAL,
        topic      TEXT NOT NULL,
        doc        TEXT NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (rule, device, metric)
    ) WITHOUT ROWID;
    INSERT INTO alert_state SELECT * FROM alert_state_v3;
    DROP TABLE alert_state_v3;
    CREATE TABLE state_rollups (
        device   TEXT NOT NULL,
        metric   TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        len_ms   INTEGER NOT NULL,
        count    INTEGER NOT NULL,
        changes  INTEGER NOT NULL,
        last     NOT NULL,
        time_in  TEXT NOT NULL,
        PRIMARY KEY (device, metric, start_ms)
    ) WITHOUT ROWID;
    CREATE INDEX state_rollups_start ON state_rollups (start_ms);
    ALTER TABLE devices ADD COLUMN unmapped INTEGER NOT NULL DEFAULT 0;
    ",
    // Retained messages of the embedded broker, one row per topic: the MQTT 5 PUBLISH that
    // carries the message, and when it expires (wall clock), if it does.
    "
    CREATE TABLE retained (
        topic      TEXT PRIMARY KEY,
        packet     BLOB NOT NULL,
        expires_ms INTEGER
    );
    ",
];

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite refused to open, migrate or read the database.
    #[error("cannot use the database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// There is no database yet.
    #[error("there is no database at {0}: has the gateway run with this configuration's data_dir?")]
    Missing(PathBuf),
    /// The database was written by a newer Watchpost.
    #[error(
        "the database {path} has schema version {found}, newer than this Watchpost knows ({known}); upgrade Watchpost or move the file away"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// The store thread could not be started.
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
}

/// An alert or summary to be sent upstream, before it has a place in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Alert id (or summary id), for logs and de-duplication.
    pub id: String,
    /// Topic below the upstream prefix.
    pub topic: String,
    /// Message body.
    pub payload: Bytes,
    /// Publish retained.
    pub retain: bool,
}

/// A committed outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// Position in the outbox: rows go upstream in this order.
    pub seq: u64,
    /// The entry.
    pub entry: OutboxEntry,
}

/// One closed (or, at shutdown, partial) rollup window.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// The figures.
    pub rollup: Closed,
}

/// One raw reading.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Receive time.
    pub at: Millis,
    /// Value.
    pub value: Value,
    /// The message's `seq`, if any.
    pub seq: Option<u64>,
}

/// Counters of one device to add to its row.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDelta {
    /// Device id.
    pub device: String,
    /// Increments since the last delta.
    pub add: DeviceCounters,
}

/// A retained message of the embedded broker, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedRow {
    /// Its topic.
    pub topic: String,
    /// The MQTT 5 PUBLISH packet that carries it.
    pub packet: Vec<u8>,
    /// When it expires, in milliseconds since the epoch, if it does.
    pub expires_ms: Option<u64>,
}

/// A change to the retained messages.
#[derive(Debug, Clone, PartialEq)]
pub enum RetainedChange {
    /// The topic's message is this one now.
    Put(RetainedRow),
    /// The topic has no message any more.
    Delete(String),
}

/// Settings of the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Disk budget in bytes.
    pub max_db_bytes: u64,
    /// How long raw readings are kept, if they are kept.
    pub raw_retention: Option<Duration>,
    /// Bytes set aside in the data directory ([`RESERVE_FILE`]) for alerts and the outbox,
    /// given back to the file system when it fills up; 0 sets none aside.
    pub reserve_bytes: u64,
}

/// The file that holds the reserve, in the data directory.
pub const RESERVE_FILE: &str = "watchpost.reserve";
/// Default size of the reserve: room for thousands of alert transitions and outbox rows, and
/// the write-ahead log they go through.
pub const DEFAULT_RESERVE_BYTES: u64 = 16 * 1024 * 1024;
/// How often the free space is looked at while the file system is full.
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The last state of one alert, as stored for the next start.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedAlert {
    /// Rule name.
    pub rule: String,
    /// Device id.
    pub device: String,
    /// Metric.
    pub metric: String,
    /// Still raised when last written.
    pub raised: bool,
    /// Start of the episode.
    pub since: Millis,
    /// The bound that was crossed (none for a state rule).
    pub threshold: Option<f64>,
    /// Local topic of the alert.
    pub topic: String,
    /// The last document, to publish retained again.
    pub doc: String,
}

enum Command {
    Alert(Box<AlertDoc>, Option<OutboxEntry>),
    SavedAlerts(oneshot::Sender<Vec<SavedAlert>>),
    Outbox(OutboxEntry),
    OutboxDone(u64),
    Rollups(Vec<RollupRow>),
    Raw(Vec<RawRow>),
    Devices(Vec<DeviceDelta>),
    Counters(Vec<(&'static str, u64)>),
    OutboxPage {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Vec<OutboxItem>>,
    },
    /// Each is answered once everything sent before is committed.
    Flush(Vec<oneshot::Sender<()>>),
    Retained(Vec<RetainedChange>, oneshot::Sender<()>),
    RetainedAll(oneshot::Sender<Vec<RetainedRow>>),
}

/// Handle to the store thread. Dropping every handle lets the thread write what it has and
/// exit; [`StoreThread::join`] waits for that.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    committed: watch::Receiver<u64>,
}

/// Joins the store thread after the last handle is gone.
pub struct StoreThread(JoinHandle<()>);

impl StoreThread {
    /// Waits until everything sent before the last handle was dropped is written.
    pub fn join(self) {
        if self.0.join().is_err() {
            error!("the store thread panicked");
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir` and starts the store thread.
    pub fn open(
        data_dir: &Path,
        options: StoreOptions,
        stats: Arc<Stats>,
    ) -> Result<(Store, StoreThread), StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let conn = open_db(&path)?;
        let (writer, committed) =
            Writer::new(conn, data_dir, options, stats).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("watchpost-store".into())
            .spawn(move || writer.run(rx))
            .map_err(StoreError::Thread)?;
        Ok((Store { tx, committed }, StoreThread(thread)))
    }

    fn send(&self, command: Command) {
        if self.tx.send(command).is_err() {
            error!("the store thread is gone; a write was lost");
        }
    }

    /// Records an alert transition and, in the same transaction, queues it for upstream.
    pub fn alert(&self, doc: &AlertDoc, outbox: Option<OutboxEntry>) {
        self.send(Command::Alert(Box::new(doc.clone()), outbox));
    }

    /// Queues a message (a summary) for upstream.
    pub fn outbox_push(&self, entry: OutboxEntry) {
        self.send(Command::Outbox(entry));
    }

    /// The upstream acknowledged outbox row `seq`: remove it.
    pub fn outbox_done(&self, seq: u64) {
        self.send(Command::OutboxDone(seq));
    }

    /// Stores closed rollup windows (merged with a row of the same window, if any).
    pub fn rollups(&self, rows: Vec<RollupRow>) {
        if !rows.is_empty() {
            self.send(Command::Rollups(rows));
        }
    }

    /// Stores raw readings.
    pub fn raw(&self, rows: Vec<RawRow>) {
        if !rows.is_empty() {
            self.send(Command::Raw(rows));
        }
    }

    /// Adds to per-device counters.
    pub fn devices(&self, rows: Vec<DeviceDelta>) {
        if !rows.is_empty() {
            self.send(Command::Devices(rows));
        }
    }

    /// Adds to gateway-wide counters.
    pub fn counters(&self, rows: Vec<(&'static str, u64)>) {
        if !rows.is_empty() {
            self.send(Command::Counters(rows));
        }
    }

    /// Up to `limit` committed outbox rows after `after`, oldest first.
    pub async fn outbox_page(&self, after: u64, limit: usize) -> Vec<OutboxItem> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::OutboxPage {
            after,
            limit,
            reply,
        });
        rx.await.unwrap_or_default()
    }

    /// The last state of every alert, written with each transition.
    pub async fn saved_alerts(&self) -> Vec<SavedAlert> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SavedAlerts(reply));
        rx.await.unwrap_or_default()
    }

    /// Resolves once everything sent before is committed.
    pub async fn flush(&self) {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Flush(vec![reply]));
        let _ = rx.await;
    }

    /// Answers each of `waiting` once everything sent before is committed: how ingest tells the
    /// broker that what it wrote for a batch of publishes is in the database.
    pub fn judged(&self, waiting: Vec<oneshot::Sender<()>>) {
        if !waiting.is_empty() {
            self.send(Command::Flush(waiting));
        }
    }

    /// Writes changes to the retained messages; returns once they are committed, or false
    /// if the store has stopped. While the database fails, the changes are retried and this
    /// waits.
    pub async fn retained(&self, changes: Vec<RetainedChange>) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Retained(changes, reply));
        rx.await.is_ok()
    }

    /// Every retained message in the database.
    pub async fn retained_all(&self) -> Vec<RetainedRow> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::RetainedAll(reply));
        rx.await.unwrap_or_default()
    }

    /// The highest outbox position committed so far; changes when rows are added.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    if version == 0 {
        // Only possible before the first table exists: lets deleted history give disk back.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(err)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        debug!(version = i + 1, "database migrated");
    }
    Ok(conn)
}

/// Most alert writes kept in memory while the database fails.
const MAX_RETRY: usize = 100_000;

struct Writer {
    conn: Connection,
    /// Rows in the outbox.
    outbox_depth: u64,
    /// Alert and outbox writes that failed, to be tried again.
    retry: Vec<Command>,
    failing_since: Option<Instant>,
    options: StoreOptions,
    stats: Arc<Stats>,
    committed: watch::Sender<u64>,
    last_maintenance: Instant,
    over_budget_logged: Option<Instant>,
    /// The data directory, where the reserve is.
    data_dir: PathBuf,
    /// Since when the file system has been full and history is shed, if it is.
    full_since: Option<Instant>,
    /// Flushes waiting for alert or outbox writes that could not be committed yet: a QoS 1
    /// publish is acknowledged only once what it caused is durable.
    blocked: Vec<oneshot::Sender<()>>,
}

impl Writer {
    fn new(
        conn: Connection,
        data_dir: &Path,
        options: StoreOptions,
        stats: Arc<Stats>,
    ) -> rusqlite::Result<(Writer, watch::Receiver<u64>)> {
        let (depth, max_seq): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM outbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (committed, rx) = watch::channel(max_seq as u64);
        let writer = Writer {
            conn,
            outbox_depth: depth as u64,
            retry: Vec::new(),
            failing_since: None,
            options,
            stats,
            committed,
            last_maintenance: Instant::now(),
            over_budget_logged: None,
            data_dir: data_dir.to_owned(),
            full_since: None,
            blocked: Vec::new(),
        };
        writer.update_outbox_stats();
        let mut writer = writer;
        if let Err(e) = writer.set_reserve_aside() {
            writer.run_short(&format!("the reserve cannot be set aside: {e}"));
        }
        Ok((writer, rx))
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(64);
        loop {
            let wait = if self.full_since.is_some() {
                SPACE_CHECK_EVERY
            } else {
                MAINTENANCE_EVERY
            };
            match rx.recv_timeout(wait) {
                Ok(first) => batch.push(first),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.handle(&mut batch);
            if self.full_since.is_some() {
                self.look_for_space();
            }
            if self.last_maintenance.elapsed() >= MAINTENANCE_EVERY {
                self.last_maintenance = Instant::now();
                if let Err(e) = self.maintain() {
                    error!(error = %e, "database maintenance failed");
                }
            }
        }
        debug!("store closed");
    }

    /// Writes runs of writes in one transaction each; answers reads between them, after
    /// the writes before them are committed.
    fn handle(&mut self, batch: &mut Vec<Command>) {
        let mut writes = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::OutboxPage {
                    after,
                    limit,
                    reply,
                } => {
                    self.commit(&mut writes);
                    let page = self.outbox_page(after, limit).unwrap_or_else(|e| {
                        error!(error = %e, "cannot read the outbox");
                        Vec::new()
                    });
                    let _ = reply.send(page);
                }
                Command::Flush(waiting) => {
                    self.commit(&mut writes);
                    if self.retry.is_empty() {
                        for reply in waiting {
                            let _ = reply.send(());
                        }
                    } else {
                        // Answered once the alert and outbox writes before it are committed.
                        self.blocked.extend(waiting);
                    }
                }
                Command::RetainedAll(reply) => {
                    self.commit(&mut writes);
                    let rows = self.retained_all().unwrap_or_else(|e| {
                        error!(error = %e, "cannot read the retained messages");
                        Vec::new()
                    });
                    let _ = reply.send(rows);
                }
                Command::SavedAlerts(reply) => {
                    self.commit(&mut writes);
                    let saved = self.saved_alerts().unwrap_or_else(|e| {
                        error!(error = %e, "cannot read the saved alert states");
                        Vec::new()
                    });
                    let _ = reply.send(saved);
                }
                write => writes.push(write),
            }
        }
        self.commit(&mut writes);
    }

    fn commit(&mut self, writes: &mut Vec<Command>) {
        if !self.retry.is_empty() {
            // Writes that failed before go first, so that the outbox keeps its order.
            let mut retry = std::mem::take(&mut self.retry);
            retry.append(writes);
            *writes = retry;
        }
        if self.full_since.is_some() {
            self.shed(writes);
        }
        if writes.is_empty() {
            return;
        }
        let mut result = self.transaction(writes);
        if let Err(e) = &result {
            if out_of_space(e) && self.full_since.is_none() {
                // The file system is full: give the reserve back and write what matters in it.
                self.run_short(&e.to_string());
                self.shed(writes);
                result = self.transaction(writes);
            }
        }
        match result {
            Ok(effect) => {
                self.outbox_depth = self.outbox_depth.saturating_add_signed(effect.outbox_delta);
                if let Some(seq) = effect.outbox_max {
                    self.committed.send_replace(seq);
                }
                if effect.outbox_delta != 0 || effect.outbox_max.is_some() {
                    self.update_outbox_stats();
                }
                self.failing_since = None;
                // Whoever waits for a write to be committed hears it now.
                for w in writes.drain(..) {
                    if let Command::Retained(_, reply) = w {
                        let _ = reply.send(());
                    }
                }
                for reply in self.blocked.drain(..) {
                    let _ = reply.send(());
                }
            }
            Err(e) => {
                // Alerts and acknowledgements are kept and tried again with the next batch;
                // history is dropped and counted.
                let (keep, drop): (Vec<_>, Vec<_>) = writes.drain(..).partition(|w| {
                    matches!(
                        w,
                        Command::Alert(..)
                            | Command::Outbox(_)
                            | Command::OutboxDone(_)
                            | Command::Retained(..)
                    )
                });
                let kept = keep.len();
                let dropped = drop.iter().map(history_rows).sum::<u64>();
                Stats::add(&self.stats.history_shed, dropped);
                self.retry = keep;
                if self.retry.len() > MAX_RETRY {
                    let excess = self.retry.len() - MAX_RETRY;
                    self.retry.drain(..excess);
                    error!(
                        excess,
                        "the database has failed for long: the oldest alerts waiting to be written are dropped"
                    );
                }
                if self
                    .failing_since
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    self.failing_since = Some(Instant::now());
                    error!(error = %e, kept, dropped, "cannot write to the database; alerts are kept in memory and retried (QoS 1 publishes wait for them), history in this batch is lost");
                }
            }
        }
        writes.clear();
    }

    /// Writes `writes` in one transaction; an alert transition or outbox row is synced to
    /// disk.
    fn transaction(&mut self, writes: &[Command]) -> rusqlite::Result<Effect> {
        // Every alert transition (forwarded or local: the reading that caused it is
        // acknowledged after this commit) and whatever may go upstream must survive a power
        // cut, not only a crash.
        let outbox_rows = writes
            .iter()
            .any(|w| matches!(w, Command::Alert(..) | Command::Outbox(_)));
        if outbox_rows {
            let _ = self.conn.pragma_update(None, "synchronous", "FULL");
        }
        let result = (|| {
            let tx = self.conn.transaction()?;
            let mut effect = Effect::default();
            for w in writes {
                effect.add(write(&tx, w)?);
            }
            tx.commit()?;
            Ok::<_, rusqlite::Error>(effect)
        })();
        if outbox_rows {
            let _ = self.conn.pragma_update(None, "synchronous", "NORMAL");
        }
        result
    }

    /// While the file system is full: drops history (raw readings, rollups) from `writes`,
    /// counted, so that alerts, the outbox and the device counters get the space.
    fn shed(&mut self, writes: &mut Vec<Command>) {
        let mut shed = 0;
        writes.retain(|w| {
            let rows = history_rows(w);
            shed += rows;
            rows == 0
        });
        Stats::add(&self.stats.history_shed, shed);
    }

    /// The file system is full (or the reserve could not be set aside): from now on history
    /// is shed, and the reserve goes back to the file system for alerts and the outbox.
    fn run_short(&mut self, why: &str) {
        if self.full_since.is_some() {
            return;
        }
        self.full_since = Some(Instant::now());
        self.stats.disk_full.store(true, Ordering::Relaxed);
        let reserve = self.data_dir.join(RESERVE_FILE);
        let given = std::fs::metadata(&reserve).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(&reserve);
        error!(
            data_dir = %self.data_dir.display(),
            reserve_mb = given / 1024 / 1024,
            "the data directory's file system is full ({why}): history (raw readings, rollups) is shed until there is room again; alerts, the outbox and acknowledgements go on in the reserve"
        );
    }

    /// While short of space: once the file system has room for the reserve and as much again,
    /// sets the reserve aside again and lets history be written.
    fn look_for_space(&mut self) {
        let wanted = self
            .options
            .reserve_bytes
            .saturating_mul(2)
            .max(1024 * 1024);
        match available_bytes(&self.data_dir) {
            Some(free) if free >= wanted => {}
            _ => return,
        }
        if let Err(e) = self.set_reserve_aside() {
            debug!(error = %e, "the reserve cannot be set aside yet");
            return;
        }
        let since = self
            .full_since
            .take()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        self.stats.disk_full.store(false, Ordering::Relaxed);
        info!(
            full_for_s = since.as_secs(),
            shed_rows = Stats::get(&self.stats.history_shed),
            "the data directory has room again: history is written again and the reserve is set aside"
        );
    }

    /// Writes the reserve file (real blocks, not a sparse file), or removes what was written.
    fn set_reserve_aside(&self) -> std::io::Result<()> {
        let path = self.data_dir.join(RESERVE_FILE);
        let size = self.options.reserve_bytes;
        if size == 0 {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
            return Ok(());
        }
        let result = (|| {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&path)?;
            let chunk = vec![0u8; 1024 * 1024];
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                file.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn update_outbox_stats(&self) {
        let oldest: Option<i64> = self
            .conn
            .query_row(
                "SELECT created_ms FROM outbox ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap_or(None);
        self.stats
            .outbox_depth
            .store(self.outbox_depth, Ordering::Relaxed);
        self.stats
            .outbox_oldest_ms
            .store(oldest.unwrap_or(0) as u64, Ordering::Relaxed);
    }

    fn retained_all(&self) -> rusqlite::Result<Vec<RetainedRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT topic, packet, expires_ms FROM retained ORDER BY topic")?;
        let rows = stmt.query_map([], |r| {
            Ok(RetainedRow {
                topic: r.get(0)?,
                packet: r.get(1)?,
                expires_ms: r.get::<_, Option<i64>>(2)?.map(|t| t.max(0) as u64),
            })
        })?;
        rows.collect()
    }

    fn saved_alerts(&self) -> rusqlite::Result<Vec<SavedAlert>> {
        let mut stmt = self.conn.prepare(
            "SELECT rule, device, metric, raised, since_ms, threshold, topic, doc FROM alert_state",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SavedAlert {
                rule: r.get(0)?,
                device: r.get(1)?,
                metric: r.get(2)?,
                raised: r.get(3)?,
                since: r.get::<_, i64>(4)? as Millis,
                threshold: r.get(5)?,
                topic: r.get(6)?,
                doc: r.get(7)?,
            })
        })?;
        rows.collect()
    }

    fn outbox_page(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<OutboxItem>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, alert_id, topic, payload, retain FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
            Ok(OutboxItem {
                seq: r.get::<_, i64>(0)? as u64,
                entry: OutboxEntry {
                    id: r.get(1)?,
                    topic: r.get(2)?,
                    payload: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                    retain: r.get(4)?,
                },
            })
        })?;
        rows.collect()
    }

    /// Keeps raw readings within their retention and the database within its budget.
    fn maintain(&mut self) -> rusqlite::Result<()> {
        let now = now_millis() as i64;
        if let Some(retention) = self.options.raw_retention {
            let cutoff = now - retention.as_millis() as i64;
            let n = self
                .conn
                .execute("DELETE FROM readings WHERE at_ms < ?1", [cutoff])?;
            if n > 0 {
                debug!(rows = n, "raw readings past their retention removed");
            }
        }
        let budget = self.options.max_db_bytes;
        if self.used_bytes()? <= budget {
            return Ok(());
        }
        // Make room down to 90 % of the budget, so that this does not run on every batch.
        let target = budget / 10 * 9;
        let mut readings = 0;
        let mut rollups = 0;
        while self.used_bytes()? > target {
            let n = self.conn.execute(
                "DELETE FROM readings WHERE rowid IN (SELECT rowid FROM readings ORDER BY at_ms LIMIT ?1)",
                [EVICT_CHUNK],
            )?;
            if n > 0 {
                readings += n;
                continue;
            }
            let n = self.conn.execute(
                "DELETE FROM rollups WHERE (device, metric, start_ms) IN
                 (SELECT device, metric, start_ms FROM rollups ORDER BY start_ms LIMIT ?1)",
                [EVICT_CHUNK],
            )?;
            let n = n + self.conn.execute(
                "DELETE FROM state_rollups WHERE (device, metric, start_ms) IN
                 (SELECT device, metric, start_ms FROM state_rollups ORDER BY start_ms LIMIT ?1)",
                [EVICT_CHUNK],
            )?;
            if n == 0 {
                break;
            }
            rollups += n;
        }
        let evicted = (readings + rollups) as u64;
        Stats::add(&self.stats.history_evicted, evicted);
        self.conn.execute_batch("PRAGMA incremental_vacuum")?;
        let used = self.used_bytes()?;
        if evicted > 0 {
            warn!(
                budget_mb = budget / 1024 / 1024,
                readings,
                rollups,
                "database reached its budget: dropped the oldest history; alerts and the outbox are kept"
            );
        }
        if used > budget
            && self
                .over_budget_logged
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(600))
        {
            self.over_budget_logged = Some(Instant::now());
            error!(
                used_mb = used / 1024 / 1024,
                budget_mb = budget / 1024 / 1024,
                "the database is over its budget with no history left to drop: alerts and the outbox fill it; raise history.max_db_mb or restore the uplink"
            );
        }
        Ok(())
    }

    fn used_bytes(&self) -> rusqlite::Result<u64> {
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let size: i64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))?;
        Ok(((pages - free).max(0) * size) as u64)
    }
}

/// History rows a write carries (raw readings, rollups); 0 for anything else.
fn history_rows(w: &Command) -> u64 {
    match w {
        Command::Rollups(rows) => rows.len() as u64,
        Command::Raw(rows) => rows.len() as u64,
        _ => 0,
    }
}

/// True if `e` says the disk is full (or failing to write, which a full disk can look like).
fn out_of_space(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure)
    )
}

/// Bytes an unprivileged writer can still use on the file system of `dir`.
fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a valid NUL-terminated string and `st` points to writable memory of
    // the right type; statvfs(3) fills it in on success.
    let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // 32-bit on armhf, 64-bit here.
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// What a transaction did to the outbox.
#[derive(Default)]
struct Effect {
    /// The highest position it created.
    outbox_max: Option<u64>,
    /// Rows added minus rows removed.
    outbox_delta: i64,
}

impl Effect {
    fn add(&mut self, other: Effect) {
        self.outbox_max = other.outbox_max.or(self.outbox_max);
        self.outbox_delta += other.outbox_delta;
    }

    fn inserted(seq: u64) -> Effect {
        Effect {
            outbox_max: Some(seq),
            outbox_delta: 1,
        }
    }
}

/// Applies one write.
fn write(tx: &rusqlite::Transaction<'_>, w: &Command) -> rusqlite::Result<Effect> {
    let now = now_millis() as i64;
    match w {
        Command::Alert(d, outbox) => {
            let state = match d.state {
                AlertState::Raised => "raised",
                AlertState::Cleared => "cleared",
            };
            tx.prepare_cached(
                "INSERT INTO alert_history (id, rule, device, metric, severity, state, value, threshold, since, at, recorded_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![d.id, d.rule, d.device, d.metric, d.severity.as_str(), state, d.value, d.threshold, d.since, d.at, now])?;
            let since = humantime::parse_rfc3339(&d.since)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            tx.prepare_cached(
                "INSERT INTO alert_state (rule, device, metric, raised, since_ms, threshold, topic, doc, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (rule, device, metric) DO UPDATE SET
                   raised = excluded.raised, since_ms = excluded.since_ms, threshold = excluded.threshold,
                   topic = excluded.topic, doc = excluded.doc, updated_ms = excluded.updated_ms",
            )?
            .execute(params![d.rule, d.device, d.metric, d.state == AlertState::Raised, since, d.threshold, d.topic(), String::from_utf8_lossy(&d.to_json()), now])?;
            match outbox {
                Some(entry) => insert_outbox(tx, entry, now).map(Effect::inserted),
                None => Ok(Effect::default()),
            }
        }
        Command::Outbox(entry) => insert_outbox(tx, entry, now).map(Effect::inserted),
        Command::OutboxDone(seq) => {
            let removed = tx
                .prepare_cached("DELETE FROM outbox WHERE seq = ?1")?
                .execute([*seq as i64])?;
            Ok(Effect {
                outbox_max: None,
                outbox_delta: -(removed as i64),
            })
        }
        Command::Rollups(rows) => {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO rollups (device, metric, start_ms, len_ms, count, min, max, mean, last)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (device, metric, start_ms) DO UPDATE SET
                   mean  = (mean * count + excluded.mean * excluded.count) / (count + excluded.count),
                   count = count + excluded.count,
                   min   = MIN(min, excluded.min),
                   max   = MAX(max, excluded.max),
                   last  = excluded.last",
            )?;
            for r in rows {
                let x = match &r.rollup {
                    Closed::Numbers(x) => x,
                    Closed::States(x) => {
                        write_state_rollup(tx, &r.device, &r.metric, x)?;
                        continue;
                    }
                };
                stmt.execute(params![
                    r.device,
                    r.metric,
                    x.start as i64,
                    x.len as i64,
                    x.count as i64,
                    x.min,
                    x.max,
                    x.mean,
                    x.last
                ])?;
            }
            Ok(Effect::default())
        }
        Command::Raw(rows) => {
            let mut stmt = tx.prepare_cached("INSERT INTO readings (device, metric, at_ms, value, seq) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for r in rows {
                stmt.execute(params![
                    r.device,
                    r.metric,
                    r.at as i64,
                    r.value,
                    r.seq.map(|s| s as i64)
                ])?;
            }
            Ok(Effect::default())
        }
        Command::Devices(rows) => {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO devices (device, first_seen_ms, last_seen_ms, messages, readings, decode_errors, lost, duplicated, out_of_order, restarts, unmapped)
                 VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (device) DO UPDATE SET
                   last_seen_ms  = MAX(last_seen_ms, excluded.last_seen_ms),
                   messages      = messages + excluded.messages,
                   readings      = readings + excluded.readings,
                   decode_errors = decode_errors + excluded.decode_errors,
                   lost          = lost + excluded.lost,
                   duplicated    = duplicated + excluded.duplicated,
                   out_of_order  = out_of_order + excluded.out_of_order,
                   restarts      = restarts + excluded.restarts,
                   unmapped      = unmapped + excluded.unmapped",
            )?;
            for r in rows {
                let c = &r.add;
                let i = |v: u64| v as i64;
                stmt.execute(params![
                    r.device,
                    i(c.last_seen_ms),
                    i(c.messages),
                    i(c.readings),
                    i(c.decode_errors),
                    i(c.loss.lost),
                    i(c.loss.duplicated),
                    i(c.loss.out_of_order),
                    i(c.loss.restarts),
                    i(c.unmapped)
                ])?;
            }
            Ok(Effect::default())
        }
        Command::Counters(rows) => {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO counters (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            )?;
            for (name, v) in rows {
                stmt.execute(params![name, *v as i64])?;
            }
            Ok(Effect::default())
        }
        Command::Retained(changes, _) => {
            let mut put = tx.prepare_cached(
                "INSERT INTO retained (topic, packet, expires_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic) DO UPDATE SET packet = excluded.packet, expires_ms = excluded.expires_ms",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?;
            for change in changes {
                match change {
                    RetainedChange::Put(row) => {
                        put.execute(params![
                            row.topic,
                            row.packet,
                            row.expires_ms.map(|t| t.min(i64::MAX as u64) as i64)
                        ])?;
                    }
                    RetainedChange::Delete(topic) => {
                        delete.execute([topic])?;
                    }
                }
            }
            Ok(Effect::default())
        }
        Command::OutboxPage { .. }
        | Command::Flush(_)
        | Command::SavedAlerts(_)
        | Command::RetainedAll(_) => Ok(Effect::default()),
    }
}

/// Adds a state window to its row, merging with a partial window written before a restart.
fn write_state_rollup(
    tx: &rusqlite::Transaction<'_>,
    device: &str,
    metric: &str,
    x: &StateRollup,
) -> rusqlite::Result<()> {
    let key = params![device, metric, x.start as i64];
    let before: Option<(i64, i64, String)> = tx
        .prepare_cached(
            "SELECT count, changes, time_in FROM state_rollups WHERE device = ?1 AND metric = ?2 AND start_ms = ?3",
        )?
        .query_row(key, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let mut time_in = x.time_in.clone();
    let (mut count, mut changes) = (x.count as i64, x.changes as i64);
    if let Some((c, ch, earlier)) = before {
        count += c;
        changes += ch;
        let earlier: Vec<(Value, Millis)> = serde_json::from_str(&earlier).unwrap_or_default();
        for (v, ms) in earlier {
            match time_in.iter_mut().find(|(w, _)| *w == v) {
                Some((_, t)) => *t += ms,
                None => time_in.push((v, ms)),
            }
        }
    }
    let time_in = serde_json::to_string(&time_in).expect("values and numbers serialize");
    tx.prepare_cached(
        "INSERT OR REPLACE INTO state_rollups (device, metric, start_ms, len_ms, count, changes, last, time_in)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        device,
        metric,
        x.start as i64,
        x.len as i64,
        count,
        changes,
        x.last,
        time_in
    ])?;
    Ok(())
}

fn insert_outbox(
    tx: &rusqlite::Transaction<'_>,
    e: &OutboxEntry,
    now: i64,
) -> rusqlite::Result<u64> {
    tx.prepare_cached("INSERT INTO outbox (alert_id, topic, payload, retain, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(params![e.id, e.topic, e.payload.as_ref(), e.retain, now])?;
    Ok(tx.last_insert_rowid() as u64)
}

// ---------------------------------------------------------------------------------------------
// Reading, for the CLI.

/// A read-only view of the database, safe to use while the gateway writes to it.
pub struct Reader {
    conn: Connection,
}

/// An alert transition as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertRecord {
    /// When it was recorded, RFC 3339.
    pub at: String,
    /// Raised or cleared.
    pub state: String,
    /// Severity.
    pub severity: String,
    /// Device id.
    pub device: String,
    /// Rule name.
    pub rule: String,
    /// Metric name.
    pub metric: String,
    /// The value that caused it: a number or a state.
    pub value: Value,
    /// The bound (none for a state rule).
    pub threshold: Option<f64>,
    /// Alert id.
    pub id: String,
}

/// A stored rollup window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollupRecord {
    /// Window start, RFC 3339.
    pub start: String,
    /// Window length in seconds.
    pub seconds: f64,
    /// Readings.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Last.
    pub last: f64,
}

/// A stored rollup window of a state stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateRollupRecord {
    /// Window start, RFC 3339.
    pub start: String,
    /// Window length in seconds.
    pub seconds: f64,
    /// Readings.
    pub count: u64,
    /// Changes of state.
    pub changes: u64,
    /// The last state.
    pub last: Value,
    /// Seconds spent in each state, as `[state, seconds]` pairs.
    pub time_in: Vec<(Value, f64)>,
}

/// A stored raw reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadingRecord {
    /// Receive time, RFC 3339.
    pub at: String,
    /// Value: a number or a state.
    pub value: Value,
    /// The message's `seq`.
    pub seq: Option<u64>,
}

/// A device's lifetime counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRecord {
    /// Device id (`-` for messages whose topic named no device).
    pub device: String,
    /// Last message, RFC 3339.
    pub last_seen: String,
    /// Messages received.
    pub messages: u64,
    /// Readings decoded.
    pub readings: u64,
    /// Malformed messages and fields.
    pub decode_errors: u64,
    /// Messages lost on the way (from `seq`).
    pub lost: u64,
    /// Duplicates dropped.
    pub duplicated: u64,
    /// Messages that arrived late.
    pub out_of_order: u64,
    /// Times the device restarted its count.
    pub restarts: u64,
    /// Fields of its payloads not read (neither numbers nor known states).
    pub unmapped: u64,
}

/// Per device, the wall time of its last reading in the database in `data_dir` (none if it
/// cannot be read): what this gateway had judged when it last stopped.
pub fn device_floors(data_dir: &Path) -> Vec<(String, Millis)> {
    let Ok(reader) = Reader::open(data_dir) else {
        return Vec::new();
    };
    reader
        .devices()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| {
            let at = humantime::parse_rfc3339(&d.last_seen).ok()?;
            let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as Millis;
            Some((d.device, ms))
        })
        .collect()
}

impl Reader {
    /// Opens the database in `data_dir` read-only.
    pub fn open(data_dir: &Path) -> Result<Reader, StoreError> {
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Missing(path));
        }
        let err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path,
                found: version,
                known,
            });
        }
        if version < known {
            // Written by an older gateway that has not migrated it yet: nothing newer to show.
            warn!(
                version,
                "the database predates this Watchpost; start the gateway once to migrate it"
            );
        }
        Ok(Reader { conn })
    }

    /// Alert transitions recorded at or after `since`, oldest first.
    pub fn alerts(&self, since: Millis) -> rusqlite::Result<Vec<AlertRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT recorded_ms, state, severity, device, rule, metric, value, threshold, id
             FROM alert_history WHERE recorded_ms >= ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([since as i64], |r| {
            Ok(AlertRecord {
                at: crate::alert::rfc3339(r.get::<_, i64>(0)? as Millis),
                state: r.get(1)?,
                severity: r.get(2)?,
                device: r.get(3)?,
                rule: r.get(4)?,
                metric: r.get(5)?,
                value: r.get(6)?,
                threshold: r.get(7)?,
                id: r.get(8)?,
            })
        })?;
        rows.collect()
    }

    /// The documents of the alerts raised now (as last written), newest episode first.
    pub fn raised_alerts(&self) -> rusqlite::Result<Vec<AlertDoc>> {
        let mut stmt = self
            .conn
            .prepare("SELECT doc FROM alert_state WHERE raised = 1 ORDER BY since_ms DESC")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in rows {
            // A row this version cannot read is left out of the view, not an error.
            if let Ok(doc) = serde_json::from_str(&doc?) {
                out.push(doc);
            }
        }
        Ok(out)
    }

    /// Ids of the alert transitions still waiting in the outbox (not yet acknowledged
    /// upstream).
    pub fn outbox_ids(&self) -> rusqlite::Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare("SELECT DISTINCT alert_id FROM outbox")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    }

    /// Rollups of one numeric stream from `since` as points for a plot: window start (ms),
    /// min, mean and max, oldest first.
    pub fn rollup_points(
        &self,
        device: &str,
        metric: &str,
        since: Millis,
    ) -> rusqlite::Result<Vec<(Millis, f64, f64, f64)>> {
        let mut stmt = self.conn.prepare(
            "SELECT start_ms, min, mean, max FROM rollups
             WHERE device = ?1 AND metric = ?2 AND start_ms >= ?3 ORDER BY start_ms",
        )?;
        let rows = stmt.query_map(params![device, metric, since as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as Millis,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
            ))
        })?;
        rows.collect()
    }

    /// Rollups of one stream whose window starts at or after `since`, oldest first.
    pub fn rollups(
        &self,
        device: &str,
        metric: &str,
        since: Millis,
    ) -> rusqlite::Result<Vec<RollupRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT start_ms, len_ms, count, min, max, mean, last FROM rollups
             WHERE device = ?1 AND metric = ?2 AND start_ms >= ?3 ORDER BY start_ms",
        )?;
        let rows = stmt.query_map(params![device, metric, since as i64], |r| {
            Ok(RollupRecord {
                start: crate::alert::rfc3339(r.get::<_, i64>(0)? as Millis),
                seconds: r.get::<_, i64>(1)? as f64 / 1000.0,
                count: r.get::<_, i64>(2)? as u64,
                min: r.get(3)?,
                max: r.get(4)?,
                mean: r.get(5)?,
                last: r.get(6)?,
            })
        })?;
        rows.collect()
    }

    /// State rollups of one stream whose window starts at or after `since`, oldest first.
    pub fn state_rollups(
        &self,
        device: &str,
        metric: &str,
        since: Millis,
    ) -> rusqlite::Result<Vec<StateRollupRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT start_ms, len_ms, count, changes, last, time_in FROM state_rollups
             WHERE device = ?1 AND metric = ?2 AND start_ms >= ?3 ORDER BY start_ms",
        )?;
        let rows = stmt.query_map(params![device, metric, since as i64], |r| {
            let time_in: Vec<(Value, Millis)> =
                serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default();
            Ok(StateRollupRecord {
                start: crate::alert::rfc3339(r.get::<_, i64>(0)? as Millis),
                seconds: r.get::<_, i64>(1)? as f64 / 1000.0,
                count: r.get::<_, i64>(2)? as u64,
                changes: r.get::<_, i64>(3)? as u64,
                last: r.get(4)?,
                time_in: time_in
                    .into_iter()
                    .map(|(v, ms)| (v, ms as f64 / 1000.0))
                    .collect(),
            })
        })?;
        rows.collect()
    }

    /// Raw readings of one stream at or after `since`, oldest first.
    pub fn readings(
        &self,
        device: &str,
        metric: &str,
        since: Millis,
    ) -> rusqlite::Result<Vec<ReadingRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT at_ms, value, seq FROM readings WHERE device = ?1 AND metric = ?2 AND at_ms >= ?3 ORDER BY at_ms",
        )?;
        let rows = stmt.query_map(params![device, metric, since as i64], |r| {
            Ok(ReadingRecord {
                at: crate::alert::rfc3339(r.get::<_, i64>(0)? as Millis),
                value: r.get(1)?,
                seq: r.get::<_, Option<i64>>(2)?.map(|s| s as u64),
            })
        })?;
        rows.collect()
    }

    /// Every stored raw reading at or after `since`, oldest first.
    pub fn raw_readings(&self, since: Millis) -> rusqlite::Result<Vec<RawRow>> {
        let mut stmt = self.conn.prepare("SELECT device, metric, at_ms, value, seq FROM readings WHERE at_ms >= ?1 ORDER BY at_ms")?;
        let rows = stmt.query_map([since as i64], |r| {
            Ok(RawRow {
                device: r.get(0)?,
                metric: r.get(1)?,
                at: r.get::<_, i64>(2)? as Millis,
                value: r.get(3)?,
                seq: r.get::<_, Option<i64>>(4)?.map(|s| s as u64),
            })
        })?;
        rows.collect()
    }

    /// Every device's lifetime counters, by device id.
    pub fn devices(&self) -> rusqlite::Result<Vec<DeviceRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT device, last_seen_ms, messages, readings, decode_errors, lost, duplicated, out_of_order, restarts, unmapped
             FROM devices ORDER BY device",
        )?;
        let rows = stmt.query_map([], |r| {
            let n = |i| r.get::<_, i64>(i).map(|v| v as u64);
            Ok(DeviceRecord {
                device: r.get(0)?,
                last_seen: crate::alert::rfc3339(n(1)?),
                messages: n(2)?,
                readings: n(3)?,
                decode_errors: n(4)?,
                lost: n(5)?,
                duplicated: n(6)?,
                out_of_order: n(7)?,
                restarts: n(8)?,
                unmapped: n(9)?,
            })
        })?;
        rows.collect()
    }

    /// A gateway-wide counter (0 if never written).
    pub fn counter(&self, name: &str) -> rusqlite::Result<u64> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Rows waiting in the outbox, and when the oldest was queued.
    pub fn outbox(&self) -> rusqlite::Result<(u64, Option<Millis>)> {
        self.conn
            .query_row("SELECT COUNT(*), MIN(created_ms) FROM outbox", [], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<i64>>(1)?.map(|v| v as Millis),
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Rollup;
    use crate::rules::Severity;

    fn doc(id: &str) -> AlertDoc {
        AlertDoc {
            id: id.into(),
            rule: "r".into(),
            device: "d".into(),
            metric: "m".into(),
            severity: Severity::Critical,
            state: AlertState::Raised,
            value: Value::Number(1.0),
            threshold: Some(0.5),
            since: "s".into(),
            at: "a".into(),
            gateway: "g".into(),
            repeat: 0,
            labels: Default::default(),
        }
    }

    fn entry(id: &str) -> OutboxEntry {
        OutboxEntry {
            id: id.into(),
            topic: format!("alerts/critical/d/{id}"),
            payload: Bytes::from(id.to_owned()),
            retain: true,
        }
    }

    fn options() -> StoreOptions {
        StoreOptions {
            max_db_bytes: 1 << 30,
            raw_retention: None,
            reserve_bytes: 0,
        }
    }

    fn open(dir: &Path) -> (Store, StoreThread, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let (store, thread) = Store::open(dir, options(), stats.clone()).unwrap();
        (store, thread, stats)
    }

    #[tokio::test]
    async fn outbox_rows_are_paged_in_order_and_removed_only_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, stats) = open(dir.path());
        let mut committed = store.committed();
        store.alert(&doc("a"), Some(entry("a")));
        store.alert(&doc("local-only"), None);
        store.outbox_push(entry("summary"));
        store.alert(&doc("b"), Some(entry("b")));
        store.flush().await;
        assert_eq!(*committed.borrow_and_update(), 3);
        let page = store.outbox_page(0, 10).await;
        let ids: Vec<_> = page.iter().map(|i| i.entry.id.as_str()).collect();
        assert_eq!(ids, ["a", "summary", "b"]);
        assert_eq!(Stats::get(&stats.outbox_depth), 3);
        assert_eq!(store.outbox_page(1, 1).await[0].entry.id, "summary");

        store.outbox_done(page[0].seq);
        store.flush().await;
        assert_eq!(Stats::get(&stats.outbox_depth), 2);
        drop(store);
        thread.join();

        // After a restart the rest is still there, in order, and the history kept both alerts.
        let (store, thread, _) = open(dir.path());
        assert_eq!(*store.committed().borrow(), 3);
        let ids: Vec<_> = store
            .outbox_page(0, 10)
            .await
            .into_iter()
            .map(|i| i.entry.id)
            .collect();
        assert_eq!(ids, ["summary", "b"]);
        drop(store);
        thread.join();
        let reader = Reader::open(dir.path()).unwrap();
        assert_eq!(reader.alerts(0).unwrap().len(), 3);
        assert_eq!(reader.outbox().unwrap().0, 2);
    }

    #[tokio::test]
    async fn rollups_of_one_window_merge_and_devices_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, _) = open(dir.path());
        let rollup = |count, min, max, mean, last| RollupRow {
            device: "d".into(),
            metric: "t".into(),
            rollup: Closed::Numbers(Rollup {
                start: 60_000,
                len: 60_000,
                count,
                min,
                max,
                mean,
                last,
            }),
        };
        store.rollups(vec![rollup(2, 10.0, 20.0, 15.0, 20.0)]);
        store.rollups(vec![rollup(2, 5.0, 15.0, 10.0, 5.0)]);
        let mut add = DeviceCounters {
            messages: 3,
            readings: 3,
            last_seen_ms: 1000,
            ..Default::default()
        };
        add.loss.lost = 2;
        store.devices(vec![DeviceDelta {
            device: "d".into(),
            add: add.clone(),
        }]);
        add.last_seen_ms = 2000;
        store.devices(vec![DeviceDelta {
            device: "d".into(),
            add,
        }]);
        store.counters(vec![("uplink_reconnects", 1)]);
        store.counters(vec![("uplink_reconnects", 2)]);
        drop(store);
        thread.join();
        let reader = Reader::open(dir.path()).unwrap();
        let r = &reader.rollups("d", "t", 0).unwrap()[0];
        assert_eq!(
            (r.count, r.min, r.max, r.mean, r.last),
            (4, 5.0, 20.0, 12.5, 5.0)
        );
        let d = &reader.devices().unwrap()[0];
        assert_eq!((d.messages, d.lost), (6, 4));
        assert_eq!(d.last_seen, crate::alert::rfc3339(2000));
        assert_eq!(reader.counter("uplink_reconnects").unwrap(), 3);
    }

    #[tokio::test]
    async fn over_budget_the_oldest_history_goes_and_alerts_stay() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let opts = StoreOptions {
            max_db_bytes: 2 * 1024 * 1024,
            raw_retention: Some(Duration::from_secs(365 * 86_400)),
            reserve_bytes: 0,
        };
        let (store, thread) = Store::open(dir.path(), opts, stats.clone()).unwrap();
        let now = now_millis();
        for i in 0..50u64 {
            store.alert(
                &doc(&format!("alert-{i}")),
                Some(entry(&format!("alert-{i}"))),
            );
        }
        let mut rows = Vec::new();
        for i in 0..60_000u64 {
            rows.push(RawRow {
                device: format!("device-{}", i % 100),
                metric: "temperature".into(),
                at: now - 60_000 + i,
                value: Value::Number(i as f64),
                seq: Some(i),
            });
        }
        store.raw(rows);
        store.flush().await;
        drop(store);
        // The last handle is gone: the thread maintains once more... only on its timer, so
        // run the maintenance directly on a writer over the same file.
        thread.join();
        let (mut w, _) = Writer::new(
            open_db(&dir.path().join(DB_FILE)).unwrap(),
            dir.path(),
            opts,
            stats.clone(),
        )
        .unwrap();
        assert!(
            w.used_bytes().unwrap() > opts.max_db_bytes,
            "the test must start over budget"
        );
        w.maintain().unwrap();
        assert!(w.used_bytes().unwrap() <= opts.max_db_bytes);
        assert!(Stats::get(&stats.history_evicted) > 0);
        let reader = Reader::open(dir.path()).unwrap();
        assert_eq!(
            reader.alerts(0).unwrap().len(),
            50,
            "alerts are never dropped to make room"
        );
        assert_eq!(reader.outbox().unwrap().0, 50, "nor is the outbox");
        let left = reader.readings("device-0", "temperature", 0).unwrap();
        assert!(
            !left.is_empty() && left.len() < 600,
            "the oldest readings went first: {} left",
            left.len()
        );
        assert_eq!(
            left.last().unwrap().seq,
            Some(59_900),
            "the newest reading is kept"
        );
    }

    #[test]
    fn alerts_wait_in_memory_while_the_database_fails_and_are_written_in_order_after() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let (mut w, committed) = Writer::new(
            open_db(&dir.path().join(DB_FILE)).unwrap(),
            dir.path(),
            options(),
            stats.clone(),
        )
        .unwrap();
        // Every write now fails, as on a failing disk.
        w.conn.pragma_update(None, "query_only", true).unwrap();
        let mut batch = vec![
            Command::Alert(Box::new(doc("a")), Some(entry("a"))),
            Command::Rollups(vec![RollupRow {
                device: "d".into(),
                metric: "t".into(),
                rollup: Closed::Numbers(Rollup {
                    start: 0,
                    len: 1,
                    count: 1,
                    min: 1.0,
                    max: 1.0,
                    mean: 1.0,
                    last: 1.0,
                }),
            }]),
        ];
        let (judged, mut answer) = oneshot::channel();
        batch.push(Command::Flush(vec![judged]));
        w.handle(&mut batch);
        assert_eq!(w.retry.len(), 1, "the alert is kept, the rollup is not");
        assert_eq!(Stats::get(&stats.history_shed), 1, "the rollup is counted");
        assert_eq!(*committed.borrow(), 0);
        assert!(
            answer.try_recv().is_err(),
            "what waits for the alert to be durable is not answered"
        );

        w.conn.pragma_update(None, "query_only", false).unwrap();
        w.commit(&mut vec![Command::Outbox(entry("b"))]);
        assert!(w.retry.is_empty());
        assert!(answer.try_recv().is_ok(), "answered once it is committed");
        assert_eq!(*committed.borrow(), 2);
        let ids: Vec<_> = w
            .outbox_page(0, 10)
            .unwrap()
            .into_iter()
            .map(|i| i.entry.id)
            .collect();
        assert_eq!(ids, ["a", "b"], "the retried alert keeps its place");
        assert_eq!(Stats::get(&stats.outbox_depth), 2);
    }

    #[test]
    fn a_full_disk_gives_the_reserve_back_sheds_history_and_keeps_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let opts = StoreOptions {
            reserve_bytes: 1024 * 1024,
            ..options()
        };
        let (mut w, committed) = Writer::new(
            open_db(&dir.path().join(DB_FILE)).unwrap(),
            dir.path(),
            opts,
            stats.clone(),
        )
        .unwrap();
        let reserve = dir.path().join(RESERVE_FILE);
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 1024 * 1024);
        // SQLite answers SQLITE_FULL, as on a full disk, once the file may not grow.
        let pages: i64 = w
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        w.conn.pragma_update(None, "max_page_count", pages).unwrap();
        let raw = |n: usize| {
            Command::Raw(
                (0..n)
                    .map(|i| RawRow {
                        device: format!("d{i}"),
                        metric: "t".into(),
                        at: i as Millis,
                        value: Value::Number(i as f64),
                        seq: None,
                    })
                    .collect(),
            )
        };
        let (judged, mut answer) = oneshot::channel();
        w.handle(&mut vec![
            raw(500),
            Command::Alert(Box::new(doc("a")), Some(entry("a"))),
            Command::Flush(vec![judged]),
        ]);
        assert!(stats.disk_full.load(Ordering::Relaxed));
        assert!(
            !reserve.exists(),
            "the reserve went back to the file system"
        );
        assert_eq!(Stats::get(&stats.history_shed), 500);
        // Without the history, the alert fits: committed in the same round, and whatever
        // waited for it is answered.
        assert!(w.retry.is_empty());
        assert_eq!(*committed.borrow(), 1, "the alert is in the outbox");
        assert!(answer.try_recv().is_ok());
        // More history while full is shed before it is tried.
        w.commit(&mut vec![raw(10)]);
        assert_eq!(Stats::get(&stats.history_shed), 510);

        w.conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        // The file system has room: the reserve is set aside again and history is written.
        w.look_for_space();
        assert!(!stats.disk_full.load(Ordering::Relaxed));
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 1024 * 1024);
        w.commit(&mut vec![raw(3)]);
        assert_eq!(Stats::get(&stats.history_shed), 510);
        let rows: i64 = w
            .conn
            .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3);
    }

    #[test]
    fn refuses_a_database_from_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(dir.path(), options(), Arc::new(Stats::default()))
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    }
}
