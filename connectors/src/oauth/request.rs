//! What to ask the token endpoint for: which client, which scope, with which credentials.

use std::{fmt, sync::Arc};

use mailqueue_config::{Address, AuthType, IncomingServer, OutgoingServer, Secret};

use super::{OAuthConfigError, TokenEndpoint};

/// Client credentials scope for IMAP (Exchange Online, `IMAP.AccessAsApp`).
pub const IMAP_SERVICE_SCOPE: &str = "https://outlook.office365.com/.default";
/// Client credentials scope for SMTP (`SMTP.SendAsApp`).
pub const SMTP_SERVICE_SCOPE: &str = "https://outlook.office.com/.default";
/// Delegated (ROPC) scope for IMAP, with `offline_access` for a refresh token.
pub const IMAP_USER_SCOPE: &str =
    "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access";
/// Delegated (ROPC) scope for SMTP, with `offline_access` for a refresh token.
pub const SMTP_USER_SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";

/// A client secret, password or refresh token. Cheap to clone; Debug and Display print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Arc<str>);

impl SecretString {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The value, for the request body only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&Secret> for SecretString {
    fn from(value: &Secret) -> Self {
        Self::new(value.expose())
    }
}

/// How the client proves who it is.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// *OAuth Service*: the client credentials grant with a client secret (an app token, no user).
    ClientSecret { client_secret: SecretString },
    /// *OAuth User*: the resource owner password grant (ROPC) for one mailbox, usually from a public client (no
    /// secret); a confidential client adds its secret. A returned refresh token is used for later renewals.
    Password {
        username: String,
        password: SecretString,
        client_secret: Option<SecretString>,
    },
}

/// The grant a token request uses; a label for logs and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grant {
    ClientCredentials,
    Password,
    RefreshToken,
}

impl Grant {
    /// The OAuth `grant_type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password => "password",
            Grant::RefreshToken => "refresh_token",
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kind of access token: endpoint, client, scope and credentials. The cache keeps one token per [`TokenKey`].
#[derive(Clone, Debug)]
pub struct TokenRequest {
    endpoint: TokenEndpoint,
    client_id: String,
    scope: String,
    credentials: Credentials,
}

/// What the cache keys tokens by: (endpoint, client id, scope, user). Secrets are not part of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub endpoint: String,
    pub client_id: String,
    pub scope: String,
    pub user: Option<String>,
}

