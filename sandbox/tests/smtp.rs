//! The Exchange-like SMTP submission server, end to end: in-process server on 127.0.0.1, real TLS with the
//! generated CA, tokens minted by the sandbox's `TokenStore`, the default world fixture. Clients: Python's smtplib
//! (independent implementation, `tests/smtp_client.py`) and a raw tokio-rustls client for byte-level cases.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use mailqueue_sandbox::{
    smtp::{
        FaultAction, FaultPoint, SentEntry, SmtpAuthority, SmtpFault, SmtpHandle, SmtpOptions,
        SmtpServer,
    },
    tls::Certificates,
    tokens::{TokenKind, TokenStore},
    world::World,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream, rustls::pki_types::ServerName};
use tokio_util::sync::CancellationToken;

const CONTOSO: &str = "9f3c2b1a-5d4e-4f60-8a7b-0c1d2e3f4a5b";
const FABRIKAM: &str = "1a2b3c4d-0000-4000-8000-00000000f00d";
const SERVICE_APP: &str = "6e1f0c2d-3b4a-4c5d-9e8f-a0b1c2d3e4f5";
const IMAP_ONLY_APP: &str = "5b5b5b5b-0000-4000-8000-0000000000b5";
const FABRIKAM_APP: &str = "3d3d3d3d-0000-4000-8000-0000000fab01";
const DELEGATED_APP: &str = "2c4e6a8b-1d3f-4a5b-8c7d-9e0f1a2b3c4d";
const SMTP_AUDIENCE: &str = "https://outlook.office.com";
const HOST: &str = mailqueue_sandbox::smtp::DEFAULT_HOSTNAME;

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    certs: Certificates,
    tokens: TokenStore,
    handle: SmtpHandle,
    stop: CancellationToken,
}

