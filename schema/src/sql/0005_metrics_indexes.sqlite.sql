-- Serve `GET /metrics` (computed at every scrape, on every instance) without scanning whole tables.
-- Replies being sent: the outbox depth, and the sweep of rows whose sending lease ran out.
CREATE INDEX outbox_sending_idx ON outbox (locked_until) WHERE state = 'sending';
-- The outgoing server's latest health report. The kinds are literals in the query too: a partial index is used
-- only when the query's WHERE clause repeats its predicate (a `$N` placeholder defeats it in a generic plan).
CREATE INDEX events_outgoing_health_idx ON events (id) WHERE kind IN ('outgoing.unhealthy', 'outgoing.healthy');
