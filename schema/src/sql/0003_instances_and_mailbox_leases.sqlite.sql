-- Several instances on one database (issue 6). SQLite runs one instance (`serve` holds a lock file), so the same
-- code path takes every lease at once; the tables match PostgreSQL's. No NOTIFY trigger: readers of the one
-- instance are woken in process.
CREATE TABLE instances (
    id            TEXT PRIMARY KEY,
    hostname      TEXT NOT NULL,
    pid           BIGINT NOT NULL,
    started_at    TEXT NOT NULL,
    heartbeat_at  TEXT NOT NULL,
    expires_at    TEXT NOT NULL
);
CREATE TABLE mailbox_leases (
    mailbox      TEXT NOT NULL,
    folder       TEXT NOT NULL,
    owner        TEXT NOT NULL,
    acquired_at  TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    PRIMARY KEY (mailbox, folder)
);
