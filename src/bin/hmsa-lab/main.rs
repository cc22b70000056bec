//! The `hmsa-lab` command line: parse, call the library, print the error
//! chain once. Exit codes: 0 ok; 1 a runtime error; 2 a usage error
//! (clap's); 3 the command ran and found problems (`run`/`worker`: runs
//! failed, held elsewhere or removed; `data check`: findings); 130
//! interrupted (Ctrl-C or SIGTERM, after the running run is checkpointed
//! and marked KILLED).

mod cli;
mod commands;
mod output;
mod process;
mod progress;

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Cmd, DataCmd, ExportCmd};
use commands::{bench, data, lab, manage, net, results};
use process::Exit;

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => lab::run(a),
        Cmd::Worker(a) => lab::worker(a),
        Cmd::Train(a) => lab::train(a),
        Cmd::Runs(a) => results::runs(a),
        Cmd::Show(a) => results::show(a),
        Cmd::Compare(a) => results::compare(a),
        Cmd::Query(a) => results::query(a),
        Cmd::Report(a) => results::report(a),
        Cmd::Export(ExportCmd::Mlflow(a)) => results::export_mlflow(a),
        Cmd::ImportRunx(a) => results::import_runx(a),
        Cmd::Rm(a) => manage::rm(a),
        Cmd::Restore(a) => manage::restore(a),
        Cmd::Gc(a) => manage::gc(a),
        Cmd::Infer(a) => net::infer(a),
        Cmd::Model(a) => net::model(a),
        Cmd::Eval(a) => net::eval(a),
        Cmd::Autolabel(a) => net::autolabel(a),
        Cmd::Synth(a) => data::synth(a),
        Cmd::Data(DataCmd::Check(a)) => data::data_check_cmd(a),
        Cmd::Bench(a) => bench::bench(a),
    }
}

fn main() {
    hmsa_lab::setup_cpu();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        if output::is_closed_pipe(&e) {
            // the reader has what it wanted (`| head`): nothing to report
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(match e.downcast_ref::<Exit>() {
            Some(Exit::Unfinished(_)) => 3,
            Some(Exit::Interrupted(_)) => 130,
            None => 1,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use proptest::strategy::Strategy;

    /// Every argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "hmsa-lab", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without help:\n{}",
            missing.join("\n")
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 256, ..Default::default() })]

        /// Any text given to a numeric flag either parses into its range
        /// or is refused naming the flag and the range: numbers of every
        /// size and sign, NaN and infinities, and junk.
        #[test]
        fn numeric_flags_parse_or_name_the_flag_and_range(
            v in proptest::prop_oneof![
                proptest::num::f64::ANY.prop_map(|f| f.to_string()),
                proptest::num::i128::ANY.prop_map(|i| i.to_string()),
                (0u64..700_000).prop_map(|i| i.to_string()),
                "[-+0-9eE.a-z ]{0,24}",
            ]
        ) {
            use proptest::prelude::*;
            for (args, flag, range) in [
                (&["worker", "s.toml"][..], "--poll", "0.05..=3600"),
                (&["worker", "s.toml"], "--stale-after", "15..=604800"),
                (&["run", "s.toml"], "--stale-after", "15..=604800"),
                (&["rm", "1"], "--stale-after", "15..=604800"),
                (&["query", "SELECT 1"], "--timeout", "0.01..=86400"),
                (&["run", "s.toml", "--slurm"], "--tasks", "1..=10000"),
                (&["synth"], "--stats", "1..=100000"),
            ] {
                let mut a = vec!["hmsa-lab".to_string()];
                a.extend(args.iter().map(|s| s.to_string()));
                a.push(format!("{flag}={v}"));
                if let Err(e) = Cli::try_parse_from(&a) {
                    let m = e.to_string();
                    prop_assert!(m.contains(flag) && m.contains(range), "{a:?}: {m}");
                }
            }
        }
    }
}
