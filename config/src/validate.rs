//! Rules across fields and entries (unknown server, duplicate address, ranges, URLs, …).
//!
//! Runs on the typed config, even when some parts had type errors (those parts were dropped), and takes
//! positions from the tree. Names used for cross-references (servers, queues) are read from the tree,
//! so an entry with a type error does not also cause "unknown server" errors elsewhere.

use std::collections::{HashMap, HashSet};

use crate::{
    AfterFetch, AuthType, Config, Retention, Role, Secret,
    tree::{Node, Pos, Problem, kept, pair},
};

/// Errors and warnings found so far.
#[derive(Default)]
pub(crate) struct Findings {
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl Findings {
    pub fn error(&mut self, pos: Pos, msg: impl Into<String>) {
        self.errors.push((pos, msg.into()));
    }
    pub fn warn(&mut self, pos: Pos, msg: impl Into<String>) {
        self.warnings.push((pos, msg.into()));
    }
}

const MAX_SIZE_MB: std::ops::RangeInclusive<u32> = 1..=40;
/// Concurrent SMTP connections of the outgoing server.
const SMTP_CONNECTIONS: std::ops::RangeInclusive<u32> = 1..=32;

pub(crate) fn validate(config: &Config, root: &Node, poisoned: &HashSet<usize>, f: &mut Findings) {
    database(config, root, f);
    api(config, root, poisoned, f);
    let defaults = root.get("defaults").unwrap_or(root);
    size(
        "defaults.max_email_size_mb",
        config.defaults.max_email_size_mb,
        defaults.pos_of("max_email_size_mb"),
        f,
    );
    mailbox_lease(config, defaults, f);
    incoming_servers(config, root, poisoned, f);
    outgoing_server(config, root, f);
    queues(config, root, poisoned, f);
    ingest(config, root, poisoned, f);
    retention(config, root, f);
}

/// The mailbox lease: renewed every third of it, so at least a second; a dead instance's mailboxes wait this long.
const MAILBOX_LEASE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3600);

fn mailbox_lease(config: &Config, defaults: &Node, f: &mut Findings) {
    let lease = config.defaults.mailbox_lease;
    if !MAILBOX_LEASE.contains(&lease.0) {
        f.error(
            defaults.pos_of("mailbox_lease"),
            format!("defaults.mailbox_lease {lease} is out of range; expected 1s to 1h"),
        );
    }
}

const RETENTION_BATCH: std::ops::RangeInclusive<u32> = 1..=10_000;

fn retention(config: &Config, root: &Node, f: &mut Findings) {
    let Some(node) = root.get("retention") else {
        return;
    };
    let r = &config.retention;
    if !RETENTION_BATCH.contains(&r.batch_size) {
        f.error(
            node.pos_of("batch_size"),
            format!(
                "retention.batch_size {} is out of range; expected {}..={}",
                r.batch_size,
                RETENTION_BATCH.start(),
                RETENTION_BATCH.end()
            ),
        );
    }
    if let (Some(raw), Some(contacts)) = (r.raw_messages, r.closed_contacts)
        && raw.0 >= contacts.0
    {
        f.warn(
            node.pos_of("raw_messages"),
            format!(
                "retention.raw_messages ({}) is not shorter than retention.closed_contacts ({}): \
                 the contacts are deleted first, so it has no effect",
                Retention::age_text(raw),
                Retention::age_text(contacts)
            ),
        );
    }
    if !r.is_enabled() {
        f.warn(
            node.pos,
            "retention sets none of `closed_contacts`, `raw_messages`, `events`: nothing is ever deleted",
        );
    }
}

fn database(config: &Config, root: &Node, f: &mut Findings) {
    if config.database.kind().is_none() {
        // The URL may hold a password: name the scheme at most.
        let scheme = config
            .database
            .url
            .split_once("://")
            .map(|(s, _)| s)
            .filter(|s| s.len() < 20);
        let got = scheme.map_or(String::new(), |s| format!(" (got `{s}://`)"));
        let pos = root.get("database").map_or(root.pos, |d| d.pos_of("url"));
        f.error(
            pos,
            format!(
                "database.url must start with `sqlite:` or `postgres://` / `postgresql://`{got}"
            ),
        );
    }
}

