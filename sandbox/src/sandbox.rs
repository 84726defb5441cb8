//! The whole sandbox on loopback ports: the identity-provider emulator (HTTP on 127.0.0.1), Dovecot (IMAP with
//! STARTTLS and implicit TLS on 127.0.0.2) and the Exchange-like SMTP submission server (STARTTLS and implicit TLS
//! on 127.0.0.2), wired together, plus the files that point other programs at it: `DIR/sandbox.env` (shell) and
//! `DIR/mailqueue.yaml` (an engine configuration).
//!
//! Layout of the sandbox directory:
//!
//! | path | what |
//! |---|---|
//! | `sandbox.env` | `MQ_SANDBOX_*` variables (URLs, ports, CA file, app ids), shell-sourceable |
//! | `mailqueue.yaml` | engine configuration wired to the sandbox (`mailqueue serve --config DIR/mailqueue.yaml`) |
//! | `secrets/` | the service app's client secret, mailbox passwords and API tokens the configuration refers to |
//! | `tls/` | `ca.pem` (trust this), `cert.pem`, `key.pem` |
//! | `mail/<mailbox>/Maildir` | the mail Dovecot serves (owned by Dovecot's run user) |
//! | `sent/` | every message the SMTP server accepted, and `index.jsonl` |
//! | `dovecot/` | Dovecot's configuration, sockets, state and `dovecot.log` |
//! | `data/` | the engine's SQLite database (`mailqueue.yaml`) |

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use chrono::Utc;
use rand::RngCore;
use tokio::{net::TcpListener, sync::Mutex, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    dovecot::{self, Dovecot, DovecotOptions, MAIL_HOST},
    idp::Idp,
    maildir,
    smtp::{SentEntry, SmtpAuthority, SmtpHandle, SmtpOptions, SmtpServer},
    tls::Certificates,
    tokens::{TokenError, TokenInfo},
    world::{App, Mailbox, SmtpDenial, User, World},
};

/// `aud` of IMAP tokens (`https://outlook.office365.com/.default`).
pub const IMAP_AUDIENCE: &str = "https://outlook.office365.com";
/// `aud` of SMTP tokens (`https://outlook.office.com/.default`).
pub const SMTP_AUDIENCE: &str = "https://outlook.office.com";
/// The file name of the shell-sourceable environment in the sandbox directory.
pub const ENV_FILE: &str = "sandbox.env";
/// The file name of the generated engine configuration in the sandbox directory.
pub const CONFIG_FILE: &str = "mailqueue.yaml";
/// Prefix of the temporary directories [`Sandbox::start`] creates when no directory is given.
const TEMP_PREFIX: &str = "mq-sandbox-run-";

/// How to start a [`Sandbox`].
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    /// The sandbox directory (created if missing; kept on stop). `None`: a fresh temporary directory, removed on
    /// stop.
    pub dir: Option<PathBuf>,
    /// The world (tenants, apps, users, mailboxes); `None`: the built-in fixture (`fixtures/world.yaml`).
    pub world: Option<World>,
    /// The port the generated `mailqueue.yaml` lets the engine's API listen on (127.0.0.1); default 8080.
    pub api_port: Option<u16>,
}

impl SandboxOptions {
    /// Reads a world from a YAML file (the format of `fixtures/world.yaml`).
    pub fn world_from_file(path: &Path) -> anyhow::Result<World> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        World::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// The app the engine uses as "OAuth Service" (client credentials, FullAccess on shared mailboxes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceApp {
    pub client_id: String,
    pub client_secret: String,
    pub name: String,
}

/// A running sandbox. [`Sandbox::stop`] stops it; dropping it stops the servers and kills Dovecot too.
pub struct Sandbox {
    dir: PathBuf,
    temporary: bool,
    idp: Idp,
    idp_addr: SocketAddr,
    dovecot: Dovecot,
    smtp: SmtpHandle,
    smtps: SmtpHandle,
    certs: Certificates,
    tenant_id: String,
    tenant_domain: String,
    service: ServiceApp,
    public_client_id: Option<String>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stopped: std::sync::atomic::AtomicBool,
    counter: AtomicU64,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("dir", &self.dir)
            .field("idp", &self.idp_addr)
            .field("imap", &self.dovecot.imap_addr())
            .field("imaps", &self.dovecot.imaps_addr())
            .field("smtp", &self.smtp.local_addr())
            .field("smtps", &self.smtps.local_addr())
            .finish_non_exhaustive()
    }
}

