//! The results store: SQLite through sqlx, migrations from `migrations/`
//! embedded and applied on open, WAL journal. This is the only module that
//! speaks SQL; everything else passes the structs defined here.
//!
//! Consistency under interruption: every write is one statement or one
//! transaction, so a kill at any moment leaves either the old or the new row.
//! A run is claimed by one conditional UPDATE (SCHEDULED, KILLED, FAILED, or
//! RUNNING with a stale heartbeat), so two processes never run it twice; its
//! evaluations, artifacts and FINISHED status land in one transaction.

use crate::eval::EvalResult;
use crate::model::fusion::format_scales;
use crate::{Error, Result};
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{Column, Row, SqlitePool, TypeInfo, ValueRef};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A run's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Status {
    Scheduled,
    Running,
    Finished,
    Failed,
    Killed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "SCHEDULED",
            Status::Running => "RUNNING",
            Status::Finished => "FINISHED",
            Status::Failed => "FAILED",
            Status::Killed => "KILLED",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "SCHEDULED" => Status::Scheduled,
            "RUNNING" => Status::Running,
            "FINISHED" => Status::Finished,
            "FAILED" => Status::Failed,
            "KILLED" => Status::Killed,
            other => {
                return Err(Error::invalid(
                    "status",
                    format!("unknown status `{other}` (scheduled, running, finished, failed, killed)"),
                ))
            }
        })
    }
}

/// One row of `runs`.
#[derive(Clone, Debug, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub suite: String,
    pub variant: String,
    pub config_json: String,
    pub config_hash: String,
    pub seed: i64,
    pub status: String,
    pub step: i64,
    pub heartbeat_ms: Option<i64>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub host: Option<String>,
    pub versions: Option<String>,
    pub run_dir: String,
    pub error: Option<String>,
    /// Who holds (or last held) it: `host:pid:start_ms`.
    pub claimed_by: Option<String>,
    /// When `rm` removed it (it is restorable until `gc` purges it).
    pub removed_ms: Option<i64>,
}

fn run_row(r: &SqliteRow) -> RunRow {
    RunRow {
        id: r.get("id"),
        suite: r.get("suite"),
        variant: r.get("variant"),
        config_json: r.get("config_json"),
        config_hash: r.get("config_hash"),
        seed: r.get("seed"),
        status: r.get("status"),
        step: r.get("step"),
        heartbeat_ms: r.get("heartbeat_ms"),
        start_ms: r.get("start_ms"),
        end_ms: r.get("end_ms"),
        git_commit: r.get("git_commit"),
        git_dirty: r.get::<Option<i64>, _>("git_dirty").map(|v| v != 0),
        host: r.get("host"),
        versions: r.get("versions"),
        run_dir: r.get("run_dir"),
        error: r.get("error"),
        claimed_by: r.get("claimed_by"),
        removed_ms: r.get("removed_ms"),
    }
}

/// One row of `evaluations`.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRow {
    pub run_id: i64,
    pub scales: String,
    pub fusion: String,
    pub flip: bool,
    pub miou: f64,
    pub pixel_acc: f64,
    pub mean_class_acc: f64,
    pub fw_iou: f64,
    /// JSON list, one entry per class (null where absent).
    pub class_iou: String,
    pub confusion: String,
    pub attn_means: String,
    /// JSON: per scale, per class, the mean attention weight.
    pub attn_class_means: String,
    pub ms_per_image: f64,
    pub peak_mib: Option<f64>,
    pub images: i64,
}

/// What a run records about where it ran.
#[derive(Clone, Debug, Default)]
pub struct Provenance {
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub host: String,
    pub versions: String,
}

/// A benchmark measurement.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub suite: String,
    pub name: String,
    pub params: String,
    pub min_ms: Option<f64>,
    pub median_ms: Option<f64>,
    pub peak_mib: Option<f64>,
    pub value: Option<f64>,
    pub unit: String,
    pub threads: i64,
    pub machine: String,
}

/// Who claims a run, and which held or finished runs it may take.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    /// `host:pid:start_ms` of the claiming process.
    pub who: &'a str,
    /// A RUNNING run whose heartbeat is older than this is taken over.
    pub stale_ms: i64,
    /// The holder of a RUNNING run whose process is known to be gone.
    pub dead_holder: Option<&'a str>,
    /// FINISHED runs that ended before this time are claimed (`--force`).
    pub refinish_before_ms: Option<i64>,
}

