//! Throwaway TLS material for the sandbox: a private CA (CA:TRUE) and a leaf certificate (CA:FALSE) signed by it,
//! valid for `127.0.0.2`, `127.0.0.1`, `localhost` and `mail.sandbox.test`. The files are world-readable so that
//! Dovecot, running as `nobody`, can read the key (the directory is the sandbox's own, nothing secret is in it).
//! rustls configurations use the `ring` provider only.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Subject alternative names of the leaf certificate.
pub const LEAF_NAMES: [&str; 4] = ["127.0.0.2", "127.0.0.1", "localhost", "mail.sandbox.test"];

/// PEM files of the sandbox's CA and server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificates {
    /// The CA certificate clients trust.
    pub ca_pem: PathBuf,
    /// The server (leaf) certificate.
    pub cert_pem: PathBuf,
    /// The server's private key (PKCS#8).
    pub key_pem: PathBuf,
}

impl Certificates {
    /// Generates a fresh CA and server certificate into `dir` (created with mode 0755 if needed) as `ca.pem`,
    /// `cert.pem` and `key.pem`, all mode 0644.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod 0755 {}", dir.display()))?;

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mailqueue sandbox CA");
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "mailqueue sandbox");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;

        let leaf_key = KeyPair::generate().context("generating the server key")?;
        let mut leaf_params =
            CertificateParams::new(LEAF_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .context("SANs")?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "mail.sandbox.test");
        leaf_params
            .distinguished_name
            .push(DnType::OrganizationName, "mailqueue sandbox");
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .context("signing the server certificate")?;

        let certs = Self {
            ca_pem: dir.join("ca.pem"),
            cert_pem: dir.join("cert.pem"),
            key_pem: dir.join("key.pem"),
        };
        write_file(&certs.ca_pem, ca_cert.pem().as_bytes())?;
        write_file(&certs.cert_pem, leaf_cert.pem().as_bytes())?;
        write_file(&certs.key_pem, leaf_key.serialize_pem().as_bytes())?;
        Ok(certs)
    }

    /// Uses existing PEM files (e.g. from an earlier [`Certificates::generate`]).
    pub fn from_dir(dir: &Path) -> Self {
        Self {
            ca_pem: dir.join("ca.pem"),
            cert_pem: dir.join("cert.pem"),
            key_pem: dir.join("key.pem"),
        }
    }

    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3, no client certificates) serving the leaf.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let chain = CertificateDer::pem_file_iter(&self.cert_pem)
            .with_context(|| format!("reading {}", self.cert_pem.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", self.cert_pem.display()))?;
        let key = PrivateKeyDer::from_pem_file(&self.key_pem)
            .with_context(|| format!("reading {}", self.key_pem.display()))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("server certificate and key")?;
        Ok(Arc::new(config))
    }

    /// A root store holding only the sandbox CA, for clients.
    pub fn client_roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca_pem)
            .with_context(|| format!("reading {}", self.ca_pem.display()))?
        {
            roots.add(cert.with_context(|| format!("parsing {}", self.ca_pem.display()))?)?;
        }
        Ok(roots)
    }

    /// A rustls client configuration (ring provider) that trusts only the sandbox CA.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(self.client_roots()?)
        .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

fn write_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod 0644 {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_ca_and_a_leaf_that_rustls_accepts() {
        let dir =
            std::env::temp_dir().join(format!("mq-sandbox-tls-{}", uuid::Uuid::new_v4().simple()));
        let certs = Certificates::generate(&dir).unwrap();
        for path in [&certs.ca_pem, &certs.cert_pem, &certs.key_pem] {
            assert_eq!(
                fs::metadata(path).unwrap().permissions().mode() & 0o777,
                0o644,
                "{}",
                path.display()
            );
        }
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
        certs.server_config().unwrap();
        assert_eq!(certs.client_roots().unwrap().len(), 1);
        certs.client_config().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
