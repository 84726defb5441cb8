//! Configuration loading: every rule is reported with its real line, all problems at once, and no
//! secret value ever appears in a message.

use std::path::{Path, PathBuf};

use mailqueue_config::{AfterFetch, AuthType, Loaded, Role, load, load_str};

/// Loads `yaml` (written as `t.yaml` in `dir`) and returns its errors rendered `FILE:LINE:COL: message`.
fn errors(yaml: &str) -> Vec<String> {
    errors_in(Path::new("t.yaml"), yaml)
}

fn errors_in(path: &Path, yaml: &str) -> Vec<String> {
    match load_str(path, yaml) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn loaded(yaml: &str) -> Loaded {
    load_str(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("expected no errors, got:\n{e}"))
}

fn warnings(yaml: &str) -> Vec<String> {
    loaded(yaml)
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Asserts one diagnostic is on `line` and mentions every needle.
#[track_caller]
fn has(diags: &[String], line: usize, needles: &[&str]) {
    let prefix = format!("t.yaml:{line}:");
    assert!(
        diags
            .iter()
            .any(|d| d.starts_with(&prefix) && needles.iter().all(|n| d.contains(n))),
        "no diagnostic on line {line} containing {needles:?}; got:\n{}",
        diags.join("\n")
    );
}

/// Asserts no diagnostic contains `text` (used for secret values).
#[track_caller]
fn never(diags: &[String], text: &str) {
    assert!(
        diags.iter().all(|d| !d.contains(text)),
        "`{text}` was printed:\n{}",
        diags.join("\n")
    );
}

/// A valid file (inline secrets only produce warnings) used as the base of several tests.
const VALID: &str = r#"database: { url: "sqlite://data/mailqueue.db" }
api:
  listen: "127.0.0.1:8080"
  tokens:
    - { name: alice, role: agent, secret: "alice-token-value", queues: [support], languages: [en, de] }
incoming_servers:
  - name: m365
    login_address: "https://login.microsoftonline.com/tenant"
    auth: oauth_service
    client_id: "00000000-0000-0000-0000-000000000000"
    client_secret: "client-secret-value"
    imap: { host: outlook.office365.com, port: 993, tls: implicit }
queues:
  - name: support
    addresses:
      - { address: support@contoso.com, server: m365, sender: true }
"#;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples")
}

