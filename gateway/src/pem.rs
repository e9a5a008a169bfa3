//! Certificates and keys from PEM files, for the broker's TLS listener and the uplink, with
//! problems described for an operator and never quoting the file: it may hold a private key.

use std::path::Path;

use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates in `path`; at least one. The error says what is wrong with the file.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| problem(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(&e))?;
    if certs.is_empty() {
        return Err(
            "holds no certificate (no \"-----BEGIN CERTIFICATE-----\" block); give a PEM certificate file".into(),
        );
    }
    Ok(certs)
}

/// The first private key in `path`. The error says what is wrong with the file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => "holds no private key (no \"-----BEGIN PRIVATE KEY-----\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block); give the PEM key that belongs to the certificate".into(),
        other => problem(&other),
    })
}

/// What is wrong with a PEM file, without quoting any of it.
fn problem(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(io) => format!("cannot be read: {io}"),
        pem::Error::NoItemsFound => "holds nothing usable".into(),
        pem::Error::MissingSectionEnd { .. } => {
            "is not valid PEM: a block has no \"-----END ...-----\" line".into()
        }
        pem::Error::IllegalSectionStart { .. } => {
            "is not valid PEM: a \"-----BEGIN ...-----\" line is malformed".into()
        }
        pem::Error::Base64Decode(_) => "is not valid PEM: a block is not valid base64".into(),
        _ => "is not a valid PEM file".into(),
    }
}
