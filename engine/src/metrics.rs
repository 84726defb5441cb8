//! The figures of `GET /metrics`, in the OpenMetrics text format that Prometheus scrapes.
//!
//! Two kinds of figures, and operators aggregate them differently across instances:
//! * **Database figures** (queues, outbox depth, the outgoing server's health) are read at every scrape by a few
//!   aggregate queries over partial indexes, so every instance reports the same truth: aggregate them with `max`.
//! * **Process figures** (claims, replies sent, HTTP requests, the mailboxes fetched here) count what this
//!   instance did since it started: aggregate them with `sum` (and `rate`).
//!
//! Labels name queues, languages, mailbox addresses, routes (the matched pattern, never a URL with ids) and the
//! outgoing server's `contact_information`: never a secret, a token name, a customer address or a mail's content.
//!
//! | metric | type | labels | from |
//! |---|---|---|---|
//! | `mailqueue_queue_waiting` | gauge | queue, language | database |
//! | `mailqueue_queue_claimed` | gauge | queue, language | database |
//! | `mailqueue_queue_oldest_waiting_age_seconds` | gauge | queue, language | database |
//! | `mailqueue_outbox_depth` | gauge | state (`pending`, `sending`) | database |
//! | `mailqueue_outgoing_unhealthy` | gauge (0/1) | host, contact_information | database (latest health event) |
//! | `mailqueue_database_up` | gauge (0/1) | | this scrape |
//! | `mailqueue_claims_total` | counter | queue, via (`claim`, `assign`) | process |
//! | `mailqueue_claims_empty_total` | counter | | process |
//! | `mailqueue_replies_total` | counter | outcome (`sent`, `retried`, `failed`) | process (outbox worker) |
//! | `mailqueue_http_request_duration_seconds` | histogram | method, route, status (`2xx`…) | process |
//! | `mailqueue_mailbox_fetched_total`, `…_quarantined_total` | counter | mailbox, queue | process (status board) |
//! | `mailqueue_mailbox_errors_total` | counter | mailbox, queue, class | process (status board) |
//! | `mailqueue_mailbox_state` | gauge (1) | mailbox, queue, state | process (status board) |
//! | `mailqueue_mailbox_last_success_timestamp_seconds` | gauge | mailbox, queue | process (status board) |
//! | `mailqueue_mailbox_lag_seconds` | gauge | mailbox, queue | process (status board) |
//! | `mailqueue_mailbox_token_expiry_timestamp_seconds` | gauge | mailbox, queue | process (status board) |
//! | `mailqueue_build_info` | info | version | process |

use chrono::{DateTime, Utc};
use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};
use std::{sync::atomic::AtomicU64, time::Duration};

use crate::{engine::Engine, mailboxes::MailboxStatus, queues::QueueStats, store};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the HTTP latency buckets, in seconds. Long polls (`GET /v1/events?wait=…`) land in the top
/// buckets; their route label keeps them apart from the rest.
const HTTP_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long a scrape waits for the database figures: well under Prometheus' default scrape timeout (10 s), so a
/// database that hangs still leaves the process figures and `mailqueue_database_up 0` to scrape.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(5);

type GaugeF64 = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClaimLabels {
    queue: String,
    /// `claim` (an agent's claim request) or `assign` (a router gave the contact to an agent).
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    /// The standard methods, else `other` (a client must not be able to invent label values).
    method: &'static str,
    /// The matched route pattern (`/v1/contacts/{id}`), or `unmatched`.
    route: String,
    /// `2xx`, `4xx`, …
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailboxLabels {
    mailbox: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailboxClassLabels {
    mailbox: String,
    queue: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailboxStateLabels {
    mailbox: String,
    queue: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLanguageLabels {
    queue: String,
    language: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutgoingLabels {
    host: String,
    contact_information: String,
}

/// How the outbox worker finished one attempt at a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// The server accepted it.
    Sent,
    /// A temporary failure: it is tried again later.
    Retried,
    /// A permanent failure, or an outcome that cannot be known: it is not tried again.
    Failed,
}

impl ReplyOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Retried => "retried",
            Self::Failed => "failed",
        }
    }
}

/// The process figures of this instance. Cheap to clone; clones count into the same figures.
#[derive(Clone, Debug)]
pub struct Metrics {
    claims: Family<ClaimLabels, Counter>,
    claims_empty: Counter,
    replies: Family<ReplyLabels, Counter>,
    http: Family<HttpLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            claims: Family::default(),
            claims_empty: Counter::default(),
            replies: Family::default(),
            http: Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS)),
        }
    }
}

