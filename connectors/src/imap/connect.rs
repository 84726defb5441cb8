//! TCP + TLS to the IMAP server: implicit TLS (993) or STARTTLS (143, never continuing in plaintext), with the
//! webpki roots plus an optional extra CA, and timeouts on every step.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_imap::imap_proto::{Response, Status};
use mailqueue_config::model::{ImapEndpoint, ImapTls as TlsMode};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, CertificateError, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    },
};
use tracing::Instrument as _;

use super::{
    error::{ConnectFailure, ImapError, TlsProblem, secs},
    wire::clip,
};

/// The stream an IMAP session runs on.
pub(crate) type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// Longest line accepted before TLS (greeting, STARTTLS answer).
const MAX_PLAIN_LINE: u64 = 16 * 1024;

/// Which servers to trust, and how long to wait for them: the webpki (Mozilla) roots, plus the CAs of an optional
/// PEM file (`ca_file` of an incoming server, e.g. the local sandbox's CA). Cheap to clone; build once per server.
#[derive(Clone)]
pub struct ImapTls {
    config: Arc<ClientConfig>,
    ca_file: Option<PathBuf>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for ImapTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapTls")
            .field("ca_file", &self.ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl ImapTls {
    /// Default time allowed for DNS + TCP connect.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
    /// Default time allowed for the greeting, STARTTLS and the TLS handshake.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

    /// The webpki roots only.
    pub fn webpki() -> Self {
        Self::build(webpki_store(), None)
            .expect("the ring provider supports the default TLS versions")
    }

    /// The webpki roots plus every certificate of `ca_file` (PEM) when given. Fails if the file cannot be read or
    /// holds no certificate.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, ImapError> {
        let mut roots = webpki_store();
        if let Some(path) = ca_file {
            let ca_error = |detail: String| ImapError::Tls {
                host: String::new(),
                problem: TlsProblem::CaFile,
                detail: format!("{}: {detail}", path.display()),
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| ca_error(format!("not a PEM certificate file ({e})")))?;
                roots
                    .add(cert)
                    .map_err(|e| ca_error(format!("unusable certificate ({e})")))?;
                added += 1;
            }
            if added == 0 {
                return Err(ca_error(
                    "no certificate in it (expected `-----BEGIN CERTIFICATE-----`)".into(),
                ));
            }
        }
        Self::build(roots, ca_file.map(Path::to_path_buf))
    }

    fn build(roots: RootCertStore, ca_file: Option<PathBuf>) -> Result<Self, ImapError> {
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| ImapError::Tls {
                    host: String::new(),
                    problem: TlsProblem::Handshake,
                    detail: e.to_string(),
                })?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
            ca_file,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// Sets the time allowed for DNS + TCP connect, and for the greeting + STARTTLS + TLS handshake.
    pub fn with_timeouts(mut self, connect: Duration, handshake: Duration) -> Self {
        self.connect_timeout = connect;
        self.handshake_timeout = handshake;
        self
    }

    /// The extra CA file, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }
}

fn webpki_store() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// A connected, TLS-protected IMAP connection that has not logged in yet (the greeting is read). Log in with
/// [`authenticate_xoauth2`](super::authenticate_xoauth2).
pub struct Client {
    pub(crate) inner: async_imap::Client<Stream>,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) handshake_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The configured host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port connected to.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Connects to `endpoint` with its TLS mode: implicit TLS, or STARTTLS (greeting, `STARTTLS`, then TLS on the same
/// TCP connection; refused → [`TlsProblem::StarttlsRefused`], never plaintext). The certificate is checked against
/// `tls`'s roots for the configured host (a DNS name or an IP address such as `127.0.0.2`).
pub async fn connect(endpoint: &ImapEndpoint, tls: &ImapTls) -> Result<Client, ImapError> {
    let span = tracing::debug_span!("imap_connect", host = %endpoint.host, port = endpoint.port, tls = ?endpoint.tls);
    connect_inner(endpoint, tls).instrument(span).await
}

async fn connect_inner(endpoint: &ImapEndpoint, tls: &ImapTls) -> Result<Client, ImapError> {
    let host = endpoint.host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned();
    let port = endpoint.port;
    let server_name = ServerName::try_from(host.clone()).map_err(|_| ImapError::Connect {
        host: host.clone(),
        port,
        failure: ConnectFailure::Dns,
        detail: "not a valid host name or IP address".into(),
    })?;

    let tcp = tcp_connect(&host, port, tls.connect_timeout).await?;
    let limit = tls.handshake_timeout;
    let connector = TlsConnector::from(tls.config.clone());
    let closed = |detail: String| ImapError::Connect {
        host: host.clone(),
        port,
        failure: ConnectFailure::Closed,
        detail,
    };
    let too_slow = |what: &str| ImapError::Connect {
        host: host.clone(),
        port,
        failure: ConnectFailure::Timeout,
        detail: format!("no {what} within {}", secs(limit)),
    };

    let inner = match endpoint.tls {
        TlsMode::Implicit => {
            let stream = timeout(limit, connector.connect(server_name, tcp))
                .await
                .map_err(|_| too_slow("TLS handshake"))?
                .map_err(|e| tls_error(&host, e))?;
            let mut client = async_imap::Client::new(stream);
            let greeting = timeout(limit, client.read_response())
                .await
                .map_err(|_| too_slow("greeting"))?
                .map_err(|e| closed(format!("reading the greeting: {e}")))?
                .ok_or_else(|| closed("no greeting".into()))?;
            match greeting.parsed() {
                Response::Data {
                    status: Status::Ok, ..
                } => {}
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    return Err(closed(format!(
                        "BYE {}",
                        super::wire::outcome_text(outcome)
                    )));
                }
                other => {
                    return Err(ImapError::protocol(
                        "greeting",
                        format!(
                            "not an IMAP `* OK` greeting: {}",
                            clip(&format!("{other:?}"))
                        ),
                    ));
                }
            }
            client
        }
        TlsMode::Starttls => {
            let tcp = timeout(limit, starttls(tcp, &host, port))
                .await
                .map_err(|_| too_slow("greeting or STARTTLS answer"))??;
            let stream = timeout(limit, connector.connect(server_name, tcp))
                .await
                .map_err(|_| too_slow("TLS handshake"))?
                .map_err(|e| tls_error(&host, e))?;
            async_imap::Client::new(stream)
        }
    };
    tracing::debug!(host = %host, port, "IMAP connected");
    Ok(Client {
        inner,
        host,
        port,
        handshake_timeout: limit,
    })
}

