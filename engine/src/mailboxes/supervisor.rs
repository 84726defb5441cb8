//! The supervisor: one worker task per queue address of every enabled incoming server, sharing one token cache,
//! each with its own status entry. A worker that panics is restarted after a pause; the others never notice. It
//! ends when every worker has stopped (after the shutdown token fired).

use std::{collections::HashMap, sync::Arc, time::Duration};

use mailqueue_config::Config;
use mailqueue_connectors::oauth::{TokenCache, TokenRequest};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    status::{MailboxError, MailboxStatus},
    worker::{Mailbox, Server, Settings, Worker},
};
use crate::engine::Engine;

/// A crashed worker is restarted after this pause.
const RESTART_PAUSE: Duration = Duration::from_secs(5);

/// What the configuration asks to fetch.
pub struct Plan {
    pub settings: Arc<Settings>,
    pub mailboxes: Vec<Arc<Mailbox>>,
    /// Names of the servers with `enabled: false`, with how many addresses they have.
    pub disabled: Vec<(String, usize)>,
    /// Addresses whose server is not configured (`load` rejects such configurations; kept for safety).
    pub unknown_server: Vec<String>,
    /// The extra CA files of the enabled servers, for the token endpoint's HTTPS.
    pub ca_files: Vec<std::path::PathBuf>,
}

impl Plan {
    pub fn from_config(config: &Config) -> Self {
        let mut servers: HashMap<&str, Arc<Server>> = HashMap::new();
        let mut disabled: Vec<(String, usize)> = Vec::new();
        let mut ca_files = Vec::new();
        for s in &config.incoming_servers {
            if servers.contains_key(s.name.as_str()) || disabled.iter().any(|(n, _)| *n == s.name) {
                continue;
            }
            if !s.enabled {
                disabled.push((s.name.clone(), 0));
                continue;
            }
            if let Some(ca) = &s.ca_file
                && !ca_files.contains(ca)
            {
                ca_files.push(ca.clone());
            }
            servers.insert(&s.name, Arc::new(Server::new(s.clone())));
        }
        let mut mailboxes = Vec::new();
        let mut unknown_server = Vec::new();
        for queue in &config.queues {
            for a in &queue.addresses {
                if let Some((_, n)) = disabled.iter_mut().find(|(n, _)| *n == a.server) {
                    *n += 1;
                    continue;
                }
                let Some(server) = servers.get(a.server.as_str()) else {
                    unknown_server.push(a.address.to_string());
                    continue;
                };
                mailboxes.push(Arc::new(Mailbox {
                    address: a.address.to_string(),
                    queue: queue.name.clone(),
                    login: a.login().to_string(),
                    folder: a.folder.clone(),
                    after_fetch: a.after_fetch.clone(),
                    request: TokenRequest::for_mailbox(&server.config, a),
                    server: server.clone(),
                }));
            }
        }
        Self {
            settings: Arc::new(Settings::from_config(config)),
            mailboxes,
            disabled,
            unknown_server,
            ca_files,
        }
    }
}

/// One token cache for every mailbox, trusting the servers' `ca_file`s as extra roots (for an https token endpoint
/// behind a private CA, like the sandbox's).
pub fn token_cache(ca_files: &[std::path::PathBuf]) -> TokenCache {
    let mut builder = TokenCache::builder();
    for path in ca_files {
        match std::fs::read(path) {
            Ok(pem) => builder = builder.add_root_certificate_pem(pem),
            Err(e) => tracing::warn!(
                ca_file = %path.display(),
                error = %e,
                "cannot read the CA file; the token endpoint is checked without it"
            ),
        }
    }
    builder.build().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot use the CA files for the token endpoint; using the system roots");
        TokenCache::new()
    })
}

/// Starts a worker per queue address of the enabled servers and returns the supervisor's task. Status entries
/// are registered before this returns, so `GET /v1/mailboxes` lists every mailbox at once.
pub fn spawn(engine: Engine, config: &Config, stop: CancellationToken) -> JoinHandle<()> {
    let plan = Plan::from_config(config);
    for (name, addresses) in &plan.disabled {
        tracing::info!(
            server = %name,
            addresses,
            "incoming server `{name}` is disabled (`enabled: false`); its {addresses} address(es) are not fetched"
        );
    }
    for address in &plan.unknown_server {
        tracing::error!(%address, "address names an incoming server that is not configured; not fetched");
    }
    let tokens = token_cache(&plan.ca_files);
    let workers: Vec<Worker> = plan
        .mailboxes
        .iter()
        .map(|m| Worker {
            engine: engine.clone(),
            status: engine.mailboxes().register(MailboxStatus::new(
                &m.address,
                &m.queue,
                &m.server.config.name,
                m.server.auth_name(),
                &m.login,
                &m.folder,
            )),
            mailbox: m.clone(),
            tokens: tokens.clone(),
            settings: plan.settings.clone(),
            stop: stop.clone(),
        })
        .collect();
    tracing::info!(
        mailboxes = workers.len(),
        poll_interval = ?plan.settings.poll_interval,
        "fetching {} mailbox(es)",
        workers.len()
    );
    tokio::spawn(supervise(workers, stop))
}