/// The SMTP server's view of the identity provider: its tokens and its (changing) world.
struct IdpAuthority(Idp);

impl SmtpAuthority for IdpAuthority {
    fn validate_token(&self, token: &str) -> Result<TokenInfo, TokenError> {
        self.0.tokens().validate(token)
    }

    fn authorize(&self, info: &TokenInfo, user: &str, host: &str) -> Result<(), SmtpDenial> {
        self.0.world().authorize_smtp(info, user, host)
    }

    fn send_as(&self, user: &str, from: &str) -> Result<(), SmtpDenial> {
        self.0.world().authorize_send_as(user, from)
    }

    fn is_local_mailbox(&self, address: &str) -> bool {
        self.0.world().mailbox(address).is_some()
    }
}

impl Sandbox {
    /// Starts everything on free loopback ports and writes `sandbox.env` and `mailqueue.yaml`. About 1 s.
    ///
    /// Dovecot is told to stop when the thread that called this exits (see [`Dovecot::start`]): call it from a
    /// thread that lives as long as the sandbox (a `#[tokio::test]`, `main`, or use [`Sandbox::shared`]).
    pub async fn start(opts: SandboxOptions) -> anyhow::Result<Self> {
        dovecot::binary()?;
        let world = opts.world.unwrap_or_default();
        let (dir, temporary) = match opts.dir {
            Some(dir) => (prepare_dir(&dir)?, false),
            None => (temp_dir()?, true),
        };
        refuse_if_running(&dir)?;
        let tenant = world
            .tenants
            .first()
            .context("the world has no tenant")?
            .clone();
        let tenant_domain = tenant
            .domains
            .first()
            .cloned()
            .unwrap_or_else(|| tenant.name.clone());
        let service = service_app(&world, &tenant.id)?;
        let public_client_id = public_client(&world, &tenant.id).map(|a| a.client_id.clone());

        let certs = Certificates::generate(&dir.join("tls"))?;
        let stop = CancellationToken::new();
        let idp = Idp::new(world);
        let idp_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("cannot bind the identity provider")?;
        let idp_addr = idp_listener.local_addr()?;
        let mut tasks = Vec::new();

        let mail_root = dir.join("mail");
        let dovecot = Dovecot::start(DovecotOptions {
            dir: dir.join("dovecot"),
            mail_root: mail_root.clone(),
            cert_pem: certs.cert_pem.clone(),
            key_pem: certs.key_pem.clone(),
            grant_url: format!("http://{idp_addr}/dovecot/grant"),
            imap_port: None,
            imaps_port: None,
        })
        .await;
        let dovecot = match dovecot {
            Ok(d) => d,
            Err(e) => {
                stop.cancel();
                return Err(e);
            }
        };
        let user = dovecot.run_user();
        let mail_owner = user.switch.then_some((user.uid, user.gid));

        let mut smtp_opts = SmtpOptions::new(certs.server_config()?, dir.join("sent"));
        smtp_opts.mail_root = Some(mail_root);
        smtp_opts.mail_owner = mail_owner;
        let authority: Arc<dyn SmtpAuthority> = Arc::new(IdpAuthority(idp.clone()));
        let smtp_listener = TcpListener::bind((MAIL_HOST, 0))
            .await
            .context("cannot bind the SMTP server on 127.0.0.2")?;
        let smtps_listener = TcpListener::bind((MAIL_HOST, 0))
            .await
            .context("cannot bind the SMTP server on 127.0.0.2")?;
        let smtp = SmtpServer::start(smtp_listener, smtp_opts, authority, stop.clone())?;
        let smtps = smtp.serve_also(smtps_listener, true)?;
        let waiter = smtp.clone();
        tasks.push(tokio::spawn(async move { waiter.wait().await }));
        // One HTTP server: the identity provider plus the SMTP test hooks (the grant URL Dovecot got is the same).
        let http = idp.router().merge(smtp_hooks(smtp.clone()));
        let http_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(idp_listener, http)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "sandbox HTTP server stopped");
            }
        }));

        let sandbox = Self {
            dir,
            temporary,
            idp,
            idp_addr,
            dovecot,
            smtp,
            smtps,
            certs,
            tenant_id: tenant.id,
            tenant_domain,
            service,
            public_client_id,
            stop,
            tasks: Mutex::new(tasks),
            stopped: false.into(),
            counter: AtomicU64::new(0),
        };
        sandbox
            .write_files(opts.api_port.unwrap_or(8080))
            .context("cannot write the sandbox's files")?;
        tracing::info!(?sandbox, "sandbox started");
        Ok(sandbox)
    }

    /// One sandbox per test process, started on first use (about 1 s) on a runtime of its own, so that any test's
    /// runtime can use it. Its processes end with the test process (Dovecot gets SIGTERM when the sandbox thread
    /// dies); its temporary directory is removed by a later run. Isolate tests with [`Sandbox::new_mailbox`].
    pub async fn shared() -> &'static Sandbox {
        static SHARED: tokio::sync::OnceCell<Sandbox> = tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::Builder::new()
                    .name("mq-sandbox".into())
                    .spawn(move || {
                        let runtime = tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(2)
                            .thread_name("mq-sandbox-worker")
                            .enable_all()
                            .build()
                            .expect("a Tokio runtime for the shared sandbox");
                        // `block_on` polls on this thread, so Dovecot's parent-death signal is tied to it, and this
                        // thread lives as long as the process.
                        runtime.block_on(async move {
                            let started = Sandbox::start(SandboxOptions::default()).await;
                            let failed = started.is_err();
                            let _ = tx.send(started);
                            if !failed {
                                std::future::pending::<()>().await;
                            }
                        });
                    })
                    .expect("a thread for the shared sandbox");
                match rx.await {
                    Ok(Ok(sandbox)) => sandbox,
                    Ok(Err(e)) => panic!("cannot start the shared sandbox: {e:#}"),
                    Err(_) => panic!("the shared sandbox's thread died during start-up"),
                }
            })
            .await
    }

    /// Stops the servers and Dovecot, and removes the directory if it was a temporary one. Idempotent.
    pub async fn stop(&self) -> anyhow::Result<()> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.stop.cancel();
        let result = self.dovecot.stop().await;
        for task in self.tasks.lock().await.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            let _ = std::fs::remove_file(self.dir.join("sandbox.pid"));
        }
        tracing::info!(dir = %self.dir.display(), "sandbox stopped");
        result
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity provider (world, tokens, test hooks).
    pub fn idp(&self) -> &Idp {
        &self.idp
    }

    /// `http://127.0.0.1:PORT`.
    pub fn idp_url(&self) -> String {
        format!("http://{}", self.idp_addr)
    }

    /// `http://127.0.0.1:PORT/<tenant>` (what the engine calls `login_address`).
    pub fn login_address(&self, tenant: &str) -> String {
        format!("{}/{tenant}", self.idp_url())
    }

    /// `http://127.0.0.1:PORT/<tenant>/oauth2/v2.0/token`.
    pub fn token_endpoint(&self, tenant: &str) -> String {
        format!("{}/oauth2/v2.0/token", self.login_address(tenant))
    }

    /// The first tenant's id (Contoso in the default world).
    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// The first tenant's first mail domain (`contoso.com`).
    pub fn tenant_domain(&self) -> &str {
        &self.tenant_domain
    }

    /// The app the engine's `oauth_service` servers use.
    pub fn service_app(&self) -> &ServiceApp {
        &self.service
    }

    /// The public client the engine's `oauth_user` server uses, if the world has one.
    pub fn public_client_id(&self) -> Option<&str> {
        self.public_client_id.as_deref()
    }

    /// `127.0.0.2`: where IMAP and SMTP listen.
    pub fn mail_host(&self) -> Ipv4Addr {
        MAIL_HOST
    }

    /// IMAP with STARTTLS.
    pub fn imap_port(&self) -> u16 {
        self.dovecot.imap_addr().port()
    }

    /// IMAP with implicit TLS.
    pub fn imaps_port(&self) -> u16 {
        self.dovecot.imaps_addr().port()
    }

    /// SMTP submission with STARTTLS (587 style).
    pub fn smtp_port(&self) -> u16 {
        self.smtp.local_addr().port()
    }

    /// SMTP submission with implicit TLS (465 style).
    pub fn smtps_port(&self) -> u16 {
        self.smtps.local_addr().port()
    }

    /// The SMTP server (fault injection, sent messages).
    pub fn smtp(&self) -> &SmtpHandle {
        &self.smtp
    }

    /// The Dovecot instance.
    pub fn dovecot(&self) -> &Dovecot {
        &self.dovecot
    }

    /// The CA certificate (PEM) clients must trust.
    pub fn ca_file(&self) -> &Path {
        &self.certs.ca_pem
    }

    pub fn certificates(&self) -> &Certificates {
        &self.certs
    }

    /// Where the SMTP server stores accepted messages (`index.jsonl` + one file per message).
    pub fn sent_dir(&self) -> &Path {
        self.smtp.sent_dir()
    }

    /// The messages the SMTP server accepted so far.
    pub fn sent(&self) -> Vec<SentEntry> {
        self.smtp.sent()
    }

    /// The Maildir root Dovecot serves (`<mail_root>/<mailbox>/Maildir`).
    pub fn mail_root(&self) -> &Path {
        self.dovecot.mail_root()
    }

    /// uid/gid that delivered files must belong to (`None` when we are Dovecot's run user).
    pub fn mail_owner(&self) -> Option<(u32, u32)> {
        let user = self.dovecot.run_user();
        user.switch.then_some((user.uid, user.gid))
    }

    /// Puts a message into `mailbox`'s INBOX (a Maildir file; Dovecot and IDLE see it at once).
    pub fn deliver(&self, mailbox: &str, raw: &[u8]) -> io::Result<PathBuf> {
        maildir::deliver(self.mail_root(), mailbox, raw, self.mail_owner())
    }

    /// Adds a fresh mailbox `<prefix>-<n>-<random>@<tenant domain>` to the world, with FullAccess for the service
    /// app and Authenticated SMTP on, and returns its address (lower case). Tests use one each to stay isolated.
    pub fn new_mailbox(&self, prefix: &str) -> String {
        let address = self.unique_address(prefix);
        let client_id = self.service.client_id.clone();
        self.idp.update_world(|world| {
            world.mailboxes.push(Mailbox {
                address: address.clone(),
                smtp_auth: true,
                send_as: Vec::new(),
            });
            if let Some(app) = world
                .apps
                .iter_mut()
                .find(|a| a.client_id.eq_ignore_ascii_case(&client_id))
            {
                app.full_access.push(address.clone());
            }
        });
        address
    }

    /// Adds a fresh user with its own mailbox (no FullAccess for any app) and returns `(upn, password)`; for
    /// delegated (ROPC) tests.
    pub fn new_user(&self, prefix: &str) -> (String, String) {
        let upn = self.unique_address(prefix);
        let password = format!("Pw-{}", random_hex(12));
        let tenant = self.tenant_id.clone();
        self.idp.update_world(|world| {
            world.users.push(User {
                upn: upn.clone(),
                password: password.clone(),
                tenant,
                mfa: false,
            });
            world.mailboxes.push(Mailbox {
                address: upn.clone(),
                smtp_auth: true,
                send_as: Vec::new(),
            });
        });
        (upn, password)
    }

    fn unique_address(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let local: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let local = if local.is_empty() {
            "box".to_owned()
        } else {
            local
        };
        format!("{local}-{n}-{}@{}", random_hex(4), self.tenant_domain)
    }

    /// Writes `sandbox.env`, `mailqueue.yaml` and the secret files it refers to.
    fn write_files(&self, api_port: u16) -> anyhow::Result<()> {
        let secrets = self.dir.join("secrets");
        std::fs::create_dir_all(&secrets)?;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))?;
        let world = self.idp.world().clone();
        let layout = ConfigLayout::new(
            &world,
            &self.service,
            self.public_client_id.as_deref(),
            &self.tenant_domain,
        );

        write_secret(
            &secrets.join("service-client-secret"),
            &self.service.client_secret,
        )?;
        for (user, password) in &layout.user_mailboxes {
            write_secret(&secrets.join(format!("password-{user}")), password)?;
        }
        for name in API_TOKENS {
            let path = secrets.join(format!("api-token-{name}"));
            // Kept across runs on the same directory, so that clients keep working.
            if std::fs::read_to_string(&path).map_or(true, |t| t.trim().is_empty()) {
                write_secret(&path, &format!("mq-sandbox-{name}-{}", random_hex(16)))?;
            }
        }
        let config = self.render_config(&layout, api_port);
        write_atomic(&self.dir.join(CONFIG_FILE), &config, 0o644)?;
        write_atomic(&self.dir.join(ENV_FILE), &self.render_env(api_port), 0o644)?;
        Ok(())
    }

    /// The `MQ_SANDBOX_*` variables of `sandbox.env`, in order.
    pub fn env_vars(&self, api_port: u16) -> Vec<(&'static str, String)> {
        let path = |p: &Path| p.display().to_string();
        let mut vars = vec![
            ("MQ_SANDBOX_DIR", path(&self.dir)),
            ("MQ_SANDBOX_PID", std::process::id().to_string()),
            ("MQ_SANDBOX_IDP_URL", self.idp_url()),
            ("MQ_SANDBOX_TENANT_ID", self.tenant_id.clone()),
            ("MQ_SANDBOX_TENANT_DOMAIN", self.tenant_domain.clone()),
            ("MQ_SANDBOX_TOKEN_URL", self.token_endpoint(&self.tenant_id)),
            ("MQ_SANDBOX_MAIL_HOST", MAIL_HOST.to_string()),
            ("MQ_SANDBOX_IMAP_PORT", self.imap_port().to_string()),
            ("MQ_SANDBOX_IMAPS_PORT", self.imaps_port().to_string()),
            ("MQ_SANDBOX_SMTP_PORT", self.smtp_port().to_string()),
            ("MQ_SANDBOX_SMTPS_PORT", self.smtps_port().to_string()),
            ("MQ_SANDBOX_CA_FILE", path(self.ca_file())),
            ("MQ_SANDBOX_SENT_DIR", path(self.sent_dir())),
            ("MQ_SANDBOX_MAIL_ROOT", path(self.mail_root())),
            ("MQ_SANDBOX_DOVECOT_PID", self.dovecot.pid().to_string()),
            (
                "MQ_SANDBOX_DOVECOT_INSTANCE",
                self.dovecot.instance_name().to_owned(),
            ),
            ("MQ_SANDBOX_DOVECOT_LOG", path(self.dovecot.log_path())),
            ("MQ_SANDBOX_CLIENT_ID", self.service.client_id.clone()),
            (
                "MQ_SANDBOX_CLIENT_SECRET",
                self.service.client_secret.clone(),
            ),
            (
                "MQ_SANDBOX_CLIENT_SECRET_FILE",
                path(&self.dir.join("secrets/service-client-secret")),
            ),
        ];
        if let Some(id) = &self.public_client_id {
            vars.push(("MQ_SANDBOX_PUBLIC_CLIENT_ID", id.clone()));
        }
        vars.push(("MQ_SANDBOX_CONFIG", path(&self.dir.join(CONFIG_FILE))));
        vars.push(("MQ_SANDBOX_API_URL", format!("http://127.0.0.1:{api_port}")));
        for name in API_TOKENS {
            vars.push((
                api_token_var(name),
                path(&self.dir.join(format!("secrets/api-token-{name}"))),
            ));
        }
        vars
    }

    fn render_env(&self, api_port: u16) -> String {
        let mut out = String::from(
            "# Written by mailqueue-sandbox: the running sandbox, for `. sandbox.env` (values are shell-quoted).\n",
        );
        for (name, value) in self.env_vars(api_port) {
            let _ = writeln!(out, "{name}={}", shell_quote(&value));
        }
        out
    }

    fn render_config(&self, layout: &ConfigLayout, api_port: u16) -> String {
        let q = yaml_str;
        let ca = q(&self.ca_file().display().to_string());
        let login = q(&self.login_address(&self.tenant_id));
        let db = q(&format!(
            "sqlite://{}",
            self.dir.join("data/mailqueue.db").display()
        ));
        let mut out = String::new();
        let _ = write!(
            out,
            "# Written by mailqueue-sandbox for the local Microsoft 365 sandbox in this directory.\n\
             # Run: mailqueue serve --config {config}\n\
             # Secrets are files under secrets/ (relative paths are relative to this file).\n\
             database:\n  url: {db}\n\
             api:\n  listen: \"127.0.0.1:{api_port}\"\n  tokens:\n",
            config = self.dir.join(CONFIG_FILE).display(),
        );
        let all_queues: Vec<String> = layout.queues.iter().map(|qu| q(&qu.name)).collect();
        for name in API_TOKENS {
            // The token names are the roles.
            let _ = writeln!(
                out,
                "    - name: sandbox-{name}\n      role: {name}\n      secret: {{ file: secrets/api-token-{name} }}"
            );
            if name == "agent" {
                let _ = writeln!(out, "      queues: [{}]", all_queues.join(", "));
            }
        }
        let _ = write!(
            out,
            "defaults:\n  language: en\n  poll_interval: 30s\n  max_email_size_mb: 25\n  claim_lease: 5m\n\
             incoming_servers:\n  - name: {service_server}\n    login_address: {login}\n    auth: oauth_service\n    \
             client_id: {client_id}\n    client_secret: {{ file: secrets/service-client-secret }}\n    \
             scopes: [\"{IMAP_AUDIENCE}/.default\"]\n    \
             imap: {{ host: \"{MAIL_HOST}\", port: {imaps}, tls: implicit }}\n    ca_file: {ca}\n",
            service_server = SERVICE_SERVER,
            client_id = q(&self.service.client_id),
            imaps = self.imaps_port(),
        );
        if let Some(public) = &self.public_client_id
            && !layout.user_mailboxes.is_empty()
        {
            let _ = write!(
                out,
                "  - name: {USER_SERVER}\n    login_address: {login}\n    auth: oauth_user\n    client_id: {}\n    \
                 imap: {{ host: \"{MAIL_HOST}\", port: {}, tls: starttls }}\n    ca_file: {ca}\n",
                q(public),
                self.imap_port(),
            );
        }
        let _ = write!(
            out,
            "outgoing_server:\n  host: \"{MAIL_HOST}\"\n  port: {smtp}\n  starttls: true\n  login_address: {login}\n  \
             auth: oauth_service\n  client_id: {client_id}\n  client_secret: {{ file: secrets/service-client-secret }}\n  \
             username: {username}\n  scopes: [\"{SMTP_AUDIENCE}/.default\"]\n  max_email_size_mb: 25\n  \
             contact_information: {contact}\n  ca_file: {ca}\n",
            smtp = self.smtp_port(),
            client_id = q(&self.service.client_id),
            username = q(&layout.sender),
            contact = q(&format!("sandbox operator <ops@{}>", self.tenant_domain)),
        );
        out.push_str(if layout.queues.is_empty() {
            "queues: []\n"
        } else {
            "queues:\n"
        });
        for queue in &layout.queues {
            let _ = writeln!(
                out,
                "  - name: {}\n    priority: {}\n    language: {}\n    addresses:",
                q(&queue.name),
                queue.priority,
                queue.language
            );
            for a in &queue.addresses {
                let _ = write!(
                    out,
                    "      - address: {}\n        server: {}\n",
                    q(&a.address),
                    a.server
                );
                if let Some(p) = a.priority {
                    let _ = writeln!(out, "        priority: {p}");
                }
                if let Some(l) = &a.language {
                    let _ = writeln!(out, "        language: {l}");
                }
                if a.sender {
                    out.push_str("        sender: true\n");
                }
                if a.server == USER_SERVER {
                    let _ = writeln!(
                        out,
                        "        password: {{ file: {} }}",
                        q(&format!("secrets/password-{}", a.address))
                    );
                }
            }
        }
        out
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Servers stop with the token; Dovecot's child handle kills the master when dropped (after this).
        self.stop.cancel();
        if self.temporary && !self.stopped.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

const SERVICE_SERVER: &str = "sandbox-service";
const USER_SERVER: &str = "sandbox-user";
const API_TOKENS: [&str; 3] = ["agent", "router", "admin"];

fn api_token_var(name: &str) -> &'static str {
    match name {
        "agent" => "MQ_SANDBOX_API_TOKEN_AGENT_FILE",
        "router" => "MQ_SANDBOX_API_TOKEN_ROUTER_FILE",
        _ => "MQ_SANDBOX_API_TOKEN_ADMIN_FILE",
    }
}

