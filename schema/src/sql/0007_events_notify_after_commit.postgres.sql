-- Events no longer NOTIFY from a trigger inside the writing transaction. PostgreSQL serialises the commits of every
-- transaction that sent a NOTIFY on one global lock, held across the WAL flush, so a NOTIFY in each claim capped the
-- whole database at one such commit per disk flush. Each instance now sends the NOTIFY after its commits, in a
-- transaction of its own (`events::spawn_notifier`).
DROP TRIGGER IF EXISTS events_notify ON events;
DROP FUNCTION IF EXISTS mailqueue_events_notify()
