//! Printing for people and programs: [`Listing`] (table, markdown, CSV
//! or JSON from the same rows), and [`outln!`]/[`out!`], the binary's only
//! way to standard output.

use crate::cli::Format;
use anyhow::Result;
use hmsa_lab::report;

/// `println!` that returns an error instead of panicking when standard
/// output fails: a closed pipe (`hmsa-lab runs | head -1`) ends the
/// command quietly in `main` (as coreutils and ripgrep do), anything else
/// (a full disk) is an error naming standard output.
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($t:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($t)*)))
    };
}

/// `print!` as [`outln!`] does it.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::output::write_out(format_args!($($t)*))
    };
}
pub(crate) use {out, outln};

/// Writes and flushes to standard output.
pub fn write_out(args: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    o.write_fmt(args)
        .and_then(|()| o.flush())
        .map_err(|e| anyhow::Error::new(e).context("writing to standard output"))
}

/// Whether `e` is, at its root, a write to a pipe whose reader has gone.
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<csv::Error>().is_some_and(
                |c| matches!(c.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe),
            )
    })
}

/// A listing: text cells for people and typed values for programs, row by row.
pub struct Listing {
    head: Vec<String>,
    text: Vec<Vec<String>>,
    keys: Vec<String>,
    values: Vec<Vec<serde_json::Value>>,
}

impl Listing {
    pub fn new(head: &[&str], keys: &[&str]) -> Self {
        Listing {
            head: head.iter().map(|s| s.to_string()).collect(),
            text: vec![],
            keys: keys.iter().map(|s| s.to_string()).collect(),
            values: vec![],
        }
    }

    pub fn push(&mut self, text: Vec<String>, values: Vec<serde_json::Value>) {
        self.text.push(text);
        self.values.push(values);
    }

    pub fn print(&self, format: Format) -> Result<()> {
        match format {
            Format::Table => outln!("{}", report::terminal_table(&self.head, &self.text))?,
            Format::Md => out!("{}", report::markdown_table(&self.head, &self.text))?,
            Format::Csv => {
                let mut w = csv::Writer::from_writer(std::io::stdout());
                w.write_record(&self.keys)?;
                for r in &self.values {
                    w.write_record(r.iter().map(|v| match v {
                        serde_json::Value::Null => String::new(),
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }))?;
                }
                w.flush()?;
            }
            Format::Json => {
                let v: Vec<serde_json::Map<String, serde_json::Value>> = self
                    .values
                    .iter()
                    .map(|r| self.keys.iter().cloned().zip(r.iter().cloned()).collect())
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&v)?)?;
            }
        }
        Ok(())
    }
}

/// A typed value as table text.
pub fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "NULL".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
