//! Opening a results database on either engine: what each opener may
//! create or change, and the check that a file or database is ours.
//!
//! - SQLite (a path, `sqlite://path` or `sqlite:path`): creation and
//!   migration hold an exclusive `flock` on the database's folder, so
//!   processes started at once on a new file wait for one migrator; the
//!   WAL journal is set once, on the file.
//! - PostgreSQL (`postgres://…`): the database must exist (we never create
//!   databases on a server); sqlx's migrator takes PostgreSQL's advisory
//!   lock; a read-only opener sets `default_transaction_read_only` on every
//!   connection.
//!
//! Either way a database with tables but no `_sqlx_migrations`, or with
//! migrations this build does not know, is another program's and is
//! refused before anything is written.

use super::Engine;
use crate::{Error, Result};
use sqlx::any::AnyPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{AnyPool, Executor};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub(super) static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
pub(super) static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// What an opener may do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mode {
    /// Create (SQLite) and migrate: `run`, `worker`, `bench`.
    Create,
    /// Our database must exist; it may be migrated: `rm`, `restore`, `gc`.
    Existing,
    /// Our database at the current schema, read-only: `runs`, `show`, …
    ReadOnly,
}

/// The engine a `--db` value names.
pub(super) fn engine_of(url: &str) -> Engine {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Engine::Postgres
    } else {
        Engine::Sqlite
    }
}

/// The file behind a SQLite `url`: `sqlite://path`, `sqlite:path` (query
/// string dropped) or a plain path; `None` for an in-memory database.
pub(super) fn file_of(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

fn sqlite_options(url: &str) -> Result<SqliteConnectOptions> {
    let o = if url.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url).map_err(|e| Error::invalid("--db", format!("{url}: {e}")))?
    } else {
        SqliteConnectOptions::new().filename(url)
    };
    Ok(o.foreign_keys(true).busy_timeout(Duration::from_secs(30)))
}

/// Is the database behind `pool` ours? `need_ours` refuses an empty one;
/// `current` also requires every migration of the engine to be applied.
async fn check_schema(
    pool: &AnyPool,
    engine: Engine,
    url: &str,
    need_ours: bool,
    current: bool,
) -> Result<()> {
    let err = |msg: String| Error::Store(format!("{url}: {msg}"));
    let q = |e: sqlx::Error| err(format!("reading the schema: {e}"));
    let (tables_sql, ours_sql) = match engine {
        Engine::Sqlite => (
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        ),
        Engine::Postgres => (
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()",
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'",
        ),
    };
    let tables: i64 = sqlx::query_scalar(tables_sql).fetch_one(pool).await.map_err(q)?;
    let ours: i64 = sqlx::query_scalar(ours_sql).fetch_one(pool).await.map_err(q)?;
    let what = match engine {
        Engine::Sqlite => "SQLite file",
        Engine::Postgres => "PostgreSQL database",
    };
    if ours == 0 {
        return match (tables, need_ours) {
            (0, false) => Ok(()),
            (0, true) => Err(err(format!("an empty {what}, not an hmsa-lab results database"))),
            _ => Err(err(format!(
                "not an hmsa-lab results database (it has {tables} table(s) but no _sqlx_migrations); left untouched"
            ))),
        };
    }
    let migrator = match engine {
        Engine::Sqlite => &SQLITE,
        Engine::Postgres => &POSTGRES,
    };
    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(q)?;
    for (v, sum) in &applied {
        if !migrator
            .iter()
            .any(|m| m.version == *v && m.checksum.as_ref() == sum.as_slice())
        {
            return Err(err(format!(
                "schema migration {v} is not one this hmsa-lab knows: another program's database, or a newer hmsa-lab's; left untouched"
            )));
        }
    }
    let known = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count();
    if current && applied.len() < known {
        return Err(err(format!(
            "written by an older hmsa-lab (schema {} of {known}); a writing command (`hmsa-lab run`, `rm`, `gc`) migrates it",
            applied.len()
        )));
    }
    Ok(())
}