#[test]
fn full_example_loads_and_covers_every_section() {
    // SAFETY: these variables are read only by this test's `load`.
    unsafe {
        std::env::set_var("MQ_TOKEN_ALICE", "fake-alice-token");
        std::env::set_var("MQ_TOKEN_ROUTER", "fake-router-token");
        std::env::set_var("MQ_TOKEN_ADMIN", "fake-admin-token");
    }
    let loaded = load(&examples().join("mailqueue.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = &loaded.config;
    assert_eq!(c.queues.len(), 2);
    assert_eq!(c.incoming_servers[1].auth, AuthType::OauthUser);
    assert_eq!(c.api.tokens[1].role, Role::Router);
    assert_eq!(c.api.tokens[0].secret.expose(), "fake-alice-token");
    // Relative secret file, resolved against the example's directory, trailing newline trimmed.
    let out = c.outgoing_server.as_ref().expect("outgoing server");
    assert_eq!(
        out.client_secret.as_ref().unwrap().expose(),
        "FAKE-smtp-client-secret-for-examples-only"
    );
    assert_eq!(
        c.queues[0].addresses[1].after_fetch,
        AfterFetch::Move("Processed".into())
    );
    assert_eq!(c.queues[1].language.as_ref().unwrap().as_str(), "de-CH");
    let summary = c.summary();
    for part in [
        "2 queues",
        "3 addresses (2 senders)",
        "m365, legacy",
        "smtp.office365.com:587",
        "3 API tokens",
        "sqlite",
    ] {
        assert!(summary.contains(part), "{summary}");
    }
}

#[test]
fn minimal_example_loads_with_defaults() {
    // SAFETY: read only by this test's `load`.
    unsafe { std::env::set_var("M365_CLIENT_SECRET", "fake-m365-secret") };
    let loaded = load(&examples().join("minimal.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let c = &loaded.config;
    assert_eq!(c.database.url, "sqlite://data/mailqueue.db");
    assert_eq!(c.api.listen, "127.0.0.1:8080");
    assert_eq!(c.defaults.max_email_size_mb, 25);
    assert_eq!(c.incoming_servers[0].imap.port, 993);
    assert_eq!(c.queues[0].addresses[0].folder, "INBOX");
    assert!(
        c.summary().starts_with("1 queue, 1 address (1 sender)"),
        "{}",
        c.summary()
    );
}

#[test]
fn valid_config_loads() {
    let loaded = loaded(VALID);
    assert_eq!(loaded.config.queues[0].name, "support");
    assert_eq!(
        loaded.config.api.tokens[0].secret.expose(),
        "alice-token-value"
    );
}

#[test]
fn unknown_keys_name_the_key_and_the_expected_ones() {
    let errs = errors(&VALID.replace(
        "    auth: oauth_service",
        "    auth: oauth_service\n    colour: blue",
    ));
    has(
        &errs,
        10,
        &["unknown key `colour`", "`login_address`", "`client_secret`"],
    );
}

#[test]
fn wrong_types_are_all_reported_with_their_lines() {
    let yaml = VALID.replace("port: 993", "port: 99300").replace(
        "  - name: support\n",
        "  - name: support\n    priority: high\n    sender: yes\n",
    );
    let errs = errors(&yaml);
    has(
        &errs,
        12,
        &["incoming_servers[0].imap.port", "99300", "0..=65535"],
    );
    has(&errs, 15, &["queues[0].priority", "\"high\"", "integer"]);
    // `sender` is not a queue key at all; strict booleans are checked on addresses below.
    has(&errs, 16, &["unknown key `sender`"]);
    let errs = errors(&VALID.replace("sender: true", "sender: yes"));
    has(&errs, 16, &["sender", "\"yes\"", "boolean"]);
}

#[test]
fn duplicate_keys_are_all_reported() {
    let yaml = VALID
        .replace(
            "  listen: \"127.0.0.1:8080\"\n",
            "  listen: \"127.0.0.1:8080\"\n  listen: \"127.0.0.1:9090\"\n",
        )
        .replace(
            "    auth: oauth_service\n",
            "    auth: oauth_service\n    auth: oauth_user\n",
        );
    let errs = errors(&yaml);
    has(&errs, 4, &["duplicate key `listen`", "line 3"]);
    has(&errs, 11, &["duplicate key `auth`", "line 10"]);
}

#[test]
fn invalid_yaml_syntax_has_a_position() {
    let errs = errors("queues:\n  - name: [support\n  - name: x\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("t.yaml:3:") && errs[0].contains("invalid YAML"),
        "{errs:?}"
    );
    let errs = errors("api:\n\tlisten: x\n");
    assert!(
        errs[0].starts_with("t.yaml:2:") && errs[0].contains("invalid YAML"),
        "{errs:?}"
    );
}

#[test]
fn duplicate_queue_names() {
    let yaml = format!(
        "{VALID}  - name: support\n    addresses:\n      - {{ address: other@contoso.com, server: m365 }}\n"
    );
    has(
        &errors(&yaml),
        17,
        &["queue `support` is already defined on line 14"],
    );
}

#[test]
fn address_used_twice_in_one_queue_and_across_queues() {
    let same_queue = format!("{VALID}      - {{ address: Support@CONTOSO.com, server: m365 }}\n");
    has(
        &errors(&same_queue),
        17,
        &["`Support@contoso.com` is already used by queue `support` on line 16"],
    );
    let other_queue = format!(
        "{VALID}  - name: sales\n    addresses:\n      - {{ address: support@contoso.com, server: m365 }}\n"
    );
    has(
        &errors(&other_queue),
        19,
        &["already used by queue `support` on line 16"],
    );
}

#[test]
fn unknown_server_lists_known_servers() {
    let errs = errors(&VALID.replace("server: m365, sender", "server: m366, sender"));
    has(
        &errs,
        16,
        &["unknown server `m366`", "known servers: `m365`"],
    );
}

#[test]
fn oauth_user_address_needs_password_and_oauth_service_forbids_it() {
    let errs = errors(&VALID.replace("auth: oauth_service", "auth: oauth_user"));
    has(
        &errs,
        16,
        &[
            "`oauth_user` server `m365`",
            "requires its mailbox `password`",
        ],
    );
    let errs = errors(&VALID.replace(
        "sender: true }",
        "sender: true, password: { env: MQ_SOME_PASSWORD } }",
    ));
    has(
        &errs,
        16,
        &["`oauth_service` server `m365`", "takes no `password`"],
    );
}

#[test]
fn oauth_service_needs_client_secret_incoming_and_outgoing() {
    let errs = errors(&VALID.replace("    client_secret: \"client-secret-value\"\n", ""));
    has(
        &errs,
        9,
        &["incoming server `m365`", "requires `client_secret`"],
    );
    let outgoing = "outgoing_server:\n  host: smtp.office365.com\n  login_address: \"https://login.microsoftonline.com/t\"\n  \
                    auth: oauth_service\n  client_id: x\n  username: bot@contoso.com\n";
    let errs = errors(&format!("{VALID}{outgoing}"));
    has(&errs, 20, &["outgoing server", "requires `client_secret`"]);
}

#[test]
fn queue_without_addresses() {
    let yaml = format!("{VALID}  - name: empty\n    addresses: []\n");
    has(&errors(&yaml), 18, &["queue `empty` has no addresses"]);
}

#[test]
fn max_email_size_must_be_1_to_40() {
    let outgoing = "outgoing_server:\n  host: smtp.office365.com\n  login_address: \"https://login.microsoftonline.com/t\"\n  \
                    auth: oauth_service\n  client_id: x\n  client_secret: s\n  username: bot@contoso.com\n  max_email_size_mb: 41\n";
    let yaml = format!("defaults:\n  max_email_size_mb: 0\n{VALID}{outgoing}");
    let errs = errors(&yaml);
    has(&errs, 2, &["defaults.max_email_size_mb is 0", "1..=40"]);
    has(
        &errs,
        26,
        &["outgoing_server.max_email_size_mb is 41", "1..=40"],
    );
}

#[test]
fn outgoing_connections_must_be_1_to_32() {
    let outgoing = |n: u32| {
        format!(
            "outgoing_server:\n  host: smtp.office365.com\n  login_address: \"https://login.microsoftonline.com/t\"\n  \
             auth: oauth_service\n  client_id: x\n  client_secret: s\n  username: bot@contoso.com\n  connections: {n}\n"
        )
    };
    for n in [0, 33] {
        let errs = errors(&format!("{VALID}{}", outgoing(n)));
        has(
            &errs,
            24,
            &[&format!("outgoing_server.connections is {n}"), "1..=32"],
        );
    }
    let eight = loaded(&format!("{VALID}{}", outgoing(8)));
    assert_eq!(eight.config.outgoing_server.unwrap().connections, 8);
    let default = loaded(&format!(
        "{VALID}{}",
        outgoing(3).replace("  connections: 3\n", "")
    ));
    assert_eq!(default.config.outgoing_server.unwrap().connections, 3);
}

#[test]
fn invalid_email_addresses() {
    let yaml = VALID.replace(
        "{ address: support@contoso.com, server: m365, sender: true }",
        "{ address: support-contoso.com, server: m365, account: \"a b@contoso.com\" }",
    );
    let outgoing = "outgoing_server:\n  host: h\n  login_address: \"https://l/t\"\n  auth: oauth_service\n  client_id: x\n  \
                    client_secret: s\n  username: not-an-address\n";
    let errs = errors(&format!("{yaml}{outgoing}"));
    has(
        &errs,
        16,
        &[
            "address",
            "`support-contoso.com` is not a valid email address",
        ],
    );
    has(
        &errs,
        16,
        &["account", "`a b@contoso.com` is not a valid email address"],
    );
    has(&errs, 23, &["outgoing_server.username", "`not-an-address`"]);
}

#[test]
fn invalid_language_tags() {
    let yaml = VALID
        .replace("languages: [en, de]", "languages: [en, english]")
        .replace(
            "  - name: support\n",
            "  - name: support\n    language: xx-\n",
        )
        .replace("sender: true }", "sender: true, language: \"de_CH\" }");
    let errs = errors(&format!("defaults:\n  language: zz\n{yaml}"));
    has(&errs, 2, &["defaults.language", "`zz`", "BCP 47"]);
    has(&errs, 7, &["api.tokens[0].languages[1]", "`english`"]);
    has(&errs, 17, &["queues[0].language", "`xx-`"]);
    has(&errs, 19, &["queues[0].addresses[0].language", "`de_CH`"]);
}

#[test]
fn token_endpoints_must_be_https_except_on_this_machine() {
    let errs = errors(&VALID.replace(
        "https://login.microsoftonline.com/tenant",
        "http://login.example.com/tenant",
    ));
    has(
        &errs,
        8,
        &["login_address `http://login.example.com/tenant` must be an https:// URL"],
    );
    for local in [
        "http://127.0.0.1:8443/tenant",
        "http://localhost:8443",
        "http://localhost/x",
    ] {
        loaded(&VALID.replace("https://login.microsoftonline.com/tenant", local));
    }
    let errs = errors(&VALID.replace(
        "login_address: \"https://login.microsoftonline.com/tenant\"",
        "token_endpoint: \"ftp://x\"",
    ));
    has(&errs, 8, &["token_endpoint `ftp://x`"]);
}

#[test]
fn servers_need_exactly_one_of_login_address_and_token_endpoint() {
    let errs = errors(&VALID.replace(
        "    login_address: \"https://login.microsoftonline.com/tenant\"\n",
        "",
    ));
    has(
        &errs,
        7,
        &["incoming server `m365` needs `login_address` (or `token_endpoint`)"],
    );
    let both = VALID.replace(
        "    auth: oauth_service\n",
        "    token_endpoint: \"https://l/t/oauth2/v2.0/token\"\n    auth: oauth_service\n",
    );
    has(
        &errors(&both),
        9,
        &["both `login_address` and `token_endpoint`"],
    );
    let outgoing = "outgoing_server:\n  host: h\n  auth: oauth_service\n  client_id: x\n  client_secret: s\n  username: bot@contoso.com\n";
    has(
        &errors(&format!("{VALID}{outgoing}")),
        18,
        &["the outgoing server needs `login_address`"],
    );
}

#[test]
fn intervals_must_be_positive() {
    let errs = errors(&format!(
        "defaults:\n  poll_interval: 0s\n  claim_lease: -5m\n{VALID}"
    ));
    has(
        &errs,
        2,
        &["defaults.poll_interval", "`0s` must be greater than zero"],
    );
    has(&errs, 3, &["defaults.claim_lease", "`-5m` is negative"]);
    has(
        &errors(&format!("defaults: {{ poll_interval: 30 }}\n{VALID}")),
        1,
        &["`30` is not a duration"],
    );
}

#[test]
fn missing_env_var_and_unreadable_file_are_named_without_values() {
    let yaml = VALID
        .replace(
            "secret: \"alice-token-value\"",
            "secret: { env: MQ_TEST_SURELY_UNSET_VARIABLE }",
        )
        .replace(
            "client_secret: \"client-secret-value\"",
            "client_secret: { file: no/such/secret }",
        );
    let errs = errors_in(Path::new("/etc/mq/t.yaml"), &yaml);
    let on = |line: usize, needle: &str| {
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("/etc/mq/t.yaml:{line}:")) && e.contains(needle)),
            "{errs:?}"
        )
    };
    on(
        5,
        "environment variable `MQ_TEST_SURELY_UNSET_VARIABLE` is not set",
    );
    // Relative files resolve against the config file's directory.
    on(11, "cannot read secret file `/etc/mq/no/such/secret`");
}

#[test]
fn secret_files_are_relative_to_the_config_and_trimmed() {
    let dir = std::env::temp_dir().join(format!("mq-config-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::write(dir.join("secrets/client"), "from-a-file\r\n").unwrap();
    let yaml = VALID.replace(
        "client_secret: \"client-secret-value\"",
        "client_secret: { file: secrets/client }",
    );
    std::fs::write(dir.join("mq.yaml"), &yaml).unwrap();
    let loaded = load(&dir.join("mq.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let secret = loaded.config.incoming_servers[0]
        .client_secret
        .as_ref()
        .unwrap();
    assert_eq!(secret.expose(), "from-a-file");
    assert!(!format!("{secret:?} {secret}").contains("from-a-file"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn api_tokens_rules() {
    let tokens = "    - { name: alice, role: agent, secret: \"alice-token-value\", queues: [sales] }\n    \
                  - { name: bob, role: agent, secret: \"\", queues: [support] }\n";
    let yaml = VALID.replacen(
        "incoming_servers:\n",
        &format!("{tokens}incoming_servers:\n"),
        1,
    );
    let errs = errors(&yaml);
    has(
        &errs,
        6,
        &["API token name `alice` is already used on line 5"],
    );
    has(
        &errs,
        6,
        &["unknown queue `sales`", "known queues: `support`"],
    );
    has(&errs, 6, &["same secret as token `alice` (line 5)"]);
    has(&errs, 7, &["API token `bob` is empty"]);
    never(&errs, "alice-token-value");
}

#[test]
fn database_url_and_listen_address() {
    let yaml = VALID
        .replace("sqlite://data/mailqueue.db", "mysql://root:hunter2@db/mq")
        .replace("listen: \"127.0.0.1:8080\"", "listen: \"localhost:8080\"");
    let errs = errors(&yaml);
    has(
        &errs,
        1,
        &[
            "database.url must start with `sqlite:` or `postgres://`",
            "`mysql://`",
        ],
    );
    has(
        &errs,
        3,
        &["api.listen `localhost:8080` is not a socket address"],
    );
    never(&errs, "hunter2");
    loaded(&VALID.replace(
        "sqlite://data/mailqueue.db",
        "postgresql://mq@db.internal/mq",
    ));
}

#[test]
fn warnings_for_inline_secrets_missing_sender_and_oauth_user_outgoing() {
    let w = warnings(VALID);
    has(&w, 5, &["API token `alice` is written inline", "env var"]);
    has(
        &w,
        11,
        &["client_secret of incoming server `m365` is written inline"],
    );
    never(&w, "client-secret-value");
    let w = warnings(&VALID.replace(", queues: [support]", ""));
    has(&w, 5, &["agent token `alice` lists no `queues`"]);
    let w = warnings(&VALID.replace(", sender: true", ""));
    has(&w, 15, &["queue `support` has no `sender: true` address"]);
    let outgoing = "outgoing_server:\n  host: h\n  login_address: \"https://l/t\"\n  auth: oauth_user\n  client_id: x\n  \
                    username: bot@contoso.com\n  password: { env: PATH }\n";
    has(
        &warnings(&format!("{VALID}{outgoing}")),
        20,
        &["`auth: oauth_user`", "prefer `oauth_service`"],
    );
}

#[test]
fn every_problem_is_reported_at_once_in_line_order() {
    let yaml = VALID
        .replace("port: 993", "port: 99300")
        .replace("server: m365, sender", "server: nowhere, sender")
        .replace("max_email_size_mb: 25", "")
        .replace(
            "database: { url: \"sqlite://data/mailqueue.db\" }",
            "database: { url: \"x\" }",
        );
    let errs = errors(&yaml);
    has(&errs, 1, &["database.url"]);
    has(&errs, 12, &["99300"]);
    has(&errs, 16, &["unknown server `nowhere`"]);
    let lines: Vec<usize> = errs
        .iter()
        .map(|e| e.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(lines.is_sorted(), "{errs:?}");
}

#[test]
fn a_type_error_does_not_cause_follow_up_errors() {
    // The server entry is broken, but addresses naming it must not also report "unknown server".
    let errs = errors(&VALID.replace("auth: oauth_service", "auth: oauth_services"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    has(
        &errs,
        9,
        &[
            "unknown variant `oauth_services`",
            "expected `oauth_user` or `oauth_service`",
        ],
    );
    // A broken address must not make its queue "empty".
    let errs = errors(&VALID.replace("{ address: support@contoso.com,", "{ address: 42,"));
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn errors_never_print_secret_values() {
    let yaml = VALID.replace(
        "secret: \"alice-token-value\"",
        "secret: [\"alice-token-value\"]",
    );
    let errs = errors(&yaml);
    has(&errs, 5, &["api.tokens[0].secret", "expected a secret"]);
    never(&errs, "alice-token-value");
    // Braces around a plain secret make it a mapping key; keys of a secret are not echoed either.
    let yaml = VALID.replace(
        "secret: \"alice-token-value\"",
        "secret: { alice-token-value }",
    );
    let errs = errors(&yaml);
    has(&errs, 5, &["api.tokens[0].secret", "unknown key"]);
    never(&errs, "alice-token-value");
    let errs = errors(&VALID.replace("secret: \"alice-token-value\"", "secret: 123456789"));
    has(&errs, 5, &["write an inline secret in quotes"]);
    never(&errs, "123456789");
}

#[test]
fn json_schema_is_json_and_documents_the_file() {
    let schema = mailqueue_config::json_schema();
    let text = serde_json::to_string(&schema).unwrap();
    let reparsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(reparsed.is_object());
    for needle in [
        "queues",
        "incoming_servers",
        "Queues and the mailboxes",
        "oauth_service",
    ] {
        assert!(text.contains(needle), "schema lacks {needle}");
    }
}
