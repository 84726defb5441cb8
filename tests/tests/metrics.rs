//! `GET /metrics`: the exposition parses as strict OpenMetrics text (the format Prometheus scrapes), and its figures
//! are the truth: queue figures, claims, outbox depth and HTTP latency over PostgreSQL and SQLite; per-mailbox
//! figures against the local Microsoft 365 sandbox; the outgoing server's health from its latest event; the same
//! database figures on two instances; a database outage; who may read it.

use std::{collections::BTreeMap, time::Duration};

use mailqueue_engine::store::events::{NewEvent, insert};
use mailqueue_sandbox::Sandbox;
use mailqueue_tests::{
    Kind, SandboxConfig, TestApp, TestDb, both_backends, config_yaml, eventually, mail,
    parse_config, pg_admin_url, seed_contact, spawn_app, spawn_app_with,
};
use sea_orm::ConnectionTrait;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// ---- A strict OpenMetrics text parser (what Prometheus accepts as `application/openmetrics-text`) ----

#[derive(Debug, Default)]
struct Family {
    kind: String,
    unit: Option<String>,
    help: Option<String>,
    samples: Vec<Sample>,
}

type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The suffixes a sample of a family of `kind` may add to the family name.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" | "gaugehistogram" => &["_bucket", "_count", "_sum", "_created"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn parse_value(s: &str, at: &str) -> f64 {
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s
            .parse()
            .unwrap_or_else(|_| panic!("{at}: `{s}` is not a number")),
    }
}

/// `{a="x",b="y"}` at the start of `s`: the labels and the rest after `}`.
fn parse_labels<'a>(s: &'a str, at: &str) -> (BTreeMap<String, String>, &'a str) {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').expect("starts with {");
    if let Some(after) = rest.strip_prefix('}') {
        return (labels, after);
    }
    loop {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("{at}: a label without `=\"`"));
        assert!(is_label_name(name), "{at}: bad label name `{name}`");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("{at}: bad escape {other:?} in a label value"),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) => panic!("{at}: raw newline in a label value"),
                Some((_, c)) => value.push(c),
                None => panic!("{at}: unterminated label value"),
            }
        };
        assert!(
            labels.insert(name.to_owned(), value).is_none(),
            "{at}: label `{name}` twice"
        );
        rest = &after[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        } else {
            panic!("{at}: expected `,` or `}}` after a label");
        }
    }
}

/// Parses `text` and panics at the first line that breaks the format: metadata before samples, families not
/// interleaved, sample names that belong to their family's type, well-formed labels and numbers, `# EOF` last.
fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    let body = text
        .strip_suffix("# EOF\n")
        .expect("the exposition ends with `# EOF`");
    let mut current: Option<String> = None;
    for (i, line) in body.lines().enumerate() {
        let at = format!("line {}: `{line}`", i + 1);
        assert!(!line.is_empty(), "{at}: empty line");
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (word, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            let arg = parts.next().unwrap_or("");
            assert!(is_metric_name(name), "{at}: bad metric name");
            if current.as_deref() != Some(name) {
                assert!(
                    !out.families.contains_key(name),
                    "{at}: family `{name}` appears twice"
                );
                current = Some(name.to_owned());
            }
            let f = out.families.entry(name.to_owned()).or_default();
            assert!(f.samples.is_empty(), "{at}: metadata after samples");
            match word {
                "TYPE" => {
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&arg),
                        "{at}: unknown type"
                    );
                    f.kind = arg.to_owned();
                }
                "HELP" => f.help = Some(arg.to_owned()),
                "UNIT" => {
                    assert!(name.ends_with(&format!("_{arg}")), "{at}: name lacks unit");
                    f.unit = Some(arg.to_owned());
                }
                _ => panic!("{at}: unknown metadata"),
            }
            continue;
        }
        assert!(
            !line.starts_with('#'),
            "{at}: a comment other than metadata"
        );
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], &at)
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("{at}: no value"))
            .split(' ');
        let value = parse_value(fields.next().unwrap(), &at);
        assert!(fields.count() <= 1, "{at}: more than a value and timestamp");
        let family = current
            .clone()
            .unwrap_or_else(|| panic!("{at}: sample before any TYPE"));
        let f = out.families.get_mut(&family).unwrap();
        assert!(!f.kind.is_empty(), "{at}: family has no TYPE");
        assert!(
            suffixes(&f.kind)
                .iter()
                .any(|s| name == format!("{family}{s}")),
            "{at}: sample `{name}` does not belong to {} `{family}`",
            f.kind
        );
        f.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out.check_histograms();
    out
}