/// Queues and addresses of the generated configuration, derived from the world: every mailbox the service app has
/// FullAccess on (with Authenticated SMTP on, no `noreply`) feeds a queue; users' own mailboxes join through the
/// `oauth_user` server. With the default world: `support` (support@, vip@), `sales` (sales@, anna@).
struct ConfigLayout {
    queues: Vec<QueueLayout>,
    /// (address, password) of the mailboxes on the `oauth_user` server.
    user_mailboxes: Vec<(String, String)>,
    /// The SMTP user: the first shared mailbox.
    sender: String,
}

struct QueueLayout {
    name: String,
    priority: i32,
    language: &'static str,
    addresses: Vec<AddressLayout>,
}

struct AddressLayout {
    address: String,
    server: &'static str,
    priority: Option<i32>,
    language: Option<&'static str>,
    sender: bool,
}

impl ConfigLayout {
    fn new(world: &World, service: &ServiceApp, public_client: Option<&str>, domain: &str) -> Self {
        let app = world.app(&service.client_id);
        let shared: Vec<String> = app
            .map(|a| a.full_access.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|m| world.mailbox(m).is_some_and(|mb| mb.smtp_auth))
            .filter(|m| !m.to_ascii_lowercase().starts_with("noreply@"))
            .map(|m| m.to_ascii_lowercase())
            .collect();
        let users: Vec<(String, String)> = if public_client.is_some() {
            world
                .users
                .iter()
                .filter(|u| !u.mfa && world.mailbox(&u.upn).is_some())
                .filter(|u| {
                    world
                        .tenant_of_address(&u.upn)
                        .is_some_and(|t| world.tenants.first().is_some_and(|f| f.id == t.id))
                })
                .map(|u| (u.upn.to_ascii_lowercase(), u.password.clone()))
                .collect()
        } else {
            Vec::new()
        };
        let sender = shared
            .first()
            .cloned()
            .unwrap_or_else(|| format!("support@{domain}"));

        // Two queues: the first shared mailbox and the VIP-looking ones go to `support`, the rest to `sales`.
        let mut support = QueueLayout {
            name: "support".into(),
            priority: 5,
            language: "en",
            addresses: Vec::new(),
        };
        let mut sales = QueueLayout {
            name: "sales".into(),
            priority: 4,
            language: "de",
            addresses: Vec::new(),
        };
        for (i, address) in shared.iter().enumerate() {
            let vip = address.starts_with("vip@");
            let entry = AddressLayout {
                address: address.clone(),
                server: SERVICE_SERVER,
                priority: if vip { Some(1) } else { None },
                language: None,
                sender: !vip,
            };
            if i == 0 || vip {
                support.addresses.push(entry)
            } else {
                sales.addresses.push(entry)
            }
        }
        for (address, _) in &users {
            sales.addresses.push(AddressLayout {
                address: address.clone(),
                server: USER_SERVER,
                priority: Some(6),
                language: Some("fr"),
                sender: false,
            });
        }
        let queues = [support, sales]
            .into_iter()
            .filter(|q| !q.addresses.is_empty())
            .collect();
        Self {
            queues,
            user_mailboxes: users,
            sender,
        }
    }
}

