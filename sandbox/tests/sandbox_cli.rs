//! The `mailqueue-sandbox` command line, end to end: `up` in the background writes `sandbox.env` and
//! `mailqueue.yaml`, a token from curl works against IMAP (Python's imaplib), `deliver` puts mail in, the generated
//! configuration passes the engine's `check-config`, and `down` stops everything, Dovecot included.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mailqueue_sandbox::{dovecot, sandbox::read_env};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mailqueue-sandbox");

/// Kills `up` if the test fails before `down`.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Logs in with Python's imaplib over implicit TLS and returns the INBOX's message count.
fn python_select(env: &BTreeMap<String, String>, user: &str, token: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/imap_client.py");
    let request = json!({
        "ca": env["MQ_SANDBOX_CA_FILE"], "host": env["MQ_SANDBOX_MAIL_HOST"],
        "cases": [{ "port": env["MQ_SANDBOX_IMAPS_PORT"].parse::<u16>().unwrap(), "tls": "implicit",
                    "user": user, "token": token, "select": true }],
    });
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    results.into_iter().next().unwrap()
}

/// `cargo`, without the variables cargo sets for test processes (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, …): build
/// scripts such as ring's depend on them, and inheriting them would rebuild half the tree on every run.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    let keep = [
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "CARGO_INCREMENTAL",
        "CARGO_BUILD_",
        "CARGO_TERM_",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTR",
        "CARGO_PROFILE_",
    ];
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let from_cargo = name.starts_with("CARGO_") && !keep.iter().any(|k| name.starts_with(k));
        if from_cargo || name == "OUT_DIR" {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

#[test]
fn up_writes_env_and_config_tokens_work_deliver_puts_mail_in_and_down_stops_everything() {
    let tmp = tempfile::Builder::new()
        .prefix("mq-sandbox-cli-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("sandbox-data");
    let log = std::fs::File::create(tmp.path().join("up.log")).unwrap();
    let up = Background(
        Command::new(BIN)
            .args(["up", "--dir"])
            .arg(&dir)
            .args(["--api-port", "18080"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let started = wait_for(Duration::from_secs(30), || {
        dir.join("sandbox.pid").exists() && dir.join("sandbox.env").exists()
    });
    let up_log = || std::fs::read_to_string(tmp.path().join("up.log")).unwrap_or_default();
    assert!(started, "up did not start:\n{}", up_log());
    assert!(
        up_log().contains("mailqueue serve --config"),
        "summary:\n{}",
        up_log()
    );

    let env = read_env(&dir).unwrap();
    assert_eq!(env["MQ_SANDBOX_PID"], up.0.id().to_string());
    assert_eq!(env["MQ_SANDBOX_MAIL_HOST"], "127.0.0.2");
    for key in [
        "MQ_SANDBOX_IDP_URL",
        "MQ_SANDBOX_TENANT_ID",
        "MQ_SANDBOX_IMAP_PORT",
        "MQ_SANDBOX_SMTP_PORT",
        "MQ_SANDBOX_SMTPS_PORT",
        "MQ_SANDBOX_SENT_DIR",
        "MQ_SANDBOX_CLIENT_ID",
    ] {
        assert!(
            env.get(key).is_some_and(|v| !v.is_empty()),
            "{key} missing: {env:?}"
        );
    }
    assert!(Path::new(&env["MQ_SANDBOX_CA_FILE"]).is_file());
    assert_eq!(env["MQ_SANDBOX_API_URL"], "http://127.0.0.1:18080");

    // A token with curl from the environment's IdP URL, as the summary shows.
    let token_url = format!(
        "{}/{}/oauth2/v2.0/token",
        env["MQ_SANDBOX_IDP_URL"], env["MQ_SANDBOX_TENANT_ID"]
    );
    assert_eq!(token_url, env["MQ_SANDBOX_TOKEN_URL"]);
    let body = run(Command::new("curl").args([
        "-sS",
        "--fail-with-body",
        &token_url,
        "-d",
        "grant_type=client_credentials",
        "-d",
        &format!("client_id={}", env["MQ_SANDBOX_CLIENT_ID"]),
        "--data-urlencode",
        &format!("client_secret={}", env["MQ_SANDBOX_CLIENT_SECRET"]),
        "-d",
        "scope=https://outlook.office365.com/.default",
    ]));
    let response: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(response["token_type"], "Bearer", "{body}");
    let token = response["access_token"].as_str().unwrap();

    let login = python_select(&env, "support@contoso.com", token);
    assert_eq!(login["ok"], true, "{login}");

    // `deliver` writes Maildir files that Dovecot serves.
    let mail = tmp.path().join("mail");
    std::fs::create_dir(&mail).unwrap();
    for i in 0..3 {
        std::fs::write(
            mail.join(format!("{i}.eml")),
            format!("Subject: cli {i}\r\n\r\nbody\r\n"),
        )
        .unwrap();
    }
    let single = tmp.path().join("single.eml");
    std::fs::write(&single, "Subject: single\r\n\r\nbody\r\n").unwrap();
    let out = run(Command::new(BIN)
        .args(["deliver", "--dir"])
        .arg(&dir)
        .args(["--to", "Sales@Contoso.com"])
        .arg(&single)
        .arg(&mail));
    assert!(out.contains("delivered 4 message(s)"), "{out}");
    let new = PathBuf::from(&env["MQ_SANDBOX_MAIL_ROOT"]).join("sales@contoso.com/Maildir/new");
    let files: Vec<_> = std::fs::read_dir(&new).unwrap().flatten().collect();
    assert_eq!(files.len(), 4);
    let mail_root_owner = std::fs::metadata(&env["MQ_SANDBOX_MAIL_ROOT"])
        .unwrap()
        .uid();
    for f in &files {
        assert_eq!(
            f.metadata().unwrap().uid(),
            mail_root_owner,
            "owned by Dovecot's user"
        );
    }
    let selected = python_select(&env, "sales@contoso.com", token);
    assert_eq!(selected["exists"], 4, "{selected}");

    // The generated configuration passes the engine's own checker (the `mailqueue check-config` binary).
    let config = dir.join("mailqueue.yaml");
    if let Err(errors) = mailqueue_config::load(&config) {
        panic!("mailqueue.yaml is invalid:\n{errors}");
    }
    let checked = run(cargo()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "-q", "-p", "mailqueue-engine", "--", "check-config"])
        .arg(&config));
    assert!(checked.contains(": ok"), "{checked}");

    // `down` stops the sandbox and its Dovecot.
    let instance = env["MQ_SANDBOX_DOVECOT_INSTANCE"].clone();
    assert!(!dovecot::processes_of(&instance).is_empty());
    let mut up = up;
    let out = run(Command::new(BIN).args(["down", "--dir"]).arg(&dir));
    assert!(out.contains("stopped"), "{out}");
    assert!(
        wait_for(Duration::from_secs(10), || up
            .0
            .try_wait()
            .unwrap()
            .is_some()),
        "up still runs"
    );
    assert!(
        up.0.try_wait().unwrap().unwrap().success(),
        "up exited with an error:\n{}",
        up_log()
    );
    assert!(
        wait_for(Duration::from_secs(5), || dovecot::processes_of(&instance)
            .is_empty()),
        "Dovecot processes remain: {:?}",
        dovecot::processes_of(&instance)
    );
    assert!(!dir.join("sandbox.pid").exists(), "the pid file is removed");
    let imaps = format!("127.0.0.2:{}", env["MQ_SANDBOX_IMAPS_PORT"]);
    assert!(
        std::net::TcpStream::connect(&imaps).is_err(),
        "{imaps} still accepts"
    );
    let again = run(Command::new(BIN).args(["down", "--dir"]).arg(&dir));
    assert!(again.contains("no sandbox is running"), "{again}");
}
