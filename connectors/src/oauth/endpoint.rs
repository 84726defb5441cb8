//! Where tokens come from: the Microsoft identity platform v2.0 token endpoint of one tenant.

use std::fmt;

use mailqueue_config::{IncomingServer, OutgoingServer};
use reqwest::Url;

use super::OAuthConfigError;

/// The path Entra ID serves tokens on, below `https://login.microsoftonline.com/<tenant>`.
pub const TOKEN_PATH: &str = "/oauth2/v2.0/token";

/// A token endpoint URL, e.g. `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenEndpoint {
    url: Url,
}

impl TokenEndpoint {
    /// `<login_address trimmed of '/'>/oauth2/v2.0/token`. A `login_address` that already ends with the token path
    /// is taken as it is, and an issuer-style `…/<tenant>/v2.0` loses its `/v2.0`.
    pub fn from_login_address(login_address: &str) -> Result<Self, OAuthConfigError> {
        let base = login_address.trim().trim_end_matches('/');
        if base.ends_with(TOKEN_PATH) {
            return Self::from_url(base);
        }
        let base = base.strip_suffix("/v2.0").unwrap_or(base);
        Self::from_url(&format!("{base}{TOKEN_PATH}"))
    }

    /// A whole token endpoint URL (`http` or `https`, with a host, without user info).
    pub fn from_url(url: &str) -> Result<Self, OAuthConfigError> {
        let url = Url::parse(url.trim()).map_err(|e| {
            OAuthConfigError::new(format!("the token endpoint is not a valid URL: {e}"))
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(OAuthConfigError::new(
                "the token endpoint URL must not contain a user name or password",
            ));
        }
        if !matches!(url.scheme(), "https" | "http") {
            return Err(OAuthConfigError::new(format!(
                "the token endpoint must be an https URL, not `{}:`",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(OAuthConfigError::new("the token endpoint URL has no host"));
        }
        Ok(Self { url })
    }

    /// The token endpoint of an incoming (IMAP) server: its `token_endpoint`, else derived from `login_address`.
    pub fn for_server(server: &IncomingServer) -> Result<Self, OAuthConfigError> {
        Self::from_config(
            server.token_endpoint.as_deref(),
            server.login_address.as_deref(),
        )
        .map_err(|e| e.context(format!("incoming server `{}`", server.name)))
    }

    /// The token endpoint of the outgoing (SMTP) server: its `token_endpoint`, else derived from `login_address`.
    pub fn for_outgoing(server: &OutgoingServer) -> Result<Self, OAuthConfigError> {
        Self::from_config(
            server.token_endpoint.as_deref(),
            server.login_address.as_deref(),
        )
        .map_err(|e| e.context("the outgoing server"))
    }

    fn from_config(
        token_endpoint: Option<&str>,
        login_address: Option<&str>,
    ) -> Result<Self, OAuthConfigError> {
        match (token_endpoint, login_address) {
            (Some(url), _) => Self::from_url(url),
            (None, Some(login)) => Self::from_login_address(login),
            (None, None) => Err(OAuthConfigError::new(
                "needs `login_address` (or `token_endpoint`)",
            )),
        }
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// The host, with the port when the URL names one: what errors and logs show.
    pub fn host(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }
}

impl fmt::Display for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())
    }
}

impl fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenEndpoint({})", self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT: &str = "https://login.microsoftonline.com/contoso.onmicrosoft.com";

    #[test]
    fn derives_from_login_address() {
        let want = format!("{TENANT}/oauth2/v2.0/token");
        for login in [
            TENANT.to_owned(),
            format!("{TENANT}/"),
            format!("{TENANT}//"),
            format!("  {TENANT}/ "),
            format!("{TENANT}/v2.0"),
            format!("{TENANT}/oauth2/v2.0/token"),
        ] {
            let e = TokenEndpoint::from_login_address(&login).unwrap();
            assert_eq!(e.as_str(), want, "{login}");
            assert_eq!(e.host(), "login.microsoftonline.com");
        }
        let local = TokenEndpoint::from_login_address("http://127.0.0.1:4321/tid/").unwrap();
        assert_eq!(
            local.as_str(),
            "http://127.0.0.1:4321/tid/oauth2/v2.0/token"
        );
        assert_eq!(local.host(), "127.0.0.1:4321");
    }

    #[test]
    fn from_url_checks() {
        assert!(TokenEndpoint::from_url("https://login.example/t/oauth2/v2.0/token").is_ok());
        assert!(TokenEndpoint::from_url("not a url").is_err());
        assert!(TokenEndpoint::from_url("ftp://login.example/x").is_err());
        let e = TokenEndpoint::from_url("https://user:hunter2@login.example/x").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    fn server(yaml: &str) -> IncomingServer {
        let mut v: serde_json::Value = serde_json::from_str(
            r#"{"name":"m365","auth":"oauth_service","client_id":"c","imap":{"host":"outlook.office365.com"}}"#,
        )
        .unwrap();
        let extra: serde_json::Value = serde_json::from_str(yaml).unwrap();
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn for_server_prefers_token_endpoint() {
        let s = server(&format!(r#"{{"login_address":"{TENANT}"}}"#));
        assert_eq!(
            TokenEndpoint::for_server(&s).unwrap().as_str(),
            format!("{TENANT}/oauth2/v2.0/token")
        );
        let s = server(r#"{"token_endpoint":"https://idp.example/token"}"#);
        assert_eq!(
            TokenEndpoint::for_server(&s).unwrap().as_str(),
            "https://idp.example/token"
        );
        let e = TokenEndpoint::for_server(&server("{}")).unwrap_err();
        assert!(e.to_string().contains("incoming server `m365`"), "{e}");
        assert!(e.to_string().contains("login_address"), "{e}");
    }
}