/// The world's "OAuth Service" app for `tenant`: confidential, consented, `IMAP.AccessAsApp`, a valid secret; the
/// one with FullAccess on the most mailboxes.
fn service_app(world: &World, tenant: &str) -> anyhow::Result<ServiceApp> {
    let now = Utc::now();
    let candidate = |a: &&App| {
        !a.public_client
            && a.admin_consent
            && a.roles.iter().any(|r| r == "IMAP.AccessAsApp")
            && world.tenant(&a.tenant).is_some_and(|t| t.id == tenant)
            && a.secrets.iter().any(|s| s.expires > now)
    };
    let app = world
        .apps
        .iter()
        .filter(candidate)
        .max_by_key(|a| (a.full_access.len(), std::cmp::Reverse(a.client_id.clone())))
        .context("the world has no service app (confidential, consented, IMAP.AccessAsApp, a valid secret) in its first tenant")?;
    let secret = app
        .secrets
        .iter()
        .filter(|s| s.expires > now)
        .max_by_key(|s| s.expires)
        .expect("checked above");
    Ok(ServiceApp {
        client_id: app.client_id.clone(),
        client_secret: secret.value.clone(),
        name: app.name.clone(),
    })
}

/// The world's public client for delegated IMAP access in `tenant`.
fn public_client<'w>(world: &'w World, tenant: &str) -> Option<&'w App> {
    world.apps.iter().find(|a| {
        a.public_client
            && a.admin_consent
            && a.delegated_scopes
                .iter()
                .any(|s| s == "IMAP.AccessAsUser.All")
            && world.tenant(&a.tenant).is_some_and(|t| t.id == tenant)
    })
}

