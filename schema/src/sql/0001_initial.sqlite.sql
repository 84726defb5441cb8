-- Queues mirror the YAML: upserted at start; a queue removed from the YAML is disabled, never deleted.
CREATE TABLE queues (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    priority    INTEGER NOT NULL,
    language    TEXT NOT NULL,
    enabled     BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- A contact is one customer conversation: waiting (queued), worked by an agent (claimed), or closed.
CREATE TABLE contacts (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id          BIGINT NOT NULL REFERENCES queues (id),
    state             TEXT NOT NULL CHECK (state IN ('queued', 'claimed', 'closed')),
    priority          INTEGER NOT NULL,
    language          TEXT NOT NULL,
    arrived_on        TEXT NOT NULL,
    customer_address  TEXT,
    customer_name     TEXT,
    subject           TEXT,
    queued_at         TEXT NOT NULL,
    claimed_by        TEXT,
    claimed_at        TEXT,
    lease_expires_at  TEXT,
    closed_at         TEXT,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
-- Serves claim_next: waiting contacts by priority, then age.
CREATE INDEX contacts_claim_idx ON contacts (priority, queued_at, id) WHERE state = 'queued';
CREATE INDEX contacts_queue_claim_idx ON contacts (queue_id, priority, queued_at, id) WHERE state = 'queued';
-- Serves the rescuer.
CREATE INDEX contacts_lease_idx ON contacts (lease_expires_at) WHERE state = 'claimed';

-- Every mail of a contact, inbound and outbound, with its raw RFC 822 bytes.
CREATE TABLE messages (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id     BIGINT NOT NULL REFERENCES contacts (id),
    direction      TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    source_key     TEXT UNIQUE,
    mailbox        TEXT,
    message_id     TEXT,
    in_reply_to    TEXT,
    "references"   TEXT NOT NULL DEFAULT '[]',
    from_address   TEXT,
    from_name      TEXT,
    reply_to       TEXT,
    to_addresses   TEXT NOT NULL DEFAULT '[]',
    cc_addresses   TEXT NOT NULL DEFAULT '[]',
    subject        TEXT,
    sent_at        TEXT,
    headers        TEXT NOT NULL DEFAULT '[]',
    text_body      TEXT,
    html_body      TEXT,
    raw            BLOB,
    size           BIGINT NOT NULL,
    created_by     TEXT,
    created_at     TEXT NOT NULL
);
CREATE INDEX messages_contact_idx ON messages (contact_id, id);
CREATE INDEX messages_message_id_idx ON messages (message_id);

CREATE TABLE attachments (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id    BIGINT NOT NULL REFERENCES messages (id),
    filename      TEXT,
    content_type  TEXT NOT NULL,
    content_id    TEXT,
    inline        BOOLEAN NOT NULL DEFAULT FALSE,
    size          BIGINT NOT NULL,
    data          BLOB NOT NULL
);
CREATE INDEX attachments_message_idx ON attachments (message_id);

-- Where each IMAP mailbox folder was read up to.
CREATE TABLE mailbox_cursors (
    mailbox       TEXT NOT NULL,
    folder        TEXT NOT NULL,
    uidvalidity   BIGINT NOT NULL,
    last_uid      BIGINT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (mailbox, folder)
);

-- Replies waiting to be sent (or sent / failed), one row per outbound message.
CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id       BIGINT NOT NULL REFERENCES contacts (id),
    message_id       BIGINT NOT NULL UNIQUE REFERENCES messages (id),
    state            TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    locked_by        TEXT,
    locked_until     TEXT,
    last_error       TEXT,
    server_reply     TEXT,
    sent_at          TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at, id) WHERE state = 'pending';

-- Mail that could not become a contact (too large, unparsable, …); kept whole, never dropped.
CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source_key  TEXT UNIQUE,
    mailbox     TEXT,
    queue       TEXT,
    reason      TEXT NOT NULL,
    size        BIGINT NOT NULL,
    raw         BLOB NOT NULL,
    created_at  TEXT NOT NULL
);

-- Append-only event log. Writers insert with seq NULL; the sequencer numbers committed rows in commit-discovery
-- order under an advisory lock, so a reader resuming after seq N never misses a late-committing event.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    seq         BIGINT UNIQUE,
    kind        TEXT NOT NULL,
    contact_id  BIGINT,
    queue       TEXT,
    actor       TEXT,
    data        TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL
);
CREATE INDEX events_unsequenced_idx ON events (id) WHERE seq IS NULL;