/// Filters for listing runs.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    pub suite: Option<String>,
    pub variant: Option<String>,
    pub status: Option<Status>,
    /// Include runs removed with `rm` (and not yet purged by `gc`).
    pub removed: bool,
}

/// A results database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    /// The URL or path it was opened with, for messages.
    url: String,
}

/// The migrations this build knows, applied by [`Store::open`].
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The file behind `url`: `sqlite://path`, `sqlite:path` (query string
/// dropped) or a plain path; `None` for an in-memory database.
fn file_of(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// `sqlite://path`, `sqlite:path` or a plain file path.
fn options(url: &str) -> Result<SqliteConnectOptions> {
    let o = if url.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url).map_err(|e| Error::invalid("--db", format!("{url}: {e}")))?
    } else {
        SqliteConnectOptions::new().filename(url)
    };
    Ok(o.foreign_keys(true).busy_timeout(Duration::from_secs(30)))
}

/// What an opener needs of the file's schema.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// An empty file is fine (it is about to be created and migrated).
    Nothing,
    /// Our schema, possibly older (the opener migrates it).
    Ours,
    /// Our schema with every migration applied (a read-only opener).
    Current,
}

/// Is the database behind `pool` one of ours? A file with tables but no
/// `_sqlx_migrations`, or with migrations this build does not know, is
/// another program's (or a newer hmsa-lab's) and is refused untouched.
async fn check_schema(pool: &SqlitePool, url: &str, need: Need) -> Result<()> {
    let err = |msg: String| Error::Store(format!("{url}: {msg}"));
    let q = |e: sqlx::Error| err(format!("reading the schema: {e}"));
    let tables: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'")
        .fetch_one(pool)
        .await
        .map_err(q)?;
    let ours: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_one(pool)
    .await
    .map_err(q)?;
    if ours == 0 {
        return match (tables, need) {
            (0, Need::Nothing) => Ok(()),
            (0, _) => Err(err("an empty SQLite file, not an hmsa-lab results database".into())),
            _ => Err(err(format!(
                "not an hmsa-lab results database (it has {tables} table(s) but no _sqlx_migrations); left untouched"
            ))),
        };
    }
    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(q)?;
    for (v, sum) in &applied {
        if !MIGRATOR
            .iter()
            .any(|m| m.version == *v && m.checksum.as_ref() == sum.as_slice())
        {
            return Err(err(format!(
                "schema migration {v} is not one this hmsa-lab knows: another program's database, or a newer hmsa-lab's; left untouched"
            )));
        }
    }
    let known = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count();
    if need == Need::Current && applied.len() < known {
        return Err(err(format!(
            "written by an older hmsa-lab (schema {} of {known}); a writing command (`hmsa-lab run`, `rm`, `gc`) migrates it",
            applied.len()
        )));
    }
    Ok(())
}

