//! The `ingest:` section: defaults, every field, and its rules reported with their lines.

use std::{path::Path, time::Duration};

use mailqueue_config::{AutomatedMail, Loaded, SenderLimit, load, load_str};

fn errors(yaml: &str) -> Vec<String> {
    match load_str(Path::new("t.yaml"), yaml) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn loaded(yaml: &str) -> Loaded {
    load_str(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("expected no errors, got:\n{e}"))
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

/// A valid file of 16 lines; the `ingest` section goes after it, from line 17.
const VALID: &str = r#"database: { url: "sqlite://data/mailqueue.db" }
api:
  listen: "127.0.0.1:8080"
  tokens:
    - { name: alice, role: agent, secret: { env: PATH }, queues: [support] }
incoming_servers:
  - name: m365
    login_address: "https://login.microsoftonline.com/tenant"
    auth: oauth_service
    client_id: "00000000-0000-0000-0000-000000000000"
    client_secret: { env: PATH }
    imap: { host: outlook.office365.com }
queues:
  - name: support
    addresses:
      - { address: support@contoso.com, server: m365, sender: true }
"#;

#[test]
fn defaults_without_an_ingest_section() {
    let l = loaded(VALID);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let i = &l.config.ingest;
    assert_eq!(i.automated_mail, AutomatedMail::Attach);
    assert_eq!(
        i.sender_limit,
        Some(SenderLimit {
            max: 30,
            per: mailqueue_config::Interval(Duration::from_secs(600))
        })
    );
    assert_eq!(i.quarantine_folder, "Quarantine");
    // An empty section means the same.
    let l = loaded(&format!("{VALID}ingest: {{}}\n"));
    assert_eq!(l.config.ingest.sender_limit.unwrap().max, 30);
}

#[test]
fn every_field_and_partial_sender_limits() {
    let yaml = format!(
        "{VALID}ingest:\n  automated_mail: quarantine\n  sender_limit: {{ max: 5, per: 1h }}\n  \
         quarantine_folder: \"Junk/Quarantäne\"\n"
    );
    let i = loaded(&yaml).config.ingest;
    assert_eq!(i.automated_mail, AutomatedMail::Quarantine);
    let limit = i.sender_limit.unwrap();
    assert_eq!((limit.max, limit.per.0), (5, Duration::from_secs(3600)));
    assert_eq!(i.quarantine_folder, "Junk/Quarantäne");

    let limit = loaded(&format!("{VALID}ingest:\n  sender_limit: {{ max: 50 }}\n"))
        .config
        .ingest
        .sender_limit
        .unwrap();
    assert_eq!((limit.max, limit.per.0), (50, Duration::from_secs(600)));
    let limit = loaded(&format!("{VALID}ingest:\n  sender_limit: {{ per: 1m }}\n"))
        .config
        .ingest
        .sender_limit
        .unwrap();
    assert_eq!((limit.max, limit.per.0), (30, Duration::from_secs(60)));
    // `null` turns the breaker off.
    for off in ["null", "~"] {
        let yaml = format!("{VALID}ingest:\n  sender_limit: {off}\n");
        assert_eq!(loaded(&yaml).config.ingest.sender_limit, None, "{off}");
    }
}

#[test]
fn type_errors_name_the_key_and_line() {
    let yaml = format!(
        "{VALID}ingest:\n  automated_mail: drop\n  sender_limit: {{ max: -1, per: 0s }}\n  \
         quarantine_folder: [a]\n  moderate: true\n"
    );
    let errs = errors(&yaml);
    has(
        &errs,
        18,
        &[
            "ingest.automated_mail",
            "unknown variant `drop`",
            "`attach` or `quarantine`",
        ],
    );
    has(&errs, 19, &["ingest.sender_limit.max", "-1"]);
    has(
        &errs,
        19,
        &["ingest.sender_limit.per", "`0s` must be greater than zero"],
    );
    has(&errs, 20, &["ingest.quarantine_folder"]);
    has(&errs, 21, &["unknown key `moderate`"]);
    let errs = errors(&format!(
        "{VALID}ingest:\n  sender_limit: {{ max: 3, window: 1m }}\n"
    ));
    has(&errs, 18, &["unknown key `window`", "`max`", "`per`"]);
    let errs = errors(&format!("{VALID}ingest: quarantine\n"));
    has(&errs, 17, &["ingest", "expected a mapping"]);
}

#[test]
fn sender_limit_max_must_be_at_least_one() {
    let errs = errors(&format!(
        "{VALID}ingest:\n  sender_limit:\n    max: 0\n    per: 5m\n"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    has(
        &errs,
        19,
        &[
            "ingest.sender_limit.max is 0",
            "at least 1",
            "sender_limit: null",
        ],
    );
}

#[test]
fn quarantine_folder_must_not_be_fetched_from() {
    let errs = errors(&format!("{VALID}ingest:\n  quarantine_folder: inbox\n"));
    has(
        &errs,
        18,
        &[
            "ingest.quarantine_folder `inbox`",
            "address `support@contoso.com` fetches from (line 16)",
            "fetched again",
        ],
    );
    let yaml = VALID.replace("sender: true }", "sender: true, folder: Support }");
    let errs = errors(&format!("{yaml}ingest: {{ quarantine_folder: Support }}\n"));
    has(&errs, 17, &["`Support` is the folder address"]);
    let errs = errors(&format!("{VALID}ingest:\n  quarantine_folder: \"  \"\n"));
    has(&errs, 18, &["ingest.quarantine_folder is empty"]);
    // Moving processed mail into the quarantine folder is allowed, with a warning.
    let yaml = VALID.replace(
        "sender: true }",
        "sender: true, after_fetch: { move: Quarantine } }",
    );
    let l = loaded(&yaml);
    let warnings: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    has(
        &warnings,
        16,
        &[
            "address `support@contoso.com` moves fetched mail to `Quarantine`",
            "ingest.quarantine_folder",
        ],
    );
}

#[test]
fn example_and_schema_document_the_section() {
    // SAFETY: these variables are read only by this test's `load`.
    unsafe {
        std::env::set_var("MQ_TOKEN_ALICE", "fake-alice-token");
        std::env::set_var("MQ_TOKEN_ROUTER", "fake-router-token");
        std::env::set_var("MQ_TOKEN_ADMIN", "fake-admin-token");
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/mailqueue.yaml");
    let l = load(&example).unwrap_or_else(|e| panic!("{e}"));
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let i = &l.config.ingest;
    assert_eq!(i.automated_mail, AutomatedMail::Attach);
    assert_eq!(i.sender_limit.unwrap().max, 30);
    assert_eq!(i.quarantine_folder, "Quarantine");
    let text = std::fs::read_to_string(&example).unwrap();
    for key in ["automated_mail:", "sender_limit:", "quarantine_folder:"] {
        assert!(text.contains(key), "the example lacks {key}");
    }

    let schema = serde_json::to_string(&mailqueue_config::json_schema()).unwrap();
    for needle in [
        "automated_mail",
        "sender_limit",
        "quarantine_folder",
        "Always quarantine it.",
        "per-sender rate breaker",
    ] {
        assert!(schema.contains(needle), "schema lacks {needle}");
    }
}
