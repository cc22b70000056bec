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
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Column, Row, SqlitePool, TypeInfo, ValueRef};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
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

/// Filters for listing runs.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    pub suite: Option<String>,
    pub variant: Option<String>,
    pub status: Option<Status>,
}

/// A results database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
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

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self> {
        let path_like = url
            .strip_prefix("sqlite://")
            .or(url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if let Some(dir) = Path::new(path_like)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let opts = options(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| Error::Store(format!("{url}: {e}")))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| Error::Store(format!("{url}: migrating: {e}")))?;
        Ok(Self { pool })
    }

    /// Opens an existing database read-only (for `hmsa-lab query`).
    pub async fn open_read_only(url: &str) -> Result<Self> {
        let opts = options(url)?.read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(|e| Error::Store(format!("{url}: {e}")))?;
        Ok(Self { pool })
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
        .map_err(db_err)?;
        Ok(())
    }

    /// The suite's baseline variant name.
    pub async fn suite_baseline(&self, name: &str) -> Result<Option<String>> {
        let r = sqlx::query("SELECT baseline FROM suites WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
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
        .map_err(db_err)?;
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
        .map_err(db_err)?;
        Ok(r.as_ref().map(run_row))
    }

    /// Claims a run for `who`: one conditional UPDATE, so of two processes
    /// only one succeeds. A RUNNING run is taken over when its heartbeat is
    /// older than `stale_ms`; FINISHED runs are claimed only with `force`.
    pub async fn claim(
        &self,
        id: i64,
        who: &str,
        stale_ms: i64,
        force: bool,
        prov: &Provenance,
    ) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            r#"UPDATE runs SET status = 'RUNNING', claimed_by = ?, heartbeat_ms = ?,
                   start_ms = COALESCE(start_ms, ?), end_ms = NULL, error = NULL,
                   git_commit = ?, git_dirty = ?, host = ?, versions = ?
               WHERE id = ? AND (status IN ('SCHEDULED', 'KILLED', 'FAILED')
                   OR (status = 'RUNNING' AND (heartbeat_ms IS NULL OR heartbeat_ms < ?))
                   OR (status = 'FINISHED' AND ?))"#,
        )
        .bind(who)
        .bind(now)
        .bind(now)
        .bind(&prov.git_commit)
        .bind(prov.git_dirty.map(i64::from))
        .bind(&prov.host)
        .bind(&prov.versions)
        .bind(id)
        .bind(now - stale_ms)
        .bind(force)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
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
        .map_err(db_err)?;
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
            .map_err(db_err)?;
        Ok(())
    }

    /// Params are written once: existing keys are left as they are.
    pub async fn write_params(&self, id: i64, params: &[(String, String)]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        for (k, v) in params {
            sqlx::query("INSERT OR IGNORE INTO params (run_id, key, value) VALUES (?, ?, ?)")
                .bind(id)
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    /// Per-step metrics; a step recomputed after a resume replaces its row.
    pub async fn log_metrics(&self, id: i64, rows: &[(&str, i64, f64)]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
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
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    /// Evaluations already recorded for a run: (scales, fusion, flip).
    pub async fn evaluated(&self, id: i64) -> Result<Vec<(String, String, bool)>> {
        let rows = sqlx::query("SELECT scales, fusion, flip FROM evaluations WHERE run_id = ?")
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
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
        let mut tx = self.pool.begin().await.map_err(db_err)?;
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
            .map_err(db_err)?;
        }
        for (kind, path, digest) in artifacts {
            sqlx::query("DELETE FROM artifacts WHERE run_id = ? AND kind = ? AND path = ?")
                .bind(id)
                .bind(kind)
                .bind(path)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
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
            .map_err(db_err)?;
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
        .map_err(db_err)?;
        if r.rows_affected() != 1 {
            return Err(Error::Store(format!(
                "run {id} is no longer held by this process"
            )));
        }
        tx.commit().await.map_err(db_err)
    }

    pub async fn runs(&self, f: &RunFilter) -> Result<Vec<RunRow>> {
        let rows = sqlx::query(
            r#"SELECT * FROM runs WHERE (?1 IS NULL OR suite = ?1) AND (?2 IS NULL OR variant = ?2)
               AND (?3 IS NULL OR status = ?3) ORDER BY id"#,
        )
        .bind(&f.suite)
        .bind(&f.variant)
        .bind(f.status.map(|s| s.as_str()))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(rows.iter().map(run_row).collect())
    }

    pub async fn run(&self, id: i64) -> Result<Option<RunRow>> {
        let r = sqlx::query("SELECT * FROM runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(r.as_ref().map(run_row))
    }

    pub async fn evaluations(&self, run_id: i64) -> Result<Vec<EvalRow>> {
        let rows = sqlx::query("SELECT * FROM evaluations WHERE run_id = ? ORDER BY id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
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
            .map_err(db_err)?;
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
                .map_err(db_err)?;
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
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get("kind"), r.get("path"), r.get("digest")))
            .collect())
    }

    /// Deletes runs (with their params, metrics and evaluations); their
    /// artifacts stay until `gc`.
    pub async fn delete_runs(&self, ids: &[i64]) -> Result<u64> {
        let mut n = 0;
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        for id in ids {
            n += sqlx::query("DELETE FROM runs WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?
                .rows_affected();
        }
        tx.commit().await.map_err(db_err)?;
        Ok(n)
    }

    /// Artifacts whose run is gone: (id, path).
    pub async fn orphan_artifacts(&self) -> Result<Vec<(i64, String)>> {
        let rows = sqlx::query(
            "SELECT id, path FROM artifacts WHERE run_id IS NULL OR run_id NOT IN (SELECT id FROM runs)",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(rows.iter().map(|r| (r.get("id"), r.get("path"))).collect())
    }

    pub async fn delete_artifact(&self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM artifacts WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Run folders the database still refers to.
    pub async fn run_dirs(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT run_dir FROM runs")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(rows.iter().map(|r| r.get("run_dir")).collect())
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
        .map_err(db_err)?;
        Ok(())
    }

    /// Benchmarks of one suite, oldest first.
    pub async fn benchmarks(&self, suite: &str) -> Result<Vec<BenchRow>> {
        let rows = sqlx::query("SELECT * FROM benchmarks WHERE suite = ? ORDER BY id")
            .bind(suite)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
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

    /// Runs any SQL and returns column names and rows rendered as text. On
    /// a read-only store a write fails with SQLite's own error.
    pub async fn query(&self, sql: &str) -> Result<(Vec<String>, Vec<Vec<String>>)> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let cols: Vec<String> = rows
            .first()
            .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut line = Vec::with_capacity(cols.len());
            for i in 0..cols.len() {
                let raw = r.try_get_raw(i).map_err(db_err)?;
                let text = if raw.is_null() {
                    "NULL".to_string()
                } else {
                    match raw.type_info().name() {
                        "INTEGER" | "BOOLEAN" => {
                            r.try_get::<i64, _>(i).map(|v| v.to_string()).map_err(db_err)?
                        }
                        "REAL" => r.try_get::<f64, _>(i).map(|v| v.to_string()).map_err(db_err)?,
                        "BLOB" => format!("<{} bytes>", r.try_get::<Vec<u8>, _>(i).map_err(db_err)?.len()),
                        _ => r.try_get::<String, _>(i).map_err(db_err)?,
                    }
                };
                line.push(text);
            }
            out.push(line);
        }
        Ok((cols, out))
    }
}
