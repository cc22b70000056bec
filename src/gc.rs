//! What the lab may delete, and the proof that it may.
//!
//! Every run folder holds an `owner.json` naming the database (its id, from
//! `store_meta`) and the run that made it; a folder already owned by
//! another database or run is never trained into. `hmsa-lab gc` removes a
//! folder only when its owner file names the given database and a run that
//! database no longer holds (removed with `rm`, or purged). Folders of
//! other databases, folders without an owner file (made before owners were
//! recorded, or not by hmsa-lab) and folders of live runs are never
//! touched. Paths are compared after canonicalisation, so `./runs`,
//! `runs` and an absolute path are the same folder. Symbolic links are
//! never followed: a link in a runs folder is left alone (its target may be
//! anywhere), and only a real folder directly inside the runs folder is
//! ever deleted (`rm -r` semantics: the folder's own links are removed,
//! not their targets).

use crate::store::{RunFilter, RunRow, Store};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

/// The file in each run folder that names its owner.
pub const OWNER_FILE: &str = "owner.json";

/// Who made a run folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The database's id (`store_meta`).
    pub store: String,
    /// The run's id in that database.
    pub run: i64,
    pub suite: String,
    pub variant: String,
    pub seed: u64,
    /// Where the database's SQLite file was when it took the folder
    /// ([`Store::location`]); absent for PostgreSQL and in folders taken
    /// before it was recorded. A copy of a database file keeps the id but
    /// not the place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<String>,
}

impl Owner {
    /// Whether the database with `id` at `location` took the folder: the
    /// same id, and the same place where both have one.
    pub fn is_of(&self, id: &str, location: Option<&str>) -> bool {
        self.store == id
            && match (self.db.as_deref(), location) {
                (Some(d), Some(l)) => d == l,
                _ => true,
            }
    }
}

/// The owner recorded in `dir`, if it has a readable owner file.
pub fn read_owner(dir: &Path) -> Option<Owner> {
    let text = std::fs::read_to_string(dir.join(OWNER_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Takes `dir` for `owner`'s run: creates it and writes the owner file. A
/// folder that another database or another run already owns is refused:
/// two runs never share a folder.
pub fn take_folder(dir: &Path, owner: &Owner) -> Result<()> {
    if let Some(o) = read_owner(dir) {
        if !o.is_of(&owner.store, owner.db.as_deref()) || o.run != owner.run {
            return Err(Error::Store(format!(
                "{} belongs to run {} ({} {} seed {}) of another {}: two runs never share a folder \
                 (the same suite recorded in a second database? give one of them another `runs_dir`)",
                dir.display(),
                o.run,
                o.suite,
                o.variant,
                o.seed,
                if o.store != owner.store {
                    "database".to_string()
                } else if o.run != owner.run {
                    "run of this database".to_string()
                } else {
                    format!(
                        "copy of this database (recorded at {})",
                        o.db.as_deref().unwrap_or("?")
                    )
                }
            )));
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let text = serde_json::to_string_pretty(owner).expect("serialisable");
    crate::atomic::write(&dir.join(OWNER_FILE), text)
}

/// What `gc` would do.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Removed runs whose rows are purged.
    pub purge: Vec<RunRow>,
    /// Folders this database owns for runs it no longer holds.
    pub folders: Vec<PathBuf>,
    /// Folders left alone: another database owns them, or this
    /// database's file at another place (a copy, or the original moved).
    pub foreign: Vec<PathBuf>,
    /// Folders left alone: no owner file.
    pub unowned: Vec<PathBuf>,
    /// Symbolic links left alone (never followed).
    pub links: Vec<PathBuf>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.purge.is_empty() && self.folders.is_empty()
    }
}

/// The sub-folders of every folder that holds this database's run
/// folders, canonical.
fn suite_folders(runs: &[RunRow]) -> BTreeSet<PathBuf> {
    runs.iter()
        .filter_map(|r| r.run_dir.parent().map(Path::to_path_buf))
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect()
}

fn live(runs: &[RunRow]) -> (HashSet<PathBuf>, HashSet<i64>) {
    let alive: Vec<&RunRow> = runs.iter().filter(|r| r.removed_ms.is_none()).collect();
    (
        alive
            .iter()
            .filter_map(|r| std::fs::canonicalize(&r.run_dir).ok())
            .collect(),
        alive.iter().map(|r| r.id).collect(),
    )
}

/// Works out what `gc` would remove; changes nothing.
pub fn plan(store: &Store) -> Result<Plan> {
    let id = store.id()?;
    let location = store.location();
    let runs = store.runs(&RunFilter {
        removed: true,
        ..Default::default()
    })?;
    let (live_dirs, live_ids) = live(&runs);
    let mut plan = Plan {
        purge: runs.iter().filter(|r| r.removed_ms.is_some()).cloned().collect(),
        ..Default::default()
    };
    for parent in suite_folders(&runs) {
        let entries = std::fs::read_dir(&parent).map_err(|e| Error::io("listing", &parent, e))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                plan.links.push(entry.path());
                continue;
            }
            let Ok(dir) = std::fs::canonicalize(entry.path()) else {
                continue;
            };
            if !is_real_folder_in(&dir, &parent) || live_dirs.contains(&dir) {
                continue;
            }
            match read_owner(&dir) {
                None => plan.unowned.push(dir),
                Some(o) if !o.is_of(&id, location.as_deref()) => plan.foreign.push(dir),
                Some(o) if live_ids.contains(&o.run) => {}
                Some(_) => plan.folders.push(dir),
            }
        }
    }
    Ok(plan)
}

/// Whether `dir` (canonical) is a folder itself, not a link, directly
/// inside `parent` (canonical).
fn is_real_folder_in(dir: &Path, parent: &Path) -> bool {
    dir.parent() == Some(parent) && std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
}

/// What `gc` did.
#[derive(Clone, Debug, Default)]
pub struct Done {
    pub runs: u64,
    pub folders: usize,
}

/// Carries out `plan`: purges the removed runs' rows (one transaction),
/// then removes the folders, each checked again against the database (a
/// run restored meanwhile keeps its folder).
pub fn apply(store: &Store, plan: &Plan) -> Result<Done> {
    let (id, location) = (store.id()?, store.location());
    let ids: Vec<i64> = plan.purge.iter().map(|r| r.id).collect();
    let runs = store.purge_removed(&ids)?;
    let now = store.runs(&RunFilter {
        removed: true,
        ..Default::default()
    })?;
    let (live_dirs, _) = live(&now);
    // Runs still in the database (restored, or removed after the plan) keep
    // their folders.
    let held: HashSet<i64> = now.iter().map(|r| r.id).collect();
    let mut folders = 0;
    for dir in &plan.folders {
        let owner = read_owner(dir);
        // checked again: a folder (or a folder above it) swapped for a link
        // since the plan no longer canonicalises to itself, and stays
        let inside = std::fs::canonicalize(dir).is_ok_and(|c| &c == dir)
            && dir.parent().is_some_and(|p| is_real_folder_in(dir, p));
        let keep = !inside
            || live_dirs.contains(dir)
            || owner
                .as_ref()
                .is_none_or(|o| !o.is_of(&id, location.as_deref()) || held.contains(&o.run));
        if keep {
            continue;
        }
        std::fs::remove_dir_all(dir).map_err(|e| Error::io("removing", dir, e))?;
        folders += 1;
    }
    Ok(Done { runs, folders })
}
