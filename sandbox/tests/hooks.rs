//! The sandbox's SMTP test hooks over HTTP: inject a fault, see it pending and take effect, clear it, read the sent
//! index.

use std::time::Duration;

use mailqueue_sandbox::Sandbox;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn smtp_faults_and_sent_index_over_http() {
    let sandbox = Sandbox::shared().await;
    let http = reqwest::Client::new();
    let url = format!("{}/_sandbox/smtp/faults", sandbox.idp_url());
    let fault = json!({ "point": "greeting", "action": "421", "count": 1 });
    let r: Value = http
        .post(&url)
        .json(&fault)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["pending"][0]["point"], "greeting", "{r}");

    // The next connection gets Exchange's 421 at the greeting, the one after it a normal greeting.
    for expected in ["421 4.3.2", "220 "] {
        let tcp = tokio::net::TcpStream::connect((sandbox.mail_host(), sandbox.smtp_port()))
            .await
            .unwrap();
        let mut lines = BufReader::new(tcp);
        let mut greeting = String::new();
        tokio::time::timeout(Duration::from_secs(5), lines.read_line(&mut greeting))
            .await
            .unwrap()
            .unwrap();
        assert!(greeting.starts_with(expected), "{greeting}");
        let _ = lines.get_mut().write_all(b"QUIT\r\n").await;
    }

    http.post(&url)
        .json(&json!({ "point": "mail", "action": "451", "count": 3 }))
        .send()
        .await
        .unwrap();
    let r: Value = http
        .delete(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["pending"], json!([]));
    let sent: Value = http
        .get(format!("{}/_sandbox/smtp/sent", sandbox.idp_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(sent.is_array(), "{sent}");
}
