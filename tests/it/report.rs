//! The report's numbers, recomputed from the database's rows by another
//! route: means and sample standard deviations by the two-pass formula,
//! Welch's p by numerical integration of Student's t density (the report
//! uses the regularised incomplete beta function), medians of the raw
//! `step_secs` rows. Then compared with `index.json` and with the cells of
//! `index.md` and the README section.

use super::lab::sqlite;
use std::collections::BTreeMap;
use std::path::Path;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation (n − 1), two-pass.
fn sd(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// ∫ of (1 + x²/ν)^(−(ν+1)/2) from `from` to ∞, by Simpson's rule after
/// x = u / (1 − u).
fn t_tail(from: f64, nu: f64) -> f64 {
    let g = |u: f64| {
        if u >= 1.0 {
            return 0.0;
        }
        let x = u / (1.0 - u);
        (1.0 + x * x / nu).powf(-(nu + 1.0) / 2.0) / ((1.0 - u) * (1.0 - u))
    };
    let a = from / (1.0 + from);
    let n = 200_000;
    let h = (1.0 - a) / n as f64;
    let mut s = g(a) + g(1.0);
    for i in 1..n {
        let w = if i % 2 == 1 { 4.0 } else { 2.0 };
        s += w * g(a + i as f64 * h);
    }
    s * h / 3.0
}

/// Welch's two-sided p, from its definition.
fn welch_p(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (va, vb) = (sd(a).powi(2) / a.len() as f64, sd(b).powi(2) / b.len() as f64);
    if va + vb == 0.0 {
        return None;
    }
    let t = (mean(a) - mean(b)) / (va + vb).sqrt();
    let nu = (va + vb).powi(2) / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
    Some(t_tail(t.abs(), nu) / t_tail(0.0, nu))
}

#[test]
fn the_numerical_t_tail_matches_t_tables() {
    // two-sided 0.05 critical values: ν = 1: 12.706, ν = 2: 4.303, ν = 10: 2.228
    for (t, nu) in [(12.706, 1.0), (4.303, 2.0), (2.228, 10.0)] {
        let p = t_tail(t, nu) / t_tail(0.0, nu);
        assert!((p - 0.05).abs() < 2e-4, "ν {nu}: {p}");
    }
}

type Key = (String, String, String, bool);

/// mIoU values of every finished evaluation, grouped by (variant, scales,
/// fusion, flip), straight from the evaluations table.
fn groups(db: &Path) -> BTreeMap<Key, Vec<f64>> {
    let out = sqlite(
        db,
        "SELECT r.variant, e.scales, e.fusion, e.flip, e.miou FROM evaluations e JOIN runs r ON r.id = e.run_id \
         WHERE r.status = 'FINISHED' AND r.removed_ms IS NULL ORDER BY r.id",
    );
    let mut g: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
    for line in out.lines().skip(1) {
        // scales hold commas: quoted by the CSV writer
        let mut cells = vec![];
        let mut cur = String::new();
        let mut quoted = false;
        for ch in line.chars() {
            match ch {
                '"' => quoted = !quoted,
                ',' if !quoted => cells.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        cells.push(cur);
        let key = (
            cells[0].clone(),
            cells[1].clone(),
            cells[2].clone(),
            cells[3] == "1",
        );
        g.entry(key).or_default().push(cells[4].parse().unwrap());
    }
    g
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: report {a}, recomputed {b}");
}

/// Checks `rep/index.json` and `rep/index.md` (and the README section in
/// `readme`) against the database `db` of a suite whose baseline is
/// `baseline`.
pub(crate) fn check_report_numbers(db: &Path, rep: &Path, readme: &str, baseline: &str) {
    let g = groups(db);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("index.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(rep.join("index.md")).unwrap();
    let evals = json["evaluations"].as_array().unwrap();
    assert_eq!(evals.len(), g.len(), "one row per evaluation");
    for row in evals {
        let k = &row["key"];
        let key: Key = (
            k["variant"].as_str().unwrap().into(),
            k["scales"].as_str().unwrap().into(),
            k["fusion"].as_str().unwrap().into(),
            k["flip"].as_bool().unwrap(),
        );
        let v = &g[&key];
        let what = format!("{key:?}");
        close(row["mean"].as_f64().unwrap(), mean(v), 1e-12, &what);
        close(row["std"].as_f64().unwrap(), sd(v), 1e-12, &what);
        assert_eq!(row["n"].as_u64().unwrap() as usize, v.len());
        // Δ and p against the baseline's same evaluation.
        let base = g.get(&(baseline.to_string(), key.1.clone(), key.2.clone(), key.3));
        if let (Some(b), false) = (base, key.0 == baseline) {
            close(row["delta"].as_f64().unwrap(), mean(v) - mean(b), 1e-12, &what);
            match welch_p(v, b) {
                Some(p) => close(row["p"].as_f64().unwrap(), p, 1e-6, &what),
                None => assert!(row["p"].is_null(), "{what}"),
            }
            // The Markdown row shows the same numbers.
            let cells = format!(
                "| {} | {} | {} | {} | {:.2} ± {:.2} | {} | {:+.2} |",
                key.0,
                key.1,
                key.2,
                if key.3 { "yes" } else { "no" },
                100.0 * mean(v),
                100.0 * sd(v),
                v.len(),
                100.0 * (mean(v) - mean(b)),
            );
            assert!(md.contains(&cells), "{cells} not in index.md");
        }
    }
    // The paper's effects: differences of two evaluations, in points.
    let effects = json["effects"].as_array().unwrap();
    assert!(!effects.is_empty());
    let ev = |variant: &str, scales: &str, fusion: &str| {
        g[&(variant.to_string(), scales.to_string(), fusion.to_string(), false)].clone()
    };
    let expected = [
        (
            "explicit − averaging",
            ("explicit", "0.5,1.0,2.0", "explicit"),
            ("baseline", "0.5,1.0,2.0", "average"),
        ),
        (
            "hierarchical − averaging",
            ("hierarchical", "0.5,1.0,2.0", "hierarchical"),
            ("baseline", "0.5,1.0,2.0", "average"),
        ),
        (
            "adding 0.25x to averaging",
            ("baseline", "0.25,0.5,1.0,2.0", "average"),
            ("baseline", "0.5,1.0,2.0", "average"),
        ),
        (
            "+ MS attention + auto-labelling",
            ("hierarchical+auto", "0.5,1.0,2.0", "hierarchical"),
            ("baseline", "0.5,1.0,2.0", "average"),
        ),
    ];
    for (name, a, b) in expected {
        let e = effects
            .iter()
            .find(|e| e["effect"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("effect {name} missing"));
        let (va, vb) = (ev(a.0, a.1, a.2), ev(b.0, b.1, b.2));
        let delta = 100.0 * (mean(&va) - mean(&vb));
        let se = 100.0 * (sd(&va).powi(2) / va.len() as f64 + sd(&vb).powi(2) / vb.len() as f64).sqrt();
        close(e["delta"].as_f64().unwrap(), delta, 1e-10, name);
        close(e["se"].as_f64().unwrap(), se, 1e-10, name);
        if let Some(p) = welch_p(&va, &vb) {
            close(e["p"].as_f64().unwrap(), p, 1e-6, name);
        }
        // seeds a side for p < 0.05 at 80% power, where given: the
        // two-sample size (1.959964 + 0.841621)² (sa² + sb²) / δ², in points
        if let Some(n) = e["seeds_needed"].as_u64() {
            let var = 1e4 * (sd(&va).powi(2) + sd(&vb).powi(2));
            let want = ((2.8015852f64).powi(2) * var / delta.powi(2)).ceil().max(2.0);
            assert_eq!(n as f64, want, "{name}");
        }
        let cell = format!("{delta:+.2} ± {se:.2}");
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| {name}")))
            .unwrap_or_else(|| panic!("{name} row"));
        assert!(line.contains(&cell), "{line} lacks {cell}");
        let rline = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {name}")))
            .unwrap_or_else(|| panic!("{name} row in the README section"));
        assert_eq!(rline, line, "the README shows what the report shows");
    }
    // Training cost: the median and the per-run sum of `step_secs`.
    let out = sqlite(
        db,
        "SELECT r.variant, m.value FROM metrics m JOIN runs r ON r.id = m.run_id \
         WHERE m.key = 'step_secs' AND m.value IS NOT NULL AND r.removed_ms IS NULL",
    );
    let mut secs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for l in out.lines().skip(1) {
        let (v, x) = l.rsplit_once(',').unwrap();
        secs.entry(v.trim_matches('"').to_string())
            .or_default()
            .push(x.parse().unwrap());
    }
    let runs_of = |v: &str| -> f64 {
        sqlite(
            db,
            &format!("SELECT COUNT(*) FROM runs WHERE variant = '{v}' AND removed_ms IS NULL"),
        )
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
    };
    let median = |v: &str| {
        let mut x = secs[v].clone();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    for c in json["costs"].as_array().unwrap() {
        let v = c["variant"].as_str().unwrap();
        close(c["median_step_s"].as_f64().unwrap(), median(v), 1e-12, v);
        close(
            c["seconds_per_run"].as_f64().unwrap(),
            secs[v].iter().sum::<f64>() / runs_of(v),
            1e-9,
            v,
        );
        close(
            c["vs_baseline"].as_f64().unwrap(),
            median(v) / median(baseline),
            1e-12,
            v,
        );
    }
    let ratio = format!(
        "explicit {{0.5, 1.0, 2.0}} / hierarchical {{0.5, 1.0}} = {:.2}x",
        median("explicit") / median("hierarchical")
    );
    assert!(md.contains(&ratio), "{ratio} not in index.md");
    assert!(readme.contains(&ratio), "{ratio} not in the README section");
}
