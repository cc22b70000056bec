//! Destructive commands, each showing what it will do and asking first:
//! `rm`, `restore`, `gc`.

use crate::cli::{GcArgs, RestoreArgs, RmArgs};
use crate::output::outln;
use crate::process::confirm;
use anyhow::{bail, Context, Result};
use hmsa_lab::store::{Status, Store};

pub fn rm(a: RmArgs) -> Result<()> {
    let RmArgs {
        runs,
        db,
        yes,
        force,
        stale_after,
    } = a;
    let store = Store::open_existing(&db.url(None)?)?;
    let stale_before = hmsa_lab::store::now_ms() - stale_after as i64 * 1000;
    let mut refused = vec![];
    let mut lines = vec![];
    for &id in &runs {
        let r = store
            .run(id)?
            .with_context(|| format!("no run {id} in {}", store.url()))?;
        if r.removed_ms.is_some() {
            bail!("run {id} is already removed (`hmsa-lab restore {id}` brings it back)");
        }
        let fresh = r.heartbeat_ms.is_some_and(|h| h >= stale_before);
        if r.status == Status::Running && (!force || fresh) {
            refused.push(format!(
                "run {id} ({} {} seed {}) is RUNNING{}, held by {}",
                r.suite,
                r.variant,
                r.seed,
                r.heartbeat_ms.map_or(String::new(), |h| format!(
                    ", last heartbeat {:.0} s ago",
                    (hmsa_lab::store::now_ms() - h) as f64 / 1000.0
                )),
                r.claimed_by.as_deref().unwrap_or("?")
            ));
        }
        lines.push(format!(
            "  run {id}: {} {} seed {} ({}, {} evaluation(s))",
            r.suite,
            r.variant,
            r.seed,
            r.status,
            store.evaluations(id)?.len()
        ));
    }
    if !refused.is_empty() {
        bail!(
            "{}\nstop it first; `--force` removes a RUNNING run only once its heartbeat is older than --stale-after ({stale_after} s)",
            refused.join("\n")
        );
    }
    outln!(
        "to remove (restorable until `hmsa-lab gc`):\n{}",
        lines.join("\n")
    )?;
    confirm(yes, &format!("remove {} run(s)", runs.len()))?;
    let done = store.remove_runs(&runs, force.then_some(stale_before))?;
    if done.len() != runs.len() {
        let missed: Vec<String> = runs
            .iter()
            .filter(|i| !done.contains(i))
            .map(i64::to_string)
            .collect();
        bail!(
            "removed {} run(s); not {} (claimed or removed meanwhile)",
            done.len(),
            missed.join(", ")
        );
    }
    let ids: Vec<String> = done.iter().map(i64::to_string).collect();
    outln!(
        "removed {} run(s); `hmsa-lab restore {}` brings them back until `hmsa-lab gc` purges them",
        done.len(),
        ids.join(" ")
    )?;
    Ok(())
}

pub fn restore(a: RestoreArgs) -> Result<()> {
    let RestoreArgs { runs, db } = a;
    let store = Store::open_existing(&db.url(None)?)?;
    let done = store.restore_runs(&runs)?;
    let missed: Vec<String> = runs
        .iter()
        .filter(|i| !done.contains(i))
        .map(i64::to_string)
        .collect();
    outln!("restored {} run(s)", done.len())?;
    if !missed.is_empty() {
        bail!(
            "not restored: {} (not removed, or purged by gc)",
            missed.join(", ")
        );
    }
    Ok(())
}

pub fn gc(a: GcArgs) -> Result<()> {
    let GcArgs { db, dry_run, yes } = a;
    let store = Store::open_existing(&db.url(None)?)?;
    let plan = hmsa_lab::gc::plan(&store)?;
    for r in &plan.purge {
        outln!(
            "purge run {} ({} {} seed {}, {}) and its rows",
            r.id,
            r.suite,
            r.variant,
            r.seed,
            r.status
        )?;
    }
    for d in &plan.folders {
        outln!("delete folder {}", d.display())?;
    }
    if !plan.foreign.is_empty() {
        outln!(
            "left alone: {} folder(s) another database owns (or this database's file at another place: a copy, or moved)",
            plan.foreign.len()
        )?;
    }
    if !plan.unowned.is_empty() {
        outln!(
            "left alone: {} folder(s) without {} (made before owners were recorded, or not by hmsa-lab)",
            plan.unowned.len(),
            hmsa_lab::gc::OWNER_FILE
        )?;
    }
    if !plan.links.is_empty() {
        outln!(
            "left alone: {} symbolic link(s) (never followed)",
            plan.links.len()
        )?;
    }
    if plan.is_empty() {
        outln!("nothing to remove")?;
        return Ok(());
    }
    if dry_run {
        outln!("(dry run: nothing changed)")?;
        return Ok(());
    }
    confirm(
        yes,
        &format!(
            "purge {} run(s) and delete {} folder(s)",
            plan.purge.len(),
            plan.folders.len()
        ),
    )?;
    let done = hmsa_lab::gc::apply(&store, &plan)?;
    outln!(
        "purged {} run(s) and deleted {} folder(s)",
        done.runs,
        done.folders
    )?;
    Ok(())
}
