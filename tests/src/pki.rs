//! A certificate authority made at test time (nothing secret is committed): CA, server and
//! client certificates as PEM files in a temporary directory.
//!
//! The directory is 0755 and every file 0644, keys included: a broker started as root that
//! drops to its own user (Mosquitto) must still read them. Not for anything but tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// A test CA and the directory its files go to.
pub struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA named `name`; its certificate is written to `ca.pem`. A second, unrelated CA
    /// is a second `Pki::new`.
    pub fn new(name: &str) -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let pki = Pki { dir, ca };
        pki.write("ca.pem", &pki.ca.pem())?;
        Ok(pki)
    }

    /// The CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate for `common_name`, also valid for `localhost` and `127.0.0.1`, signed by
    /// this CA: (certificate PEM, key PEM), also written to `{stem}.pem` and `{stem}.key`.
    pub fn issue(&self, stem: &str, common_name: &str) -> Result<(String, String)> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let (cert, key) = (cert.pem(), key.serialize_pem());
        self.write(&format!("{stem}.pem"), &cert)?;
        self.write(&format!("{stem}.key"), &key)?;
        Ok((cert, key))
    }

    /// The files [`Pki::issue`] wrote for `stem`: (certificate, key).
    pub fn files(&self, stem: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join(format!("{stem}.pem")),
            self.dir.path().join(format!("{stem}.key")),
        )
    }

    /// Writes `text` to `name` in the directory, readable by every user.
    fn write(&self, name: &str, text: &str) -> Result<()> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    }
}