impl Exposition {
    /// Every histogram series: `le` ascending, counts cumulative (never decreasing), `+Inf` equal to `_count`.
    fn check_histograms(&self) {
        for (name, f) in self.families.iter().filter(|(_, f)| f.kind == "histogram") {
            // Per series (labels without `le`): `(le, count)` in order of appearance.
            let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
            for s in f.samples.iter().filter(|s| s.name.ends_with("_bucket")) {
                let mut key = s.labels.clone();
                let le = parse_value(&key.remove("le").expect("a bucket has `le`"), name);
                series.entry(key).or_default().push((le, s.value));
            }
            for (key, buckets) in series {
                for w in buckets.windows(2) {
                    assert!(w[0].0 < w[1].0, "{name}{key:?}: `le` not ascending");
                    assert!(w[0].1 <= w[1].1, "{name}{key:?}: bucket counts decrease");
                }
                let (le, inf) = *buckets.last().unwrap();
                assert!(le.is_infinite(), "{name}{key:?}: no +Inf bucket");
                let count = f
                    .samples
                    .iter()
                    .find(|s| s.name == format!("{name}_count") && s.labels == key)
                    .expect("a _count per series");
                assert_eq!(count.value, inf, "{name}{key:?}: +Inf bucket != _count");
            }
        }
    }

    fn family(&self, name: &str) -> &Family {
        self.families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name}"))
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }
}

/// `GET /metrics` with `token` (none when empty): checks status and content type, parses strictly.
async fn scrape(app: &TestApp, token: &str) -> Exposition {
    let r = app.get("/metrics", token).await;
    assert_eq!(r.status(), 200, "GET /metrics");
    assert_eq!(r.headers()["content-type"], OPENMETRICS);
    parse(&r.text().await.unwrap())
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    let ok = "# HELP a_seconds A.\n# TYPE a_seconds gauge\n# UNIT a_seconds seconds\na_seconds{x=\"q\\\"\\n\"} 1.5\n# EOF\n";
    assert_eq!(parse(ok).get("a_seconds", &[("x", "q\"\n")]), 1.5);
    for bad in [
        "# TYPE a gauge\na 1\n",                                             // no EOF
        "a 1\n# EOF\n",                                                      // no TYPE
        "# TYPE a counter\na 1\n# EOF\n", // counter sample without _total
        "# TYPE a gauge\na{x=\"\\t\"} 1\n# EOF\n", // bad escape
        "# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n# EOF\n", // duplicate label
        "# TYPE a gauge\na one\n# EOF\n", // not a number
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n# EOF\n", // interleaved
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n# EOF\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "accepted:\n{bad}"
        );
    }
}

// ---- Queue figures, claims, outbox depth, HTTP latency (both backends) ----