impl Env {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut SmtpOptions)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let certs = Certificates::generate(&root.join("tls")).unwrap();
        let tokens = TokenStore::default();
        let authority: Arc<dyn SmtpAuthority> =
            Arc::new((tokens.clone(), Arc::new(RwLock::new(World::default()))));
        let mut opts = SmtpOptions::new(certs.server_config().unwrap(), root.join("sent"));
        opts.mail_root = Some(root.join("mail"));
        tweak(&mut opts);
        let stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = SmtpServer::start(listener, opts, authority, stop.clone()).unwrap();
        Self {
            _dir: dir,
            root,
            certs,
            tokens,
            handle,
            stop,
        }
    }

    fn sent_dir(&self) -> PathBuf {
        self.root.join("sent")
    }

    fn sent(&self) -> Vec<SentEntry> {
        self.handle.sent()
    }

    fn mint(
        &self,
        tenant: &str,
        audience: &str,
        kind: TokenKind,
        lifetime: chrono::Duration,
    ) -> String {
        self.tokens.mint(tenant, audience, kind, lifetime).0
    }

    fn app_token(&self, tenant: &str, client_id: &str, roles: &[&str]) -> String {
        let kind = TokenKind::App {
            client_id: client_id.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        };
        self.mint(tenant, SMTP_AUDIENCE, kind, chrono::Duration::hours(1))
    }

    /// The service app's SMTP token (FullAccess on support@, sales@, … and smtpoff@).
    fn service_token(&self) -> String {
        self.app_token(
            CONTOSO,
            SERVICE_APP,
            &["IMAP.AccessAsApp", "SMTP.SendAsApp"],
        )
    }

    fn maildir_new(&self, mailbox: &str) -> Vec<PathBuf> {
        let dir = self.root.join("mail").join(mailbox).join("Maildir/new");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }

    async fn client(&self) -> (Client, String) {
        Client::connect(
            self.handle.local_addr(),
            self.certs.client_config().unwrap(),
        )
        .await
    }

    /// Connected, STARTTLS done, EHLO sent after TLS, not authenticated.
    async fn tls_client(&self) -> Client {
        let (mut client, greeting) = self.client().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        assert!(client.cmd("EHLO client.test").await.starts_with("250"));
        client.starttls().await;
        assert!(client.cmd("EHLO client.test").await.starts_with("250"));
        client
    }

    /// Connected, TLS, authenticated as `support@contoso.com` with the service app.
    async fn authed_client(&self) -> Client {
        let mut client = self.tls_client().await;
        let reply = client
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                xoauth2("support@contoso.com", &self.service_token())
            ))
            .await;
        assert_eq!(reply, "235 2.7.0 Authentication successful");
        client
    }

    async fn python(&self, args: serde_json::Value) -> Option<serde_json::Value> {
        if std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("python3 not found: skipping the smtplib part of this test");
            return None;
        }
        let mut args = args;
        args["host"] = "127.0.0.1".into();
        if args.get("port").is_none() {
            args["port"] = self.handle.local_addr().port().into();
        }
        args["ca"] = self.certs.ca_pem.to_string_lossy().into_owned().into();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_client.py");
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("python3")
                .arg(script)
                .arg(args.to_string())
                .output(),
        )
        .await
        .expect("python client timed out")
        .unwrap();
        assert!(
            output.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(serde_json::from_slice(&output.stdout).unwrap())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn xoauth2(user: &str, token: &str) -> String {
    STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

enum Conn {
    Plain(BufReader<TcpStream>),
    Tls(Box<BufReader<TlsStream<TcpStream>>>),
    Gone,
}

/// A raw SMTP client: writes exactly the bytes given, reads replies line by line.
struct Client {
    conn: Conn,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl Client {
    async fn connect(
        addr: std::net::SocketAddr,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> (Self, String) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut client = Self {
            conn: Conn::Plain(BufReader::new(tcp)),
            tls,
        };
        let greeting = client.reply().await;
        (client, greeting)
    }

    async fn connect_implicit(
        addr: std::net::SocketAddr,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> (Self, String) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let server_name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
        let stream = TlsConnector::from(tls.clone())
            .connect(server_name, tcp)
            .await
            .unwrap();
        let mut client = Self {
            conn: Conn::Tls(Box::new(BufReader::new(stream))),
            tls,
        };
        let greeting = client.reply().await;
        (client, greeting)
    }

    async fn send(&mut self, bytes: &[u8]) {
        match &mut self.conn {
            Conn::Plain(io) => io.write_all(bytes).await.unwrap(),
            Conn::Tls(io) => {
                io.write_all(bytes).await.unwrap();
                io.flush().await.unwrap();
            }
            Conn::Gone => panic!("connection gone"),
        }
    }

    async fn read_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        let read = async {
            match &mut self.conn {
                Conn::Plain(io) => io.read_until(b'\n', &mut line).await,
                Conn::Tls(io) => io.read_until(b'\n', &mut line).await,
                Conn::Gone => Ok(0),
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("reply timed out")
        {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                String::from_utf8(line)
                    .unwrap()
                    .trim_end_matches("\r\n")
                    .to_owned(),
            ),
        }
    }

    /// One (possibly multi-line) reply, lines joined with `\n`; `<closed>` if the server closed first.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let Some(line) = self.read_line().await else {
                lines.push("<closed>".to_owned());
                return lines.join("\n");
            };
            let last = line.len() < 4 || line.as_bytes()[3] == b' ';
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Whether the server closes the connection (EOF or TLS error) without sending anything more.
    async fn closed(&mut self) -> bool {
        self.read_line().await.is_none()
    }

    async fn starttls(&mut self) {
        assert_eq!(self.cmd("STARTTLS").await, "220 2.0.0 SMTP server ready");
        let Conn::Plain(io) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            panic!("already TLS")
        };
        assert!(io.buffer().is_empty());
        let server_name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
        let stream = TlsConnector::from(self.tls.clone())
            .connect(server_name, io.into_inner())
            .await
            .unwrap();
        self.conn = Conn::Tls(Box::new(BufReader::new(stream)));
    }

    /// MAIL, RCPTs, DATA, the body (already dot-stuffed, ending with CRLF) and the final dot; the last reply.
    async fn submit(&mut self, from: &str, to: &[&str], stuffed_body: &[u8]) -> String {
        let reply = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        if !reply.starts_with("250") {
            return reply;
        }
        for rcpt in to {
            assert_eq!(
                self.cmd(&format!("RCPT TO:<{rcpt}>")).await,
                "250 2.1.5 Recipient OK"
            );
        }
        assert_eq!(
            self.cmd("DATA").await,
            "354 Start mail input; end with <CRLF>.<CRLF>"
        );
        self.send(stuffed_body).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

fn message(from: &str, to: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\
         Date: Fri, 21 Nov 2025 08:46:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    )
    .into_bytes()
}

fn assert_queued(reply: &str) {
    assert!(reply.starts_with("250 2.6.0 <"), "{reply}");
    assert!(
        reply.ends_with(&format!("Hostname={HOST}] Queued mail for delivery")),
        "{reply}"
    );
    assert!(reply.contains("[InternalId="), "{reply}");
}

#[tokio::test]
async fn greeting_ehlo_and_the_auth_rules_before_and_after_tls() {
    let env = Env::start().await;
    let (mut client, greeting) = env.client().await;
    assert!(
        greeting.starts_with(&format!(
            "220 {HOST} Microsoft ESMTP MAIL Service ready at "
        )),
        "{greeting}"
    );

    // Before EHLO and before TLS.
    assert_eq!(
        client.cmd("MAIL FROM:<support@contoso.com>").await,
        "503 5.5.2 Send hello first"
    );
    let ehlo = client.cmd("EHLO client.test").await;
    let lines: Vec<&str> = ehlo.lines().collect();
    assert_eq!(lines[0], format!("250-{HOST} Hello [127.0.0.1]"));
    for ext in [
        "SIZE 36700160",
        "PIPELINING",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "8BITMIME",
    ] {
        assert!(
            lines.contains(&format!("250-{ext}").as_str()),
            "{ext} missing: {ehlo}"
        );
    }
    assert_eq!(*lines.last().unwrap(), "250 SMTPUTF8");
    assert!(
        !ehlo.contains("AUTH") && !ehlo.contains("CHUNKING") && !ehlo.contains("BINARYMIME"),
        "{ehlo}"
    );

    let token = env.service_token();
    assert_eq!(
        client
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                xoauth2("support@contoso.com", &token)
            ))
            .await,
        format!("504 5.7.4 Unrecognized authentication type [{HOST}]")
    );
    assert_eq!(
        client.cmd("AUTH LOGIN").await,
        format!("504 5.7.4 Unrecognized authentication type [{HOST}]")
    );
    assert_eq!(
        client.cmd("MAIL FROM:<support@contoso.com>").await,
        format!("530 5.7.57 Client not authenticated to send mail. [{HOST}]")
    );
    assert_eq!(client.cmd("NOOP").await, "250 2.0.0 OK");
    assert_eq!(
        client.cmd("BDAT 10 LAST").await,
        "500 5.3.3 Unrecognized command"
    );
    assert_eq!(client.cmd("FROB").await, "500 5.3.3 Unrecognized command");

    // After TLS: EHLO offers AUTH, not STARTTLS; the envelope still needs AUTH.
    client.starttls().await;
    assert_eq!(
        client.cmd("AUTH XOAUTH2").await,
        "503 5.5.2 Send hello first"
    );
    let ehlo = client.cmd("EHLO client.test").await;
    assert!(
        ehlo.lines().any(|l| l == "250-AUTH LOGIN XOAUTH2"),
        "{ehlo}"
    );
    assert!(ehlo.lines().any(|l| l == "250-SIZE 36700160"), "{ehlo}");
    assert!(
        !ehlo.contains("STARTTLS") && !ehlo.contains("CHUNKING"),
        "{ehlo}"
    );
    assert_eq!(
        client.cmd("STARTTLS").await,
        "503 5.5.1 Bad sequence of commands"
    );
    assert_eq!(
        client.cmd("MAIL FROM:<support@contoso.com>").await,
        format!("530 5.7.57 Client not authenticated to send mail. [{HOST}]")
    );
    assert_eq!(
        client.cmd("RCPT TO:<anna@contoso.com>").await,
        "503 5.5.2 Need mail command"
    );
    assert_eq!(
        client.cmd("AUTH PLAIN AGZvbwBiYXI=").await,
        format!("504 5.7.4 Unrecognized authentication type [{HOST}]")
    );
    assert_eq!(
        client.cmd("AUTH CRAM-MD5").await,
        format!("504 5.7.4 Unrecognized authentication type [{HOST}]")
    );

    // Basic auth: the LOGIN exchange runs, then Exchange's "basic authentication is disabled".
    assert_eq!(client.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(
        client.cmd(&STANDARD.encode("support@contoso.com")).await,
        "334 UGFzc3dvcmQ6"
    );
    assert_eq!(
        client.cmd(&STANDARD.encode("password")).await,
        format!(
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [{HOST}]"
        )
    );
    assert_eq!(client.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(client.cmd("*").await, "501 5.7.0 Authentication cancelled");

    // And XOAUTH2 works on the same connection afterwards.
    assert_eq!(
        client
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                xoauth2("support@contoso.com", &token)
            ))
            .await,
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(
        client.cmd("AUTH XOAUTH2").await,
        "503 5.5.1 Already authenticated"
    );
    assert_eq!(client.cmd("DATA").await, "503 5.5.2 Need mail command");
    assert_eq!(
        client.cmd("MAIL FROM:<support@contoso.com>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        client.cmd("MAIL FROM:<support@contoso.com>").await,
        "503 5.5.2 Sender already specified"
    );
    assert_eq!(client.cmd("DATA").await, "503 5.5.2 Need rcpt command");
    assert_eq!(client.cmd("RSET").await, "250 2.0.0 Resetting");
    assert_eq!(
        client.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );
    assert!(client.closed().await);
}

#[tokio::test]
async fn xoauth2_with_a_large_token_as_initial_response_and_after_334() {
    let env = Env::start().await;
    // Extra roles make the token > 3 KB, so the AUTH line (> 4 KiB) is longer than smtp-proto's own limit.
    let mut roles = vec!["SMTP.SendAsApp".to_owned()];
    roles.extend((0..40).map(|i| format!("Sandbox.Padding.Role.{i:04}.ReadWrite")));
    let kind = TokenKind::App {
        client_id: SERVICE_APP.into(),
        roles,
    };
    let token = env.mint(CONTOSO, SMTP_AUDIENCE, kind, chrono::Duration::hours(1));
    assert!(token.len() > 3072, "{}", token.len());
    let response = xoauth2("support@contoso.com", &token);
    assert!(response.len() > 4096);

    let mut client = env.tls_client().await;
    assert_eq!(
        client.cmd(&format!("AUTH XOAUTH2 {response}")).await,
        "235 2.7.0 Authentication successful"
    );

    let mut client = env.tls_client().await;
    assert_eq!(client.cmd("AUTH XOAUTH2").await, "334 ");
    assert_eq!(
        client.cmd(&response).await,
        "235 2.7.0 Authentication successful"
    );

    // Cancel after 334; "=" is an empty initial response (a failure, not a prompt).
    let mut client = env.tls_client().await;
    assert_eq!(client.cmd("AUTH XOAUTH2").await, "334 ");
    assert_eq!(client.cmd("*").await, "501 5.7.0 Authentication cancelled");
    assert_eq!(
        client.cmd("AUTH XOAUTH2 =").await,
        format!("535 5.7.3 Authentication unsuccessful [{HOST}]")
    );

    // A delegated token (ROPC) for the user's own mailbox works too.
    let kind = TokenKind::User {
        client_id: DELEGATED_APP.into(),
        upn: "anna@contoso.com".into(),
        scopes: vec!["SMTP.Send".into(), "offline_access".into()],
    };
    let token = env.mint(CONTOSO, SMTP_AUDIENCE, kind, chrono::Duration::hours(1));
    let mut client = env.tls_client().await;
    assert_eq!(
        client
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                xoauth2("anna@contoso.com", &token)
            ))
            .await,
        "235 2.7.0 Authentication successful"
    );
    let mut client = env.tls_client().await;
    assert_eq!(
        client
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                xoauth2("support@contoso.com", &token)
            ))
            .await,
        format!("535 5.7.3 Authentication unsuccessful [{HOST}]")
    );

    // Python's smtplib, both ways.
    for continuation in [false, true] {
        let Some(out) = env
            .python(serde_json::json!({
                "user": "support@contoso.com", "token": token_for_python(&env), "continuation": continuation,
            }))
            .await
        else {
            return;
        };
        assert_eq!(out["auth"][0], 235, "{out}");
        if continuation {
            assert_eq!(out["auth_challenge"][0], 334, "{out}");
        }
        assert!(
            out["ehlo_tls"]
                .as_str()
                .unwrap()
                .contains("AUTH LOGIN XOAUTH2"),
            "{out}"
        );
        assert!(
            !out["ehlo_plain"].as_str().unwrap().contains("AUTH"),
            "{out}"
        );
    }
}

