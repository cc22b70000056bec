//! The results store: SQLite (embedded, the default) or PostgreSQL (for
//! many machines) through sqlx's `Any` driver, one set of statements for
//! both (`$N` parameters, `ON CONFLICT` upserts); migrations per engine in
//! `migrations/sqlite/` and `migrations/postgres/`, applied on open
//! (`open.rs` says who may create, migrate or only read). This is the only
//! module that speaks SQL; everything else passes the typed rows defined
//! here. The store owns its async runtime and shows a synchronous face.
//!
//! Consistency under interruption: every write is one statement or one
//! transaction, so a kill at any moment leaves either the old or the new row.
//! A run is claimed by one conditional UPDATE (SCHEDULED, KILLED, FAILED, or
//! RUNNING with a stale heartbeat or a dead holder), so two processes never
//! run it twice; its evaluations, artifacts and FINISHED status land in one
//! transaction. The same on both engines (tests run on both).

mod open;
mod query;

use crate::config::EvalKey;
use crate::eval::metrics::Confusion;
use crate::eval::EvalResult;
use crate::model::{Fusion, Scales};
use crate::{Error, Result};
use open::Mode;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, FromRow, Row};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use query::Table;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A run's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
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

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The engine behind a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
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
    pub status: Status,
    pub step: i64,
    pub heartbeat_ms: Option<i64>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub host: Option<String>,
    pub versions: Option<String>,
    pub run_dir: PathBuf,
    pub error: Option<String>,
    /// Who holds (or last held) it: `host:pid:start_ms`.
    pub claimed_by: Option<String>,
    /// When `rm` removed it (it is restorable until `gc` purges it).
    pub removed_ms: Option<i64>,
}

/// One row of `evaluations`.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRow {
    pub run_id: i64,
    /// Stored as text (`0.5,1.0`), and written so in JSON.
    #[serde(serialize_with = "crate::model::scales::as_text")]
    pub scales: Scales,
    pub fusion: Fusion,
    pub flip: bool,
    pub miou: f64,
    pub pixel_acc: f64,
    pub mean_class_acc: f64,
    pub fw_iou: f64,
    /// One entry per class (None where the class is absent). The four
    /// fields below are JSON text in the database, decoded here.
    pub class_iou: Vec<Option<f64>>,
    pub confusion: Confusion,
    /// Per scale (high to low), the mean weight the fusion gave it.
    pub attn_means: Vec<(f64, f64)>,
    /// Per scale, per class, the mean attention weight.
    pub attn_class_means: Vec<(f64, Vec<Option<f64>>)>,
    pub ms_per_image: f64,
    pub peak_mib: Option<f64>,
    pub images: i64,
}

/// What a file a run produced is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// `model.safetensors`, the trained weights.
    Weights,
    /// The attention maps of an evaluation (`eval::write_attention`).
    Attention,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Weights => "weights",
            ArtifactKind::Attention => "attention",
        }
    }
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ArtifactKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "weights" => Ok(ArtifactKind::Weights),
            "attention" => Ok(ArtifactKind::Attention),
            _ => Err(format!("unknown artifact kind `{s}`")),
        }
    }
}

/// A file a run produced, with its blake3 digest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Artifact {
    pub kind: ArtifactKind,
    pub path: String,
    pub digest: String,
}

impl Artifact {
    /// Whether this is one of the attention-map files of evaluation `key`
    /// (`…/attention/<tag>/<i>_<image>.safetensors`, see
    /// `eval::write_attention`) and the file is still there.
    pub fn is_attention_of(&self, key: &EvalKey) -> bool {
        let p = std::path::Path::new(&self.path);
        self.kind == ArtifactKind::Attention
            && p.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str())
                == Some(crate::eval::attention_tag(key).as_str())
            && p.exists()
    }
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