async fn queue_figures(kind: Kind) {
    let app = spawn_app(kind).await;
    let e = &app.engine;
    seed_contact(e, "support", "en", 5, 120).await;
    seed_contact(e, "support", "en", 5, 30).await;
    seed_contact(e, "support", "de", 5, 60).await;
    seed_contact(e, "sales", "fr", 1, 10).await;

    // alice takes the oldest of support; bob takes sales, then finds nothing.
    let r = app.post("/v1/contacts/claim", "alice-token", None).await;
    assert_eq!(r.status(), 200);
    let claimed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        app.post("/v1/contacts/claim", "bob-token", None)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post("/v1/contacts/claim", "bob-token", None)
            .await
            .status(),
        204
    );
    // A reply waits in the outbox (no outgoing server is configured, so nothing sends it).
    let id = claimed["id"].as_i64().unwrap();
    let r = app
        .post(
            &format!("/v1/contacts/{id}/replies"),
            "alice-token",
            Some(json!({ "text": "We are on it.", "to": ["customer@example.com"] })),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(
        app.get(&format!("/v1/contacts/{id}"), "alice-token")
            .await
            .status(),
        200
    );

    let m = scrape(&app, "router-token").await;
    let ql = |q: &'static str, l: &'static str| [("queue", q), ("language", l)];
    assert_eq!(m.get("mailqueue_queue_waiting", &ql("support", "en")), 1.0);
    assert_eq!(m.get("mailqueue_queue_claimed", &ql("support", "en")), 1.0);
    assert_eq!(m.get("mailqueue_queue_waiting", &ql("support", "de")), 1.0);
    assert_eq!(m.get("mailqueue_queue_claimed", &ql("support", "de")), 0.0);
    assert_eq!(m.get("mailqueue_queue_waiting", &ql("sales", "fr")), 0.0);
    assert_eq!(m.get("mailqueue_queue_claimed", &ql("sales", "fr")), 1.0);
    // vip has no contact: it shows at 0 in its language (the default, en).
    assert_eq!(m.get("mailqueue_queue_waiting", &ql("vip", "en")), 0.0);
    // The oldest waiting contact of support/en is the 30 s one now that the 120 s one is claimed.
    let age = m.get(
        "mailqueue_queue_oldest_waiting_age_seconds",
        &ql("support", "en"),
    );
    assert!((29.0..120.0).contains(&age), "support/en oldest age {age}");
    let age = m.get(
        "mailqueue_queue_oldest_waiting_age_seconds",
        &ql("support", "de"),
    );
    assert!(age >= 59.0, "support/de oldest age {age}");
    assert_eq!(
        m.get(
            "mailqueue_queue_oldest_waiting_age_seconds",
            &ql("sales", "fr")
        ),
        0.0
    );
    assert_eq!(
        m.family("mailqueue_queue_oldest_waiting_age_seconds")
            .unit
            .as_deref(),
        Some("seconds")
    );

    assert_eq!(
        m.get(
            "mailqueue_claims_total",
            &[("queue", "support"), ("via", "claim")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "mailqueue_claims_total",
            &[("queue", "sales"), ("via", "claim")]
        ),
        1.0
    );
    assert_eq!(m.get("mailqueue_claims_empty_total", &[]), 1.0);
    assert_eq!(
        m.get("mailqueue_outbox_depth", &[("state", "pending")]),
        1.0
    );
    assert_eq!(
        m.get("mailqueue_outbox_depth", &[("state", "sending")]),
        0.0
    );
    assert_eq!(m.get("mailqueue_database_up", &[]), 1.0);
    assert_eq!(m.family("mailqueue_build").kind, "info");
    // No outgoing server configured: no health series.
    assert!(!m.families.contains_key("mailqueue_outgoing_unhealthy"));

    // HTTP: the route pattern, never the URL with its id; three claims answered 2xx (200, 200, 204).
    let http = "mailqueue_http_request_duration_seconds";
    let claim = [
        ("method", "POST"),
        ("route", "/v1/contacts/claim"),
        ("status", "2xx"),
    ];
    assert_eq!(m.get(&format!("{http}_count"), &claim), 3.0);
    let detail = [
        ("method", "GET"),
        ("route", "/v1/contacts/{id}"),
        ("status", "2xx"),
    ];
    assert_eq!(m.get(&format!("{http}_count"), &detail), 1.0);
    let text = app
        .get("/metrics", "router-token")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains(&format!("/v1/contacts/{id}")),
        "a raw URL in a label"
    );
    for leak in [
        "router-token",
        "alice",
        "customer@example.com",
        "We are on it",
    ] {
        assert!(!text.contains(leak), "`{leak}` in the metrics:\n{text}");
    }
    // The scrape before this one is counted too.
    let m = scrape(&app, "admin-token").await;
    let scrapes = [("method", "GET"), ("route", "/metrics"), ("status", "2xx")];
    assert!(m.get(&format!("{http}_count"), &scrapes) >= 2.0);

    // Who may read it: router and admin; not agents, not without a token (the default `api.metrics: token`).
    assert_eq!(app.get("/metrics", "alice-token").await.status(), 403);
    assert_eq!(app.get("/metrics", "").await.status(), 401);
    assert_eq!(app.get("/metrics", "nonsense").await.status(), 401);
    let openapi: serde_json::Value = app.get("/openapi.json", "").await.json().await.unwrap();
    assert!(openapi["paths"]["/metrics"]["get"].is_object());
    app.stop().await;
}

