//! `mailqueue import`: feeds `.eml` files, Maildir folders and mbox files through the ingest pipeline.