impl<'r> FromRow<'r, AnyRow> for RunRow {
    fn from_row(r: &'r AnyRow) -> sqlx::Result<Self> {
        let status: String = r.try_get("status")?;
        Ok(RunRow {
            id: r.try_get("id")?,
            suite: r.try_get("suite")?,
            variant: r.try_get("variant")?,
            config_json: r.try_get("config_json")?,
            config_hash: r.try_get("config_hash")?,
            seed: r.try_get("seed")?,
            status: Status::parse(&status).map_err(|e| sqlx::Error::Decode(e.to_string().into()))?,
            step: r.try_get("step")?,
            heartbeat_ms: r.try_get("heartbeat_ms")?,
            start_ms: r.try_get("start_ms")?,
            end_ms: r.try_get("end_ms")?,
            git_commit: r.try_get("git_commit")?,
            git_dirty: r.try_get::<Option<i64>, _>("git_dirty")?.map(|v| v != 0),
            host: r.try_get("host")?,
            versions: r.try_get("versions")?,
            run_dir: PathBuf::from(r.try_get::<String, _>("run_dir")?),
            error: r.try_get("error")?,
            claimed_by: r.try_get("claimed_by")?,
            removed_ms: r.try_get("removed_ms")?,
        })
    }
}

/// A text column parsed into its type; a value this program did not
/// write is a decode error naming it.
fn decode<T>(v: std::result::Result<T, String>) -> sqlx::Result<T> {
    v.map_err(|e| sqlx::Error::Decode(e.into()))
}

/// A JSON text column decoded into its type.
fn json<T: serde::de::DeserializeOwned>(text: String) -> sqlx::Result<T> {
    serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(e.into()))
}

impl EvalRow {
    /// Which evaluation this row is.
    pub fn key(&self) -> EvalKey {
        EvalKey {
            scales: self.scales.clone(),
            fusion: self.fusion,
            flip: self.flip,
        }
    }
}

impl<'r> FromRow<'r, AnyRow> for EvalRow {
    fn from_row(r: &'r AnyRow) -> sqlx::Result<Self> {
        Ok(EvalRow {
            run_id: r.try_get("run_id")?,
            scales: decode(r.try_get::<String, _>("scales")?.parse())?,
            fusion: decode(r.try_get::<String, _>("fusion")?.parse())?,
            flip: r.try_get::<i64, _>("flip")? != 0,
            miou: r.try_get("miou")?,
            pixel_acc: r.try_get("pixel_acc")?,
            mean_class_acc: r.try_get("mean_class_acc")?,
            fw_iou: r.try_get("fw_iou")?,
            class_iou: json(r.try_get("class_iou")?)?,
            confusion: json(r.try_get("confusion")?)?,
            attn_means: json(r.try_get("attn_means")?)?,
            attn_class_means: json(r.try_get("attn_class_means")?)?,
            ms_per_image: r.try_get("ms_per_image")?,
            peak_mib: r.try_get("peak_mib")?,
            images: r.try_get("images")?,
        })
    }
}

impl<'r> FromRow<'r, AnyRow> for BenchRow {
    fn from_row(r: &'r AnyRow) -> sqlx::Result<Self> {
        Ok(BenchRow {
            suite: r.try_get("suite")?,
            name: r.try_get("name")?,
            params: r.try_get("params")?,
            min_ms: r.try_get("min_ms")?,
            median_ms: r.try_get("median_ms")?,
            peak_mib: r.try_get("peak_mib")?,
            value: r.try_get("value")?,
            unit: r.try_get("unit")?,
            threads: r.try_get("threads")?,
            machine: r.try_get("machine")?,
        })
    }
}

/// A results database, with its own runtime: every method blocks.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
    /// The URL or path it was opened with (password hidden), for messages.
    url: String,
    /// The URL as given, for `query` on SQLite.
    raw_url: String,
    rt: Arc<tokio::runtime::Runtime>,
}

fn runtime() -> Result<Arc<tokio::runtime::Runtime>> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Store(format!("starting the store's runtime: {e}")))
}

