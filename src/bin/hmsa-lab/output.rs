//! Printing for people and programs: [`Listing`] (table, markdown, CSV
//! or JSON from the same rows).

use crate::cli::Format;
use anyhow::Result;
use hmsa_lab::report;

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
            Format::Table => println!("{}", report::terminal_table(&self.head, &self.text)),
            Format::Md => print!("{}", report::markdown_table(&self.head, &self.text)),
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
                println!("{}", serde_json::to_string_pretty(&v)?);
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