fn api(config: &Config, root: &Node, poisoned: &HashSet<usize>, f: &mut Findings) {
    let api = root.get("api").unwrap_or(root);
    if config.api.listen.parse::<std::net::SocketAddr>().is_err() {
        f.error(
            api.pos_of("listen"),
            format!("api.listen `{}` is not a socket address; expected IP:PORT such as `127.0.0.1:8080` or `[::]:8080`", config.api.listen),
        );
    }
    let queues = names(root.get("queues"));
    let mut seen_names: HashMap<&str, usize> = HashMap::new();
    let mut seen_secrets: HashMap<&str, (&str, usize)> = HashMap::new();
    for (token, node) in pair(&config.api.tokens, kept(api.get("tokens"), poisoned), api) {
        let name_pos = node.pos_of("name");
        if let Some(first) = seen_before(&mut seen_names, &token.name, name_pos.line) {
            f.error(
                name_pos,
                format!(
                    "API token name `{}` is already used on line {first}; names must be unique",
                    token.name
                ),
            );
        }
        for (i, queue) in token.queues.iter().enumerate() {
            if !queues.contains(queue.as_str()) {
                let pos = node
                    .get("queues")
                    .and_then(|q| q.items().get(i))
                    .map_or(node.pos, |n| n.pos);
                f.error(
                    pos,
                    format!(
                        "API token `{}` names unknown queue `{queue}` (known queues: {})",
                        token.name,
                        list(&queues)
                    ),
                );
            }
        }
        if token.role == Role::Agent && token.queues.is_empty() {
            f.warn(
                node.pos,
                format!(
                    "agent token `{}` lists no `queues`, so it cannot claim any contact",
                    token.name
                ),
            );
        }
        let secret_pos = node.pos_of("secret");
        if let Some(value) = resolved(&token.secret)
            && let Some((other, line)) =
                seen_before(&mut seen_secrets, value, (&token.name, secret_pos.line))
        {
            f.error(secret_pos, format!("API token `{}` has the same secret as token `{other}` (line {line}); every token needs its own secret", token.name));
        }
    }
}

fn incoming_servers(config: &Config, root: &Node, poisoned: &HashSet<usize>, f: &mut Findings) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (server, node) in pair(
        &config.incoming_servers,
        kept(root.get("incoming_servers"), poisoned),
        root,
    ) {
        let what = format!("incoming server `{}`", server.name);
        if let Some(first) = seen_before(&mut seen, &server.name, node.pos_of("name").line) {
            f.error(
                node.pos_of("name"),
                format!("{what} is already defined on line {first}; server names must be unique"),
            );
        }
        token_endpoint(
            &what,
            server.login_address.as_deref(),
            server.token_endpoint.as_deref(),
            node,
            f,
        );
        // Presence is read from the tree: a `client_secret` with a type error is reported once, not twice.
        if server.auth == AuthType::OauthService && node.get("client_secret").is_none() {
            f.error(
                node.pos_of("auth"),
                format!("{what} uses `auth: oauth_service`, which requires `client_secret`"),
            );
        }
    }
}

fn outgoing_server(config: &Config, root: &Node, f: &mut Findings) {
    let (Some(out), Some(node)) = (&config.outgoing_server, root.get("outgoing_server")) else {
        return;
    };
    let what = "the outgoing server";
    token_endpoint(
        what,
        out.login_address.as_deref(),
        out.token_endpoint.as_deref(),
        node,
        f,
    );
    size(
        "outgoing_server.max_email_size_mb",
        out.max_email_size_mb,
        node.pos_of("max_email_size_mb"),
        f,
    );
    if !SMTP_CONNECTIONS.contains(&out.connections) {
        f.error(
            node.pos_of("connections"),
            format!(
                "outgoing_server.connections is {}; expected {}..={} (Exchange Online allows 3 per mailbox)",
                out.connections,
                SMTP_CONNECTIONS.start(),
                SMTP_CONNECTIONS.end()
            ),
        );
    }
    match out.auth {
        AuthType::OauthService => {
            if node.get("client_secret").is_none() {
                f.error(
                    node.pos_of("auth"),
                    format!("{what} uses `auth: oauth_service`, which requires `client_secret`"),
                );
            }
            if node.get("password").is_some() {
                f.error(
                    node.pos_of("password"),
                    format!(
                        "{what} uses `auth: oauth_service`, which takes no `password`; remove it"
                    ),
                );
            }
        }
        AuthType::OauthUser => {
            f.warn(
                node.pos_of("auth"),
                format!(
                    "{what} uses `auth: oauth_user` (a mailbox password); prefer `oauth_service`"
                ),
            );
            if node.get("password").is_none() {
                f.error(
                    node.pos_of("auth"),
                    format!("{what} uses `auth: oauth_user`, which requires `password`"),
                );
            }
        }
    }
}

