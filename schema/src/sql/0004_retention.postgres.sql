-- Serves the retention job (`retention:` in the configuration).
-- Closed contacts by the time they were closed: the candidates for deletion and for dropping raw bytes.
CREATE INDEX contacts_closed_idx ON contacts (closed_at, id) WHERE state = 'closed';
-- Replies by contact: deleting a contact checks the outbox's foreign key (and retention skips contacts with a reply
-- still to send); without it each deleted contact would scan the whole outbox.
CREATE INDEX outbox_contact_idx ON outbox (contact_id);
-- Events by age: old events are deleted in batches, oldest first.
CREATE INDEX events_created_idx ON events (created_at);
-- When retention dropped a message's raw RFC 822 bytes (NULL while they are kept, or never rendered yet), so the
-- API can answer 410 Gone instead of 404.
ALTER TABLE messages ADD COLUMN raw_deleted_at TIMESTAMPTZ;
