//! The store: the one owner of the SQLite database.
//!
//! A dedicated thread holds the connection; everyone else sends it commands through a channel
//! and never waits on disk. Commands that arrive together are written in one transaction, so
//! a burst costs one commit. The schema is versioned with `PRAGMA user_version` and migrated
//! forward on open.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{Connection, params};
use tracing::{debug, error};

use crate::alert::AlertDoc;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "watchpost.db";

/// Most commands written in one transaction.
const BATCH: usize = 1024;

/// Schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &["
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
"];

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
    /// SQLite refused to open or migrate the database.
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
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

enum Command {
    RecordAlert(Box<AlertDoc>, i64),
}

/// Handle to the store thread. Dropping every handle (or calling [`Store::close`]) lets the
/// thread finish its last batch and exit.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
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
    pub fn open(data_dir: &Path) -> Result<(Store, StoreThread), StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let conn = open_db(&path)?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("watchpost-store".into())
            .spawn(move || writer(conn, rx))
            .map_err(StoreError::Thread)?;
        Ok((Store { tx }, StoreThread(thread)))
    }

    /// Queues an alert transition for the history table.
    pub fn record_alert(&self, doc: &AlertDoc) {
        let now = crate::alert::now_millis() as i64;
        if self
            .tx
            .send(Command::RecordAlert(Box::new(doc.clone()), now))
            .is_err()
        {
            error!(id = %doc.id, "the store thread is gone; alert not recorded in history");
        }
    }
}

fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
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

fn writer(mut conn: Connection, rx: mpsc::Receiver<Command>) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        if let Err(e) = write_batch(&mut conn, &mut batch) {
            error!(error = %e, "could not write to the database; {} records lost", batch.len());
        }
        batch.clear();
    }
    debug!("store closed");
}

fn write_batch(conn: &mut Connection, batch: &mut [Command]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO alert_history (id, rule, device, metric, severity, state, value, threshold, since, at, recorded_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for command in batch.iter() {
            match command {
                Command::RecordAlert(d, now) => {
                    let state = match d.state {
                        crate::rules::AlertState::Raised => "raised",
                        crate::rules::AlertState::Cleared => "cleared",
                    };
                    insert.execute(params![
                        d.id,
                        d.rule,
                        d.device,
                        d.metric,
                        d.severity.as_str(),
                        state,
                        d.value,
                        d.threshold,
                        d.since,
                        d.at,
                        now
                    ])?;
                }
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{AlertState, Severity};

    fn doc(id: &str) -> AlertDoc {
        AlertDoc {
            id: id.into(),
            rule: "r".into(),
            device: "d".into(),
            metric: "m".into(),
            severity: Severity::Critical,
            state: AlertState::Raised,
            value: 1.0,
            threshold: 0.5,
            since: "s".into(),
            at: "a".into(),
            gateway: "g".into(),
        }
    }

    #[test]
    fn creates_directory_and_records_alerts_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested/data");
        let (store, thread) = Store::open(&data).unwrap();
        store.record_alert(&doc("a"));
        store.record_alert(&doc("b"));
        drop(store);
        thread.join();

        // Reopening runs no migration twice and keeps the rows.
        let (store, thread) = Store::open(&data).unwrap();
        drop(store);
        thread.join();
        let conn = Connection::open(data.join(DB_FILE)).unwrap();
        let ids: Vec<String> = conn
            .prepare("SELECT id FROM alert_history ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn refuses_a_database_from_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    }
}
