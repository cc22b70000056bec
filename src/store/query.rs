//! `hmsa-lab query`: read-only SQL with a time limit, on either engine.
//!
//! - SQLite: every statement is prepared first (never run) and refused
//!   unless SQLite calls it read-only (`sqlite3_stmt_readonly`): that
//!   refuses every write, and `VACUUM INTO`, which writes a new file even
//!   through a read-only connection. A progress handler interrupts a query
//!   still running after the time limit.
//! - PostgreSQL: the statement runs in a `READ ONLY` transaction (on a
//!   connection whose `default_transaction_read_only` is on) with a local
//!   `statement_timeout`, then the transaction is rolled back.

use super::open::file_of;
use crate::{Error, Result};
use sqlx::any::AnyRow;
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{AnyPool, Column, ConnectOptions, Row, TypeInfo, ValueRef};
use std::time::{Duration, Instant};

/// Column names and rows of typed values: integers and floats as JSON
/// numbers, text as strings, NULL as null, blobs as "<n bytes>".
pub type Table = (Vec<String>, Vec<Vec<serde_json::Value>>);

pub(super) async fn sqlite(url: &str, sql: &str, timeout: Duration) -> Result<Table> {
    let fail = |e: String| Error::Store(format!("{url}: query: {e}"));
    let path = file_of(url).ok_or_else(|| fail("no file".into()))?;
    let mut conn = SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .immutable(super::open::immutable(&path))
        .connect()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    {
        let mut h = conn.lock_handle().await.map_err(|e| fail(e.to_string()))?;
        if let Some(stmt) = writing_statement(h.as_raw_handle(), sql).map_err(fail)? {
            return Err(fail(format!(
                "`{stmt}` would write; `hmsa-lab query` runs read-only statements only"
            )));
        }
        h.set_progress_handler(1000, move || Instant::now() < deadline);
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut conn)
        .await
        .map_err(|e| {
            if Instant::now() >= deadline {
                fail(format!(
                    "stopped after {:.1} s (--timeout)",
                    timeout.as_secs_f64()
                ))
            } else {
                fail(e.to_string())
            }
        })?;
    let cols: Vec<String> = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(render_sqlite(r, cols.len()).map_err(fail)?);
    }
    Ok((cols, out))
}

fn render_sqlite(r: &SqliteRow, n: usize) -> std::result::Result<Vec<serde_json::Value>, String> {
    use serde_json::Value;
    let mut line = Vec::with_capacity(n);
    for i in 0..n {
        let raw = r.try_get_raw(i).map_err(|e| e.to_string())?;
        let v = if raw.is_null() {
            Value::Null
        } else {
            match raw.type_info().name() {
                "INTEGER" | "BOOLEAN" => r.try_get::<i64, _>(i).map(Value::from),
                "REAL" => r.try_get::<f64, _>(i).map(Value::from),
                "BLOB" => r
                    .try_get::<Vec<u8>, _>(i)
                    .map(|b| Value::from(format!("<{} bytes>", b.len()))),
                _ => r.try_get::<String, _>(i).map(Value::from),
            }
            .map_err(|e| e.to_string())?
        };
        line.push(v);
    }
    Ok(line)
}

pub(super) async fn postgres(pool: &AnyPool, shown: &str, sql: &str, timeout: Duration) -> Result<Table> {
    let fail = |e: String| Error::Store(format!("{shown}: query: {e}"));
    let mut tx = pool.begin().await.map_err(|e| fail(e.to_string()))?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(|e| fail(e.to_string()))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL statement_timeout = {}",
        timeout.as_millis().max(1)
    )))
    .execute(&mut *tx)
    .await
    .map_err(|e| fail(e.to_string()))?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| {
            let msg = e.to_string();
            if msg.contains("statement timeout") {
                fail(format!(
                    "stopped after {:.1} s (--timeout)",
                    timeout.as_secs_f64()
                ))
            } else if msg.contains("read-only transaction") {
                fail(format!(
                    "{msg}; `hmsa-lab query` runs read-only statements only (it would write)"
                ))
            } else {
                fail(msg)
            }
        })?;
    tx.rollback().await.map_err(|e| fail(e.to_string()))?;
    let cols: Vec<String> = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    Ok((
        cols.clone(),
        rows.iter().map(|r| render_any(r, cols.len())).collect(),
    ))
}

/// A value of any type: integer, float, text, bool, bytes, in that order
/// of trying.
fn render_any(r: &AnyRow, n: usize) -> Vec<serde_json::Value> {
    use serde_json::Value;
    (0..n)
        .map(|i| {
            if r.try_get_raw(i).map(|v| v.is_null()).unwrap_or(true) {
                return Value::Null;
            }
            r.try_get::<i64, _>(i)
                .map(Value::from)
                .or_else(|_| r.try_get::<f64, _>(i).map(Value::from))
                .or_else(|_| r.try_get::<String, _>(i).map(Value::from))
                .or_else(|_| r.try_get::<bool, _>(i).map(Value::from))
                .or_else(|_| {
                    r.try_get::<Vec<u8>, _>(i)
                        .map(|b| Value::from(format!("<{} bytes>", b.len())))
                })
                .unwrap_or(Value::Null)
        })
        .collect()
}

/// The first statement of `sql` that SQLite does not call read-only, as
/// written; statements are prepared (never run) one after another. More
/// than one statement is an error: their rows would share the first one's
/// header.
fn writing_statement(
    db: std::ptr::NonNull<libsqlite3_sys::sqlite3>,
    sql: &str,
) -> std::result::Result<Option<String>, String> {
    use libsqlite3_sys as ffi;
    use std::os::raw::{c_char, c_int};
    let bytes = sql.as_bytes();
    let mut at = 0usize;
    let mut count = 0usize;
    while at < bytes.len() {
        let mut stmt: *mut ffi::sqlite3_stmt = std::ptr::null_mut();
        let mut tail: *const c_char = std::ptr::null();
        let rest = &bytes[at..];
        let len = c_int::try_from(rest.len()).map_err(|_| "the SQL text is too long".to_string())?;
        // SAFETY: `db` is the locked connection's live handle; `rest` is a
        // valid buffer of `len` bytes (not necessarily NUL-terminated, which
        // prepare allows when given the length); `tail` points into it.
        unsafe {
            let rc = ffi::sqlite3_prepare_v2(db.as_ptr(), rest.as_ptr().cast(), len, &mut stmt, &mut tail);
            if rc != ffi::SQLITE_OK {
                let msg = std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr()));
                return Err(msg.to_string_lossy().into_owned());
            }
            let used = if tail.is_null() {
                rest.len()
            } else {
                tail.offset_from(rest.as_ptr().cast()) as usize
            };
            if stmt.is_null() {
                // only whitespace or comments were left
                break;
            }
            let read_only = ffi::sqlite3_stmt_readonly(stmt) != 0;
            ffi::sqlite3_finalize(stmt);
            if !read_only {
                let text = String::from_utf8_lossy(&rest[..used]).trim().to_string();
                return Ok(Some(text));
            }
            count += 1;
            if count > 1 {
                let text = String::from_utf8_lossy(&rest[..used]).trim().to_string();
                return Err(format!(
                    "one statement at a time (the second: `{text}`); run each with its own `hmsa-lab query`"
                ));
            }
            at += used.max(1);
        }
    }
    Ok(None)
}
