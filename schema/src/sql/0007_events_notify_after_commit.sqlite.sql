-- PostgreSQL only (the events NOTIFY trigger); SQLite has none. Kept so both backends share versions.
SELECT 1