fn token_for_python(env: &Env) -> String {
    env.service_token()
}

#[tokio::test]
async fn bad_tokens_and_missing_permissions_get_535_5_7_3() {
    let env = Env::start().await;
    let unsuccessful = format!("535 5.7.3 Authentication unsuccessful [{HOST}]");
    let app = |client_id: &str, roles: &[&str]| TokenKind::App {
        client_id: client_id.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    };
    let send_roles = ["SMTP.SendAsApp"];

    let expired = env.mint(
        CONTOSO,
        SMTP_AUDIENCE,
        app(SERVICE_APP, &send_roles),
        chrono::Duration::seconds(-5),
    );
    let revoked = env.service_token();
    assert!(env.tokens.revoke(&revoked));
    let good = env.service_token();
    let mut tampered = good.clone();
    let i = tampered.len() / 2;
    let replacement = if &good[i..i + 1] == "A" { "B" } else { "A" };
    tampered.replace_range(i..i + 1, replacement);
    let other_tenant = env.app_token(FABRIKAM, FABRIKAM_APP, &send_roles);
    let imap_only = env.app_token(CONTOSO, IMAP_ONLY_APP, &["IMAP.AccessAsApp"]);
    let no_role = env.app_token(CONTOSO, SERVICE_APP, &["IMAP.AccessAsApp"]);
    let imap_audience = env.mint(
        CONTOSO,
        "https://outlook.office365.com",
        app(SERVICE_APP, &send_roles),
        chrono::Duration::hours(1),
    );

    let mut client = env.tls_client().await;
    let cases = [
        ("expired", xoauth2("support@contoso.com", &expired)),
        ("revoked", xoauth2("support@contoso.com", &revoked)),
        ("tampered", xoauth2("support@contoso.com", &tampered)),
        (
            "unknown",
            xoauth2("support@contoso.com", "eyJ0eXAiOiJKV1QifQ.e30.c2ln"),
        ),
        (
            "other tenant",
            xoauth2("support@contoso.com", &other_tenant),
        ),
        (
            "app without SMTP.SendAsApp and FullAccess",
            xoauth2("support@contoso.com", &imap_only),
        ),
        (
            "token without SMTP.SendAsApp",
            xoauth2("support@contoso.com", &no_role),
        ),
        (
            "IMAP audience",
            xoauth2("support@contoso.com", &imap_audience),
        ),
        (
            "no FullAccess on the mailbox",
            xoauth2("anna@contoso.com", &good),
        ),
        ("unknown mailbox", xoauth2("nobody@contoso.com", &good)),
        ("not base64", "%%%not-base64%%%".to_owned()),
        (
            "no Bearer",
            STANDARD.encode(format!("user=support@contoso.com\x01auth={good}\x01\x01")),
        ),
        (
            "no user",
            STANDARD.encode(format!("auth=Bearer {good}\x01\x01")),
        ),
    ];
    for (case, response) in &cases {
        assert_eq!(
            client.cmd(&format!("AUTH XOAUTH2 {response}")).await,
            unsuccessful,
            "{case}"
        );
    }
    // The same failures after the 334 prompt.
    for (case, response) in &cases[..3] {
        assert_eq!(client.cmd("AUTH XOAUTH2").await, "334 ", "{case}");
        assert_eq!(client.cmd(response).await, unsuccessful, "{case}");
    }
    assert_eq!(
        client.cmd("MAIL FROM:<support@contoso.com>").await,
        format!("530 5.7.57 Client not authenticated to send mail. [{HOST}]")
    );
    // The connection survives failures, and a good token still works.
    assert_eq!(
        client
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                xoauth2("Support@Contoso.com", &good)
            ))
            .await,
        "235 2.7.0 Authentication successful"
    );
}

