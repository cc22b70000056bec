-- The store's identity: every run folder names it in its owner.json, so
-- `hmsa-lab gc` removes only folders this database made.
CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO store_meta (key, value) VALUES ('id', lower(hex(randomblob(16))));

-- `hmsa-lab rm` marks runs removed; `hmsa-lab restore` brings them back;
-- `hmsa-lab gc` purges them with their folders.
ALTER TABLE runs ADD COLUMN removed_ms INTEGER;
