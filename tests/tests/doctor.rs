//! `mailqueue doctor` (the real binary) against the local Microsoft 365 sandbox: the sandbox's own configuration
//! passes; each broken variant fails at the right step with the right cause, in text and JSON; `--send-test`
//! delivers; no secret or token ever appears in the output.

use std::{path::PathBuf, process::Command};

use mailqueue_sandbox::Sandbox;
use mailqueue_tests::mailqueue_bin;
use serde_json::Value as Json;

/// The configuration the sandbox writes.
fn good_config(sb: &Sandbox) -> String {
    std::fs::read_to_string(sb.dir().join("mailqueue.yaml")).expect("the sandbox's mailqueue.yaml")
}

/// Writes a variant of the configuration beside the sandbox's (so `secrets/…` paths resolve).
fn write_config(sb: &Sandbox, name: &str, yaml: &str) -> PathBuf {
    let path = sb.dir().join(format!(
        "doctor-{name}-{}.yaml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn write_secret(sb: &Sandbox, name: &str, value: &str) -> String {
    let rel = format!("secrets/doctor-{name}-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(sb.dir().join(&rel), value).unwrap();
    rel
}

/// Every secret the outputs must never show: the files under secrets/ and the world's app secrets and passwords.
fn secrets(sb: &Sandbox) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(sb.dir().join("secrets"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() >= 6)
        .collect();
    out.extend(
        [
            "svc~Secret.Value-1234567890abcdefGHIJ",
            "imaponly~Secret-abcdefghijklmnop",
            "Anna-Passw0rd!",
            "wrong~Secret-doctor-0000000000",
        ]
        .map(String::from),
    );
    out
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn doctor(sb: &Sandbox, config: &std::path::Path, extra: &[&str]) -> Run {
    let out = Command::new(mailqueue_bin())
        .arg("doctor")
        .arg("--config")
        .arg(config)
        .args(extra)
        .env_remove("MAILQUEUE_CONFIG")
        .output()
        .expect("run mailqueue doctor");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let all = format!("{}{}", run.stdout, run.stderr);
    for secret in secrets(sb) {
        assert!(
            !all.contains(&secret),
            "a secret leaked into the output:\n{all}"
        );
    }
    // Access tokens are JWTs: base64url of `{"` starts with `eyJ`.
    assert!(
        !all.contains("eyJ"),
        "a token leaked into the output:\n{all}"
    );
    run
}

/// Runs text and JSON; returns the failing step of the chain whose name contains `chain` (JSON), after checking
/// that the text names the same step as failed with the same cause.
fn failing_step(sb: &Sandbox, config: &std::path::Path, chain: &str) -> Json {
    let text = doctor(sb, config, &[]);
    assert_eq!(text.code, 1, "{}{}", text.stdout, text.stderr);
    let json = doctor(sb, config, &["--json"]);
    assert_eq!(json.code, 1, "{}{}", json.stdout, json.stderr);
    let report: Json = serde_json::from_str(&json.stdout).expect(&json.stdout);
    assert_eq!(report["ok"], false);
    let c = report["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().contains(chain))
        .unwrap_or_else(|| panic!("no chain {chain}: {report:#}"))
        .clone();
    assert_eq!(c["ok"], false, "{c:#}");
    let steps = c["steps"].as_array().unwrap();
    let last = steps.last().unwrap().clone();
    assert_eq!(
        last["ok"], false,
        "the chain stops at its first failure: {c:#}"
    );
    assert!(
        steps[..steps.len() - 1].iter().all(|s| s["ok"] == true),
        "{c:#}"
    );
    assert!(
        last["cause"].is_string() && last["fix"].is_string(),
        "{last:#}"
    );
    // The text: the chain's header, then the failed step's line with the same cause.
    let section = text
        .stdout
        .split_once(&format!("{}\n", c["name"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{}", text.stdout))
        .1;
    let line = section
        .lines()
        .find(|l| l.trim_start().starts_with("failed"))
        .unwrap_or_else(|| panic!("{}", text.stdout));
    assert!(
        line.contains(&format!("failed {}:", last["step"].as_str().unwrap())),
        "{line}"
    );
    assert!(line.contains(last["cause"].as_str().unwrap()), "{line}");
    assert!(!text.stdout.contains("\x1b["), "no colour off a terminal");
    last
}

#[tokio::test]
async fn good_configuration_passes() {
    let sb = Sandbox::shared().await;
    let path = write_config(sb, "good", &good_config(sb));
    let text = doctor(sb, &path, &[]);
    assert_eq!(text.code, 0, "{}{}", text.stdout, text.stderr);
    assert!(text.stdout.contains("chain(s) passed"), "{}", text.stdout);
    assert!(!text.stdout.contains("failed"), "{}", text.stdout);
    for step in [
        "configuration",
        "token endpoint",
        "token contents",
        "imap connect",
        "imap auth",
        "imap select",
        "smtp auth",
    ] {
        assert!(
            text.stdout.contains(&format!("ok     {step}:")),
            "{step}: {}",
            text.stdout
        );
    }
    let json = doctor(sb, &path, &["--json"]);
    assert_eq!(json.code, 0, "{}{}", json.stdout, json.stderr);
    let report: Json = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let chains = report["chains"].as_array().unwrap();
    assert!(chains.iter().any(|c| c["kind"] == "incoming"));
    assert_eq!(chains.iter().filter(|c| c["kind"] == "outgoing").count(), 1);
    for c in chains {
        assert_eq!(c["ok"], true, "{c:#}");
        for s in c["steps"].as_array().unwrap() {
            assert!(s["step"].is_string() && s["detail"].is_string());
            assert!(s.get("cause").is_none() && s.get("fix").is_none(), "{s:#}");
        }
    }
}

#[tokio::test]
async fn wrong_client_secret_fails_at_the_token() {
    let sb = Sandbox::shared().await;
    let wrong = write_secret(sb, "wrong", "wrong~Secret-doctor-0000000000");
    let yaml = good_config(sb).replace(
        "client_secret: { file: secrets/service-client-secret }",
        &format!("client_secret: {{ file: {wrong} }}"),
    );
    let path = write_config(sb, "wrong-secret", &yaml);
    let step = failing_step(sb, &path, "sandbox-service / support@contoso.com");
    assert_eq!(step["step"], "token", "{step:#}");
    assert!(
        step["detail"].as_str().unwrap().contains("AADSTS7000215"),
        "{step:#}"
    );
    assert_eq!(step["cause"], "the client secret is wrong");
    // The outgoing server uses the same secret.
    let step = failing_step(sb, &path, "outgoing");
    assert_eq!(step["step"], "token", "{step:#}");
}

#[tokio::test]
async fn unknown_tenant_fails_at_the_token() {
    let sb = Sandbox::shared().await;
    let yaml = good_config(sb).replace(sb.tenant_id(), "00000000-dead-4bee-8000-000000000000");
    let path = write_config(sb, "tenant", &yaml);
    let step = failing_step(sb, &path, "sandbox-service / support@contoso.com");
    assert_eq!(step["step"], "token", "{step:#}");
    assert!(
        step["detail"].as_str().unwrap().contains("AADSTS90002"),
        "{step:#}"
    );
    assert!(step["fix"].as_str().unwrap().contains("login_address"));
}

#[tokio::test]
async fn app_without_smtp_role_fails_at_the_token_contents() {
    let sb = Sandbox::shared().await;
    let secret = write_secret(sb, "imaponly", "imaponly~Secret-abcdefghijklmnop");
    let good = good_config(sb);
    let (head, tail) = good.split_once("outgoing_server:").unwrap();
    let tail = tail
        .replacen(
            &format!("client_id: \"{}\"", sb.service_app().client_id),
            "client_id: \"5b5b5b5b-0000-4000-8000-0000000000b5\"",
            1,
        )
        .replacen(
            "client_secret: { file: secrets/service-client-secret }",
            &format!("client_secret: {{ file: {secret} }}"),
            1,
        );
    let path = write_config(sb, "imap-only", &format!("{head}outgoing_server:{tail}"));
    let step = failing_step(sb, &path, "outgoing");
    assert_eq!(step["step"], "token contents", "{step:#}");
    assert!(
        step["detail"].as_str().unwrap().contains("SMTP.SendAsApp"),
        "{step:#}"
    );
    let fix = step["fix"].as_str().unwrap();
    assert!(
        fix.contains("add the Application permission SMTP.SendAsApp")
            && fix.contains("grant admin consent"),
        "{fix}"
    );
}

#[tokio::test]
async fn mailbox_without_full_access_fails_at_imap_auth() {
    let sb = Sandbox::shared().await;
    let yaml = good_config(sb).replace("\"vip@contoso.com\"", "\"ben@contoso.com\"");
    let path = write_config(sb, "no-full-access", &yaml);
    let step = failing_step(sb, &path, "sandbox-service / ben@contoso.com");
    assert_eq!(step["step"], "imap auth", "{step:#}");
    let fix = step["fix"].as_str().unwrap();
    for needle in [
        "IMAP.AccessAsApp",
        "New-ServicePrincipal",
        "Add-MailboxPermission -Identity ben@contoso.com",
        "FullAccess",
    ] {
        assert!(fix.contains(needle), "{needle}: {fix}");
    }
}

#[tokio::test]
async fn smtp_auth_off_fails_at_smtp_auth() {
    let sb = Sandbox::shared().await;
    let good = good_config(sb);
    let (head, tail) = good.split_once("outgoing_server:").unwrap();
    let tail = tail.replacen(
        "username: \"support@contoso.com\"",
        "username: \"smtpoff@contoso.com\"",
        1,
    );
    let path = write_config(sb, "smtpoff", &format!("{head}outgoing_server:{tail}"));
    let step = failing_step(sb, &path, "outgoing");
    assert_eq!(step["step"], "smtp auth", "{step:#}");
    assert!(
        step["detail"].as_str().unwrap().contains("5.7.139"),
        "{step:#}"
    );
    assert!(
        step["fix"]
            .as_str()
            .unwrap()
            .contains("SmtpClientAuthenticationDisabled"),
        "{step:#}"
    );
}

#[tokio::test]
async fn wrong_imap_port_fails_at_imap_connect() {
    let sb = Sandbox::shared().await;
    let free = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = good_config(sb).replace(
        &format!("port: {}, tls: implicit", sb.imaps_port()),
        &format!("port: {free}, tls: implicit"),
    );
    let path = write_config(sb, "port", &yaml);
    let step = failing_step(sb, &path, "sandbox-service / support@contoso.com");
    assert_eq!(step["step"], "imap connect", "{step:#}");
    assert!(
        step["fix"].as_str().unwrap().contains("imap.port"),
        "{step:#}"
    );
}

#[tokio::test]
async fn send_test_delivers_a_message() {
    let sb = Sandbox::shared().await;
    let path = write_config(sb, "send", &good_config(sb));
    let before = sb.sent().len();
    let run = doctor(
        sb,
        &path,
        &["--send-test", "customer@example.com", "--json"],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report: Json = serde_json::from_str(&run.stdout).unwrap();
    let outgoing = report["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "outgoing")
        .unwrap();
    let last = outgoing["steps"].as_array().unwrap().last().unwrap();
    assert_eq!(last["step"], "send test", "{outgoing:#}");
    assert_eq!(last["ok"], true);
    let sent = sb.sent();
    assert!(
        sent[before..]
            .iter()
            .any(|e| e.rcpt_to == ["customer@example.com"] && e.mail_from == "support@contoso.com"),
        "{sent:?}"
    );
}

#[tokio::test]
async fn configuration_errors_stop_before_anything_else() {
    let sb = Sandbox::shared().await;
    let yaml = good_config(sb).replace(
        "client_secret: { file: secrets/service-client-secret }",
        "client_secret: { file: secrets/does-not-exist }",
    );
    let path = write_config(sb, "missing-secret", &yaml);
    let text = doctor(sb, &path, &[]);
    assert_eq!(text.code, 1);
    assert!(text.stderr.contains("error:"), "{}", text.stderr);
    assert!(text.stdout.is_empty(), "{}", text.stdout);
    let json = doctor(sb, &path, &["--json"]);
    assert_eq!(json.code, 1);
    let report: Json = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(!report["errors"].as_array().unwrap().is_empty());
}