/// Opens `url` as `mode` allows; returns the pool the store works through.
pub(super) async fn open(url: &str, mode: Mode) -> Result<AnyPool> {
    sqlx::any::install_default_drivers();
    match engine_of(url) {
        Engine::Sqlite => open_sqlite(url, mode).await,
        Engine::Postgres => open_postgres(url, mode).await,
    }
}

async fn open_sqlite(url: &str, mode: Mode) -> Result<AnyPool> {
    let file = file_of(url);
    if let Some(path) = &file {
        if mode != Mode::Create && !path.is_file() {
            return Err(Error::Store(format!("{url}: no such database")));
        }
    }
    if mode != Mode::ReadOnly {
        let _lock = match &file {
            Some(path) => {
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf();
                std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
                let lock = std::fs::File::open(&dir).map_err(|e| Error::io("opening", &dir, e))?;
                lock.lock().map_err(|e| Error::io("locking", &dir, e))?;
                Some(lock)
            }
            None => None,
        };
        // One connection creates the file (WAL is a property of the file),
        // checks and migrates, under the lock.
        let first = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(sqlite_options(url)?.create_if_missing(mode == Mode::Create))
            .await
            .map_err(|e| Error::Store(format!("{url}: opening: {e}")))?;
        let any = any_sqlite(url, false, 1).await?;
        check_schema(&any, Engine::Sqlite, url, mode != Mode::Create, false).await?;
        any.close().await;
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&first)
            .await
            .map_err(|e| Error::Store(format!("{url}: setting the WAL journal: {e}")))?;
        SQLITE
            .run(&first)
            .await
            .map_err(|e| Error::Store(format!("{url}: migrating: {e}")))?;
        first.close().await;
    }
    let pool = any_sqlite(url, mode == Mode::ReadOnly, 4).await?;
    if mode == Mode::ReadOnly {
        check_schema(&pool, Engine::Sqlite, url, true, true).await?;
    }
    Ok(pool)
}

/// An Any pool on the SQLite file of `url` (which must exist), with our
/// connection settings: foreign keys, a 30 s busy timeout.
async fn any_sqlite(url: &str, read_only: bool, max: u32) -> Result<AnyPool> {
    let any_url = match file_of(url) {
        Some(p) => format!(
            "sqlite://{}?mode={}{}",
            p.display(),
            if read_only { "ro" } else { "rw" },
            if read_only && immutable(&p) {
                "&immutable=true"
            } else {
                ""
            }
        ),
        None => "sqlite::memory:".to_string(),
    };
    AnyPoolOptions::new()
        .max_connections(max)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("PRAGMA foreign_keys = ON").await?;
                conn.execute("PRAGMA busy_timeout = 30000").await?;
                Ok(())
            })
        })
        .connect(&any_url)
        .await
        .map_err(|e| Error::Store(format!("{url}: opening: {e}")))
}

/// Whether a reader may open the SQLite file `db` as immutable: no
/// write-ahead log beside it, so no writer has it open (a WAL database
/// keeps its `-wal` while any connection does). Opened so, a reader
/// creates nothing (a plain read-only open of a WAL database makes the
/// `-wal` and `-shm` files); with a writer present it reads through the
/// writer's log, whose files exist.
pub(super) fn immutable(db: &Path) -> bool {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    !Path::new(&wal).exists()
}

async fn open_postgres(url: &str, mode: Mode) -> Result<AnyPool> {
    let read_only = mode == Mode::ReadOnly;
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if read_only {
                    conn.execute("SET default_transaction_read_only = on").await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .map_err(|e| Error::Store(format!("{}: opening: {e}", redact(url))))?;
    let shown = redact(url);
    check_schema(&pool, Engine::Postgres, &shown, mode != Mode::Create, read_only).await?;
    if !read_only {
        POSTGRES
            .run(&pool)
            .await
            .map_err(|e| Error::Store(format!("{shown}: migrating: {e}")))?;
    }
    Ok(pool)
}

/// `url` without its password, for messages.
pub(super) fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