#[tokio::test]
async fn smtp_auth_disabled_for_the_mailbox_or_the_tenant_gets_5_7_139() {
    let env = Env::start().await;
    let mut client = env.tls_client().await;
    let reply = client
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2("smtpoff@contoso.com", &env.service_token())
        ))
        .await;
    assert_eq!(
        reply,
        format!(
            "535 5.7.139 Authentication unsuccessful, the user's SmtpClientAuthentication is disabled. \
             Visit https://aka.ms/smtp_auth_disabled for more information. [{HOST}]"
        )
    );
    let fabrikam = env.app_token(FABRIKAM, FABRIKAM_APP, &["SMTP.SendAsApp"]);
    let reply = client
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2("info@fabrikam.com", &fabrikam)
        ))
        .await;
    assert_eq!(
        reply,
        format!(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. \
             Visit https://aka.ms/smtp_auth_disabled for more information. [{HOST}]"
        )
    );

    // Through smtplib too.
    let Some(out) = env
        .python(serde_json::json!({ "user": "info@fabrikam.com", "token": fabrikam, "continuation": true }))
        .await
    else {
        return;
    };
    assert_eq!(out["auth"][0], 535, "{out}");
    assert!(out["auth"][1].as_str().unwrap().starts_with("5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."), "{out}");
}

