-- The results store. Times are integer milliseconds since the Unix epoch;
-- NaN metrics are stored as NULL with is_nan = 1.

CREATE TABLE suites (
    name        TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    file        TEXT NOT NULL DEFAULT '',
    baseline    TEXT NOT NULL DEFAULT '',
    created_ms  INTEGER NOT NULL
);

CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    suite        TEXT NOT NULL REFERENCES suites(name) ON DELETE CASCADE,
    variant      TEXT NOT NULL,
    config_json  TEXT NOT NULL,
    config_hash  TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    status       TEXT NOT NULL DEFAULT 'SCHEDULED'
                 CHECK (status IN ('SCHEDULED', 'RUNNING', 'FINISHED', 'FAILED', 'KILLED')),
    step         INTEGER NOT NULL DEFAULT 0,
    heartbeat_ms INTEGER,
    start_ms     INTEGER,
    end_ms       INTEGER,
    claimed_by   TEXT,
    git_commit   TEXT,
    git_dirty    INTEGER,
    host         TEXT,
    versions     TEXT,
    run_dir      TEXT NOT NULL DEFAULT '',
    error        TEXT,
    UNIQUE (suite, variant, config_hash, seed)
);
CREATE INDEX runs_by_status ON runs(status);

CREATE TABLE params (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);

CREATE TABLE metrics (
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    step    INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    value   REAL,
    is_nan  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, key, step)
);

CREATE TABLE evaluations (
    id             INTEGER PRIMARY KEY,
    run_id         INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    scales         TEXT NOT NULL,
    fusion         TEXT NOT NULL,
    flip           INTEGER NOT NULL,
    miou           REAL NOT NULL,
    pixel_acc      REAL NOT NULL,
    mean_class_acc REAL NOT NULL,
    fw_iou         REAL NOT NULL,
    class_iou      TEXT NOT NULL,
    confusion      TEXT NOT NULL,
    attn_means     TEXT NOT NULL,
    ms_per_image   REAL NOT NULL,
    peak_mib       REAL,
    images         INTEGER NOT NULL,
    created_ms     INTEGER NOT NULL,
    UNIQUE (run_id, scales, fusion, flip)
);

-- Artifacts outlive their runs until `hmsa-lab gc` removes them.
CREATE TABLE artifacts (
    id         INTEGER PRIMARY KEY,
    run_id     INTEGER,
    kind       TEXT NOT NULL,
    path       TEXT NOT NULL,
    digest     TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE benchmarks (
    id         INTEGER PRIMARY KEY,
    suite      TEXT NOT NULL,
    name       TEXT NOT NULL,
    params     TEXT NOT NULL,
    min_ms     REAL,
    median_ms  REAL,
    peak_mib   REAL,
    value      REAL,
    unit       TEXT NOT NULL DEFAULT '',
    threads    INTEGER NOT NULL,
    machine    TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
