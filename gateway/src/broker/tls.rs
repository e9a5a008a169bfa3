//! TLS for the broker's listener: the server's certificate and, if configured, the CA that
//! client certificates must be signed by.
//!
//! The handshake runs in each connection's own task under the CONNECT timeout, never in the
//! accept loop: a client that opens a socket and says nothing delays no one else.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::config::TlsListener;

/// Why the TLS listener cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {why}")]
    File {
        /// Which file.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the combination.
    #[error("cannot set up TLS on the broker listener: {0}")]
    Rustls(String),
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    crate::pem::certificates(path).map_err(|why| TlsError::File {
        what,
        path: path.to_owned(),
        why,
    })
}

/// Builds the acceptor for `config`.
pub fn acceptor(config: &TlsListener) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates("certificate file", &config.cert)?;
    let key = crate::pem::private_key(&config.key).map_err(|why| TlsError::File {
        what: "key file",
        path: config.key.clone(),
        why,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("client CA file", ca)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    what: "client CA file",
                    path: ca.clone(),
                    why: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("the certificate and key do not fit: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The common name of a (verified) client certificate: the client's name.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_named_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("key.pem");
        std::fs::write(&text, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n").unwrap();
        let config = |cert: &Path, key: &Path| TlsListener {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: None,
        };
        let missing = dir.path().join("nope.pem");
        let e = acceptor(&config(&missing, &text))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("certificate file")
                && e.contains("nope.pem")
                && e.contains("cannot be read"),
            "{e}"
        );
        let e = acceptor(&config(&text, &text)).err().unwrap().to_string();
        assert!(e.contains("not valid PEM"), "{e}");
        assert!(
            !e.contains("c2VjcmV0"),
            "the key's text is never quoted: {e}"
        );
    }
}