#[tokio::test]
async fn smtplib_submission_is_stored_byte_exact_indexed_and_delivered() {
    let env = Env::start().await;
    let mut body = String::from("Hello,\r\n.\r\n..two dots\r\n.one dot\r\nnot a dot.\r\n");
    body.push_str(
        &"A long enough line of text to make this message about one hundred kilobytes.\r\n"
            .repeat(1300),
    );
    body.push_str("Grüße, the end\r\n");
    let raw = message(
        "support@contoso.com",
        "customer@example.com",
        "smtplib-1",
        &body,
    );
    assert!(raw.len() > 100_000);
    let file = env.root.join("message.eml");
    std::fs::write(&file, &raw).unwrap();
    let Some(out) = env
        .python(serde_json::json!({
            "user": "support@contoso.com", "token": env.service_token(),
            "mail_from": "support@contoso.com",
            "rcpt_to": ["customer@example.com", "Anna@Contoso.com", "someone@elsewhere.test", "customer@example.com"],
            "message_file": file,
        }))
        .await
    else {
        return;
    };
    assert_eq!(out["auth"][0], 235, "{out}");
    assert_eq!(out["send"]["ok"], true, "{out}");
    assert_eq!(out["starttls"][0], 220, "{out}");

    let sent = env.sent();
    assert_eq!(sent.len(), 1);
    let entry = &sent[0];
    assert_eq!(entry.user, "support@contoso.com");
    assert_eq!(entry.mail_from, "support@contoso.com");
    assert_eq!(
        entry.rcpt_to,
        [
            "customer@example.com",
            "Anna@Contoso.com",
            "someone@elsewhere.test",
            "customer@example.com"
        ]
    );
    assert_eq!(entry.size, raw.len());
    assert_eq!(entry.message_id.as_deref(), Some("smtplib-1@client.test"));
    assert_eq!(entry.queued_id, "smtplib-1@client.test");
    assert_eq!(
        entry.delivered_to,
        ["customer@example.com", "Anna@Contoso.com"]
    );
    assert_eq!(
        std::fs::read(entry.path(&env.sent_dir())).unwrap(),
        raw,
        "stored copy is byte-exact"
    );

    for mailbox in ["customer@example.com", "anna@contoso.com"] {
        let files = env.maildir_new(mailbox);
        assert_eq!(files.len(), 1, "{mailbox}");
        let delivered = std::fs::read(&files[0]).unwrap();
        assert!(delivered.starts_with(b"Received: from client.sandbox.test ([127.0.0.1]) by "));
        assert!(
            delivered.ends_with(&raw),
            "delivered copy keeps the submitted bytes"
        );
    }
    assert!(env.maildir_new("someone@elsewhere.test").is_empty());
    assert!(!env.root.join("mail/someone@elsewhere.test").exists());
}

#[tokio::test]
async fn send_as_is_checked_at_the_end_of_data() {
    let env = Env::start().await;
    let mut client = env.authed_client().await;
    let denied = "554 5.2.252 SendAsDenied; support@contoso.com not allowed to send as sales@contoso.com; \
                  STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied";

    // The envelope sender is another mailbox: MAIL is accepted, the final dot is refused.
    let raw = message(
        "sales@contoso.com",
        "customer@example.com",
        "as-sales",
        "x\r\n",
    );
    assert_eq!(
        client
            .submit("sales@contoso.com", &["customer@example.com"], &raw)
            .await,
        denied
    );
    // Envelope fine, From: header another mailbox.
    assert_eq!(
        client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
        denied
    );
    // A Send As grant (support → help@contoso.com).
    let raw = message(
        "help@contoso.com",
        "customer@example.com",
        "as-help",
        "x\r\n",
    );
    assert_queued(
        &client
            .submit("help@contoso.com", &["customer@example.com"], &raw)
            .await,
    );
    // Its own address, any case.
    let raw = message(
        "Support@Contoso.com",
        "customer@example.com",
        "as-self",
        "x\r\n",
    );
    assert_queued(
        &client
            .submit("SUPPORT@contoso.com", &["customer@example.com"], &raw)
            .await,
    );

    let sent = env.sent();
    assert_eq!(
        sent.iter()
            .map(|e| e.message_id.clone().unwrap())
            .collect::<Vec<_>>(),
        ["as-help@client.test", "as-self@client.test"]
    );
    assert_eq!(env.maildir_new("customer@example.com").len(), 2);

    // smtplib sees the 554 as a data error.
    let file = env.root.join("as-sales.eml");
    std::fs::write(
        &file,
        message(
            "sales@contoso.com",
            "customer@example.com",
            "py-sales",
            "x\r\n",
        ),
    )
    .unwrap();
    let Some(out) = env
        .python(serde_json::json!({
            "user": "support@contoso.com", "token": env.service_token(),
            "mail_from": "sales@contoso.com", "rcpt_to": ["customer@example.com"], "message_file": file,
        }))
        .await
    else {
        return;
    };
    assert_eq!(out["send"]["ok"], false, "{out}");
    assert_eq!(out["send"]["code"], 554, "{out}");
    assert!(
        out["send"]["text"]
            .as_str()
            .unwrap()
            .starts_with("5.2.252 SendAsDenied;"),
        "{out}"
    );
    assert_eq!(env.sent().len(), 2);
}

