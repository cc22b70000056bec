//! The library's error type. Every variant names the file, field or tensor at
//! fault, so the binary can print it as it is.

use std::path::PathBuf;

/// Errors the library returns; the binary wraps them with `anyhow` context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file operation failed: `op` is what was being done (`reading`,
    /// `writing`, `creating`, …). The OS error is part of the message and
    /// not a `source`, so that a printed chain shows it once.
    #[error("{op} {path}: {err}")]
    Io {
        op: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },

    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// An invalid value in a configuration, named by its key path.
    #[error("invalid `{field}`: {msg}")]
    Invalid { field: String, msg: String },

    /// A run this process was training was taken over by another (its
    /// heartbeat had gone stale, e.g. while the process was stopped); this
    /// process stopped before writing anything more.
    #[error(
        "run {run}: another process holds it now (this one's heartbeat went stale); stopped without writing"
    )]
    LostClaim { run: i64 },

    #[error("checkpoint {path} does not fit the model:\n{report}")]
    CheckpointMismatch { path: PathBuf, report: String },

    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },

    /// A report or figure could not be written.
    #[error("report: {0}")]
    Report(String),

    /// The results database refused an operation.
    #[error("results database: {0}")]
    Store(String),

    /// The loss became NaN or infinite: the run stops here.
    #[error("the loss is {value} at step {step}: training diverged (lower train.optim.lr?)")]
    NonFinite { step: usize, value: f32 },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            err: source,
        }
    }
}

/// Parses TOML into `T` and validates it; every failure names `path` (and,
/// from toml, the line and key).
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
    validate: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let config_err = |msg: String| Error::Config {
        path: path.to_path_buf(),
        msg,
    };
    let cfg: T = toml::from_str(text).map_err(|e| config_err(e.to_string()))?;
    validate(&cfg).map_err(|e| config_err(e.to_string()))?;
    Ok(cfg)
}
