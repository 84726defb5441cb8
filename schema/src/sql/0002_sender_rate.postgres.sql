-- Serves ingest's per-sender rate breaker (`ingest.sender_limit`): inbound messages of one sender in a time window.
-- On PostgreSQL the index is built inside the migration's transaction and blocks writes to `messages` meanwhile.
CREATE INDEX messages_from_created_idx ON messages (from_address, created_at);
