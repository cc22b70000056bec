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
}