impl Metrics {
    /// A contact of `queue` was claimed by an agent's request (`assigned` false) or assigned by a router.
    pub fn claimed(&self, queue: &str, assigned: bool) {
        let via = if assigned { "assign" } else { "claim" };
        self.claims
            .get_or_create(&ClaimLabels {
                queue: queue.to_owned(),
                via,
            })
            .inc();
    }

    /// A claim request found no waiting contact.
    pub fn claim_found_nothing(&self) {
        self.claims_empty.inc();
    }

    /// The outbox worker of this instance finished an attempt at a reply.
    pub fn reply(&self, outcome: ReplyOutcome) {
        self.replies
            .get_or_create(&ReplyLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// An HTTP request to `route` (the matched pattern, `None` when no route matched) was answered with `status`
    /// after `seconds`.
    pub fn http_request(&self, method: &str, route: Option<&str>, status: u16, seconds: f64) {
        let labels = HttpLabels {
            method: known_method(method),
            route: route.unwrap_or("unmatched").to_owned(),
            status: status_class(status),
        };
        self.http.get_or_create(&labels).observe(seconds);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "claims",
            "Contacts claimed by agents (via=claim) or assigned by a router (via=assign) through this instance",
            self.claims.clone(),
        );
        r.register(
            "claims_empty",
            "Claim requests to this instance that found no waiting contact",
            self.claims_empty.clone(),
        );
        r.register(
            "replies",
            "Attempts of this instance's outbox worker by outcome: sent, retried (temporary failure), failed",
            self.replies.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "HTTP requests answered by this instance, by method, route pattern and status class",
            Unit::Seconds,
            self.http.clone(),
        );
    }
}

fn known_method(method: &str) -> &'static str {
    const KNOWN: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("other")
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// What the database says at one scrape.
struct DatabaseFigures {
    queues: Vec<QueueStats>,
    /// `(pending, sending)`.
    outbox: (i64, i64),
    /// The kind of the latest `outgoing.unhealthy`/`outgoing.healthy` event.
    outgoing_health: Option<String>,
}

async fn database_figures(engine: &Engine) -> crate::Result<DatabaseFigures> {
    let dir = engine.queues().await;
    let ids: Vec<i64> = dir.by_name.values().map(|q| q.id).collect();
    Ok(DatabaseFigures {
        queues: crate::queues::stats(&engine.db, &dir, &ids).await?,
        outbox: store::outbox::depth(&engine.db).await?,
        outgoing_health: store::events::latest_outgoing_health(&engine.db).await?,
    })
}

/// The whole exposition: process figures, this instance's mailboxes and the database figures. When the database
/// does not answer, `mailqueue_database_up` is 0 and the database figures are left out (the rest still helps).
pub async fn render(engine: &Engine) -> String {
    let mut registry = Registry::with_prefix("mailqueue");
    registry.register(
        "build",
        "The running mailqueue version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    engine.metrics().register(&mut registry);
    register_mailboxes(&mut registry, &engine.mailboxes().snapshot(), Utc::now());

    let up = GaugeF64::default();
    registry.register(
        "database_up",
        "Whether the database answered this scrape's queries (1) or not (0)",
        up.clone(),
    );
    match tokio::time::timeout(DATABASE_TIMEOUT, database_figures(engine)).await {
        Ok(Ok(figures)) => {
            up.set(1.0);
            let config = engine.config().await;
            register_database(&mut registry, &figures, config.outgoing_server.as_ref());
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics: the database figures cannot be read"),
        Err(_) => tracing::warn!(
            "metrics: the database did not answer within {DATABASE_TIMEOUT:?}; its figures are left out"
        ),
    }

    let mut out = String::new();
    // Writing into a String cannot fail; an error here would be a bug in the encoder.
    if let Err(e) = text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "metrics: encoding failed");
    }
    out
}

fn timestamp(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// The mailboxes this instance knows (see `GET /v1/mailboxes`).
fn register_mailboxes(r: &mut Registry, mailboxes: &[MailboxStatus], now: DateTime<Utc>) {
    let fetched = Family::<MailboxLabels, Counter>::default();
    let quarantined = Family::<MailboxLabels, Counter>::default();
    let errors = Family::<MailboxClassLabels, Counter>::default();
    let state = Family::<MailboxStateLabels, GaugeF64>::default();
    let last_success = Family::<MailboxLabels, GaugeF64>::default();
    let lag = Family::<MailboxLabels, GaugeF64>::default();
    let token_expiry = Family::<MailboxLabels, GaugeF64>::default();
    for m in mailboxes {
        let labels = MailboxLabels {
            mailbox: m.address.clone(),
            queue: m.queue.clone(),
        };
        fetched.get_or_create(&labels).inc_by(m.fetched);
        quarantined.get_or_create(&labels).inc_by(m.quarantined);
        for (class, n) in &m.failures_by_class {
            let labels = MailboxClassLabels {
                mailbox: m.address.clone(),
                queue: m.queue.clone(),
                class: class.clone(),
            };
            errors.get_or_create(&labels).inc_by(*n);
        }
        let labels_state = MailboxStateLabels {
            mailbox: m.address.clone(),
            queue: m.queue.clone(),
            state: m.state.as_str(),
        };
        state.get_or_create(&labels_state).set(1.0);
        if let Some(t) = m.last_fetch_at {
            last_success.get_or_create(&labels).set(timestamp(t));
        }
        if let Some(l) = m.lag(now) {
            lag.get_or_create(&labels)
                .set(l.num_milliseconds() as f64 / 1000.0);
        }
        if let Some(t) = m.token_expires_at {
            token_expiry.get_or_create(&labels).set(timestamp(t));
        }
    }
    r.register(
        "mailbox_fetched",
        "Mails stored from the mailbox by this instance (new contacts and mail that joined one)",
        fetched,
    );
    r.register(
        "mailbox_quarantined",
        "Mails of the mailbox this instance quarantined",
        quarantined,
    );
    r.register(
        "mailbox_errors",
        "Failed attempts at the mailbox on this instance, by class (token, auth, connect, tls, store, …)",
        errors,
    );
    r.register(
        "mailbox_state",
        "What this instance's worker for the mailbox is doing (1 for the current state)",
        state,
    );
    r.register_with_unit(
        "mailbox_last_success_timestamp",
        "When a fetch pass of the mailbox last completed without error (Unix time)",
        Unit::Seconds,
        last_success,
    );
    r.register_with_unit(
        "mailbox_lag",
        "How far behind the mailbox may be: 0 while IDLE, else the time since it was last known to be fully stored",
        Unit::Seconds,
        lag,
    );
    r.register_with_unit(
        "mailbox_token_expiry_timestamp",
        "When the access token of the mailbox's current session expires (Unix time)",
        Unit::Seconds,
        token_expiry,
    );
}

/// The figures every instance reads from the database alike.
fn register_database(
    r: &mut Registry,
    db: &DatabaseFigures,
    outgoing: Option<&mailqueue_config::OutgoingServer>,
) {
    let waiting = Family::<QueueLanguageLabels, GaugeF64>::default();
    let claimed = Family::<QueueLanguageLabels, GaugeF64>::default();
    let oldest = Family::<QueueLanguageLabels, GaugeF64>::default();
    for q in &db.queues {
        // A queue with no open contact still shows, at 0, in its own language.
        if q.by_language.is_empty() {
            let labels = QueueLanguageLabels {
                queue: q.name.clone(),
                language: q.language.clone(),
            };
            waiting.get_or_create(&labels).set(0.0);
            claimed.get_or_create(&labels).set(0.0);
            oldest.get_or_create(&labels).set(0.0);
        }
        for l in &q.by_language {
            let labels = QueueLanguageLabels {
                queue: q.name.clone(),
                language: l.language.clone(),
            };
            waiting.get_or_create(&labels).set(l.waiting as f64);
            claimed.get_or_create(&labels).set(l.claimed as f64);
            let age = l.oldest_waiting_seconds.unwrap_or(0);
            oldest.get_or_create(&labels).set(age as f64);
        }
    }
    r.register(
        "queue_waiting",
        "Contacts waiting to be claimed, by queue and language",
        waiting,
    );
    r.register(
        "queue_claimed",
        "Contacts claimed by an agent, by queue and language",
        claimed,
    );
    r.register_with_unit(
        "queue_oldest_waiting_age",
        "Age of the oldest waiting contact, by queue and language (0 when none waits)",
        Unit::Seconds,
        oldest,
    );

    let depth = Family::<StateLabels, GaugeF64>::default();
    depth
        .get_or_create(&StateLabels { state: "pending" })
        .set(db.outbox.0 as f64);
    depth
        .get_or_create(&StateLabels { state: "sending" })
        .set(db.outbox.1 as f64);
    r.register(
        "outbox_depth",
        "Replies not yet sent: pending (waiting for their attempt) and sending",
        depth,
    );

    if let Some(server) = outgoing {
        let unhealthy = Family::<OutgoingLabels, GaugeF64>::default();
        let labels = OutgoingLabels {
            host: server.host.clone(),
            contact_information: server.contact_information.clone().unwrap_or_default(),
        };
        let value = db.outgoing_health.as_deref() == Some("outgoing.unhealthy");
        unhealthy
            .get_or_create(&labels)
            .set(if value { 1.0 } else { 0.0 });
        r.register(
            "outgoing_unhealthy",
            "Whether the outgoing server keeps failing (1) or works (0), as its latest health event says; \
             alert contact_information",
            unhealthy,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailboxes::MailboxState;

    fn encode(r: &Registry) -> String {
        let mut out = String::new();
        text::encode(&mut out, r).unwrap();
        out
    }

    #[test]
    fn process_figures_count_by_their_labels() {
        let m = Metrics::default();
        m.claimed("support", false);
        m.claimed("support", false);
        m.claimed("sales", true);
        m.claim_found_nothing();
        m.reply(ReplyOutcome::Sent);
        m.http_request("GET", Some("/v1/contacts/{id}"), 200, 0.003);
        m.http_request("BREW", None, 404, 0.2);
        let mut r = Registry::with_prefix("mailqueue");
        m.register(&mut r);
        let out = encode(&r);
        for line in [
            "mailqueue_claims_total{queue=\"support\",via=\"claim\"} 2",
            "mailqueue_claims_total{queue=\"sales\",via=\"assign\"} 1",
            "mailqueue_claims_empty_total 1",
            "mailqueue_replies_total{outcome=\"sent\"} 1",
            "# UNIT mailqueue_http_request_duration_seconds seconds",
            "mailqueue_http_request_duration_seconds_bucket{le=\"0.005\",method=\"GET\",route=\"/v1/contacts/{id}\",status=\"2xx\"} 1",
            "mailqueue_http_request_duration_seconds_count{method=\"other\",route=\"unmatched\",status=\"4xx\"} 1",
        ] {
            assert!(out.contains(line), "missing `{line}` in:\n{out}");
        }
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn mailbox_figures_come_from_the_status_board_and_labels_are_escaped() {
        let now = Utc::now();
        let mut s = MailboxStatus::new(
            "a\"b\\c\n@x.com",
            "support",
            "m365",
            "oauth_service",
            "a@x.com",
            "INBOX",
        );
        s.fetched = 7;
        s.failures_by_class.insert("token".into(), 3);
        s.state = MailboxState::Idle;
        s.last_fetch_at = Some(DateTime::from_timestamp(1_700_000_000, 500_000_000).unwrap());
        s.token_expires_at = Some(DateTime::from_timestamp(1_700_003_600, 0).unwrap());
        let mut r = Registry::with_prefix("mailqueue");
        register_mailboxes(&mut r, &[s], now);
        let out = encode(&r);
        let labels = r#"mailbox="a\"b\\c\n@x.com",queue="support""#;
        for line in [
            format!("mailqueue_mailbox_fetched_total{{{labels}}} 7"),
            format!("mailqueue_mailbox_errors_total{{{labels},class=\"token\"}} 3"),
            format!("mailqueue_mailbox_state{{{labels},state=\"idle\"}} 1.0"),
            format!("mailqueue_mailbox_lag_seconds{{{labels}}} 0.0"),
            format!("mailqueue_mailbox_last_success_timestamp_seconds{{{labels}}} 1700000000.5"),
            format!("mailqueue_mailbox_token_expiry_timestamp_seconds{{{labels}}} 1700003600.0"),
        ] {
            assert!(out.contains(&line), "missing `{line}` in:\n{out}");
        }
    }

    #[test]
    fn methods_and_statuses_are_bounded() {
        assert_eq!(known_method("DELETE"), "DELETE");
        assert_eq!(known_method("get"), "other");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(999), "5xx");
    }
}
