-- Several instances on one database (issue 6).
-- `instances`: every running `mailqueue serve` heartbeats its row; the live rows tell each instance its fair share
-- of the mailboxes. A row whose `expires_at` passed belongs to an instance that died.
CREATE TABLE instances (
    id            TEXT PRIMARY KEY,
    hostname      TEXT NOT NULL,
    pid           BIGINT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL
);
-- `mailbox_leases`: the one instance that fetches a mailbox folder (the key of `mailbox_cursors`), until
-- `expires_at`; renewed by heartbeat, taken over by another instance once expired.
CREATE TABLE mailbox_leases (
    mailbox      TEXT NOT NULL,
    folder       TEXT NOT NULL,
    owner        TEXT NOT NULL,
    acquired_at  TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (mailbox, folder)
);
-- Wakes the event readers of every instance (LISTEN mailqueue_events) when events are appended anywhere. NOTIFY is
-- transactional: it is delivered on commit, once per transaction (duplicates fold), never for a rollback.
CREATE FUNCTION mailqueue_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('mailqueue_events', ''); RETURN NULL; END $$;
CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION mailqueue_events_notify();