impl Store {
    fn open_as(url: &str, mode: Mode) -> Result<Self> {
        let rt = runtime()?;
        let pool = rt.block_on(open::open(url, mode))?;
        Ok(Self {
            pool,
            engine: open::engine_of(url),
            url: open::redact(url),
            raw_url: url.to_string(),
            rt,
        })
    }

    /// Opens the database at `url` for writing, creating (SQLite) and
    /// migrating it if needed: `run`, `worker`, `bench`. Another program's
    /// database is refused and left as it is.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_as(url, Mode::Create)
    }

    /// Opens an existing results database for writing (`rm`, `restore`,
    /// `gc`): nothing is created.
    pub fn open_existing(url: &str) -> Result<Self> {
        Self::open_as(url, Mode::Existing)
    }

    /// Opens an existing results database read-only (`runs`, `show`,
    /// `compare`, `report`, `query`): nothing is created or migrated; a
    /// missing database, another program's or an older schema is an error
    /// naming it.
    pub fn open_read_only(url: &str) -> Result<Self> {
        Self::open_as(url, Mode::ReadOnly)
    }

    /// `postgres://…` or a SQLite file.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The URL or path this store was opened with (password hidden).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn block<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        self.rt.block_on(f)
    }

    /// A store error naming the database and the operation.
    fn fail(&self, op: &str, e: impl std::fmt::Display) -> Error {
        Error::Store(format!("{}: {op}: {e}", self.url))
    }

    /// Where a SQLite database lives: its file's canonical path. Run
    /// folders record it beside the id, so that a copy of the file (same
    /// id, another path) is told apart from the original. `None` for
    /// PostgreSQL, whose workers may spell one server's URL differently.
    pub fn location(&self) -> Option<String> {
        let p = open::file_of(&self.raw_url).filter(|_| self.engine == Engine::Sqlite)?;
        Some(std::fs::canonicalize(&p).unwrap_or(p).display().to_string())
    }

    /// This database's identity (written once by its first migration);
    /// run folders name it in their owner file.
    pub fn id(&self) -> Result<String> {
        self.block(async {
            sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'id'")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.fail("reading its id", e))
        })
    }

    pub fn upsert_suite(&self, name: &str, description: &str, file: &str, baseline: &str) -> Result<()> {
        self.block(async {
            sqlx::query(
                r#"INSERT INTO suites (name, description, file, baseline, created_ms) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (name) DO UPDATE SET description = excluded.description,
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
        })
    }

    /// The suite's baseline variant name.
    pub fn suite_baseline(&self, name: &str) -> Result<Option<String>> {
        self.block(async {
            sqlx::query_scalar("SELECT baseline FROM suites WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.fail("reading the suite", e))
        })
    }

    /// The run row for (suite, variant, hash, seed), created SCHEDULED if new.
    pub fn ensure_run(
        &self,
        suite: &str,
        variant: &str,
        config_json: &str,
        hash: &str,
        seed: u64,
        run_dir: &str,
    ) -> Result<RunRow> {
        self.block(async {
            sqlx::query(
                // (the NOT EXISTS keeps PostgreSQL from spending an id on a
                // row that is already there)
                r#"INSERT INTO runs (suite, variant, config_json, config_hash, seed, run_dir)
                   SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM runs
                       WHERE suite = $1 AND variant = $2 AND config_hash = $4 AND seed = $5)
                   ON CONFLICT DO NOTHING"#,
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
            Ok(())
        })?;
        self.find_run(suite, variant, hash, seed)?
            .ok_or_else(|| self.fail("recording a run", "the row vanished after its insert"))
    }

    pub fn find_run(&self, suite: &str, variant: &str, hash: &str, seed: u64) -> Result<Option<RunRow>> {
        self.block(async {
            sqlx::query_as::<_, RunRow>(
                "SELECT * FROM runs WHERE suite = $1 AND variant = $2 AND config_hash = $3 AND seed = $4",
            )
            .bind(suite)
            .bind(variant)
            .bind(hash)
            .bind(seed as i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail("finding a run", e))
        })
    }

    /// Claims a run: one conditional UPDATE, so of two processes only one
    /// succeeds. Claimable are SCHEDULED, KILLED and FAILED runs; a RUNNING
    /// run whose heartbeat is stale, or whose holder is `c.dead_holder`
    /// (a process known to be gone); a FINISHED run only when it finished
    /// before `c.refinish_before_ms` (`run --force`: what another forced
    /// process finished meanwhile is not trained again). Removed runs never.
    pub fn claim(&self, id: i64, c: &Claim<'_>, prov: &Provenance) -> Result<bool> {
        let now = now_ms();
        self.block(async {
            let r = sqlx::query(
                r#"UPDATE runs SET status = 'RUNNING', claimed_by = $1, heartbeat_ms = $2,
                       start_ms = COALESCE(start_ms, $2), end_ms = NULL, error = NULL,
                       git_commit = $3, git_dirty = $4, host = $5, versions = $6
                   WHERE id = $7 AND removed_ms IS NULL AND (status IN ('SCHEDULED', 'KILLED', 'FAILED')
                       OR (status = 'RUNNING' AND (heartbeat_ms IS NULL OR heartbeat_ms < $8))
                       OR (status = 'RUNNING' AND claimed_by = $9)
                       OR (status = 'FINISHED' AND end_ms < $10))"#,
            )
            .bind(c.who)
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
        })
    }

    /// Refreshes the heartbeat (and step) of a run this process holds;
    /// `false` when it no longer holds it (another process took it over, or
    /// it was ended): the holder must then stop before writing anything.
    pub fn heartbeat(&self, id: i64, who: &str, step: Option<i64>) -> Result<bool> {
        self.block(async {
            sqlx::query(
                "UPDATE runs SET heartbeat_ms = $1, step = COALESCE($2, step) WHERE id = $3 AND claimed_by = $4 AND status = 'RUNNING'",
            )
            .bind(now_ms())
            .bind(step)
            .bind(id)
            .bind(who)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail("writing a heartbeat", e))
            .map(|r| r.rows_affected() == 1)
        })
    }

    /// Ends a run this process holds as FAILED or KILLED.
    pub fn end_run(&self, id: i64, who: &str, status: Status, error: Option<&str>) -> Result<()> {
        self.block(async {
            sqlx::query(
                "UPDATE runs SET status = $1, end_ms = $2, error = $3 WHERE id = $4 AND claimed_by = $5",
            )
            .bind(status.as_str())
            .bind(now_ms())
            .bind(error)
            .bind(id)
            .bind(who)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail("ending a run", e))?;
            Ok(())
        })
    }

    /// Params are written once: existing keys are left as they are.
    pub fn write_params(&self, id: i64, params: &[(String, String)]) -> Result<()> {
        self.block(async {
            let fail = |e| self.fail("writing params", e);
            let mut tx = self.pool.begin().await.map_err(fail)?;
            for (k, v) in params {
                sqlx::query(
                    "INSERT INTO params (run_id, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(id)
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            }
            tx.commit().await.map_err(fail)
        })
    }

    /// Per-step metrics; a step recomputed after a resume replaces its row.
    pub fn log_metrics(&self, id: i64, rows: &[(&str, i64, f64)]) -> Result<()> {
        self.block(async {
            let fail = |e| self.fail("writing metrics", e);
            let mut tx = self.pool.begin().await.map_err(fail)?;
            let now = now_ms();
            for (k, step, v) in rows {
                let nan = !v.is_finite();
                sqlx::query(
                    r#"INSERT INTO metrics (run_id, key, step, time_ms, value, is_nan) VALUES ($1, $2, $3, $4, $5, $6)
                       ON CONFLICT (run_id, key, step) DO UPDATE SET time_ms = excluded.time_ms,
                           value = excluded.value, is_nan = excluded.is_nan"#,
                )
                .bind(id)
                .bind(*k)
                .bind(*step)
                .bind(now)
                .bind(if nan { None } else { Some(*v) })
                .bind(i64::from(nan))
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            }
            tx.commit().await.map_err(fail)
        })
    }

    /// Evaluations already recorded for a run, with the number of images
    /// each was scored on (a light read: no metrics decoded).
    pub fn evaluated(&self, id: i64) -> Result<Vec<(EvalKey, i64)>> {
        self.block(async {
            let rows: Vec<(String, String, i64, i64)> =
                sqlx::query_as("SELECT scales, fusion, flip, images FROM evaluations WHERE run_id = $1")
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.fail("reading evaluations", e))?;
            rows.into_iter()
                .map(|(s, f, fl, images)| {
                    let key = EvalKey {
                        scales: decode(s.parse()).map_err(|e| self.fail("reading evaluations", e))?,
                        fusion: decode(f.parse()).map_err(|e| self.fail("reading evaluations", e))?,
                        flip: fl != 0,
                    };
                    Ok((key, images))
                })
                .collect()
        })
    }

    /// Records evaluations and artifacts and marks the run FINISHED, in one
    /// transaction.
    pub fn finish_run(
        &self,
        id: i64,
        who: &str,
        step: i64,
        evals: &[EvalResult],
        artifacts: &[Artifact],
    ) -> Result<()> {
        self.block(async {
            let fail = |e| self.fail("finishing a run", e);
            let mut tx = self.pool.begin().await.map_err(fail)?;
            let now = now_ms();
            for e in evals {
                sqlx::query(
                    r#"INSERT INTO evaluations (run_id, scales, fusion, flip, miou, pixel_acc,
                           mean_class_acc, fw_iou, class_iou, confusion, attn_means, attn_class_means,
                           ms_per_image, peak_mib, images, created_ms)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                       ON CONFLICT (run_id, scales, fusion, flip) DO UPDATE SET miou = excluded.miou,
                           pixel_acc = excluded.pixel_acc, mean_class_acc = excluded.mean_class_acc,
                           fw_iou = excluded.fw_iou, class_iou = excluded.class_iou,
                           confusion = excluded.confusion, attn_means = excluded.attn_means,
                           attn_class_means = excluded.attn_class_means,
                           ms_per_image = excluded.ms_per_image, peak_mib = excluded.peak_mib,
                           images = excluded.images, created_ms = excluded.created_ms"#,
                )
                .bind(id)
                .bind(e.set.scales.to_string())
                .bind(e.set.fusion.name())
                .bind(i64::from(e.set.flip))
                .bind(e.metrics.miou)
                .bind(e.metrics.pixel_acc)
                .bind(e.metrics.mean_class_acc)
                .bind(e.metrics.fw_iou)
                .bind(serde_json::to_string(&e.metrics.iou).expect("serialisable"))
                .bind(serde_json::to_string(&e.confusion).expect("serialisable"))
                .bind(serde_json::to_string(&e.attn_means).expect("serialisable"))
                .bind(serde_json::to_string(&e.attn_class_means).expect("serialisable"))
                .bind(e.ms_per_image)
                .bind(e.peak_mib)
                .bind(e.images as i64)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            }
            for a in artifacts {
                sqlx::query("DELETE FROM artifacts WHERE run_id = $1 AND kind = $2 AND path = $3")
                    .bind(id)
                    .bind(a.kind.as_str())
                    .bind(&a.path)
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
                sqlx::query(
                    "INSERT INTO artifacts (run_id, kind, path, digest, created_ms) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(a.kind.as_str())
                .bind(&a.path)
                .bind(&a.digest)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            }
            let r = sqlx::query(
                "UPDATE runs SET status = 'FINISHED', step = $1, end_ms = $2, heartbeat_ms = $2 WHERE id = $3 AND claimed_by = $4",
            )
            .bind(step)
            .bind(now)
            .bind(id)
            .bind(who)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
            if r.rows_affected() != 1 {
                return Err(self.fail("finishing a run", format!("run {id} is no longer held by this process")));
            }
            tx.commit().await.map_err(fail)
        })
    }

    pub fn runs(&self, f: &RunFilter) -> Result<Vec<RunRow>> {
        self.block(async {
            sqlx::query_as::<_, RunRow>(
                r#"SELECT * FROM runs WHERE (CAST($1 AS TEXT) IS NULL OR suite = $1)
                   AND (CAST($2 AS TEXT) IS NULL OR variant = $2)
                   AND (CAST($3 AS TEXT) IS NULL OR status = $3)
                   AND ($4 = 1 OR removed_ms IS NULL) ORDER BY id"#,
            )
            .bind(&f.suite)
            .bind(&f.variant)
            .bind(f.status.map(|s| s.as_str()))
            .bind(i64::from(f.removed))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("listing runs", e))
        })
    }

    pub fn run(&self, id: i64) -> Result<Option<RunRow>> {
        self.block(async {
            sqlx::query_as::<_, RunRow>("SELECT * FROM runs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.fail("reading a run", e))
        })
    }

    pub fn evaluations(&self, run_id: i64) -> Result<Vec<EvalRow>> {
        self.block(async {
            sqlx::query_as::<_, EvalRow>("SELECT * FROM evaluations WHERE run_id = $1 ORDER BY id")
                .bind(run_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.fail("reading evaluations", e))
        })
    }

    pub fn params(&self, run_id: i64) -> Result<Vec<(String, String)>> {
        self.block(async {
            sqlx::query_as("SELECT key, value FROM params WHERE run_id = $1 ORDER BY key")
                .bind(run_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.fail("reading params", e))
        })
    }

    /// (step, value) of one metric, NaN where flagged.
    pub fn metric(&self, run_id: i64, key: &str) -> Result<Vec<(i64, f64)>> {
        self.block(async {
            let rows: Vec<(i64, Option<f64>)> = sqlx::query_as(
                "SELECT step, value FROM metrics WHERE run_id = $1 AND key = $2 ORDER BY step",
            )
            .bind(run_id)
            .bind(key)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("reading a metric", e))?;
            Ok(rows
                .into_iter()
                .map(|(s, v)| (s, v.unwrap_or(f64::NAN)))
                .collect())
        })
    }

    /// The step-metric keys a run has, sorted.
    pub fn metric_keys(&self, run_id: i64) -> Result<Vec<String>> {
        self.block(async {
            sqlx::query_scalar("SELECT DISTINCT key FROM metrics WHERE run_id = $1 ORDER BY key")
                .bind(run_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.fail("reading metric keys", e))
        })
    }

    /// Artifacts of a run, in the order they were recorded.
    pub fn artifacts(&self, run_id: i64) -> Result<Vec<Artifact>> {
        self.block(async {
            let rows: Vec<(String, String, String)> =
                sqlx::query_as("SELECT kind, path, digest FROM artifacts WHERE run_id = $1 ORDER BY id")
                    .bind(run_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.fail("reading artifacts", e))?;
            rows.into_iter()
                .map(|(kind, path, digest)| {
                    Ok(Artifact {
                        kind: decode(kind.parse()).map_err(|e| self.fail("reading artifacts", e))?,
                        path,
                        digest,
                    })
                })
                .collect()
        })
    }

    /// Marks runs removed (`rm`); returns the ids it marked. A RUNNING
    /// run is marked only when `running_stale_before` is given and its
    /// heartbeat is older (`rm --force`): the check is part of the UPDATE,
    /// so a run claimed meanwhile is not removed. Removed runs keep every
    /// row and file until `gc` purges them.
    pub fn remove_runs(&self, ids: &[i64], running_stale_before: Option<i64>) -> Result<Vec<i64>> {
        self.block(async {
            let fail = |e| self.fail("removing runs", e);
            let mut done = vec![];
            let mut tx = self.pool.begin().await.map_err(fail)?;
            for id in ids {
                let n = sqlx::query(
                    r#"UPDATE runs SET removed_ms = $1 WHERE id = $2 AND removed_ms IS NULL
                       AND (status != 'RUNNING' OR (CAST($3 AS BIGINT) IS NOT NULL AND (heartbeat_ms IS NULL OR heartbeat_ms < $3)))"#,
                )
                .bind(now_ms())
                .bind(id)
                .bind(running_stale_before)
                .execute(&mut *tx)
                .await
                .map_err(fail)?
                .rows_affected();
                if n == 1 {
                    done.push(*id);
                }
            }
            tx.commit().await.map_err(fail)?;
            Ok(done)
        })
    }

    /// Brings removed runs back (`restore`); returns the ids restored.
    pub fn restore_runs(&self, ids: &[i64]) -> Result<Vec<i64>> {
        self.block(async {
            let fail = |e| self.fail("restoring runs", e);
            let mut done = vec![];
            let mut tx = self.pool.begin().await.map_err(fail)?;
            for id in ids {
                let n =
                    sqlx::query("UPDATE runs SET removed_ms = NULL WHERE id = $1 AND removed_ms IS NOT NULL")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(fail)?
                        .rows_affected();
                if n == 1 {
                    done.push(*id);
                }
            }
            tx.commit().await.map_err(fail)?;
            Ok(done)
        })
    }

    /// Deletes removed runs for good (`gc`) with their params, metrics,
    /// evaluations and artifact rows, and artifact rows whose run is gone;
    /// one transaction. Runs restored meanwhile are kept.
    pub fn purge_removed(&self, ids: &[i64]) -> Result<u64> {
        self.block(async {
            let fail = |e| self.fail("purging runs", e);
            let mut tx = self.pool.begin().await.map_err(fail)?;
            let mut n = 0;
            for id in ids {
                n += sqlx::query("DELETE FROM runs WHERE id = $1 AND removed_ms IS NOT NULL")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?
                    .rows_affected();
            }
            sqlx::query("DELETE FROM artifacts WHERE run_id IS NULL OR run_id NOT IN (SELECT id FROM runs)")
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            Ok(n)
        })
    }

    pub fn add_benchmark(&self, b: &BenchRow) -> Result<()> {
        self.block(async {
            sqlx::query(
                r#"INSERT INTO benchmarks (suite, name, params, min_ms, median_ms, peak_mib, value, unit, threads,
                       machine, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"#,
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
        })
    }

    /// Benchmarks of one suite, oldest first.
    pub fn benchmarks(&self, suite: &str) -> Result<Vec<BenchRow>> {
        self.block(async {
            sqlx::query_as::<_, BenchRow>("SELECT * FROM benchmarks WHERE suite = $1 ORDER BY id")
                .bind(suite)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.fail("reading benchmarks", e))
        })
    }

    /// Moves everything in SQLite's write-ahead log into the database file
    /// and empties the log (`wal_checkpoint(TRUNCATE)`), so that the `.db`
    /// file alone holds every result (a copy of it misses nothing). The
    /// writing commands call it when they finish; a reader or writer still
    /// busy elsewhere makes it a partial checkpoint, which is harmless.
    /// Nothing to do on PostgreSQL.
    pub fn checkpoint(&self) -> Result<()> {
        if self.engine != Engine::Sqlite {
            return Ok(());
        }
        self.block(async {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await
                .map(|_| ())
                .map_err(|e| self.fail("checkpointing its write-ahead log", e))
        })
    }

    /// Runs read-only SQL (`hmsa-lab query`): column names and rows as
    /// text. Writes are refused; a query still running after `timeout` is
    /// stopped (`query.rs` says how on each engine).
    pub fn query(&self, sql: &str, timeout: Duration) -> Result<Table> {
        self.block(async {
            match self.engine {
                Engine::Sqlite => query::sqlite(&self.raw_url, sql, timeout).await,
                Engine::Postgres => query::postgres(&self.pool, &self.url, sql, timeout).await,
            }
        })
    }
}
