//! hmsa-lab: *Hierarchical Multi-Scale Attention for Semantic Segmentation*
//! (Tao, Sapra, Catanzaro 2020, arXiv 2005.10821) in candle, and the harness
//! that reproduces its ablations.
//!
//! Data flows one way: config → data → model → train → eval → store → report.
//! This crate is the library; `src/main.rs` is the `hmsa-lab` command line.

pub mod autolabel;
pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod lab;
pub mod model;
pub mod report;
pub mod store;
pub mod train;

pub use error::{Error, Result};