#[tokio::test]
async fn size_limit_at_mail_and_after_data() {
    let env = Env::start_with(|o| o.max_message_size = 10_000).await;
    let mut client = env.authed_client().await;
    let ehlo = client.cmd("EHLO again.test").await;
    assert!(ehlo.lines().any(|l| l == "250-SIZE 10000"), "{ehlo}");
    let too_big = "552 5.3.4 Message size exceeds fixed maximum message size";
    assert_eq!(
        client
            .cmd("MAIL FROM:<support@contoso.com> SIZE=10001")
            .await,
        too_big
    );
    assert_eq!(
        client
            .cmd("MAIL FROM:<support@contoso.com> SIZE=10000 BODY=8BITMIME")
            .await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(client.cmd("RSET").await, "250 2.0.0 Resetting");

    // A message larger than announced (no SIZE=): drained to the dot, then 552; the session goes on.
    let body =
        "0123456789012345678901234567890123456789012345678901234567890123456789\r\n".repeat(300);
    let raw = message("support@contoso.com", "customer@example.com", "big", &body);
    assert_eq!(
        client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
        too_big
    );
    assert_eq!(client.cmd("NOOP").await, "250 2.0.0 OK");
    let raw = message(
        "support@contoso.com",
        "customer@example.com",
        "small",
        "fits\r\n",
    );
    assert_queued(
        &client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
    );
    let sent = env.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].message_id.as_deref(), Some("small@client.test"));

    // The default limit as Exchange advertises it, and SIZE= above it.
    let env = Env::start().await;
    let mut client = env.authed_client().await;
    assert_eq!(
        client
            .cmd("MAIL FROM:<support@contoso.com> SIZE=99999999")
            .await,
        too_big
    );
    assert_eq!(
        client
            .cmd("MAIL FROM:<support@contoso.com> SIZE=36700160")
            .await,
        "250 2.1.0 Sender OK"
    );
}

#[tokio::test]
async fn dot_stuffing_empty_message_and_message_id_assignment() {
    let env = Env::start().await;
    let mut client = env.authed_client().await;

    // A first line that is stuffed, lines of dots, a line that is just "..", and no Message-ID.
    let stuffed =
        b"..first line starts with a dot\r\nSubject: not a header\r\n...\r\n..\r\n.x\r\nend\r\n";
    let unstuffed =
        b".first line starts with a dot\r\nSubject: not a header\r\n..\r\n.\r\nx\r\nend\r\n";
    let reply = client
        .submit("support@contoso.com", &["anna@contoso.com"], stuffed)
        .await;
    assert_queued(&reply);
    // Empty message: "." right after 354.
    let reply_empty = client
        .submit("support@contoso.com", &["anna@contoso.com"], b"")
        .await;
    assert_queued(&reply_empty);

    let sent = env.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        std::fs::read(sent[0].path(&env.sent_dir())).unwrap(),
        unstuffed
    );
    assert_eq!(sent[0].message_id, None);
    assert!(
        reply.contains(&format!("<{}>", sent[0].queued_id)),
        "{reply}"
    );
    assert!(sent[0].queued_id.ends_with(&format!("@{HOST}")));
    assert_eq!(sent[1].size, 0);
    assert_eq!(std::fs::read(sent[1].path(&env.sent_dir())).unwrap(), b"");

    // The delivered copy gets a Message-ID (the queued one) when the message had none.
    let files = env.maildir_new("anna@contoso.com");
    assert_eq!(files.len(), 2);
    let delivered: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let first = delivered
        .iter()
        .find(|d| d.ends_with(unstuffed))
        .expect("unstuffed delivery");
    let text = String::from_utf8_lossy(first);
    assert!(
        text.contains(&format!("\r\nMessage-ID: <{}>\r\n", sent[0].queued_id)),
        "{text}"
    );
}

#[tokio::test]
async fn a_whole_pipelined_transaction_in_one_write() {
    let env = Env::start().await;
    let mut client = env.tls_client().await;
    let raw = message(
        "support@contoso.com",
        "customer@example.com",
        "pipelined",
        "line\r\n..dot\r\n",
    );
    let mut batch = format!(
        "AUTH XOAUTH2 {}\r\nMAIL FROM:<support@contoso.com> SIZE={}\r\nRCPT TO:<customer@example.com>\r\n\
         RCPT TO:<vip@contoso.com>\r\nDATA\r\n",
        xoauth2("support@contoso.com", &env.service_token()),
        raw.len()
    )
    .into_bytes();
    batch.extend_from_slice(&raw);
    batch.extend_from_slice(b".\r\nNOOP\r\nMAIL FROM:<support@contoso.com>\r\nRSET\r\nQUIT\r\n");
    client.send(&batch).await;
    assert_eq!(client.reply().await, "235 2.7.0 Authentication successful");
    assert_eq!(client.reply().await, "250 2.1.0 Sender OK");
    assert_eq!(client.reply().await, "250 2.1.5 Recipient OK");
    assert_eq!(client.reply().await, "250 2.1.5 Recipient OK");
    assert_eq!(
        client.reply().await,
        "354 Start mail input; end with <CRLF>.<CRLF>"
    );
    assert_queued(&client.reply().await);
    assert_eq!(client.reply().await, "250 2.0.0 OK");
    assert_eq!(client.reply().await, "250 2.1.0 Sender OK");
    assert_eq!(client.reply().await, "250 2.0.0 Resetting");
    assert_eq!(
        client.reply().await,
        "221 2.0.0 Service closing transmission channel"
    );
    assert!(client.closed().await);

    let sent = env.sent();
    assert_eq!(sent.len(), 1);
    let expected = message(
        "support@contoso.com",
        "customer@example.com",
        "pipelined",
        "line\r\n.dot\r\n",
    );
    assert_eq!(
        std::fs::read(sent[0].path(&env.sent_dir())).unwrap(),
        expected
    );
    assert_eq!(env.maildir_new("vip@contoso.com").len(), 1);
}