/// Creates the directory (0755, so that Dovecot's run user can reach it) and returns its absolute path.
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let mode = std::fs::metadata(&dir)?.permissions().mode();
    if mode & 0o005 != 0o005 {
        std::fs::set_permissions(
            &dir,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o755),
        )?;
    }
    Ok(dir)
}

/// A fresh `mq-sandbox-run-<pid>-<random>` directory in the system temp dir; removes those of dead processes.
fn temp_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    sweep_stale_temp_dirs(&base);
    let dir = base.join(format!(
        "{TEMP_PREFIX}{}-{}",
        std::process::id(),
        random_hex(6)
    ));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    prepare_dir(&dir)
}

/// Temporary sandbox directories whose process is gone (the shared test sandbox is never stopped; its process
/// exits). Only those older than a minute, in case a pid was reused.
fn sweep_stale_temp_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
        if old && !process_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether a process runs (zombies count as gone).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Refuses to start twice on one directory: `sandbox.env` names the pid of the sandbox that wrote it and its Dovecot
/// instance; both still running means the sandbox is.
fn refuse_if_running(dir: &Path) -> anyhow::Result<()> {
    let Some(env) = read_env(dir).ok() else {
        return Ok(());
    };
    let pid = env
        .get("MQ_SANDBOX_PID")
        .and_then(|p| p.parse::<u32>().ok());
    let instance = env.get("MQ_SANDBOX_DOVECOT_INSTANCE");
    if let (Some(pid), Some(instance)) = (pid, instance)
        && pid != std::process::id()
        && process_alive(pid)
        && !dovecot::processes_of(instance).is_empty()
    {
        bail!(
            "a sandbox (pid {pid}) is already running in {}; stop it with `mailqueue-sandbox down --dir {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Reads `DIR/sandbox.env` back into a map.
pub fn read_env(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = dir.join(ENV_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is a sandbox set up there?)",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), shell_unquote(v.trim())))
        .collect())
}

/// `'…'` with `'` as `'\''`.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn shell_unquote(value: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => quoted = !quoted,
            '\\' if !quoted => {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// A double-quoted YAML scalar (JSON string syntax is valid YAML).
fn yaml_str(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_secret(path: &Path, value: &str) -> anyhow::Result<()> {
    write_atomic(path, &format!("{value}\n"), 0o600)
}

/// Writes via a temporary file and a rename, so readers never see half a file.
fn write_atomic(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Test hooks of the SMTP server over HTTP, beside the identity provider's `/_sandbox/` hooks:
/// `POST /_sandbox/smtp/faults` with an [`SmtpFault`](crate::smtp::SmtpFault) (e.g.
/// `{"point":"data_end","action":"451","count":2}`), `DELETE /_sandbox/smtp/faults`, and `GET /_sandbox/smtp/sent`
/// (the sent index).
fn smtp_hooks(smtp: crate::smtp::SmtpHandle) -> axum::Router {
    use axum::{Json, routing::post};
    let (inject, clear, sent) = (smtp.clone(), smtp.clone(), smtp);
    axum::Router::new()
        .route(
            "/_sandbox/smtp/faults",
            post(
                move |Json(fault): Json<crate::smtp::SmtpFault>| async move {
                    inject.inject_fault(fault);
                    Json(serde_json::json!({ "pending": inject.pending_faults() }))
                },
            )
            .delete(move || async move {
                clear.clear_faults();
                Json(serde_json::json!({ "pending": [] }))
            }),
        )
        .route(
            "/_sandbox/smtp/sent",
            axum::routing::get(move || async move { Json(sent.sent()) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_round_trips() {
        for value in ["plain", "it's", "a b $HOME `x`", "", "'"] {
            assert_eq!(shell_unquote(&shell_quote(value)), value);
        }
    }

    #[test]
    fn default_world_layout() {
        let world = World::default();
        let tenant = world.tenants[0].id.clone();
        let service = service_app(&world, &tenant).unwrap();
        assert_eq!(service.client_id, "6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5");
        assert_eq!(
            service.client_secret,
            "svc~Secret.Value-1234567890abcdefGHIJ"
        );
        let public = public_client(&world, &tenant).unwrap();
        let layout = ConfigLayout::new(&world, &service, Some(&public.client_id), "contoso.com");
        let queues: Vec<(&str, Vec<&str>)> = layout
            .queues
            .iter()
            .map(|q| {
                (
                    q.name.as_str(),
                    q.addresses.iter().map(|a| a.address.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            queues,
            [
                ("support", vec!["support@contoso.com", "vip@contoso.com"]),
                ("sales", vec!["sales@contoso.com", "anna@contoso.com"])
            ]
        );
        assert_eq!(layout.sender, "support@contoso.com");
        assert_eq!(
            layout.user_mailboxes,
            [("anna@contoso.com".to_owned(), "Anna-Passw0rd!".to_owned())]
        );
    }
}
