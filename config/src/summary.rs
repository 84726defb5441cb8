//! A one-paragraph description of a loaded configuration, for `mailqueue check-config`.

use crate::{Config, DatabaseKind, Role};

impl Config {
    /// E.g. `2 queues, 3 addresses (2 senders); incoming servers: m365; outgoing server: smtp.office365.com:587;
    /// 3 API tokens (2 agent, 1 router, 0 admin); database: sqlite; retention: off`.
    pub fn summary(&self) -> String {
        let addresses = self.queues.iter().map(|q| q.addresses.len()).sum::<usize>();
        let senders = self
            .queues
            .iter()
            .flat_map(|q| &q.addresses)
            .filter(|a| a.sender)
            .count();
        let servers = self
            .incoming_servers
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>();
        let outgoing = self
            .outgoing_server
            .as_ref()
            .map_or_else(|| "none".to_string(), |o| format!("{}:{}", o.host, o.port));
        let tokens = &self.api.tokens;
        let count = |role| tokens.iter().filter(|t| t.role == role).count();
        let database = match self.database.kind() {
            Some(DatabaseKind::Sqlite) => "sqlite",
            Some(DatabaseKind::Postgres) => "postgres",
            None => "unknown",
        };
        let servers = if servers.is_empty() {
            "none".to_string()
        } else {
            servers.join(", ")
        };
        format!(
            "{}, {} ({}); incoming servers: {servers}; outgoing server: {outgoing}; {} ({} agent, {} router, {} admin); \
             database: {database}; retention: {}",
            plural(self.queues.len(), "queue"),
            plural(addresses, "address"),
            plural(senders, "sender"),
            plural(tokens.len(), "API token"),
            count(Role::Agent),
            count(Role::Router),
            count(Role::Admin),
            self.retention.summary(),
        )
    }
}

impl crate::Retention {
    /// E.g. `closed contacts 365d, raw messages 30d, events 90d`, or `off`.
    fn summary(&self) -> String {
        let ages = [
            ("closed contacts", self.closed_contacts),
            ("raw messages", self.raw_messages),
            ("events", self.events),
        ];
        let set: Vec<String> = ages
            .iter()
            .filter_map(|(what, age)| age.map(|a| format!("{what} {}", Self::age_text(a))))
            .collect();
        if set.is_empty() {
            "off".into()
        } else {
            set.join(", ")
        }
    }
}

fn plural(n: usize, word: &str) -> String {
    let suffix = if n == 1 {
        ""
    } else if word.ends_with('s') {
        "es"
    } else {
        "s"
    };
    format!("{n} {word}{suffix}")
}