/// Runs the workers; restarts one that panicked (after [`RESTART_PAUSE`], unless stopping).
async fn supervise(workers: Vec<Worker>, stop: CancellationToken) {
    let mut set = JoinSet::new();
    let mut by_task = HashMap::new();
    for worker in workers {
        let handle = set.spawn(worker.clone().run());
        by_task.insert(handle.id(), worker);
    }
    while let Some(joined) = set.join_next_with_id().await {
        let (id, error) = match joined {
            Ok((id, ())) => {
                by_task.remove(&id);
                continue;
            }
            Err(e) => (e.id(), e),
        };
        let Some(worker) = by_task.remove(&id) else {
            continue;
        };
        if error.is_cancelled() {
            continue;
        }
        let message = panic_message(error);
        tracing::error!(
            address = %worker.mailbox.address,
            panic = %message,
            "mailbox worker crashed; restarting it"
        );
        let next = chrono::Utc::now()
            + chrono::Duration::from_std(RESTART_PAUSE).unwrap_or(chrono::Duration::zero());
        worker.status.failed(
            MailboxError::internal(format!("the mailbox worker crashed: {message}")),
            next,
        );
        if stop.is_cancelled() {
            worker.status.stopped();
            continue;
        }
        let restarted = worker.clone();
        let stop = stop.clone();
        let handle = set.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => restarted.status.stopped(),
                _ = tokio::time::sleep(RESTART_PAUSE) => restarted.run().await,
            }
        });
        by_task.insert(handle.id(), worker);
    }
    tracing::debug!("all mailbox workers stopped");
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        mailqueue_config::load_str(std::path::Path::new("t.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"))
            .config
    }

    const YAML: &str = r#"
defaults: { poll_interval: 5s }
incoming_servers:
  - name: svc
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_service
    client_id: "11111111-1111-1111-1111-111111111111"
    client_secret: s3cr3t
    imap: { host: outlook.office365.com }
  - name: usr
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_user
    client_id: "22222222-2222-2222-2222-222222222222"
    imap: { host: outlook.office365.com }
  - name: off
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_service
    client_id: "33333333-3333-3333-3333-333333333333"
    client_secret: s3cr3t
    imap: { host: outlook.office365.com }
    enabled: false
queues:
  - name: support
    addresses:
      - { address: support@contoso.com, server: svc, sender: true, folder: Orders, after_fetch: { move: Done } }
      - { address: old@contoso.com, server: off }
  - name: sales
    addresses:
      - { address: anna@contoso.com, account: anna.login@contoso.com, server: usr, password: pw, sender: true }
      - { address: legacy@contoso.com, server: off }
"#;

    #[test]
    fn plans_a_worker_per_address_of_enabled_servers() {
        let plan = Plan::from_config(&config(YAML));
        let addresses: Vec<&str> = plan.mailboxes.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(addresses, ["support@contoso.com", "anna@contoso.com"]);
        assert_eq!(plan.disabled, [("off".to_owned(), 2)]);
        assert!(plan.unknown_server.is_empty());
        assert_eq!(plan.settings.poll_interval, Duration::from_secs(5));

        let support = &plan.mailboxes[0];
        assert_eq!(support.queue, "support");
        assert_eq!(support.folder, "Orders");
        assert_eq!(
            support.after_fetch,
            mailqueue_config::AfterFetch::Move("Done".into())
        );
        assert_eq!(support.server.auth_name(), "oauth_service");
        assert_eq!(support.request.as_ref().unwrap().user(), None);

        let anna = &plan.mailboxes[1];
        assert_eq!(anna.login, "anna.login@contoso.com");
        assert_eq!(anna.folder, "INBOX");
        assert_eq!(
            anna.request.as_ref().unwrap().user(),
            Some("anna.login@contoso.com")
        );
        assert_eq!(anna.server.auth_name(), "oauth_user");
    }

    #[tokio::test]
    async fn spawn_registers_every_mailbox_and_stops_on_cancel() {
        let db = mailqueue_schema::connect("sqlite::memory:").await.unwrap();
        mailqueue_schema::migrate(&db).await.unwrap();
        // Point the enabled servers at a closed local port: the workers fail and back off, never reaching out.
        let yaml = YAML.replace(
            "imap: { host: outlook.office365.com }",
            "imap: { host: 127.0.0.1, port: 9 }",
        );
        let config = config(&yaml.replace(
            "https://login.microsoftonline.com/contoso.onmicrosoft.com",
            "http://127.0.0.1:9/contoso",
        ));
        let engine = Engine::with_connection(db, config.clone()).await.unwrap();
        let stop = CancellationToken::new();
        let task = spawn(engine.clone(), &config, stop.clone());
        let listed: Vec<String> = engine
            .mailboxes()
            .snapshot()
            .into_iter()
            .map(|s| s.address)
            .collect();
        assert_eq!(listed, ["anna@contoso.com", "support@contoso.com"]);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the supervisor stops")
            .unwrap();
        for s in engine.mailboxes().snapshot() {
            assert_eq!(s.state, super::super::MailboxState::Stopped, "{s:?}");
        }
    }
}
