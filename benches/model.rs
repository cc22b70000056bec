//! `cargo bench --bench model`: forward latency and peak memory per preset,
//! fusion and scale set. Not a test: it asserts nothing and prints a table.
//!
//! Sizes: the small preset at 256x512; w48 at 256x512 by default (a 1024x2048
//! w48 forward takes minutes on 2 cores: set HMSA_BENCH_W48=1024x2048).

use hmsa_lab::bench::time_forward;
use hmsa_lab::model::{Fusion, Precision};

fn size_from_env(var: &str, default: (usize, usize)) -> (usize, usize) {
    std::env::var(var)
        .ok()
        .and_then(|s| {
            let (h, w) = s.split_once('x')?;
            Some((h.parse().ok()?, w.parse().ok()?))
        })
        .unwrap_or(default)
}

type Case = (&'static str, (usize, usize), usize, Fusion, Vec<f64>, bool);

fn cases() -> Vec<Case> {
    let small = size_from_env("HMSA_BENCH_SMALL", (256, 512));
    let w48 = size_from_env("HMSA_BENCH_W48", (256, 512));
    let mut v: Vec<Case> = vec![
        (Fusion::Single, vec![1.0], false),
        (Fusion::Single, vec![1.0], true),
        (Fusion::Average, vec![0.5, 1.0, 2.0], false),
        (Fusion::Max, vec![0.5, 1.0, 2.0], false),
        (Fusion::Explicit, vec![0.5, 1.0, 2.0], false),
        (Fusion::Hierarchical, vec![0.5, 1.0], false),
        (Fusion::Hierarchical, vec![0.5, 1.0, 2.0], false),
        (Fusion::Hierarchical, vec![0.25, 0.5, 1.0, 2.0], false),
    ]
    .into_iter()
    .map(|(f, s, flip)| ("small", small, 5, f, s, flip))
    .collect();
    v.push(("w48", w48, 1, Fusion::Single, vec![1.0], false));
    v.push(("w48", w48, 1, Fusion::Hierarchical, vec![0.5, 1.0], false));
    v
}

/// Each case runs in a child process of this binary, so that its peak
/// memory is its own (the allocator keeps freed memory mapped).
fn main() -> hmsa_lab::Result<()> {
    hmsa_lab::setup_cpu();
    let cases = cases();
    if let Ok(i) = std::env::var("HMSA_BENCH_CASE") {
        let (preset, size, reps, fusion, scales, flip) = &cases[i.parse::<usize>().expect("case index")];
        let r = time_forward(preset, *fusion, scales, *flip, *size, Precision::F32, *reps)?;
        println!(
            "{:<6} {:<13} {:<20} {:<5} {:>9} {:>10.1} {:>10.1} {:>5} {:>10}",
            r.preset,
            r.fusion.name(),
            r.scales,
            r.flip,
            format!("{}x{}", size.0, size.1),
            r.min_ms,
            r.median_ms,
            r.reps,
            r.peak_mib.map_or("n/a".into(), |m| format!("{m:.0}")),
        );
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    println!("# forward (inference, batch 1), {threads} threads, f32 CPU; one process per row");
    println!(
        "{:<6} {:<13} {:<20} {:<5} {:>9} {:>10} {:>10} {:>5} {:>10}",
        "preset", "fusion", "scales", "flip", "size", "min ms", "median ms", "reps", "peak MiB"
    );
    let exe = std::env::current_exe().expect("own path");
    for i in 0..cases.len() {
        let out = std::process::Command::new(&exe)
            .env("HMSA_BENCH_CASE", i.to_string())
            .output()
            .expect("run a case");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}