/// DNS, then each address in turn, all within `limit`.
async fn tcp_connect(host: &str, port: u16, limit: Duration) -> Result<TcpStream, ImapError> {
    let error = |failure, detail: String| ImapError::Connect {
        host: host.to_owned(),
        port,
        failure,
        detail,
    };
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| error(ConnectFailure::Dns, e.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(error(ConnectFailure::Dns, "no address".into()));
        }
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        let (addr, e) = last.expect("at least one address was tried");
        let failure = match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            io::ErrorKind::TimedOut => ConnectFailure::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectFailure::Unreachable
            }
            _ => ConnectFailure::Other,
        };
        Err(error(failure, format!("{addr}: {e}")))
    };
    timeout(limit, attempt).await.map_err(|_| {
        error(
            ConnectFailure::Timeout,
            format!("no connection within {}", secs(limit)),
        )
    })?
}

/// Plaintext part of STARTTLS: greeting, `STARTTLS`, tagged OK; nothing may follow it before TLS.
async fn starttls(tcp: TcpStream, host: &str, port: u16) -> Result<TcpStream, ImapError> {
    let closed = |detail: String| ImapError::Connect {
        host: host.to_owned(),
        port,
        failure: ConnectFailure::Closed,
        detail,
    };
    let refused = |detail: String| ImapError::Tls {
        host: host.to_owned(),
        problem: TlsProblem::StarttlsRefused,
        detail,
    };
    let mut reader = BufReader::new(tcp);
    let greeting = read_line(&mut reader)
        .await
        .map_err(|e| closed(format!("reading the greeting: {e}")))?
        .ok_or_else(|| closed("no greeting".into()))?;
    let upper = greeting.to_ascii_uppercase();
    if upper.starts_with("* BYE") {
        return Err(closed(clip(&greeting)));
    }
    if !upper.starts_with("* OK") {
        return Err(ImapError::protocol(
            "greeting",
            format!("not an IMAP `* OK` greeting: {}", clip(&greeting)),
        ));
    }
    reader
        .get_mut()
        .write_all(b"S0 STARTTLS\r\n")
        .await
        .map_err(|e| closed(format!("sending STARTTLS: {e}")))?;
    loop {
        let line = read_line(&mut reader)
            .await
            .map_err(|e| closed(format!("waiting for the STARTTLS answer: {e}")))?
            .ok_or_else(|| {
                refused("the server closed the connection instead of answering STARTTLS".into())
            })?;
        let Some(rest) = line.strip_prefix("S0 ") else {
            if line.to_ascii_uppercase().starts_with("* BYE") {
                return Err(refused(clip(&line)));
            }
            continue;
        };
        if !rest.to_ascii_uppercase().starts_with("OK") {
            return Err(refused(clip(rest)));
        }
        break;
    }
    if !reader.buffer().is_empty() {
        return Err(ImapError::Tls {
            host: host.to_owned(),
            problem: TlsProblem::Handshake,
            detail: "the server sent plaintext data after accepting STARTTLS (possible injection); refusing".into(),
        });
    }
    Ok(reader.into_inner())
}

/// One CRLF-terminated line (without it); `None` at EOF.
async fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_PLAIN_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or cut off",
        ));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// A TLS handshake failure, with the certificate problem named.
fn tls_error(host: &str, e: io::Error) -> ImapError {
    let make = |problem, detail: String| ImapError::Tls {
        host: host.to_owned(),
        problem,
        detail,
    };
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        let detail = match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                format!("the server closed the connection during the handshake ({e})")
            }
            _ => e.to_string(),
        };
        return make(TlsProblem::Handshake, detail);
    };
    let detail = inner.to_string();
    match inner {
        rustls::Error::InvalidCertificate(cert) => {
            let problem = match cert {
                CertificateError::UnknownIssuer => TlsProblem::UnknownIssuer,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsProblem::Expired,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => TlsProblem::NameMismatch,
                _ => TlsProblem::Certificate,
            };
            make(problem, detail)
        }
        rustls::Error::InvalidMessage(_) => make(TlsProblem::NotTls, detail),
        _ => make(TlsProblem::Handshake, detail),
    }
}
