//! Starting the engine: database, queues, background services and the HTTP API, and stopping them gracefully.