impl Store {
    /// Opens the database at `url` for writing, creating and migrating it
    /// if needed (`run`, `bench`). Creation and migration hold an exclusive
    /// lock on the file's folder, so processes started at once on a new
    /// database wait for one migrator. A file that is not ours is refused
    /// and left as it is.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_writable(url, true).await
    }

    /// Opens an existing results database for writing (`rm`, `restore`,
    /// `gc`): a missing file is an error, nothing is created.
    pub async fn open_existing(url: &str) -> Result<Self> {
        Self::open_writable(url, false).await
    }

    async fn open_writable(url: &str, create: bool) -> Result<Self> {
        let _lock = match file_of(url) {
            Some(path) => {
                if !create && !path.is_file() {
                    return Err(Error::Store(format!("{url}: no such database")));
                }
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf();
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let lock = std::fs::File::open(&dir).map_err(|e| Error::io(&dir, e))?;
                lock.lock().map_err(|e| Error::io(&dir, e))?;
                Some(lock)
            }
            None => None,
        };
        // One connection creates (WAL is a property of the file), checks
        // and migrates; the pool opens after it.
        {
            let opts = options(url)?.create_if_missing(create);
            let first = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .map_err(|e| Error::Store(format!("{url}: opening: {e}")))?;
            // Checked before anything is written: another program's file is
            // left exactly as it was.
            check_schema(&first, url, if create { Need::Nothing } else { Need::Ours }).await?;
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&first)
                .await
                .map_err(|e| Error::Store(format!("{url}: setting the WAL journal: {e}")))?;
            MIGRATOR
                .run(&first)
                .await
                .map_err(|e| Error::Store(format!("{url}: migrating: {e}")))?;
            first.close().await;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options(url)?)
            .await
            .map_err(|e| Error::Store(format!("{url}: opening: {e}")))?;
        Ok(Self {
            pool,
            url: url.to_string(),
        })
    }

    /// Opens an existing results database read-only (`runs`, `show`,
    /// `compare`, `report`, `query`): nothing is created or migrated; a
    /// missing file, another program's database or an older schema is an
    /// error naming the file.
    pub async fn open_read_only(url: &str) -> Result<Self> {
        if let Some(path) = file_of(url) {
            if !path.is_file() {
                return Err(Error::Store(format!("{url}: no such database")));
            }
        }
        let opts = options(url)?.read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(|e| Error::Store(format!("{url}: opening: {e}")))?;
        check_schema(&pool, url, Need::Current).await?;
        Ok(Self {
            pool,
            url: url.to_string(),
        })
    }

    /// The URL or path this store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This database's identity (written once by migration 0003); run
    /// folders name it in their owner file.
    pub async fn id(&self) -> Result<String> {
        sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'id'")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.fail("reading its id", e))
    }

    /// A store error naming the database and the operation.
    fn fail(&self, op: &str, e: impl std::fmt::Display) -> Error {
        Error::Store(format!("{}: {op}: {e}", self.url))
    }

    pub async fn upsert_suite(
        &self,
        name: &str,
        description: &str,
        file: &str,
        baseline: &str,
    ) -> Result<()> {
        sqlx::query(
            r#"INSERT INTO suites (name, description, file, baseline, created_ms) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(name) DO UPDATE SET description = excluded.description,
                   file = excluded.file, baseline = excluded.baseline"#,
        )
        .bind(name)
        .bind(description)
        .bind(file)
        .bind(baseline)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail("recording the suite", e))?;
        Ok(())
    }

    /// The suite's baseline variant name.
    pub async fn suite_baseline(&self, name: &str) -> Result<Option<String>> {
        let r = sqlx::query("SELECT baseline FROM suites WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail("reading the suite", e))?;
        Ok(r.map(|r| r.get("baseline")))
    }

    /// The run row for (suite, variant, hash, seed), created SCHEDULED if new.
    pub async fn ensure_run(
        &self,
        suite: &str,
        variant: &str,
        config_json: &str,
        hash: &str,
        seed: u64,
        run_dir: &str,
    ) -> Result<RunRow> {
        sqlx::query(
            r#"INSERT INTO runs (suite, variant, config_json, config_hash, seed, run_dir)
               VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"#,
        )
        .bind(suite)
        .bind(variant)
        .bind(config_json)
        .bind(hash)
        .bind(seed as i64)
        .bind(run_dir)
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail("recording a run", e))?;
        self.find_run(suite, variant, hash, seed)
            .await?
            .ok_or_else(|| Error::Store("run row vanished after insert".into()))
    }

    pub async fn find_run(
        &self,
        suite: &str,
        variant: &str,
        hash: &str,
        seed: u64,
    ) -> Result<Option<RunRow>> {
        let r = sqlx::query(
            "SELECT * FROM runs WHERE suite = ? AND variant = ? AND config_hash = ? AND seed = ?",
        )
        .bind(suite)
        .bind(variant)
        .bind(hash)
        .bind(seed as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.fail("finding a run", e))?;
        Ok(r.as_ref().map(run_row))
    }

    /// Claims a run: one conditional UPDATE, so of two processes only one
    /// succeeds. Claimable are SCHEDULED, KILLED and FAILED runs; a RUNNING
    /// run whose heartbeat is stale, or whose holder is `c.dead_holder`
    /// (a process known to be gone); a FINISHED run only when it finished
    /// before `c.refinish_before_ms` (`run --force`: what another forced
    /// process finished meanwhile is not trained again). Removed runs never.
    pub async fn claim(&self, id: i64, c: &Claim<'_>, prov: &Provenance) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            r#"UPDATE runs SET status = 'RUNNING', claimed_by = ?, heartbeat_ms = ?,
                   start_ms = COALESCE(start_ms, ?), end_ms = NULL, error = NULL,
                   git_commit = ?, git_dirty = ?, host = ?, versions = ?
               WHERE id = ? AND removed_ms IS NULL AND (status IN ('SCHEDULED', 'KILLED', 'FAILED')
                   OR (status = 'RUNNING' AND (heartbeat_ms IS NULL OR heartbeat_ms < ?))
                   OR (status = 'RUNNING' AND claimed_by = ?)
                   OR (status = 'FINISHED' AND end_ms < ?))"#,
        )
        .bind(c.who)
        .bind(now)
        .bind(now)
        .bind(&prov.git_commit)
        .bind(prov.git_dirty.map(i64::from))
        .bind(&prov.host)
        .bind(&prov.versions)
        .bind(id)
        .bind(now - c.stale_ms)
        .bind(c.dead_holder)
        .bind(c.refinish_before_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail("claiming a run", e))?;
        Ok(r.rows_affected() == 1)
    }

    /// Refreshes the heartbeat (and step) of a run this process holds.
    pub async fn heartbeat(&self, id: i64, who: &str, step: Option<i64>) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET heartbeat_ms = ?, step = COALESCE(?, step) WHERE id = ? AND claimed_by = ? AND status = 'RUNNING'",
        )
        .bind(now_ms())
        .bind(step)
        .bind(id)
        .bind(who)
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail("writing a heartbeat", e))?;
        Ok(())
    }

    /// Ends a run this process holds as FAILED or KILLED.
    pub async fn end_run(&self, id: i64, who: &str, status: Status, error: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE runs SET status = ?, end_ms = ?, error = ? WHERE id = ? AND claimed_by = ?")
            .bind(status.as_str())
            .bind(now_ms())
            .bind(error)
            .bind(id)
            .bind(who)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail("ending a run", e))?;
        Ok(())
    }

    /// Params are written once: existing keys are left as they are.
    pub async fn write_params(&self, id: i64, params: &[(String, String)]) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.fail("writing params", e))?;
        for (k, v) in params {
            sqlx::query("INSERT OR IGNORE INTO params (run_id, key, value) VALUES (?, ?, ?)")
                .bind(id)
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.fail("writing params", e))?;
        }
        tx.commit().await.map_err(|e| self.fail("writing params", e))
    }

    /// Per-step metrics; a step recomputed after a resume replaces its row.
    pub async fn log_metrics(&self, id: i64, rows: &[(&str, i64, f64)]) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.fail("writing metrics", e))?;
        let now = now_ms();
        for (k, step, v) in rows {
            let nan = !v.is_finite();
            sqlx::query(
                "INSERT OR REPLACE INTO metrics (run_id, key, step, time_ms, value, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(*k)
            .bind(*step)
            .bind(now)
            .bind(if nan { None } else { Some(*v) })
            .bind(nan)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.fail("writing metrics", e))?;
        }
        tx.commit().await.map_err(|e| self.fail("writing metrics", e))
    }

    /// Evaluations already recorded for a run: (scales, fusion, flip).
    pub async fn evaluated(&self, id: i64) -> Result<Vec<(String, String, bool)>> {
        let rows = sqlx::query("SELECT scales, fusion, flip FROM evaluations WHERE run_id = ?")
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("reading evaluations", e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get("scales"), r.get("fusion"), r.get::<i64, _>("flip") != 0))
            .collect())
    }

    /// Records evaluations and artifacts and marks the run FINISHED, in one
    /// transaction.
    pub async fn finish_run(
        &self,
        id: i64,
        who: &str,
        step: i64,
        evals: &[EvalResult],
        artifacts: &[(String, String, String)],
    ) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.fail("finishing a run", e))?;
        let now = now_ms();
        for e in evals {
            let iou = serde_json::to_string(&e.metrics.iou).expect("serialisable");
            sqlx::query(
                r#"INSERT OR REPLACE INTO evaluations (run_id, scales, fusion, flip, miou, pixel_acc,
                       mean_class_acc, fw_iou, class_iou, confusion, attn_means, attn_class_means,
                       ms_per_image, peak_mib, images, created_ms)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"#,
            )
            .bind(id)
            .bind(format_scales(&e.set.scales))
            .bind(e.set.fusion.name())
            .bind(e.set.flip)
            .bind(e.metrics.miou)
            .bind(e.metrics.pixel_acc)
            .bind(e.metrics.mean_class_acc)
            .bind(e.metrics.fw_iou)
            .bind(iou)
            .bind(serde_json::to_string(&e.confusion).expect("serialisable"))
            .bind(serde_json::to_string(&e.attn_means).expect("serialisable"))
            .bind(serde_json::to_string(&e.attn_class_means).expect("serialisable"))
            .bind(e.ms_per_image)
            .bind(e.peak_mib)
            .bind(e.images as i64)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.fail("finishing a run", e))?;
        }
        for (kind, path, digest) in artifacts {
            sqlx::query("DELETE FROM artifacts WHERE run_id = ? AND kind = ? AND path = ?")
                .bind(id)
                .bind(kind)
                .bind(path)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.fail("finishing a run", e))?;
            sqlx::query(
                "INSERT INTO artifacts (run_id, kind, path, digest, created_ms) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(kind)
            .bind(path)
            .bind(digest)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.fail("finishing a run", e))?;
        }
        let r = sqlx::query(
            "UPDATE runs SET status = 'FINISHED', step = ?, end_ms = ?, heartbeat_ms = ? WHERE id = ? AND claimed_by = ?",
        )
        .bind(step)
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(who)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.fail("finishing a run", e))?;
        if r.rows_affected() != 1 {
            return Err(Error::Store(format!(
                "run {id} is no longer held by this process"
            )));
        }
        tx.commit().await.map_err(|e| self.fail("finishing a run", e))
    }

    pub async fn runs(&self, f: &RunFilter) -> Result<Vec<RunRow>> {
        let rows = sqlx::query(
            r#"SELECT * FROM runs WHERE (?1 IS NULL OR suite = ?1) AND (?2 IS NULL OR variant = ?2)
               AND (?3 IS NULL OR status = ?3) AND (?4 OR removed_ms IS NULL) ORDER BY id"#,
        )
        .bind(&f.suite)
        .bind(&f.variant)
        .bind(f.status.map(|s| s.as_str()))
        .bind(f.removed)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail("listing runs", e))?;
        Ok(rows.iter().map(run_row).collect())
    }

    pub async fn run(&self, id: i64) -> Result<Option<RunRow>> {
        let r = sqlx::query("SELECT * FROM runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail("reading a run", e))?;
        Ok(r.as_ref().map(run_row))
    }

    pub async fn evaluations(&self, run_id: i64) -> Result<Vec<EvalRow>> {
        let rows = sqlx::query("SELECT * FROM evaluations WHERE run_id = ? ORDER BY id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("reading evaluations", e))?;
        Ok(rows
            .iter()
            .map(|r| EvalRow {
                run_id: r.get("run_id"),
                scales: r.get("scales"),
                fusion: r.get("fusion"),
                flip: r.get::<i64, _>("flip") != 0,
                miou: r.get("miou"),
                pixel_acc: r.get("pixel_acc"),
                mean_class_acc: r.get("mean_class_acc"),
                fw_iou: r.get("fw_iou"),
                class_iou: r.get("class_iou"),
                confusion: r.get("confusion"),
                attn_means: r.get("attn_means"),
                attn_class_means: r.get("attn_class_means"),
                ms_per_image: r.get("ms_per_image"),
                peak_mib: r.get("peak_mib"),
                images: r.get("images"),
            })
            .collect())
    }

    pub async fn params(&self, run_id: i64) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT key, value FROM params WHERE run_id = ? ORDER BY key")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("reading params", e))?;
        Ok(rows.iter().map(|r| (r.get("key"), r.get("value"))).collect())
    }

    /// (step, value) of one metric, NaN where flagged.
    pub async fn metric(&self, run_id: i64, key: &str) -> Result<Vec<(i64, f64)>> {
        let rows =
            sqlx::query("SELECT step, value, is_nan FROM metrics WHERE run_id = ? AND key = ? ORDER BY step")
                .bind(run_id)
                .bind(key)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.fail("reading a metric", e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let v: Option<f64> = r.get("value");
                (r.get("step"), v.unwrap_or(f64::NAN))
            })
            .collect())
    }

    /// Artifacts of a run: (kind, path, digest).
    pub async fn artifacts(&self, run_id: i64) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query("SELECT kind, path, digest FROM artifacts WHERE run_id = ? ORDER BY id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("reading artifacts", e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get("kind"), r.get("path"), r.get("digest")))
            .collect())
    }

    /// Marks runs removed (`rm`); returns the ids it marked. A RUNNING
    /// run is marked only when `running_stale_before` is given and its
    /// heartbeat is older (`rm --force`): the check is part of the UPDATE,
    /// so a run claimed meanwhile is not removed. Removed runs keep every
    /// row and file until `gc` purges them.
    pub async fn remove_runs(&self, ids: &[i64], running_stale_before: Option<i64>) -> Result<Vec<i64>> {
        let mut done = vec![];
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.fail("removing runs", e))?;
        let now = now_ms();
        for id in ids {
            let n = sqlx::query(
                r#"UPDATE runs SET removed_ms = ?1 WHERE id = ?2 AND removed_ms IS NULL
                   AND (status != 'RUNNING' OR (?3 IS NOT NULL AND (heartbeat_ms IS NULL OR heartbeat_ms < ?3)))"#,
            )
            .bind(now)
            .bind(id)
            .bind(running_stale_before)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.fail("removing runs", e))?
            .rows_affected();
            if n == 1 {
                done.push(*id);
            }
        }
        tx.commit().await.map_err(|e| self.fail("removing runs", e))?;
        Ok(done)
    }

    /// Brings removed runs back (`restore`); returns the ids restored.
    pub async fn restore_runs(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let mut done = vec![];
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.fail("restoring runs", e))?;
        for id in ids {
            let n = sqlx::query("UPDATE runs SET removed_ms = NULL WHERE id = ? AND removed_ms IS NOT NULL")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.fail("restoring runs", e))?
                .rows_affected();
            if n == 1 {
                done.push(*id);
            }
        }
        tx.commit().await.map_err(|e| self.fail("restoring runs", e))?;
        Ok(done)
    }

    /// Deletes removed runs for good (`gc`) with their params, metrics,
    /// evaluations and artifact rows, and artifact rows whose run is gone;
    /// one transaction. Runs restored meanwhile are kept.
    pub async fn purge_removed(&self, ids: &[i64]) -> Result<u64> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.fail("purging runs", e))?;
        let mut n = 0;
        for id in ids {
            n += sqlx::query("DELETE FROM runs WHERE id = ? AND removed_ms IS NOT NULL")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.fail("purging runs", e))?
                .rows_affected();
        }
        sqlx::query("DELETE FROM artifacts WHERE run_id IS NULL OR run_id NOT IN (SELECT id FROM runs)")
            .execute(&mut *tx)
            .await
            .map_err(|e| self.fail("purging artifacts", e))?;
        tx.commit().await.map_err(|e| self.fail("purging runs", e))?;
        Ok(n)
    }

    /// Artifact rows whose run is gone (left by an older `rm`).
    pub async fn orphan_artifacts(&self) -> Result<Vec<(i64, String)>> {
        let rows = sqlx::query(
            "SELECT id, path FROM artifacts WHERE run_id IS NULL OR run_id NOT IN (SELECT id FROM runs)",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.fail("reading artifacts", e))?;
        Ok(rows.iter().map(|r| (r.get("id"), r.get("path"))).collect())
    }

    pub async fn add_benchmark(&self, b: &BenchRow) -> Result<()> {
        sqlx::query(
            r#"INSERT INTO benchmarks (suite, name, params, min_ms, median_ms, peak_mib, value, unit, threads,
                   machine, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"#,
        )
        .bind(&b.suite)
        .bind(&b.name)
        .bind(&b.params)
        .bind(b.min_ms)
        .bind(b.median_ms)
        .bind(b.peak_mib)
        .bind(b.value)
        .bind(&b.unit)
        .bind(b.threads)
        .bind(&b.machine)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| self.fail("recording a benchmark", e))?;
        Ok(())
    }

    /// Benchmarks of one suite, oldest first.
    pub async fn benchmarks(&self, suite: &str) -> Result<Vec<BenchRow>> {
        let rows = sqlx::query("SELECT * FROM benchmarks WHERE suite = ? ORDER BY id")
            .bind(suite)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("reading benchmarks", e))?;
        Ok(rows
            .iter()
            .map(|r| BenchRow {
                suite: r.get("suite"),
                name: r.get("name"),
                params: r.get("params"),
                min_ms: r.get("min_ms"),
                median_ms: r.get("median_ms"),
                peak_mib: r.get("peak_mib"),
                value: r.get("value"),
                unit: r.get("unit"),
                threads: r.get("threads"),
                machine: r.get("machine"),
            })
            .collect())
    }

    /// Runs read-only SQL (`hmsa-lab query`) and returns column names and
    /// rows rendered as text. Every statement is prepared first and refused
    /// unless SQLite itself calls it read-only (`sqlite3_stmt_readonly`):
    /// that refuses every write, and `VACUUM INTO`, which writes a new file
    /// even through a read-only connection. A query still running after
    /// `timeout` is interrupted.
    pub async fn query(&self, sql: &str, timeout: Duration) -> Result<(Vec<String>, Vec<Vec<String>>)> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.fail("query", e))?;
        let deadline = std::time::Instant::now() + timeout;
        {
            let mut h = conn.lock_handle().await.map_err(|e| self.fail("query", e))?;
            if let Some(stmt) =
                writing_statement(h.as_raw_handle(), sql).map_err(|e| self.fail("query", e))?
            {
                return Err(self.fail(
                    "query",
                    format!("`{stmt}` would write; `hmsa-lab query` runs read-only statements only"),
                ));
            }
            h.set_progress_handler(1000, move || std::time::Instant::now() < deadline);
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut *conn)
            .await;
        if let Ok(mut h) = conn.lock_handle().await {
            h.remove_progress_handler();
        }
        let rows = rows.map_err(|e| {
            if std::time::Instant::now() >= deadline {
                self.fail(
                    "query",
                    format!("stopped after {:.1} s (--timeout)", timeout.as_secs_f64()),
                )
            } else {
                self.fail("query", e)
            }
        })?;
        let cols: Vec<String> = rows
            .first()
            .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut line = Vec::with_capacity(cols.len());
            for i in 0..cols.len() {
                let raw = r.try_get_raw(i).map_err(|e| self.fail("query", e))?;
                let text = if raw.is_null() {
                    "NULL".to_string()
                } else {
                    match raw.type_info().name() {
                        "INTEGER" | "BOOLEAN" => r
                            .try_get::<i64, _>(i)
                            .map(|v| v.to_string())
                            .map_err(|e| self.fail("query", e))?,
                        "REAL" => r
                            .try_get::<f64, _>(i)
                            .map(|v| v.to_string())
                            .map_err(|e| self.fail("query", e))?,
                        "BLOB" => format!(
                            "<{} bytes>",
                            r.try_get::<Vec<u8>, _>(i)
                                .map_err(|e| self.fail("query", e))?
                                .len()
                        ),
                        _ => r.try_get::<String, _>(i).map_err(|e| self.fail("query", e))?,
                    }
                };
                line.push(text);
            }
            out.push(line);
        }
        Ok((cols, out))
    }
}