#[tokio::test]
async fn starttls_command_injection_closes_the_connection() {
    let env = Env::start().await;
    let (mut client, _greeting) = env.client().await;
    client
        .send(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<support@contoso.com>\r\n")
        .await;
    assert!(client.reply().await.starts_with("250-"));
    assert_eq!(client.reply().await, "220 2.0.0 SMTP server ready");
    assert!(
        client.closed().await,
        "the injected MAIL must not be answered"
    );
}

#[tokio::test]
async fn over_long_lines_are_refused_and_the_session_goes_on() {
    let env = Env::start().await;
    let mut client = env.tls_client().await;
    let long = format!("NOOP {}", "x".repeat(20_000));
    assert_eq!(client.cmd(&long).await, "500 5.5.2 Line too long");
    assert_eq!(client.cmd("NOOP").await, "250 2.0.0 OK");
    assert_eq!(client.cmd("AUTH XOAUTH2").await, "334 ");
    assert_eq!(
        client.cmd(&"A".repeat(17_000)).await,
        "500 5.5.6 Authentication exchange line is too long"
    );
    assert_eq!(client.cmd("NOOP").await, "250 2.0.0 OK");
}

#[tokio::test]
async fn injected_faults_421_451_and_dropped_connections() {
    let env = Env::start().await;
    let fault = |point, action, count| SmtpFault {
        point,
        action,
        count,
    };

    // 421 at the greeting, once.
    env.handle
        .inject_fault(fault(FaultPoint::Greeting, FaultAction::Reply421, 1));
    let (mut client, greeting) = env.client().await;
    assert_eq!(
        greeting,
        "421 4.3.2 Service not available, closing transmission channel"
    );
    assert!(client.closed().await);
    assert!(env.handle.pending_faults().is_empty());
    let (_client, greeting) = env.client().await;
    assert!(greeting.starts_with("220 "), "{greeting}");

    // Dropped at the greeting.
    env.handle
        .inject_fault(fault(FaultPoint::Greeting, FaultAction::Drop, 1));
    let (_client, greeting) = env.client().await;
    assert_eq!(greeting, "<closed>");

    // 451 to AUTH twice, then it works; the command had no effect.
    env.handle
        .inject_fault(fault(FaultPoint::Auth, FaultAction::Reply451, 2));
    assert_eq!(env.handle.pending_faults()[0].count, 2);
    let mut client = env.tls_client().await;
    let auth = format!(
        "AUTH XOAUTH2 {}",
        xoauth2("support@contoso.com", &env.service_token())
    );
    assert_eq!(
        client.cmd(&auth).await,
        "451 4.7.0 Temporary server error. Please try again later."
    );
    assert_eq!(
        client.cmd(&auth).await,
        "451 4.7.0 Temporary server error. Please try again later."
    );
    assert_eq!(
        client.cmd(&auth).await,
        "235 2.7.0 Authentication successful"
    );

    // 421 to MAIL closes.
    env.handle
        .inject_fault(fault(FaultPoint::Mail, FaultAction::Reply421, 1));
    assert_eq!(
        client.cmd("MAIL FROM:<support@contoso.com>").await,
        "421 4.3.2 Service not available, closing transmission channel"
    );
    assert!(client.closed().await);

    // Dropped right after a successful AUTH (the 235 never arrives).
    env.handle
        .inject_fault(fault(FaultPoint::Auth, FaultAction::DropAfter, 1));
    let mut client = env.tls_client().await;
    assert_eq!(client.cmd(&auth).await, "<closed>");

    // Dropped at the end of DATA: nothing stored.
    env.handle
        .inject_fault(fault(FaultPoint::DataEnd, FaultAction::Drop, 1));
    let mut client = env.authed_client().await;
    let raw = message(
        "support@contoso.com",
        "customer@example.com",
        "dropped",
        "x\r\n",
    );
    assert_eq!(
        client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
        "<closed>"
    );
    assert!(env.sent().is_empty());

    // 451 at the end of DATA: nothing stored, the session goes on and a retry succeeds.
    env.handle
        .inject_fault(fault(FaultPoint::DataEnd, FaultAction::Reply451, 1));
    let mut client = env.authed_client().await;
    let raw = message(
        "support@contoso.com",
        "customer@example.com",
        "retried",
        "x\r\n",
    );
    assert_eq!(
        client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
        "451 4.7.0 Temporary server error. Please try again later."
    );
    assert!(env.sent().is_empty());
    assert_queued(
        &client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
    );
    assert_eq!(env.sent().len(), 1);

    // Accepted and delivered, but the connection drops before the 250: the client cannot tell (duplicates).
    env.handle
        .inject_fault(fault(FaultPoint::DataEnd, FaultAction::DropAfter, 1));
    let raw = message(
        "support@contoso.com",
        "customer@example.com",
        "ghost",
        "x\r\n",
    );
    assert_eq!(
        client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
        "<closed>"
    );
    let sent = env.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].message_id.as_deref(), Some("ghost@client.test"));

    // Faults can be listed and cleared; smtplib meets a 421 at the greeting as an error.
    env.handle
        .inject_fault(fault(FaultPoint::Rcpt, FaultAction::Reply421, 5));
    env.handle
        .inject_fault(fault(FaultPoint::Ehlo, FaultAction::Drop, 1));
    assert_eq!(env.handle.pending_faults().len(), 2);
    env.handle.clear_faults();
    assert!(env.handle.pending_faults().is_empty());
    let mut client = env.authed_client().await;
    assert_queued(
        &client
            .submit("support@contoso.com", &["customer@example.com"], &raw)
            .await,
    );
}