fn queues(config: &Config, root: &Node, poisoned: &HashSet<usize>, f: &mut Findings) {
    // The first definition of a name wins (a repeated name is reported by `incoming_servers`).
    let mut servers: HashMap<&str, AuthType> = HashMap::new();
    for s in &config.incoming_servers {
        servers.entry(&s.name).or_insert(s.auth);
    }
    let server_names = names(root.get("incoming_servers"));
    let mut queue_names: HashMap<&str, usize> = HashMap::new();
    // lower-cased address -> (queue, line)
    let mut addresses: HashMap<String, (&str, usize)> = HashMap::new();
    if config.queues.is_empty() {
        f.warn(
            root.get("queues").map_or(root.pos, |q| q.pos),
            "no queues are configured, so no mail is fetched",
        );
    }
    for (queue, qnode) in pair(&config.queues, kept(root.get("queues"), poisoned), root) {
        let name_pos = qnode.pos_of("name");
        if let Some(first) = seen_before(&mut queue_names, &queue.name, name_pos.line) {
            f.error(
                name_pos,
                format!(
                    "queue `{}` is already defined on line {first}; queue names must be unique",
                    queue.name
                ),
            );
        }
        // Count the tree's entries: addresses with type errors were dropped from `queue.addresses`.
        if qnode.get("addresses").is_none_or(|a| a.items().is_empty()) {
            f.error(
                qnode.key_pos("addresses"),
                format!(
                    "queue `{}` has no addresses; give at least one in `addresses`",
                    queue.name
                ),
            );
        } else if !queue.addresses.iter().any(|a| a.sender) {
            f.warn(
                qnode.key_pos("addresses"),
                format!(
                    "queue `{}` has no `sender: true` address, so replies cannot be sent from it",
                    queue.name
                ),
            );
        }
        let anodes = kept(qnode.get("addresses"), poisoned);
        for (address, node) in pair(&queue.addresses, anodes, qnode) {
            let key = address.address.as_str().to_ascii_lowercase();
            let pos = node.pos_of("address");
            if let Some((other, line)) = seen_before(&mut addresses, key, (&queue.name, pos.line)) {
                f.error(pos, format!("address `{}` is already used by queue `{other}` on line {line}; each address may feed only one queue", address.address));
            }
            address_server(address, node, &servers, &server_names, f);
        }
    }
}

/// `sender_limit.max` is at least 1, and `quarantine_folder` is a name that no address fetches from (quarantined
/// mail would be fetched again); an address that moves its fetched mail there gets a warning.
fn ingest(config: &Config, root: &Node, poisoned: &HashSet<usize>, f: &mut Findings) {
    let node = root.get("ingest").unwrap_or(root);
    let ingest = &config.ingest;
    if let Some(limit) = &ingest.sender_limit
        && limit.max == 0
    {
        let pos = node
            .get("sender_limit")
            .map_or(node.pos, |l| l.pos_of("max"));
        f.error(
            pos,
            "ingest.sender_limit.max is 0; expected at least 1 (write `sender_limit: null` to turn the breaker off)",
        );
    }
    let folder = ingest.quarantine_folder.trim();
    let folder_pos = node.pos_of("quarantine_folder");
    if folder.is_empty() {
        f.error(
            folder_pos,
            "ingest.quarantine_folder is empty; expected an IMAP folder name such as `Quarantine`",
        );
        return;
    }
    let mut fetched_from = false;
    for (queue, qnode) in pair(&config.queues, kept(root.get("queues"), poisoned), root) {
        let anodes = kept(qnode.get("addresses"), poisoned);
        for (address, anode) in pair(&queue.addresses, anodes, qnode) {
            if !fetched_from && address.folder.trim().eq_ignore_ascii_case(folder) {
                fetched_from = true;
                f.error(
                    folder_pos,
                    format!(
                        "ingest.quarantine_folder `{folder}` is the folder address `{}` fetches from (line {}); \
                         quarantined mail would be fetched again",
                        address.address,
                        anode.pos.line
                    ),
                );
            }
            if let AfterFetch::Move(target) = &address.after_fetch
                && target.trim().eq_ignore_ascii_case(folder)
            {
                f.warn(
                    anode.pos_of("after_fetch"),
                    format!(
                        "address `{}` moves fetched mail to `{target}`, which is also `ingest.quarantine_folder`; \
                         stored and quarantined mail would mix",
                        address.address
                    ),
                );
            }
        }
    }
}

