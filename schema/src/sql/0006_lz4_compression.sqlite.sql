-- PostgreSQL only (lz4 compression of mail bytes); SQLite does not compress. Kept so both backends share versions.
SELECT 1