#[tokio::test]
async fn implicit_tls_listener_shares_state_and_smtplib_sends_through_it() {
    let env = Env::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let implicit = env.handle.serve_also(listener, true).unwrap();
    assert!(implicit.implicit_tls());

    let (mut client, greeting) =
        Client::connect_implicit(implicit.local_addr(), env.certs.client_config().unwrap()).await;
    assert!(greeting.starts_with(&format!("220 {HOST} ")), "{greeting}");
    let ehlo = client.cmd("EHLO client.test").await;
    assert!(
        ehlo.lines().any(|l| l == "250-AUTH LOGIN XOAUTH2") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    assert_eq!(
        client
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                xoauth2("support@contoso.com", &env.service_token())
            ))
            .await,
        "235 2.7.0 Authentication successful"
    );

    // Faults armed on either handle apply to both listeners.
    env.handle.inject_fault(SmtpFault {
        point: FaultPoint::Greeting,
        action: FaultAction::Reply421,
        count: 1,
    });
    let (_client, greeting) =
        Client::connect_implicit(implicit.local_addr(), env.certs.client_config().unwrap()).await;
    assert!(greeting.starts_with("421 4.3.2"), "{greeting}");

    let file = env.root.join("implicit.eml");
    let raw = message(
        "support@contoso.com",
        "sales@contoso.com",
        "implicit",
        "via 465\r\n",
    );
    std::fs::write(&file, &raw).unwrap();
    let Some(out) = env
        .python(serde_json::json!({
            "mode": "implicit", "port": implicit.local_addr().port(),
            "user": "support@contoso.com", "token": env.service_token(),
            "mail_from": "support@contoso.com", "rcpt_to": ["sales@contoso.com"], "message_file": file,
        }))
        .await
    else {
        return;
    };
    assert_eq!(out["send"]["ok"], true, "{out}");
    let sent = env.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(std::fs::read(sent[0].path(&env.sent_dir())).unwrap(), raw);
    assert_eq!(env.maildir_new("sales@contoso.com").len(), 1);
}

#[tokio::test]
async fn maildir_ownership_sent_items_and_shutdown() {
    // As root, delivered files and created directories belong to the given owner (Dovecot's run user).
    let owner = (65534, 65534);
    let env = Env::start_with(|o| {
        o.mail_owner = Some(owner);
        o.sent_items_folder = Some("Sent Items".into());
    })
    .await;
    let mut client = env.authed_client().await;
    let raw = message(
        "support@contoso.com",
        "noreply@contoso.com",
        "owned",
        "x\r\n",
    );
    assert_queued(
        &client
            .submit("support@contoso.com", &["noreply@contoso.com"], &raw)
            .await,
    );
    let files = env.maildir_new("noreply@contoso.com");
    assert_eq!(files.len(), 1);
    let sent_items = env
        .root
        .join("mail/support@contoso.com/Maildir/.Sent Items/cur");
    let filed: Vec<_> = std::fs::read_dir(&sent_items)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(filed.len(), 1);
    assert!(filed[0].to_string_lossy().ends_with(":2,S"));
    assert!(std::fs::read(&filed[0]).unwrap().ends_with(&raw));
    if nix_is_root() {
        use std::os::unix::fs::MetadataExt;
        for path in [
            files[0].clone(),
            env.root.join("mail/noreply@contoso.com"),
            env.root.join("mail/noreply@contoso.com/Maildir"),
            env.root.join("mail/noreply@contoso.com/Maildir/tmp"),
            filed[0].clone(),
        ] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), owner, "{}", path.display());
        }
    }

    // Stopping: an open session gets 421, the listener closes, wait() returns.
    let (mut idle, _) = env.client().await;
    env.stop.cancel();
    assert_eq!(
        idle.reply().await,
        "421 4.3.2 Service not available, closing transmission channel"
    );
    assert_eq!(
        client.reply().await,
        "421 4.3.2 Service not available, closing transmission channel"
    );
    tokio::time::timeout(Duration::from_secs(10), env.handle.wait())
        .await
        .expect("server stops");
    assert!(TcpStream::connect(env.handle.local_addr()).await.is_err());
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[tokio::test]
async fn idle_connections_time_out_with_421() {
    let env = Env::start_with(|o| o.idle_timeout = Duration::from_millis(300)).await;
    let (mut client, _) = env.client().await;
    assert_eq!(
        client.reply().await,
        format!("421 4.4.2 {HOST} Connection dropped due to timeout")
    );
    assert!(client.closed().await);
}
