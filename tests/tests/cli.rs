//! The real `mailqueue` binary: check-config, config-schema, migrate, import, serve — and that no secret ever
//! reaches its output or logs.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mailqueue_tests::{Kind, TestDb, config_yaml, mailqueue_bin};

fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(mailqueue_bin())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run mailqueue");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SECRETS: &[&str] = &[
    "tok-alice-S3CRET",
    "client-S3CRET-value",
    "mailbox-S3CRET-pw",
    "dbpass-S3CRET",
    "wrong-S3CRET-token",
];

/// A configuration whose every secret is one of `SECRETS`, from env, file and inline sources.
fn secret_config(dir: &std::path::Path, db_url: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("client_secret"), "client-S3CRET-value\n").unwrap();
    let yaml = format!(
        r#"database: {{ url: "{db_url}" }}
api:
  listen: "127.0.0.1:0"
  tokens:
    - {{ name: alice, role: agent, secret: {{ env: MQ_TEST_TOKEN_ALICE }}, queues: [support] }}
    - {{ name: admin, role: admin, secret: admin-inline-token }}
incoming_servers:
  - name: svc
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_service
    client_id: "11111111-1111-1111-1111-111111111111"
    client_secret: {{ file: client_secret }}
    imap: {{ host: outlook.office365.com }}
    enabled: false
  - name: usr
    login_address: "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    auth: oauth_user
    client_id: "22222222-2222-2222-2222-222222222222"
    imap: {{ host: outlook.office365.com }}
    enabled: false
queues:
  - name: support
    addresses:
      - {{ address: support@contoso.com, server: svc, sender: true }}
      - {{ address: agent.box@contoso.com, server: usr, password: {{ env: MQ_TEST_MAILBOX_PW }} }}
"#
    );
    let path = dir.join("mailqueue.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

const ENVS: &[(&str, &str)] = &[
    ("MQ_TEST_TOKEN_ALICE", "tok-alice-S3CRET"),
    ("MQ_TEST_MAILBOX_PW", "mailbox-S3CRET-pw"),
];

fn assert_no_secrets(what: &str, text: &str) {
    for s in SECRETS.iter().chain(["admin-inline-token"].iter()) {
        assert!(!text.contains(s), "{what} leaks the secret {s}:\n{text}");
    }
}

#[test]
fn check_config_accepts_a_good_file_and_warns_about_inline_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_config(dir.path(), "sqlite://data/x.db");
    let (code, out, err) = run(&["check-config", path.to_str().unwrap()], ENVS);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("ok"), "{out}");
    assert!(
        err.contains("inline"),
        "an inline secret is warned about: {err}"
    );
    assert_no_secrets("check-config", &(out + &err));
}

#[test]
fn check_config_reports_every_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "queues:\n  - name: a\n    addresses: []\n  - name: a\n    addresses:\n      - { address: not-an-address, server: nowhere }\n",
    )
    .unwrap();
    let (code, _out, err) = run(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    let file = path.display().to_string();
    for line in [":3:", ":4:", ":6:"] {
        assert!(
            err.lines().any(|l| l.contains(&file) && l.contains(line)),
            "no error on line {line}:\n{err}"
        );
    }
}

#[test]
fn check_config_names_a_missing_env_var_without_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_config(dir.path(), "sqlite://data/x.db");
    let (code, _out, err) = run(
        &["check-config", path.to_str().unwrap()],
        &[("MQ_TEST_MAILBOX_PW", "mailbox-S3CRET-pw")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("MQ_TEST_TOKEN_ALICE"), "{err}");
    assert_no_secrets("check-config", &err);
}

#[test]
fn config_schema_is_json_schema() {
    let (code, out, _) = run(&["config-schema"], &[]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(schema["properties"]["queues"].is_object(), "{schema}");
}

#[tokio::test]
async fn migrate_creates_the_schema_on_both_backends() {
    for kind in [Kind::Postgres, Kind::Sqlite] {
        let db = TestDb::new(kind).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, config_yaml(&db.url)).unwrap();
        let (code, out, err) = run(&["migrate", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{kind:?}: {out}{err}");
        assert!(out.contains("up to date"), "{out}");
        let (code, out, _) = run(&["migrate", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 0);
        assert!(
            out.contains("0 migration"),
            "second run applies nothing: {out}"
        );
    }
}

/// Runs `serve` with debug logs on PostgreSQL (with a password in the URL), uses good and bad tokens, stops it,
/// and checks that no secret appears anywhere in its output.
#[tokio::test]
async fn serve_never_logs_secrets() {
    let db = TestDb::new(Kind::Postgres).await;
    let url = db.url.replacen(
        "postgres://postgres@",
        "postgres://postgres:dbpass-S3CRET@",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = secret_config(dir.path(), &url);
    let mut child = Command::new(mailqueue_bin())
        .args([
            "--log-format",
            "json",
            "serve",
            "--config",
            path.to_str().unwrap(),
        ])
        .envs(ENVS.iter().copied())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut logs = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        assert!(
            Instant::now() < deadline,
            "serve did not report its address:\n{logs}"
        );
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            logs.push_str(&chunk);
        }
        if let Some(addr) = find_listen_addr(&logs) {
            break addr;
        }
    };
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    for token in [
        "tok-alice-S3CRET",
        "wrong-S3CRET-token",
        "admin-inline-token",
    ] {
        let r = client
            .post(format!("{base}/v1/contacts/claim"))
            .bearer_auth(token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        let body = r.text().await.unwrap();
        assert_no_secrets("an API response", &body);
    }
    let r = client
        .get(format!("{base}/v1/queues"))
        .bearer_auth("tok-alice-S3CRET")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_no_secrets("GET /v1/queues", &r.text().await.unwrap());
    terminate(&mut child);
    let _ = child.wait();
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(500)) {
        logs.push_str(&chunk);
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(
        logs.contains("alice"),
        "token names are logged, secrets never:\n{logs}"
    );
    assert_no_secrets("serve's output", &(logs + &stdout));
}

/// The `listening` address from a JSON log line (any field holding `127.0.0.1:<port>`).
fn find_listen_addr(logs: &str) -> Option<String> {
    logs.lines()
        .filter(|l| l.contains("listening"))
        .find_map(|l| {
            let start = l.find("127.0.0.1:")?;
            let port: String = l[start + 10..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            (!port.is_empty()).then(|| format!("127.0.0.1:{port}"))
        })
}

/// SIGTERM, as an orchestrator stops the engine.
fn terminate(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}