/// Space-separated scopes, whitespace normalised.
fn normalize_scope<'a>(scopes: impl IntoIterator<Item = &'a str>) -> String {
    scopes
        .into_iter()
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

impl TokenRequest {
    /// *OAuth Service*: client credentials; `scope` is `<resource>/.default`.
    pub fn client_credentials(
        endpoint: TokenEndpoint,
        client_id: impl Into<String>,
        client_secret: impl Into<SecretString>,
        scope: &str,
    ) -> Self {
        Self {
            endpoint,
            client_id: client_id.into().trim().to_owned(),
            scope: normalize_scope([scope]),
            credentials: Credentials::ClientSecret {
                client_secret: client_secret.into(),
            },
        }
    }

    /// *OAuth User*: the password grant for `username`, from a public client.
    pub fn password(
        endpoint: TokenEndpoint,
        client_id: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<SecretString>,
        scope: &str,
    ) -> Self {
        Self {
            endpoint,
            client_id: client_id.into().trim().to_owned(),
            scope: normalize_scope([scope]),
            credentials: Credentials::Password {
                username: username.into().trim().to_owned(),
                password: password.into(),
                client_secret: None,
            },
        }
    }

    /// Adds a client secret to a password grant (a confidential client); no effect on client credentials.
    pub fn with_client_secret(mut self, secret: impl Into<SecretString>) -> Self {
        if let Credentials::Password { client_secret, .. } = &mut self.credentials {
            *client_secret = Some(secret.into());
        }
        self
    }

    /// The token to open `address`'s mailbox on `server` over IMAP. OAuth Service: one app token for every
    /// mailbox of the server (scope default [`IMAP_SERVICE_SCOPE`]); OAuth User: a token per mailbox login with
    /// the address's password (scope default [`IMAP_USER_SCOPE`]).
    pub fn for_mailbox(
        server: &IncomingServer,
        address: &Address,
    ) -> Result<Self, OAuthConfigError> {
        let what = || format!("incoming server `{}`", server.name);
        let endpoint = TokenEndpoint::for_server(server)?;
        let scope = match (server.scopes.is_empty(), server.auth) {
            (false, _) => normalize_scope(server.scopes.iter().map(String::as_str)),
            (true, AuthType::OauthService) => IMAP_SERVICE_SCOPE.to_owned(),
            (true, AuthType::OauthUser) => IMAP_USER_SCOPE.to_owned(),
        };
        let secret = resolved(server.client_secret.as_ref());
        let request = match server.auth {
            AuthType::OauthService => {
                let secret = secret.ok_or_else(|| {
                    OAuthConfigError::new(
                        "uses `auth: oauth_service`, which requires `client_secret`",
                    )
                    .context(what())
                })?;
                Self::client_credentials(endpoint, &server.client_id, secret, &scope)
            }
            AuthType::OauthUser => {
                let password = resolved(address.password.as_ref()).ok_or_else(|| {
                    OAuthConfigError::new(format!(
                        "address {} is on an `oauth_user` server and needs its mailbox `password`",
                        address.address.as_str()
                    ))
                    .context(what())
                })?;
                let request = Self::password(
                    endpoint,
                    &server.client_id,
                    address.login().as_str(),
                    password,
                    &scope,
                );
                match secret {
                    Some(secret) => request.with_client_secret(secret),
                    None => request,
                }
            }
        };
        Ok(request)
    }

    /// The token to send through the outgoing (SMTP) server as its `username`. The configured scopes are used
    /// as they are, except that OAuth User with the default `https://outlook.office.com/.default` asks for
    /// [`SMTP_USER_SCOPE`] (delegated `SMTP.Send` and a refresh token).
    pub fn for_outgoing(server: &OutgoingServer) -> Result<Self, OAuthConfigError> {
        let what = || "the outgoing server".to_owned();
        let endpoint = TokenEndpoint::for_outgoing(server)?;
        let configured = normalize_scope(server.scopes.iter().map(String::as_str));
        let secret = resolved(server.client_secret.as_ref());
        let request = match server.auth {
            AuthType::OauthService => {
                let scope = if configured.is_empty() {
                    SMTP_SERVICE_SCOPE.to_owned()
                } else {
                    configured
                };
                let secret = secret.ok_or_else(|| {
                    OAuthConfigError::new(
                        "uses `auth: oauth_service`, which requires `client_secret`",
                    )
                    .context(what())
                })?;
                Self::client_credentials(endpoint, &server.client_id, secret, &scope)
            }
            AuthType::OauthUser => {
                let scope = if configured.is_empty() || configured == SMTP_SERVICE_SCOPE {
                    SMTP_USER_SCOPE.to_owned()
                } else {
                    configured
                };
                let password = resolved(server.password.as_ref()).ok_or_else(|| {
                    OAuthConfigError::new("uses `auth: oauth_user`, which requires `password`")
                        .context(what())
                })?;
                let request = Self::password(
                    endpoint,
                    &server.client_id,
                    server.username.as_str(),
                    password,
                    &scope,
                );
                match secret {
                    Some(secret) => request.with_client_secret(secret),
                    None => request,
                }
            }
        };
        Ok(request)
    }

    pub fn endpoint(&self) -> &TokenEndpoint {
        &self.endpoint
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Space-separated scopes.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The user a delegated token is for; `None` for an app token.
    pub fn user(&self) -> Option<&str> {
        match &self.credentials {
            Credentials::ClientSecret { .. } => None,
            Credentials::Password { username, .. } => Some(username),
        }
    }

    /// The grant a first request uses (renewals of delegated tokens may use [`Grant::RefreshToken`]).
    pub fn grant(&self) -> Grant {
        match &self.credentials {
            Credentials::ClientSecret { .. } => Grant::ClientCredentials,
            Credentials::Password { .. } => Grant::Password,
        }
    }

    pub fn key(&self) -> TokenKey {
        TokenKey {
            endpoint: self.endpoint.as_str().to_owned(),
            client_id: self.client_id.to_ascii_lowercase(),
            scope: self.scope.clone(),
            user: self.user().map(str::to_lowercase),
        }
    }

    /// Every secret this request carries, to scrub them from anything shown.
    pub(crate) fn secrets(&self) -> Vec<&str> {
        match &self.credentials {
            Credentials::ClientSecret { client_secret } => vec![client_secret.expose()],
            Credentials::Password {
                password,
                client_secret,
                ..
            } => std::iter::once(password.expose())
                .chain(client_secret.as_ref().map(SecretString::expose))
                .collect(),
        }
    }
}

fn resolved(secret: Option<&Secret>) -> Option<SecretString> {
    secret
        .filter(|s| !s.expose().is_empty())
        .map(SecretString::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> TokenEndpoint {
        TokenEndpoint::from_login_address("https://login.microsoftonline.com/t").unwrap()
    }

    fn incoming(json: &str) -> IncomingServer {
        serde_json::from_str(json).unwrap()
    }

    fn address(json: &str) -> Address {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn service_mailboxes_share_one_app_token() {
        let s = incoming(
            r#"{"name":"m","auth":"oauth_service","client_id":"C1","client_secret":"s3cr3t",
                "login_address":"https://login.microsoftonline.com/t","imap":{"host":"h"}}"#,
        );
        let a = TokenRequest::for_mailbox(&s, &address(r#"{"address":"a@x.com","server":"m"}"#))
            .unwrap();
        let b = TokenRequest::for_mailbox(&s, &address(r#"{"address":"b@x.com","server":"m"}"#))
            .unwrap();
        assert_eq!(a.key(), b.key());
        assert_eq!(a.scope(), IMAP_SERVICE_SCOPE);
        assert_eq!(a.user(), None);
        assert_eq!(a.grant(), Grant::ClientCredentials);
        assert_eq!(a.key().client_id, "c1");
        assert!(!format!("{a:?}").contains("s3cr3t"));
    }

    #[test]
    fn user_mailboxes_get_their_own_tokens() {
        let s = incoming(
            r#"{"name":"m","auth":"oauth_user","client_id":"C1",
                "token_endpoint":"https://login.microsoftonline.com/t/oauth2/v2.0/token","imap":{"host":"h"}}"#,
        );
        let a = TokenRequest::for_mailbox(
            &s,
            &address(
                r#"{"address":"q@x.com","account":"Anna@x.com","server":"m","password":"pw-1"}"#,
            ),
        )
        .unwrap();
        assert_eq!(a.user(), Some("Anna@x.com"));
        assert_eq!(a.key().user.as_deref(), Some("anna@x.com"));
        assert_eq!(a.scope(), IMAP_USER_SCOPE);
        assert_eq!(a.grant(), Grant::Password);
        assert!(!format!("{a:?}").contains("pw-1"));
        let b = TokenRequest::for_mailbox(
            &s,
            &address(r#"{"address":"b@x.com","server":"m","password":"pw-2"}"#),
        )
        .unwrap();
        assert_ne!(a.key(), b.key());
        let e = TokenRequest::for_mailbox(&s, &address(r#"{"address":"c@x.com","server":"m"}"#))
            .unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
    }

    #[test]
    fn configured_scopes_are_normalised() {
        let s = incoming(
            r#"{"name":"m","auth":"oauth_service","client_id":"c","client_secret":"s","scopes":[" a  b ","c"],
                "login_address":"https://login.microsoftonline.com/t","imap":{"host":"h"}}"#,
        );
        let r = TokenRequest::for_mailbox(&s, &address(r#"{"address":"a@x.com","server":"m"}"#))
            .unwrap();
        assert_eq!(r.scope(), "a b c");
        let missing = incoming(
            r#"{"name":"m","auth":"oauth_service","client_id":"c",
                "login_address":"https://login.microsoftonline.com/t","imap":{"host":"h"}}"#,
        );
        let e =
            TokenRequest::for_mailbox(&missing, &address(r#"{"address":"a@x.com","server":"m"}"#))
                .unwrap_err();
        assert!(e.to_string().contains("client_secret"), "{e}");
    }

    #[test]
    fn outgoing_scopes() {
        let out: OutgoingServer = serde_json::from_str(
            r#"{"host":"smtp.office365.com","auth":"oauth_service","client_id":"c","client_secret":"s",
                "username":"noreply@x.com","login_address":"https://login.microsoftonline.com/t"}"#,
        )
        .unwrap();
        let r = TokenRequest::for_outgoing(&out).unwrap();
        assert_eq!(r.scope(), SMTP_SERVICE_SCOPE);
        assert_eq!(r.user(), None);
        let out: OutgoingServer = serde_json::from_str(
            r#"{"host":"smtp.office365.com","auth":"oauth_user","client_id":"c","password":"pw",
                "username":"anna@x.com","login_address":"https://login.microsoftonline.com/t"}"#,
        )
        .unwrap();
        let r = TokenRequest::for_outgoing(&out).unwrap();
        assert_eq!(r.scope(), SMTP_USER_SCOPE);
        assert_eq!(r.user(), Some("anna@x.com"));
    }

    #[test]
    fn secrets_never_print() {
        let r = TokenRequest::password(endpoint(), "c", "u@x.com", "hunter2", "s")
            .with_client_secret("topsecret");
        let debug = format!("{r:?} {:?}", r.key());
        assert!(
            !debug.contains("hunter2") && !debug.contains("topsecret"),
            "{debug}"
        );
        assert_eq!(r.secrets(), vec!["hunter2", "topsecret"]);
        assert_eq!(SecretString::from("x").to_string(), "***");
    }
}