both_backends! {
    queue_figures_claims_outbox_depth_and_http_latency => queue_figures;
}

// ---- Two instances on one PostgreSQL ----

/// Database figures are the same on every instance (aggregate with `max`); process figures count what each
/// instance did (aggregate with `sum`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_report_the_same_queues_and_their_own_claims() {
    let a = spawn_app(Kind::Postgres).await;
    let b = mailqueue_engine::startup::spawn(parse_config(&config_yaml(&a.db.url)))
        .await
        .expect("a second instance starts");
    for age in [30, 20, 10] {
        seed_contact(&a.engine, "support", "en", 5, age).await;
    }
    assert_eq!(
        a.post("/v1/contacts/claim", "alice-token", None)
            .await
            .status(),
        200
    );

    let on_b = a
        .client
        .get(format!("http://{}/metrics", b.addr))
        .bearer_auth("router-token")
        .send()
        .await
        .unwrap();
    assert_eq!(on_b.status(), 200);
    let on_b = parse(&on_b.text().await.unwrap());
    let on_a = scrape(&a, "router-token").await;
    let support = [("queue", "support"), ("language", "en")];
    for m in [&on_a, &on_b] {
        assert_eq!(m.get("mailqueue_queue_waiting", &support), 2.0);
        assert_eq!(m.get("mailqueue_queue_claimed", &support), 1.0);
    }
    let claim = [("queue", "support"), ("via", "claim")];
    assert_eq!(on_a.get("mailqueue_claims_total", &claim), 1.0);
    assert_eq!(on_b.value("mailqueue_claims_total", &claim), None);
    b.stop().await;
    a.stop().await;
}

// ---- A database outage: reported, not fatal ----

