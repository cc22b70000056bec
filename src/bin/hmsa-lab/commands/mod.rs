//! One module per group of subcommands; each subcommand is a function
//! taking its parsed arguments.

pub mod bench;
pub mod data;
pub mod lab;
pub mod manage;
pub mod net;
pub mod results;