/// The first statement of `sql` that SQLite does not call read-only, as
/// written; statements are prepared (never run) one after another.
fn writing_statement(
    db: std::ptr::NonNull<libsqlite3_sys::sqlite3>,
    sql: &str,
) -> std::result::Result<Option<String>, String> {
    use libsqlite3_sys as ffi;
    use std::os::raw::{c_char, c_int};
    let bytes = sql.as_bytes();
    let mut at = 0usize;
    while at < bytes.len() {
        let mut stmt: *mut ffi::sqlite3_stmt = std::ptr::null_mut();
        let mut tail: *const c_char = std::ptr::null();
        let rest = &bytes[at..];
        let len = c_int::try_from(rest.len()).map_err(|_| "the SQL text is too long".to_string())?;
        // SAFETY: `db` is the locked connection's live handle; `rest` is a
        // valid buffer of `len` bytes (not necessarily NUL-terminated, which
        // prepare allows when given the length); `tail` points into it.
        unsafe {
            let rc = ffi::sqlite3_prepare_v2(db.as_ptr(), rest.as_ptr().cast(), len, &mut stmt, &mut tail);
            if rc != ffi::SQLITE_OK {
                let msg = std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr()));
                return Err(msg.to_string_lossy().into_owned());
            }
            let used = if tail.is_null() {
                rest.len()
            } else {
                tail.offset_from(rest.as_ptr().cast()) as usize
            };
            if stmt.is_null() {
                // only whitespace or comments were left
                break;
            }
            let read_only = ffi::sqlite3_stmt_readonly(stmt) != 0;
            ffi::sqlite3_finalize(stmt);
            if !read_only {
                let text = String::from_utf8_lossy(&rest[..used]).trim().to_string();
                return Ok(Some(text));
            }
            at += used.max(1);
        }
    }
    Ok(None)
}