/// The address's `server` exists, and `password` is given exactly when that server is `oauth_user`.
fn address_server(
    address: &crate::Address,
    node: &Node,
    servers: &HashMap<&str, AuthType>,
    server_names: &HashSet<&str>,
    f: &mut Findings,
) {
    let what = format!("address `{}`", address.address);
    if !server_names.contains(address.server.as_str()) {
        let known = list(server_names);
        f.error(
            node.pos_of("server"),
            format!(
                "{what} names unknown server `{}` (known servers: {known})",
                address.server
            ),
        );
        return;
    }
    match (servers.get(address.server.as_str()), node.get("password")) {
        (Some(AuthType::OauthUser), None) => f.error(
            node.pos_of("server"),
            format!(
                "{what} is on `oauth_user` server `{}`, which requires its mailbox `password`",
                address.server
            ),
        ),
        (Some(AuthType::OauthService), Some(_)) => f.error(
            node.pos_of("password"),
            format!(
                "{what} is on `oauth_service` server `{}`, which takes no `password`; remove it",
                address.server
            ),
        ),
        _ => {}
    }
}

/// Exactly one of `login_address` / `token_endpoint`, and it is https (plain http only to this machine).
fn token_endpoint(
    what: &str,
    login: Option<&str>,
    endpoint: Option<&str>,
    node: &Node,
    f: &mut Findings,
) {
    match (node.get("login_address"), node.get("token_endpoint")) {
        (None, None) => f.error(
            node.pos,
            format!("{what} needs `login_address` (or `token_endpoint`)"),
        ),
        (Some(_), Some(_)) => f.error(
            node.pos_of("token_endpoint"),
            format!("{what} has both `login_address` and `token_endpoint`; give only one"),
        ),
        _ => {}
    }
    for (key, url) in [("login_address", login), ("token_endpoint", endpoint)] {
        if let Some(url) = url.filter(|u| !is_secure_url(u)) {
            f.error(
                node.pos_of(key),
                format!("{what}: {key} `{url}` must be an https:// URL (http:// is allowed only for localhost and 127.x.x.x)"),
            );
        }
    }
}

/// `https://host…`, or `http://` to the local machine (the sandbox identity provider).
pub(crate) fn is_secure_url(url: &str) -> bool {
    let host_ok = |rest: &str| !rest.is_empty() && !rest.starts_with('/');
    if let Some(rest) = url.strip_prefix("https://") {
        return host_ok(rest);
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn size(what: &str, value: u32, pos: Pos, f: &mut Findings) {
    if !MAX_SIZE_MB.contains(&value) {
        f.error(
            pos,
            format!(
                "{what} is {value}; expected {}..={} (MB)",
                MAX_SIZE_MB.start(),
                MAX_SIZE_MB.end()
            ),
        );
    }
}

/// Records `key` unless already seen; returns what the first occurrence recorded.
fn seen_before<K: Eq + std::hash::Hash, V: Copy>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
) -> Option<V> {
    match map.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(value);
            None
        }
    }
}

/// The resolved, non-empty value of a secret.
fn resolved(secret: &Secret) -> Option<&str> {
    Some(secret.expose()).filter(|v| secret.is_resolved() && !v.is_empty())
}

/// The `name` of every entry of a list node.
fn names(list: Option<&Node>) -> HashSet<&str> {
    list.map_or(&[][..], Node::items)
        .iter()
        .filter_map(|n| n.get("name")?.text())
        .collect()
}

/// `a`, `b` sorted, for "known …" hints.
fn list(names: &HashSet<&str>) -> String {
    let mut names: Vec<_> = names.iter().map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        return "none".into();
    }
    names.sort();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::is_secure_url;

    #[test]
    fn https_or_local_http_only() {
        for ok in [
            "https://login.microsoftonline.com/t",
            "http://127.0.0.1:8443/t",
            "http://127.5.5.5",
            "http://localhost",
            "http://localhost:80/x",
            "http://[::1]:9/x",
        ] {
            assert!(is_secure_url(ok), "{ok} rejected");
        }
        for bad in [
            "http://login.example.com",
            "http://localhost.evil.com/x",
            "http://127.0.0.1.evil.com",
            "https://",
            "ftp://x",
            "login.microsoftonline.com",
        ] {
            assert!(!is_secure_url(bad), "{bad} accepted");
        }
    }
}