/// Refuses (`false`) or allows new connections to the test database, and ends the open ones when refusing.
async fn database_accepts_connections(db: &TestDb, allow: bool) {
    let name = db.url.rsplit('/').next().unwrap();
    let admin = sea_orm::Database::connect(pg_admin_url()).await.unwrap();
    admin
        .execute_unprepared(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}"))
        .await
        .unwrap();
    if !allow {
        admin
            .execute_unprepared(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            ))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_leaves_the_process_figures_and_database_up_0() {
    let app = spawn_app(Kind::Postgres).await;
    seed_contact(&app.engine, "support", "en", 5, 10).await;
    assert_eq!(
        scrape(&app, "router-token")
            .await
            .get("mailqueue_database_up", &[]),
        1.0
    );

    database_accepts_connections(&app.db, false).await;
    let m = scrape(&app, "router-token").await;
    assert_eq!(m.get("mailqueue_database_up", &[]), 0.0);
    assert!(!m.families.contains_key("mailqueue_queue_waiting"));
    let scrapes = [("method", "GET"), ("route", "/metrics"), ("status", "2xx")];
    assert_eq!(
        m.get("mailqueue_http_request_duration_seconds_count", &scrapes),
        1.0
    );

    database_accepts_connections(&app.db, true).await;
    let m = eventually("the database figures back", WAIT, async || {
        let m = scrape(&app, "router-token").await;
        (m.value("mailqueue_database_up", &[]) == Some(1.0)).then_some(m)
    })
    .await;
    let support = [("queue", "support"), ("language", "en")];
    assert_eq!(m.get("mailqueue_queue_waiting", &support), 1.0);
    app.stop().await;
}

// ---- Mailboxes and the outgoing server's health, against the sandbox ----

async fn health_event(app: &TestApp, kind: &str) {
    let event = NewEvent {
        kind,
        contact_id: None,
        queue: None,
        actor: None,
        data: json!({ "host": "test" }),
    };
    insert(&app.engine.db, event).await.expect("insert event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mailbox_figures_and_outgoing_health() {
    let sb = Sandbox::shared().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let (mut config, boxes) = SandboxConfig::standard(sb, &db.url, "metrics");
    config.extra = mailqueue_tests::sandbox_outgoing_yaml(
        sb,
        &boxes.service,
        "Ops \"on call\" <ops@example.com>",
    );
    // Prometheus without a token: `api.metrics: public`.
    let yaml = config
        .yaml()
        .replacen("api:\n", "api:\n  metrics: public\n", 1);
    let app = spawn_app_with(db, &yaml).await;
    for i in 0..2 {
        let id = format!("metrics-{i}-{}@example.com", rand::random::<u32>());
        let m = mail(
            "customer@example.com",
            &boxes.service,
            "Order",
            &id,
            "Where is it?",
        );
        sb.deliver(&boxes.service, &m).unwrap();
    }

    let labels = [("mailbox", boxes.service.as_str()), ("queue", "support")];
    let m = eventually("2 mails fetched, mailbox idle", WAIT, async || {
        let m = scrape(&app, "").await;
        let idle = [
            ("mailbox", boxes.service.as_str()),
            ("queue", "support"),
            ("state", "idle"),
        ];
        (m.value("mailqueue_mailbox_fetched_total", &labels) == Some(2.0)
            && m.value("mailqueue_mailbox_state", &idle) == Some(1.0))
        .then_some(m)
    })
    .await;
    let now = chrono::Utc::now().timestamp() as f64;
    let expiry = m.get("mailqueue_mailbox_token_expiry_timestamp_seconds", &labels);
    assert!(
        expiry > now,
        "token expiry {expiry} is not in the future (now {now})"
    );
    let success = m.get("mailqueue_mailbox_last_success_timestamp_seconds", &labels);
    assert!(
        success > now - 300.0 && success <= now + 1.0,
        "last success {success}, now {now}"
    );
    assert_eq!(
        m.get("mailqueue_mailbox_lag_seconds", &labels),
        0.0,
        "idle: no lag"
    );
    assert_eq!(m.get("mailqueue_mailbox_quarantined_total", &labels), 0.0);
    // The sales mailbox (a user's own) shows too; no errors anywhere.
    let user = [("mailbox", boxes.user.as_str()), ("queue", "sales")];
    assert!(m.value("mailqueue_mailbox_fetched_total", &user).is_some());
    let errors = m.families.get("mailqueue_mailbox_errors");
    assert!(errors.is_none_or(|f| f.samples.is_empty()), "{errors:?}");
    // Two contacts wait in support (language de, by the address).
    let support = [("queue", "support"), ("language", "de")];
    assert_eq!(m.get("mailqueue_queue_waiting", &support), 2.0);

    // The outgoing server's health follows its latest event, whichever instance wrote it.
    let contact = "Ops \"on call\" <ops@example.com>";
    let host = sb.mail_host().to_string();
    let outgoing = [("host", host.as_str()), ("contact_information", contact)];
    assert_eq!(m.get("mailqueue_outgoing_unhealthy", &outgoing), 0.0);
    health_event(&app, "outgoing.unhealthy").await;
    assert_eq!(
        scrape(&app, "")
            .await
            .get("mailqueue_outgoing_unhealthy", &outgoing),
        1.0
    );
    health_event(&app, "outgoing.healthy").await;
    assert_eq!(
        scrape(&app, "")
            .await
            .get("mailqueue_outgoing_unhealthy", &outgoing),
        0.0
    );

    // A reply goes out through the sandbox's SMTP server: counted as sent, and the outbox is empty again.
    let r = app.post("/v1/contacts/claim", "alice-token", None).await;
    assert_eq!(r.status(), 200);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let r = app
        .post(
            &format!("/v1/contacts/{id}/replies"),
            "alice-token",
            Some(json!({ "text": "It ships today." })),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let m = eventually("the reply counted as sent", WAIT, async || {
        let m = scrape(&app, "").await;
        (m.value("mailqueue_replies_total", &[("outcome", "sent")]) == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(
        m.get("mailqueue_outbox_depth", &[("state", "pending")]),
        0.0
    );
    assert_eq!(
        m.get("mailqueue_outbox_depth", &[("state", "sending")]),
        0.0
    );
    assert_eq!(m.get("mailqueue_queue_claimed", &support), 1.0);
    assert_eq!(
        m.get(
            "mailqueue_claims_total",
            &[("queue", "support"), ("via", "claim")]
        ),
        1.0
    );

    // Public: a token is not needed, and none leaks.
    let text = app.get("/metrics", "").await.text().await.unwrap();
    for secret in [
        sb.service_app().client_secret.as_str(),
        boxes.user_password.as_str(),
    ] {
        assert!(!text.contains(secret), "a secret in the metrics");
    }
    app.stop().await;
}
